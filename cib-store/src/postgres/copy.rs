//! `cib store copy`: a SQLite store copied into an empty PostgreSQL database, table by table,
//! in one PostgreSQL transaction, and checked before it commits.
//!
//! The tables are the same on both sides (same schema version, see `schema.rs`), so a row is
//! moved as it is: the journal, snapshots, build records, log chunks (still compressed), the
//! inbox, and secrets still sealed (their nonce and ciphertext are bytes; the key stays where
//! it was, and opens them on PostgreSQL as on SQLite, since the sealing binds a value to its
//! repository and name, not to a database).
//!
//! The check: for every table, the number of rows and a SHA-256 over every value of every row,
//! in primary-key order, computed from SQLite while the rows are sent and from PostgreSQL after
//! they are written, inside the transaction. A difference rolls everything back, so the target
//! is either a checked copy or left empty. A target that holds anything is refused before a row
//! is written.
//!
//! SQLite is read on a thread of its own (rusqlite is synchronous), in one read transaction,
//! so the copy is of one committed state even if a server still writes to the file; rows reach
//! PostgreSQL through a bounded channel and binary `COPY`.

use std::path::Path;

use cib_core::ports::StoreError;
use futures_util::{StreamExt as _, pin_mut};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::{PgOptions, PgStore, db};

/// A column's type, the same on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Int,
    Text,
    Bytes,
}

/// A table: its name, its columns with their types, and the order that makes its rows' digest
/// the same on both sides.
type Table = (&'static str, &'static [(&'static str, Ty)], &'static str);

/// Every table of the schema (but `schema_version`, which each database keeps for itself).
const TABLES: &[Table] = {
    use Ty::{Bytes as B, Int as I, Text as T};
    &[
        ("inputs", &[("seq", I), ("at", I), ("input", T)], "seq"),
        ("snapshots", &[("seq", I), ("at", I), ("data", B)], "seq"),
        ("specs", &[("sha256", T), ("text", T)], "sha256"),
        ("enqueues", &[("build", T), ("at", I), ("input", T)], "build"),
        ("events", &[("seq", I), ("at", I), ("build", T), ("body", T)], "seq"),
        (
            "deliveries",
            &[
                ("id", T),
                ("source", T),
                ("event", T),
                ("received_at", I),
                ("body", B),
                ("done", I),
                ("attempts", I),
                ("next_attempt_at", I),
                ("dead", I),
                ("reason", T),
                ("body_sha256", B),
            ],
            "id",
        ),
        ("delivery_digests", &[("digest", B), ("received_at", I)], "received_at, digest"),
        (
            "builds",
            &[
                ("id", T),
                ("repo", T),
                ("branch", T),
                ("commit_sha", T),
                ("pipeline", T),
                ("status", T),
                ("queued_at", I),
                ("started_at", I),
                ("finished_at", I),
            ],
            "id",
        ),
        (
            "build_steps",
            &[
                ("build", T),
                ("step", T),
                ("attempt", I),
                ("ord", I),
                ("status", T),
                ("detail", T),
                ("started_at", I),
                ("finished_at", I),
            ],
            "build, step, attempt",
        ),
        (
            "logs",
            &[
                ("build", T),
                ("step", T),
                ("attempt", I),
                ("length", I),
                ("head_limit", I),
                ("tail_limit", I),
                ("raw_from", I),
                ("raw_bytes", I),
                ("finished", I),
            ],
            "build, step, attempt",
        ),
        (
            "log_chunks",
            &[
                ("build", T),
                ("step", T),
                ("attempt", I),
                ("start_offset", I),
                ("end_offset", I),
                ("codec", I),
                ("data", B),
            ],
            "build, step, attempt, start_offset",
        ),
        (
            "log_times",
            &[("build", T), ("step", T), ("attempt", I), ("start_offset", I), ("at", I)],
            "build, step, attempt, start_offset",
        ),
        (
            "secrets",
            &[("repo", T), ("name", T), ("scope", T), ("nonce", B), ("ciphertext", B), ("set_at", I), ("set_by", T)],
            "repo, name",
        ),
        ("webhook_cursors", &[("receiver", T), ("seq", I)], "receiver"),
        ("web_sessions", &[("digest", T), ("token_name", T), ("created_at", I), ("last_seen", I)], "digest"),
        (
            "artifacts",
            &[
                ("build", T),
                ("name", T),
                ("repo", T),
                ("commit_sha", T),
                ("pipeline", T),
                ("trusted", I),
                ("sha256", T),
                ("size", I),
                ("files", I),
                ("created_at", I),
                ("expires_at", I),
            ],
            "build, name",
        ),
    ]
};

/// What was copied of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopy {
    pub table: &'static str,
    pub rows: u64,
    /// The SHA-256 of the table's rows, the same from both databases.
    pub sha256: String,
}

/// What a copy did: every table, in the order copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub tables: Vec<TableCopy>,
}

impl CopyReport {
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

/// One value, as both sides hold it.
#[derive(Debug, Clone)]
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl Value {
    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Value::Int(v) => v,
            Value::Text(v) => v,
            Value::Bytes(v) => v,
        }
    }

    /// Feeds the value to a digest with its kind and length, so that no two rows hash alike
    /// by running into each other.
    fn hash(&self, h: &mut Sha256) {
        let (tag, bytes): (u8, Option<Vec<u8>>) = match self {
            Value::Int(v) => (b'i', v.map(|v| v.to_be_bytes().to_vec())),
            Value::Text(v) => (b't', v.as_ref().map(|v| v.as_bytes().to_vec())),
            Value::Bytes(v) => (b'b', v.clone()),
        };
        h.update([tag]);
        match bytes {
            None => h.update([0]),
            Some(bytes) => {
                h.update([1]);
                h.update((bytes.len() as u64).to_be_bytes());
                h.update(&bytes);
            }
        }
    }
}

/// What the SQLite reader sends.
enum Message {
    Row(Vec<Value>),
    /// A table is done: its row count and digest.
    End(u64, String),
}

fn select(table: &str, columns: &[(&str, Ty)], order: &str) -> String {
    let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
    format!("SELECT {} FROM {table} ORDER BY {order}", names.join(", "))
}

fn sqlite_value(row: &rusqlite::Row<'_>, i: usize, ty: Ty, table: &str) -> Result<Value, StoreError> {
    use rusqlite::types::ValueRef;
    let value = row.get_ref(i).map_err(crate::error::db)?;
    let wrong = || crate::error::corrupt(format!("{table}: column {i} holds {value:?}, not {ty:?}"));
    Ok(match (ty, value) {
        (Ty::Int, ValueRef::Null) => Value::Int(None),
        (Ty::Int, ValueRef::Integer(v)) => Value::Int(Some(v)),
        (Ty::Text, ValueRef::Null) => Value::Text(None),
        (Ty::Text, ValueRef::Text(v)) => Value::Text(Some(String::from_utf8(v.to_vec()).map_err(|_| wrong())?)),
        (Ty::Bytes, ValueRef::Null) => Value::Bytes(None),
        (Ty::Bytes, ValueRef::Blob(v)) => Value::Bytes(Some(v.to_vec())),
        _ => return Err(wrong()),
    })
}

/// Reads every table of the SQLite file in one read transaction and sends its rows.
fn read_sqlite(path: &Path, tx: &mpsc::Sender<Result<Message, StoreError>>) -> Result<(), StoreError> {
    use crate::error::db as sqlite_db;
    let mut conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(sqlite_db)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sqlite_db)?;
    // An older file is brought to this cib's schema first, as opening it in `cib serve` would.
    crate::schema::migrate(&mut conn)?;
    let read = conn.transaction().map_err(sqlite_db)?;
    for (table, columns, order) in TABLES {
        let mut statement = read.prepare(&select(table, columns, order)).map_err(sqlite_db)?;
        let mut rows = statement.query([]).map_err(sqlite_db)?;
        let mut hash = Sha256::new();
        let mut count = 0u64;
        while let Some(row) = rows.next().map_err(sqlite_db)? {
            let mut values = Vec::with_capacity(columns.len());
            for (i, (_, ty)) in columns.iter().enumerate() {
                let value = sqlite_value(row, i, *ty, table)?;
                value.hash(&mut hash);
                values.push(value);
            }
            count += 1;
            if tx.blocking_send(Ok(Message::Row(values))).is_err() {
                return Ok(());
            }
        }
        if tx.blocking_send(Ok(Message::End(count, hex::encode(hash.finalize())))).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn pg_type(ty: Ty) -> Type {
    match ty {
        Ty::Int => Type::INT8,
        Ty::Text => Type::TEXT,
        Ty::Bytes => Type::BYTEA,
    }
}

/// Copies the SQLite store at `sqlite` into the empty PostgreSQL database at `url` (made to
/// the current schema if it has none), checks every table's rows and digest, and commits only
/// when they agree. A target that holds any row is refused, and nothing is written to it.
pub async fn copy_sqlite_to_postgres(sqlite: &Path, url: &str) -> Result<CopyReport, StoreError> {
    if !sqlite.is_file() {
        return Err(StoreError::Misconfigured(format!("{} is not a SQLite store: no such file", sqlite.display())));
    }
    let store = PgStore::connect(url, PgOptions { pool_size: 1, ..PgOptions::default() }).await?;
    let mut client = store.client().await?;
    let tx = client.transaction().await.map_err(db)?;
    // Two copies into one database take turns, and the second finds the first's rows.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&super::JOURNAL_LOCK]).await.map_err(db)?;
    for (table, _, _) in TABLES {
        let row = tx.query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[]).await.map_err(db)?;
        if row.get::<_, bool>(0) {
            return Err(StoreError::Misconfigured(format!(
                "{} is not empty (its table {table} holds rows): cib store copy copies into an empty database only",
                store.target()
            )));
        }
    }

    let (send, mut receive) = mpsc::channel::<Result<Message, StoreError>>(1024);
    let path = sqlite.to_path_buf();
    let reader = std::thread::Builder::new()
        .name("cib-store-copy".into())
        .spawn(move || {
            if let Err(error) = read_sqlite(&path, &send) {
                let _ = send.blocking_send(Err(error));
            }
        })
        .map_err(|e| StoreError::Transient(format!("cannot start the copy's reader: {e}")))?;

    let mut report = CopyReport { tables: Vec::new() };
    for (table, columns, _) in TABLES {
        let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
        let types: Vec<Type> = columns.iter().map(|c| pg_type(c.1)).collect();
        let sink = tx.copy_in(&format!("COPY {table} ({}) FROM STDIN BINARY", names.join(", "))).await.map_err(db)?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(writer);
        let (rows, sha256) = loop {
            match receive.recv().await {
                Some(Ok(Message::Row(values))) => {
                    let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(Value::param).collect();
                    writer.as_mut().write(&params).await.map_err(db)?;
                }
                Some(Ok(Message::End(rows, sha256))) => break (rows, sha256),
                Some(Err(error)) => return Err(error),
                None => return Err(StoreError::Permanent("the copy's SQLite reader stopped early".into())),
            }
        };
        let written = writer.finish().await.map_err(db)?;
        if written != rows {
            return Err(StoreError::Permanent(format!("{table}: {rows} rows read from SQLite, {written} written")));
        }
        report.tables.push(TableCopy { table, rows, sha256 });
    }
    if reader.join().is_err() {
        return Err(StoreError::Permanent("the copy's SQLite reader panicked".into()));
    }

    // The check, before the commit: what PostgreSQL now holds, read back in the same order.
    for ((table, columns, order), copied) in TABLES.iter().zip(&report.tables) {
        let statement = tx.prepare(&select(table, columns, order)).await.map_err(db)?;
        let rows = tx.query_raw(&statement, std::iter::empty::<&(dyn ToSql + Sync)>()).await.map_err(db)?;
        pin_mut!(rows);
        let mut hash = Sha256::new();
        let mut count = 0u64;
        while let Some(row) = rows.next().await {
            let row = row.map_err(db)?;
            for (i, (_, ty)) in columns.iter().enumerate() {
                let value = match ty {
                    Ty::Int => Value::Int(row.try_get(i).map_err(db)?),
                    Ty::Text => Value::Text(row.try_get(i).map_err(db)?),
                    Ty::Bytes => Value::Bytes(row.try_get(i).map_err(db)?),
                };
                value.hash(&mut hash);
            }
            count += 1;
        }
        let sha256 = hex::encode(hash.finalize());
        if count != copied.rows || sha256 != copied.sha256 {
            return Err(StoreError::Permanent(format!(
                "{table} does not match after the copy: SQLite has {} rows (sha256 {}), PostgreSQL {count} (sha256 {sha256}); nothing was committed",
                copied.rows, copied.sha256
            )));
        }
    }
    tx.commit().await.map_err(db)?;
    Ok(report)
}
