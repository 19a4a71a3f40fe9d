//! The conformance suites from cib-core, on SQLite, with the default chunking and with tiny
//! chunks that make every append compact and every read cross chunks.

use std::sync::Arc;

use cib_core::testing::{store_conformance, store_log_limit_conformance, store_retention_conformance};
use cib_store::SqliteOptions;

use crate::open;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_store_suite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("cib.db"), SqliteOptions::default());
    store_conformance(Arc::new(store)).await.expect("conformance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_store_suite_with_tiny_chunks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = SqliteOptions { log_chunk_size: 3, readers: 1, ..SqliteOptions::default() };
    store_conformance(Arc::new(open(&dir.path().join("cib.db"), options))).await.expect("conformance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_log_limit_suite() {
    for chunk in [1, 4, 16, 64, 1 << 16] {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteOptions { log_limit: 100, log_chunk_size: chunk, ..SqliteOptions::default() };
        let store = open(&dir.path().join("cib.db"), options);
        store_log_limit_conformance(Arc::new(store)).await.unwrap_or_else(|e| panic!("chunks of {chunk}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_retention_suite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("cib.db"), SqliteOptions::default());
    store_retention_conformance(Arc::new(store)).await.expect("retention");
}
