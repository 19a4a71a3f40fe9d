//! Warm steps: consecutive steps of a build run as execs in one container, and stay apart
//! from each other as much as separate containers kept them: secrets, leftover processes,
//! stops, timeouts and out-of-memory kills.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use cib_core::event::BuildId;
use cib_core::pipeline::{StepJob, StopReason};
use cib_core::ports::{Attached, Executor, Outcome, StepRun, StopSignal, Stream};
use cib_core::spec;
use cib_docker::DockerExecutor;
use cib_docker::naming::{LABEL_ENGINE, LABEL_ROLE};

use crate::common::*;

/// A run of `job` in a build with a step still to come that could use its container, which is
/// when the executor runs a step warm (a step that nothing after it could follow in its
/// container gets one of its own, see `a_step_nothing_could_follow_runs_in_a_container_of_its_own`).
fn step_run(mut job: StepJob, dir: &std::path::Path) -> StepRun {
    let mut later = job.step.clone();
    later.name = format!("{}-later", job.step.name);
    job.upcoming = vec![later];
    crate::common::step_run(job, dir)
}

async fn run_in(exec: &DockerExecutor, run: &StepRun, sink: Arc<Sink>) -> Outcome {
    let (_keep, stop) = StopSignal::new();
    exec.run(run, sink, stop).await.unwrap_or_else(|e| panic!("run: {e}"))
}

async fn run(exec: &DockerExecutor, job: StepJob, dir: &std::path::Path, sink: Arc<Sink>) -> Outcome {
    run_in(exec, &step_run(job, dir), sink).await
}

/// The warm containers of an engine instance, as Docker lists them (running or not).
async fn warm_containers(exec: &DockerExecutor) -> Vec<String> {
    let filters = std::collections::HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_ENGINE}={}", exec.options().instance), format!("{LABEL_ROLE}=warm")],
    )]);
    let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    let found = exec.docker().list_containers(Some(options)).await.unwrap_or_else(|e| panic!("listing: {e}"));
    found.into_iter().filter_map(|c| c.id).collect()
}

async fn cleanup(exec: &DockerExecutor, build: &str) {
    exec.cleanup(&BuildId::from(build)).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_steps_share_one_hardened_container_and_isolated_ones_get_their_own() {
    let exec = executor("warm-share").await;
    let dir = tempdir();
    let sink = Sink::new();
    let mut first = job("share", "one", &["echo one > note", "cd /tmp", "export LEFT=over"]);
    first.env.insert("ONLY_ONE".into(), "1".into());
    assert_eq!(run(&exec, first, dir.path(), sink.clone()).await, Outcome::Exited(0));
    let second = job("share", "two", &["pwd", "cat note", "echo \"left=${LEFT:-} only=${ONLY_ONE:-}\""]);
    assert_eq!(run(&exec, second, dir.path(), sink.clone()).await, Outcome::Exited(0));
    // Each exec starts in its own working directory (made when missing, as Docker does for a
    // container's), with its own environment and no variable of the wrapper's.
    let mut third = job("share", "three", &["pwd", "env | grep -c CIB_STEP_ || true"]);
    third.step.workdir = Some("sub/dir".into());
    assert_eq!(run(&exec, third, dir.path(), sink.clone()).await, Outcome::Exited(0));
    assert_eq!(sink.text(Stream::Stdout), "/workspace\none\nleft= only=\n/workspace/sub/dir\n0\n");
    let warm = warm_containers(&exec).await;
    assert_eq!(warm.len(), 1, "both steps ran in one container: {warm:?}");
    assert!(step_containers(exec.docker(), &exec.options().instance).await.is_empty());

    // The warm container is hardened like a step's own container.
    let inspected = exec.docker().inspect_container(&warm[0], None::<InspectContainerOptions>).await;
    let hc = inspected.unwrap_or_else(|e| panic!("inspect: {e}")).host_config.unwrap_or_default();
    assert_eq!(hc.privileged, Some(false));
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
    assert!(hc.security_opt.unwrap_or_default().contains(&"no-new-privileges".to_owned()));
    assert_eq!(hc.memory, Some(2 << 30));
    assert!(hc.binds.unwrap_or_default().is_empty());

    // An isolated step, and one with other limits, do not use it.
    let mut isolated = job("share", "alone", &["cat note"]);
    isolated.step.isolated = true;
    assert_eq!(run(&exec, isolated, dir.path(), sink.clone()).await, Outcome::Exited(0));
    assert_eq!(warm_containers(&exec).await.len(), 1);
    let mut other = job("share", "small", &["cat note"]);
    other.step.limits.memory = Some(spec::Memory(64 << 20));
    assert_eq!(run(&exec, other, dir.path(), sink.clone()).await, Outcome::Exited(0));
    assert_eq!(warm_containers(&exec).await.len(), 2, "other limits, another container");
    cleanup(&exec, "share").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_step_cannot_see_an_earlier_steps_secret() {
    let exec = executor("warm-secret").await;
    let dir = tempdir();
    let sink = Sink::new();
    let secret = "s3cr3t-of-step-one";
    let mut first = job(
        "secret",
        "one",
        &[
            // A process that outlives the step, holding the secret in its environment.
            "sleep 300 > /dev/null 2>&1 &",
            "echo $! > leftover.pid",
            "grep -c s3cr3t /proc/$(cat leftover.pid)/environ",
        ],
    );
    first.step.secrets.push("TOKEN".into());
    let mut run_one = step_run(first, dir.path());
    run_one.secrets = BTreeMap::from([("TOKEN".to_owned(), secret.to_owned())]);
    assert_eq!(run_in(&exec, &run_one, sink.clone()).await, Outcome::Exited(0));
    assert_eq!(sink.text(Stream::Stdout), "1\n", "the leftover held the secret while step one ran");

    let second = job(
        "secret",
        "two",
        &[
            // The needle is put together at run time, so that no script holds it whole.
            "n=s3cr3t; n=\"$n-of-step-one\"",
            "echo \"env: $(env | grep -c \"$n\")\"",
            "echo \"procs: $(cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c \"$n\")\"",
            "if [ -e /proc/$(cat leftover.pid) ]; then echo leftover alive; else echo leftover gone; fi",
        ],
    );
    let two = Sink::new();
    assert_eq!(run(&exec, second, dir.path(), two.clone()).await, Outcome::Exited(0));
    assert_eq!(two.text(Stream::Stdout), "env: 0\nprocs: 0\nleftover gone\n");
    assert_eq!(warm_containers(&exec).await.len(), 1, "the same container served both steps");
    cleanup(&exec, "secret").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backgrounded_process_is_killed_before_the_next_step_starts() {
    let exec = executor("warm-background").await;
    let dir = tempdir();
    // One left holding the output pipe, one detached from it; a daemonised one too.
    let first = job(
        "background",
        "one",
        &["sleep 301 &", "(sleep 302 > /dev/null 2>&1 &)", "nohup sleep 303 > /dev/null 2>&1 &", "echo started"],
    );
    let sink = Sink::new();
    let started = Instant::now();
    assert_eq!(run(&exec, first, dir.path(), sink.clone()).await, Outcome::Exited(0));
    assert!(started.elapsed() < Duration::from_secs(60), "the step waited for its leftovers");
    assert_eq!(sink.text(Stream::Stdout), "started\n");
    let second = job(
        "background",
        "two",
        &[
            // A process can end between the glob and the read (the leftovers die from the
            // wrapper's SIGKILL while this runs): one that is gone is no leftover, so a failed
            // read is skipped rather than failing the step.
            "for p in /proc/[0-9]*; do tr '\\0' ' ' 2>/dev/null < $p/cmdline || true; echo; done > procs.txt",
            "echo \"left: $(grep -c 'sleep 30[123]' procs.txt)\"",
        ],
    );
    let two = Sink::new();
    assert_eq!(run(&exec, second, dir.path(), two.clone()).await, Outcome::Exited(0));
    assert_eq!(two.text(Stream::Stdout), "left: 0\n");
    assert_eq!(warm_containers(&exec).await.len(), 1);
    cleanup(&exec, "background").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_and_a_timeout_end_only_their_own_step() {
    let exec = executor_with("warm-stop", |o| o.stop_grace = Duration::from_secs(2)).await;
    let dir = tempdir();
    // Two steps of one build at once, with the same settings: each has a warm container.
    let long = job("stop", "long", &["trap 'echo got SIGTERM; exit 7' TERM", "echo ready", "sleep 60 & wait"]);
    let steady = job("stop", "steady", &["sleep 3", "echo steady done"]);
    let (long_sink, steady_sink) = (Sink::new(), Sink::new());
    let (handle, stop) = StopSignal::new();
    let (long_run, steady_run) = (step_run(long, dir.path()), step_run(steady, dir.path()));
    let canceller = async {
        long_sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(30)).await;
        handle.stop(StopReason::Cancelled);
    };
    let (cancelled, steady_outcome, ()) = tokio::join!(
        exec.run(&long_run, long_sink.clone(), stop),
        run_in(&exec, &steady_run, steady_sink.clone()),
        canceller
    );
    assert_eq!(cancelled.ok(), Some(Outcome::Cancelled));
    assert!(long_sink.text(Stream::Stdout).contains("got SIGTERM"), "{:?}", long_sink.text(Stream::Stdout));
    assert_eq!(steady_outcome, Outcome::Exited(0));
    assert_eq!(steady_sink.text(Stream::Stdout), "steady done\n");

    // A timeout ends its step; the build's next step runs as usual.
    let mut slow = job("stop", "slow", &["echo ready", "sleep 60"]);
    slow.step.timeout = Some(spec::Duration::from_secs(1));
    let started = Instant::now();
    assert_eq!(run(&exec, slow, dir.path(), Sink::new()).await, Outcome::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let after = Sink::new();
    assert_eq!(run(&exec, job("stop", "after", &["echo fine"]), dir.path(), after.clone()).await, Outcome::Exited(0));
    assert_eq!(after.text(Stream::Stdout), "fine\n");
    cleanup(&exec, "stop").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_in_a_warm_container_fails_only_that_step() {
    let exec = executor("warm-oom").await;
    let dir = tempdir();
    let small = |step: &str, commands: &[&str]| {
        let mut j = job("oom", step, commands);
        j.step.limits.memory = Some(spec::Memory(32 << 20));
        j
    };
    assert_eq!(run(&exec, small("before", &["echo kept > note"]), dir.path(), Sink::new()).await, Outcome::Exited(0));
    let hog = small("hog", &["head -c 200m /dev/zero | sort > /dev/null", "echo unreachable"]);
    let sink = Sink::new();
    assert_eq!(run(&exec, hog, dir.path(), sink.clone()).await, Outcome::OutOfMemory);
    assert!(!sink.text(Stream::Stdout).contains("unreachable"));
    // A plain failure in the same settings is not taken for one.
    assert_eq!(run(&exec, small("fails", &["exit 3"]), dir.path(), Sink::new()).await, Outcome::Exited(3));
    let after = Sink::new();
    assert_eq!(run(&exec, small("after", &["cat note"]), dir.path(), after.clone()).await, Outcome::Exited(0));
    assert_eq!(after.text(Stream::Stdout), "kept\n");
    cleanup(&exec, "oom").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_warm_run_removes_its_container() {
    let exec = executor("warm-dropped").await;
    let sink = Sink::new();
    let task = {
        let (exec, sink) = (exec.clone(), sink.clone());
        tokio::spawn(async move {
            let dir = tempdir();
            let (_keep, stop) = StopSignal::new();
            let run = step_run(job("dropped", "forever", &["echo ready", "sleep 300"]), dir.path());
            exec.run(&run, sink, stop).await
        })
    };
    sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(30)).await;
    assert_eq!(warm_containers(&exec).await.len(), 1);
    task.abort();
    let _ = task.await;
    let start = Instant::now();
    while !warm_containers(&exec).await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the warm container of a dropped run stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cleanup(&exec, "dropped").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_step_left_by_a_detached_engine_is_reported_gone_and_stopped() {
    let dir = tempdir();
    let long = job("warm-attach", "long", &["echo ready", "sleep 300"]);
    let first = executor("warm-attach").await;
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let running = tokio::spawn({
        let (first, sink, run) = (first.clone(), sink.clone(), step_run(long.clone(), dir.path()));
        async move { first.run(&run, sink, stop).await }
    });
    sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(30)).await;
    first.detach();
    running.abort();
    let _ = running.await;
    let exec = executor("warm-attach").await;
    assert_eq!(warm_containers(&exec).await.len(), 1, "the detached step runs on");
    let (_keep, stop) = StopSignal::new();
    let attached = exec.attach(&step_run(long, dir.path()), 6, Sink::new(), stop).await;
    assert_eq!(attached.ok(), Some(Attached::Gone), "an exec cannot be followed");
    assert!(warm_containers(&exec).await.is_empty(), "and it was stopped, so that a re-run cannot overlap it");
    cleanup(&exec, "warm-attach").await;
    assert_nothing_left(&exec).await;
}

/// Set in the child process of the cleanup crash test to the engine instance it must use.
const CHILD_INSTANCE: &str = "CIB_DOCKER_IT_CLEANUP_CHILD";
const CHILD_READY: &str = "CIB-CLEANUP-STARTING";

/// The child's part: make a build's resources, then start removing them and be killed.
async fn cleanup_child(instance: String) {
    let exec = DockerExecutor::connect(cib_docker::DockerOptions::new(instance))
        .await
        .unwrap_or_else(|e| panic!("child: cannot reach Docker: {e}"));
    let dir = tempdir();
    for (step, network) in [("a", spec::Network::Bridge), ("b", spec::Network::None), ("c", spec::Network::Bridge)] {
        let mut j = job("doomed", step, &["true"]);
        j.step.network = network;
        let (_keep, stop) = StopSignal::new();
        let outcome = exec.run(&step_run(j, dir.path()), Sink::new(), stop).await;
        assert_eq!(outcome.ok(), Some(Outcome::Exited(0)));
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{CHILD_READY}");
    let _ = out.flush();
    // The engine's cleanup runs on a task after the build's outcome was reported; here it
    // runs until the parent kills this process, midway or not.
    loop {
        let _ = exec.cleanup(&BuildId::from("doomed")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_background_cleanup_then_reconcile_leaves_nothing() {
    if let Ok(instance) = std::env::var(CHILD_INSTANCE) {
        return cleanup_child(instance).await;
    }
    let instance = instance("cleanup-kill");
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut child = std::process::Command::new(exe)
        .args(["--exact", "warm::a_kill_during_background_cleanup_then_reconcile_leaves_nothing", "--nocapture"])
        .env(CHILD_INSTANCE, &instance)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning the child: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("the child has no stdout"));
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.contains(CHILD_READY))
    });
    let ready = tokio::time::timeout(Duration::from_secs(120), ready).await;
    child.kill().unwrap_or_else(|e| panic!("killing the child: {e}"));
    let _ = child.wait();
    assert!(matches!(ready, Ok(Ok(true))), "the child never reached its cleanup: {ready:?}");

    let exec = executor_with("cleanup-kill", |_| {}).await;
    exec.reconcile(&[]).await.unwrap_or_else(|e| panic!("reconcile: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suggested_running_steps_are_twice_the_daemons_cpus() {
    let exec = executor("suggested").await;
    let info = exec.docker().info().await.unwrap_or_else(|e| panic!("info: {e}"));
    let cpus = usize::try_from(info.ncpu.unwrap_or(1)).unwrap_or(1).max(1);
    assert_eq!(exec.suggested_running_steps(), (2 * cpus).max(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_nothing_could_follow_runs_in_a_container_of_its_own() {
    let exec = executor("warm-alone").await;
    let dir = tempdir();
    // Nothing after it: its own container, whose main process is the step's shell.
    let sink = Sink::new();
    let alone = crate::common::step_run(job("alone", "only", &["echo $$ > /tmp/mine", "echo ran"]), dir.path());
    assert_eq!(run_in(&exec, &alone, sink.clone()).await, Outcome::Exited(0));
    assert_eq!(sink.text(Stream::Stdout), "ran\n");
    assert!(warm_containers(&exec).await.is_empty(), "no warm container for a step nothing follows");

    // A step that a later one could follow runs warm, and leaves its container idle; a step
    // with nothing after it then still takes that idle container rather than making one.
    let first = job("alone", "first", &["echo warm > /tmp/mine"]);
    assert_eq!(run(&exec, first, dir.path(), Sink::new()).await, Outcome::Exited(0));
    let warm = warm_containers(&exec).await;
    assert_eq!(warm.len(), 1, "{warm:?}");
    let sink = Sink::new();
    let last = crate::common::step_run(job("alone", "last", &["cat /tmp/mine"]), dir.path());
    assert_eq!(run_in(&exec, &last, sink.clone()).await, Outcome::Exited(0));
    assert_eq!(sink.text(Stream::Stdout), "warm\n", "the last step ran in the warm container");
    assert_eq!(warm_containers(&exec).await, warm);
    cleanup(&exec, "alone").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_of_a_step_that_depends_only_on_the_running_one_is_made_meanwhile() {
    let exec = executor("warm-pipeline").await;
    let dir = tempdir();
    // `next` depends on `first` alone and has other limits: it cannot share first's container.
    let mut next = job("pipe", "next", &["echo next ran"]);
    next.step.depends_on = vec!["first".into()];
    next.step.limits.memory = Some(spec::Memory(64 << 20));
    let mut first = job("pipe", "first", &["echo started", "sleep 4"]);
    first.upcoming = vec![next.step.clone()];
    let sink = Sink::new();
    let first_run = crate::common::step_run(first, dir.path());
    let watch = async {
        sink.wait_for(Stream::Stdout, "started", Duration::from_secs(60)).await;
        // While first runs, next's warm container is made and started.
        let start = Instant::now();
        loop {
            let warm = warm_containers(&exec).await;
            if let Some(id) = warm.first() {
                let inspected = exec.docker().inspect_container(id, None::<InspectContainerOptions>).await;
                let state = inspected.unwrap_or_else(|e| panic!("inspect: {e}")).state.unwrap_or_default();
                if state.running == Some(true) {
                    let memory = exec
                        .docker()
                        .inspect_container(id, None::<InspectContainerOptions>)
                        .await
                        .ok()
                        .and_then(|c| c.host_config)
                        .and_then(|h| h.memory);
                    assert_eq!(memory, Some(64 << 20), "the container is made for next's settings");
                    break id.clone();
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no container was made ahead: {warm:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (outcome, ahead) = tokio::join!(run_in(&exec, &first_run, sink.clone()), watch);
    assert_eq!(outcome, Outcome::Exited(0));
    assert!(!sink.text(Stream::Stdout).contains("next"), "only first ran so far");

    // next, started with nothing after it, runs in the container made ahead for it.
    let next_sink = Sink::new();
    let next_run = crate::common::step_run(next, dir.path());
    assert_eq!(run_in(&exec, &next_run, next_sink.clone()).await, Outcome::Exited(0));
    assert_eq!(next_sink.text(Stream::Stdout), "next ran\n");
    assert_eq!(warm_containers(&exec).await, vec![ahead], "no other warm container was made");
    cleanup(&exec, "pipe").await;
    assert_nothing_left(&exec).await;
}
