//! [`PgStore`]: the [`Store`] port (with secrets, sessions and the artifact index) on
//! PostgreSQL, through a small pool of tokio-postgres connections (deadpool-postgres).
//!
//! It keeps SQLite's tables and promises (see the crate's documentation); what differs comes
//! from PostgreSQL being a server that several connections, and several cib processes, write
//! at once, where SQLite has one writer thread:
//! - each write is one transaction of its own, and PostgreSQL's own group commit shares the
//!   flushes of concurrent commits, so there is no batching writer here;
//! - what SQLite's single writer made safe is made safe by locks: the journal's next number is
//!   taken under an advisory lock (so numbers stay gapless however many connections append), a
//!   log's row is locked while it is appended to, a body digest is checked and recorded under
//!   an advisory lock of its own, and secrets are changed under a table lock;
//! - reads that take several statements run in one repeatable-read, read-only transaction, so
//!   they see one committed state, as SQLite's read transactions do.

mod copy;
mod leader;
mod logs;
mod schema;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cib_core::event::{BuildId, Event, EventBody};
use cib_core::pipeline::Input;
use cib_core::policy::SecretScope;
use cib_core::ports::{
    ArtifactIndex, ArtifactQuery, ArtifactRecord, BuildFilter, BuildRecord, BuildStatus, BuildSummary, BuildUpdate,
    DEFAULT_LOG_LIMIT, Delivery, DeliveryInfo, DeliveryOutcome, DeliveryState, InboxDepth, Intake, LogKey, LogLimit,
    LogRead, NewSecret, OpenSecret, Page, SecretError, SecretInfo, SecretKey, SecretStore, SecretValue, SessionRecord,
    SessionStore, StepRecord, StepRecordStatus, Store, StoreError, StoredInput,
};
use cib_core::time::Timestamp;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, NoTls, Row};

pub use copy::{CopyReport, TableCopy, copy_sqlite_to_postgres};
pub use leader::{FENCED, Holder, Leadership, Tenure, is_fenced};

use crate::error::{corrupt, from_sql, sql_limit, to_sql};
use crate::logs::LogConfig;
use crate::secrets;
use crate::sqlite::{StoredScope, journal_form, to_json};

/// How a [`PgStore`] is set up. Start from `PgOptions::default()`.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The most of each step attempt's log that is kept, in bytes (see [`LogLimit`]).
    pub log_limit: u64,
    /// The most connections the pool opens. 8 by default.
    pub pool_size: usize,
    /// Uncompressed bytes per log chunk. 64 KiB by default, as SQLite's.
    pub log_chunk_size: usize,
    /// zlib level for log chunks, 0 to 9. 1 by default.
    pub compression_level: u32,
    /// How long opening a connection, or waiting for a free one, may take. 10 s by default.
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            log_limit: DEFAULT_LOG_LIMIT,
            pool_size: 8,
            log_chunk_size: 64 << 10,
            compression_level: 1,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The store on a PostgreSQL database.
pub struct PgStore {
    pool: Pool,
    logs: LogConfig,
    /// The database, without its password, for messages.
    target: String,
    /// The oldest receive time a caller still asks digests about, and the intakes since old
    /// digests were last deleted.
    digest_horizon: AtomicU64,
    intakes: AtomicUsize,
    /// Whether this store's server may write the engine's state (see `leader.rs`).
    fence: std::sync::Arc<leader::Fence>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("target", &self.target).field("logs", &self.logs).finish_non_exhaustive()
    }
}

/// Advisory locks the store takes (any numbers; they share a database with nothing else of ours).
const JOURNAL_LOCK: i64 = 0x6369_6200_0002;
const SECRETS_LOCK: i64 = 0x6369_6200_0003;

/// How many intakes pass between two deletions of old delivery digests.
const PRUNE_EVERY: usize = 10_000;

/// Sorts a PostgreSQL error by what the engine should do about it: a lost connection, a
/// server shutting down, a serialization failure or too many connections may pass; bad
/// credentials, a missing database, a full disk or a read-only server need a person; anything
/// else is a bug or bad data.
pub(crate) fn db(error: tokio_postgres::Error) -> StoreError {
    let message = format!("postgres: {error}");
    let Some(code) = error.code() else {
        // No SQLSTATE: the connection failed or closed.
        return StoreError::Transient(message);
    };
    let code = code.code();
    match code {
        "40001" | "40P01" | "53300" | "55P03" | "57P01" | "57P02" | "57P03" => StoreError::Transient(message),
        "53100" | "25006" | "3D000" | "42501" => StoreError::Misconfigured(message),
        c if c.starts_with("08") => StoreError::Transient(message),
        c if c.starts_with("28") => StoreError::Misconfigured(message),
        _ => StoreError::Permanent(message),
    }
}

fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        deadpool_postgres::PoolError::Closed => StoreError::Permanent("the PostgreSQL store has stopped".into()),
        other => StoreError::Transient(format!("postgres: no connection: {other}")),
    }
}

/// The URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or("");
            format!("{scheme}://{name}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// Statements through the connection's cache of prepared statements, with errors sorted.
#[async_trait]
pub(crate) trait Sql: Sync {
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError>;
    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError>;
    async fn opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, params).await?.into_iter().next())
    }
}

#[async_trait]
impl Sql for deadpool_postgres::Transaction<'_> {
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let statement = self.prepare_cached(sql).await.map_err(db)?;
        self.query(&statement, params).await.map_err(db)
    }
    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let statement = self.prepare_cached(sql).await.map_err(db)?;
        self.execute(&statement, params).await.map_err(db)
    }
}

#[async_trait]
impl Sql for deadpool_postgres::Object {
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let statement = self.prepare_cached(sql).await.map_err(db)?;
        self.query(&statement, params).await.map_err(db)
    }
    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let statement = self.prepare_cached(sql).await.map_err(db)?;
        self.execute(&statement, params).await.map_err(db)
    }
}

fn time(value: i64) -> Result<Timestamp, StoreError> {
    from_sql(value).map(Timestamp)
}

fn opt_time(value: Option<i64>) -> Result<Option<Timestamp>, StoreError> {
    value.map(time).transpose()
}

fn decompress(data: &[u8], what: &str) -> Result<Vec<u8>, StoreError> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data).read_to_end(&mut out).map_err(|e| corrupt(format!("{what}: zlib: {e}")))?;
    Ok(out)
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`, or
    /// any form tokio-postgres reads, a Unix socket's directory as `host` included), brings
    /// its schema up to date and keeps a pool of connections to it.
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        let target = redact_url(url);
        if options.pool_size == 0 || options.log_chunk_size == 0 || options.compression_level > 9 {
            return Err(StoreError::Misconfigured(format!(
                "PostgreSQL store options need pool_size >= 1, log_chunk_size >= 1 and compression_level <= 9: {options:?}"
            )));
        }
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Misconfigured(format!("{target} is not a PostgreSQL URL: {e}")))?;
        config.connect_timeout(options.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("cib");
        }
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| StoreError::Misconfigured(format!("cannot set up a pool for {target}: {e}")))?;
        let mut client = pool.get().await.map_err(|e| match pool_error(e) {
            StoreError::Transient(m) => StoreError::Transient(format!("cannot connect to {target}: {m}")),
            other => other,
        })?;
        schema::migrate(&mut client).await?;
        drop(client);
        let log_limit = LogLimit::new(options.log_limit.min(i64::MAX as u64));
        Ok(PgStore {
            pool,
            logs: LogConfig { limit: log_limit, chunk: options.log_chunk_size, level: options.compression_level },
            target,
            digest_horizon: AtomicU64::new(0),
            intakes: AtomicUsize::new(0),
            fence: Default::default(),
        })
    }

    /// The database, without its password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// What this store keeps of a new log.
    pub fn log_limit(&self) -> LogLimit {
        self.logs.limit
    }

    /// The schema version of the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        schema::current_version(&**client).await
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Starts a repeatable-read, read-only transaction, so that a read of several statements
    /// sees one committed state.
    async fn read_tx(client: &mut deadpool_postgres::Object) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
        client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)
    }

    /// Deletes delivery digests older than every caller still asks about. A failure keeps them,
    /// which costs only space, and is tried again later.
    async fn prune_digests(&self) {
        let horizon = self.digest_horizon.load(Ordering::Relaxed);
        let deleted = async {
            let horizon = to_sql(horizon)?;
            self.client().await?.exec("DELETE FROM delivery_digests WHERE received_at < $1", &[&horizon]).await
        };
        if let Err(error) = deleted.await {
            tracing::warn!(%error, "old delivery digests could not be deleted; trying again later");
        }
    }
}

/// An input read back from its JSON, with the spec text put back in place of its digest.
async fn input_from_json(
    c: &impl Sql,
    json: &str,
    what: &str,
    specs: &mut std::collections::HashMap<String, String>,
) -> Result<Input, StoreError> {
    let mut value: serde_json::Value = serde_json::from_str(json).map_err(|e| corrupt(format!("{what}: {e}")))?;
    if let Some(map) = value.as_object_mut()
        && let Some(serde_json::Value::String(digest)) = map.remove(crate::read::SPEC_DIGEST)
    {
        let text = match specs.get(&digest) {
            Some(text) => text.clone(),
            None => {
                let row = c.opt("SELECT text FROM specs WHERE sha256 = $1", &[&digest]).await?;
                let text: String =
                    row.map(|r| r.get(0)).ok_or_else(|| corrupt(format!("{what}: no spec with digest {digest}")))?;
                specs.insert(digest, text.clone());
                text
            }
        };
        map.insert("spec".into(), serde_json::Value::String(text));
    }
    serde_json::from_value(value).map_err(|e| corrupt(format!("{what}: {e}")))
}

/// An owned statement parameter, for statements sent together.
type Param = Box<dyn ToSql + Sync + Send>;

/// One statement that stores an event and, only when it is new, makes its change to the build
/// records, as [`BuildUpdate`] says: a replayed event changes nothing.
fn event_statement(event: &Event) -> Result<(String, Vec<Param>), StoreError> {
    const INSERT: &str = "WITH e AS (INSERT INTO events (seq, at, build, body) VALUES ($1, $2, $3, $4) ON CONFLICT (seq) DO NOTHING RETURNING 1)";
    let mut params: Vec<Param> = vec![
        Box::new(to_sql(event.seq)?),
        Box::new(to_sql(event.at.0)?),
        Box::new(event.body.build().map(|b| b.0.clone())),
        Box::new(to_json(&event.body, "an event")?),
    ];
    let opt = |t: Option<Timestamp>| t.map(|t| to_sql(t.0)).transpose();
    let sql = match BuildUpdate::from_event(event) {
        None => {
            "INSERT INTO events (seq, at, build, body) VALUES ($1, $2, $3, $4) ON CONFLICT (seq) DO NOTHING".to_owned()
        }
        Some(BuildUpdate::Queued(b)) => {
            params.push(Box::new(b.id.0));
            params.push(Box::new(b.repo));
            params.push(Box::new(b.branch));
            params.push(Box::new(b.commit));
            params.push(Box::new(b.pipeline));
            params.push(Box::new(b.status.as_str()));
            params.push(Box::new(to_sql(b.queued_at.0)?));
            params.push(Box::new(opt(b.started_at)?));
            params.push(Box::new(opt(b.finished_at)?));
            format!(
                "{INSERT} INSERT INTO builds (id, repo, branch, commit_sha, pipeline, status, queued_at, started_at, finished_at)
                 SELECT $5::text, $6::text, $7::text, $8::text, $9::text, $10::text, $11::bigint, $12::bigint, $13::bigint FROM e
                 ON CONFLICT (id) DO NOTHING"
            )
        }
        Some(BuildUpdate::Status { build, status, at }) => {
            params.push(Box::new(build.0));
            params.push(Box::new(status.as_str()));
            params.push(Box::new(status == BuildStatus::Running));
            params.push(Box::new(to_sql(at.0)?));
            params.push(Box::new(status.is_finished()));
            let finished = [
                BuildStatus::Success,
                BuildStatus::Failed,
                BuildStatus::Cancelled,
                BuildStatus::TimedOut,
                BuildStatus::Errored,
                BuildStatus::Neutral,
            ]
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
            // A finished build keeps its status; `started_at` is set the first time the build
            // runs, `finished_at` when it finishes.
            format!(
                "{INSERT} UPDATE builds SET status = $6::text,
                     started_at = COALESCE(started_at, CASE WHEN $7::boolean THEN $8::bigint END),
                     finished_at = CASE WHEN $9::boolean THEN $8::bigint END
                 WHERE id = $5::text AND status NOT IN ({finished}) AND EXISTS (SELECT 1 FROM e)"
            )
        }
        Some(BuildUpdate::Step { build, step }) => {
            params.push(Box::new(build.0));
            params.push(Box::new(step.name));
            params.push(Box::new(i64::from(step.attempt)));
            params.push(Box::new(to_sql(event.seq)?));
            params.push(Box::new(step.status.as_str()));
            params.push(Box::new(step.detail));
            params.push(Box::new(opt(step.started_at)?));
            params.push(Box::new(opt(step.finished_at)?));
            format!(
                "{INSERT} INSERT INTO build_steps (build, step, attempt, ord, status, detail, started_at, finished_at)
                 SELECT $5::text, $6::text, $7::bigint, $8::bigint, $9::text, $10::text, $11::bigint, $12::bigint FROM e
                 WHERE EXISTS (SELECT 1 FROM builds WHERE id = $5::text)
                 ON CONFLICT (build, step, attempt) DO UPDATE SET
                     status = excluded.status,
                     detail = COALESCE(excluded.detail, build_steps.detail),
                     started_at = COALESCE(build_steps.started_at, excluded.started_at),
                     finished_at = COALESCE(excluded.finished_at, build_steps.finished_at)"
            )
        }
    };
    Ok((sql, params))
}

const SUMMARY_COLUMNS: &str = "id, repo, branch, commit_sha, pipeline, status, queued_at, started_at, finished_at";

fn summary(row: &Row) -> Result<BuildSummary, StoreError> {
    let status: String = row.get(5);
    Ok(BuildSummary {
        id: BuildId(row.get(0)),
        repo: row.get(1),
        branch: row.get(2),
        commit: row.get(3),
        pipeline: row.get(4),
        status: BuildStatus::from_name(&status).ok_or_else(|| corrupt(format!("build status {status}")))?,
        queued_at: time(row.get(6))?,
        started_at: opt_time(row.get(7))?,
        finished_at: opt_time(row.get(8))?,
    })
}

fn delivery_row(row: &Row) -> Result<Delivery, StoreError> {
    Ok(Delivery {
        id: row.get(0),
        source: row.get(1),
        event: row.get(2),
        received_at: time(row.get(3))?,
        body: row.get(4),
    })
}

const ARTIFACT_COLUMNS: &str =
    "build, name, repo, commit_sha, pipeline, trusted, sha256, size, files, created_at, expires_at";

fn artifact(row: &Row) -> Result<ArtifactRecord, StoreError> {
    Ok(ArtifactRecord {
        build: BuildId(row.get(0)),
        name: row.get(1),
        repo: row.get(2),
        commit: row.get(3),
        pipeline: row.get(4),
        trusted: row.get::<_, i64>(5) != 0,
        sha256: row.get(6),
        size: from_sql(row.get(7))?,
        files: from_sql(row.get(8))?,
        created_at: time(row.get(9))?,
        expires_at: time(row.get(10))?,
    })
}

/// Artifacts newest first, as SQLite's reads give them.
fn sort_artifacts(found: &mut [ArtifactRecord]) {
    found.sort_by(|a, b| {
        b.created_at.cmp(&a.created_at).then_with(|| b.build.0.cmp(&a.build.0)).then_with(|| a.name.cmp(&b.name))
    });
}

#[async_trait]
impl Store for PgStore {
    async fn append_input(&self, input: &StoredInput) -> Result<u64, StoreError> {
        let last = self.append_journal(std::slice::from_ref(input), &[]).await?;
        last.ok_or_else(|| StoreError::Permanent("an input was not numbered".into()))
    }

    async fn append_journal(&self, inputs: &[StoredInput], events: &[Event]) -> Result<Option<u64>, StoreError> {
        if inputs.is_empty() && events.is_empty() {
            return Ok(None);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let mut last = None;
        if !inputs.is_empty() {
            // The lock makes appends take turns, so the next number is free and numbers have
            // no gaps; a snapshot may have taken every input, so its number counts too.
            tx.exec("SELECT pg_advisory_xact_lock($1)", &[&JOURNAL_LOCK]).await?;
        }
        // Checked in the append's own transaction: see `leader.rs`.
        self.fence.check(&tx).await?;
        let mut seq = 0;
        if !inputs.is_empty() {
            let max: i64 = tx
                .opt(
                    "SELECT GREATEST(COALESCE((SELECT MAX(seq) FROM inputs), 0), COALESCE((SELECT MAX(seq) FROM snapshots), 0))",
                    &[],
                )
                .await?
                .map_or(0, |r| r.get(0));
            seq = from_sql(max)?;
        }
        // Every statement of the batch is sent at once (tokio-postgres pipelines the requests
        // of one connection in the order they are first polled) and PostgreSQL runs them in
        // that order: one round trip for the batch instead of one or two per row, which kept
        // the engine waiting on the network more than on the database. Each event and the
        // change it makes to the build records are one statement, so nothing needs an answer
        // before the next statement is sent.
        let mut work: Vec<(tokio_postgres::Statement, Vec<Param>)> = Vec::new();
        for input in inputs {
            let (json, enqueue) = journal_form(&input.input)?;
            let at = to_sql(input.at.0)?;
            seq += 1;
            if let Some(e) = enqueue {
                let specs = "INSERT INTO specs (sha256, text) VALUES ($1, $2) ON CONFLICT (sha256) DO NOTHING";
                work.push((tx.prepare_cached(specs).await.map_err(db)?, vec![Box::new(e.sha256), Box::new(e.spec)]));
                let enqueues =
                    "INSERT INTO enqueues (build, at, input) VALUES ($1, $2, $3) ON CONFLICT (build) DO NOTHING";
                work.push((
                    tx.prepare_cached(enqueues).await.map_err(db)?,
                    vec![Box::new(e.build), Box::new(at), Box::new(json.clone())],
                ));
            }
            let row = "INSERT INTO inputs (seq, at, input) VALUES ($1, $2, $3)";
            work.push((
                tx.prepare_cached(row).await.map_err(db)?,
                vec![Box::new(to_sql(seq)?), Box::new(at), Box::new(json)],
            ));
            last = Some(seq);
        }
        for event in events {
            let (sql, params) = event_statement(event)?;
            work.push((tx.prepare_cached(&sql).await.map_err(db)?, params));
        }
        let sending = &tx;
        let sent = work.iter().map(|(statement, params)| {
            let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
            async move { sending.execute(statement, &params).await }
        });
        futures_util::future::try_join_all(sent).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(last)
    }

    async fn inputs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, StoredInput)>, StoreError> {
        let after = to_sql(after)?;
        let limit = sql_limit(limit);
        let mut client = self.client().await?;
        let tx = Self::read_tx(&mut client).await?;
        let rows = tx
            .rows("SELECT seq, at, input FROM inputs WHERE seq > $1 ORDER BY seq LIMIT $2", &[&after, &limit])
            .await?;
        let mut specs = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let (seq, at, json): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
            let input = input_from_json(&tx, &json, &format!("input {seq}"), &mut specs).await?;
            out.push((from_sql(seq)?, StoredInput { at: time(at)?, input }));
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    async fn save_snapshot(&self, seq: u64, data: &[u8]) -> Result<(), StoreError> {
        use std::io::Write as _;
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::with_capacity(data.len() / 4 + 64), flate2::Compression::fast());
        let data = encoder
            .write_all(data)
            .and_then(|()| encoder.finish())
            .map_err(|e| StoreError::Permanent(format!("zlib: {e}")))?;
        let at = to_sql(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        )?;
        let seq = to_sql(seq)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.exec("SELECT pg_advisory_xact_lock($1)", &[&JOURNAL_LOCK]).await?;
        self.fence.check(&tx).await?;
        tx.exec(
            "INSERT INTO snapshots (seq, at, data) VALUES ($1, $2, $3)
             ON CONFLICT (seq) DO UPDATE SET at = excluded.at, data = excluded.data",
            &[&seq, &at, &data],
        )
        .await?;
        tx.exec("DELETE FROM inputs WHERE seq <= $1", &[&seq]).await?;
        tx.exec("DELETE FROM snapshots WHERE seq < $1", &[&seq]).await?;
        tx.commit().await.map_err(db)
    }

    async fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let Some(row) = client.opt("SELECT seq, data FROM snapshots ORDER BY seq DESC LIMIT 1", &[]).await? else {
            return Ok(None);
        };
        let (seq, data): (i64, Vec<u8>) = (row.get(0), row.get(1));
        Ok(Some((from_sql(seq)?, decompress(&data, &format!("snapshot {seq}"))?)))
    }

    async fn enqueued(&self, build: &BuildId) -> Result<Option<StoredInput>, StoreError> {
        let build = &build.0;
        let mut client = self.client().await?;
        let tx = Self::read_tx(&mut client).await?;
        let Some(row) = tx.opt("SELECT at, input FROM enqueues WHERE build = $1", &[build]).await? else {
            return Ok(None);
        };
        let (at, json): (i64, String) = (row.get(0), row.get(1));
        let input = input_from_json(&tx, &json, &format!("the enqueue of {build}"), &mut Default::default()).await?;
        tx.commit().await.map_err(db)?;
        Ok(Some(StoredInput { at: time(at)?, input }))
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        self.append_journal(&[], events).await.map(|_| ())
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let (after, limit) = (to_sql(after)?, sql_limit(limit));
        let client = self.client().await?;
        let rows = client
            .rows("SELECT seq, at, body FROM events WHERE seq > $1 ORDER BY seq LIMIT $2", &[&after, &limit])
            .await?;
        rows.into_iter()
            .map(|row| {
                let (seq, at, body): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
                let body: EventBody = serde_json::from_str(&body).map_err(|e| corrupt(format!("event {seq}: {e}")))?;
                Ok(Event { seq: from_sql(seq)?, at: time(at)?, body })
            })
            .collect()
    }

    async fn append_log(&self, key: &LogKey, data: &[u8]) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        self.fence.check(&tx).await?;
        let length = logs::append(&tx, &self.logs, key, data).await?;
        tx.commit().await.map_err(db)?;
        Ok(length)
    }

    async fn finish_log(&self, key: &LogKey) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        self.fence.check(&tx).await?;
        logs::finish(&tx, &self.logs, key).await?;
        tx.commit().await.map_err(db)
    }

    async fn mark_log_time(&self, key: &LogKey, offset: u64, at: Timestamp) -> Result<(), StoreError> {
        self.fence.local()?;
        let (offset, at, attempt) = (to_sql(offset)?, to_sql(at.0)?, i64::from(key.attempt));
        self.client()
            .await?
            .exec(
                "INSERT INTO log_times (build, step, attempt, start_offset, at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &[&key.build.0, &key.step, &attempt, &offset, &at],
            )
            .await?;
        Ok(())
    }

    async fn log_times(&self, key: &LogKey, from: u64, limit: usize) -> Result<Vec<(u64, Timestamp)>, StoreError> {
        let (from, limit, attempt) =
            (i64::try_from(from).unwrap_or(i64::MAX), sql_limit(limit), i64::from(key.attempt));
        let rows = self
            .client()
            .await?
            .rows(
                "SELECT start_offset, at FROM log_times WHERE build = $1 AND step = $2 AND attempt = $3
                 AND start_offset >= $4 ORDER BY start_offset LIMIT $5",
                &[&key.build.0, &key.step, &attempt, &from, &limit],
            )
            .await?;
        rows.iter().map(|r| Ok((from_sql(r.get(0))?, time(r.get(1))?))).collect()
    }

    async fn read_log(&self, key: &LogKey, offset: u64, max: usize) -> Result<LogRead, StoreError> {
        let mut client = self.client().await?;
        let tx = Self::read_tx(&mut client).await?;
        let read = logs::read(&tx, key, offset, max).await?;
        tx.commit().await.map_err(db)?;
        Ok(read)
    }

    async fn insert_delivery(&self, d: &Delivery) -> Result<bool, StoreError> {
        let received_at = to_sql(d.received_at.0)?;
        let inserted = self
            .client()
            .await?
            .exec(
                "INSERT INTO deliveries (id, source, event, received_at, body) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO NOTHING",
                &[&d.id, &d.source, &d.event, &received_at, &d.body],
            )
            .await?;
        Ok(inserted == 1)
    }

    async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        let row = self
            .client()
            .await?
            .opt("SELECT id, source, event, received_at, body FROM deliveries WHERE id = $1", &[&id])
            .await?;
        row.as_ref().map(delivery_row).transpose()
    }

    async fn pending_deliveries(&self, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        Ok(self.due_deliveries(Timestamp(i64::MAX as u64), limit).await?.into_iter().map(|(d, _)| d).collect())
    }

    async fn mark_delivery_done(&self, id: &str) -> Result<(), StoreError> {
        self.fence.local()?;
        self.client().await?.exec("UPDATE deliveries SET done = 1 WHERE id = $1", &[&id]).await?;
        Ok(())
    }

    async fn insert_delivery_once(
        &self,
        d: &Delivery,
        digest: &[u8],
        since: Timestamp,
        done: Option<&str>,
    ) -> Result<Intake, StoreError> {
        let received_at = to_sql(d.received_at.0)?;
        let since_sql = to_sql(since.0)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let digest = (!digest.is_empty()).then_some(digest);
        if let Some(digest) = digest {
            self.digest_horizon.fetch_max(since.0, Ordering::Relaxed);
            // Copies of one body arriving at once (at this server or another) take turns on a
            // lock named by the digest, so that exactly one of them is new.
            let mut name = [0u8; 8];
            for (i, b) in digest.iter().take(8).enumerate() {
                name[i] = *b;
            }
            tx.exec("SELECT pg_advisory_xact_lock($1)", &[&i64::from_be_bytes(name)]).await?;
            let seen = tx
                .opt(
                    "SELECT 1 FROM delivery_digests WHERE digest = $1 AND received_at >= $2 LIMIT 1",
                    &[&digest, &since_sql],
                )
                .await?;
            if seen.is_some() {
                return Ok(Intake::DuplicateBody);
            }
        }
        let (is_done, reason) = (i64::from(done.is_some()), done);
        let inserted = tx
            .exec(
                "INSERT INTO deliveries (id, source, event, received_at, body, body_sha256, done, reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (id) DO NOTHING",
                &[&d.id, &d.source, &d.event, &received_at, &d.body, &digest, &is_done, &reason],
            )
            .await?;
        if inserted == 1
            && let Some(digest) = digest
        {
            tx.exec("INSERT INTO delivery_digests (digest, received_at) VALUES ($1, $2)", &[&digest, &received_at])
                .await?;
        }
        tx.commit().await.map_err(db)?;
        drop(client);
        if inserted == 1 && digest.is_some() && self.intakes.fetch_add(1, Ordering::Relaxed) + 1 >= PRUNE_EVERY {
            self.intakes.store(0, Ordering::Relaxed);
            self.prune_digests().await;
        }
        Ok(if inserted == 1 { Intake::New } else { Intake::DuplicateId })
    }

    async fn due_deliveries(&self, now: Timestamp, limit: usize) -> Result<Vec<(Delivery, u32)>, StoreError> {
        let now = i64::try_from(now.0).unwrap_or(i64::MAX);
        let limit = sql_limit(limit);
        let rows = self
            .client()
            .await?
            .rows(
                "SELECT id, source, event, received_at, body, attempts FROM deliveries
                 WHERE done = 0 AND dead = 0 AND next_attempt_at <= $2
                 ORDER BY received_at, id LIMIT $1",
                &[&limit, &now],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let attempts: i64 = row.get(5);
                let attempts = u32::try_from(attempts).map_err(|_| corrupt(format!("attempts {attempts}")))?;
                Ok((delivery_row(row)?, attempts))
            })
            .collect()
    }

    async fn finish_delivery(&self, id: &str, outcome: DeliveryOutcome) -> Result<(), StoreError> {
        // Only the inbox processor of the active server finishes deliveries; the lease is
        // checked here, without a round trip (a refusal only leaves the delivery pending).
        self.fence.local()?;
        let client = self.client().await?;
        match outcome {
            DeliveryOutcome::Done { reason } => {
                client.exec("UPDATE deliveries SET done = 1, reason = $2 WHERE id = $1", &[&id, &reason]).await?
            }
            DeliveryOutcome::Retry { at, reason } => {
                let at = to_sql(at.0)?;
                client
                    .exec(
                        "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = $2, reason = $3 WHERE id = $1",
                        &[&id, &at, &reason],
                    )
                    .await?
            }
            DeliveryOutcome::Dead { reason } => {
                client
                    .exec(
                        "UPDATE deliveries SET attempts = attempts + 1, dead = 1, reason = $2 WHERE id = $1",
                        &[&id, &reason],
                    )
                    .await?
            }
        };
        Ok(())
    }

    async fn deliveries(&self, state: Option<DeliveryState>, limit: usize) -> Result<Vec<DeliveryInfo>, StoreError> {
        let filter = match state {
            None => "1 = 1",
            Some(DeliveryState::Pending) => "done = 0 AND dead = 0",
            Some(DeliveryState::Done) => "done = 1",
            Some(DeliveryState::Dead) => "done = 0 AND dead = 1",
        };
        let sql = format!(
            "SELECT id, source, event, received_at, done, dead, attempts, next_attempt_at, reason FROM deliveries
             WHERE {filter} ORDER BY received_at DESC, id DESC LIMIT $1"
        );
        let rows = self.client().await?.rows(&sql, &[&sql_limit(limit)]).await?;
        rows.iter()
            .map(|row| {
                let (done, dead, attempts): (i64, i64, i64) = (row.get(4), row.get(5), row.get(6));
                let state = match (done, dead) {
                    (1, _) => DeliveryState::Done,
                    (_, 1) => DeliveryState::Dead,
                    _ => DeliveryState::Pending,
                };
                Ok(DeliveryInfo {
                    id: row.get(0),
                    source: row.get(1),
                    event: row.get(2),
                    received_at: time(row.get(3))?,
                    state,
                    attempts: u32::try_from(attempts).map_err(|_| corrupt(format!("attempts {attempts}")))?,
                    next_attempt_at: time(row.get(7))?,
                    reason: row.get(8),
                })
            })
            .collect()
    }

    async fn redeliver(&self, id: &str) -> Result<bool, StoreError> {
        let changed = self
            .client()
            .await?
            .exec("UPDATE deliveries SET done = 0, dead = 0, attempts = 0, next_attempt_at = 0 WHERE id = $1", &[&id])
            .await?;
        Ok(changed == 1)
    }

    async fn inbox_depth(&self) -> Result<InboxDepth, StoreError> {
        let row = self
            .client()
            .await?
            .opt(
                "SELECT COUNT(*) FILTER (WHERE dead = 0), COUNT(*) FILTER (WHERE dead = 1),
                        MIN(received_at) FILTER (WHERE dead = 0)
                 FROM deliveries WHERE done = 0",
                &[],
            )
            .await?
            .ok_or_else(|| corrupt("the inbox's depth"))?;
        Ok(InboxDepth {
            pending: from_sql(row.get(0))?,
            dead: from_sql(row.get(1))?,
            oldest_pending: opt_time(row.get(2))?,
        })
    }

    async fn builds(&self, filter: &BuildFilter, page: Page) -> Result<Vec<BuildSummary>, StoreError> {
        enum P {
            Int(i64),
            Text(String),
            Texts(Vec<String>),
        }
        let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM builds WHERE 1 = 1");
        let mut values: Vec<P> = Vec::new();
        let mut add = |sql: &mut String, clause: &str, value: P| {
            values.push(value);
            sql.push_str(&clause.replace('?', &format!("${}", values.len())));
        };
        if let Some(repo) = &filter.repo {
            add(&mut sql, " AND repo = ?", P::Text(repo.clone()));
        }
        if let Some(branch) = &filter.branch {
            add(&mut sql, " AND branch = ?", P::Text(branch.clone()));
        }
        if let Some(commit) = &filter.commit {
            add(&mut sql, " AND commit_sha = ?", P::Text(commit.clone()));
        }
        if !filter.statuses.is_empty() {
            let statuses = filter.statuses.iter().map(|s| s.as_str().to_owned()).collect();
            add(&mut sql, " AND status = ANY(?)", P::Texts(statuses));
        }
        if let Some(from) = filter.queued_from {
            add(&mut sql, " AND queued_at >= ?", P::Int(to_sql(from.0)?));
        }
        if let Some(until) = filter.queued_until {
            add(&mut sql, " AND queued_at < ?", P::Int(to_sql(until.0)?));
        }
        if let Some(after) = &page.after {
            add(&mut sql, " AND (queued_at, id) < (?", P::Int(to_sql(after.queued_at.0)?));
            add(&mut sql, ", ?)", P::Text(after.id.0.clone()));
        }
        add(&mut sql, " ORDER BY queued_at DESC, id DESC LIMIT ?", P::Int(sql_limit(page.limit)));
        let params: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|v| match v {
                P::Int(i) => i as &(dyn ToSql + Sync),
                P::Text(t) => t as &(dyn ToSql + Sync),
                P::Texts(t) => t as &(dyn ToSql + Sync),
            })
            .collect();
        let rows = self.client().await?.rows(&sql, &params).await?;
        rows.iter().map(summary).collect()
    }

    async fn build(&self, id: &BuildId) -> Result<Option<BuildRecord>, StoreError> {
        let sql = format!("SELECT {SUMMARY_COLUMNS} FROM builds WHERE id = $1");
        let mut client = self.client().await?;
        let tx = Self::read_tx(&mut client).await?;
        let Some(row) = tx.opt(&sql, &[&id.0]).await? else { return Ok(None) };
        let build = summary(&row)?;
        let rows = tx
            .rows(
                "SELECT step, attempt, status, detail, started_at, finished_at FROM build_steps
                 WHERE build = $1 ORDER BY ord, attempt",
                &[&id.0],
            )
            .await?;
        let steps = rows
            .iter()
            .map(|r| {
                let (attempt, status): (i64, String) = (r.get(1), r.get(2));
                Ok(StepRecord {
                    name: r.get(0),
                    attempt: u32::try_from(attempt).map_err(|_| corrupt(format!("attempt {attempt}")))?,
                    status: StepRecordStatus::from_name(&status)
                        .ok_or_else(|| corrupt(format!("step status {status}")))?,
                    detail: r.get(3),
                    started_at: opt_time(r.get(4))?,
                    finished_at: opt_time(r.get(5))?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        tx.commit().await.map_err(db)?;
        Ok(Some(BuildRecord { build, steps }))
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        let row = self.client().await?.opt("SELECT COALESCE(MAX(seq), 0) FROM events", &[]).await?;
        from_sql(row.map_or(0, |r| r.get(0)))
    }

    async fn webhook_cursor(&self, receiver: &str) -> Result<Option<u64>, StoreError> {
        let row = self.client().await?.opt("SELECT seq FROM webhook_cursors WHERE receiver = $1", &[&receiver]).await?;
        row.map(|r| from_sql(r.get(0))).transpose()
    }

    async fn advance_webhook_cursor(&self, receiver: &str, seq: u64) -> Result<(), StoreError> {
        self.fence.local()?;
        let seq = to_sql(seq)?;
        self.client()
            .await?
            .exec(
                "INSERT INTO webhook_cursors (receiver, seq) VALUES ($1, $2)
                 ON CONFLICT (receiver) DO UPDATE SET seq = excluded.seq WHERE webhook_cursors.seq < excluded.seq",
                &[&receiver, &seq],
            )
            .await?;
        Ok(())
    }

    async fn prune(&self, rules: &cib_core::ports::Prune) -> Result<cib_core::ports::Pruned, StoreError> {
        // SQLite's round (`writer.rs`, `prune`), statement for statement, in one transaction of
        // the active server's epoch: a server that lost the lease deletes nothing.
        let batch = sql_limit(rules.batch.max(1));
        let mut out = cib_core::ports::Pruned { logs_after: rules.logs_after.clone(), ..Default::default() };
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        self.fence.check(&tx).await?;
        if let Some(before) = rules.logs_before {
            let before = to_sql(before.0)?;
            let (from_at, from_id) = match &rules.logs_after {
                Some((at, id)) => (to_sql(at.0)?, id.0.clone()),
                None => (-1, String::new()),
            };
            let rows = tx
                .rows(
                    "SELECT id, queued_at, finished_at FROM builds
                     WHERE (queued_at > $1 OR (queued_at = $1 AND id > $2)) AND queued_at < $3
                     ORDER BY queued_at, id LIMIT $4",
                    &[&from_at, &from_id, &before, &batch],
                )
                .await?;
            let visited = rows.len();
            let mut stopped = false;
            for row in rows {
                let (id, queued_at, finished_at): (String, i64, Option<i64>) = (row.get(0), row.get(1), row.get(2));
                match finished_at {
                    Some(finished) if finished >= before => {
                        stopped = true;
                        break;
                    }
                    Some(_) => {
                        let removed = tx.exec("DELETE FROM logs WHERE build = $1", &[&id]).await?;
                        tx.exec("DELETE FROM log_chunks WHERE build = $1", &[&id]).await?;
                        tx.exec("DELETE FROM log_times WHERE build = $1", &[&id]).await?;
                        if removed > 0 {
                            out.logs += 1;
                        }
                    }
                    None => {}
                }
                out.logs_after = Some((time(queued_at)?, BuildId(id)));
            }
            out.more |= !stopped && i64::try_from(visited).unwrap_or(i64::MAX) == batch;
        }
        if let Some(before) = rules.events_before {
            let before = to_sql(before.0)?;
            let keep = i64::try_from(rules.events_keep_after).unwrap_or(i64::MAX);
            let removed = tx
                .exec(
                    "DELETE FROM events
                     WHERE seq < (SELECT MIN(seq) FROM events) + $1
                       AND seq <= $2
                       AND seq < (SELECT MAX(seq) FROM events)
                       AND at < $3
                       AND at < COALESCE((SELECT at FROM inputs ORDER BY seq LIMIT 1), $3)",
                    &[&batch, &keep, &before],
                )
                .await?;
            out.events = usize::try_from(removed).unwrap_or(usize::MAX);
            out.more |= i64::try_from(removed).unwrap_or(i64::MAX) == batch;
        }
        if let Some(before) = rules.deliveries_before {
            let before = to_sql(before.0)?;
            let removed = tx
                .exec(
                    "DELETE FROM deliveries WHERE id IN (
                         SELECT id FROM deliveries WHERE done = 1 AND dead = 0 AND received_at < $1
                         ORDER BY done, received_at, id LIMIT $2)",
                    &[&before, &batch],
                )
                .await?;
            out.deliveries = usize::try_from(removed).unwrap_or(usize::MAX);
            out.more |= i64::try_from(removed).unwrap_or(i64::MAX) == batch;
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }
}

type SecretRow = (SecretInfo, Vec<u8>, Vec<u8>);

async fn secret_rows(c: &impl Sql, repo: Option<&str>) -> Result<Vec<SecretRow>, StoreError> {
    let rows = c
        .rows(
            "SELECT repo, name, scope, nonce, ciphertext, set_at, set_by FROM secrets
             WHERE $1::TEXT IS NULL OR repo = $1 ORDER BY repo, name",
            &[&repo],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (repo, name, scope): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let scope: StoredScope =
            serde_json::from_str(&scope).map_err(|e| corrupt(format!("scope of {repo}/{name}: {e}")))?;
        let scope = SecretScope {
            repo,
            branches: scope.branches,
            pipelines: scope.pipelines,
            environments: scope.environments,
        };
        let info = SecretInfo { name, scope, set_at: time(row.get(5))?, set_by: row.get(6) };
        out.push((info, row.get(3), row.get(4)));
    }
    Ok(out)
}

#[async_trait]
impl SecretStore for PgStore {
    async fn set_secret(&self, key: &SecretKey, secret: &NewSecret) -> Result<(), SecretError> {
        let scope = StoredScope::json_of(secret)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        // Changes to secrets take turns, so that a rekey and a set cannot leave values sealed
        // under two keys.
        tx.exec("SELECT pg_advisory_xact_lock($1)", &[&SECRETS_LOCK]).await?;
        // The key must open what is stored already: secrets sealed under two keys could never
        // all be opened again.
        let existing = tx.opt("SELECT repo, name, nonce, ciphertext FROM secrets LIMIT 1", &[]).await?;
        if let Some(row) = existing {
            let (repo, name, nonce, sealed): (String, String, Vec<u8>, Vec<u8>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            secrets::open(key, &repo, &name, &nonce, &sealed)?;
        }
        let repo = secret.scope.repo.as_str();
        let (nonce, sealed) = secrets::seal(key, repo, &secret.name, secret.value.expose().as_bytes())?;
        let set_at = to_sql(secret.at.0)?;
        tx.exec(
            "INSERT INTO secrets (repo, name, scope, nonce, ciphertext, set_at, set_by) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (repo, name) DO UPDATE SET scope = excluded.scope, nonce = excluded.nonce,
             ciphertext = excluded.ciphertext, set_at = excluded.set_at, set_by = excluded.set_by",
            &[&repo, &secret.name, &scope, &nonce, &sealed, &set_at, &secret.by],
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn list_secrets(&self, repo: Option<&str>) -> Result<Vec<SecretInfo>, SecretError> {
        let rows = secret_rows(&self.client().await?, repo).await?;
        Ok(rows.into_iter().map(|(info, _, _)| info).collect())
    }

    async fn remove_secret(&self, repo: &str, name: &str) -> Result<bool, SecretError> {
        let removed =
            self.client().await?.exec("DELETE FROM secrets WHERE repo = $1 AND name = $2", &[&repo, &name]).await?;
        Ok(removed == 1)
    }

    async fn open_secrets(&self, key: &SecretKey, repo: &str) -> Result<Vec<OpenSecret>, SecretError> {
        let rows = secret_rows(&self.client().await?, Some(repo)).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (info, nonce, sealed) in rows {
            let value = secrets::open(key, &info.scope.repo, &info.name, &nonce, &sealed)?;
            out.push(OpenSecret { info, value: SecretValue::new(value) });
        }
        Ok(out)
    }

    async fn rekey(&self, old: &SecretKey, new: &SecretKey) -> Result<usize, SecretError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.exec("SELECT pg_advisory_xact_lock($1)", &[&SECRETS_LOCK]).await?;
        let rows = tx.rows("SELECT repo, name, nonce, ciphertext FROM secrets", &[]).await?;
        // Every value is opened before any is rewritten, so a wrong old key changes nothing.
        let mut opened = Vec::with_capacity(rows.len());
        for row in rows {
            let (repo, name, nonce, sealed): (String, String, Vec<u8>, Vec<u8>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let value = secrets::open(old, &repo, &name, &nonce, &sealed)?;
            opened.push((repo, name, value));
        }
        for (repo, name, value) in &opened {
            let (nonce, sealed) = secrets::seal(new, repo, name, value.as_bytes())?;
            tx.exec(
                "UPDATE secrets SET nonce = $3, ciphertext = $4 WHERE repo = $1 AND name = $2",
                &[repo, name, &nonce, &sealed],
            )
            .await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(opened.len())
    }
}

#[async_trait]
impl SessionStore for PgStore {
    async fn create_session(&self, digest: &str, session: &SessionRecord) -> Result<(), StoreError> {
        let (created, seen) = (to_sql(session.created_at.0)?, to_sql(session.last_seen.0)?);
        self.client()
            .await?
            .exec(
                "INSERT INTO web_sessions (digest, token_name, created_at, last_seen) VALUES ($1, $2, $3, $4)",
                &[&digest, &session.token_name, &created, &seen],
            )
            .await?;
        Ok(())
    }

    async fn session(&self, digest: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row = self
            .client()
            .await?
            .opt("SELECT token_name, created_at, last_seen FROM web_sessions WHERE digest = $1", &[&digest])
            .await?;
        row.map(|r| Ok(SessionRecord { token_name: r.get(0), created_at: time(r.get(1))?, last_seen: time(r.get(2))? }))
            .transpose()
    }

    async fn touch_session(&self, digest: &str, at: Timestamp) -> Result<(), StoreError> {
        let at = to_sql(at.0)?;
        self.client().await?.exec("UPDATE web_sessions SET last_seen = $2 WHERE digest = $1", &[&digest, &at]).await?;
        Ok(())
    }

    async fn remove_session(&self, digest: &str) -> Result<(), StoreError> {
        self.client().await?.exec("DELETE FROM web_sessions WHERE digest = $1", &[&digest]).await?;
        Ok(())
    }

    async fn expire_sessions(&self, before: Timestamp) -> Result<usize, StoreError> {
        let before = to_sql(before.0)?;
        let removed = self.client().await?.exec("DELETE FROM web_sessions WHERE last_seen < $1", &[&before]).await?;
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }
}

#[async_trait]
impl ArtifactIndex for PgStore {
    async fn put_artifact(&self, a: &ArtifactRecord) -> Result<(), StoreError> {
        let (trusted, size, files) = (i64::from(a.trusted), to_sql(a.size)?, to_sql(a.files)?);
        let (created, expires) = (to_sql(a.created_at.0)?, to_sql(a.expires_at.0)?);
        self.client()
            .await?
            .exec(
                &format!(
                    "INSERT INTO artifacts ({ARTIFACT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (build, name) DO UPDATE SET repo = excluded.repo, commit_sha = excluded.commit_sha,
                     pipeline = excluded.pipeline, trusted = excluded.trusted, sha256 = excluded.sha256,
                     size = excluded.size, files = excluded.files, created_at = excluded.created_at,
                     expires_at = excluded.expires_at"
                ),
                &[
                    &a.build.0,
                    &a.name,
                    &a.repo,
                    &a.commit,
                    &a.pipeline,
                    &trusted,
                    &a.sha256,
                    &size,
                    &files,
                    &created,
                    &expires,
                ],
            )
            .await?;
        Ok(())
    }

    async fn artifacts(&self, build: &BuildId) -> Result<Vec<ArtifactRecord>, StoreError> {
        let sql = format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE build = $1 ORDER BY name");
        let rows = self.client().await?.rows(&sql, &[&build.0]).await?;
        rows.iter().map(artifact).collect()
    }

    async fn find_artifact(
        &self,
        query: &ArtifactQuery<'_>,
        now: Timestamp,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let (trusted, now) = (i64::from(query.trusted_only), to_sql(now.0)?);
        let sql = format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts
             WHERE repo = $1 AND commit_sha = $2 AND pipeline = $3 AND name = $4 AND trusted >= $5 AND expires_at > $6
             ORDER BY created_at DESC, build DESC, name LIMIT 1"
        );
        let row = self
            .client()
            .await?
            .opt(&sql, &[&query.repo, &query.commit, &query.pipeline, &query.step, &trusted, &now])
            .await?;
        row.as_ref().map(artifact).transpose()
    }

    async fn expire_artifacts(&self, now: Timestamp) -> Result<Vec<ArtifactRecord>, StoreError> {
        let now = to_sql(now.0)?;
        let sql = format!("DELETE FROM artifacts WHERE expires_at <= $1 RETURNING {ARTIFACT_COLUMNS}");
        let rows = self.client().await?.rows(&sql, &[&now]).await?;
        let mut removed = rows.iter().map(artifact).collect::<Result<Vec<_>, _>>()?;
        sort_artifacts(&mut removed);
        Ok(removed)
    }
}
