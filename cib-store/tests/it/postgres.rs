//! The PostgreSQL store: the same suites as SQLite (cib-core's conformance suites and this
//! crate's own checks, called with a `PgStore`), each test on a database of its own on the
//! cluster `scripts/ensure-postgres` runs; then what only a shared server has: several stores
//! (as several cib processes would be) appending to one journal, one log and one inbox at once,
//! and `cib store copy` from SQLite.

use std::sync::Arc;

use cib_core::event::BuildId;
use cib_core::ports::{
    Delivery, ErrorKind, Intake, LogKey, SecretStore, SessionRecord, SessionStore, Store, StoreError, StoredInput,
};
use cib_core::testing::{store_conformance, store_log_limit_conformance, store_retention_conformance};
use cib_core::time::Timestamp;
use cib_store::testing::TestDatabase;
use cib_store::{PgOptions, PgStore, SCHEMA_VERSION, SqliteOptions};

async fn database() -> TestDatabase {
    TestDatabase::create().await.unwrap_or_else(|e| panic!("a test database: {e}"))
}

async fn connect(db: &TestDatabase, options: PgOptions) -> PgStore {
    PgStore::connect(&db.url, options).await.unwrap_or_else(|e| panic!("connect to {}: {e}", db.name()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_store_suite() {
    let db = database().await;
    store_conformance(Arc::new(connect(&db, PgOptions::default()).await)).await.expect("conformance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_store_suite_with_tiny_chunks() {
    let db = database().await;
    let options = PgOptions { log_chunk_size: 3, pool_size: 1, ..PgOptions::default() };
    store_conformance(Arc::new(connect(&db, options).await)).await.expect("conformance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_retention_suite() {
    let db = database().await;
    store_retention_conformance(Arc::new(connect(&db, PgOptions::default()).await)).await.expect("retention");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_log_limit_suite() {
    for chunk in [1, 4, 16, 64, 1 << 16] {
        let db = database().await;
        let options = PgOptions { log_limit: 100, log_chunk_size: chunk, ..PgOptions::default() };
        let store = connect(&db, options).await;
        store_log_limit_conformance(Arc::new(store)).await.unwrap_or_else(|e| panic!("chunks of {chunk}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_build_listings_and_records_match_the_reference_store() {
    let db = database().await;
    crate::reads::build_listings_match(&connect(&db, PgOptions::default()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_log_ranges_match_the_reference_store() {
    let db = database().await;
    let options = PgOptions {
        log_limit: crate::reads::LOG_LIMIT,
        log_chunk_size: crate::reads::LOG_CHUNK,
        ..PgOptions::default()
    };
    crate::reads::log_ranges_match(&connect(&db, options).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_twenty_concurrent_copies_through_four_stores_make_one_row_and_one_build() {
    let db = database().await;
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(connect(&db, PgOptions::default()).await));
    }
    let counter = connect(&db, PgOptions::default()).await;
    crate::deliveries::race_counting(stores, async move || {
        counter.deliveries(None, 100).await.expect("deliveries").len() as i64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_failed_write_among_concurrent_ones_is_undone_alone() {
    let db = database().await;
    crate::deliveries::failed_writes_are_undone_alone(Arc::new(connect(&db, PgOptions::default()).await)).await;
}

#[tokio::test]
async fn postgres_a_wrong_or_missing_key_is_a_clear_error() {
    let (db, dir) = (database().await, tempfile::tempdir().expect("temp dir"));
    let store = connect(&db, PgOptions::default()).await;
    crate::secrets::a_wrong_or_missing_key_is_a_clear_error_naming_the_key_file_on(&store, dir.path()).await;
}

#[tokio::test]
async fn postgres_rekey_keeps_every_value_readable() {
    let (db, dir) = (database().await, tempfile::tempdir().expect("temp dir"));
    let store = connect(&db, PgOptions::default()).await;
    crate::secrets::rekey_keeps_every_value_readable_and_the_old_key_then_fails_on(&store, dir.path()).await;
}

#[tokio::test]
async fn postgres_a_secret_list_never_shows_values() {
    let (db, dir) = (database().await, tempfile::tempdir().expect("temp dir"));
    let store = connect(&db, PgOptions::default()).await;
    crate::secrets::a_list_says_names_scopes_and_who_set_them_never_values_on(&store, dir.path()).await;
}

#[tokio::test]
async fn postgres_short_secret_values_and_bad_names_are_refused() {
    let (db, dir) = (database().await, tempfile::tempdir().expect("temp dir"));
    let store = connect(&db, PgOptions::default()).await;
    crate::secrets::short_values_and_bad_names_are_refused_on(&store, dir.path()).await;
}

#[tokio::test]
async fn postgres_sessions_are_kept_touched_ended_and_expired() {
    let db = database().await;
    let store = connect(&db, PgOptions::default()).await;
    crate::sessions::sessions_are_kept_touched_ended_and_expired_on(&store).await;
    drop(store);
    crate::sessions::sessions_survive_and_end_on(&connect(&db, PgOptions::default()).await).await;
}

#[tokio::test]
async fn postgres_artifacts_are_packed_found_unpacked_and_expired() {
    let db = database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    crate::artifacts::artifacts_round_trip(Arc::new(connect(&db, PgOptions::default()).await), dir.path()).await;
}

/// Four stores (four processes, as far as PostgreSQL can tell) append to the journal at once:
/// the numbers are 1..=n without a gap or a repeat, and each input is stored under its number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_four_stores_number_the_journal_without_gaps() {
    let db = database().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(connect(&db, PgOptions { pool_size: 4, ..PgOptions::default() }).await));
    }
    let mut tasks = Vec::new();
    for n in 0..200u64 {
        let store = stores[n as usize % 4].clone();
        tasks.push(tokio::spawn(async move {
            let input = StoredInput { at: Timestamp(n), input: cib_core::pipeline::Input::Tick };
            (store.append_input(&input).await.expect("append"), n)
        }));
    }
    let mut numbers = std::collections::BTreeMap::new();
    for task in tasks {
        let (seq, n) = task.await.expect("join");
        assert!(numbers.insert(seq, n).is_none(), "number {seq} given twice");
    }
    assert_eq!(numbers.keys().copied().collect::<Vec<_>>(), (1..=200).collect::<Vec<_>>());
    let stored = stores[0].inputs_after(0, 1000).await.expect("inputs");
    let at: Vec<(u64, u64)> = stored.iter().map(|(seq, i)| (*seq, i.at.0)).collect();
    assert_eq!(at, numbers.into_iter().collect::<Vec<_>>(), "each input is stored under the number it was given");
}

/// Two stores append to one log at once: every piece is there once, whole, and the length
/// counts every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_to_one_log_from_two_stores_lose_nothing() {
    let db = database().await;
    let options = PgOptions { log_chunk_size: 64, ..PgOptions::default() };
    let stores = [Arc::new(connect(&db, options.clone()).await), Arc::new(connect(&db, options).await)];
    let key = LogKey { build: BuildId::from("b"), step: "s".into(), attempt: 1 };
    let mut tasks = Vec::new();
    for n in 0..100u32 {
        let (store, key) = (stores[n as usize % 2].clone(), key.clone());
        tasks.push(tokio::spawn(async move { store.append_log(&key, format!("<{n:03}>").as_bytes()).await }));
    }
    for task in tasks {
        task.await.expect("join").expect("append");
    }
    stores[0].finish_log(&key).await.expect("finish");
    let whole = crate::read_whole(stores[1].as_ref(), &key, 1 << 20).await;
    assert_eq!(whole.len(), 500);
    let mut pieces: Vec<&[u8]> = whole.chunks(5).collect();
    pieces.sort();
    let want: Vec<Vec<u8>> = (0..100).map(|n| format!("<{n:03}>").into_bytes()).collect();
    assert_eq!(pieces, want.iter().map(Vec::as_slice).collect::<Vec<_>>());
}

fn delivery(id: &str, at: u64) -> Delivery {
    Delivery {
        id: id.into(),
        source: "github".into(),
        event: "push".into(),
        received_at: Timestamp(at),
        body: b"the same body".to_vec(),
    }
}

/// One body under twenty ids, sent at once through four stores: exactly one is new, the
/// others are replays, and the inbox holds one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_replayed_through_four_stores_at_once_is_new_once() {
    let db = database().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(connect(&db, PgOptions::default()).await));
    }
    let mut tasks = Vec::new();
    for n in 0..20u64 {
        let store = stores[n as usize % 4].clone();
        tasks.push(tokio::spawn(async move {
            store.insert_delivery_once(&delivery(&format!("d-{n}"), 1000 + n), b"digest", Timestamp(0), None).await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("join").expect("insert"));
    }
    assert_eq!(outcomes.iter().filter(|i| **i == Intake::New).count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|i| **i == Intake::DuplicateBody).count(), 19, "{outcomes:?}");
    assert_eq!(stores[0].deliveries(None, 100).await.expect("list").len(), 1);
    // The replay window still applies: a body older than `since` is no replay.
    let later = stores[1].insert_delivery_once(&delivery("d-late", 9_000), b"digest", Timestamp(5_000), None).await;
    assert_eq!(later.expect("insert"), Intake::New);
}

/// Migrations: a second store on the same database applies nothing and reads what the first
/// wrote; a database from a newer cib is refused, untouched; a bad URL and an unreachable
/// server are clear errors of the right kind.
#[tokio::test]
async fn the_schema_is_versioned_and_bad_targets_are_clear_errors() {
    let db = database().await;
    let first = connect(&db, PgOptions::default()).await;
    assert_eq!(first.schema_version().await.expect("version"), SCHEMA_VERSION);
    first
        .create_session(
            "d",
            &SessionRecord { token_name: "t".into(), created_at: Timestamp(1), last_seen: Timestamp(1) },
        )
        .await
        .expect("session");
    let second = connect(&db, PgOptions::default()).await;
    assert!(second.session("d").await.expect("read").is_some());

    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect");
    let connection = tokio::spawn(connection);
    client.batch_execute("INSERT INTO schema_version (version, applied_at) VALUES (999, 0)").await.expect("bump");
    let newer = PgStore::connect(&db.url, PgOptions::default()).await.expect_err("a newer schema is refused");
    assert_eq!(newer.kind(), ErrorKind::Misconfigured, "{newer}");
    assert!(newer.to_string().contains("schema version 999"), "{newer}");
    drop(client);
    let _ = connection.await;

    let bad = PgStore::connect("postgres://u@h:notaport/db", PgOptions::default()).await.expect_err("bad URL");
    assert!(matches!(bad, StoreError::Misconfigured(_)), "{bad}");
    let options = PgOptions { connect_timeout: std::time::Duration::from_secs(2), ..PgOptions::default() };
    // A port nothing listens on (the test cluster's, plus one).
    let nowhere = PgStore::connect("postgres://postgres:hunter2@127.0.0.1:1/postgres", options).await;
    let error = nowhere.expect_err("nothing listens there");
    assert_eq!(error.kind(), ErrorKind::Transient, "{error}");
    assert!(!error.to_string().contains("hunter2"), "the password is not shown: {error}");
}

/// `cib store copy`'s engine: a populated SQLite store (the conformance suite's writes, a
/// long log and a secret) copied into an empty database reads the same on PostgreSQL; a
/// second copy into it is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_store_copies_whole_and_a_non_empty_target_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let key = cib_store::generate_key("a test key");
    let long = LogKey { build: BuildId::from("b1"), step: "long".into(), attempt: 1 };
    {
        let sqlite = Arc::new(crate::open(&path, SqliteOptions { log_limit: 1000, ..SqliteOptions::default() }));
        store_conformance(sqlite.clone()).await.expect("conformance");
        sqlite.append_log(&long, &crate::log_bytes(0..5000)).await.expect("append");
        let secret = cib_core::ports::NewSecret {
            name: "TOKEN".into(),
            value: cib_core::ports::SecretValue::new("a-token-of-some-length"),
            scope: cib_core::policy::SecretScope::repo("acme/app"),
            by: "admin".into(),
            at: Timestamp(5),
        };
        sqlite.set_secret(&key, &secret).await.expect("secret");
    }
    let db = database().await;
    let report = cib_store::copy_sqlite_to_postgres(&path, &db.url).await.expect("copy");
    let rows = |table: &str| report.tables.iter().find(|t| t.table == table).map(|t| t.rows);
    assert_eq!(rows("secrets"), Some(1));
    assert!(rows("events").unwrap_or(0) > 10, "{report:?}");
    assert!(rows("log_chunks").unwrap_or(0) > 0, "{report:?}");

    let sqlite = crate::open(&path, SqliteOptions::default());
    let pg = connect(&db, PgOptions::default()).await;
    assert_eq!(pg.events_after(0, 1000).await.expect("events"), sqlite.events_after(0, 1000).await.expect("events"));
    assert_eq!(pg.latest_snapshot().await.expect("snapshot"), sqlite.latest_snapshot().await.expect("snapshot"));
    assert_eq!(pg.inputs_after(0, 1000).await.expect("inputs"), sqlite.inputs_after(0, 1000).await.expect("inputs"));
    for id in ["b1", "b2"] {
        let id = BuildId::from(id);
        assert_eq!(pg.build(&id).await.expect("build"), sqlite.build(&id).await.expect("build"));
    }
    assert_eq!(crate::read_whole(&pg, &long, 333).await, crate::read_whole(&sqlite, &long, 333).await);
    assert_eq!(crate::read_whole(&pg, &long, 1 << 20).await, crate::expected_log(1000, 5000, crate::log_bytes));
    assert_eq!(pg.deliveries(None, 100).await.expect("inbox"), sqlite.deliveries(None, 100).await.expect("inbox"));
    let opened = pg.open_secrets(&key, "acme/app").await.expect("the secret opens with the same key");
    assert_eq!(opened[0].value.expose(), "a-token-of-some-length");
    // The numbering goes on after the copied journal.
    let next = pg
        .append_input(&StoredInput { at: Timestamp(99), input: cib_core::pipeline::Input::Tick })
        .await
        .expect("append");
    assert_eq!(
        next,
        sqlite
            .append_input(&StoredInput { at: Timestamp(99), input: cib_core::pipeline::Input::Tick })
            .await
            .expect("append")
    );

    let again = cib_store::copy_sqlite_to_postgres(&path, &db.url).await.expect_err("the target is not empty");
    assert_eq!(again.kind(), ErrorKind::Misconfigured);
    assert!(again.to_string().contains("not empty"), "{again}");
    assert_eq!(pg.events_after(0, 1000).await.expect("events").len(), rows("events").unwrap_or(0) as usize);

    let missing = cib_store::copy_sqlite_to_postgres(&dir.path().join("nope.db"), &db.url).await;
    assert_eq!(missing.expect_err("no such file").kind(), ErrorKind::Misconfigured);
}

/// operations.md's Unix socket form of the URL: the socket's directory, percent-encoded, as
/// the host. The test cluster's socket is in its directory (`CIB_PG_DIR`, as for the script).
#[tokio::test]
async fn a_unix_socket_url_reaches_the_database() {
    let db = database().await;
    let dir = std::env::var("CIB_PG_DIR").unwrap_or_else(|_| "/tmp/cib-test-postgres".into());
    let port = db.url.rsplit_once(':').and_then(|(_, rest)| rest.split('/').next()).expect("a port in the URL");
    let url = format!("postgres://postgres@{}:{port}/{}", dir.replace('/', "%2F"), db.name());
    let store = PgStore::connect(&url, PgOptions::default()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(store.schema_version().await.expect("version"), SCHEMA_VERSION);
}

fn tick(n: u64) -> StoredInput {
    StoredInput { at: Timestamp(n), input: cib_core::pipeline::Input::Tick }
}

/// Leadership (issue 22): one of two servers takes the lease and only it may append; the
/// other takes over once the lease has run out, under a new epoch; the first then finds its
/// lease lost, and every write of its engine is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_holds_the_lease_and_a_standby_takes_over_under_a_new_epoch() {
    use cib_store::Tenure;
    let db = database().await;
    let (a, b) = (connect(&db, PgOptions::default()).await, connect(&db, PgOptions::default()).await);
    let lease = std::time::Duration::from_millis(600);
    let la = a.leadership("a", "http://a", lease).await.expect("leadership a");
    let lb = b.leadership("b", "http://b", lease).await.expect("leadership b");
    // Before any round neither may write the engine's state.
    assert!(cib_store::is_fenced(&a.append_input(&tick(1)).await.expect_err("not yet the leader")));
    assert_eq!(la.round().await.expect("round"), Tenure::Active { epoch: 1 });
    let Tenure::Standby { active: Some(active) } = lb.round().await.expect("round") else { panic!("b is a standby") };
    assert_eq!((active.holder.as_str(), active.address.as_str(), active.epoch), ("a", "http://a", 1));
    assert_eq!(a.append_input(&tick(1)).await.expect("the leader appends"), 1);
    let refused = b.append_input(&tick(2)).await.expect_err("the standby is refused");
    assert!(cib_store::is_fenced(&refused), "{refused}");
    // Webhook intake is not fenced: every server takes deliveries.
    assert_eq!(
        b.insert_delivery_once(&delivery("d", 5), b"digest", Timestamp(0), None).await.expect("intake"),
        Intake::New
    );
    // Renewals keep it: a round within the lease is still epoch 1.
    assert_eq!(la.round().await.expect("renew"), Tenure::Active { epoch: 1 });
    assert_eq!(lb.round().await.expect("round"), Tenure::Standby { active: Some(active.clone()) });
    // `a` stops renewing (paused): once the lease has run out, `b` takes it under epoch 2.
    tokio::time::sleep(lease + std::time::Duration::from_millis(100)).await;
    assert!(la.expired(), "the old leader knows by its own clock");
    assert!(cib_store::is_fenced(
        &a.append_log(&LogKey { build: BuildId::from("x"), step: "s".into(), attempt: 1 }, b"late")
            .await
            .expect_err("fenced")
    ));
    assert_eq!(lb.round().await.expect("takeover"), Tenure::Active { epoch: 2 });
    assert_eq!(b.append_input(&tick(3)).await.expect("the new leader appends"), 2);
    let Tenure::Lost { active: Some(now) } = la.round().await.expect("round") else { panic!("a has lost the lease") };
    assert_eq!((now.holder.as_str(), now.epoch), ("b", 2));
    assert!(cib_store::is_fenced(&a.append_input(&tick(4)).await.expect_err("stale")));
    // A clean stop gives the lease up at once.
    lb.release().await.expect("release");
    assert_eq!(la.round().await.expect("round"), Tenure::Active { epoch: 3 });
    assert_eq!(b.inputs_after(0, 10).await.expect("inputs").len(), 2, "only the leaders' appends are stored");
}

/// The database refuses a stale epoch even when the old leader's own clock says its lease
/// still runs (a clock that ran slow, say): the row's epoch, read in the write's own
/// transaction, decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_a_write_under_a_stale_epoch() {
    use cib_store::Tenure;
    let db = database().await;
    let (a, b) = (connect(&db, PgOptions::default()).await, connect(&db, PgOptions::default()).await);
    let lease = std::time::Duration::from_secs(30);
    let la = a.leadership("a", "http://a", lease).await.expect("leadership a");
    let lb = b.leadership("b", "http://b", lease).await.expect("leadership b");
    assert_eq!(la.round().await.expect("round"), Tenure::Active { epoch: 1 });
    // The database's clock passes the lease while `a`'s does not.
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client.execute("UPDATE leadership SET deadline = '-infinity'", &[]).await.expect("expire");
    assert_eq!(lb.round().await.expect("takeover"), Tenure::Active { epoch: 2 });
    assert_eq!(la.epoch(), Some(1), "a still believes it leads");
    for refused in [
        a.append_input(&tick(1)).await.expect_err("journal"),
        a.save_snapshot(0, b"{}").await.expect_err("snapshot"),
        a.append_log(&LogKey { build: BuildId::from("x"), step: "s".into(), attempt: 1 }, b"late")
            .await
            .expect_err("log"),
    ] {
        assert!(matches!(&refused, StoreError::Permanent(m) if m.contains("epoch 1 is stale")), "{refused}");
    }
    assert_eq!(b.append_input(&tick(2)).await.expect("the new leader appends"), 1);
}
