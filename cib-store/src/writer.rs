//! The one thread that writes, and its group commits.
//!
//! Every write goes through a channel to this thread, which takes whatever has queued up
//! (up to a count and a size) and applies it in one transaction: a chatty step, many steps at
//! once and a burst of webhooks all share commits instead of each paying for one. Each write
//! runs inside a savepoint, so one that fails (say, an append to a finished log) is undone
//! alone while the others commit. Callers hear back only after the commit, so a reported
//! write is a durable write.

use cib_core::ports::{
    BuildStatus, BuildUpdate, Delivery, DeliveryOutcome, Intake, LogKey, NewSecret, SecretError, SecretKey,
    SessionRecord, StoreError,
};
use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use crate::error::{corrupt, db, exec, from_sql, query_opt, to_sql};
use crate::logs::{self, LogConfig};
use crate::secrets;

/// An event as the writer stores it: serialized by the caller, so the writer thread spends
/// its time on SQLite alone.
#[derive(Debug)]
pub(crate) struct EventRow {
    pub seq: u64,
    pub at: u64,
    pub build: Option<String>,
    pub body: String,
    pub update: Option<BuildUpdate>,
}

/// What an enqueue stores besides its journal row.
#[derive(Debug)]
pub(crate) struct Enqueue {
    pub build: String,
    pub sha256: String,
    pub spec: String,
}

/// One write.
#[derive(Debug)]
pub(crate) enum Op {
    /// An input as JSON; an enqueue also carries its build and its spec (digest and text),
    /// which the input's JSON refers to by digest.
    Input {
        at: u64,
        input: String,
        enqueue: Option<Enqueue>,
    },
    /// A snapshot after input `seq` (compressed), replacing the inputs it covers.
    Snapshot {
        seq: u64,
        at: u64,
        data: Vec<u8>,
    },
    Events(Vec<EventRow>),
    /// One batch of the engine's (`Store::append_journal`): `Input`s, then `Events`, all in
    /// the same savepoint. It answers the last input's number, or 0 when there is none.
    Journal(Vec<Op>),
    AppendLog {
        key: LogKey,
        data: Vec<u8>,
    },
    FinishLog {
        key: LogKey,
    },
    LogTime {
        key: LogKey,
        offset: u64,
        at: u64,
    },
    Delivery(Delivery),
    DeliveryOnce {
        delivery: Delivery,
        digest: Vec<u8>,
        since: u64,
        done: Option<String>,
    },
    DeliveryDone {
        id: String,
    },
    FinishDelivery {
        id: String,
        outcome: DeliveryOutcome,
    },
    Redeliver {
        id: String,
    },
    SetSecret {
        key: SecretKey,
        secret: NewSecret,
        scope: String,
    },
    RemoveSecret {
        repo: String,
        name: String,
    },
    Rekey {
        old: SecretKey,
        new: SecretKey,
    },
    WebhookCursor {
        receiver: String,
        seq: u64,
    },
    CreateSession {
        digest: String,
        session: SessionRecord,
    },
    TouchSession {
        digest: String,
        at: u64,
    },
    RemoveSession {
        digest: String,
    },
    ExpireSessions {
        before: u64,
    },
    PutArtifact(cib_core::ports::ArtifactRecord),
    ExpireArtifacts {
        now: u64,
    },
    /// One bounded round of retention (`Store::prune`).
    Prune(cib_core::ports::Prune),
}

impl Op {
    /// Roughly how many bytes the write carries, to keep a batch's memory bounded.
    fn weight(&self) -> usize {
        match self {
            Op::Input { input, enqueue, .. } => input.len() + enqueue.as_ref().map_or(0, |e| e.spec.len()),
            Op::Snapshot { data, .. } => data.len(),
            Op::Events(rows) => rows.iter().map(|r| r.body.len()).sum(),
            Op::Journal(ops) => ops.iter().map(Op::weight).sum(),
            Op::AppendLog { data, .. } => data.len(),
            Op::FinishLog { .. } | Op::LogTime { .. } => 0,
            Op::Delivery(d) | Op::DeliveryOnce { delivery: d, .. } => d.body.len(),
            Op::DeliveryDone { .. } | Op::FinishDelivery { .. } | Op::Redeliver { .. } => 0,
            Op::SetSecret { secret, .. } => secret.value.expose().len(),
            Op::RemoveSecret { .. } | Op::Rekey { .. } | Op::WebhookCursor { .. } => 0,
            Op::CreateSession { .. }
            | Op::TouchSession { .. }
            | Op::RemoveSession { .. }
            | Op::ExpireSessions { .. } => 0,
            Op::PutArtifact(_) | Op::ExpireArtifacts { .. } | Op::Prune(_) => 0,
        }
    }
}

/// What a write returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Done {
    Seq(u64),
    Length(u64),
    Unit,
    New(bool),
    Intake(Intake),
    /// How many secrets a rekey re-sealed.
    Count(usize),
    /// A secret operation refused before it wrote anything: a wrong key, say.
    SecretRefused(SecretError),
    /// The artifact records a write removed.
    Artifacts(Vec<cib_core::ports::ArtifactRecord>),
    /// What a round of retention deleted.
    Pruned(cib_core::ports::Pruned),
}

/// A write and where its answer goes.
#[derive(Debug)]
pub(crate) struct Command {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// How large a group commit may grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub commands: usize,
    pub bytes: usize,
}

/// The digests of the bodies received lately, with when each was last received, so that a
/// replayed body is found without an index lookup in the commit.
///
/// A random key (a SHA-256) in a B-tree index dirties one more page per delivery, and every
/// page is written to the log and synced before the webhook's 202: measured on the load bench,
/// the index made each group commit about a quarter slower and the 99th percentile half again
/// as long. So the digests live in a table of their own, written in arrival order (its pages
/// fill one after another), and the writer, the only one that reads them, keeps them in
/// memory, loaded once when the store opens.
#[derive(Debug, Default)]
pub(crate) struct Digests {
    seen: std::collections::HashMap<Vec<u8>, u64>,
    /// The oldest time a caller still asked about: older digests can be forgotten.
    horizon: u64,
    /// Deliveries recorded since the last time old digests were forgotten.
    since_prune: usize,
}

/// How many new digests are recorded between two prunings of the old ones.
const PRUNE_EVERY: usize = 10_000;

impl Digests {
    pub(crate) fn load(conn: &Connection) -> Result<Digests, StoreError> {
        let mut statement =
            conn.prepare("SELECT digest, MAX(received_at) FROM delivery_digests GROUP BY digest").map_err(db)?;
        let rows = statement.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))).map_err(db)?;
        let mut seen = std::collections::HashMap::new();
        for row in rows {
            let (digest, at) = row.map_err(db)?;
            seen.insert(digest, from_sql(at)?);
        }
        Ok(Digests { seen, horizon: 0, since_prune: 0 })
    }

    fn replayed(&self, digest: &[u8], since: u64) -> bool {
        self.seen.get(digest).is_some_and(|&at| at >= since)
    }
}

/// Runs until every sender is gone, then closes the connection.
pub(crate) fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    logs: LogConfig,
    limits: BatchLimits,
    mut digests: Digests,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut weight = first.op.weight();
        batch.push(first);
        while batch.len() < limits.commands && weight < limits.bytes {
            match rx.try_recv() {
                Ok(next) => {
                    weight += next.op.weight();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let results = match execute(&mut conn, &logs, &batch, &mut digests) {
            Ok(results) => results,
            Err(error) => {
                tracing::warn!(%error, writes = batch.len(), "a group commit failed");
                batch.iter().map(|_| Err(error.clone())).collect()
            }
        };
        for (command, result) in batch.drain(..).zip(results) {
            // A caller that stopped waiting does not need the answer; the write stands.
            let _ = command.reply.send(result);
        }
        if digests.since_prune >= PRUNE_EVERY {
            prune_digests(&conn, &mut digests);
        }
    }
}

/// Forgets the digests older than every caller still asks about, in memory and in the table.
/// The table has no index: its rows are in arrival order, so the oldest are looked at first,
/// twice as many as were added since the last pruning, which keeps the work bounded and the
/// table from growing once its oldest rows are past the window. A failure keeps them, which
/// costs only space, and is tried again after as many more.
fn prune_digests(conn: &Connection, digests: &mut Digests) {
    let horizon = digests.horizon;
    digests.seen.retain(|_, at| *at >= horizon);
    let scan = i64::try_from(digests.since_prune.saturating_mul(2)).unwrap_or(i64::MAX);
    digests.since_prune = 0;
    let deleted = to_sql(horizon).and_then(|horizon| {
        exec(
            conn,
            "DELETE FROM delivery_digests WHERE received_at < ?1
             AND rowid IN (SELECT rowid FROM delivery_digests ORDER BY rowid LIMIT ?2)",
            params![horizon, scan],
        )
    });
    if let Err(error) = deleted {
        tracing::warn!(%error, "old delivery digests could not be deleted; trying again later");
    }
}

/// Applies a batch in one transaction and returns each write's result, or an error for all of
/// them when the transaction itself fails.
///
/// The whole batch is first tried under one savepoint. A savepoint copies every page a write
/// first touches into its sub-journal, and the writes of a batch touch the same few pages (the
/// ends of the deliveries table and its indexes, the newest log chunk), so a savepoint for each
/// write copied those pages once per write: the load bench showed the copies as the writer
/// thread's largest cost, and the writer thread is what a webhook's 202 waits for. Only when a
/// write of the batch fails is that savepoint rolled back and the batch applied again one
/// savepoint per write, so that the failed write is undone alone, as before.
fn execute(
    conn: &mut Connection,
    logs: &LogConfig,
    batch: &[Command],
    digests: &mut Digests,
) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
    // Taking the write lock up front means a busy database is waited for (busy timeout) here,
    // rather than failing halfway through when a read would have to become a write.
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
    // The digests this batch records, with what they replaced, so that a batch that does not
    // commit leaves the memory as it found it.
    let mut undo: Vec<(Vec<u8>, Option<u64>)> = Vec::new();
    let together = {
        let savepoint = tx.savepoint().map_err(db)?;
        let mut results = Vec::with_capacity(batch.len());
        let mut failed = None;
        for command in batch {
            if is_replay(&command.op, digests) {
                results.push(Ok(Done::Intake(Intake::DuplicateBody)));
                continue;
            }
            match apply(&savepoint, logs, &command.op) {
                Ok(done) => {
                    remember(&command.op, &done, digests, &mut undo);
                    results.push(Ok(done));
                }
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        match failed {
            Some(error) => {
                savepoint.finish().map_err(db)?;
                forget(digests, std::mem::take(&mut undo));
                Err(error)
            }
            None => {
                savepoint.commit().map_err(db)?;
                Ok(results)
            }
        }
    };
    let results = match together {
        Ok(results) => results,
        // A full disk or an I/O error makes SQLite roll back the whole transaction; what
        // follows would then commit one write at a time, outside it.
        Err(error) if tx.is_autocommit() => return Err(error),
        Err(_) => {
            let mut results = Vec::with_capacity(batch.len());
            for command in batch {
                if is_replay(&command.op, digests) {
                    results.push(Ok(Done::Intake(Intake::DuplicateBody)));
                    continue;
                }
                let savepoint = tx.savepoint().map_err(db)?;
                match apply(&savepoint, logs, &command.op) {
                    Ok(done) => {
                        savepoint.commit().map_err(db)?;
                        remember(&command.op, &done, digests, &mut undo);
                        results.push(Ok(done));
                    }
                    Err(error) => {
                        // Dropping a savepoint rolls it back; `finish` does the same and reports
                        // a failure to do so, which must fail the batch rather than commit half
                        // a write.
                        savepoint.finish().map_err(db)?;
                        if tx.is_autocommit() {
                            forget(digests, undo);
                            return Err(error);
                        }
                        results.push(Err(error));
                    }
                }
            }
            results
        }
    };
    if let Err(error) = tx.commit() {
        forget(digests, undo);
        return Err(db(error));
    }
    digests.since_prune += undo.len();
    Ok(results)
}

/// Whether a delivery's body was received lately under another id. Asking also moves the
/// horizon of what must be remembered.
fn is_replay(op: &Op, digests: &mut Digests) -> bool {
    if let Op::DeliveryOnce { digest, since, .. } = op
        && !digest.is_empty()
    {
        digests.horizon = digests.horizon.max(*since);
        return digests.replayed(digest, *since);
    }
    false
}

/// Records a new delivery's digest in memory, keeping what it replaced in `undo`.
fn remember(op: &Op, done: &Done, digests: &mut Digests, undo: &mut Vec<(Vec<u8>, Option<u64>)>) {
    if let (Op::DeliveryOnce { delivery, digest, .. }, Done::Intake(Intake::New)) = (op, done)
        && !digest.is_empty()
    {
        let previous = digests.seen.insert(digest.clone(), delivery.received_at.0);
        undo.push((digest.clone(), previous));
    }
}

/// Takes back what a batch that did not commit recorded, newest first.
fn forget(digests: &mut Digests, undo: Vec<(Vec<u8>, Option<u64>)>) {
    for (digest, previous) in undo.into_iter().rev() {
        match previous {
            Some(at) => digests.seen.insert(digest, at),
            None => digests.seen.remove(&digest),
        };
    }
}

fn apply(conn: &Connection, logs: &LogConfig, op: &Op) -> Result<Done, StoreError> {
    match op {
        Op::Input { at, input, enqueue } => {
            // The writer is the only one writing in this transaction, and the transaction
            // holds the write lock, so the next number is free and numbers have no gaps. A
            // snapshot may have taken every input, so its number counts too.
            let last: i64 = query_opt(
                conn,
                "SELECT MAX(COALESCE((SELECT MAX(seq) FROM inputs), 0), COALESCE((SELECT MAX(seq) FROM snapshots), 0))",
                [],
                |r| r.get(0),
            )?
            .unwrap_or(0);
            let seq = from_sql(last)? + 1;
            let (sql_seq, at) = (to_sql(seq)?, to_sql(*at)?);
            if let Some(e) = enqueue {
                exec(
                    conn,
                    "INSERT INTO specs (sha256, text) VALUES (?1, ?2) ON CONFLICT (sha256) DO NOTHING",
                    params![e.sha256, e.spec],
                )?;
                exec(
                    conn,
                    "INSERT INTO enqueues (build, at, input) VALUES (?1, ?2, ?3) ON CONFLICT (build) DO NOTHING",
                    params![e.build, at, input],
                )?;
            }
            exec(conn, "INSERT INTO inputs (seq, at, input) VALUES (?1, ?2, ?3)", params![sql_seq, at, input])?;
            Ok(Done::Seq(seq))
        }
        Op::Snapshot { seq, at, data } => {
            let (seq, at) = (to_sql(*seq)?, to_sql(*at)?);
            exec(
                conn,
                "INSERT INTO snapshots (seq, at, data) VALUES (?1, ?2, ?3) ON CONFLICT (seq) DO UPDATE SET at = excluded.at, data = excluded.data",
                params![seq, at, data],
            )?;
            exec(conn, "DELETE FROM inputs WHERE seq <= ?1", params![seq])?;
            exec(conn, "DELETE FROM snapshots WHERE seq < ?1", params![seq])?;
            Ok(Done::Unit)
        }
        Op::Journal(ops) => {
            let mut last = 0;
            for op in ops {
                if let Done::Seq(seq) = apply(conn, logs, op)? {
                    last = seq;
                }
            }
            Ok(Done::Seq(last))
        }
        Op::Events(rows) => {
            for row in rows {
                let (seq, at) = (to_sql(row.seq)?, to_sql(row.at)?);
                let inserted = exec(
                    conn,
                    "INSERT INTO events (seq, at, build, body) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (seq) DO NOTHING",
                    params![seq, at, row.build, row.body],
                )?;
                // Only a new event moves the build records, so replays change nothing.
                if let (1, Some(update)) = (inserted, &row.update) {
                    apply_update(conn, row.seq, update)?;
                }
            }
            Ok(Done::Unit)
        }
        Op::AppendLog { key, data } => logs::append(conn, logs, key, data).map(Done::Length),
        Op::FinishLog { key } => logs::finish(conn, logs, key).map(|()| Done::Unit),
        Op::LogTime { key, offset, at } => {
            let (build, step, attempt) = (key.build.0.as_str(), key.step.as_str(), i64::from(key.attempt));
            exec(
                conn,
                "INSERT INTO log_times (build, step, attempt, start_offset, at) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                rusqlite::params![build, step, attempt, to_sql(*offset)?, to_sql(*at)?],
            )?;
            Ok(Done::Unit)
        }
        Op::Delivery(d) => {
            let received_at = to_sql(d.received_at.0)?;
            let inserted = exec(
                conn,
                "INSERT INTO deliveries (id, source, event, received_at, body) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO NOTHING",
                params![d.id, d.source, d.event, received_at, d.body],
            )?;
            Ok(Done::New(inserted == 1))
        }
        Op::DeliveryOnce { delivery: d, digest, since: _, done } => {
            // A replayed body was found before this write, in the writer's memory of digests.
            let digest = (!digest.is_empty()).then_some(digest);
            let inserted = exec(
                conn,
                "INSERT INTO deliveries (id, source, event, received_at, body, body_sha256, done, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO NOTHING",
                params![d.id, d.source, d.event, to_sql(d.received_at.0)?, d.body, digest, done.is_some(), done],
            )?;
            if inserted == 1
                && let Some(digest) = digest
            {
                exec(
                    conn,
                    "INSERT INTO delivery_digests (digest, received_at) VALUES (?1, ?2)",
                    params![digest, to_sql(d.received_at.0)?],
                )?;
            }
            Ok(Done::Intake(if inserted == 1 { Intake::New } else { Intake::DuplicateId }))
        }
        Op::FinishDelivery { id, outcome } => {
            match outcome {
                DeliveryOutcome::Done { reason } => {
                    exec(conn, "UPDATE deliveries SET done = 1, reason = ?2 WHERE id = ?1", params![id, reason])?
                }
                DeliveryOutcome::Retry { at, reason } => exec(
                    conn,
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?2, reason = ?3 WHERE id = ?1",
                    params![id, to_sql(at.0)?, reason],
                )?,
                DeliveryOutcome::Dead { reason } => exec(
                    conn,
                    "UPDATE deliveries SET attempts = attempts + 1, dead = 1, reason = ?2 WHERE id = ?1",
                    params![id, reason],
                )?,
            };
            Ok(Done::Unit)
        }
        Op::Redeliver { id } => {
            let changed = exec(
                conn,
                "UPDATE deliveries SET done = 0, dead = 0, attempts = 0, next_attempt_at = 0 WHERE id = ?1",
                [id],
            )?;
            Ok(Done::New(changed == 1))
        }
        Op::WebhookCursor { receiver, seq } => {
            // The condition keeps the cursor from moving back; both SQLite and PostgreSQL
            // take a WHERE on the update of an upsert.
            exec(
                conn,
                "INSERT INTO webhook_cursors (receiver, seq) VALUES (?1, ?2)
                 ON CONFLICT (receiver) DO UPDATE SET seq = excluded.seq WHERE webhook_cursors.seq < excluded.seq",
                params![receiver, to_sql(*seq)?],
            )?;
            Ok(Done::Unit)
        }
        Op::DeliveryDone { id } => {
            exec(conn, "UPDATE deliveries SET done = 1 WHERE id = ?1", [id])?;
            Ok(Done::Unit)
        }
        Op::SetSecret { key, secret, scope } => {
            // The key must open what is stored already: secrets sealed under two keys could
            // never all be opened again.
            let repo = secret.scope.repo.as_str();
            let existing = query_opt(conn, "SELECT repo, name, nonce, ciphertext FROM secrets LIMIT 1", [], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, Vec<u8>>(3)?))
            })?;
            if let Some((r, n, nonce, sealed)) = existing
                && let Err(e) = secrets::open(key, &r, &n, &nonce, &sealed)
            {
                return Ok(Done::SecretRefused(e));
            }
            let (nonce, sealed) = match secrets::seal(key, repo, &secret.name, secret.value.expose().as_bytes()) {
                Ok(v) => v,
                Err(e) => return Ok(Done::SecretRefused(e)),
            };
            exec(
                conn,
                "INSERT INTO secrets (repo, name, scope, nonce, ciphertext, set_at, set_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (repo, name) DO UPDATE SET scope = excluded.scope, nonce = excluded.nonce,
                 ciphertext = excluded.ciphertext, set_at = excluded.set_at, set_by = excluded.set_by",
                params![repo, secret.name, scope, nonce, sealed, to_sql(secret.at.0)?, secret.by],
            )?;
            Ok(Done::Unit)
        }
        Op::CreateSession { digest, session } => {
            exec(
                conn,
                "INSERT INTO web_sessions (digest, token_name, created_at, last_seen) VALUES (?1, ?2, ?3, ?4)",
                params![digest, session.token_name, to_sql(session.created_at.0)?, to_sql(session.last_seen.0)?],
            )?;
            Ok(Done::Unit)
        }
        Op::TouchSession { digest, at } => {
            exec(conn, "UPDATE web_sessions SET last_seen = ?2 WHERE digest = ?1", params![digest, to_sql(*at)?])?;
            Ok(Done::Unit)
        }
        Op::RemoveSession { digest } => {
            exec(conn, "DELETE FROM web_sessions WHERE digest = ?1", params![digest])?;
            Ok(Done::Unit)
        }
        Op::PutArtifact(a) => {
            exec(
                conn,
                "INSERT OR REPLACE INTO artifacts (build, name, repo, commit_sha, pipeline, trusted, sha256, size, files, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    a.build.0,
                    a.name,
                    a.repo,
                    a.commit,
                    a.pipeline,
                    i64::from(a.trusted),
                    a.sha256,
                    to_sql(a.size)?,
                    to_sql(a.files)?,
                    to_sql(a.created_at.0)?,
                    to_sql(a.expires_at.0)?
                ],
            )?;
            Ok(Done::Unit)
        }
        Op::ExpireArtifacts { now } => {
            let expired = crate::read::artifacts_where(conn, "expires_at <= ?1", [to_sql(*now)?])?;
            exec(conn, "DELETE FROM artifacts WHERE expires_at <= ?1", params![to_sql(*now)?])?;
            Ok(Done::Artifacts(expired))
        }
        Op::Prune(rules) => prune(conn, rules).map(Done::Pruned),
        Op::ExpireSessions { before } => {
            let removed = exec(conn, "DELETE FROM web_sessions WHERE last_seen < ?1", params![to_sql(*before)?])?;
            Ok(Done::Count(removed))
        }
        Op::RemoveSecret { repo, name } => {
            let removed = exec(conn, "DELETE FROM secrets WHERE repo = ?1 AND name = ?2", params![repo, name])?;
            Ok(Done::New(removed == 1))
        }
        Op::Rekey { old, new } => {
            let mut stmt = conn.prepare_cached("SELECT repo, name, nonce, ciphertext FROM secrets").map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            // Every value is opened before any is rewritten, so a wrong old key changes nothing.
            let mut opened = Vec::with_capacity(rows.len());
            for (repo, name, nonce, sealed) in rows {
                match secrets::open(old, &repo, &name, &nonce, &sealed) {
                    Ok(value) => opened.push((repo, name, value)),
                    Err(e) => return Ok(Done::SecretRefused(e)),
                }
            }
            for (repo, name, value) in &opened {
                let (nonce, sealed) = match secrets::seal(new, repo, name, value.as_bytes()) {
                    Ok(v) => v,
                    Err(e) => return Err(StoreError::Permanent(e.to_string())),
                };
                exec(
                    conn,
                    "UPDATE secrets SET nonce = ?3, ciphertext = ?4 WHERE repo = ?1 AND name = ?2",
                    params![repo, name, nonce, sealed],
                )?;
            }
            Ok(Done::Count(opened.len()))
        }
    }
}

/// Applies one event's change to the build records, as [`BuildUpdate`] describes.
/// One bounded round of retention; see `Store::prune` for what it may delete and what it
/// keeps. The SQL is the same as PostgreSQL's (`postgres/mod.rs`), placeholders aside.
fn prune(conn: &Connection, rules: &cib_core::ports::Prune) -> Result<cib_core::ports::Pruned, StoreError> {
    use cib_core::event::BuildId;
    use cib_core::time::Timestamp;
    let batch = crate::error::sql_limit(rules.batch.max(1));
    let mut out = cib_core::ports::Pruned { logs_after: rules.logs_after.clone(), ..Default::default() };
    if let Some(before) = rules.logs_before {
        let before = to_sql(before.0)?;
        let (from_at, from_id) = match &rules.logs_after {
            Some((at, id)) => (to_sql(at.0)?, id.0.clone()),
            None => (-1, String::new()),
        };
        // Builds in queue order (the `builds_by_time` index), from where the last round
        // stopped, among those queued before the cutoff: a build finished before it could
        // only have been queued before it too.
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, queued_at, finished_at FROM builds
                 WHERE (queued_at > ?1 OR (queued_at = ?1 AND id > ?2)) AND queued_at < ?3
                 ORDER BY queued_at, id LIMIT ?4",
            )
            .map_err(db)?;
        let rows: Vec<(String, i64, Option<i64>)> = stmt
            .query_map(params![from_at, from_id, before, batch], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(Iterator::collect)
            .map_err(db)?;
        let visited = rows.len();
        let mut stopped = false;
        for (id, queued_at, finished_at) in rows {
            match finished_at {
                // Finished after the cutoff: its turn comes in a later round, so the cursor
                // waits here.
                Some(finished) if finished >= before => {
                    stopped = true;
                    break;
                }
                Some(_) => {
                    let removed = exec(conn, "DELETE FROM logs WHERE build = ?1", params![id])?;
                    exec(conn, "DELETE FROM log_chunks WHERE build = ?1", params![id])?;
                    exec(conn, "DELETE FROM log_times WHERE build = ?1", params![id])?;
                    if removed > 0 {
                        out.logs += 1;
                    }
                }
                // Still running long after the cutoff (a gate waiting for weeks, say): its
                // logs are not touched, and the cursor moves past it.
                None => {}
            }
            out.logs_after = Some((Timestamp(from_sql(queued_at)?), BuildId(id)));
        }
        out.more |= !stopped && i64::try_from(visited).unwrap_or(i64::MAX) == batch;
    }
    if let Some(before) = rules.events_before {
        let before = to_sql(before.0)?;
        let keep = i64::try_from(rules.events_keep_after).unwrap_or(i64::MAX);
        // The range of sequence numbers bounds the work; events are numbered in time order,
        // so the oldest are at the low end.
        let removed = exec(
            conn,
            "DELETE FROM events
             WHERE seq < (SELECT MIN(seq) FROM events) + ?1
               AND seq <= ?2
               AND seq < (SELECT MAX(seq) FROM events)
               AND at < ?3
               AND at < COALESCE((SELECT at FROM inputs ORDER BY seq LIMIT 1), ?3)",
            params![batch, keep, before],
        )?;
        out.events = removed;
        out.more |= i64::try_from(removed).unwrap_or(i64::MAX) == batch;
    }
    if let Some(before) = rules.deliveries_before {
        let before = to_sql(before.0)?;
        let removed = exec(
            conn,
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE done = 1 AND dead = 0 AND received_at < ?1
                 ORDER BY done, received_at, id LIMIT ?2)",
            params![before, batch],
        )?;
        out.deliveries = removed;
        out.more |= i64::try_from(removed).unwrap_or(i64::MAX) == batch;
    }
    Ok(out)
}

fn apply_update(conn: &Connection, seq: u64, update: &BuildUpdate) -> Result<(), StoreError> {
    let opt = |t: Option<cib_core::time::Timestamp>| t.map(|t| to_sql(t.0)).transpose();
    match update {
        BuildUpdate::Queued(b) => {
            let (queued_at, started_at, finished_at) =
                (to_sql(b.queued_at.0)?, opt(b.started_at)?, opt(b.finished_at)?);
            exec(
                conn,
                "INSERT INTO builds (id, repo, branch, commit_sha, pipeline, status, queued_at, started_at, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO NOTHING",
                params![b.id.0, b.repo, b.branch, b.commit, b.pipeline, b.status.as_str(), queued_at, started_at, finished_at],
            )?;
        }
        BuildUpdate::Status { build, status, at } => {
            let current: Option<(String, Option<i64>)> =
                query_opt(conn, "SELECT status, started_at FROM builds WHERE id = ?1", [&build.0], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let Some((current, started_at)) = current else { return Ok(()) };
            let current = BuildStatus::from_name(&current).ok_or_else(|| corrupt(format!("build status {current}")))?;
            if current.is_finished() {
                return Ok(());
            }
            let at = to_sql(at.0)?;
            let started_at = started_at.or((*status == BuildStatus::Running).then_some(at));
            let finished_at = status.is_finished().then_some(at);
            exec(
                conn,
                "UPDATE builds SET status = ?2, started_at = ?3, finished_at = ?4 WHERE id = ?1",
                params![build.0, status.as_str(), started_at, finished_at],
            )?;
        }
        BuildUpdate::Step { build, step } => {
            let known = conn
                .prepare_cached("SELECT 1 FROM builds WHERE id = ?1")
                .and_then(|mut s| s.exists([&build.0]))
                .map_err(db)?;
            if !known {
                return Ok(());
            }
            let (ord, started_at, finished_at) = (to_sql(seq)?, opt(step.started_at)?, opt(step.finished_at)?);
            exec(
                conn,
                "INSERT INTO build_steps (build, step, attempt, ord, status, detail, started_at, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (build, step, attempt) DO UPDATE SET
                     status = excluded.status,
                     detail = COALESCE(excluded.detail, build_steps.detail),
                     started_at = COALESCE(build_steps.started_at, excluded.started_at),
                     finished_at = COALESCE(excluded.finished_at, build_steps.finished_at)",
                params![
                    build.0,
                    step.name,
                    i64::from(step.attempt),
                    ord,
                    step.status.as_str(),
                    step.detail,
                    started_at,
                    finished_at
                ],
            )?;
        }
    }
    Ok(())
}
