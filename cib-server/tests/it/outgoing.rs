//! Outgoing webhooks against real receivers on loopback: an https one with a test certificate,
//! a restart in the middle of the stream over a real SQLite file, the guard against
//! server-side request forgery, and the outbox depth in `/metrics`.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cib_core::event::{BuildId, Event, EventBody};
use cib_core::ports::Store;
use cib_core::time::Timestamp;
use cib_server::config::{Role, ServerConfig, WebhookConfig};
use cib_server::outgoing::{Backoff, Outgoing, Receiver, sign};
use cib_store::{SqliteOptions, SqliteStore};
use http_body_util::{BodyExt, Full};

use super::server::{SPEC, TestServer, token};

const SECRET: &str = "outgoing-hook-secret";

/// What a test receiver saw: the events it acknowledged (sequence number, signature, body) and
/// the sequence number of every request that reached it, answered or not.
#[derive(Debug, Default)]
struct Seen {
    acked: Vec<(u64, String, Vec<u8>)>,
    arrivals: Vec<u64>,
}

/// A webhook receiver on loopback, over http or, with a TLS configuration, https.
struct TestReceiver {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    /// An event with this sequence number gets no answer at all (0: none does).
    hold: Arc<AtomicU64>,
    /// The status every other request is answered with.
    status: Arc<AtomicU16>,
    /// Connections accepted, TLS handshakes included.
    connections: Arc<AtomicUsize>,
}

impl TestReceiver {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let receiver = TestReceiver {
            port,
            seen: Arc::default(),
            hold: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            connections: Arc::default(),
        };
        let (seen, hold, status, connections) =
            (receiver.seen.clone(), receiver.hold.clone(), receiver.status.clone(), receiver.connections.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                connections.fetch_add(1, Ordering::SeqCst);
                let (seen, hold, status, acceptor) = (seen.clone(), hold.clone(), status.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (seen, hold, status) = (seen.clone(), hold.clone(), status.clone());
                        async move {
                            let header = |n: &str| {
                                req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
                            };
                            let signature = header("x-cib-signature-256");
                            let seq: u64 = header("x-cib-event-seq").parse().expect("x-cib-event-seq is a number");
                            let body =
                                req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                            seen.lock().expect("lock").arrivals.push(seq);
                            if hold.load(Ordering::SeqCst) == seq {
                                // As a receiver that hangs: the sender never hears back.
                                std::future::pending::<()>().await;
                            }
                            let code = status.load(Ordering::SeqCst);
                            if (200..300).contains(&code) {
                                seen.lock().expect("lock").acked.push((seq, signature, body));
                            }
                            let mut response = http::Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = http::StatusCode::from_u16(code).expect("status");
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            // A client that does not trust the certificate ends here.
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        receiver
    }

    fn acked(&self) -> Vec<u64> {
        self.seen.lock().expect("lock").acked.iter().map(|(seq, _, _)| *seq).collect()
    }

    fn arrivals(&self) -> Vec<u64> {
        self.seen.lock().expect("lock").arrivals.clone()
    }
}

/// Waits up to 20 s for `done`, then fails with `what`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn events(seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
    seqs.map(|seq| Event {
        seq,
        at: Timestamp(seq * 1_000),
        body: EventBody::BuildStarted { build: BuildId::from(format!("build-{seq}").as_str()) },
    })
    .collect()
}

fn hook(url: String, name: &str) -> WebhookConfig {
    WebhookConfig { name: Some(name.into()), ..WebhookConfig::new(url, SECRET) }
}

/// A receiver from its settings, retrying quickly so that tests do not wait.
fn receiver(config: &WebhookConfig) -> Receiver {
    let mut receiver = Receiver::new(config).expect("a valid receiver");
    receiver.backoff = Backoff { base: Duration::from_millis(20), max: Duration::from_millis(200) };
    receiver
}

fn open(path: &std::path::Path) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(path, SqliteOptions::default()).expect("open the store"))
}

/// A test certificate authority and a certificate for `localhost` signed by it.
struct TestPki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn test_pki() -> TestPki {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "cib test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    let server_cert = server_params.signed_by(&server_key, &ca).expect("server certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], key)
        .expect("server TLS settings");
    TestPki { ca_pem: ca.pem(), server: Arc::new(server) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_receiver_is_trusted_through_its_ca_file() {
    let pki = test_pki();
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).expect("write the CA");
    let https = TestReceiver::start(Some(pki.server.clone())).await;
    let store = open(&dir.path().join("cib.db"));
    store.append_events(&events(1..=3)).await.expect("events");
    // `localhost`, so that the certificate's name is checked too; it resolves to loopback.
    let url = format!("https://localhost:{}/cib", https.port);
    let trusted = WebhookConfig { allow_private: true, ca_file: Some(ca_file.clone()), ..hook(url.clone(), "trusted") };
    let untrusted = WebhookConfig { allow_private: true, ..hook(url, "untrusted") };
    for name in ["trusted", "untrusted"] {
        store.advance_webhook_cursor(name, 0).await.expect("start at the beginning");
    }
    let outgoing = Outgoing::start(vec![receiver(&trusted), receiver(&untrusted)], store.clone());

    until("the trusted receiver has every event", || https.acked().len() >= 3).await;
    let seen = https.seen.lock().expect("lock").acked.clone();
    assert_eq!(seen.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>(), [1, 2, 3], "in order, once each");
    for (seq, signature, body) in &seen {
        assert_eq!(signature, &sign(SECRET.as_bytes(), body), "event {seq} is signed over its body");
        let event: serde_json::Value = serde_json::from_slice(body).expect("JSON");
        assert_eq!(event["seq"], *seq, "{event}");
        assert_eq!(event["type"], "build_started", "{event}");
    }
    until("the trusted receiver's cursor is stored", || {
        futures_now(store.webhook_cursor("trusted")).is_some_and(|c| c == Some(3))
    })
    .await;

    // Without the CA file the same server is not trusted: the handshake fails, nothing is
    // acknowledged, and the reason says why.
    until("the untrusted receiver reports a failure", || outgoing.last_error("untrusted").is_some()).await;
    let error = outgoing.last_error("untrusted").unwrap_or_default();
    assert!(error.contains("certificate") || error.contains("UnknownIssuer"), "{error}");
    assert_eq!(store.webhook_cursor("untrusted").await.expect("cursor"), Some(0), "nothing was acknowledged");
    assert_eq!(https.acked().len(), 3, "the untrusted receiver delivered nothing");
}

/// Polls a store future once it is ready, for use inside [`until`]'s synchronous check.
fn futures_now<T>(future: impl std::future::Future<Output = Result<T, cib_core::ports::StoreError>>) -> Option<T> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future)).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_stream_loses_no_event() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let http = TestReceiver::start(None).await;
    let config = WebhookConfig { allow_private: true, ..hook(format!("http://127.0.0.1:{}/cib", http.port), "chat") };

    let store = open(&path);
    store.append_events(&events(1..=10)).await.expect("events");
    store.advance_webhook_cursor("chat", 0).await.expect("start at the beginning");
    // The receiver hangs on event 6: the process "dies" while that delivery is in flight.
    http.hold.store(6, Ordering::SeqCst);
    let outgoing = Outgoing::start(vec![receiver(&config)], store.clone());
    until("event 6 reaches the receiver", || http.arrivals().contains(&6)).await;
    assert_eq!(http.acked(), [1, 2, 3, 4, 5]);
    // A cursor moves only after a 2xx, and the next event is sent only after the move.
    assert_eq!(store.webhook_cursor("chat").await.expect("cursor"), Some(5));

    // The restart: the tasks stop, the store is closed, and both come back from the file.
    drop(outgoing);
    drop(store);
    http.hold.store(0, Ordering::SeqCst);
    let store = open(&path);
    let outgoing = Outgoing::start(vec![receiver(&config)], store.clone());
    until("every stored event is acknowledged", || http.acked().len() >= 10).await;
    // New events wake the task, as the engine's notification does.
    store.append_events(&events(11..=12)).await.expect("more events");
    outgoing.wake();
    until("the new events are acknowledged", || http.acked().len() >= 12).await;

    assert_eq!(http.acked(), (1..=12).collect::<Vec<_>>(), "every event acknowledged once, in order");
    let arrivals = http.arrivals();
    assert_eq!(arrivals.iter().filter(|s| **s == 6).count(), 2, "only the event in flight is sent again: {arrivals:?}");
    assert_eq!(arrivals.len(), 13, "{arrivals:?}");
    until("the cursor is at the last event", || {
        futures_now(store.webhook_cursor("chat")).is_some_and(|c| c == Some(12))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let http = TestReceiver::start(None).await;
    let store = open(&dir.path().join("cib.db"));
    store.append_events(&events(1..=2)).await.expect("events");
    let port = http.port;
    // A literal address, a name that resolves to loopback, and loopback as an IPv4-mapped
    // IPv6 address: all the same place, and all refused.
    let refused = [
        hook(format!("http://127.0.0.1:{port}/cib"), "literal"),
        hook(format!("http://localhost:{port}/cib"), "by-name"),
        hook(format!("http://[::ffff:127.0.0.1]:{port}/cib"), "mapped"),
    ];
    for config in &refused {
        store.advance_webhook_cursor(config.name.as_deref().unwrap_or_default(), 0).await.expect("cursor");
    }
    let outgoing = Outgoing::start(refused.iter().map(receiver).collect(), store.clone());
    for config in &refused {
        let name = config.name.clone().unwrap_or_default();
        // The delivery's own refusal, which follows the one reported at start.
        until(&format!("{name} reports a refused delivery"), || {
            outgoing.last_error(&name).is_some_and(|e| e.contains("server-side request forgery"))
        })
        .await;
        let error = outgoing.last_error(&name).unwrap_or_default();
        assert!(error.contains("server-side request forgery") && error.contains("loopback"), "{name}: {error}");
    }
    // Some more retries go by; still no connection was ever made and nothing moved.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http.connections.load(Ordering::SeqCst), 0, "a refused address is never connected to");
    for config in &refused {
        let name = config.name.as_deref().unwrap_or_default();
        assert_eq!(store.webhook_cursor(name).await.expect("cursor"), Some(0), "{name}");
    }
    drop(outgoing);

    // A refused receiver is reported when it starts, before it has anything to send.
    store.advance_webhook_cursor("idle", 2).await.expect("cursor");
    let idle = Outgoing::start(vec![receiver(&hook(format!("http://localhost:{port}/cib"), "idle"))], store.clone());
    until("the idle receiver reports the refusal", || idle.last_error("idle").is_some()).await;
    let error = idle.last_error("idle").unwrap_or_default();
    assert!(error.contains("localhost") && error.contains("loopback"), "{error}");
    drop(idle);

    // The same receiver, allowed, gets the events: the refusal above was the guard's.
    let allowed = WebhookConfig { allow_private: true, ..hook(format!("http://localhost:{port}/cib"), "allowed") };
    store.advance_webhook_cursor("allowed", 0).await.expect("cursor");
    let _outgoing = Outgoing::start(vec![receiver(&allowed)], store.clone());
    until("the allowed receiver has both events", || http.acked() == [1, 2]).await;
}

#[test]
fn configuration_refuses_private_literal_addresses_unless_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let load = |webhook: &str| {
        let path = dir.path().join("cib.toml");
        std::fs::write(&path, format!("[[webhooks]]\nsecret = \"s3cret\"\n{webhook}\n")).expect("write");
        ServerConfig::load(Some(&path), &Default::default())
    };
    for url in ["http://10.0.0.7/hook", "https://169.254.169.254/", "http://[::1]:9000/", "http://[fd00::1]/"] {
        let error = load(&format!("url = \"{url}\"")).expect_err(url);
        assert!(error.contains("allow_private = true"), "{url}: {error}");
        load(&format!("url = \"{url}\"\nallow_private = true")).unwrap_or_else(|e| panic!("{url} allowed: {e}"));
    }
    // Names are judged when they are resolved, at each connection, not from the file.
    load("url = \"https://hooks.example.com/cib\"").expect("a public name");
    let error = load("url = \"ftp://example.com/x\"").expect_err("ftp");
    assert!(error.contains("http:// or https://"), "{error}");
    let error = load("url = \"https://example.com/\"\nca_file = \"/no/such/ca.pem\"").expect_err("missing CA file");
    assert!(error.contains("ca_file") && error.contains("/no/such/ca.pem"), "{error}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let error =
        load(&format!("url = \"https://example.com/\"\nca_file = \"{}\"", empty.display())).expect_err("no cert");
    assert!(error.contains("no PEM certificate"), "{error}");

    let path = dir.path().join("two.toml");
    std::fs::write(
        &path,
        "[[webhooks]]\nurl = \"https://a.example.com/one\"\nsecret = \"s\"\n\
         [[webhooks]]\nurl = \"https://a.example.com/two\"\nsecret = \"s\"\n",
    )
    .expect("write");
    let error = ServerConfig::load(Some(&path), &Default::default()).expect_err("two receivers, one name");
    assert!(error.contains("a.example.com") && error.contains("name"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_each_receivers_outbox_depth() {
    let down = TestReceiver::start(None).await;
    down.status.store(503, Ordering::SeqCst);
    let up = TestReceiver::start(None).await;
    let hooks = vec![
        WebhookConfig { allow_private: true, ..hook(format!("http://127.0.0.1:{}/cib", down.port), "down") },
        WebhookConfig { allow_private: true, ..hook(format!("http://127.0.0.1:{}/cib", up.port), "up") },
    ];
    let s = TestServer::start_with(SPEC, hooks).await;
    let trigger =
        serde_json::to_vec(&serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }))
            .expect("json");
    assert_eq!(s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &trigger).await.status, 201);
    until("the working receiver has the gate's event", || {
        up.seen.lock().expect("lock").acked.iter().any(|(_, _, b)| String::from_utf8_lossy(b).contains("gate_waiting"))
    })
    .await;
    let depth = |name: &str, body: &str| -> Option<u64> {
        let prefix = format!("cib_outgoing_webhook_outbox_depth{{receiver=\"{name}\"}} ");
        body.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let last = loop {
        let last = s.store.last_event_seq().await.expect("last event");
        let metrics = s.request("GET", "/metrics", None, b"").await;
        assert_eq!(metrics.status, 200);
        let (down_depth, up_depth) = (depth("down", &metrics.body), depth("up", &metrics.body));
        // Every event waits for the receiver that is down; none for the one that is up.
        if down_depth == Some(last) && up_depth == Some(0) {
            break last;
        }
        assert!(Instant::now() < deadline, "depths {down_depth:?} and {up_depth:?}, last event {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(last >= 4, "a build makes several events, not {last}");
    until("the receiver that is down is tried again", || down.arrivals().len() >= 2).await;
    assert!(down.arrivals().iter().all(|seq| *seq == 1), "it is retried at its first event: {:?}", down.arrivals());
    assert!(down.acked().is_empty());
}

/// `cib serve` itself, killed with SIGKILL while a delivery is in flight, on real Docker and
/// SQLite: after the restart the receiver gets every event once, from where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cib_serve_killed_mid_stream_delivers_every_event_after_restart() {
    use super::restart;
    let http = TestReceiver::start(None).await;
    // The third event (the step starting) gets no answer until the server has been killed.
    http.hold.store(3, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("temp dir");
    let shop = dir.path().join("shop");
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: hello, image: busybox, commands: [echo hello] }\n";
    let commit = super::server::repo(&shop, spec);
    let port = restart::free_port();
    let extra = format!(
        "[[webhooks]]\nname = \"chat\"\nurl = \"http://127.0.0.1:{}/cib\"\nsecret = \"{SECRET}\"\nallow_private = true\n",
        http.port
    );
    let config = restart::config_with(dir.path(), port, &shop, &extra);
    let blocking = |f: Box<dyn FnOnce() -> restart::Server + Send>| tokio::task::spawn_blocking(f);

    let server = {
        let config = config.clone();
        blocking(Box::new(move || restart::start(&config, port))).await.expect("started")
    };
    let body = super::server::push_payload(&commit);
    let url = server.url.clone();
    let status = tokio::task::spawn_blocking(move || restart::hook(&url, "d-out", &body)).await.expect("hook");
    assert_eq!(status, 202);
    until("the third event reaches the receiver", || http.arrivals().contains(&3)).await;
    assert_eq!(http.acked(), [1, 2]);
    tokio::task::spawn_blocking(move || server.kill()).await.expect("killed");

    http.hold.store(0, Ordering::SeqCst);
    let server = blocking(Box::new(move || restart::start(&config, port))).await.expect("started again");
    let url = server.url.clone();
    let done = tokio::task::spawn_blocking(move || {
        restart::wait_for(&url, "the build ended after the restart", |b| {
            // The step was running when the server was killed: the build ends as interrupted
            // steps do (errored), which makes events all the same.
            b["builds"].as_array().is_some_and(|a| a.len() == 1 && a[0]["finished_at"].is_u64())
        })
    })
    .await
    .expect("builds");
    until("the receiver has the build's end", || {
        http.seen
            .lock()
            .expect("lock")
            .acked
            .iter()
            .any(|(_, _, b)| String::from_utf8_lossy(b).contains("build_finished"))
    })
    .await;
    // Depth 0 says the cursor is at the last stored event; with every event from 1 to the last
    // acknowledged once, in order, nothing was lost and nothing acknowledged came twice.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let url = server.url.clone();
        let (status, metrics) = tokio::task::spawn_blocking(move || restart::http(&url, "GET", "/metrics", &[], b""))
            .await
            .expect("metrics");
        assert_eq!(status, 200, "{metrics}");
        if metrics.contains("cib_outgoing_webhook_outbox_depth{receiver=\"chat\"} 0\n") {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked = http.acked();
    assert_eq!(acked, (1..=acked.len() as u64).collect::<Vec<_>>(), "every event once, in order");
    assert!(acked.len() >= 5, "{acked:?}");
    let arrivals = http.arrivals();
    assert_eq!(arrivals.iter().filter(|s| **s == 3).count(), 2, "only the event in flight came again: {arrivals:?}");
    for (seq, signature, body) in http.seen.lock().expect("lock").acked.iter() {
        assert_eq!(signature, &sign(SECRET.as_bytes(), body), "event {seq} is signed");
    }
    // The engine cleans a finished build up on a task of its own: wait for it while the server
    // still runs, since a killed server leaves the rest to its next start.
    let build = done["builds"][0]["id"].as_str().expect("id").to_owned();
    tokio::task::spawn_blocking(move || restart::wait_clean(&build)).await.expect("clean");
    drop(server);
}
