//! cib reaches its Docker daemon over TLS, the alternative that docs/operations.md gives to
//! mounting the daemon's socket: `DOCKER_HOST=tcp://…` with `DOCKER_TLS_VERIFY` and the client
//! certificate, key and CA in `DOCKER_CERT_PATH`, as the docker client reads them.
//!
//! The daemon here listens on its Unix socket only, so the test puts a TLS front in between:
//! it asks every client for a certificate signed by the test's CA, as `dockerd --tlsverify`
//! does, and passes the bytes of an accepted connection to the socket. What is under test is
//! cib's side: that it speaks TLS with its client certificate, checks the daemon's certificate,
//! and runs a whole pipeline (attach, uploads, exec) through it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, UnixStream};

use super::local::{commit_all, copy_tree};

struct Issued {
    cert_pem: String,
    key_pem: String,
}

fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate")
}

fn issue(
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    names: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> Issued {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, ca).expect("certificate");
    Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
}

/// A `DOCKER_CERT_PATH` directory: the CA that signed the daemon's certificate, and a client
/// certificate with its key.
fn cert_dir(dir: &Path, ca_pem: &str, client: &Issued) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("ca.pem"), ca_pem).expect("ca.pem");
    std::fs::write(dir.join("cert.pem"), &client.cert_pem).expect("cert.pem");
    std::fs::write(dir.join("key.pem"), &client.key_pem).expect("key.pem");
    dir.to_owned()
}

/// The daemon's socket, from `DOCKER_HOST` when it names one.
fn docker_socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => PathBuf::from(host.trim_start_matches("unix://")),
        _ => PathBuf::from("/var/run/docker.sock"),
    }
}

/// Connections the front accepted (a client certificate the CA signed) and refused.
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

/// Starts the TLS front on a loopback port: the daemon's side of `--tlsverify`.
async fn tls_front(ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, counts: Arc<Counts>) -> u16 {
    let server = issue(ca, &["localhost"], rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("the CA is a root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    use rustls::pki_types::pem::PemObject;
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .expect("server TLS settings");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let socket = docker_socket();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, socket, counts) = (acceptor.clone(), socket.clone(), counts.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        counts.accepted.fetch_add(1, Ordering::SeqCst);
                        if let Ok(mut daemon) = UnixStream::connect(&socket).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut daemon).await;
                        }
                    }
                    Err(_) => {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    port
}

/// `cib run` in `dir` against the TLS front, off the runtime that serves the front: its exit
/// code and everything it said.
async fn cib_run(dir: &Path, port: u16, certs: PathBuf) -> (Option<i32>, String) {
    let dir = dir.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_cib"))
            .args(["run", "--color", "never"])
            .current_dir(&dir)
            .env("CIB_DATA_DIR", dir.join(".cib-data"))
            .env("DOCKER_HOST", format!("tcp://localhost:{port}"))
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", certs)
            .output()
            .expect("cib runs")
    })
    .await
    .expect("joined");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cib_run_reaches_docker_over_tls_with_a_client_certificate() {
    let authority = ca("cib test daemon CA");
    let counts = Arc::new(Counts::default());
    let port = tls_front(&authority, counts.clone()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let work = dir.path().join("shell");
    copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shell"), &work);
    commit_all(&work);

    // A client certificate from another CA is refused by the daemon's side: cib says it cannot
    // use Docker (exit 3), and runs nothing.
    let stranger = issue(&ca("someone else"), &["cib"], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let wrong = cert_dir(&dir.path().join("wrong"), &authority.pem(), &stranger);
    let (code, said) = cib_run(&work, port, wrong).await;
    assert_eq!(code, Some(3), "a refused certificate: {said}");
    assert!(said.contains("Docker"), "{said}");
    // With TLS 1.3 the client finishes its side of the handshake before the server has checked
    // the client's certificate, so cib can exit on the server's alert before the front's task
    // has counted the refusal: wait for the count rather than read it once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while counts.refused.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(counts.refused.load(Ordering::SeqCst) >= 1, "the front saw no refused handshake");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 0);

    // With the CA's own client certificate, the example's pipeline runs green through TLS.
    let client = issue(&authority, &["cib"], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let right = cert_dir(&dir.path().join("right"), &authority.pem(), &client);
    let (code, said) = cib_run(&work, port, right).await;
    assert_eq!(code, Some(0), "over TLS: {said}");
    assert!(said.contains("pipeline test succeeded"), "{said}");
    assert!(counts.accepted.load(Ordering::SeqCst) >= 1, "no connection went through the TLS front");
}
