//! Images and workspaces: a missing image is said plainly, the checkout reaches the workspace,
//! and the workspace is shared by a build's steps.

use cib_core::event::BuildId;
use cib_core::ports::{ErrorKind, Executor, Outcome, StopSignal, Stream};
use cib_core::testing::conformance_job;
use cib_docker::{DockerExecutor, DockerOptions};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_that_cannot_be_pulled_is_said_plainly() {
    let exec = executor("missing-image").await;
    let dir = tempdir();
    let (_keep, stop) = StopSignal::new();
    let job = conformance_job("missing", "step", "cib-test/absent:1", &["true"]);
    let e = exec.run(&step_run(job, dir.path()), Sink::new(), stop).await.err().unwrap_or_else(|| panic!("it ran"));
    assert_eq!(e.kind(), ErrorKind::Permanent);
    assert!(e.message().starts_with("image cib-test/absent:1 is not present locally and could not be pulled: "), "{e}");
    exec.cleanup(&BuildId::from("missing")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workspace_holds_the_checkout_and_is_shared_by_the_steps() {
    let exec = executor("workspace").await;
    let dir = tempdir();
    std::fs::create_dir(dir.path().join("src")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("README"), "read me\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("src/lib.sh"), "echo from lib\n").unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink("../README", dir.path().join("src/link")).unwrap_or_else(|e| panic!("{e}"));

    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let mut first = job("ws", "first", &["pwd", "cat ../README", "sh lib.sh", "cat link", "echo built > ../artifact"]);
    first.step.workdir = Some("src".into());
    assert_eq!(exec.run(&step_run(first, dir.path()), sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    assert_eq!(sink.text(Stream::Stdout), "/workspace/src\nread me\nfrom lib\nread me\n");

    // The second step sees what the first left, not a fresh copy of the checkout.
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let second = job("ws", "second", &["cat artifact", "stat -c '%u %n' README"]);
    assert_eq!(exec.run(&step_run(second, dir.path()), sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    assert_eq!(sink.text(Stream::Stdout), "built\n0 README\n", "files belong to the image's user (root)");
    exec.cleanup(&BuildId::from("ws")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_is_a_misconfiguration() {
    let mut options = DockerOptions::new(instance("no-daemon"));
    options.host = Some("unix:///nonexistent/cib/docker.sock".into());
    let e = DockerExecutor::connect(options).await.err().unwrap_or_else(|| panic!("connected to nothing"));
    assert_eq!(e.kind(), ErrorKind::Misconfigured);
    assert!(e.message().contains("/nonexistent/cib/docker.sock"), "{e}");
}
