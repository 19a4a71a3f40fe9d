//! Images built by the real Docker daemon from a tar of the workspace, pushed to a real
//! docker-registry with htpasswd auth, re-tagged by digest; a push cut midway leaves no tag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cib_core::ports::{ErrorKind, Stream};
use cib_core::publish::{DeliverableRecord, Publisher};
use cib_core::spec::Deliverable;
use cib_core::testing::CollectingSink;
use cib_publish::DeliveryPublisher;
use cib_publish::http::HttpClient;
use cib_publish::registry::{ImageRef, Registry};

use super::pypi::run;
use cib_publish::testing::{Counting, pipe, registry};

fn docker(image: &str, tags: &[&str], from: Option<&str>) -> Deliverable {
    Deliverable::Docker {
        image: image.into(),
        context: ".".into(),
        dockerfile: "Dockerfile".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        credentials: Some("REGISTRY".into()),
        from: from.map(str::to_owned),
    }
}

fn context_dir(extra_mb: usize) -> tempfile::TempDir {
    let ws = tempfile::tempdir().expect("workspace");
    let mut dockerfile = "FROM busybox\nCOPY hello.txt /hello.txt\n".to_owned();
    std::fs::write(ws.path().join("hello.txt"), format!("hello from {:?}\n", ws.path())).expect("file");
    if extra_mb > 0 {
        // Random bytes do not compress, so the layer is as big on the wire.
        let mut data = vec![0u8; extra_mb << 20];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ ws.path().to_string_lossy().len() as u64;
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(ws.path().join("blob.bin"), data).expect("blob");
        dockerfile.push_str("COPY blob.bin /blob.bin\n");
    }
    std::fs::write(ws.path().join("Dockerfile"), dockerfile).expect("Dockerfile");
    ws
}

fn repo(port: u16, name: &str, user: &str, password: &str) -> Registry {
    Registry::new(
        HttpClient::new(),
        ImageRef::parse(&format!("127.0.0.1:{port}/{name}"), ""),
        Some((user.into(), password.into())),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_pushes_and_tags_by_digest_then_a_promotion_retags_without_moving_layers() {
    let reg = registry("pusher", "s3cret-registry");
    let counting = Counting::start(reg.port).await;
    let image = format!("127.0.0.1:{}/app", counting.port);
    let ws = context_dir(0);
    let publisher = DeliveryPublisher::new(None);
    let job = run(ws.path(), vec![docker(&image, &["{{commit}}", "staging"], None)], &[("REGISTRY", &reg.secret())]);
    let logs = CollectingSink::new();
    let published = publisher.publish(&job, logs.clone()).await.expect("built and pushed");
    let out = logs.text(Stream::Stdout);
    assert!(out.contains("COPY hello.txt /hello.txt"), "the build's output is in the log: {out}");
    assert_eq!(published.len(), 1);
    let commit = job.job.context.commit.clone();
    assert_eq!(published[0].tags, vec![commit.clone(), "staging".to_owned()]);
    let digest = published[0].digest.clone();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let r = repo(reg.port, "app", "pusher", "s3cret-registry");
    let mut tags = r.tags().await.expect("tags");
    tags.sort();
    assert_eq!(tags, vec![commit.clone(), "staging".to_owned()]);
    for tag in [&commit, &"staging".to_owned()] {
        let m = r.manifest(tag).await.expect("read").expect("tagged");
        assert_eq!(m.digest, digest, "{tag} names the pushed manifest");
    }

    // Promotion: the manifest by digest under `production`, nothing else moved.
    let before = counting.blob_writes.load(Ordering::SeqCst);
    assert!(before > 0, "the push uploaded blobs");
    let mut promote =
        run(ws.path(), vec![docker(&image, &["production"], Some("staging"))], &[("REGISTRY", &reg.secret())]);
    promote.job.pipeline = "production".into();
    promote.job.promoted = vec![DeliverableRecord {
        artifact: published[0].clone(),
        build: "b1".into(),
        repo: "acme/app".into(),
        pipeline: "staging".into(),
        commit: commit.clone(),
        at: cib_core::time::Timestamp(1),
        first_build: "b1".into(),
    }];
    let promoted = publisher.publish(&promote, CollectingSink::new()).await.expect("promoted");
    assert_eq!(promoted[0].digest, digest);
    assert_eq!(promoted[0].first_build, Some("b1".into()));
    assert_eq!(r.manifest("production").await.expect("read").expect("tagged").digest, digest);
    assert_eq!(counting.blob_writes.load(Ordering::SeqCst), before, "no layer was pushed again");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_registry_credentials_name_the_secret_never_the_value() {
    let reg = registry("pusher", "s3cret-registry");
    let ws = context_dir(0);
    let image = format!("127.0.0.1:{}/app", reg.port);
    let publisher = DeliveryPublisher::new(None);
    let job = run(ws.path(), vec![docker(&image, &["v1"], None)], &[("REGISTRY", "pusher:wrong-password")]);
    let error = publisher.publish(&job, CollectingSink::new()).await.expect_err("refused");
    assert_eq!(error.kind, ErrorKind::Misconfigured, "{error:?}");
    assert!(error.message.contains("secret 'REGISTRY'"), "{}", error.message);
    assert!(!error.to_string().contains("wrong-password"), "{error}");
    let tags = repo(reg.port, "app", "pusher", "s3cret-registry").tags().await.expect("tags");
    assert!(tags.is_empty(), "{tags:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_goes_down_mid_push_is_left_with_no_tag() {
    let reg = registry("pusher", "s3cret-registry");
    // The registry is reached through a proxy that goes down for good once 4 MiB of the
    // push have gone through: the daemon's retries find nothing listening.
    let cut = Cut::start(reg.port, 4 << 20).await;
    let image = format!("127.0.0.1:{}/app", cut.port);
    let ws = context_dir(24);
    let publisher = DeliveryPublisher::new(None);
    let job = run(ws.path(), vec![docker(&image, &["v1"], None)], &[("REGISTRY", &reg.secret())]);
    let error = publisher.publish(&job, CollectingSink::new()).await.expect_err("the push fails");
    assert!(cut.tripped.load(Ordering::SeqCst), "the proxy cut the push midway");
    assert_eq!(error.kind, ErrorKind::Transient, "a registry that went away may come back: {error:?}");
    let tags = repo(reg.port, "app", "pusher", "s3cret-registry").tags().await.expect("tags");
    assert!(tags.is_empty(), "no tag points at a partial image: {tags:?}");
}

/// A proxy that stops listening and drops every connection once `limit` bytes went upstream.
struct Cut {
    port: u16,
    tripped: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cut {
    async fn start(target: u16, limit: usize) -> Cut {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let tripped = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let flag = tripped.clone();
        let task = tokio::spawn(async move {
            let (down_tx, down_rx) = tokio::sync::watch::channel(false);
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = async { let mut rx = down_rx.clone(); let _ = rx.wait_for(|d| *d).await; } => break,
                };
                let Ok((client, _)) = accepted else { break };
                let (sent, flag, down_tx, mut down) = (sent.clone(), flag.clone(), down_tx.clone(), down_rx.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    tokio::select! {
                        () = pipe(client, server, move |chunk| {
                            if sent.fetch_add(chunk.len(), Ordering::SeqCst) + chunk.len() > limit {
                                flag.store(true, Ordering::SeqCst);
                                let _ = down_tx.send(true);
                                return false;
                            }
                            true
                        }) => {}
                        _ = down.wait_for(|d| *d) => {}
                    }
                });
            }
            // Dropping the listener: from now on, connections are refused.
        });
        Cut { port, tripped, task }
    }
}

/// Image names without a registry go where the daemon's own default index is, read from its
/// `GET /info`: the real daemon's answer has the shape `registry_of_index` reads.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_names_the_default_registry_for_names_without_one() {
    let docker = bollard::Docker::connect_with_defaults().unwrap_or_else(|e| panic!("docker: {e}"));
    let info = docker.info().await.unwrap_or_else(|e| panic!("cannot reach Docker ({e}): run scripts/ensure-docker"));
    let address = info.index_server_address.unwrap_or_else(|| panic!("the daemon names no index"));
    let host = cib_publish::registry::registry_of_index(&address).unwrap_or_else(|| panic!("no host in {address}"));
    assert!(!host.contains('/') && address.contains(&host), "{host} from {address}");
    let image = cib_publish::registry::ImageRef::parse("acme/app:1", &host);
    assert_eq!((image.registry.as_str(), image.repository.as_str()), (host.as_str(), "acme/app"));
}
