//! The engine with the fakes: builds run end to end, inputs are journaled, and a restart
//! replays the journal and re-attaches to the steps the previous process left running (or,
//! when nothing of one is left, reports it interrupted). Stopping drains.

use std::sync::Arc;
use std::time::Duration;

use cib_core::engine::{Engine, EngineConfig, EngineHandle, Ports, SnapshotPolicy};
use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::pipeline::{BuildContext, BuildState, Config, Input};
use cib_core::ports::{BuildStatus, Clock, LogKey, Store};
use cib_core::spec::TriggerEvent;
use cib_core::testing::{
    FakeExecutor, FakeVcs, ManualClock, MemoryStore, RecordingNotifier, StaticSecrets, SystemClock,
};
use cib_core::time::Timestamp;

struct World {
    vcs: Arc<FakeVcs>,
    executor: Arc<FakeExecutor>,
    store: Arc<MemoryStore>,
    notifier: Arc<RecordingNotifier>,
    clock: Arc<dyn Clock>,
    workspaces: tempfile::TempDir,
}

impl World {
    fn new(clock: Arc<dyn Clock>) -> Self {
        World {
            vcs: FakeVcs::new(),
            executor: FakeExecutor::new(),
            store: MemoryStore::new(),
            notifier: RecordingNotifier::new(),
            clock,
            workspaces: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn start(&self) -> (EngineHandle, tokio::task::JoinHandle<Result<(), cib_core::engine::EngineError>>) {
        self.start_with(SnapshotPolicy::default())
    }

    fn start_with(
        &self,
        snapshots: SnapshotPolicy,
    ) -> (EngineHandle, tokio::task::JoinHandle<Result<(), cib_core::engine::EngineError>>) {
        let (handle, future) = self.engine(snapshots);
        (handle, tokio::spawn(future))
    }

    /// An engine not yet running: the caller drives the future.
    fn engine(
        &self,
        snapshots: SnapshotPolicy,
    ) -> (EngineHandle, impl std::future::Future<Output = Result<(), cib_core::engine::EngineError>> + use<>) {
        let ports = Ports {
            executor: self.executor.clone(),
            vcs: self.vcs.clone(),
            store: self.store.clone(),
            notifiers: vec![self.notifier.clone()],
            clock: self.clock.clone(),
            secrets: Arc::new(StaticSecrets([("TOKEN".to_owned(), "hunter2".to_owned())].into())),
            publisher: Arc::new(cib_core::publish::NoPublisher),
            artifacts: Arc::new(cib_core::ports::NoArtifacts),
        };
        let config = EngineConfig {
            machine: Config::default(),
            workspace_root: self.workspaces.path().to_path_buf(),
            tick_every: Duration::from_secs(30),
            reconcile_every: cib_core::engine::RECONCILE_EVERY,
            snapshots,
        };
        Engine::start(ports, config)
    }

    /// Commits the spec and returns the input that builds `pipeline` at that commit.
    fn enqueue(&self, build: &str, spec: &str, pipeline: &str) -> Input {
        let commit = self.vcs.commit("acme/shop", "master", &[(".cib.yml", spec), ("README", "hello")]);
        Input::Enqueue {
            build: BuildId::from(build),
            spec: Arc::from(spec),
            pipeline: pipeline.into(),
            context: BuildContext {
                repo: "acme/shop".into(),
                commit,
                branch: Some("feature/x".into()),
                pull_request: None,
                event: TriggerEvent::push("feature/x"),
                actor: Some("dev".into()),
                trusted: true,
                upstream: None,
            },
            only: None,
            variables: Default::default(),
        }
    }

    async fn finished(&self, build: &str) -> Conclusion {
        let event = self
            .notifier
            .wait_for(
                Duration::from_secs(30),
                |e| matches!(&e.body, EventBody::BuildFinished { build: b, .. } if b.0 == build),
            )
            .await
            .unwrap_or_else(|| panic!("build {build} did not finish: {:#?}", self.notifier.events()));
        match event.body {
            EventBody::BuildFinished { conclusion, .. } => conclusion,
            _ => unreachable!("matched above"),
        }
    }
}

fn step_events(events: &[Event], build: &str) -> Vec<(String, u32, StepConclusion)> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::StepFinished { build: b, step, attempt, conclusion, .. } if b.0 == build => {
                Some((step.clone(), *attempt, *conclusion))
            }
            _ => None,
        })
        .collect()
}

const SPEC: &str = r#"
pipelines:
  test:
    steps:
      - { name: hello, image: busybox, commands: ["echo hello from $CIB_STEP", "echo token=$TOKEN"], secrets: [TOKEN] }
      - { name: unit, image: busybox, commands: [true], depends_on: [hello], retry: { count: 1 } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_runs_end_to_end_with_logs_events_and_cleanup() {
    let world = World::new(Arc::new(SystemClock));
    let (engine, task) = world.start();
    let mut live = engine.subscribe();
    engine.submit(world.enqueue("b1", SPEC, "test")).await.expect("submit");
    assert_eq!(world.finished("b1").await, Conclusion::Success);

    let key = LogKey { build: BuildId::from("b1"), step: "hello".into(), attempt: 1 };
    let log = world.store.read_log(&key, 0, 1 << 20).await.expect("log");
    let text = String::from_utf8_lossy(&log.data);
    assert!(text.contains("hello from hello"), "{text}");
    assert!(text.contains("token=***") && !text.contains("hunter2"), "secrets are masked: {text}");
    assert!(log.complete, "the log is finished when the step is");
    let marks = world.store.log_times(&key, 0, 100).await.expect("time marks");
    assert_eq!(marks.first().map(|(offset, _)| *offset), Some(0), "the output's arrival is marked: {marks:?}");

    let stored = world.store.events_after(0, 1000).await.expect("events");
    assert_eq!(stored, world.notifier.events(), "the store and the notifier saw the same events");
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "sequence numbers have no gaps");
    assert_eq!(live.recv().await.expect("live event").seq, 1, "subscribers see events live");
    assert!(world.store.input_count() >= 3, "every input is journaled");
    // Cleanup runs on a task of its own after the build's end is published, so it is waited for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !world.executor.cleaned().contains(&BuildId::from("b1")) {
        assert!(tokio::time::Instant::now() < deadline, "the build was cleaned up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A finished build leaves the machine; its record is in the store.
    let state = engine.query(|m| m.build(&"b1".into()).map(|b| b.state.clone())).await.expect("query");
    assert_eq!(state, None, "the machine forgot the finished build");
    let record = world.store.build(&"b1".into()).await.expect("read").expect("the build is recorded");
    assert_eq!(record.build.status, BuildStatus::Success);
    // The same enqueue again (a replayed delivery) does not run the build a second time.
    let runs = world.executor.runs().len();
    engine.submit(world.enqueue("b1", SPEC, "test")).await.expect("submit again");
    assert_eq!(world.executor.runs().len(), runs, "nothing ran again");
    assert_eq!(engine.query(|m| m.builds().count()).await.expect("query"), 0, "and the machine holds nothing");
    engine.shutdown().await;
    task.await.expect("join").expect("engine ended cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infrastructure_errors_are_retried_and_failures_are_not() {
    let world = World::new(Arc::new(SystemClock));
    world.executor.fail_infrastructure("unit", 1);
    let (engine, _task) = world.start();
    engine.submit(world.enqueue("b1", SPEC, "test")).await.expect("submit");
    assert_eq!(world.finished("b1").await, Conclusion::Success);
    let steps = step_events(&world.notifier.events(), "b1");
    assert_eq!(
        steps,
        [
            ("hello".into(), 1, StepConclusion::Success),
            ("unit".into(), 1, StepConclusion::Errored),
            ("unit".into(), 2, StepConclusion::Success)
        ]
    );

    let failing = "pipelines:\n  test:\n    steps:\n      - { name: unit, image: busybox, commands: [\"echo no\", exit 4], retry: { count: 2 } }\n";
    engine.submit(world.enqueue("b2", failing, "test")).await.expect("submit");
    assert_eq!(world.finished("b2").await, Conclusion::Failed);
    assert_eq!(step_events(&world.notifier.events(), "b2"), [("unit".into(), 1, StepConclusion::Failed)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_the_handle_stops_the_running_step() {
    let world = World::new(Arc::new(SystemClock));
    let (engine, _task) = world.start();
    let spec =
        "pipelines:\n  test:\n    steps:\n      - { name: slow, image: busybox, commands: [echo started, sleep 60] }\n";
    engine.submit(world.enqueue("b1", spec, "test")).await.expect("submit");
    world
        .notifier
        .wait_for(Duration::from_secs(10), |e| matches!(e.body, EventBody::StepStarted { .. }))
        .await
        .expect("step started");
    engine
        .submit(Input::Cancel { build: "b1".into(), by: "alice".into(), reason: "not needed".into() })
        .await
        .expect("cancel");
    assert_eq!(world.finished("b1").await, Conclusion::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_timeout_is_a_timer_of_the_machine() {
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let world = World::new(clock.clone());
    let (engine, _task) = world.start();
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: quiet, image: busybox, commands: [echo one, sleep 600], no_output_timeout: 1m }\n";
    engine.submit(world.enqueue("b1", spec, "test")).await.expect("submit");
    world
        .notifier
        .wait_for(Duration::from_secs(10), |e| matches!(e.body, EventBody::StepStarted { .. }))
        .await
        .expect("step started");
    // The step's line must be out before time moves, or it would count as output at the later time.
    wait_for_log(&world, &LogKey { build: BuildId::from("b1"), step: "quiet".into(), attempt: 1 }, "one").await;
    clock.advance(Duration::from_secs(61));
    assert_eq!(world.finished("b1").await, Conclusion::TimedOut);
    let detail = world.notifier.events().iter().find_map(|e| match &e.body {
        EventBody::StepFinished { detail, .. } => Some(detail.clone()),
        _ => None,
    });
    assert_eq!(detail.as_deref(), Some("printed nothing for too long"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replays_the_journal_and_re_attaches_to_running_steps() {
    let world = World::new(Arc::new(SystemClock));
    let (first, task) = world.start();
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: slow, image: busybox, commands: [echo before, sleep 1, echo after] }\n";
    first.submit(world.enqueue("b1", spec, "test")).await.expect("submit");
    world
        .notifier
        .wait_for(Duration::from_secs(10), |e| matches!(e.body, EventBody::StepStarted { .. }))
        .await
        .expect("step started");
    let key = LogKey { build: BuildId::from("b1"), step: "slow".into(), attempt: 1 };
    // The first engine dies with the step running, once its first line is stored.
    wait_for_log(&world, &key, "before").await;
    let before = first.query(|m| m.build(&"b1".into()).cloned()).await.expect("query").expect("build");
    world.executor.sever();
    task.abort();
    let _ = task.await;

    let (second, _task) = world.start();
    let replayed = second.query(|m| m.build(&"b1".into()).map(|b| b.steps[0].attempts.len())).await.expect("query");
    assert!(replayed.is_some_and(|n| n >= 1), "the journal rebuilt the build");
    assert_eq!(world.finished("b1").await, Conclusion::Success);
    assert_eq!(step_events(&world.notifier.events(), "b1"), [("slow".into(), 1, StepConclusion::Success)]);
    assert_eq!(
        world.executor.attached(),
        std::slice::from_ref(&key),
        "the second engine followed the first one's attempt"
    );
    assert_eq!(world.executor.runs().len(), 1, "and ran nothing again");
    let log = world.store.read_log(&key, 0, 1 << 20).await.expect("log");
    assert_eq!(String::from_utf8_lossy(&log.data), "before\nafter\n", "the output goes on from the stored offset");
    assert!(log.complete);
    assert_eq!(before.state, BuildState::Running);
    let seqs: Vec<u64> = world.store.events_after(0, 1000).await.expect("events").iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "numbering goes on across the restart");
    // The checkout the first engine made goes with the build, though the second never made it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(world.workspaces.path()).map(|d| d.count()).unwrap_or(0) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the build's workspace directory was left behind");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for_log(world: &World, key: &LogKey, text: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = world.store.read_log(key, 0, 1 << 20).await.expect("log");
        if String::from_utf8_lossy(&log.data).contains(text) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the log never showed {text:?}");
        // The store has no change notification; its log is polled briefly.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a build whose middle step prints `started` and sleeps, kills the engine once that
/// line is stored, throws the step's attempt away (a daemon restart) and starts a new engine.
async fn lose_a_running_step(world: &World, pipeline: &str, kind: &str) -> (EngineHandle, Conclusion) {
    let spec = format!(
        "pipelines:\n  {pipeline}:\n    kind: {kind}\n    on: {{ manual: {{}} }}\n    steps:\n      - {{ name: one, image: busybox, commands: [true] }}\n      - {{ name: two, image: busybox, commands: [echo started, sleep 2, echo done], depends_on: [one] }}\n      - {{ name: three, image: busybox, commands: [true], depends_on: [two] }}\n"
    );
    let (first, task) = world.start();
    first.submit(world.enqueue("b1", &spec, pipeline)).await.expect("submit");
    wait_for_log(world, &LogKey { build: BuildId::from("b1"), step: "two".into(), attempt: 1 }, "started").await;
    world.executor.sever();
    task.abort();
    let _ = task.await;
    world.executor.lose(&BuildId::from("b1"));
    let (second, _task) = world.start();
    let conclusion = world.finished("b1").await;
    (second, conclusion)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_step_of_a_test_pipeline_is_interrupted_and_run_once_more() {
    let world = World::new(Arc::new(SystemClock));
    let (_engine, conclusion) = lose_a_running_step(&world, "test", "test").await;
    assert_eq!(conclusion, Conclusion::Success);
    assert_eq!(
        step_events(&world.notifier.events(), "b1"),
        [
            ("one".into(), 1, StepConclusion::Success),
            ("two".into(), 1, StepConclusion::Interrupted),
            ("two".into(), 2, StepConclusion::Success),
            ("three".into(), 1, StepConclusion::Success),
        ]
    );
    let retried = world.notifier.events().iter().any(|e| {
        matches!(&e.body, EventBody::StepFinished { attempt: 1, will_retry: true, detail, .. } if detail.starts_with("interrupted"))
    });
    assert!(retried, "the interruption is reported as such, with a retry: {:#?}", world.notifier.events());
    let record = world.store.build(&BuildId::from("b1")).await.expect("read").expect("record");
    let statuses: Vec<String> =
        record.steps.iter().map(|s| format!("{}#{} {}", s.name, s.attempt, s.status.as_str())).collect();
    assert!(statuses.contains(&"two#1 interrupted".to_owned()), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_step_of_a_deploy_pipeline_is_interrupted_and_never_run_again() {
    let world = World::new(Arc::new(SystemClock));
    let (_engine, conclusion) = lose_a_running_step(&world, "staging", "deploy").await;
    assert_eq!(conclusion, Conclusion::Errored);
    let steps = step_events(&world.notifier.events(), "b1");
    assert_eq!(steps, [("one".into(), 1, StepConclusion::Success), ("two".into(), 1, StepConclusion::Interrupted)]);
    let two_runs = world.executor.runs().iter().filter(|j| j.step.name == "two").count();
    assert_eq!(two_runs, 1, "a deploy step is never run again by itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_starts_nothing_new_and_the_next_start_goes_on() {
    let world = World::new(Arc::new(SystemClock));
    let (first, task) = world.start();
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: a, image: busybox, commands: [echo a, sleep 0.5] }\n      - { name: b, image: busybox, commands: [echo b], depends_on: [a] }\n";
    first.submit(world.enqueue("b1", spec, "test")).await.expect("submit");
    world
        .notifier
        .wait_for(Duration::from_secs(10), |e| matches!(e.body, EventBody::StepStarted { .. }))
        .await
        .expect("step started");
    assert!(first.drain(Duration::from_secs(10)).await.expect("drain"), "the running step finished within the grace");
    // The store has every event of the inputs handled so far; notifiers hear of them later.
    let events = world.store.events_after(0, 1000).await.expect("events");
    assert_eq!(step_events(&events, "b1"), [("a".into(), 1, StepConclusion::Success)], "the step ran to its end");
    let b_started = events.iter().any(|e| matches!(&e.body, EventBody::StepStarted { step, .. } if step == "b"));
    assert!(!b_started, "nothing new starts while draining");
    first.shutdown().await;
    task.await.expect("join").expect("engine ended cleanly");

    let (_second, _task) = world.start();
    assert_eq!(world.finished("b1").await, Conclusion::Success, "the next start resumes the build");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_grace_leaves_the_step_for_the_next_start() {
    let world = World::new(Arc::new(SystemClock));
    let (first, task) = world.start();
    let spec =
        "pipelines:\n  test:\n    steps:\n      - { name: a, image: busybox, commands: [echo a, sleep 1, echo z] }\n";
    first.submit(world.enqueue("b1", spec, "test")).await.expect("submit");
    let key = LogKey { build: BuildId::from("b1"), step: "a".into(), attempt: 1 };
    wait_for_log(&world, &key, "a").await;
    assert!(!first.drain(Duration::from_millis(50)).await.expect("drain"), "the step outlasts a short grace");
    first.shutdown().await;
    task.await.expect("join").expect("engine ended cleanly");
    let events = world.store.events_after(0, 1000).await.expect("events");
    assert!(step_events(&events, "b1").is_empty(), "the step was not failed");

    let (_second, _task) = world.start();
    assert_eq!(world.finished("b1").await, Conclusion::Success);
    assert_eq!(step_events(&world.notifier.events(), "b1"), [("a".into(), 1, StepConclusion::Success)]);
    assert_eq!(world.executor.attached(), [key]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_five_minutes_what_no_live_build_holds_is_removed() {
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let world = World::new(clock.clone());
    let (engine, _task) = world.start();
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: long, image: busybox, commands: [sleep 600] }\n";
    engine.submit(world.enqueue("b1", spec, "test")).await.expect("submit");
    world
        .notifier
        .wait_for(Duration::from_secs(10), |e| matches!(e.body, EventBody::StepStarted { .. }))
        .await
        .expect("step started");
    // What a crash left: something held for a build the machine no longer runs. (The engine's
    // start has already reconciled once.)
    world.executor.leak("ghost");

    // Before five minutes nothing is touched.
    clock.advance(Duration::from_secs(290));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(world.executor.live_builds().contains(&BuildId::from("ghost")), "too early to reconcile");

    // After them, the ghost is gone and the running build keeps what it holds.
    clock.advance(Duration::from_secs(20));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while world.executor.live_builds().contains(&BuildId::from("ghost")) {
        assert!(std::time::Instant::now() < deadline, "the ghost was never removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(world.executor.live_builds(), [BuildId::from("b1")], "the live build is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_journal_and_a_restart_from_one_re_attaches() {
    let world = World::new(Arc::new(SystemClock));
    // A snapshot after every input: the journal never holds more than the input in hand.
    let every_input = SnapshotPolicy { every_inputs: 1, every: Duration::from_secs(600) };
    let (first, task) = world.start_with(every_input);
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: slow, image: busybox, commands: [echo before, sleep 1, echo after] }\n";
    first.submit(world.enqueue("b1", spec, "test")).await.expect("submit");
    let key = LogKey { build: BuildId::from("b1"), step: "slow".into(), attempt: 1 };
    wait_for_log(&world, &key, "before").await;
    assert_eq!(first.journal_length(), 0, "the journal is cut at every snapshot");
    assert_eq!(world.store.input_count(), 0, "no input is left before the snapshot");
    let (seq, _) = world.store.latest_snapshot().await.expect("read").expect("a snapshot was written");
    assert!(seq >= 1, "the snapshot follows the inputs: {seq}");
    world.executor.sever();
    task.abort();
    let _ = task.await;

    let (second, _task) = world.start_with(every_input);
    let restored = second.query(|m| m.build(&"b1".into()).map(|b| b.steps[0].attempts.len())).await.expect("query");
    assert_eq!(restored, Some(1), "the snapshot holds the running build");
    assert_eq!(world.finished("b1").await, Conclusion::Success);
    assert_eq!(world.executor.attached(), std::slice::from_ref(&key), "the attempt was followed again");
    assert_eq!(world.executor.runs().len(), 1, "and nothing ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_ticks_are_not_journaled_and_a_snapshot_comes_with_time() {
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let world = World::new(clock.clone());
    let (engine, _task) = world.start();
    engine.submit(world.enqueue("b1", SPEC, "test")).await.expect("submit");
    assert_eq!(world.finished("b1").await, Conclusion::Success);
    let journaled = world.store.input_count();
    assert!(journaled >= 3, "the build's inputs are journaled: {journaled}");
    // Nine ticks with nothing to renew or expire, within the ten minutes between snapshots.
    for _ in 0..9 {
        clock.advance(Duration::from_secs(31));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.query(|_| ()).await.expect("the engine lives");
    assert_eq!(world.store.input_count(), journaled, "no quiet tick was journaled");
    assert!(world.store.latest_snapshot().await.expect("read").is_none(), "too early for a snapshot");
    for _ in 0..12 {
        clock.advance(Duration::from_secs(31));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.query(|_| ()).await.expect("the engine lives");
    assert!(world.store.latest_snapshot().await.expect("read").is_some(), "ten minutes after the last input");
    assert_eq!(world.store.input_count(), 0, "the snapshot took the journal's place");
    assert_eq!(engine.journal_length(), 0);
}

/// Inputs that wait together are handled as one batch with one write to the store, and the
/// journal it leaves replays to the same builds: a restart runs none of them again, and the
/// same deliveries sent again are recognised as builds that already ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_waiting_together_are_journaled_in_one_write_and_replay_the_same() {
    const BUILDS: usize = 40;
    let world = World::new(Arc::new(SystemClock));
    let (engine, future) = world.engine(SnapshotPolicy::default());
    // Each on a branch of its own, so that no build supersedes another.
    let inputs: Vec<Input> = (0..BUILDS)
        .map(|i| match world.enqueue(&format!("b{i}"), SPEC, "test") {
            Input::Enqueue { build, spec, pipeline, mut context, only, variables } => {
                context.branch = Some(format!("feature/{i}"));
                context.event = TriggerEvent::push(&format!("feature/{i}"));
                Input::Enqueue { build, spec, pipeline, context, only, variables }
            }
            _ => unreachable!("an enqueue"),
        })
        .collect();
    // Every submit is in the engine's queue before the engine runs.
    let mut submits = tokio::task::JoinSet::new();
    for input in inputs.clone() {
        let engine = engine.clone();
        submits.spawn(async move { engine.submit(input).await });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let task = tokio::spawn(future);
    while let Some(done) = submits.join_next().await {
        done.expect("submit task").expect("submit");
    }
    for i in 0..BUILDS {
        assert_eq!(world.finished(&format!("b{i}")).await, Conclusion::Success);
    }
    let writes = world.store.journal_writes();
    let journaled = world.store.input_count();
    assert!(writes < journaled, "{writes} writes for {journaled} inputs: nothing was batched");
    let runs = world.executor.runs().len();
    assert_eq!(runs, BUILDS * 2, "each build ran its two steps once");
    let finished =
        |events: &[Event]| events.iter().filter(|e| matches!(e.body, EventBody::BuildFinished { .. })).count();
    assert_eq!(finished(&world.notifier.events()), BUILDS, "each build finished once");
    engine.shutdown().await;
    task.await.expect("engine task").expect("engine");

    // A restart replays the journal; the deliveries sent again find builds that already ran.
    let (engine, task) = world.start();
    for input in inputs {
        engine.submit(input).await.expect("submit again");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(world.executor.runs().len(), runs, "no build ran again");
    for i in 0..BUILDS {
        let record = world.store.build(&BuildId::from(format!("b{i}").as_str())).await.expect("read").expect("record");
        assert_eq!(record.build.status, BuildStatus::Success, "b{i}");
    }
    engine.shutdown().await;
    task.await.expect("engine task").expect("engine");
}
