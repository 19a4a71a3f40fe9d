//! Outcomes and what is left after them: success, failure, cancel, timeouts, out of memory, a
//! dropped run, and an engine killed midway followed by reconcile.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::event::BuildId;
use cib_core::pipeline::{StepJob, StopReason};
use cib_core::ports::{Executor, LogSink, Outcome, StopSignal, Stream};
use cib_core::spec;
use cib_docker::DockerExecutor;
use futures_util::StreamExt;

use crate::common::*;

async fn run(exec: &DockerExecutor, job: StepJob, sink: Arc<Sink>) -> Outcome {
    let dir = tempdir();
    let (_keep, stop) = StopSignal::new();
    exec.run(&step_run(job, dir.path()), sink, stop).await.unwrap_or_else(|e| panic!("run: {e}"))
}

/// Runs a step, stops it with `reason` once `ready` appears on stdout, and returns the outcome
/// with the time from the stop to the end.
async fn run_and_stop(exec: &DockerExecutor, job: StepJob, reason: StopReason) -> (Outcome, Duration, Arc<Sink>) {
    let dir = tempdir();
    let sink = Sink::new();
    let (handle, stop) = StopSignal::new();
    let run = step_run(job, dir.path());
    let stopper = async {
        sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(30)).await;
        handle.stop(reason);
        Instant::now()
    };
    let (outcome, stopped_at) = tokio::join!(exec.run(&run, sink.clone(), stop), stopper);
    let outcome = outcome.unwrap_or_else(|e| panic!("run: {e}"));
    (outcome, stopped_at.elapsed(), sink)
}

async fn cleanup(exec: &DockerExecutor, build: &str) {
    exec.cleanup(&BuildId::from(build)).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
}

/// `cleanup` lists only containers when this process made the build's workspace (it knows the
/// volume and the network by name), and everything when another process did (a restart): both
/// leave nothing, the network included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_nothing_whichever_process_made_the_build() {
    let first = executor("cleanup-owner").await;
    assert_eq!(run(&first, job("mine", "a", &["true"]), Sink::new()).await, Outcome::Exited(0));
    assert_eq!(run(&first, job("theirs", "a", &["true"]), Sink::new()).await, Outcome::Exited(0));
    let start = Instant::now();
    while !step_containers(first.docker(), &first.options().instance).await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the step containers stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = leftovers(first.docker(), &first.options().instance).await;
    assert_eq!(left.iter().filter(|l| l.starts_with("network")).count(), 2, "{left:?}");
    // A second process of the same instance, as after a restart, knows nothing of "theirs".
    let second = executor("cleanup-owner").await;
    cleanup(&first, "mine").await;
    cleanup(&second, "theirs").await;
    assert_nothing_left(&first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_and_failure_leave_nothing_after_cleanup() {
    let exec = executor("success-failure").await;
    let sink = Sink::new();
    assert_eq!(run(&exec, job("ok", "pass", &["echo fine"]), sink.clone()).await, Outcome::Exited(0));
    assert_eq!(run(&exec, job("ko", "fail", &["echo failing", "exit 3"]), sink.clone()).await, Outcome::Exited(3));
    assert_eq!(sink.text(Stream::Stdout), "fine\nfailing\n");
    // Step containers go once the step ended, in the background (the outcome does not wait for
    // it); the builds' workspace and network stay for their next steps, until cleanup.
    let start = Instant::now();
    while !step_containers(exec.docker(), &exec.options().instance).await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the step containers stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = leftovers(exec.docker(), &exec.options().instance).await;
    assert_eq!(left.iter().filter(|l| l.starts_with("volume")).count(), 2, "{left:?}");
    assert_eq!(left.iter().filter(|l| l.starts_with("network")).count(), 2, "{left:?}");
    assert_eq!(left.len(), 4, "no container of the builds is left: {left:?}");
    cleanup(&exec, "ok").await;
    cleanup(&exec, "ko").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_sends_sigterm_first() {
    // A long grace period: the step must end well before it, on SIGTERM alone.
    let exec = executor_with("cancel", |o| o.stop_grace = Duration::from_secs(30)).await;
    let job = job("cancel", "trapper", &["trap 'echo got SIGTERM; exit 7' TERM", "echo ready", "sleep 60 & wait"]);
    let (outcome, took, sink) = run_and_stop(&exec, job, StopReason::Cancelled).await;
    assert_eq!(outcome, Outcome::Cancelled);
    assert!(sink.text(Stream::Stdout).contains("got SIGTERM"), "{:?}", sink.text(Stream::Stdout));
    assert!(took < Duration::from_secs(10), "the cancel took {took:?}");
    cleanup(&exec, "cancel").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_ignoring_sigterm_is_killed_after_the_grace_period() {
    let grace = Duration::from_secs(2);
    let exec = executor_with("grace", |o| o.stop_grace = grace).await;
    let job = job("grace", "stubborn", &["trap '' TERM", "echo ready", "while true; do sleep 1; done"]);
    let (outcome, took, _) = run_and_stop(&exec, job, StopReason::Cancelled).await;
    assert_eq!(outcome, Outcome::Cancelled);
    assert!(took >= grace, "killed after {took:?}, before the grace period of {grace:?}");
    assert!(took < grace + Duration::from_secs(8), "SIGKILL came late: {took:?}");
    cleanup(&exec, "grace").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_timeout_is_enforced_by_the_executor() {
    let exec = executor_with("timeout", |o| o.stop_grace = Duration::from_secs(2)).await;
    let mut job = job("timeout", "slow", &["echo ready", "sleep 60"]);
    job.step.timeout = Some(spec::Duration::from_secs(1));
    let started = Instant::now();
    assert_eq!(run(&exec, job, Sink::new()).await, Outcome::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    cleanup(&exec, "timeout").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_no_output_timeout_counts_from_the_last_output() {
    let exec = executor_with("no-output", |o| o.stop_grace = Duration::from_secs(2)).await;
    let mut job = job("quiet", "quiet", &["echo a", "sleep 1", "echo b", "sleep 1", "echo c", "sleep 60"]);
    job.step.no_output_timeout = Some(spec::Duration::from_secs(2));
    let sink = Sink::new();
    let started = Instant::now();
    assert_eq!(run(&exec, job, sink.clone()).await, Outcome::NoOutput);
    // Two seconds of silence after "c", which came about two seconds after the start.
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(4), "stopped after {took:?}: output did not reset the timer");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_eq!(sink.text(Stream::Stdout), "a\nb\nc\n");
    cleanup(&exec, "quiet").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_is_its_own_outcome() {
    let exec = executor("oom").await;
    // `sort` keeps all its input in memory; 200 MiB of it does not fit in 16 MiB.
    let mut job = job("oom", "hog", &["head -c 200m /dev/zero | sort > /dev/null", "echo unreachable"]);
    job.step.limits.memory = Some(spec::Memory(16 << 20));
    let sink = Sink::new();
    assert_eq!(run(&exec, job, sink.clone()).await, Outcome::OutOfMemory);
    assert!(!sink.text(Stream::Stdout).contains("unreachable"));
    cleanup(&exec, "oom").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_run_removes_its_container() {
    let exec = executor("dropped").await;
    let sink = Sink::new();
    let task = {
        let exec = exec.clone();
        let sink = sink.clone();
        tokio::spawn(async move {
            let dir = tempdir();
            let (_keep, stop) = StopSignal::new();
            let run = step_run(isolated(job("dropped", "forever", &["echo ready", "sleep 300"])), dir.path());
            exec.run(&run, sink, stop).await
        })
    };
    sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(30)).await;
    assert_eq!(step_containers(exec.docker(), &exec.options().instance).await.len(), 1);
    // The engine gives up on the step without stopping it: the future is dropped.
    task.abort();
    let _ = task.await;
    let start = Instant::now();
    while !step_containers(exec.docker(), &exec.options().instance).await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the container of a dropped run stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cleanup(&exec, "dropped").await;
    assert_nothing_left(&exec).await;
}

/// Set in the child process of the crash test to the engine instance it must use.
const CHILD_INSTANCE: &str = "CIB_DOCKER_IT_CRASH_CHILD";
const CHILD_READY: &str = "CIB-CHILD-READY";

/// Tells the parent, through the child's real stdout, that the step is running.
struct ReadySignal;

impl LogSink for ReadySignal {
    fn write(&self, _stream: Stream, bytes: &[u8]) {
        if String::from_utf8_lossy(bytes).contains("started") {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{CHILD_READY}");
            let _ = out.flush();
        }
    }
}

/// The child's part: start a long step and wait to be killed.
async fn crash_child(instance: String) {
    let exec = DockerExecutor::connect(cib_docker::DockerOptions::new(instance))
        .await
        .unwrap_or_else(|e| panic!("child: cannot reach Docker: {e}"));
    let dir = tempdir();
    let (_keep, stop) = StopSignal::new();
    let run = step_run(isolated(job("crashed", "long", &["echo started", "sleep 300"])), dir.path());
    let outcome = exec.run(&run, Arc::new(ReadySignal), stop).await;
    panic!("the child's step was meant to be killed, but ended: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_leaves_nothing_after_reconcile() {
    if let Ok(instance) = std::env::var(CHILD_INSTANCE) {
        return crash_child(instance).await;
    }
    let instance = instance("crash");
    // The same test binary, running only this test, in child mode.
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut child = std::process::Command::new(exe)
        .args(["--exact", "lifecycle::a_killed_engine_leaves_nothing_after_reconcile", "--nocapture"])
        .env(CHILD_INSTANCE, &instance)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning the child: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("the child has no stdout"));
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.contains(CHILD_READY))
    });
    let ready = tokio::time::timeout(Duration::from_secs(60), ready).await;
    // SIGKILL: no destructor, no cleanup, exactly like a crashed engine.
    child.kill().unwrap_or_else(|e| panic!("killing the child: {e}"));
    let _ = child.wait();
    assert!(matches!(ready, Ok(Ok(true))), "the child never started its step: {ready:?}");

    // Another build, alive, whose resources reconcile must keep.
    let exec = executor_with("crash", |_| {}).await;
    let dir = tempdir();
    let (_keep, stop) = StopSignal::new();
    let alive = step_run(isolated(job("alive", "quick", &["true"])), dir.path());
    assert_eq!(exec.run(&alive, Sink::new(), stop).await.ok(), Some(Outcome::Exited(0)));

    let crashed = exec.resources(Some(&BuildId::from("crashed"))).await.unwrap_or_else(|e| panic!("{e}"));
    // The running step's container, the workspace volume and the network.
    assert_eq!(crashed.len(), 3, "the crash should have left a container, a volume and a network: {crashed:?}");
    let removed = exec.reconcile(&[BuildId::from("alive")]).await.unwrap_or_else(|e| panic!("reconcile: {e}"));
    assert_eq!(removed, 3);
    let left = leftovers(exec.docker(), &instance).await;
    // The live build's step container may still be on its way out (removed in the background).
    let kept: Vec<&String> = left.iter().filter(|l| !l.starts_with("container")).collect();
    assert_eq!(kept.len(), 2, "the live build's volume and network stay: {left:?}");
    assert!(left.iter().all(|l| l.contains("-alive-")), "only the live build's resources may stay: {left:?}");
    // Reconciling again finds nothing more to do.
    assert_eq!(exec.reconcile(&[BuildId::from("alive")]).await.ok(), Some(0));
    cleanup(&exec, "alive").await;
    assert_nothing_left(&exec).await;
}

/// Starts `job` on an executor of its own, waits for `ready` on stdout, then lets that executor
/// go as a stopping engine does (`detach`) and drops the run. Returns what the sink got.
async fn start_and_detach(test: &str, run: cib_core::ports::StepRun, ready: &str) -> Arc<Sink> {
    let first = executor(test).await;
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let running = tokio::spawn({
        let (first, sink) = (first.clone(), sink.clone());
        async move { first.run(&run, sink, stop).await }
    });
    sink.wait_for(Stream::Stdout, ready, Duration::from_secs(30)).await;
    first.detach();
    running.abort();
    let _ = running.await;
    sink
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_left_by_a_detached_engine_is_re_attached_from_the_stored_offset() {
    use cib_core::ports::Attached;
    let dir = tempdir();
    let slow = isolated(job("attach", "slow", &["echo before", "sleep 2", "echo after >&2", "exit 7"]));
    let seen = start_and_detach("attach", step_run(slow.clone(), dir.path()), "before").await;
    let exec = executor("attach").await;
    assert_eq!(step_containers(exec.docker(), &exec.options().instance).await.len(), 1, "the step runs on");

    // Still running: followed from where the first engine's output stopped, to its exit.
    let offset = seen.text(Stream::Stdout).len() as u64;
    let follow = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let attached = exec.attach(&step_run(slow.clone(), dir.path()), offset, follow.clone(), stop).await;
    let attached = attached.unwrap_or_else(|e| panic!("attach: {e}"));
    assert_eq!(attached, Attached::Ended { outcome: Outcome::Exited(7), was_running: true });
    assert_eq!(follow.text(Stream::Stdout), "", "nothing printed before the offset comes again");
    assert_eq!(follow.text(Stream::Stderr), "after\n");
    assert!(step_containers(exec.docker(), &exec.options().instance).await.is_empty(), "followed, then removed");
    let (_keep, stop) = StopSignal::new();
    let again = exec.attach(&step_run(slow, dir.path()), 0, Sink::new(), stop).await;
    assert_eq!(again.ok(), Some(Attached::Gone), "a second look finds nothing");

    // Ended while no engine watched: its exit code and the whole output are still there.
    let mut quick = isolated(job("attach", "quick", &["echo one", "sleep 1", "echo two"]));
    quick.attempt = 2;
    start_and_detach("attach", step_run(quick.clone(), dir.path()), "one").await;
    let ids = step_containers(exec.docker(), &exec.options().instance).await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let waited: Vec<_> = exec.docker().wait_container(&ids[0], None).collect().await;
    assert!(!waited.is_empty(), "the step's container ended");
    let follow = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let attached = exec.attach(&step_run(quick, dir.path()), 0, follow.clone(), stop).await;
    assert_eq!(attached.ok(), Some(Attached::Ended { outcome: Outcome::Exited(0), was_running: false }));
    assert_eq!(follow.text(Stream::Stdout), "one\ntwo\n");

    cleanup(&exec, "attach").await;
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_attached_step_is_stopped_when_asked() {
    use cib_core::ports::Attached;
    let dir = tempdir();
    let long = isolated(job("attach-stop", "long", &["echo ready", "sleep 300"]));
    start_and_detach("attach-stop", step_run(long.clone(), dir.path()), "ready").await;
    let exec = executor("attach-stop").await;
    let (handle, stop) = StopSignal::new();
    handle.stop(StopReason::TimedOut);
    let attached = exec.attach(&step_run(long, dir.path()), 6, Sink::new(), stop).await;
    assert_eq!(attached.ok(), Some(Attached::Ended { outcome: Outcome::TimedOut, was_running: true }));
    cleanup(&exec, "attach-stop").await;
    assert_nothing_left(&exec).await;
}
