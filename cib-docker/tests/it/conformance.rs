//! The executor conformance suite from cib-core, against the real daemon.

use cib_core::testing::executor_conformance;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes() {
    let exec = executor("conformance").await;
    let dir = tempdir();
    if let Err(broken) = executor_conformance(exec.clone(), IMAGE, dir.path()).await {
        panic!("conformance: {broken}");
    }
    assert_nothing_left(&exec).await;
}
