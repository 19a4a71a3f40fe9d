//! The PostgreSQL schema and its versioned migrations.
//!
//! The two stores share version numbers: a PostgreSQL database at version N has the tables
//! a SQLite file at version N has, so that `cib store copy` can move one to the other table by
//! table. PostgreSQL arrived when SQLite was at version 10, so its first migration makes
//! version 10 whole; every later version is a migration of both stores.
//!
//! What differs from SQLite's tables, and why:
//! - every integer column is `BIGINT` (flags included), because tokio-postgres binds a Rust
//!   `i64` only to `BIGINT`, and one type everywhere keeps the copy a plain transfer;
//! - blobs are `BYTEA`;
//! - text columns compare with the "C" collation, byte by byte, as SQLite and Rust's `String`
//!   do, so that page cursors (`id < $1`) and orderings agree whatever the database's locale;
//! - the inbox's pending index is partial (only undone rows), and the delivery digests are
//!   indexed by digest: several servers may insert at once, so the digest check is a lookup
//!   under a lock rather than the SQLite writer's memory (see `insert_delivery_once`).
//!
//! Each migration runs in one transaction with the row that records it, under an advisory
//! lock, so that servers starting together apply it once.

use cib_core::ports::StoreError;
use tokio_postgres::Client;

use super::db;
use crate::SCHEMA_VERSION;

/// Version 10, whole: the tables of SQLite's versions 1 to 10 (see `crate::schema`).
const V10: &str = r#"
CREATE TABLE inputs (
    seq BIGINT NOT NULL PRIMARY KEY,
    at BIGINT NOT NULL,
    input TEXT NOT NULL
);
CREATE TABLE events (
    seq BIGINT NOT NULL PRIMARY KEY,
    at BIGINT NOT NULL,
    build TEXT COLLATE "C",
    body TEXT NOT NULL
);
CREATE INDEX events_by_build ON events (build, seq);
CREATE TABLE deliveries (
    id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    source TEXT NOT NULL,
    event TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    body BYTEA NOT NULL,
    done BIGINT NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    dead BIGINT NOT NULL DEFAULT 0,
    reason TEXT,
    body_sha256 BYTEA
);
CREATE INDEX deliveries_pending ON deliveries (received_at, id) WHERE done = 0;
CREATE INDEX deliveries_by_time ON deliveries (received_at, id);
CREATE TABLE delivery_digests (
    digest BYTEA NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX delivery_digests_by_digest ON delivery_digests (digest, received_at);
CREATE INDEX delivery_digests_by_time ON delivery_digests (received_at);
CREATE TABLE builds (
    id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    repo TEXT COLLATE "C" NOT NULL,
    branch TEXT COLLATE "C",
    commit_sha TEXT COLLATE "C" NOT NULL,
    pipeline TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    queued_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX builds_by_time ON builds (queued_at, id);
CREATE INDEX builds_by_repo ON builds (repo, branch, queued_at, id);
CREATE INDEX builds_by_status ON builds (status, queued_at, id);
CREATE TABLE build_steps (
    build TEXT COLLATE "C" NOT NULL,
    step TEXT COLLATE "C" NOT NULL,
    attempt BIGINT NOT NULL,
    ord BIGINT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT,
    started_at BIGINT,
    finished_at BIGINT,
    PRIMARY KEY (build, step, attempt)
);
CREATE TABLE logs (
    build TEXT COLLATE "C" NOT NULL,
    step TEXT COLLATE "C" NOT NULL,
    attempt BIGINT NOT NULL,
    length BIGINT NOT NULL,
    head_limit BIGINT NOT NULL,
    tail_limit BIGINT NOT NULL,
    raw_from BIGINT,
    raw_bytes BIGINT NOT NULL,
    finished BIGINT NOT NULL,
    PRIMARY KEY (build, step, attempt)
);
CREATE TABLE log_chunks (
    build TEXT COLLATE "C" NOT NULL,
    step TEXT COLLATE "C" NOT NULL,
    attempt BIGINT NOT NULL,
    start_offset BIGINT NOT NULL,
    end_offset BIGINT NOT NULL,
    codec BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (build, step, attempt, start_offset)
);
CREATE TABLE log_times (
    build TEXT COLLATE "C" NOT NULL,
    step TEXT COLLATE "C" NOT NULL,
    attempt BIGINT NOT NULL,
    start_offset BIGINT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (build, step, attempt, start_offset)
);
CREATE TABLE secrets (
    repo TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    scope TEXT NOT NULL,
    nonce BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    set_at BIGINT NOT NULL,
    set_by TEXT NOT NULL,
    PRIMARY KEY (repo, name)
);
CREATE TABLE webhook_cursors (
    receiver TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    seq BIGINT NOT NULL
);
CREATE TABLE snapshots (
    seq BIGINT NOT NULL PRIMARY KEY,
    at BIGINT NOT NULL,
    data BYTEA NOT NULL
);
CREATE TABLE specs (
    sha256 TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    text TEXT NOT NULL
);
CREATE TABLE enqueues (
    build TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    at BIGINT NOT NULL,
    input TEXT NOT NULL
);
CREATE TABLE web_sessions (
    digest TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    token_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE INDEX web_sessions_last_seen ON web_sessions (last_seen);
CREATE TABLE artifacts (
    build TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    repo TEXT COLLATE "C" NOT NULL,
    commit_sha TEXT COLLATE "C" NOT NULL,
    pipeline TEXT COLLATE "C" NOT NULL,
    trusted BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    files BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (build, name)
);
CREATE INDEX artifacts_source ON artifacts (repo, commit_sha, pipeline, name, created_at);
CREATE INDEX artifacts_expiry ON artifacts (expires_at);
"#;

/// Every migration, in order. A migration, once released, is never edited.
const MIGRATIONS: &[(i64, &str)] = &[(10, V10)];

/// The advisory lock the migrations take (any number the store's other locks do not use).
const MIGRATION_LOCK: i64 = 0x6369_6200_0001;

/// Brings the database to [`SCHEMA_VERSION`]; a database from a newer cib is refused.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await
    .map_err(db)?;
    let current = current_version(&tx).await?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Misconfigured(format!(
            "the database has schema version {current}, newer than this cib's {SCHEMA_VERSION}; upgrade cib"
        )));
    }
    for &(version, sql) in MIGRATIONS {
        if current >= version {
            continue;
        }
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT)",
            &[&version],
        )
        .await
        .map_err(db)?;
        tracing::info!(version, "migrated the PostgreSQL store's schema");
    }
    tx.commit().await.map_err(db)
}

/// The schema version of a database, 0 when it has none.
pub(super) async fn current_version(client: &impl tokio_postgres::GenericClient) -> Result<i64, StoreError> {
    let row = client.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).await.map_err(db)?;
    Ok(row.get(0))
}
