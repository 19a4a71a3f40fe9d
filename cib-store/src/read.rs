//! The queries behind the reads: the journal, events, deliveries and the build records.
//! Each runs on a read-only connection inside one read transaction, so what it returns is a
//! single committed state.

use cib_core::event::{BuildId, Event, EventBody};
use cib_core::pipeline::Input;
use cib_core::ports::{
    BuildFilter, BuildRecord, BuildStatus, BuildSummary, Delivery, DeliveryInfo, DeliveryState, InboxDepth, Page,
    StepRecord, StepRecordStatus, StoreError, StoredInput,
};
use cib_core::time::Timestamp;
use std::io::Read as _;

use rusqlite::types::Value;
use rusqlite::{Connection, params, params_from_iter};

use crate::error::{corrupt, db, from_sql, query_opt, sql_limit, to_sql};

fn time(value: i64) -> Result<Timestamp, StoreError> {
    from_sql(value).map(Timestamp)
}

fn opt_time(value: Option<i64>) -> Result<Option<Timestamp>, StoreError> {
    value.map(time).transpose()
}

/// The key under which a journaled enqueue names its spec's digest, in place of the text.
pub(crate) const SPEC_DIGEST: &str = "spec_sha256";

/// An input read back from its JSON, with the spec text put back in place of its digest.
/// `specs` keeps the texts already read by this call, since most enqueues share a few specs.
fn input_from_json(
    conn: &Connection,
    json: &str,
    what: &str,
    specs: &mut std::collections::HashMap<String, String>,
) -> Result<Input, StoreError> {
    let mut value: serde_json::Value = serde_json::from_str(json).map_err(|e| corrupt(format!("{what}: {e}")))?;
    if let Some(map) = value.as_object_mut()
        && let Some(serde_json::Value::String(digest)) = map.remove(SPEC_DIGEST)
    {
        let text = match specs.get(&digest) {
            Some(text) => text.clone(),
            None => {
                let text: String =
                    query_opt(conn, "SELECT text FROM specs WHERE sha256 = ?1", params![digest], |r| r.get(0))?
                        .ok_or_else(|| corrupt(format!("{what}: no spec with digest {digest}")))?;
                specs.insert(digest, text.clone());
                text
            }
        };
        map.insert("spec".into(), serde_json::Value::String(text));
    }
    serde_json::from_value(value).map_err(|e| corrupt(format!("{what}: {e}")))
}

pub(crate) fn inputs_after(conn: &Connection, after: u64, limit: usize) -> Result<Vec<(u64, StoredInput)>, StoreError> {
    let after = to_sql(after)?;
    let rows: Vec<(i64, i64, String)> = conn
        .prepare_cached("SELECT seq, at, input FROM inputs WHERE seq > ?1 ORDER BY seq LIMIT ?2")
        .and_then(|mut s| {
            s.query_map(params![after, sql_limit(limit)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
        })
        .map_err(db)?;
    let mut specs = std::collections::HashMap::new();
    rows.into_iter()
        .map(|(seq, at, input)| {
            let input = input_from_json(conn, &input, &format!("input {seq}"), &mut specs)?;
            Ok((from_sql(seq)?, StoredInput { at: time(at)?, input }))
        })
        .collect()
}

pub(crate) fn latest_snapshot(conn: &Connection) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let row: Option<(i64, Vec<u8>)> =
        query_opt(conn, "SELECT seq, data FROM snapshots ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let Some((seq, data)) = row else { return Ok(None) };
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| corrupt(format!("snapshot {seq}: zlib: {e}")))?;
    Ok(Some((from_sql(seq)?, out)))
}

pub(crate) fn enqueued(conn: &Connection, build: &str) -> Result<Option<StoredInput>, StoreError> {
    let row: Option<(i64, String)> =
        query_opt(conn, "SELECT at, input FROM enqueues WHERE build = ?1", params![build], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let Some((at, json)) = row else { return Ok(None) };
    let input = input_from_json(conn, &json, &format!("the enqueue of {build}"), &mut Default::default())?;
    Ok(Some(StoredInput { at: time(at)?, input }))
}

pub(crate) fn events_after(conn: &Connection, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
    let after = to_sql(after)?;
    let rows: Vec<(i64, i64, String)> = conn
        .prepare_cached("SELECT seq, at, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
        .and_then(|mut s| {
            s.query_map(params![after, sql_limit(limit)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
        })
        .map_err(db)?;
    rows.into_iter()
        .map(|(seq, at, body)| {
            let body: EventBody = serde_json::from_str(&body).map_err(|e| corrupt(format!("event {seq}: {e}")))?;
            Ok(Event { seq: from_sql(seq)?, at: time(at)?, body })
        })
        .collect()
}

pub(crate) fn delivery(conn: &Connection, id: &str) -> Result<Option<Delivery>, StoreError> {
    let row: Option<(String, String, i64, Vec<u8>)> =
        query_opt(conn, "SELECT source, event, received_at, body FROM deliveries WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    row.map(|(source, event, received_at, body)| {
        Ok(Delivery { id: id.to_owned(), source, event, received_at: time(received_at)?, body })
    })
    .transpose()
}

pub(crate) fn pending_deliveries(conn: &Connection, limit: usize) -> Result<Vec<Delivery>, StoreError> {
    Ok(due_deliveries(conn, i64::MAX, limit)?.into_iter().map(|(d, _)| d).collect())
}

pub(crate) fn due_deliveries(conn: &Connection, now: i64, limit: usize) -> Result<Vec<(Delivery, u32)>, StoreError> {
    type Row = (String, String, String, i64, Vec<u8>, i64);
    let rows: Vec<Row> = conn
        .prepare_cached(
            "SELECT id, source, event, received_at, body, attempts FROM deliveries
             WHERE done = 0 AND dead = 0 AND next_attempt_at <= ?2
             ORDER BY received_at, id LIMIT ?1",
        )
        .and_then(|mut s| {
            s.query_map(rusqlite::params![sql_limit(limit), now], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?
            .collect()
        })
        .map_err(db)?;
    rows.into_iter()
        .map(|(id, source, event, received_at, body, attempts)| {
            let attempts = u32::try_from(attempts).map_err(|_| corrupt(format!("attempts {attempts}")))?;
            Ok((Delivery { id, source, event, received_at: time(received_at)?, body }, attempts))
        })
        .collect()
}

const SUMMARY_COLUMNS: &str = "id, repo, branch, commit_sha, pipeline, status, queued_at, started_at, finished_at";

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<SummaryRow> {
    Ok(SummaryRow {
        id: r.get(0)?,
        repo: r.get(1)?,
        branch: r.get(2)?,
        commit: r.get(3)?,
        pipeline: r.get(4)?,
        status: r.get(5)?,
        queued_at: r.get(6)?,
        started_at: r.get(7)?,
        finished_at: r.get(8)?,
    })
}

/// A `builds` row before its values are checked.
struct SummaryRow {
    id: String,
    repo: String,
    branch: Option<String>,
    commit: String,
    pipeline: String,
    status: String,
    queued_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

impl SummaryRow {
    fn check(self) -> Result<BuildSummary, StoreError> {
        let status =
            BuildStatus::from_name(&self.status).ok_or_else(|| corrupt(format!("build status {}", self.status)))?;
        Ok(BuildSummary {
            id: BuildId(self.id),
            repo: self.repo,
            branch: self.branch,
            commit: self.commit,
            pipeline: self.pipeline,
            status,
            queued_at: time(self.queued_at)?,
            started_at: opt_time(self.started_at)?,
            finished_at: opt_time(self.finished_at)?,
        })
    }
}

/// Builds newest first. The cursor compares as `(queued_at, id) < (cursor)`, written out with
/// `OR` because row-value comparisons are not everywhere; text compares byte by byte in
/// SQLite, as `String` does in Rust.
pub(crate) fn builds(conn: &Connection, filter: &BuildFilter, page: &Page) -> Result<Vec<BuildSummary>, StoreError> {
    let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM builds WHERE 1 = 1");
    let mut values: Vec<Value> = Vec::new();
    if let Some(repo) = &filter.repo {
        sql.push_str(" AND repo = ?");
        values.push(Value::Text(repo.clone()));
    }
    if let Some(branch) = &filter.branch {
        sql.push_str(" AND branch = ?");
        values.push(Value::Text(branch.clone()));
    }
    if let Some(commit) = &filter.commit {
        sql.push_str(" AND commit_sha = ?");
        values.push(Value::Text(commit.clone()));
    }
    if !filter.statuses.is_empty() {
        let marks = vec!["?"; filter.statuses.len()].join(", ");
        sql.push_str(&format!(" AND status IN ({marks})"));
        values.extend(filter.statuses.iter().map(|s| Value::Text(s.as_str().to_owned())));
    }
    if let Some(from) = filter.queued_from {
        sql.push_str(" AND queued_at >= ?");
        values.push(Value::Integer(to_sql(from.0)?));
    }
    if let Some(until) = filter.queued_until {
        sql.push_str(" AND queued_at < ?");
        values.push(Value::Integer(to_sql(until.0)?));
    }
    if let Some(after) = &page.after {
        let at = to_sql(after.queued_at.0)?;
        sql.push_str(" AND (queued_at < ? OR (queued_at = ? AND id < ?))");
        values.extend([Value::Integer(at), Value::Integer(at), Value::Text(after.id.0.clone())]);
    }
    sql.push_str(" ORDER BY queued_at DESC, id DESC LIMIT ?");
    values.push(Value::Integer(sql_limit(page.limit)));
    let rows: Vec<SummaryRow> = conn
        .prepare_cached(&sql)
        .and_then(|mut s| s.query_map(params_from_iter(values), summary)?.collect())
        .map_err(db)?;
    rows.into_iter().map(SummaryRow::check).collect()
}

pub(crate) fn build(conn: &Connection, id: &BuildId) -> Result<Option<BuildRecord>, StoreError> {
    let sql = format!("SELECT {SUMMARY_COLUMNS} FROM builds WHERE id = ?1");
    let Some(row) = query_opt(conn, &sql, [&id.0], summary)? else { return Ok(None) };
    let build = row.check()?;
    type StepRow = (String, i64, String, Option<String>, Option<i64>, Option<i64>);
    let rows: Vec<StepRow> = conn
        .prepare_cached(
            "SELECT step, attempt, status, detail, started_at, finished_at FROM build_steps
             WHERE build = ?1 ORDER BY ord, attempt",
        )
        .and_then(|mut s| {
            s.query_map([&id.0], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?.collect()
        })
        .map_err(db)?;
    let steps = rows
        .into_iter()
        .map(|(name, attempt, status, detail, started_at, finished_at)| {
            Ok(StepRecord {
                name,
                attempt: u32::try_from(attempt).map_err(|_| corrupt(format!("attempt {attempt}")))?,
                status: StepRecordStatus::from_name(&status).ok_or_else(|| corrupt(format!("step status {status}")))?,
                detail,
                started_at: opt_time(started_at)?,
                finished_at: opt_time(finished_at)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(Some(BuildRecord { build, steps }))
}

pub(crate) fn deliveries(
    conn: &Connection,
    state: Option<DeliveryState>,
    limit: usize,
) -> Result<Vec<DeliveryInfo>, StoreError> {
    type Row = (String, String, String, i64, i64, i64, i64, i64, Option<String>);
    let filter = match state {
        None => "1 = 1",
        Some(DeliveryState::Pending) => "done = 0 AND dead = 0",
        Some(DeliveryState::Done) => "done = 1",
        Some(DeliveryState::Dead) => "done = 0 AND dead = 1",
    };
    let sql = format!(
        "SELECT id, source, event, received_at, done, dead, attempts, next_attempt_at, reason FROM deliveries
         WHERE {filter} ORDER BY received_at DESC, id DESC LIMIT ?1"
    );
    let rows: Vec<Row> = conn
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map([sql_limit(limit)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?))
            })?
            .collect()
        })
        .map_err(db)?;
    rows.into_iter()
        .map(|(id, source, event, received_at, done, dead, attempts, next, reason)| {
            let state = match (done, dead) {
                (1, _) => DeliveryState::Done,
                (_, 1) => DeliveryState::Dead,
                _ => DeliveryState::Pending,
            };
            Ok(DeliveryInfo {
                id,
                source,
                event,
                received_at: time(received_at)?,
                state,
                attempts: u32::try_from(attempts).map_err(|_| corrupt(format!("attempts {attempts}")))?,
                next_attempt_at: time(next)?,
                reason,
            })
        })
        .collect()
}

pub(crate) fn inbox_depth(conn: &Connection) -> Result<InboxDepth, StoreError> {
    let (pending, dead, oldest): (i64, i64, Option<i64>) = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(CASE WHEN done = 0 AND dead = 0 THEN 1 ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN done = 0 AND dead = 1 THEN 1 ELSE 0 END), 0),
                    MIN(CASE WHEN done = 0 AND dead = 0 THEN received_at END)
             FROM deliveries WHERE done = 0",
        )
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
        .map_err(db)?;
    Ok(InboxDepth { pending: from_sql(pending)?, dead: from_sql(dead)?, oldest_pending: oldest.map(time).transpose()? })
}

pub(crate) fn last_event_seq(conn: &Connection) -> Result<u64, StoreError> {
    let last: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db)?;
    from_sql(last)
}

pub(crate) fn webhook_cursor(conn: &Connection, receiver: &str) -> Result<Option<u64>, StoreError> {
    let seq: Option<i64> =
        query_opt(conn, "SELECT seq FROM webhook_cursors WHERE receiver = ?1", [receiver], |r| r.get(0))?;
    seq.map(from_sql).transpose()
}

pub(crate) fn session(conn: &Connection, digest: &str) -> Result<Option<cib_core::ports::SessionRecord>, StoreError> {
    let row: Option<(String, i64, i64)> = query_opt(
        conn,
        "SELECT token_name, created_at, last_seen FROM web_sessions WHERE digest = ?1",
        [digest],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    row.map(|(token_name, created, seen)| {
        Ok(cib_core::ports::SessionRecord {
            token_name,
            created_at: cib_core::time::Timestamp(from_sql(created)?),
            last_seen: cib_core::time::Timestamp(from_sql(seen)?),
        })
    })
    .transpose()
}

/// Artifact records matching a condition on the `artifacts` table, newest first.
pub(crate) fn artifacts_where(
    conn: &Connection,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<cib_core::ports::ArtifactRecord>, StoreError> {
    let sql = format!(
        "SELECT build, name, repo, commit_sha, pipeline, trusted, sha256, size, files, created_at, expires_at \
         FROM artifacts WHERE {condition} ORDER BY created_at DESC, build DESC, name"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(db)?;
    let rows = stmt
        .query_map(params, |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?),
                (r.get::<_, String>(4)?, r.get::<_, i64>(5)?, r.get::<_, String>(6)?),
                (r.get::<_, i64>(7)?, r.get::<_, i64>(8)?, r.get::<_, i64>(9)?, r.get::<_, i64>(10)?),
            ))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for row in rows {
        let ((build, name, repo, commit), (pipeline, trusted, sha256), (size, files, created, expires)) =
            row.map_err(db)?;
        out.push(cib_core::ports::ArtifactRecord {
            build: cib_core::event::BuildId(build),
            name,
            repo,
            commit,
            pipeline,
            trusted: trusted != 0,
            sha256,
            size: from_sql(size)?,
            files: from_sql(files)?,
            created_at: cib_core::time::Timestamp(from_sql(created)?),
            expires_at: cib_core::time::Timestamp(from_sql(expires)?),
        });
    }
    Ok(out)
}
