//! Logs as batched, compressed chunks with byte offsets, kept within a per-step limit.
//!
//! A log's bytes are numbered by the offset at which the step printed them. The store keeps
//! the head (offsets below `head_limit`) and the tail (the last `tail_limit` bytes) as rows of
//! `log_chunks`, each covering `start_offset..end_offset`; chunks never cross the head's end,
//! so the head stays put while the tail moves.
//!
//! Output arrives in small pieces (a line, a few lines), and compressing each alone would
//! compress badly and leave millions of rows. So a piece is first stored raw (`codec` 0), and
//! once a log's raw bytes reach the chunk size they are compressed together into chunks of
//! that size (`codec` 1) in the same transaction. Raw rows are always the newest rows of a log
//! (from `raw_from` on), which lets compaction find them with one range scan. Each byte is
//! written raw once and compressed once, whatever the size of the pieces.
//!
//! Past the limit, every append moves the tail: chunks that end before the kept tail starts
//! are deleted, and the one that straddles it stays whole until it falls out too, so the file
//! holds at most one chunk more than the limit. Reads skip the part of that chunk that is no
//! longer kept, and show the omitted range as a marker line.

use std::io::{Read, Write};

use cib_core::ports::{LogKey, LogLimit, LogRead, StoreError};
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{corrupt, db, exec, from_sql, query_opt, to_sql};

/// Chunk codecs.
pub(crate) const RAW: i64 = 0;
pub(crate) const ZLIB: i64 = 1;

/// How logs are written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogConfig {
    pub limit: LogLimit,
    /// Uncompressed bytes per compressed chunk.
    pub chunk: usize,
    /// zlib's level, 0 to 9.
    pub level: u32,
}

/// A log's row in `logs`.
#[derive(Debug)]
struct Meta {
    length: u64,
    limit: LogLimit,
    raw_from: Option<u64>,
    raw_bytes: u64,
    finished: bool,
}

/// The key's columns, in the order every query here takes them.
fn key_params(key: &LogKey) -> (&str, &str, i64) {
    (key.build.0.as_str(), key.step.as_str(), i64::from(key.attempt))
}

fn load(conn: &Connection, key: &LogKey) -> Result<Option<Meta>, StoreError> {
    let (build, step, attempt) = key_params(key);
    let row = query_opt(
        conn,
        "SELECT length, head_limit, tail_limit, raw_from, raw_bytes, finished FROM logs
         WHERE build = ?1 AND step = ?2 AND attempt = ?3",
        (build, step, attempt),
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        },
    )?;
    let Some((length, head, tail, raw_from, raw_bytes, finished)) = row else { return Ok(None) };
    Ok(Some(Meta {
        length: from_sql(length)?,
        limit: LogLimit { head: from_sql(head)?, tail: from_sql(tail)? },
        raw_from: raw_from.map(from_sql).transpose()?,
        raw_bytes: from_sql(raw_bytes)?,
        finished: finished != 0,
    }))
}

/// The log's row, made when the log is first written, with the limit in force then.
fn load_or_create(conn: &Connection, config: &LogConfig, key: &LogKey) -> Result<Meta, StoreError> {
    if let Some(meta) = load(conn, key)? {
        return Ok(meta);
    }
    let (build, step, attempt) = key_params(key);
    let (head, tail) = (to_sql(config.limit.head)?, to_sql(config.limit.tail)?);
    exec(
        conn,
        "INSERT INTO logs (build, step, attempt, length, head_limit, tail_limit, raw_from, raw_bytes, finished)
         VALUES (?1, ?2, ?3, 0, ?4, ?5, NULL, 0, 0)",
        params![build, step, attempt, head, tail],
    )?;
    Ok(Meta { length: 0, limit: config.limit, raw_from: None, raw_bytes: 0, finished: false })
}

fn save(conn: &Connection, key: &LogKey, meta: &Meta) -> Result<(), StoreError> {
    let (build, step, attempt) = key_params(key);
    let raw_from = meta.raw_from.map(to_sql).transpose()?;
    let (length, raw_bytes) = (to_sql(meta.length)?, to_sql(meta.raw_bytes)?);
    exec(
        conn,
        "UPDATE logs SET length = ?4, raw_from = ?5, raw_bytes = ?6, finished = ?7
         WHERE build = ?1 AND step = ?2 AND attempt = ?3",
        params![build, step, attempt, length, raw_from, raw_bytes, i64::from(meta.finished)],
    )?;
    Ok(())
}

fn insert_chunk(
    conn: &Connection,
    key: &LogKey,
    start: u64,
    codec: i64,
    raw_len: usize,
    data: &[u8],
) -> Result<(), StoreError> {
    let (build, step, attempt) = key_params(key);
    let (end, start) = (to_sql(start + raw_len as u64)?, to_sql(start)?);
    exec(
        conn,
        "INSERT INTO log_chunks (build, step, attempt, start_offset, end_offset, codec, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![build, step, attempt, start, end, codec, data],
    )?;
    Ok(())
}

pub(crate) fn compress(data: &[u8], level: u32) -> Result<Vec<u8>, StoreError> {
    let mut encoder = ZlibEncoder::new(Vec::with_capacity(data.len() / 4 + 64), Compression::new(level));
    encoder.write_all(data).and_then(|()| encoder.finish()).map_err(|e| StoreError::Permanent(format!("zlib: {e}")))
}

/// A chunk's bytes, checked against the length its offsets say it has.
pub(crate) fn decode(codec: i64, data: Vec<u8>, length: u64) -> Result<Vec<u8>, StoreError> {
    let bytes = match codec {
        RAW => data,
        ZLIB => {
            let mut out = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
            // One byte more than expected is enough to tell a wrong length from a right one,
            // without inflating whatever a damaged chunk claims to hold.
            ZlibDecoder::new(data.as_slice())
                .take(length.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|e| corrupt(format!("zlib: {e}")))?;
            out
        }
        other => return Err(corrupt(format!("unknown log codec {other}"))),
    };
    if bytes.len() as u64 != length {
        return Err(corrupt(format!("a log chunk holds {} bytes instead of {length}", bytes.len())));
    }
    Ok(bytes)
}

/// Stores `bytes`, printed at `offset`, as raw or compressed chunks, keeping raw rows the
/// newest of the log.
fn store(
    conn: &Connection,
    config: &LogConfig,
    key: &LogKey,
    meta: &mut Meta,
    offset: u64,
    bytes: &[u8],
) -> Result<(), StoreError> {
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.len() >= config.chunk {
        // A large piece is compressed straight away; what is pending goes first, so that raw
        // rows stay the newest.
        compact(conn, config, key, meta)?;
        let mut pieces = bytes.chunks(config.chunk).peekable();
        let mut at = offset;
        while let Some(piece) = pieces.next() {
            if pieces.peek().is_none() && piece.len() < config.chunk {
                return store(conn, config, key, meta, at, piece);
            }
            insert_chunk(conn, key, at, ZLIB, piece.len(), &compress(piece, config.level)?)?;
            at += piece.len() as u64;
        }
        return Ok(());
    }
    insert_chunk(conn, key, offset, RAW, bytes.len(), bytes)?;
    meta.raw_from = Some(meta.raw_from.map_or(offset, |from| from.min(offset)));
    meta.raw_bytes += bytes.len() as u64;
    if meta.raw_bytes >= config.chunk as u64 {
        compact(conn, config, key, meta)?;
    }
    Ok(())
}

/// Compresses the log's raw rows into chunks. Rows are joined while they are contiguous and
/// on the same side of the head's end, so a chunk never spans a gap or the head's end.
fn compact(conn: &Connection, config: &LogConfig, key: &LogKey, meta: &mut Meta) -> Result<(), StoreError> {
    let Some(raw_from) = meta.raw_from.filter(|_| meta.raw_bytes > 0) else {
        meta.raw_from = None;
        meta.raw_bytes = 0;
        return Ok(());
    };
    let (build, step, attempt) = key_params(key);
    let from = to_sql(raw_from)?;
    let rows: Vec<(i64, i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT start_offset, end_offset, data FROM log_chunks
             WHERE build = ?1 AND step = ?2 AND attempt = ?3 AND start_offset >= ?4 AND codec = 0
             ORDER BY start_offset",
        )
        .and_then(|mut s| {
            s.query_map(params![build, step, attempt, from], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(db)?;
    exec(
        conn,
        "DELETE FROM log_chunks
         WHERE build = ?1 AND step = ?2 AND attempt = ?3 AND start_offset >= ?4 AND codec = 0",
        params![build, step, attempt, from],
    )?;

    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    for (start, end, data) in rows {
        let (start, end) = (from_sql(start)?, from_sql(end)?);
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
            insert_chunk(conn, key, at, ZLIB, piece.len(), &compress(piece, config.level)?)?;
            at += piece.len() as u64;
        }
    }
    meta.raw_from = None;
    meta.raw_bytes = 0;
    Ok(())
}

/// Deletes the chunks of the tail that end before the kept tail starts. Only chunks that start
/// in the tail's region qualify, so the head is never touched.
fn evict(conn: &Connection, key: &LogKey, meta: &mut Meta) -> Result<(), StoreError> {
    let Some(gap) = meta.limit.omitted(meta.length) else { return Ok(()) };
    let (build, step, attempt) = key_params(key);
    let (head, kept) = (to_sql(gap.start)?, to_sql(gap.end)?);
    let raw_evicted: i64 = query_opt(
        conn,
        "SELECT COALESCE(SUM(end_offset - start_offset), 0) FROM log_chunks
         WHERE build = ?1 AND step = ?2 AND attempt = ?3
           AND start_offset >= ?4 AND start_offset < ?5 AND end_offset <= ?5 AND codec = 0",
        params![build, step, attempt, head, kept],
        |r| r.get(0),
    )?
    .unwrap_or(0);
    exec(
        conn,
        "DELETE FROM log_chunks
         WHERE build = ?1 AND step = ?2 AND attempt = ?3
           AND start_offset >= ?4 AND start_offset < ?5 AND end_offset <= ?5",
        params![build, step, attempt, head, kept],
    )?;
    meta.raw_bytes = meta.raw_bytes.saturating_sub(from_sql(raw_evicted)?);
    Ok(())
}

/// Appends output to a log inside the caller's transaction and returns the log's new length.
pub(crate) fn append(conn: &Connection, config: &LogConfig, key: &LogKey, data: &[u8]) -> Result<u64, StoreError> {
    let mut meta = load_or_create(conn, config, key)?;
    if meta.finished {
        return Err(StoreError::Permanent(format!(
            "the log of {}/{}#{} is finished",
            key.build, key.step, key.attempt
        )));
    }
    let old = meta.length;
    let new = old + data.len() as u64;
    let limit = meta.limit;
    // The head takes what fits below its end.
    let head_room = usize::try_from(limit.head.saturating_sub(old)).unwrap_or(usize::MAX).min(data.len());
    store(conn, config, key, &mut meta, old, &data[..head_room])?;
    // Of the rest, only what lies in the tail that will be kept is worth writing.
    let keep_from = limit.tail_start(new).max(old + head_room as u64);
    let skip = usize::try_from(keep_from - old).unwrap_or(usize::MAX).min(data.len());
    store(conn, config, key, &mut meta, keep_from, &data[skip..])?;
    meta.length = new;
    evict(conn, key, &mut meta)?;
    save(conn, key, &meta)?;
    Ok(new)
}

/// Marks a log finished, compressing what is still raw. Finishing twice is harmless.
pub(crate) fn finish(conn: &Connection, config: &LogConfig, key: &LogKey) -> Result<(), StoreError> {
    let mut meta = load_or_create(conn, config, key)?;
    if meta.finished {
        return Ok(());
    }
    compact(conn, config, key, &mut meta)?;
    meta.finished = true;
    save(conn, key, &meta)
}

/// Reads a range of a log, as [`cib_core::ports::Store::read_log`] says, inside the caller's
/// read transaction so that the length and the chunks agree.
pub(crate) fn read(conn: &Connection, key: &LogKey, offset: u64, max: usize) -> Result<LogRead, StoreError> {
    let Some(meta) = load(conn, key)? else {
        return Ok(LogRead { data: Vec::new(), next_offset: 0, complete: false });
    };
    let (build, step, attempt) = key_params(key);
    let length = meta.length;
    let mut chunk_at = conn
        .prepare_cached(
            "SELECT start_offset, end_offset, codec, data FROM log_chunks
             WHERE build = ?1 AND step = ?2 AND attempt = ?3 AND start_offset <= ?4
             ORDER BY start_offset DESC LIMIT 1",
        )
        .map_err(db)?;
    let (data, pos) = meta.limit.read(length, offset, max, |pos, stop, data| {
        let at = to_sql(pos)?;
        let chunk = chunk_at
            .query_row(params![build, step, attempt, at], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, Vec<u8>>(3)?))
            })
            .optional()
            .map_err(db)?;
        let Some((start, end, codec, bytes)) = chunk else {
            return Err(corrupt(format!("no chunk holds offset {pos} of {}/{}#{}", key.build, key.step, key.attempt)));
        };
        let (start, end) = (from_sql(start)?, from_sql(end)?);
        if end <= pos || start > pos {
            return Err(corrupt(format!("no chunk holds offset {pos} of {}/{}#{}", key.build, key.step, key.attempt)));
        }
        let bytes = decode(codec, bytes, end - start)?;
        let to = stop.min(end);
        data.extend_from_slice(&bytes[(pos - start) as usize..(to - start) as usize]);
        Ok(to)
    })?;
    Ok(LogRead { data, next_offset: pos, complete: meta.finished && pos == length })
}
