//! The web pages' sessions: stored by digest, read back, touched, removed, expired, and kept
//! across a reopen of the file.

use cib_core::ports::{SessionRecord, SessionStore};
use cib_core::time::Timestamp;
use cib_store::SqliteOptions;

use crate::open;

#[tokio::test]
async fn sessions_are_kept_touched_ended_and_expired() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let store = open(&path, SqliteOptions::default());
    sessions_are_kept_touched_ended_and_expired_on(&store).await;
    drop(store);
    let store = open(&path, SqliteOptions::default());
    sessions_survive_and_end_on(&store).await;
}

/// Sessions made, read, touched and expired, on a store of any kind.
pub(crate) async fn sessions_are_kept_touched_ended_and_expired_on(store: &dyn SessionStore) {
    let record = |name: &str, at: u64| SessionRecord {
        token_name: name.into(),
        created_at: Timestamp(at),
        last_seen: Timestamp(at),
    };
    store.create_session("d1", &record("alice", 1_000)).await.expect("create");
    store.create_session("d2", &record("bob", 5_000)).await.expect("create");
    assert_eq!(store.session("d1").await.expect("read"), Some(record("alice", 1_000)));
    assert_eq!(store.session("nope").await.expect("read"), None);
    // A second session under the same digest is refused rather than replacing the first.
    assert!(store.create_session("d1", &record("mallory", 2_000)).await.is_err());

    store.touch_session("d1", Timestamp(9_000)).await.expect("touch");
    let touched = store.session("d1").await.expect("read").expect("there");
    assert_eq!((touched.created_at, touched.last_seen), (Timestamp(1_000), Timestamp(9_000)));

    // Expiry removes exactly those last used before the time.
    assert_eq!(store.expire_sessions(Timestamp(6_000)).await.expect("expire"), 1);
    assert_eq!(store.session("d2").await.expect("read"), None);
    assert!(store.session("d1").await.expect("read").is_some());
}

/// After [`sessions_are_kept_touched_ended_and_expired_on`] and a restart: "d1" is there and
/// is removed.
pub(crate) async fn sessions_survive_and_end_on(store: &dyn SessionStore) {
    assert!(store.session("d1").await.expect("read").is_some(), "sessions survive a restart");
    store.remove_session("d1").await.expect("remove");
    store.remove_session("d1").await.expect("removing one that is gone is no error");
    assert_eq!(store.session("d1").await.expect("read"), None);
}
