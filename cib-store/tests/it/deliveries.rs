//! The inbox: concurrent copies of one delivery, through one store and through several
//! connections to the same file, give exactly one row and one build.

use std::sync::Arc;

use cib_core::event::{BuildId, Event, EventBody};
use cib_core::ports::{BuildFilter, Delivery, Page, Store};
use cib_core::time::Timestamp;
use cib_store::SqliteOptions;

use crate::open;

fn copy(n: u64) -> Delivery {
    Delivery {
        id: "gh-7f3a".into(),
        source: "github".into(),
        event: "push".into(),
        received_at: Timestamp(n),
        body: format!("copy {n}").into_bytes(),
    }
}

/// What a webhook receiver does: store the delivery, and queue a build only for a new one.
async fn receive(store: Arc<dyn Store>, n: u64) -> bool {
    let new = store.insert_delivery(&copy(n)).await.expect("insert delivery");
    if new {
        let build = BuildId(format!("build-from-copy-{n}"));
        let body = EventBody::BuildQueued {
            build,
            pipeline: "test".into(),
            repo: "acme/app".into(),
            commit: "c1".into(),
            branch: Some("main".into()),
        };
        store.append_events(&[Event { seq: 1000 + n, at: Timestamp(n), body }]).await.expect("append event");
    }
    new
}

async fn race(stores: Vec<Arc<dyn Store>>, path: &std::path::Path) {
    let path = path.to_path_buf();
    race_counting(stores, async move || {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0)).expect("count")
    })
    .await;
}

/// Twenty copies of one delivery sent at once through `stores` (one store, or several on the
/// same database, as several processes would be); `rows` counts the deliveries' rows.
pub(crate) async fn race_counting(stores: Vec<Arc<dyn Store>>, rows: impl AsyncFnOnce() -> i64) {
    let tasks: Vec<_> =
        (0..20u64).map(|n| tokio::spawn(receive(stores[n as usize % stores.len()].clone(), n))).collect();
    let mut new = 0;
    for task in tasks {
        new += usize::from(task.await.expect("join"));
    }
    assert_eq!(new, 1, "exactly one copy is new");
    let builds = stores[0].builds(&BuildFilter::default(), Page::first(100)).await.expect("builds");
    assert_eq!(builds.len(), 1, "exactly one build: {builds:?}");
    assert_eq!(rows().await, 1, "exactly one row");
    let kept = stores[0].delivery("gh-7f3a").await.expect("read").expect("stored");
    let winner = builds[0].id.0.trim_start_matches("build-from-copy-").parse::<u64>().expect("number");
    assert_eq!(kept, copy(winner), "the copy stored is the one that queued the build");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_copies_through_one_store_make_one_row_and_one_build() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let store: Arc<dyn Store> = Arc::new(open(&path, SqliteOptions::default()));
    race(vec![store], &path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_copies_through_four_connections_make_one_row_and_one_build() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    // Four stores on one file compete for SQLite's write lock, as four processes would.
    let stores: Vec<Arc<dyn Store>> =
        (0..4).map(|_| Arc::new(open(&path, SqliteOptions::default())) as Arc<dyn Store>).collect();
    race(stores, &path).await;
}

fn signed(id: &str, at: u64, body: &[u8]) -> Delivery {
    Delivery {
        id: id.into(),
        source: "github".into(),
        event: "push".into(),
        received_at: Timestamp(at),
        body: body.to_vec(),
    }
}

/// The writer keeps the digests of recent bodies in memory; they are loaded again when the
/// store opens, so a body replayed after a restart is still found.
#[tokio::test]
async fn a_replayed_body_is_found_after_the_store_is_reopened() {
    use cib_core::ports::Intake;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let store = open(&path, SqliteOptions::default());
    let first = store.insert_delivery_once(&signed("d-1", 5_000, b"body"), b"digest", Timestamp(1_000), None).await;
    assert_eq!(first.expect("insert"), Intake::New);
    drop(store);
    let store = open(&path, SqliteOptions::default());
    let replay = store.insert_delivery_once(&signed("d-2", 6_000, b"body"), b"digest", Timestamp(1_000), None).await;
    assert_eq!(replay.expect("insert"), Intake::DuplicateBody, "the digest was loaded when the store opened");
    let later = store.insert_delivery_once(&signed("d-3", 9_000, b"body"), b"digest", Timestamp(5_001), None).await;
    assert_eq!(later.expect("insert"), Intake::New, "a body older than the window is no replay");
    // Within one group commit, the second of two copies of a body is the replay.
    let (d4, d5) = (signed("d-4", 9_100, b"twin"), signed("d-5", 9_100, b"twin"));
    let (a, b) = tokio::join!(
        store.insert_delivery_once(&d4, b"twin", Timestamp(1_000), None),
        store.insert_delivery_once(&d5, b"twin", Timestamp(1_000), None),
    );
    let mut outcomes = [a.expect("insert"), b.expect("insert")];
    outcomes.sort_by_key(|i| format!("{i:?}"));
    assert_eq!(outcomes, [Intake::DuplicateBody, Intake::New]);
}

/// Digests older than the window callers ask about are deleted, from memory and from the
/// table, once enough new ones have been recorded; the recent ones stay.
#[tokio::test]
async fn old_digests_are_forgotten_and_recent_ones_kept() {
    use cib_core::ports::Intake;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    // Commits need not reach the disk in this test, which makes ten thousand of them quick.
    let options = SqliteOptions { synchronous: cib_store::Synchronous::Normal, ..SqliteOptions::default() };
    let store = Arc::new(open(&path, options.clone()));
    let old = store.insert_delivery_once(&signed("old", 1, b"old"), b"old", Timestamp(0), None).await;
    assert_eq!(old.expect("insert"), Intake::New);
    // Ten thousand deliveries, 100 at a time, each asking about the last 1,000 ms.
    for wave in 0..100u64 {
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let store = store.clone();
            let n = wave * 100 + i;
            tasks.push(tokio::spawn(async move {
                let at = 10_000 + n;
                let digest = format!("d{n}");
                store
                    .insert_delivery_once(
                        &signed(&format!("n-{n}"), at, b"x"),
                        digest.as_bytes(),
                        Timestamp(at - 1_000),
                        None,
                    )
                    .await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.expect("task").expect("insert"), Intake::New);
        }
    }
    // One more write lets the writer prune after the batch that crossed the threshold.
    let last = store.insert_delivery_once(&signed("last", 20_000, b"l"), b"last", Timestamp(19_000), None).await;
    assert_eq!(last.expect("insert"), Intake::New);
    drop(store);
    let conn = rusqlite::Connection::open(&path).expect("open");
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).expect("count");
    assert_eq!(
        count("SELECT COUNT(*) FROM delivery_digests WHERE digest = CAST('old' AS BLOB)"),
        0,
        "the old digest is gone"
    );
    let kept = count("SELECT COUNT(*) FROM delivery_digests");
    assert!((1..10_002).contains(&kept), "recent digests are kept and old ones deleted: {kept} rows");
    assert_eq!(count("SELECT COUNT(*) FROM deliveries"), 10_002, "the deliveries themselves stay");
}

/// The writer tries a whole batch under one savepoint and falls back to one savepoint per
/// write when one of them fails. Writes sent together (so that they share batches) mix new
/// deliveries, a replayed body, appends to an open log and an append to a finished log, which
/// fails: every caller must hear its own answer, and only the failed write may be missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_in_a_shared_commit_is_undone_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(open(&dir.path().join("cib.db"), SqliteOptions::default()));
    failed_writes_are_undone_alone(store).await;
}

/// Concurrent writes of every kind, one of which fails each round, through a store of any kind.
pub(crate) async fn failed_writes_are_undone_alone(store: Arc<dyn Store>) {
    use cib_core::ports::{Intake, LogKey};
    let open_log = LogKey { build: BuildId::from("b"), step: "open".into(), attempt: 1 };
    let closed_log = LogKey { build: BuildId::from("b"), step: "closed".into(), attempt: 1 };
    store.append_log(&closed_log, b"done\n").await.expect("append");
    store.finish_log(&closed_log).await.expect("finish");
    let mut expected_log = Vec::new();
    for round in 0..40u64 {
        let mut tasks = Vec::new();
        for n in 0..8u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let delivery = Delivery {
                    id: format!("d-{round}-{n}"),
                    source: "github".into(),
                    event: "push".into(),
                    received_at: Timestamp(round),
                    // Deliveries 0 and 1 of each round carry the same body: one is a replay.
                    body: format!("body {round} {}", n.max(1)).into_bytes(),
                };
                let digest = format!("digest {round} {}", n.max(1)).into_bytes();
                store.insert_delivery_once(&delivery, &digest, Timestamp(0), None).await
            }));
        }
        let failing = {
            let store = store.clone();
            let key = closed_log.clone();
            tokio::spawn(async move { store.append_log(&key, b"late\n").await })
        };
        let line = format!("line {round}\n").into_bytes();
        let appending = {
            let store = store.clone();
            let key = open_log.clone();
            let line = line.clone();
            tokio::spawn(async move { store.append_log(&key, &line).await })
        };
        let mut intakes = Vec::new();
        for task in tasks {
            intakes.push(task.await.expect("join").expect("a delivery is stored"));
        }
        let new = intakes.iter().filter(|i| **i == Intake::New).count();
        let replays = intakes.iter().filter(|i| **i == Intake::DuplicateBody).count();
        assert_eq!((new, replays), (7, 1), "round {round}: {intakes:?}");
        let refused = failing.await.expect("join");
        assert!(refused.is_err(), "round {round}: a finished log grew: {refused:?}");
        expected_log.extend_from_slice(&line);
        let length = appending.await.expect("join").expect("an open log grows");
        assert_eq!(length, expected_log.len() as u64, "round {round}");
        for n in 2..8 {
            let id = format!("d-{round}-{n}");
            assert!(store.delivery(&id).await.expect("read").is_some(), "round {round}: {id} was lost");
        }
    }
    let read = store.read_log(&open_log, 0, 1 << 20).await.expect("read");
    assert_eq!(read.data, expected_log, "the open log holds every line once, in order");
    let closed = store.read_log(&closed_log, 0, 1 << 20).await.expect("read");
    assert_eq!(closed.data, b"done\n", "the finished log is as it was");
}
