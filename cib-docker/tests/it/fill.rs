//! How a step's own container gets its script and the checkout: through its stdin when its
//! image runs as root and has `tar`, by an upload through the archive API otherwise. Either
//! way the step sees the same workspace, and nothing of the mechanism reaches its log.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerConfig, ContainerCreateBody};
use bollard::query_parameters::{
    CommitContainerOptions, CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RemoveImageOptions,
    WaitContainerOptions,
};
use cib_core::event::BuildId;
use cib_core::ports::{Executor, Outcome, StopSignal, Stream};
use cib_core::testing::conformance_job;
use cib_docker::naming::{LABEL_ENGINE, LABEL_STDIN};
use futures_util::StreamExt;

use crate::common::*;

/// Makes an image from busybox by running `command` in it (as root) and committing the result
/// with the Dockerfile instructions `changes`. Removed by [`remove_image`].
async fn derived_image(docker: &Docker, name: &str, command: &str, changes: Option<&str>) -> String {
    let body = ContainerCreateBody {
        image: Some(IMAGE.to_owned()),
        entrypoint: Some(vec!["sh".to_owned(), "-c".to_owned(), command.to_owned()]),
        cmd: Some(Vec::new()),
        ..Default::default()
    };
    let created = docker
        .create_container(None::<CreateContainerOptions>, body)
        .await
        .unwrap_or_else(|e| panic!("creating the image's container: {e}"));
    docker.start_container(&created.id, None).await.unwrap_or_else(|e| panic!("starting it: {e}"));
    let mut wait = docker.wait_container(&created.id, Some(WaitContainerOptions { condition: "not-running".into() }));
    while let Some(status) = wait.next().await {
        status.unwrap_or_else(|e| panic!("`{command}` failed: {e}"));
    }
    let tag = format!("{}", std::process::id());
    let options = CommitContainerOptions {
        container: Some(created.id.clone()),
        repo: Some(name.to_owned()),
        tag: Some(tag.clone()),
        changes: changes.map(str::to_owned),
        ..Default::default()
    };
    docker.commit_container(options, ContainerConfig::default()).await.unwrap_or_else(|e| panic!("commit: {e}"));
    let force = RemoveContainerOptions { force: true, ..Default::default() };
    docker.remove_container(&created.id, Some(force)).await.unwrap_or_else(|e| panic!("remove: {e}"));
    format!("{name}:{tag}")
}

async fn remove_image(docker: &Docker, image: &str) {
    let options = RemoveImageOptions { force: true, ..Default::default() };
    docker.remove_image(image, Some(options), None).await.unwrap_or_else(|e| panic!("removing {image}: {e}"));
}

fn checkout() -> tempfile::TempDir {
    let dir = tempdir();
    std::fs::create_dir(dir.path().join("bin")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("README"), "read me\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("bin/tool"), "echo tool ran\n").unwrap_or_else(|e| panic!("{e}"));
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o751);
    std::fs::set_permissions(dir.path().join("bin/tool"), mode).unwrap_or_else(|e| panic!("{e}"));
    dir
}

/// Runs `commands` as a 1-step build's only step in `image`, and returns its outcome and output.
async fn run_alone(
    exec: &cib_docker::DockerExecutor,
    build: &str,
    image: &str,
    commands: &[&str],
    dir: &std::path::Path,
) -> (Option<Outcome>, String, String) {
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let run = step_run(conformance_job(build, "only", image, commands), dir);
    let outcome = exec.run(&run, sink.clone(), stop).await.ok();
    (outcome, sink.text(Stream::Stdout), sink.text(Stream::Stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_container_is_filled_through_its_stdin_and_no_token_reaches_the_log() {
    let exec = executor("stdin-fill").await;
    let dir = checkout();
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    // `cat` reads the step's stdin: it must be empty, not what filled the container.
    let commands = ["cat", "cat README", "stat -c '%a %u' bin/tool", "bin/tool", "echo waiting", "sleep 3"];
    let run = step_run(job("stdin", "only", &commands), dir.path());
    let running = {
        let exec = exec.clone();
        let sink = sink.clone();
        tokio::spawn(async move { exec.run(&run, sink, stop).await })
    };
    sink.wait_for(Stream::Stdout, "waiting", Duration::from_secs(30)).await;
    // While it runs, the container is there, marked as filled through its stdin.
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_ENGINE}={}", exec.options().instance), format!("{LABEL_STDIN}=1")],
    )]);
    let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    let fed = exec.docker().list_containers(Some(options)).await.unwrap_or_else(|e| panic!("list: {e}"));
    assert_eq!(fed.len(), 1, "the step's container is filled through its stdin");
    let outcome = running.await.unwrap_or_else(|e| panic!("join: {e}"));
    assert_eq!(outcome.ok(), Some(Outcome::Exited(0)), "{}", sink.text(Stream::Stderr));
    assert_eq!(sink.text(Stream::Stdout), "read me\n751 0\ntool ran\nwaiting\n");
    assert_eq!(sink.text(Stream::Stderr), "");
    exec.cleanup(&BuildId::from("stdin")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_without_tar_gets_its_step_container_filled_by_an_upload() {
    let exec = executor("no-tar").await;
    let image = derived_image(exec.docker(), "cib-test/no-tar", "rm /bin/tar", None).await;
    let dir = checkout();
    // Twice: the first run finds out (its step goes again, filled by an upload), the second
    // knows already.
    for build in ["no-tar-1", "no-tar-2"] {
        let (outcome, out, err) = run_alone(&exec, build, &image, &["cat README", "bin/tool"], dir.path()).await;
        assert_eq!(outcome, Some(Outcome::Exited(0)), "{build}: {err}");
        assert_eq!(out, "read me\ntool ran\n", "{build}: the step ran once, and no token shows");
        assert_eq!(err, "", "{build}");
        exec.cleanup(&BuildId::from(build)).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    }
    assert_nothing_left(&exec).await;
    remove_image(exec.docker(), &image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_of_another_user_gets_the_checkout_as_that_user_by_an_upload() {
    let exec = executor("other-user").await;
    let image = derived_image(exec.docker(), "cib-test/nobody", "true", Some("USER nobody")).await;
    let dir = checkout();
    let commands = ["id -u", "cat README", "stat -c '%U' README", "echo made > new"];
    let (outcome, out, err) = run_alone(&exec, "nobody", &image, &commands, dir.path()).await;
    assert_eq!(outcome, Some(Outcome::Exited(0)), "{err}");
    assert_eq!(out, "65534\nread me\nnobody\n", "the checkout belongs to the image's user, who can write it");
    exec.cleanup(&BuildId::from("nobody")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
    remove_image(exec.docker(), &image).await;
}
