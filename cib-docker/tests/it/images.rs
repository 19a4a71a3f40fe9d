//! Images and workspaces: a missing image is said plainly, the checkout reaches the workspace,
//! and the workspace is shared by a build's steps.

use bollard::models::VolumeCreateRequest;
use cib_core::event::BuildId;
use cib_core::ports::{ErrorKind, Executor, Outcome, StopSignal, Stream};
use cib_core::testing::conformance_job;
use cib_docker::naming::{BuildNames, Role};
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
    // Owned on the host by someone the image does not know; in the workspace it must belong to
    // the image's user. (The tests run as root, which may give files away.)
    std::os::unix::fs::chown(dir.path().join("README"), Some(1234), Some(1234)).unwrap_or_else(|e| panic!("{e}"));

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_copy_leaves_no_workspace_and_the_next_run_fills_it() {
    let exec = executor("failed-copy").await;
    let dir = tempdir();
    std::fs::write(dir.path().join("README"), "read me\n").unwrap_or_else(|e| panic!("{e}"));
    // A socket cannot go into a tar archive, so copying this checkout fails midway.
    let socket = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap_or_else(|e| panic!("bind: {e}"));
    let (_keep, stop) = StopSignal::new();
    let run = step_run(job("copy", "first", &["cat README"]), dir.path());
    let e = exec.run(&run, Sink::new(), stop).await.err().unwrap_or_else(|| panic!("the copy cannot have worked"));
    assert!(e.message().contains("socket"), "{e}");
    let left = leftovers(exec.docker(), &exec.options().instance).await;
    assert!(!left.iter().any(|l| l.starts_with("volume") || l.starts_with("container")), "{left:?}");

    drop(listener);
    std::fs::remove_file(&socket).unwrap_or_else(|e| panic!("{e}"));
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    assert_eq!(exec.run(&run, sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    assert_eq!(sink.text(Stream::Stdout), "read me\n");
    exec.cleanup(&BuildId::from("copy")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_volume_without_its_marker_is_filled_again() {
    let exec = executor("half-filled").await;
    let build = BuildId::from("half");
    // What an engine that died between creating the volume and finishing the copy leaves.
    let names = BuildNames::new(&exec.options().instance, &build);
    let volume = VolumeCreateRequest {
        name: Some(names.volume()),
        labels: Some(names.labels(Role::Workspace)),
        ..Default::default()
    };
    exec.docker().create_volume(volume).await.unwrap_or_else(|e| panic!("create volume: {e}"));
    let dir = tempdir();
    std::fs::write(dir.path().join("README"), "read me\n").unwrap_or_else(|e| panic!("{e}"));
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let run = step_run(job("half", "reads", &["cat README"]), dir.path());
    assert_eq!(
        exec.run(&run, sink.clone(), stop).await.ok(),
        Some(Outcome::Exited(0)),
        "{}",
        sink.text(Stream::Stderr)
    );
    assert_eq!(sink.text(Stream::Stdout), "read me\n");
    exec.cleanup(&build).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_workspace_is_not_filled_again_by_the_next_process() {
    let build = BuildId::from("refill");
    let dir = tempdir();
    std::fs::write(dir.path().join("README"), "read me\n").unwrap_or_else(|e| panic!("{e}"));
    let exec = executor("whole").await;
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let first = step_run(job("refill", "first", &["echo changed > README"]), dir.path());
    assert_eq!(exec.run(&first, sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    // Another process of the same engine instance (a restart) finds the volume with its marker
    // and leaves it as the first step made it, rather than copying the checkout over it.
    let again = executor("whole").await;
    let (_keep, stop) = StopSignal::new();
    let second = step_run(job("refill", "second", &["cat README", "ls .cib"]), dir.path());
    assert_eq!(again.run(&second, sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    assert_eq!(sink.text(Stream::Stdout), "changed\nfilled\n");
    again.cleanup(&build).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    exec.cleanup(&build).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&again).await;
}
