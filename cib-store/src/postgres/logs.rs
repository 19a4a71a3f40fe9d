//! Logs on PostgreSQL: the same chunks as SQLite's (`crate::logs` explains the scheme: raw rows
//! for small pieces, compressed into zlib chunks of the chunk size, a head and a moving tail
//! within the limit), in `BYTEA`, so that `cib store copy` moves chunks as they are.
//!
//! What differs: SQLite has one writer thread, so a log's row is read and written without a
//! lock; here several connections (and several servers) may append at once, so an append
//! locks the log's row (`FOR UPDATE`) for its transaction. And a read cannot call back into a
//! synchronous connection for each chunk, so it first works out which ranges it will copy
//! (running [`LogLimit::read`] without data), fetches the chunks that hold them in one query,
//! and then runs it for real over them.

use cib_core::ports::{LogKey, LogLimit, LogRead, StoreError};

use super::Sql;
use crate::error::{corrupt, from_sql, to_sql};
// The chunks' codecs and their coding are SQLite's own, so a copied store reads the same.
use crate::logs::{LogConfig, RAW, ZLIB, compress, decode};

#[derive(Debug)]
struct Meta {
    length: u64,
    limit: LogLimit,
    raw_from: Option<u64>,
    raw_bytes: u64,
    finished: bool,
}

fn key_params(key: &LogKey) -> (&str, &str, i64) {
    (key.build.0.as_str(), key.step.as_str(), i64::from(key.attempt))
}

async fn load(c: &impl Sql, key: &LogKey, lock: bool) -> Result<Option<Meta>, StoreError> {
    let (build, step, attempt) = key_params(key);
    let sql = if lock {
        "SELECT length, head_limit, tail_limit, raw_from, raw_bytes, finished FROM logs
         WHERE build = $1 AND step = $2 AND attempt = $3 FOR UPDATE"
    } else {
        "SELECT length, head_limit, tail_limit, raw_from, raw_bytes, finished FROM logs
         WHERE build = $1 AND step = $2 AND attempt = $3"
    };
    let Some(row) = c.opt(sql, &[&build, &step, &attempt]).await? else { return Ok(None) };
    Ok(Some(Meta {
        length: from_sql(row.get(0))?,
        limit: LogLimit { head: from_sql(row.get(1))?, tail: from_sql(row.get(2))? },
        raw_from: row.get::<_, Option<i64>>(3).map(from_sql).transpose()?,
        raw_bytes: from_sql(row.get(4))?,
        finished: row.get::<_, i64>(5) != 0,
    }))
}

/// The log's row, locked for this transaction, made with the limit in force when it is new.
async fn load_or_create(c: &impl Sql, config: &LogConfig, key: &LogKey) -> Result<Meta, StoreError> {
    let (build, step, attempt) = key_params(key);
    let (head, tail) = (to_sql(config.limit.head)?, to_sql(config.limit.tail)?);
    // Two appenders of a new log both insert; one row wins and both then lock it.
    c.exec(
        "INSERT INTO logs (build, step, attempt, length, head_limit, tail_limit, raw_from, raw_bytes, finished)
         VALUES ($1, $2, $3, 0, $4, $5, NULL, 0, 0) ON CONFLICT DO NOTHING",
        &[&build, &step, &attempt, &head, &tail],
    )
    .await?;
    load(c, key, true).await?.ok_or_else(|| corrupt(format!("the log of {}/{}#{} vanished", build, step, attempt)))
}

async fn save(c: &impl Sql, key: &LogKey, meta: &Meta) -> Result<(), StoreError> {
    let (build, step, attempt) = key_params(key);
    let raw_from = meta.raw_from.map(to_sql).transpose()?;
    let (length, raw_bytes, finished) = (to_sql(meta.length)?, to_sql(meta.raw_bytes)?, i64::from(meta.finished));
    c.exec(
        "UPDATE logs SET length = $4, raw_from = $5, raw_bytes = $6, finished = $7
         WHERE build = $1 AND step = $2 AND attempt = $3",
        &[&build, &step, &attempt, &length, &raw_from, &raw_bytes, &finished],
    )
    .await?;
    Ok(())
}

async fn insert_chunk(
    c: &impl Sql,
    key: &LogKey,
    start: u64,
    codec: i64,
    raw_len: usize,
    data: &[u8],
) -> Result<(), StoreError> {
    let (build, step, attempt) = key_params(key);
    let (end, start) = (to_sql(start + raw_len as u64)?, to_sql(start)?);
    c.exec(
        "INSERT INTO log_chunks (build, step, attempt, start_offset, end_offset, codec, data)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&build, &step, &attempt, &start, &end, &codec, &data],
    )
    .await?;
    Ok(())
}

/// Stores `bytes`, printed at `offset`, as raw or compressed chunks (see `crate::logs::store`).
async fn store(
    c: &impl Sql,
    config: &LogConfig,
    key: &LogKey,
    meta: &mut Meta,
    offset: u64,
    bytes: &[u8],
) -> Result<(), StoreError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut at = offset;
    let mut rest = bytes;
    if rest.len() >= config.chunk {
        compact(c, config, key, meta).await?;
        while rest.len() >= config.chunk {
            let (piece, tail) = rest.split_at(config.chunk);
            insert_chunk(c, key, at, ZLIB, piece.len(), &compress(piece, config.level)?).await?;
            at += piece.len() as u64;
            rest = tail;
        }
        if rest.is_empty() {
            return Ok(());
        }
    }
    insert_chunk(c, key, at, RAW, rest.len(), rest).await?;
    meta.raw_from = Some(meta.raw_from.map_or(at, |from| from.min(at)));
    meta.raw_bytes += rest.len() as u64;
    if meta.raw_bytes >= config.chunk as u64 {
        compact(c, config, key, meta).await?;
    }
    Ok(())
}

/// Compresses the log's raw rows into chunks (see `crate::logs::compact`).
async fn compact(c: &impl Sql, config: &LogConfig, key: &LogKey, meta: &mut Meta) -> Result<(), StoreError> {
    let Some(raw_from) = meta.raw_from.filter(|_| meta.raw_bytes > 0) else {
        meta.raw_from = None;
        meta.raw_bytes = 0;
        return Ok(());
    };
    let (build, step, attempt) = key_params(key);
    let from = to_sql(raw_from)?;
    let rows = c
        .rows(
            "DELETE FROM log_chunks
             WHERE build = $1 AND step = $2 AND attempt = $3 AND start_offset >= $4 AND codec = 0
             RETURNING start_offset, end_offset, data",
            &[&build, &step, &attempt, &from],
        )
        .await?;
    let mut pieces = Vec::with_capacity(rows.len());
    for row in rows {
        let (start, end, data): (i64, i64, Vec<u8>) = (row.get(0), row.get(1), row.get(2));
        pieces.push((from_sql(start)?, from_sql(end)?, data));
    }
    // RETURNING gives no order.
    pieces.sort_by_key(|p| p.0);
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    for (start, end, data) in pieces {
        if end.checked_sub(start) != Some(data.len() as u64) {
            return Err(corrupt(format!("a raw log chunk at {start}..{end} holds {} bytes", data.len())));
        }
        match runs.last_mut() {
            Some((run_start, run)) if *run_start + run.len() as u64 == start && start != meta.limit.head => {
                run.extend_from_slice(&data);
            }
            _ => runs.push((start, data)),
        }
    }
    for (start, run) in runs {
        let mut at = start;
        for piece in run.chunks(config.chunk) {
            insert_chunk(c, key, at, ZLIB, piece.len(), &compress(piece, config.level)?).await?;
            at += piece.len() as u64;
        }
    }
    meta.raw_from = None;
    meta.raw_bytes = 0;
    Ok(())
}

/// Deletes the tail's chunks that end before the kept tail starts (see `crate::logs::evict`).
async fn evict(c: &impl Sql, key: &LogKey, meta: &mut Meta) -> Result<(), StoreError> {
    let Some(gap) = meta.limit.omitted(meta.length) else { return Ok(()) };
    let (build, step, attempt) = key_params(key);
    let (head, kept) = (to_sql(gap.start)?, to_sql(gap.end)?);
    let row = c
        .opt(
            "WITH gone AS (
                 DELETE FROM log_chunks
                 WHERE build = $1 AND step = $2 AND attempt = $3
                   AND start_offset >= $4 AND start_offset < $5 AND end_offset <= $5
                 RETURNING end_offset - start_offset AS bytes, codec)
             SELECT COALESCE(SUM(bytes) FILTER (WHERE codec = 0), 0)::BIGINT FROM gone",
            &[&build, &step, &attempt, &head, &kept],
        )
        .await?;
    let raw_evicted: i64 = row.map_or(0, |r| r.get(0));
    meta.raw_bytes = meta.raw_bytes.saturating_sub(from_sql(raw_evicted)?);
    Ok(())
}

/// Appends output to a log inside the caller's transaction; returns the log's new length.
pub(super) async fn append(c: &impl Sql, config: &LogConfig, key: &LogKey, data: &[u8]) -> Result<u64, StoreError> {
    let mut meta = load_or_create(c, config, key).await?;
    if meta.finished {
        return Err(StoreError::Permanent(format!(
            "the log of {}/{}#{} is finished",
            key.build, key.step, key.attempt
        )));
    }
    let old = meta.length;
    let new = old + data.len() as u64;
    let limit = meta.limit;
    let head_room = usize::try_from(limit.head.saturating_sub(old)).unwrap_or(usize::MAX).min(data.len());
    store(c, config, key, &mut meta, old, &data[..head_room]).await?;
    let keep_from = limit.tail_start(new).max(old + head_room as u64);
    let skip = usize::try_from(keep_from - old).unwrap_or(usize::MAX).min(data.len());
    store(c, config, key, &mut meta, keep_from, &data[skip..]).await?;
    meta.length = new;
    evict(c, key, &mut meta).await?;
    save(c, key, &meta).await?;
    Ok(new)
}

/// Marks a log finished, compressing what is still raw. Finishing twice is harmless.
pub(super) async fn finish(c: &impl Sql, config: &LogConfig, key: &LogKey) -> Result<(), StoreError> {
    let mut meta = load_or_create(c, config, key).await?;
    if meta.finished {
        return Ok(());
    }
    compact(c, config, key, &mut meta).await?;
    meta.finished = true;
    save(c, key, &meta).await
}

/// Reads a range of a log inside the caller's (repeatable-read) transaction.
pub(super) async fn read(c: &impl Sql, key: &LogKey, offset: u64, max: usize) -> Result<LogRead, StoreError> {
    let Some(meta) = load(c, key, false).await? else {
        return Ok(LogRead { data: Vec::new(), next_offset: 0, complete: false });
    };
    let length = meta.length;
    // First, which ranges the read copies: a dry run whose copy takes whole ranges.
    let mut ranges = Vec::new();
    // Its copy adds as many placeholder bytes as the real one would, so that it stops where
    // the real read stops.
    meta.limit.read(length, offset, max, |pos, stop, data| -> Result<u64, StoreError> {
        ranges.push((pos, stop));
        data.resize(data.len() + usize::try_from(stop - pos).unwrap_or(0), 0);
        Ok(stop)
    })?;
    let mut chunks: Vec<(u64, u64, Vec<u8>)> = Vec::new();
    let (build, step, attempt) = key_params(key);
    for (from, to) in ranges {
        let (from_sql_, to_sql_) = (to_sql(from)?, to_sql(to)?);
        // The chunk that holds `from` starts at or before it; the others start before `to`.
        let rows = c
            .rows(
                "SELECT start_offset, end_offset, codec, data FROM log_chunks
                 WHERE build = $1 AND step = $2 AND attempt = $3 AND start_offset < $5
                   AND start_offset >= COALESCE((SELECT MAX(start_offset) FROM log_chunks
                       WHERE build = $1 AND step = $2 AND attempt = $3 AND start_offset <= $4), 0)
                 ORDER BY start_offset",
                &[&build, &step, &attempt, &from_sql_, &to_sql_],
            )
            .await?;
        for row in rows {
            let (start, end) = (from_sql(row.get(0))?, from_sql(row.get(1))?);
            if end <= start {
                return Err(corrupt(format!("an empty log chunk at {start} of {}/{}#{}", build, step, attempt)));
            }
            let bytes = decode(row.get(2), row.get(3), end - start)?;
            chunks.push((start, end, bytes));
        }
    }
    chunks.sort_by_key(|c| c.0);
    chunks.dedup_by_key(|c| c.0);
    let (data, pos) = meta.limit.read(length, offset, max, |pos, stop, data| {
        // The chunk holding `pos`: the last one that starts at or before it.
        let i = chunks.partition_point(|c| c.0 <= pos);
        let Some((start, end, bytes)) = i.checked_sub(1).map(|i| &chunks[i]) else {
            return Err(corrupt(format!("no chunk holds offset {pos} of {}/{}#{}", key.build, key.step, key.attempt)));
        };
        if *end <= pos {
            return Err(corrupt(format!("no chunk holds offset {pos} of {}/{}#{}", key.build, key.step, key.attempt)));
        }
        let to = stop.min(*end);
        data.extend_from_slice(&bytes[(pos - start) as usize..(to - start) as usize]);
        Ok(to)
    })?;
    Ok(LogRead { data, next_offset: pos, complete: meta.finished && pos == length })
}
