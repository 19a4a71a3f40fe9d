//! The schema and its versioned migrations.
//!
//! Each migration runs in its own transaction together with the row that records it in
//! `schema_version`, so a crash leaves the schema at one version or the next, never between.
//! The SQL sticks to what SQLite and PostgreSQL share (plain tables, `BIGINT`, `TEXT`, composite
//! primary keys, no `AUTOINCREMENT` or `WITHOUT ROWID`), so that a PostgreSQL store can keep
//! the same tables, with `BYTEA` for `BLOB`.

use cib_core::ports::StoreError;
use rusqlite::{Connection, TransactionBehavior};

use crate::error::db;

/// Version 1: the journal, events, deliveries, build records and logs.
///
/// - `inputs`: the engine's journal, numbered from 1 without gaps.
/// - `events`: numbered by the engine; `build` lets the API read one build's events.
/// - `deliveries`: webhook deliveries, one row per delivery id.
/// - `builds` and `build_steps`: what the events say about builds, kept for the API. `ord` is
///   the sequence number of the event that first recorded a step, which orders the steps.
/// - `logs`: one row per step attempt: its length (every byte printed), the head and tail it
///   keeps once past the limit, whether it is finished, and its raw suffix (`raw_from`,
///   `raw_bytes`: output not yet compressed, see `logs.rs`).
/// - `log_chunks`: the kept bytes `start_offset..end_offset` of a log, compressed (`codec` 1,
///   zlib) or not yet (`codec` 0).
const V1: &str = "
CREATE TABLE inputs (
    seq BIGINT NOT NULL PRIMARY KEY,
    at BIGINT NOT NULL,
    input TEXT NOT NULL
);
CREATE TABLE events (
    seq BIGINT NOT NULL PRIMARY KEY,
    at BIGINT NOT NULL,
    build TEXT,
    body TEXT NOT NULL
);
CREATE INDEX events_by_build ON events (build, seq);
CREATE TABLE deliveries (
    id TEXT NOT NULL PRIMARY KEY,
    source TEXT NOT NULL,
    event TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE builds (
    id TEXT NOT NULL PRIMARY KEY,
    repo TEXT NOT NULL,
    branch TEXT,
    commit_sha TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    status TEXT NOT NULL,
    queued_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX builds_by_time ON builds (queued_at, id);
CREATE INDEX builds_by_repo ON builds (repo, branch, queued_at, id);
CREATE INDEX builds_by_status ON builds (status, queued_at, id);
CREATE TABLE build_steps (
    build TEXT NOT NULL,
    step TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    ord BIGINT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT,
    started_at BIGINT,
    finished_at BIGINT,
    PRIMARY KEY (build, step, attempt)
);
CREATE TABLE logs (
    build TEXT NOT NULL,
    step TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    length BIGINT NOT NULL,
    head_limit BIGINT NOT NULL,
    tail_limit BIGINT NOT NULL,
    raw_from BIGINT,
    raw_bytes BIGINT NOT NULL,
    finished SMALLINT NOT NULL,
    PRIMARY KEY (build, step, attempt)
);
CREATE TABLE log_chunks (
    build TEXT NOT NULL,
    step TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    start_offset BIGINT NOT NULL,
    end_offset BIGINT NOT NULL,
    codec SMALLINT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (build, step, attempt, start_offset)
);
";

/// Version 2: the inbox remembers which deliveries were processed (`done`), so that those a
/// crash interrupted are found again, oldest first.
const V2: &str = "
ALTER TABLE deliveries ADD COLUMN done SMALLINT NOT NULL DEFAULT 0;
CREATE INDEX deliveries_pending ON deliveries (done, received_at, id);
";

/// Every migration, in order. A migration, once released, is never edited: a change is a new
/// migration.
/// Version 3: when each piece of a log arrived, marked at most once a second of output.
const V3: &str = "
CREATE TABLE log_times (
    build TEXT NOT NULL,
    step TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    start_offset BIGINT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (build, step, attempt, start_offset)
);
";

/// Version 4: secrets, sealed. `scope` is the scope's JSON (branches, pipelines, environments;
/// the repository is its own column), `nonce` and `ciphertext` the sealed value (see
/// `secrets.rs`); the key that opens them is never stored.
const V4: &str = "
CREATE TABLE secrets (
    repo TEXT NOT NULL,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    set_at BIGINT NOT NULL,
    set_by TEXT NOT NULL,
    PRIMARY KEY (repo, name)
);
";

/// Version 5: the inbox retries with backoff and sets aside what keeps failing (`dead`), with
/// its attempts and the reason; a body's digest finds a replay of it under a new delivery id.
const V5: &str = "
ALTER TABLE deliveries ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN next_attempt_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN dead SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN reason TEXT;
ALTER TABLE deliveries ADD COLUMN body_sha256 BLOB;
CREATE INDEX deliveries_digest ON deliveries (body_sha256, received_at);
";

/// Version 6: where each outgoing webhook receiver is in the event journal: the sequence number
/// of the last event it acknowledged, so that delivery resumes there after a restart.
const V6: &str = "
CREATE TABLE webhook_cursors (
    receiver TEXT NOT NULL PRIMARY KEY,
    seq BIGINT NOT NULL
);
";

/// Version 7: bounded state. The engine's snapshots (zlib-compressed JSON, the newest one kept),
/// after which the inputs they cover are deleted; spec texts stored once by their SHA-256, which
/// journaled enqueues refer to; and the enqueue of every build, kept as long as its record so
/// that a finished build can be retried after its journal entry is gone.
const V7: &str = "
CREATE TABLE snapshots (
    seq BIGINT NOT NULL PRIMARY KEY,
    at BIGINT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE specs (
    sha256 TEXT NOT NULL PRIMARY KEY,
    text TEXT NOT NULL
);
CREATE TABLE enqueues (
    build TEXT NOT NULL PRIMARY KEY,
    at BIGINT NOT NULL,
    input TEXT NOT NULL
);
";

/// Version 8: the digests of delivery bodies move to a table of their own, with no index, so
/// that its rows are appended in arrival order and read once when the store opens (the writer
/// keeps them in memory), instead of an index keyed by the digest, which dirtied a random page
/// in every webhook's commit. The `body_sha256` column stays, as a record of each delivery.
const V8: &str = "
CREATE TABLE delivery_digests (
    digest BLOB NOT NULL,
    received_at BIGINT NOT NULL
);
INSERT INTO delivery_digests (digest, received_at)
    SELECT body_sha256, received_at FROM deliveries WHERE body_sha256 IS NOT NULL ORDER BY received_at;
DROP INDEX deliveries_digest;
";

/// Version 9: the web pages' sessions, keyed by the SHA-256 of their random id (the id itself is
/// only ever in the person's cookie), with the token they signed in with and when they were last
/// used, for the idle expiry.
const V9: &str = "
CREATE TABLE web_sessions (
    digest TEXT NOT NULL PRIMARY KEY,
    token_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE INDEX web_sessions_last_seen ON web_sessions (last_seen);
";

/// Version 10: the index of kept artifacts (issue 19). The archives are files beside the
/// database; a row names one by its build and step, and is found again by the commit, pipeline
/// and step that made it, newest first.
const V10: &str = "
CREATE TABLE artifacts (
    build TEXT NOT NULL,
    name TEXT NOT NULL,
    repo TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    pipeline TEXT NOT NULL,
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
";

const MIGRATIONS: &[(i64, &str)] =
    &[(1, V1), (2, V2), (3, V3), (4, V4), (5, V5), (6, V6), (7, V7), (8, V8), (9, V9), (10, V10)];

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 10;

/// Brings the database to [`SCHEMA_VERSION`]. Several processes may open the same file at
/// once: each migration reads the version inside its own write transaction, so exactly one of
/// them applies it. A database from a newer version of cib is refused rather than damaged.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .map_err(db)?;
    let current = version(conn)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Misconfigured(format!(
            "the database has schema version {current}, newer than this cib's {SCHEMA_VERSION}; upgrade cib"
        )));
    }
    for &(version, sql) in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        let current: i64 =
            tx.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0)).map_err(db)?;
        if current >= version {
            continue;
        }
        tx.execute_batch(sql).map_err(db)?;
        tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)", (version, now_millis()))
            .map_err(db)?;
        tx.commit().map_err(db)?;
        tracing::info!(version, "migrated the store's schema");
    }
    Ok(())
}

/// The schema version of an open database, 0 when it has none.
pub(crate) fn version(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0)).map_err(db)
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
