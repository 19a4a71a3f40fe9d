//! Opening a database: WAL mode, versioned migrations applied once, concurrent first opens,
//! and refusal of what this code cannot use.

use cib_core::ports::ErrorKind;
use cib_store::{SCHEMA_VERSION, SqliteOptions, SqliteStore};

use crate::open;

#[test]
fn a_new_database_is_in_wal_mode_at_the_current_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    drop(open(&path, SqliteOptions::default()));
    drop(open(&path, SqliteOptions::default()));
    let conn = rusqlite::Connection::open(&path).expect("open");
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("mode");
    assert_eq!(mode, "wal");
    let versions: Vec<i64> = conn
        .prepare("SELECT version FROM schema_version ORDER BY version")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("versions");
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>(), "each migration applied once");
}

#[test]
fn concurrent_first_opens_migrate_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || SqliteStore::open(&path, SqliteOptions::default()).map(drop))
        })
        .collect();
    for t in threads {
        t.join().expect("join").expect("every concurrent open succeeds");
    }
    let conn = rusqlite::Connection::open(&path).expect("open");
    let count: i64 = conn.query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0)).expect("count");
    assert_eq!(count, SCHEMA_VERSION);
}

#[test]
fn a_database_from_a_newer_cib_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    drop(open(&path, SqliteOptions::default()));
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?1, 0)", [SCHEMA_VERSION + 1])
        .expect("insert");
    drop(conn);
    let error = SqliteStore::open(&path, SqliteOptions::default()).expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Misconfigured, "{error}");
    assert!(error.to_string().contains("newer"), "{error}");
}

#[test]
fn files_that_are_not_databases_and_bad_options_are_misconfigurations() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("not-a.db");
    std::fs::write(&path, vec![b'x'; 8192]).expect("write");
    let error = SqliteStore::open(&path, SqliteOptions::default()).expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Misconfigured, "{error}");

    let missing = dir.path().join("no/such/dir/cib.db");
    let error = SqliteStore::open(&missing, SqliteOptions::default()).expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Misconfigured, "{error}");

    let options = SqliteOptions { readers: 0, ..SqliteOptions::default() };
    let error = SqliteStore::open(dir.path().join("ok.db"), options).expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Misconfigured, "{error}");
}

#[tokio::test]
async fn a_version_1_database_is_migrated_in_place_keeping_its_data() {
    use cib_core::ports::Store;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    drop(open(&path, SqliteOptions::default()));
    // Take the file back to version 1, as an older cib left it, with a delivery in it.
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch(
        "DROP TABLE log_times;
         DROP TABLE snapshots;
         DROP TABLE specs;
         DROP TABLE enqueues;
         DROP TABLE secrets;
         DROP TABLE webhook_cursors;
         DROP TABLE web_sessions;
         DROP TABLE artifacts;
         DROP INDEX deliveries_pending;
         DROP TABLE delivery_digests;
         ALTER TABLE deliveries DROP COLUMN done;
         ALTER TABLE deliveries DROP COLUMN attempts;
         ALTER TABLE deliveries DROP COLUMN next_attempt_at;
         ALTER TABLE deliveries DROP COLUMN dead;
         ALTER TABLE deliveries DROP COLUMN reason;
         ALTER TABLE deliveries DROP COLUMN body_sha256;
         DELETE FROM schema_version WHERE version > 1;
         INSERT INTO deliveries (id, source, event, received_at, body) VALUES ('old', 'github', 'push', 5, x'7b7d');",
    )
    .expect("downgrade");
    // An enqueue journaled the old way, with its spec text inline, reads back as it was.
    let old_enqueue = cib_core::testing::enqueue_input("old-build", "pipelines: {}\n");
    let json = serde_json::to_string(&old_enqueue).expect("json");
    conn.execute("INSERT INTO inputs (seq, at, input) VALUES (1, 5, ?1)", [json]).expect("old input");
    drop(conn);

    let store = open(&path, SqliteOptions::default());
    let pending = store.pending_deliveries(10).await.expect("pending");
    assert_eq!(pending.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["old"], "the old delivery is pending");
    assert_eq!(pending[0].body, b"{}");
    store.mark_delivery_done("old").await.expect("done");
    assert!(store.pending_deliveries(10).await.expect("pending").is_empty());
    let inputs = store.inputs_after(0, 10).await.expect("inputs");
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].1.input, old_enqueue, "the old enqueue keeps its spec");
    let conn = rusqlite::Connection::open(&path).expect("open");
    let version: i64 = conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0)).expect("version");
    assert_eq!(version, SCHEMA_VERSION);
}
