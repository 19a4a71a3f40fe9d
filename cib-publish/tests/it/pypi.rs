//! Uploads to a real pypiserver: idempotent by sha256, other bytes refused with both digests,
//! wrong credentials named (never shown), 503s reported as transient.

use std::collections::BTreeMap;

use cib_core::pipeline::BuildContext;
use cib_core::ports::{ErrorKind, Stream};
use cib_core::publish::{PublishJob, PublishRun, Publisher};
use cib_core::spec::{Deliverable, Glob, TriggerEvent};
use cib_core::testing::CollectingSink;
use cib_publish::DeliveryPublisher;

use cib_publish::testing::{self as services, Flaky, pypiserver};

pub fn context() -> BuildContext {
    BuildContext {
        repo: "acme/app".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        branch: Some("master".into()),
        pull_request: None,
        event: TriggerEvent::push("master"),
        actor: Some("dev".into()),
        trusted: true,
        upstream: None,
    }
}

pub fn pypi(index: &str, secret: &str) -> Deliverable {
    Deliverable::Pypi {
        index: index.into(),
        credentials: secret.into(),
        files: Glob::parse("dist/*").expect("glob"),
        from: None,
    }
}

pub fn run(workspace: &std::path::Path, deliverables: Vec<Deliverable>, credentials: &[(&str, &str)]) -> PublishRun {
    PublishRun {
        job: PublishJob {
            build: "b1".into(),
            pipeline: "staging".into(),
            attempt: 1,
            context: context(),
            deliverables,
            promoted: Vec::new(),
        },
        workspace: workspace.to_path_buf(),
        credentials: credentials.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
    }
}

fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("read")))
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_once_by_sha256_and_refuses_other_bytes_under_the_same_version() {
    let index = pypiserver("uploader", "s3cret-index");
    let ws = tempfile::tempdir().expect("workspace");
    std::fs::create_dir(ws.path().join("dist")).expect("dist");
    let wheel = services::wheel(&ws.path().join("dist"), "1.2.3", "VALUE = 1\n");
    let digest = sha256_of(&wheel);
    let publisher = DeliveryPublisher::new(None);
    let job = run(ws.path(), vec![pypi(&index.url(), "INDEX")], &[("INDEX", &index.secret())]);

    let logs = CollectingSink::new();
    let first = publisher.publish(&job, logs.clone()).await.expect("the first upload works");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].digest, format!("sha256:{digest}"));
    assert_eq!((first[0].name.as_str(), first[0].version.as_deref()), ("app", Some("1.2.3")));
    let stored = index.dir.path().join("packages/app-1.2.3-py3-none-any.whl");
    assert_eq!(sha256_of(&stored), digest, "the index holds the very bytes");
    let modified = std::fs::metadata(&stored).expect("stored").modified().expect("mtime");

    // The same file again: a success with nothing changed.
    let logs = CollectingSink::new();
    let again = publisher.publish(&job, logs.clone()).await.expect("publishing again is a success");
    assert_eq!(again, first);
    assert!(
        logs.text(Stream::Stdout).contains("already with the same sha256: nothing to do"),
        "{}",
        logs.text(Stream::Stdout)
    );
    assert_eq!(std::fs::metadata(&stored).expect("stored").modified().expect("mtime"), modified, "not written again");

    // Other bytes under the same name and version: refused, with both digests.
    let other = services::wheel(&ws.path().join("dist"), "1.2.3", "VALUE = 2\n");
    let other_digest = sha256_of(&other);
    assert_ne!(other_digest, digest);
    let error = publisher.publish(&job, CollectingSink::new()).await.expect_err("other bytes are refused");
    assert_eq!(error.kind, ErrorKind::Permanent);
    assert!(error.message.contains(&digest) && error.message.contains(&other_digest), "{}", error.message);
    assert_eq!(error.deliverable, format!("pypi {}", index.url()));
    assert_eq!(sha256_of(&stored), digest, "the index still serves the first file");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_name_the_index_and_the_secret_never_the_value() {
    let index = pypiserver("uploader", "s3cret-index");
    let ws = tempfile::tempdir().expect("workspace");
    std::fs::create_dir(ws.path().join("dist")).expect("dist");
    services::wheel(&ws.path().join("dist"), "1.0.0", "X = 1\n");
    let publisher = DeliveryPublisher::new(None);
    let job =
        run(ws.path(), vec![pypi(&index.url(), "STAGING_INDEX")], &[("STAGING_INDEX", "uploader:not-the-password")]);
    let logs = CollectingSink::new();
    let error = publisher.publish(&job, logs.clone()).await.expect_err("refused");
    assert_eq!(error.kind, ErrorKind::Misconfigured, "{error:?}");
    let text = error.to_string();
    assert!(text.contains(&index.url()) && text.contains("secret 'STAGING_INDEX'"), "{text}");
    assert!(!text.contains("not-the-password"), "the value never shows: {text}");
    assert!(!logs.text(Stream::Stdout).contains("not-the-password"));
    assert!(!index.dir.path().join("packages/app-1.0.0-py3-none-any.whl").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_503_is_transient_and_the_upload_after_it_lands_once() {
    let index = pypiserver("uploader", "s3cret-index");
    let flaky = Flaky::start(index.port, 2).await;
    let url = format!("http://127.0.0.1:{}/", flaky.port);
    let ws = tempfile::tempdir().expect("workspace");
    std::fs::create_dir(ws.path().join("dist")).expect("dist");
    services::wheel(&ws.path().join("dist"), "2.0.0", "Y = 1\n");
    let publisher = DeliveryPublisher::new(None);
    let job = run(ws.path(), vec![pypi(&url, "INDEX")], &[("INDEX", &index.secret())]);
    for _ in 0..2 {
        let error = publisher.publish(&job, CollectingSink::new()).await.expect_err("503");
        assert_eq!(error.kind, ErrorKind::Transient, "{error:?}");
        assert!(error.message.contains("503"), "{}", error.message);
    }
    publisher.publish(&job, CollectingSink::new()).await.expect("the third try lands");
    assert_eq!(flaky.passed.load(std::sync::atomic::Ordering::SeqCst), 1, "one upload reached the index");
}
