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
    let tasks: Vec<_> =
        (0..20u64).map(|n| tokio::spawn(receive(stores[n as usize % stores.len()].clone(), n))).collect();
    let mut new = 0;
    for task in tasks {
        new += usize::from(task.await.expect("join"));
    }
    assert_eq!(new, 1, "exactly one copy is new");
    let builds = stores[0].builds(&BuildFilter::default(), Page::first(100)).await.expect("builds");
    assert_eq!(builds.len(), 1, "exactly one build: {builds:?}");
    let conn = rusqlite::Connection::open(path).expect("open");
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0)).expect("count");
    assert_eq!(rows, 1, "exactly one row");
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
