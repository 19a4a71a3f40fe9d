//! The conformance suites against the fakes, so that the fakes embedders use stay honest.

use cib_core::testing::{
    FakeExecutor, MemoryStore, executor_conformance, store_conformance, store_log_limit_conformance,
};

#[tokio::test]
async fn the_fake_executor_passes_the_executor_suite() {
    let dir = tempfile::tempdir().expect("temp dir");
    executor_conformance(FakeExecutor::new(), "busybox", dir.path()).await.expect("conformance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_passes_the_store_suite() {
    store_conformance(MemoryStore::new()).await.expect("conformance");
}

#[tokio::test]
async fn the_memory_store_passes_the_log_limit_suite() {
    store_log_limit_conformance(MemoryStore::with_log_limit(100)).await.expect("conformance");
}
