//! cib's durable store: the [`cib_core::ports::Store`] port on SQLite, for embedders and the
//! server alike.
//!
//! Everything lives in one SQLite file in WAL mode, so a cib installation needs no database
//! server. What the store promises, and what its tests check by killing a writer at random:
//!
//! - A write reported as done is committed, and a batch (the events of one input, a group
//!   commit) is all there or all absent after a crash.
//! - The journal numbers inputs from 1 without gaps; events are kept once per sequence number,
//!   and the build records kept from them move only on new events, so replays are harmless.
//! - Webhook deliveries are stored once per delivery id, however many copies race.
//! - Secrets are sealed with a key the database never holds (see `secrets`).
//! - Each step's log is kept in compressed chunks within a limit (head and tail, with a marker
//!   between), so a step printing gigabytes costs bounded disk and memory.
//!
//! The SQL is kept to what SQLite and PostgreSQL share, so that a PostgreSQL store can follow
//! with the same tables and the same conformance suite (`cib_core::testing::store_conformance`,
//! behind cib-core's `testing` feature).

mod artifacts;
mod error;
mod logs;
#[cfg(feature = "postgres")]
mod postgres;
mod read;
mod schema;
mod secrets;
mod sqlite;
mod writer;

pub use artifacts::FileArtifacts;
#[cfg(feature = "testing")]
pub use postgres::testing;
#[cfg(feature = "postgres")]
pub use postgres::{
    CopyReport, FENCED, Holder, Leadership, PgOptions, PgStore, TableCopy, Tenure, copy_sqlite_to_postgres, is_fenced,
    redact_url,
};
pub use schema::SCHEMA_VERSION;
pub use secrets::{generate_key, load_or_create_key_file, parse_key, read_key_file};
pub use sqlite::{SqliteOptions, SqliteStore, Synchronous};
