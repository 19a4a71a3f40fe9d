//! How SQLite's failures become the port's portable [`StoreError`] kinds, and the checked
//! conversions between the port's unsigned numbers and SQL's signed integers.

use cib_core::ports::StoreError;
use rusqlite::ErrorCode;

/// Sorts a SQLite error by what the engine should do about it: a busy or locked database may
/// free up, a damaged or unwritable file needs a person, and anything else is a bug or bad
/// data that retrying will not fix.
pub(crate) fn db(error: rusqlite::Error) -> StoreError {
    let message = format!("sqlite: {error}");
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::SystemIoFailure) => {
            StoreError::Transient(message)
        }
        Some(
            ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::NotADatabase
            | ErrorCode::DatabaseCorrupt
            | ErrorCode::DiskFull,
        ) => StoreError::Misconfigured(message),
        _ => StoreError::Permanent(message),
    }
}

/// The store's threads are gone: the store was dropped, or a thread panicked.
pub(crate) fn stopped() -> StoreError {
    StoreError::Permanent("the SQLite store has stopped".into())
}

/// Stored data that this code cannot read back, which only a bug or a damaged file makes.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Permanent(format!("unreadable stored data: {what}"))
}

/// SQL integers are signed 64-bit; the port's numbers are unsigned.
pub(crate) fn to_sql(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Permanent(format!("{value} is too large to store")))
}

/// Reads back a number the store wrote with [`to_sql`].
pub(crate) fn from_sql(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(format!("negative number {value}")))
}

/// A limit for SQL's `LIMIT`, which is signed.
pub(crate) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Runs a cached statement.
pub(crate) fn exec(conn: &rusqlite::Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize, StoreError> {
    conn.prepare_cached(sql).and_then(|mut s| s.execute(params)).map_err(db)
}

/// Runs a cached query for at most one row.
pub(crate) fn query_opt<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>, StoreError> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached(sql).and_then(|mut s| s.query_row(params, row).optional()).map_err(db)
}
