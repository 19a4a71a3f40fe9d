//! [`SqliteStore`]: the [`Store`] port on one SQLite file, with one writer thread and a few
//! reader threads.
//!
//! rusqlite is synchronous, and a connection must never be held across an `.await`, so each
//! connection lives on a thread of its own and async callers talk to it through channels:
//! writes queue for the writer (which commits them in groups, see `writer.rs`), reads go to
//! whichever reader is free. The threads are plain OS threads, so the store works under any
//! async runtime, or none for `open`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use cib_core::event::{BuildId, Event};
use cib_core::pipeline::Input;
use cib_core::policy::SecretScope;
use cib_core::ports::{
    BuildFilter, BuildRecord, BuildSummary, BuildUpdate, DEFAULT_LOG_LIMIT, Delivery, DeliveryInfo, DeliveryOutcome,
    DeliveryState, InboxDepth, Intake, LogKey, LogLimit, LogRead, NewSecret, OpenSecret, Page, SecretError, SecretInfo,
    SecretKey, SecretStore, SecretValue, SessionRecord, SessionStore, Store, StoreError, StoredInput, check_new_secret,
};
use cib_core::time::Timestamp;
use flate2::Compression;
use flate2::write::ZlibEncoder;
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};
use std::io::Write as _;
use tokio::sync::{mpsc, oneshot};

use crate::error::{db, stopped};
use crate::logs::{self, LogConfig};
use crate::read;
use crate::schema;
use crate::secrets;
use crate::writer::{self, BatchLimits, Command, Done, Enqueue, EventRow, Op};

/// How hard SQLite works to make a commit survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Every commit is flushed to disk before it is reported: it survives a crash of the
    /// process and of the machine. The default, since a lost webhook or result cannot be
    /// taken back.
    #[default]
    Full,
    /// Commits survive a crash of the process but the last ones may be lost when the machine
    /// loses power; the database stays consistent either way. Faster on slow disks.
    Normal,
}

/// How a [`SqliteStore`] is set up. Start from `SqliteOptions::default()`.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The most of each step attempt's log that is kept, in bytes: past it, the first half
    /// and the last half are kept (see [`LogLimit`]). 64 MiB by default.
    pub log_limit: u64,
    /// How long a write waits for another process that holds the database. 5 s by default.
    pub busy_timeout: Duration,
    pub synchronous: Synchronous,
    /// Read-only connections, each on its own thread. 2 by default.
    pub readers: usize,
    /// Uncompressed bytes per log chunk: larger chunks compress better, smaller ones make
    /// small reads cheaper. 64 KiB by default.
    pub log_chunk_size: usize,
    /// zlib level for log chunks, 0 (store) to 9 (smallest). 1 by default: logs compress well
    /// even at the fastest level, and the writer thread's time is what limits ingest.
    pub compression_level: u32,
    /// The most writes one group commit takes. 1024 by default.
    pub max_batch_writes: usize,
    /// The most bytes one group commit takes, roughly. 8 MiB by default.
    pub max_batch_bytes: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            log_limit: DEFAULT_LOG_LIMIT,
            busy_timeout: Duration::from_secs(5),
            synchronous: Synchronous::Full,
            readers: 2,
            log_chunk_size: 64 << 10,
            compression_level: 1,
            max_batch_writes: 1024,
            max_batch_bytes: 8 << 20,
        }
    }
}

type ReadJob = Box<dyn FnOnce(&mut Connection) + Send>;

/// The store on a SQLite file in WAL mode.
///
/// Opening runs the schema's migrations. Dropping the store lets the writer finish what is
/// queued and waits for its threads; a write whose caller stopped waiting still happens.
#[derive(Debug)]
pub struct SqliteStore {
    // Declared before `threads`, so that they are dropped first and the threads see their
    // channels close before they are joined.
    writer: mpsc::Sender<Command>,
    readers: std_mpsc::Sender<ReadJob>,
    /// Dropping it stops the checkpointer.
    _checkpoints: std_mpsc::Sender<()>,
    path: PathBuf,
    log_limit: LogLimit,
    _threads: Threads,
}

/// Joins the store's threads when dropped.
#[derive(Debug, Default)]
struct Threads(Vec<JoinHandle<()>>);

impl Drop for Threads {
    fn drop(&mut self) {
        for thread in self.0.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a store thread panicked");
            }
        }
    }
}

/// The log's length, in pages, at which the writer checkpoints itself (SQLite's default is 1,000).
const WRITER_CHECKPOINT_PAGES: i64 = 8_192;

/// How often the checkpointer copies the write-ahead log into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the log until the store is dropped. A PASSIVE checkpoint copies what no reader
/// still needs and never waits; the writer's own, rarer checkpoint then has little left to copy.
fn checkpoint_loop(conn: &Connection, stop: &std_mpsc::Receiver<()>) {
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        let done =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
        match done {
            Ok((log, copied)) if log > 0 && copied < log => {
                tracing::debug!(log, copied, "a checkpoint could not copy the whole log yet");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "a checkpoint failed; the next one tries again"),
        }
    }
}

/// Settings every connection gets.
fn configure(conn: &Connection, options: &SqliteOptions) -> Result<(), StoreError> {
    conn.busy_timeout(options.busy_timeout).map_err(db)?;
    let synchronous = match options.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous).map_err(db)?;
    Ok(())
}

/// Opens the database and puts it in WAL mode.
fn first_open(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db)?;
    configure(&conn, options)?;
    // WAL lets readers read while the writer writes, and makes a commit one append to the
    // log file. A database that cannot use it (in memory, say) is refused: its crash
    // behaviour is not what this store promises.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(db)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Misconfigured(format!(
            "{} cannot use WAL mode (journal mode is {mode})",
            path.display()
        )));
    }
    Ok(conn)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(|e| StoreError::Transient(format!("cannot start a store thread: {e}")))
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`, brings its schema up to date, and starts the
    /// writer and reader threads. It blocks while it does so: call it before starting the
    /// runtime, or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if options.readers == 0 || options.log_chunk_size == 0 || options.compression_level > 9 {
            return Err(StoreError::Misconfigured(format!(
                "SQLite store options need readers >= 1, log_chunk_size >= 1 and compression_level <= 9: {options:?}"
            )));
        }
        // Several processes opening a new database at once can meet SQLite's busy answers that
        // skip the busy handler (switching the file to WAL, recovering its index), so the first
        // open is tried again, for as long as the busy timeout, while it is only busy.
        let deadline = std::time::Instant::now() + options.busy_timeout;
        let mut conn = loop {
            match first_open(&path, &options) {
                Err(StoreError::Transient(message))
                    if message.contains("locked") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        schema::migrate(&mut conn)?;
        // A checkpoint copies the log into the database and syncs the database file; in the
        // writer it holds up every write queued behind it (the webhook receiver's 202 among
        // them). So a thread of its own checkpoints often, PASSIVE, which never blocks the writer
        // or the readers. But only a checkpoint that copies the whole log lets the next write
        // start the log again from its beginning, and under a steady stream of writes a thread
        // beside the writer never catches up: the log would grow without end. So the writer
        // still checkpoints, rarely (every 8,192 pages, 32 MiB with 4 KiB pages), and then has
        // only what the checkpointer has not copied yet.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES).map_err(db)?;
        let checkpointer = Connection::open(&path).map_err(db)?;
        configure(&checkpointer, &options)?;

        // Offsets are stored as SQL's signed 64-bit integers; no log comes near the clamp.
        let log_limit = LogLimit::new(options.log_limit.min(i64::MAX as u64));
        let logs = LogConfig { limit: log_limit, chunk: options.log_chunk_size, level: options.compression_level };
        let limits = BatchLimits { commands: options.max_batch_writes.max(1), bytes: options.max_batch_bytes.max(1) };
        let mut threads = Threads::default();
        let (checkpoints, stop) = std_mpsc::channel::<()>();
        threads.0.push(spawn("cib-store-checkpointer", move || checkpoint_loop(&checkpointer, &stop))?);
        let (writer, rx) = mpsc::channel(limits.commands);
        let digests = writer::Digests::load(&conn)?;
        threads.0.push(spawn("cib-store-writer", move || writer::run(conn, rx, logs, limits, digests))?);

        let (readers, jobs) = std_mpsc::channel::<ReadJob>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..options.readers {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let mut conn = Connection::open_with_flags(&path, flags).map_err(db)?;
            conn.busy_timeout(options.busy_timeout).map_err(db)?;
            let jobs = jobs.clone();
            threads.0.push(spawn(&format!("cib-store-reader-{i}"), move || {
                loop {
                    // The lock is held only to take a job, so readers run jobs in parallel.
                    let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    match job {
                        Ok(job) => job(&mut conn),
                        Err(_) => return,
                    }
                }
            })?);
        }
        Ok(SqliteStore { writer, readers, _checkpoints: checkpoints, path, log_limit, _threads: threads })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this store keeps of a new log.
    pub fn log_limit(&self) -> LogLimit {
        self.log_limit
    }

    /// Runs SQLite's integrity check; an error lists what it found.
    pub async fn integrity_check(&self) -> Result<(), StoreError> {
        let problems = self
            .read(|conn| {
                conn.prepare("PRAGMA integrity_check")
                    .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>())
                    .map_err(db)
            })
            .await?;
        if problems == ["ok"] {
            Ok(())
        } else {
            Err(StoreError::Misconfigured(format!("{} is damaged: {}", self.path.display(), problems.join("; "))))
        }
    }

    async fn write(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command { op, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs `f` on a reader's connection, in one read transaction.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn: &mut Connection| {
            let result = conn.transaction().map_err(db).and_then(|tx| f(&tx));
            let _ = reply.send(result);
        });
        self.readers.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// When a snapshot was written, for people reading the database; nothing depends on it.
fn wall_clock_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn unexpected(done: Done) -> StoreError {
    StoreError::Permanent(format!("the store's writer gave an unexpected answer: {done:?}"))
}

/// An input as the journal keeps it: its JSON, and for an enqueue, what is stored beside it.
/// The spec text is stored once, by its digest, and the journaled enqueue refers to it: a busy
/// repository pushes the same spec thousands of times. Both stores journal this form.
pub(crate) fn journal_form(input: &Input) -> Result<(String, Option<Enqueue>), StoreError> {
    Ok(match input {
        Input::Enqueue { build, spec, .. } => {
            let mut value = serde_json::to_value(input)
                .map_err(|e| StoreError::Permanent(format!("cannot serialize an input: {e}")))?;
            let sha256 = hex::encode(Sha256::digest(spec.as_bytes()));
            if let Some(map) = value.as_object_mut() {
                map.remove("spec");
                map.insert(read::SPEC_DIGEST.into(), serde_json::Value::String(sha256.clone()));
            }
            let enqueue = Enqueue { build: build.0.clone(), sha256, spec: spec.to_string() };
            (to_json(&value, "an input")?, Some(enqueue))
        }
        other => (to_json(other, "an input")?, None),
    })
}

/// Events as the writer stores them, each with the change it makes to the build records.
fn event_rows(events: &[Event]) -> Result<Vec<EventRow>, StoreError> {
    events
        .iter()
        .map(|e| {
            Ok(EventRow {
                seq: e.seq,
                at: e.at.0,
                build: e.body.build().map(|b| b.0.clone()),
                body: to_json(&e.body, "an event")?,
                update: BuildUpdate::from_event(e),
            })
        })
        .collect()
}

pub(crate) fn to_json(value: &impl serde::Serialize, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Permanent(format!("cannot serialize {what}: {e}")))
}

#[async_trait]
impl Store for SqliteStore {
    async fn append_input(&self, input: &StoredInput) -> Result<u64, StoreError> {
        let (json, enqueue) = journal_form(&input.input)?;
        match self.write(Op::Input { at: input.at.0, input: json, enqueue }).await? {
            Done::Seq(seq) => Ok(seq),
            other => Err(unexpected(other)),
        }
    }

    async fn inputs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, StoredInput)>, StoreError> {
        self.read(move |c| read::inputs_after(c, after, limit)).await
    }

    async fn save_snapshot(&self, seq: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut encoder = ZlibEncoder::new(Vec::with_capacity(data.len() / 4 + 64), Compression::fast());
        let data = encoder
            .write_all(data)
            .and_then(|()| encoder.finish())
            .map_err(|e| StoreError::Permanent(format!("zlib: {e}")))?;
        match self.write(Op::Snapshot { seq, at: wall_clock_millis(), data }).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.read(read::latest_snapshot).await
    }

    async fn enqueued(&self, build: &BuildId) -> Result<Option<StoredInput>, StoreError> {
        let build = build.0.clone();
        self.read(move |c| read::enqueued(c, &build)).await
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        match self.write(Op::Events(event_rows(events)?)).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn append_journal(&self, inputs: &[StoredInput], events: &[Event]) -> Result<Option<u64>, StoreError> {
        let mut ops = Vec::with_capacity(inputs.len() + 1);
        for input in inputs {
            let (json, enqueue) = journal_form(&input.input)?;
            ops.push(Op::Input { at: input.at.0, input: json, enqueue });
        }
        if !events.is_empty() {
            ops.push(Op::Events(event_rows(events)?));
        }
        match self.write(Op::Journal(ops)).await? {
            Done::Seq(0) => Ok(None),
            Done::Seq(seq) => Ok(Some(seq)),
            other => Err(unexpected(other)),
        }
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.read(move |c| read::events_after(c, after, limit)).await
    }

    async fn append_log(&self, key: &LogKey, data: &[u8]) -> Result<u64, StoreError> {
        match self.write(Op::AppendLog { key: key.clone(), data: data.to_vec() }).await? {
            Done::Length(length) => Ok(length),
            other => Err(unexpected(other)),
        }
    }

    async fn finish_log(&self, key: &LogKey) -> Result<(), StoreError> {
        match self.write(Op::FinishLog { key: key.clone() }).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn mark_log_time(&self, key: &LogKey, offset: u64, at: Timestamp) -> Result<(), StoreError> {
        match self.write(Op::LogTime { key: key.clone(), offset, at: at.0 }).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn log_times(&self, key: &LogKey, from: u64, limit: usize) -> Result<Vec<(u64, Timestamp)>, StoreError> {
        let key = key.clone();
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT start_offset, at FROM log_times WHERE build = ?1 AND step = ?2 AND attempt = ?3 \
                     AND start_offset >= ?4 ORDER BY start_offset LIMIT ?5",
                )
                .map_err(db)?;
            let from = i64::try_from(from).unwrap_or(i64::MAX);
            let limit = crate::error::sql_limit(limit);
            let rows = stmt
                .query_map(rusqlite::params![key.build.0, key.step, i64::from(key.attempt), from, limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(db)?;
            let mut out = Vec::new();
            for row in rows {
                let (offset, at) = row.map_err(db)?;
                out.push((crate::error::from_sql(offset)?, Timestamp(crate::error::from_sql(at)?)));
            }
            Ok(out)
        })
        .await
    }

    async fn read_log(&self, key: &LogKey, offset: u64, max: usize) -> Result<LogRead, StoreError> {
        let key = key.clone();
        self.read(move |c| logs::read(c, &key, offset, max)).await
    }

    async fn insert_delivery(&self, delivery: &Delivery) -> Result<bool, StoreError> {
        match self.write(Op::Delivery(delivery.clone())).await? {
            Done::New(new) => Ok(new),
            other => Err(unexpected(other)),
        }
    }

    async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| read::delivery(c, &id)).await
    }

    async fn pending_deliveries(&self, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        self.read(move |c| read::pending_deliveries(c, limit)).await
    }

    async fn insert_delivery_once(
        &self,
        delivery: &Delivery,
        digest: &[u8],
        since: Timestamp,
        done: Option<&str>,
    ) -> Result<Intake, StoreError> {
        let op = Op::DeliveryOnce {
            delivery: delivery.clone(),
            digest: digest.to_vec(),
            since: since.0,
            done: done.map(str::to_owned),
        };
        match self.write(op).await? {
            Done::Intake(intake) => Ok(intake),
            other => Err(unexpected(other)),
        }
    }

    async fn due_deliveries(&self, now: Timestamp, limit: usize) -> Result<Vec<(Delivery, u32)>, StoreError> {
        let now = i64::try_from(now.0).unwrap_or(i64::MAX);
        self.read(move |c| read::due_deliveries(c, now, limit)).await
    }

    async fn finish_delivery(&self, id: &str, outcome: DeliveryOutcome) -> Result<(), StoreError> {
        match self.write(Op::FinishDelivery { id: id.to_owned(), outcome }).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn deliveries(&self, state: Option<DeliveryState>, limit: usize) -> Result<Vec<DeliveryInfo>, StoreError> {
        self.read(move |c| read::deliveries(c, state, limit)).await
    }

    async fn redeliver(&self, id: &str) -> Result<bool, StoreError> {
        match self.write(Op::Redeliver { id: id.to_owned() }).await? {
            Done::New(changed) => Ok(changed),
            other => Err(unexpected(other)),
        }
    }

    async fn inbox_depth(&self) -> Result<InboxDepth, StoreError> {
        self.read(read::inbox_depth).await
    }

    async fn mark_delivery_done(&self, id: &str) -> Result<(), StoreError> {
        match self.write(Op::DeliveryDone { id: id.to_owned() }).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn builds(&self, filter: &BuildFilter, page: Page) -> Result<Vec<BuildSummary>, StoreError> {
        let filter = filter.clone();
        self.read(move |c| read::builds(c, &filter, &page)).await
    }

    async fn build(&self, id: &BuildId) -> Result<Option<BuildRecord>, StoreError> {
        let id = id.clone();
        self.read(move |c| read::build(c, &id)).await
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.read(read::last_event_seq).await
    }

    async fn webhook_cursor(&self, receiver: &str) -> Result<Option<u64>, StoreError> {
        let receiver = receiver.to_owned();
        self.read(move |c| read::webhook_cursor(c, &receiver)).await
    }

    async fn advance_webhook_cursor(&self, receiver: &str, seq: u64) -> Result<(), StoreError> {
        match self.write(Op::WebhookCursor { receiver: receiver.to_owned(), seq }).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn prune(&self, rules: &cib_core::ports::Prune) -> Result<cib_core::ports::Pruned, StoreError> {
        match self.write(Op::Prune(rules.clone())).await? {
            Done::Pruned(pruned) => Ok(pruned),
            other => Err(unexpected(other)),
        }
    }
}

/// The scope as stored: the repository has its own column.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct StoredScope {
    #[serde(default)]
    pub(crate) branches: Vec<cib_core::spec::Glob>,
    #[serde(default)]
    pub(crate) pipelines: Vec<String>,
    #[serde(default)]
    pub(crate) environments: Vec<String>,
}

impl StoredScope {
    /// A new secret's scope as both stores keep it (JSON), once the secret is checked.
    pub(crate) fn json_of(secret: &NewSecret) -> Result<String, SecretError> {
        check_new_secret(secret)?;
        let stored = StoredScope {
            branches: secret.scope.branches.clone(),
            pipelines: secret.scope.pipelines.clone(),
            environments: secret.scope.environments.clone(),
        };
        Ok(to_json(&stored, "a secret's scope")?)
    }
}

type SecretRow = (SecretInfo, Vec<u8>, Vec<u8>);

/// Reads secret rows (info, nonce, ciphertext) of one repository or all, by repository and name.
fn secret_rows(conn: &Connection, repo: Option<&str>) -> Result<Vec<SecretRow>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT repo, name, scope, nonce, ciphertext, set_at, set_by FROM secrets
             WHERE ?1 IS NULL OR repo = ?1 ORDER BY repo, name",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map([repo], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
            ))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for row in rows {
        let (repo, name, scope, nonce, sealed, set_at, set_by) = row.map_err(db)?;
        let scope: StoredScope =
            serde_json::from_str(&scope).map_err(|e| crate::error::corrupt(format!("scope of {repo}/{name}: {e}")))?;
        let scope = SecretScope {
            repo,
            branches: scope.branches,
            pipelines: scope.pipelines,
            environments: scope.environments,
        };
        let info = SecretInfo { name, scope, set_at: Timestamp(crate::error::from_sql(set_at)?), set_by };
        out.push((info, nonce, sealed));
    }
    Ok(out)
}

fn secret_answer<T>(done: Done, f: impl FnOnce(Done) -> Option<T>) -> Result<T, SecretError> {
    match done {
        Done::SecretRefused(e) => Err(e),
        other => f(other.clone()).ok_or_else(|| SecretError::Store(unexpected(other))),
    }
}

#[async_trait]
impl SecretStore for SqliteStore {
    async fn set_secret(&self, key: &SecretKey, secret: &NewSecret) -> Result<(), SecretError> {
        let scope = StoredScope::json_of(secret)?;
        let op = Op::SetSecret { key: key.clone(), secret: secret.clone(), scope };
        secret_answer(self.write(op).await?, |d| (d == Done::Unit).then_some(()))
    }

    async fn list_secrets(&self, repo: Option<&str>) -> Result<Vec<SecretInfo>, SecretError> {
        let repo = repo.map(str::to_owned);
        let rows = self.read(move |c| secret_rows(c, repo.as_deref())).await?;
        Ok(rows.into_iter().map(|(info, _, _)| info).collect())
    }

    async fn remove_secret(&self, repo: &str, name: &str) -> Result<bool, SecretError> {
        let op = Op::RemoveSecret { repo: repo.to_owned(), name: name.to_owned() };
        secret_answer(self.write(op).await?, |d| if let Done::New(removed) = d { Some(removed) } else { None })
    }

    async fn open_secrets(&self, key: &SecretKey, repo: &str) -> Result<Vec<OpenSecret>, SecretError> {
        let repo = repo.to_owned();
        let rows = self.read(move |c| secret_rows(c, Some(&repo))).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (info, nonce, sealed) in rows {
            let value = secrets::open(key, &info.scope.repo, &info.name, &nonce, &sealed)?;
            out.push(OpenSecret { info, value: SecretValue::new(value) });
        }
        Ok(out)
    }

    async fn rekey(&self, old: &SecretKey, new: &SecretKey) -> Result<usize, SecretError> {
        let op = Op::Rekey { old: old.clone(), new: new.clone() };
        secret_answer(self.write(op).await?, |d| if let Done::Count(n) = d { Some(n) } else { None })
    }
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn create_session(&self, digest: &str, session: &SessionRecord) -> Result<(), StoreError> {
        self.write(Op::CreateSession { digest: digest.to_owned(), session: session.clone() }).await.map(|_| ())
    }

    async fn session(&self, digest: &str) -> Result<Option<SessionRecord>, StoreError> {
        let digest = digest.to_owned();
        self.read(move |c| read::session(c, &digest)).await
    }

    async fn touch_session(&self, digest: &str, at: Timestamp) -> Result<(), StoreError> {
        self.write(Op::TouchSession { digest: digest.to_owned(), at: at.0 }).await.map(|_| ())
    }

    async fn remove_session(&self, digest: &str) -> Result<(), StoreError> {
        self.write(Op::RemoveSession { digest: digest.to_owned() }).await.map(|_| ())
    }

    async fn expire_sessions(&self, before: Timestamp) -> Result<usize, StoreError> {
        match self.write(Op::ExpireSessions { before: before.0 }).await? {
            Done::Count(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }
}

#[async_trait]
impl cib_core::ports::ArtifactIndex for SqliteStore {
    async fn put_artifact(&self, record: &cib_core::ports::ArtifactRecord) -> Result<(), StoreError> {
        self.write(Op::PutArtifact(record.clone())).await.map(|_| ())
    }

    async fn artifacts(&self, build: &BuildId) -> Result<Vec<cib_core::ports::ArtifactRecord>, StoreError> {
        let build = build.0.clone();
        self.read(move |c| {
            let mut found = read::artifacts_where(c, "build = ?1", [build])?;
            found.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(found)
        })
        .await
    }

    async fn find_artifact(
        &self,
        query: &cib_core::ports::ArtifactQuery<'_>,
        now: Timestamp,
    ) -> Result<Option<cib_core::ports::ArtifactRecord>, StoreError> {
        let params = (
            query.repo.to_owned(),
            query.commit.to_owned(),
            query.pipeline.to_owned(),
            query.step.to_owned(),
            i64::from(query.trusted_only),
            crate::error::to_sql(now.0)?,
        );
        self.read(move |c| {
            let found = read::artifacts_where(
                c,
                "repo = ?1 AND commit_sha = ?2 AND pipeline = ?3 AND name = ?4 AND trusted >= ?5 AND expires_at > ?6",
                params,
            )?;
            Ok(found.into_iter().next())
        })
        .await
    }

    async fn expire_artifacts(&self, now: Timestamp) -> Result<Vec<cib_core::ports::ArtifactRecord>, StoreError> {
        match self.write(Op::ExpireArtifacts { now: now.0 }).await? {
            Done::Artifacts(removed) => Ok(removed),
            other => Err(unexpected(other)),
        }
    }
}
