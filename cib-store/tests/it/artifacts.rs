//! Kept artifacts on SQLite and files: packed from a directory by glob, found again by commit,
//! pipeline and step (trusted builds only when asked), unpacked whole, and removed when expired.

use std::sync::Arc;

use cib_core::event::BuildId;
use cib_core::ports::{ArtifactQuery, Artifacts, NewArtifact};
use cib_core::spec::Glob;
use cib_core::time::Timestamp;
use cib_store::{FileArtifacts, SqliteOptions, SqliteStore};
use sha2::Digest;

fn new(build: &str, trusted: bool, created: u64) -> NewArtifact {
    NewArtifact {
        build: BuildId::from(build),
        name: "package".into(),
        repo: "acme/shop".into(),
        commit: "c0ffee".into(),
        pipeline: "test".into(),
        trusted,
        created_at: Timestamp(created),
        expires_at: Timestamp(created + 1000),
    }
}

fn query(trusted_only: bool) -> ArtifactQuery<'static> {
    ArtifactQuery { repo: "acme/shop", commit: "c0ffee", pipeline: "test", step: "package", trusted_only }
}

#[tokio::test]
async fn artifacts_are_packed_by_glob_found_by_commit_unpacked_and_expired() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SqliteStore::open(dir.path().join("cib.db"), SqliteOptions::default()).expect("store"));
    artifacts_round_trip(store, dir.path()).await;
}

/// Artifacts kept under `dir`, indexed in a store of any kind.
pub(crate) async fn artifacts_round_trip(store: Arc<dyn cib_core::ports::ArtifactIndex>, dir: &std::path::Path) {
    let artifacts = FileArtifacts::new(dir.join("artifacts"), store.clone());
    let work = dir.join("work");
    std::fs::create_dir_all(work.join("dist/docs")).expect("mkdir");
    std::fs::write(work.join("dist/app.whl"), b"the wheel").expect("write");
    std::fs::write(work.join("dist/docs/index.html"), b"<p>docs</p>").expect("write");
    std::fs::write(work.join("notes.txt"), b"not kept").expect("write");
    std::fs::write(dir.join("host-secret"), b"a file of the host").expect("write");
    std::os::unix::fs::symlink(dir.join("host-secret"), work.join("dist/link")).expect("symlink");
    let paths = [Glob::parse("dist/**").expect("glob")];

    // Nothing matching is an error that names the globs, and keeps nothing.
    let none = artifacts.save(new("b0", true, 0), &work, &[Glob::parse("*.xml").expect("glob")]).await;
    assert_eq!(none.expect_err("nothing matches").message(), "no file of the workspace matches *.xml");

    let record = artifacts.save(new("b1", true, 10), &work, &paths).await.expect("saved");
    assert_eq!(record.files, 3, "two files and the link, not notes.txt");
    let bytes = std::fs::read(artifacts.archive_path(&record)).expect("archive");
    assert_eq!(record.size, bytes.len() as u64);
    assert_eq!(record.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(artifacts.list(&BuildId::from("b1")).await.expect("list"), std::slice::from_ref(&record));

    // A newer untrusted build of the same commit: a trusted reader never gets it.
    let untrusted = artifacts.save(new("b2", false, 20), &work, &paths).await.expect("saved");
    assert_eq!(artifacts.find(&query(true), Timestamp(30)).await.expect("find"), Some(record.clone()));
    assert_eq!(artifacts.find(&query(false), Timestamp(30)).await.expect("find"), Some(untrusted));

    let out = dir.join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    assert_eq!(artifacts.unpack(&record, &out).await.expect("unpacked"), 2);
    assert_eq!(std::fs::read(out.join("dist/app.whl")).expect("wheel"), b"the wheel");
    assert_eq!(std::fs::read(out.join("dist/docs/index.html")).expect("docs"), b"<p>docs</p>");
    assert!(!out.join("notes.txt").exists());
    // The link stayed a link: the host's file was never copied into the archive.
    let link = std::fs::symlink_metadata(out.join("dist/link")).expect("link");
    assert!(link.file_type().is_symlink());

    // Expired at 1010 (b1) and 1020 (b2): records and files go.
    assert_eq!(artifacts.remove_expired(Timestamp(1015)).await.expect("expired"), 1);
    assert!(!artifacts.archive_path(&record).exists());
    assert_eq!(artifacts.find(&query(true), Timestamp(1015)).await.expect("find"), None);
    assert!(artifacts.list(&BuildId::from("b1")).await.expect("list").is_empty());
    assert_eq!(artifacts.remove_expired(Timestamp(5000)).await.expect("expired"), 1);
}
