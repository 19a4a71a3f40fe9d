//! Scenario tests of the pipeline machine: inputs at explicit times, and the trace of effects
//! and events they cause, pinned with insta. Each trace reads as a story: `@time input` lines,
//! each followed by the effects it caused.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use cib_core::event::{BuildId, Conclusion, StepConclusion};
use cib_core::lease::{Holder, LeaseId, PoolConfig, Request, Unit, Want};
use cib_core::pipeline::{
    Actor, BuildContext, BuildState, Config, Effect, Input, Machine, StepResult, StepStatus, TimerId,
};
use cib_core::spec::TriggerEvent;
use cib_core::time::Timestamp;

pub struct Sim {
    pub machine: Machine,
    pub trace: String,
    /// Every input with its time, for replay tests.
    pub inputs: Vec<(Input, Timestamp)>,
}

pub fn context(branch: &str) -> BuildContext {
    BuildContext {
        repo: "acme/shop".into(),
        commit: format!("c0ffee-{branch}"),
        branch: Some(branch.into()),
        pull_request: None,
        event: TriggerEvent::push(branch),
        actor: Some("dev".into()),
        trusted: true,
        upstream: None,
    }
}

pub fn person(login: &str) -> Actor {
    Actor { login: login.into(), teams: Vec::new(), can_write: true }
}

fn timer_text(t: &TimerId) -> String {
    match t {
        TimerId::BuildTimeout { build } => format!("build-timeout {build}"),
        TimerId::StepTimeout { build, step, attempt } => format!("step-timeout {build}/{step}#{attempt}"),
        TimerId::NoOutput { build, step, attempt } => format!("no-output {build}/{step}#{attempt}"),
        TimerId::Gate { build, step } => format!("gate {build}/{step}"),
        TimerId::Leases => "leases".into(),
        TimerId::PublishRetry { build, attempt } => format!("publish-retry {build}#{attempt}"),
    }
}

fn input_text(input: &Input) -> String {
    match input {
        Input::Enqueue { build, pipeline, context, .. } => {
            format!("enqueue {build} {pipeline} on {}", context.branch.as_deref().unwrap_or("-"))
        }
        Input::StepFinished { build, step, attempt, result } => format!("finished {build}/{step}#{attempt} {result:?}"),
        Input::StepOutput { build, step, attempt, at } => format!("output {build}/{step}#{attempt} at {}", at.millis()),
        Input::ServiceReady { build, service } => format!("service ready {build}/{service}"),
        Input::ServiceFailed { build, service, message } => format!("service failed {build}/{service}: {message}"),
        Input::TimerFired { timer } => format!("timer {}", timer_text(timer)),
        Input::Cancel { build, by, reason } => format!("cancel {build} by {by}: {reason}"),
        Input::Decide { build, step, actor, approve, .. } => {
            format!("{} {build}/{step} by {}", if *approve { "approve" } else { "reject" }, actor.login)
        }
        Input::DecideAs { build, step, actor, person, approve, .. } => {
            let verb = if *approve { "approve" } else { "reject" };
            format!("{verb} {build}/{step} by {} as {person}", actor.login)
        }
        Input::CommitAuthor { repo, commit, person } => format!("commit {repo}@{commit} written by {person}"),
        Input::TakeLease { request } => format!("take lease {} {:?}", request.id, request.wants),
        Input::RenewLease { lease, token } => format!("renew lease {lease} token {token}"),
        Input::ExtendLease { lease, token, until } => {
            format!("extend lease {lease} token {token} until {}", until.millis())
        }
        Input::ReturnLease { lease, token } => format!("return lease {lease} token {token}"),
        Input::RevokeLease { lease } => format!("revoke lease {lease}"),
        Input::CancelLeaseRequest { lease } => format!("cancel lease request {lease}"),
        Input::Tick => "tick".into(),
        Input::Drain => "drain".into(),
        Input::Resume => "resume".into(),
        Input::Configure { config } => {
            format!("configure {} slots, {} pools", config.max_running_steps, config.pools.len())
        }
        Input::Review { repo, commit, actor } => format!("review {repo}@{commit} by {}", actor.login),
        Input::ApprovePromotion { repo, commit, actor } => {
            format!("approve promotion {repo}@{commit} by {}", actor.login)
        }
        Input::PullRequest { repo, number, open, .. } => format!("pull request {repo}#{number} open={open}"),
        Input::UpToDate { repo, number, behind, .. } => format!("up to date {repo}#{number} behind={behind}"),
        Input::TrustFork { repo, number, head_commit, by } => {
            format!("trust fork {repo}#{number} at {head_commit} by {by}")
        }
        Input::Answer { repo, number, text } => format!("answer {repo}#{number}: {text}"),
        Input::SpecInvalid { repo, commit, diagnostics, .. } => {
            format!("spec invalid {repo}@{commit}: {}", diagnostics.join("; "))
        }
        Input::Published { build, attempt, outcome } => format!("published {build}#{attempt} {outcome:?}"),
        Input::Moved { repo, branch, commit, by, promotion, .. } => {
            format!("moved {repo} {branch} to {commit} by {by}{}", if *promotion { " (promotion)" } else { "" })
        }
    }
}

fn effect_text(effect: &Effect) -> String {
    match effect {
        Effect::Publish(e) => {
            let mut body = serde_json::to_value(&e.body).expect("event json");
            let kind = body.get("type").and_then(|t| t.as_str()).unwrap_or("?").to_owned();
            if let Some(map) = body.as_object_mut() {
                map.remove("type");
            }
            format!("#{} {kind} {body}", e.seq)
        }
        Effect::StartStep(job) => {
            let resources: Vec<String> = job
                .env
                .iter()
                .filter(|(k, _)| k.starts_with("CIB_RESOURCE_"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let mut text = format!("start {}/{}#{}", job.build, job.step.name, job.attempt);
            if !resources.is_empty() {
                write!(text, " [{}]", resources.join(" ")).expect("write");
            }
            text
        }
        Effect::StopStep { build, step, attempt, reason } => format!("stop {build}/{step}#{attempt} ({reason:?})"),
        Effect::StartServices { build, services } => {
            format!(
                "start services {build}: {}",
                services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        }
        Effect::Cleanup { build } => format!("cleanup {build}"),
        Effect::ArmTimer { timer, at } => format!("arm {} at {}", timer_text(timer), at.millis()),
        Effect::CancelTimer { timer } => format!("disarm {}", timer_text(timer)),
        Effect::PublishDeliverables(job) => {
            let promoted: Vec<String> = job.promoted.iter().map(|r| r.artifact.digest.clone()).collect();
            format!(
                "publish {}#{} {} deliverables, promoting [{}]",
                job.build,
                job.attempt,
                job.deliverables.len(),
                promoted.join(", ")
            )
        }
    }
}

impl Sim {
    pub fn new(config: Config) -> Self {
        Sim { machine: Machine::new(config).expect("valid config"), trace: String::new(), inputs: Vec::new() }
    }

    pub fn with_pools(pools: Vec<PoolConfig>) -> Self {
        Sim::new(Config { pools, ..Config::default() })
    }

    pub fn input(&mut self, at: u64, input: Input) -> Vec<Effect> {
        writeln!(self.trace, "@{at} {}", input_text(&input)).expect("write");
        self.inputs.push((input.clone(), Timestamp(at)));
        let effects = self.machine.handle(input, Timestamp(at));
        for e in &effects {
            writeln!(self.trace, "    {}", effect_text(e)).expect("write");
        }
        effects
    }

    pub fn enqueue(&mut self, at: u64, build: &str, spec: &str, pipeline: &str, context: BuildContext) {
        self.enqueue_only(at, build, spec, pipeline, context, None);
    }

    pub fn enqueue_only(
        &mut self,
        at: u64,
        build: &str,
        spec: &str,
        pipeline: &str,
        context: BuildContext,
        only: Option<Vec<String>>,
    ) {
        let input = Input::Enqueue {
            build: BuildId::from(build),
            spec: Arc::from(spec),
            pipeline: pipeline.into(),
            context,
            only,
            variables: Default::default(),
        };
        self.input(at, input);
    }

    pub fn finish(&mut self, at: u64, build: &str, step: &str, attempt: u32, result: StepResult) {
        self.input(at, Input::StepFinished { build: build.into(), step: step.into(), attempt, result });
    }

    pub fn timer(&mut self, at: u64, timer: TimerId) {
        self.input(at, Input::TimerFired { timer });
    }

    pub fn decide(&mut self, at: u64, build: &str, step: &str, actor: Actor, approve: bool) {
        self.input(at, Input::Decide { build: build.into(), step: step.into(), actor, approve, comment: None });
    }

    pub fn state(&self, build: &str) -> BuildState {
        self.machine.build(&BuildId::from(build)).map(|b| b.state.clone()).expect("build exists")
    }

    pub fn token(&self, lease: &str) -> u64 {
        self.machine.leases().lease(&LeaseId::new(lease)).map(|l| l.token).expect("live lease")
    }
}

const ONE_STEP: &str =
    "pipelines:\n  test:\n    steps:\n      - { name: unit, image: busybox, commands: [make test] }\n";

fn finished(sim: &Sim, build: &str, conclusion: Conclusion) {
    assert_eq!(sim.state(build), BuildState::Finished(conclusion), "{}", sim.trace);
}

#[test]
fn success() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", ONE_STEP, "test", context("feature/a"));
    sim.finish(1_500, "b1", "unit", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn failure() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", ONE_STEP, "test", context("feature/a"));
    sim.finish(900, "b1", "unit", 1, StepResult::Exited(2));
    finished(&sim, "b1", Conclusion::Failed);
    insta::assert_snapshot!(sim.trace);
}

const DAG: &str = r#"
pipelines:
  test:
    steps:
      - { name: lint, image: busybox, commands: [lint] }
      - { name: unit, image: busybox, commands: [unit] }
      - { name: package, image: busybox, commands: [pack], depends_on: [lint, unit] }
      - { name: docs, image: busybox, commands: [docs] }
"#;

#[test]
fn parallel_dag() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", DAG, "test", context("feature/a"));
    sim.finish(100, "b1", "unit", 1, StepResult::Exited(0));
    sim.finish(200, "b1", "docs", 1, StepResult::Exited(0));
    sim.finish(300, "b1", "lint", 1, StepResult::Exited(0));
    sim.finish(400, "b1", "package", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn run_slots_limit_running_steps() {
    let mut sim = Sim::new(Config { max_running_steps: 1, ..Config::default() });
    sim.enqueue(0, "b1", DAG, "test", context("feature/a"));
    sim.enqueue(10, "b2", ONE_STEP, "test", context("feature/b"));
    assert_eq!(sim.machine.running_steps(), 1);
    sim.finish(100, "b1", "lint", 1, StepResult::Exited(0));
    sim.finish(200, "b1", "unit", 1, StepResult::Exited(0));
    sim.finish(300, "b1", "docs", 1, StepResult::Exited(0));
    sim.finish(400, "b2", "unit", 1, StepResult::Exited(0));
    sim.finish(500, "b1", "package", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
    finished(&sim, "b2", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn failure_skips_dependents_but_not_independent_steps() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", DAG, "test", context("feature/a"));
    sim.finish(100, "b1", "lint", 1, StepResult::Exited(1));
    sim.finish(200, "b1", "unit", 1, StepResult::Exited(0));
    sim.finish(300, "b1", "docs", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Failed);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn allowed_failure_does_not_fail_the_build() {
    let spec = r#"
pipelines:
  test:
    steps:
      - { name: flaky, image: busybox, commands: [x], allow_failure: true }
      - { name: after, image: busybox, commands: [y], depends_on: [flaky] }
"#;
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "test", context("feature/a"));
    sim.finish(100, "b1", "flaky", 1, StepResult::Exited(1));
    sim.finish(200, "b1", "after", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

const RETRY_INFRA: &str = r#"
pipelines:
  test:
    steps:
      - { name: unit, image: busybox, commands: [x], retry: { count: 2, on: [infrastructure] } }
"#;

#[test]
fn retry_on_infrastructure_error_keeps_every_attempt() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", RETRY_INFRA, "test", context("feature/a"));
    sim.finish(100, "b1", "unit", 1, StepResult::Infrastructure("container could not start".into()));
    sim.finish(200, "b1", "unit", 2, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
    let build = sim.machine.build(&"b1".into()).expect("build");
    assert_eq!(build.steps[0].attempts.len(), 2, "every attempt is kept");
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn no_retry_on_a_test_failure() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", RETRY_INFRA, "test", context("feature/a"));
    sim.finish(100, "b1", "unit", 1, StepResult::Exited(1));
    finished(&sim, "b1", Conclusion::Failed);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn retries_run_out() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", RETRY_INFRA, "test", context("feature/a"));
    for attempt in 1..=3 {
        sim.finish(100 * u64::from(attempt), "b1", "unit", attempt, StepResult::Infrastructure("daemon gone".into()));
    }
    finished(&sim, "b1", Conclusion::Errored);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn retry_on_listed_exit_codes_only() {
    let spec = r#"
pipelines:
  test:
    steps:
      - { name: unit, image: busybox, commands: [x], retry: { count: 3, exit_codes: [75] } }
"#;
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "test", context("feature/a"));
    sim.finish(100, "b1", "unit", 1, StepResult::Exited(75));
    sim.finish(200, "b1", "unit", 2, StepResult::Exited(1));
    finished(&sim, "b1", Conclusion::Failed);
    insta::assert_snapshot!(sim.trace);
}

const TIMEOUTS: &str = r#"
pipelines:
  test:
    steps:
      - { name: unit, image: busybox, commands: [x], timeout: 10m, no_output_timeout: 1m }
"#;

#[test]
fn total_timeout_stops_the_step() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", TIMEOUTS, "test", context("feature/a"));
    for minute in 1..10 {
        let at = minute * 60_000 - 1_000;
        sim.input(at, Input::StepOutput { build: "b1".into(), step: "unit".into(), attempt: 1, at: Timestamp(at) });
        sim.timer(minute * 60_000, TimerId::NoOutput { build: "b1".into(), step: "unit".into(), attempt: 1 });
    }
    sim.timer(600_000, TimerId::StepTimeout { build: "b1".into(), step: "unit".into(), attempt: 1 });
    sim.finish(601_000, "b1", "unit", 1, StepResult::Cancelled);
    finished(&sim, "b1", Conclusion::TimedOut);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn no_output_timeout_is_rearmed_by_output_and_then_fires() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", TIMEOUTS, "test", context("feature/a"));
    sim.input(30_000, Input::StepOutput { build: "b1".into(), step: "unit".into(), attempt: 1, at: Timestamp(29_000) });
    sim.timer(60_000, TimerId::NoOutput { build: "b1".into(), step: "unit".into(), attempt: 1 });
    sim.timer(90_000, TimerId::NoOutput { build: "b1".into(), step: "unit".into(), attempt: 1 });
    sim.finish(90_500, "b1", "unit", 1, StepResult::Exited(137));
    finished(&sim, "b1", Conclusion::TimedOut);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn executor_reported_outcomes_are_data() {
    let spec = r#"
pipelines:
  test:
    steps:
      - { name: oom, image: busybox, commands: [x] }
      - { name: quiet, image: busybox, commands: [x] }
"#;
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "test", context("feature/a"));
    sim.finish(100, "b1", "oom", 1, StepResult::OutOfMemory);
    sim.finish(200, "b1", "quiet", 1, StepResult::NoOutput);
    finished(&sim, "b1", Conclusion::TimedOut);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn pipeline_timeout_ends_the_build() {
    let spec = "pipelines:\n  test:\n    timeout: 30m\n    steps:\n      - { name: unit, image: busybox, commands: [x] }\n      - { name: after, image: busybox, commands: [x], depends_on: [unit] }\n";
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "test", context("feature/a"));
    sim.timer(1_800_000, TimerId::BuildTimeout { build: "b1".into() });
    sim.finish(1_801_000, "b1", "unit", 1, StepResult::Cancelled);
    finished(&sim, "b1", Conclusion::TimedOut);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn cancel_stops_running_steps_and_cancels_the_rest() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", DAG, "test", context("feature/a"));
    sim.finish(100, "b1", "docs", 1, StepResult::Exited(0));
    sim.input(200, Input::Cancel { build: "b1".into(), by: "alice".into(), reason: "wrong branch".into() });
    assert_eq!(sim.state("b1"), BuildState::Running, "it waits for the running steps to stop");
    sim.finish(300, "b1", "lint", 1, StepResult::Cancelled);
    sim.finish(400, "b1", "unit", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Cancelled);
    // Cancelling twice, or a finished build, changes nothing.
    assert!(
        sim.machine
            .handle(Input::Cancel { build: "b1".into(), by: "bob".into(), reason: String::new() }, Timestamp(500))
            .is_empty()
    );
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn newer_push_supersedes_a_running_test_build() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", ONE_STEP, "test", context("feature/a"));
    sim.enqueue(100, "b2", ONE_STEP, "test", context("feature/a"));
    sim.enqueue(150, "b3", ONE_STEP, "test", context("feature/other"));
    sim.finish(200, "b1", "unit", 1, StepResult::Cancelled);
    sim.finish(300, "b2", "unit", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Cancelled);
    finished(&sim, "b2", Conclusion::Success);
    assert_eq!(sim.state("b3"), BuildState::Running, "another branch is not superseded");
    insta::assert_snapshot!(sim.trace);
}

const DEPLOY: &str =
    "pipelines:\n  staging:\n    steps:\n      - { name: deploy, image: busybox, commands: [./deploy.sh] }\n";

#[test]
fn deploy_builds_queue_in_order_and_are_never_superseded() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "d1", DEPLOY, "staging", context("master"));
    sim.enqueue(100, "d2", DEPLOY, "staging", context("master"));
    sim.enqueue(200, "d3", DEPLOY, "staging", context("master"));
    assert_eq!(sim.state("d2"), BuildState::WaitingForTurn);
    sim.finish(300, "d1", "deploy", 1, StepResult::Exited(0));
    assert_eq!(sim.state("d2"), BuildState::Running);
    assert_eq!(sim.state("d3"), BuildState::WaitingForTurn);
    sim.finish(400, "d2", "deploy", 1, StepResult::Exited(1));
    sim.finish(500, "d3", "deploy", 1, StepResult::Exited(0));
    finished(&sim, "d1", Conclusion::Success);
    finished(&sim, "d2", Conclusion::Failed);
    finished(&sim, "d3", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

const GATED: &str = r#"
pipelines:
  staging:
    steps:
      - { name: deploy, image: busybox, commands: [x] }
      - name: sign-off
        depends_on: [deploy]
        gate: { kind: approval, approvals: 2, from: { users: [alice, bob, carol] }, timeout: 1h, instructions: Read the notes. }
      - { name: announce, image: busybox, commands: [x], depends_on: [sign-off] }
"#;

#[test]
fn gate_approved_by_distinct_people() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", GATED, "staging", context("master"));
    sim.finish(100, "b1", "deploy", 1, StepResult::Exited(0));
    sim.decide(200, "b1", "sign-off", person("alice"), true);
    sim.decide(300, "b1", "sign-off", person("alice"), true);
    sim.decide(400, "b1", "sign-off", person("mallory"), true);
    sim.decide(500, "b1", "sign-off", person("bob"), true);
    sim.finish(600, "b1", "announce", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn gate_rejected() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", GATED, "staging", context("master"));
    sim.finish(100, "b1", "deploy", 1, StepResult::Exited(0));
    sim.decide(200, "b1", "sign-off", person("carol"), false);
    finished(&sim, "b1", Conclusion::Failed);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn gate_expired() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", GATED, "staging", context("master"));
    sim.finish(100, "b1", "deploy", 1, StepResult::Exited(0));
    sim.decide(200, "b1", "sign-off", person("alice"), true);
    sim.timer(3_600_100, TimerId::Gate { build: "b1".into(), step: "sign-off".into() });
    sim.decide(3_600_200, "b1", "sign-off", person("bob"), true);
    finished(&sim, "b1", Conclusion::TimedOut);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn hold_gate_for_manual_testing() {
    let spec = r#"
pipelines:
  staging:
    steps:
      - name: manual-qa
        gate: { kind: hold, from: { teams: [qa] }, instructions: Try checkout. }
"#;
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "staging", context("master"));
    sim.decide(100, "b1", "manual-qa", person("dev"), true);
    let tester = Actor { login: "quinn".into(), teams: vec!["qa".into()], can_write: false };
    sim.decide(200, "b1", "manual-qa", tester, true);
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn services_are_ready_before_steps_that_need_them_start() {
    let spec = r#"
pipelines:
  test:
    services:
      db: { image: postgres, ready: pg_isready }
    steps:
      - { name: unit, image: busybox, commands: [x] }
      - { name: lint, image: busybox, commands: [x], services: [] }
"#;
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "test", context("feature/a"));
    sim.input(500, Input::ServiceReady { build: "b1".into(), service: "db".into() });
    sim.finish(600, "b1", "lint", 1, StepResult::Exited(0));
    sim.finish(700, "b1", "unit", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn a_failed_service_errors_the_build() {
    let spec = "pipelines:\n  test:\n    services:\n      db: { image: postgres }\n    steps:\n      - { name: unit, image: busybox, commands: [x] }\n";
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "test", context("feature/a"));
    sim.input(
        500,
        Input::ServiceFailed { build: "b1".into(), service: "db".into(), message: "not ready after 60s".into() },
    );
    finished(&sim, "b1", Conclusion::Errored);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn when_conditions_and_finalizers() {
    let spec = r#"
pipelines:
  test:
    steps:
      - { name: unit, image: busybox, commands: [x] }
      - { name: docs-only, image: busybox, commands: [x], when: { branches: ["docs/**"] } }
      - { name: on-failure, image: busybox, commands: [x], when: { status: on_failure } }
      - { name: always, image: busybox, commands: [x], when: { status: always } }
"#;
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "test", context("feature/a"));
    sim.finish(100, "b1", "unit", 1, StepResult::Exited(1));
    sim.finish(200, "b1", "on-failure", 1, StepResult::Exited(0));
    sim.finish(300, "b1", "always", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Failed);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn a_spec_that_does_not_name_the_pipeline_errors_the_build() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", ONE_STEP, "nope", context("feature/a"));
    finished(&sim, "b1", Conclusion::Errored);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn late_and_repeated_reports_change_nothing() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", RETRY_INFRA, "test", context("feature/a"));
    sim.enqueue(1, "b1", RETRY_INFRA, "test", context("feature/a"));
    sim.finish(100, "b1", "unit", 1, StepResult::Infrastructure("lost".into()));
    sim.finish(150, "b1", "unit", 1, StepResult::Exited(0));
    sim.finish(160, "b1", "unit", 7, StepResult::Exited(0));
    sim.finish(170, "nope", "unit", 1, StepResult::Exited(0));
    sim.finish(200, "b1", "unit", 2, StepResult::Exited(0));
    sim.finish(250, "b1", "unit", 2, StepResult::Exited(1));
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

// ---- leases --------------------------------------------------------------------------------

fn staging_pool() -> Vec<PoolConfig> {
    vec![
        PoolConfig::units("staging-env", [Unit::new("stage-1").with_meta("host", "stage-1.example.com")]),
        PoolConfig::counting("licences", 2),
    ]
}

const STAGING: &str = r#"
pipelines:
  staging:
    resources: [{ pool: staging-env }]
    steps:
      - { name: deploy, image: busybox, commands: [x] }
      - { name: e2e, image: busybox, commands: [x], depends_on: [deploy], resources: [{ pool: licences, count: 2 }] }
"#;

#[test]
fn leases_wait_grant_and_release() {
    let mut sim = Sim::with_pools(staging_pool());
    sim.enqueue(0, "s1", STAGING, "staging", context("master"));
    sim.enqueue(10, "s2", STAGING, "staging", BuildContext { repo: "acme/other".into(), ..context("master") });
    assert_eq!(sim.state("s2"), BuildState::WaitingForResources);
    sim.finish(100, "s1", "deploy", 1, StepResult::Exited(0));
    sim.finish(200, "s1", "e2e", 1, StepResult::Exited(0));
    assert_eq!(sim.state("s2"), BuildState::Running);
    sim.finish(300, "s2", "deploy", 1, StepResult::Exited(0));
    sim.finish(400, "s2", "e2e", 1, StepResult::Exited(1));
    finished(&sim, "s2", Conclusion::Failed);
    assert_eq!(sim.machine.leases().leases().count(), 0, "every lease released");
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn leases_released_when_cancelled_while_waiting_and_while_running() {
    let mut sim = Sim::with_pools(staging_pool());
    sim.enqueue(0, "s1", STAGING, "staging", context("master"));
    sim.enqueue(10, "s2", STAGING, "staging", BuildContext { repo: "acme/other".into(), ..context("master") });
    sim.input(20, Input::Cancel { build: "s2".into(), by: "alice".into(), reason: "not needed".into() });
    sim.input(30, Input::Cancel { build: "s1".into(), by: "alice".into(), reason: "stop".into() });
    sim.finish(40, "s1", "deploy", 1, StepResult::Cancelled);
    finished(&sim, "s1", Conclusion::Cancelled);
    finished(&sim, "s2", Conclusion::Cancelled);
    assert_eq!(sim.machine.leases().leases().count(), 0);
    assert!(sim.machine.leases().waiting().is_empty());
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn leases_released_on_timeout_and_step_resources_reach_the_environment() {
    let spec = r#"
pipelines:
  staging:
    timeout: 1h
    resources: [{ pool: staging-env }]
    steps:
      - { name: deploy, image: busybox, commands: [x] }
"#;
    let mut sim = Sim::with_pools(staging_pool());
    sim.enqueue(0, "s1", spec, "staging", context("master"));
    sim.timer(3_600_000, TimerId::BuildTimeout { build: "s1".into() });
    sim.finish(3_601_000, "s1", "deploy", 1, StepResult::Cancelled);
    finished(&sim, "s1", Conclusion::TimedOut);
    assert_eq!(sim.machine.leases().leases().count(), 0);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn a_person_holds_the_environment_and_builds_wait() {
    let mut sim = Sim::with_pools(staging_pool());
    let request =
        Request::new("alice-1", Holder::person("alice"), vec![Want::new("staging-env", 1)], Duration::from_secs(3600))
            .with_deadline(Timestamp(7_200_000), Some(Duration::from_secs(600)))
            .with_reason("manual testing");
    sim.input(0, Input::TakeLease { request });
    sim.enqueue(1_000, "s1", STAGING, "staging", context("master"));
    assert_eq!(sim.state("s1"), BuildState::WaitingForResources);
    let token = sim.token("alice-1");
    sim.input(1_800_000, Input::RenewLease { lease: LeaseId::new("alice-1"), token });
    sim.input(2_000_000, Input::ReturnLease { lease: LeaseId::new("alice-1"), token });
    assert_eq!(sim.state("s1"), BuildState::Running);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn a_dead_holder_expires_and_its_late_release_is_refused() {
    let mut sim = Sim::with_pools(staging_pool());
    let request =
        Request::new("bot-1", Holder::person("bot"), vec![Want::new("staging-env", 1)], Duration::from_secs(60));
    sim.input(0, Input::TakeLease { request });
    let token = sim.token("bot-1");
    sim.enqueue(1_000, "s1", STAGING, "staging", context("master"));
    sim.timer(60_000, TimerId::Leases);
    assert_eq!(sim.state("s1"), BuildState::Running, "the expired holder's unit went to the waiting build");
    sim.input(61_000, Input::ReturnLease { lease: LeaseId::new("bot-1"), token });
    sim.input(62_000, Input::RenewLease { lease: LeaseId::new("bot-1"), token });
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn live_builds_renew_their_leases_on_every_tick() {
    let mut sim =
        Sim::new(Config { build_lease_ttl: Duration::from_secs(60), pools: staging_pool(), ..Config::default() });
    sim.enqueue(0, "s1", STAGING, "staging", context("master"));
    for t in 1..=5 {
        sim.input(t * 30_000, Input::Tick);
    }
    assert_eq!(sim.state("s1"), BuildState::Running, "renewed leases never expire under a live build");
    sim.finish(160_000, "s1", "deploy", 1, StepResult::Exited(0));
    sim.finish(170_000, "s1", "e2e", 1, StepResult::Exited(0));
    finished(&sim, "s1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn a_build_that_loses_its_lease_errors() {
    let mut sim =
        Sim::new(Config { build_lease_ttl: Duration::from_secs(60), pools: staging_pool(), ..Config::default() });
    sim.enqueue(0, "s1", STAGING, "staging", context("master"));
    sim.input(10_000, Input::RevokeLease { lease: LeaseId::new("s1") });
    sim.finish(11_000, "s1", "deploy", 1, StepResult::Cancelled);
    finished(&sim, "s1", Conclusion::Errored);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn impossible_resource_requests_error_the_build() {
    let spec = "pipelines:\n  staging:\n    resources: [{ pool: phones, count: 1 }]\n    steps:\n      - { name: a, image: busybox, commands: [x] }\n";
    let mut sim = Sim::with_pools(staging_pool());
    sim.enqueue(0, "s1", spec, "staging", context("master"));
    finished(&sim, "s1", Conclusion::Errored);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn builds_of_a_repo_cannot_trust_events_of_another() {
    // Two test builds on the same branch name in different repositories do not supersede each other.
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "a1", ONE_STEP, "test", context("feature/x"));
    sim.enqueue(10, "b1", ONE_STEP, "test", BuildContext { repo: "acme/other".into(), ..context("feature/x") });
    assert_eq!(sim.state("a1"), BuildState::Running);
    assert_eq!(sim.state("b1"), BuildState::Running);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn only_the_chosen_steps_and_their_dependencies_run() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue_only(0, "b1", DAG, "test", context("feature/a"), Some(vec!["package".into()]));
    sim.finish(100, "b1", "lint", 1, StepResult::Exited(0));
    sim.finish(200, "b1", "unit", 1, StepResult::Exited(0));
    sim.finish(300, "b1", "package", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
    let names: Vec<String> =
        sim.machine.build(&"b1".into()).expect("build").steps.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["lint", "unit", "package"], "docs is left out");
    sim.enqueue_only(400, "b2", DAG, "test", context("feature/b"), Some(vec!["nope".into()]));
    finished(&sim, "b2", Conclusion::Errored);
}

#[test]
fn variables_given_at_start_win_over_the_spec() {
    let spec = "pipelines:\n  test:\n    env: { MODE: spec, KEEP: yes }\n    steps:\n      - { name: a, image: busybox, commands: [x], env: { MODE: step } }\n";
    let mut sim = Sim::new(Config::default());
    let input = Input::Enqueue {
        build: "b1".into(),
        spec: Arc::from(spec),
        pipeline: "test".into(),
        context: context("feature/a"),
        only: None,
        variables: [("MODE".to_owned(), "cli".to_owned())].into(),
    };
    let effects = sim.input(0, input);
    let job = effects
        .iter()
        .find_map(|e| match e {
            Effect::StartStep(job) => Some(job.clone()),
            _ => None,
        })
        .expect("the step started");
    assert_eq!(job.env.get("MODE").map(String::as_str), Some("cli"));
    assert_eq!(job.env.get("KEEP").map(String::as_str), Some("yes"));
    assert_eq!(job.env.get("CIB_STEP").map(String::as_str), Some("a"));
}

#[test]
fn builds_started_by_hand_supersede_nothing() {
    let mut sim = Sim::new(Config::default());
    let manual = |branch: &str| BuildContext {
        event: TriggerEvent::of(cib_core::spec::EventKind::Manual, branch),
        ..context(branch)
    };
    sim.enqueue(0, "m1", ONE_STEP, "test", manual("feature/a"));
    sim.enqueue(10, "m2", ONE_STEP, "test", manual("feature/a"));
    sim.enqueue(20, "p1", ONE_STEP, "test", context("feature/a"));
    assert_eq!(sim.state("m1"), BuildState::Running);
    assert_eq!(sim.state("m2"), BuildState::Running);
    assert_eq!(sim.state("p1"), BuildState::Running, "a push supersedes pushes, not builds started by hand");
}

#[test]
fn a_person_extends_a_lease_and_it_expires_at_the_new_deadline() {
    let mut sim = Sim::with_pools(staging_pool());
    let request =
        Request::new("alice-1", Holder::person("alice"), vec![Want::new("staging-env", 1)], Duration::from_secs(3600))
            .with_deadline(Timestamp(3_600_000), Some(Duration::from_secs(600)));
    sim.input(0, Input::TakeLease { request });
    let token = sim.token("alice-1");
    sim.input(1_000, Input::ExtendLease { lease: LeaseId::new("alice-1"), token, until: Timestamp(7_200_000) });
    sim.input(
        2_000,
        Input::ExtendLease { lease: LeaseId::new("alice-1"), token: token + 5, until: Timestamp(9_000_000) },
    );
    sim.timer(3_600_000, TimerId::Leases);
    assert!(sim.machine.leases().lease(&LeaseId::new("alice-1")).is_some(), "still held past the old deadline");
    sim.timer(6_600_000, TimerId::Leases);
    sim.timer(7_200_000, TimerId::Leases);
    assert!(sim.machine.leases().lease(&LeaseId::new("alice-1")).is_none(), "gone at the new deadline");
    insta::assert_snapshot!(sim.trace);
}

// ---- trust: who may pass a gate, and builds that were not trusted ---------------------------

/// An approval gate any writer may answer; the build was started by `dev`.
const SIGN_OFF: &str = r#"
pipelines:
  staging:
    steps:
      - { name: deploy, image: busybox, commands: [x] }
      - { name: sign-off, depends_on: [deploy], gate: { kind: approval, approvals: 2 } }
"#;

fn decide_as(sim: &mut Sim, at: u64, login: &str, person: &str, approve: bool) {
    let input = Input::DecideAs {
        build: "b1".into(),
        step: "sign-off".into(),
        actor: self::person(login),
        person: person.into(),
        approve,
        comment: None,
    };
    sim.input(at, input);
}

fn refusals(sim: &Sim) -> Vec<String> {
    sim.trace.lines().filter(|l| l.contains("decision_refused")).map(str::to_owned).collect()
}

#[test]
fn the_build_actor_and_the_commit_author_cannot_approve_their_own_build() {
    let mut sim = Sim::new(Config::default());
    let ctx = context("master");
    let commit = ctx.commit.clone();
    sim.input(0, Input::CommitAuthor { repo: "acme/shop".into(), commit, person: "erin".into() });
    sim.enqueue(0, "b1", SIGN_OFF, "staging", ctx);
    sim.finish(100, "b1", "deploy", 1, StepResult::Exited(0));
    // `dev` started the build; `erin` wrote the commit, and approves under a token's name.
    sim.decide(200, "b1", "sign-off", person("dev"), true);
    decide_as(&mut sim, 300, "erin-laptop", "erin", true);
    assert_eq!(refusals(&sim).len(), 2, "{}", sim.trace);
    assert!(refusals(&sim)[0].contains("started the build"), "{}", sim.trace);
    assert!(refusals(&sim)[1].contains("commit's author"), "{}", sim.trace);
    sim.decide(400, "b1", "sign-off", person("alice"), true);
    sim.decide(500, "b1", "sign-off", person("bob"), true);
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn self_approval_lets_the_build_actor_approve() {
    let spec = SIGN_OFF.replace("approvals: 2 }", "approvals: 1, self_approval: true }");
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", &spec, "staging", context("master"));
    sim.finish(100, "b1", "deploy", 1, StepResult::Exited(0));
    sim.decide(200, "b1", "sign-off", person("dev"), true);
    assert!(refusals(&sim).is_empty(), "{}", sim.trace);
    finished(&sim, "b1", Conclusion::Success);
}

#[test]
fn the_build_actor_may_reject_their_own_build() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", SIGN_OFF, "staging", context("master"));
    sim.finish(100, "b1", "deploy", 1, StepResult::Exited(0));
    sim.decide(200, "b1", "sign-off", person("dev"), false);
    finished(&sim, "b1", Conclusion::Failed);
}

#[test]
fn two_identities_of_one_person_count_once() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", SIGN_OFF, "staging", context("master"));
    sim.finish(100, "b1", "deploy", 1, StepResult::Exited(0));
    decide_as(&mut sim, 200, "alice-token", "alice", true);
    decide_as(&mut sim, 300, "alice-gh", "alice", true);
    assert_eq!(refusals(&sim).len(), 1, "{}", sim.trace);
    assert!(refusals(&sim)[0].contains("already approved by this person"), "{}", sim.trace);
    assert_eq!(sim.state("b1"), BuildState::Running, "one person's two identities passed a two-person gate");
    decide_as(&mut sim, 400, "bob-gh", "bob", true);
    finished(&sim, "b1", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn a_build_that_skipped_secret_steps_is_neutral() {
    let spec = r#"
pipelines:
  test:
    steps:
      - { name: unit, image: busybox, commands: [x] }
      - { name: publish, image: busybox, commands: [x], secrets: [TOKEN], depends_on: [unit] }
"#;
    let mut sim = Sim::new(Config::default());
    let untrusted = BuildContext { trusted: false, pull_request: Some(7), ..context("fork-feature") };
    sim.enqueue(0, "b1", spec, "test", untrusted);
    sim.finish(100, "b1", "unit", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Neutral);
    // The same build, trusted, runs the step and succeeds.
    sim.enqueue(200, "b2", spec, "test", context("feature"));
    sim.finish(300, "b2", "unit", 1, StepResult::Exited(0));
    sim.finish(400, "b2", "publish", 1, StepResult::Exited(0));
    finished(&sim, "b2", Conclusion::Success);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn a_failing_untrusted_build_is_failed_not_neutral() {
    let spec = r#"
pipelines:
  test:
    steps:
      - { name: unit, image: busybox, commands: [x] }
      - { name: publish, image: busybox, commands: [x], secrets: [TOKEN] }
"#;
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", spec, "test", BuildContext { trusted: false, ..context("feature") });
    sim.finish(100, "b1", "unit", 1, StepResult::Exited(1));
    finished(&sim, "b1", Conclusion::Failed);
}

const TWO_ATTEMPTS: &str = "pipelines:\n  test:\n    steps:\n      - { name: unit, image: busybox, commands: [make test], retry: { count: 1, on: [infrastructure] } }\n";

#[test]
fn an_interrupted_step_runs_once_more_and_then_by_its_policy_only() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", ONE_STEP, "test", context("feature/a"));
    sim.finish(100, "b1", "unit", 1, StepResult::Interrupted("gone".into()));
    sim.finish(200, "b1", "unit", 2, StepResult::Interrupted("gone again".into()));
    // No retry policy: the one re-run of an interruption is spent, so the build ends.
    finished(&sim, "b1", Conclusion::Errored);
    let build = sim.machine.build(&"b1".into()).expect("build");
    let conclusions: Vec<_> = build.steps[0].attempts.iter().map(|a| a.conclusion).collect();
    assert_eq!(conclusions, [Some(StepConclusion::Interrupted), Some(StepConclusion::Interrupted)]);

    // With a policy that retries infrastructure errors, the second interruption is its retry.
    sim.enqueue(300, "b2", TWO_ATTEMPTS, "test", context("feature/b"));
    sim.finish(400, "b2", "unit", 1, StepResult::Interrupted("gone".into()));
    sim.finish(500, "b2", "unit", 2, StepResult::Interrupted("gone again".into()));
    sim.finish(600, "b2", "unit", 3, StepResult::Exited(0));
    finished(&sim, "b2", Conclusion::Success);
}

#[test]
fn an_interrupted_deploy_step_waits_for_a_person() {
    let deploy = "pipelines:\n  staging:\n    kind: deploy\n    steps:\n      - { name: ship, image: busybox, commands: [ship it], retry: { count: 3, on: [infrastructure] } }\n      - { name: after, image: busybox, commands: [true], depends_on: [ship] }\n";
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "d1", deploy, "staging", context("master"));
    let effects = sim.input(
        100,
        Input::StepFinished {
            build: "d1".into(),
            step: "ship".into(),
            attempt: 1,
            result: StepResult::Interrupted("gone".into()),
        },
    );
    assert!(!effects.iter().any(|e| matches!(e, Effect::StartStep(_))), "not even its retry policy runs it again");
    finished(&sim, "d1", Conclusion::Errored);
    let build = sim.machine.build(&"d1".into()).expect("build");
    assert_eq!(build.steps[0].status, StepStatus::Done(StepConclusion::Interrupted));
    assert_eq!(build.steps[1].status, StepStatus::Done(StepConclusion::Skipped));
}

#[test]
fn a_draining_machine_starts_no_step_until_it_resumes() {
    let two = "pipelines:\n  test:\n    steps:\n      - { name: a, image: busybox, commands: [true] }\n      - { name: b, image: busybox, commands: [true], depends_on: [a] }\n";
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", two, "test", context("feature/a"));
    sim.input(10, Input::Drain);
    assert!(sim.machine.draining());
    let effects = sim.input(
        20,
        Input::StepFinished { build: "b1".into(), step: "a".into(), attempt: 1, result: StepResult::Exited(0) },
    );
    assert!(!effects.iter().any(|e| matches!(e, Effect::StartStep(_))), "{}", sim.trace);
    assert_eq!(sim.machine.running_steps(), 0);
    let effects = sim.input(30, Input::Resume);
    assert!(effects.iter().any(|e| matches!(e, Effect::StartStep(j) if j.step.name == "b")), "{}", sim.trace);
    sim.finish(40, "b1", "b", 1, StepResult::Exited(0));
    finished(&sim, "b1", Conclusion::Success);
}

#[test]
fn a_starting_step_is_told_which_steps_have_not_started_yet() {
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: a, image: busybox, commands: [x] }\n      - { name: b, image: busybox, commands: [x] }\n      - { name: c, image: alpine, commands: [x], depends_on: [a] }\n      - { name: d, image: busybox, commands: [x], depends_on: [c] }\n";
    let mut sim = Sim::new(Config::default());
    let input = Input::Enqueue {
        build: "b1".into(),
        spec: Arc::from(spec),
        pipeline: "test".into(),
        context: context("feature/a"),
        only: None,
        variables: Default::default(),
    };
    let jobs: Vec<_> = sim
        .input(0, input)
        .into_iter()
        .filter_map(|e| match e {
            Effect::StartStep(job) => Some(job),
            _ => None,
        })
        .collect();
    let upcoming = |step: &str| -> Vec<String> {
        let job = jobs.iter().find(|j| j.step.name == step).unwrap_or_else(|| panic!("{step} started"));
        job.upcoming.iter().map(|s| s.name.clone()).collect()
    };
    // a and b start together: neither is upcoming for the other once both run, but the first
    // to start still saw the second ready.
    assert_eq!(jobs.len(), 2, "{}", sim.trace);
    assert_eq!(upcoming("a"), ["b", "c", "d"]);
    assert_eq!(upcoming("b"), ["c", "d"]);
}

#[test]
fn a_downstream_build_is_recorded_against_its_upstream_commit_and_a_rerun_replaces_it() {
    use cib_core::pipeline::Upstream;
    use cib_core::workflow::DownstreamState;
    const CLIENT: &str = r#"
pipelines:
  test:
    on: { upstream: { repo: acme/api, branch: master } }
    steps: [{ name: unit, image: busybox, commands: [true] }]
"#;
    let downstream = |commit: &str| BuildContext {
        repo: "acme/client".into(),
        commit: commit.into(),
        branch: Some("master".into()),
        event: TriggerEvent::of(cib_core::spec::EventKind::Upstream, "master"),
        upstream: Some(Upstream { repo: "acme/api".into(), commit: "a91".into() }),
        ..context("master")
    };
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "d1", CLIENT, "test", downstream("c1"));
    let states =
        |m: &Machine| m.downstream_results("acme/api").iter().map(|r| (r.build.clone(), r.state)).collect::<Vec<_>>();
    assert_eq!(states(&sim.machine), [("d1".to_owned(), DownstreamState::Running)]);
    // The step started at once (a free slot, no resources): its job carries the upstream.
    let job =
        sim.machine.running_job(&BuildId::from("d1"), "unit", 1).unwrap_or_else(|| panic!("started: {}", sim.trace));
    assert_eq!(job.env.get("UPSTREAM_REPO").map(String::as_str), Some("acme/api"));
    assert_eq!(job.env.get("UPSTREAM_COMMIT").map(String::as_str), Some("a91"));
    assert_eq!(job.env.get("CIB_EVENT").map(String::as_str), Some("upstream"));
    sim.finish(2, "d1", "unit", 1, StepResult::Exited(1));
    assert_eq!(states(&sim.machine), [("d1".to_owned(), DownstreamState::Failed)]);
    assert!(sim.trace.contains("downstream_reported"), "{}", sim.trace);

    // A re-run after a fix (another downstream commit) replaces the failure; an older build
    // that finishes late does not overwrite the newer one.
    sim.enqueue(3, "d2", CLIENT, "test", downstream("c2"));
    sim.enqueue(3, "d3", CLIENT, "test", downstream("c3"));
    sim.input(4, Input::Cancel { build: "d2".into(), by: "dev".into(), reason: "late".into() });
    assert_eq!(states(&sim.machine), [("d3".to_owned(), DownstreamState::Running)]);
    sim.finish(5, "d3", "unit", 1, StepResult::Exited(0));
    assert_eq!(states(&sim.machine), [("d3".to_owned(), DownstreamState::Success)]);
    assert_eq!(sim.machine.downstream_results("acme/api")[0].commit, "c3");

    // The result survives a snapshot, and a replay of the inputs reaches the same.
    let restored = Machine::restore(sim.machine.snapshot()).expect("restores");
    assert_eq!(restored.downstream_results("acme/api"), sim.machine.downstream_results("acme/api"));
    let mut replayed = Machine::new(Config::default()).expect("machine");
    for (input, at) in sim.inputs.clone() {
        replayed.handle(input, at);
    }
    assert_eq!(replayed.downstream_results("acme/api"), sim.machine.downstream_results("acme/api"));
}
