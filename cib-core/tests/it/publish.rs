//! The publish phase of the machine: after every ordinary step passed and before finalizers,
//! outcomes as inputs, transient failures tried again with backoff, nothing published for an
//! untrusted build, promotions carrying the source pipeline's records, and every state of it
//! surviving a snapshot and a replay. Also the spec's `from:` checks.

use cib_core::event::{BuildId, Conclusion, EventBody, StepConclusion};
use cib_core::pipeline::{BuildContext, Config, Effect, Input, Machine, PublishStatus, StepResult, TimerId};
use cib_core::publish::{Artifact, MAX_PUBLISH_ATTEMPTS, PublishOutcome, publish_backoff};
use cib_core::spec::{self, EventKind, TriggerEvent};

use super::machine::{Sim, context};

const SPEC: &str = r#"
pipelines:
  staging:
    steps:
      - { name: wheel, image: busybox, commands: [make wheel] }
      - { name: report, image: busybox, commands: [report], when: { status: always } }
      - { name: alarm, image: busybox, commands: [alarm], when: { status: on_failure } }
    deliverables:
      - pypi: { index: "http://127.0.0.1:1/", credentials: STAGING_INDEX }
      - docker: { image: "127.0.0.1:2/app", tags: ["{{commit}}"], credentials: REGISTRY }
  production:
    steps:
      - { name: smoke, image: busybox, commands: [true] }
    deliverables:
      - pypi: { index: "http://127.0.0.1:3/", credentials: PRODUCTION_INDEX, from: staging }
      - docker: { image: "127.0.0.1:2/app", tags: [production], credentials: REGISTRY, from: staging }
"#;

fn wheel() -> Artifact {
    Artifact {
        kind: "pypi".into(),
        name: "app".into(),
        version: Some("1.2.3".into()),
        file: Some("app-1.2.3-py3-none-any.whl".into()),
        tags: Vec::new(),
        digest: "sha256:aaaa".into(),
        location: "http://127.0.0.1:1/".into(),
        first_build: None,
    }
}

fn image() -> Artifact {
    Artifact {
        kind: "docker".into(),
        name: "127.0.0.1:2/app".into(),
        version: None,
        file: None,
        tags: vec!["c0ffee-master".into()],
        digest: "sha256:bbbb".into(),
        location: "127.0.0.1:2/app".into(),
        first_build: None,
    }
}

fn published(sim: &mut Sim, at: u64, build: &str, attempt: u32, outcome: PublishOutcome) -> Vec<Effect> {
    sim.input(at, Input::Published { build: build.into(), attempt, outcome })
}

fn publish_jobs(effects: &[Effect]) -> Vec<&cib_core::publish::PublishJob> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::PublishDeliverables(job) => Some(&**job),
            _ => None,
        })
        .collect()
}

fn started_steps(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::StartStep(job) => Some(job.step.name.clone()),
            _ => None,
        })
        .collect()
}

fn conclusion(sim: &Sim, build: &str) -> Option<Conclusion> {
    match sim.machine.build(&BuildId::from(build)).map(|b| b.state.clone()) {
        Some(cib_core::pipeline::BuildState::Finished(c)) => Some(c),
        _ => None,
    }
}

fn events(effects: &[Effect]) -> Vec<&EventBody> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish(event) => Some(&event.body),
            _ => None,
        })
        .collect()
}

#[test]
fn publishing_comes_after_the_ordinary_steps_and_before_the_finalizers() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "s1", SPEC, "staging", context("master"));
    sim.input(1, Input::Tick);
    let effects = sim.input(
        1_000,
        Input::StepFinished { build: "s1".into(), step: "wheel".into(), attempt: 1, result: StepResult::Exited(0) },
    );
    let jobs = publish_jobs(&effects);
    assert_eq!(jobs.len(), 1, "{}", sim.trace);
    assert_eq!(jobs[0].attempt, 1);
    assert_eq!(jobs[0].deliverables.len(), 2);
    assert!(jobs[0].promoted.is_empty(), "staging builds its deliverables");
    assert!(started_steps(&effects).is_empty(), "the finalizer waits for the publish: {}", sim.trace);
    assert!(
        events(&effects).iter().any(|e| matches!(e, EventBody::StepStarted { step, .. } if step == "publish")),
        "the publish phase is the synthetic step 'publish'"
    );

    let effects = published(&mut sim, 5_000, "s1", 1, PublishOutcome::Published { artifacts: vec![wheel(), image()] });
    let records: Vec<_> = events(&effects)
        .into_iter()
        .filter_map(|e| match e {
            EventBody::DeliverablePublished { deliverable, .. } => Some((**deliverable).clone()),
            _ => None,
        })
        .collect();
    assert_eq!(records.len(), 2, "{}", sim.trace);
    assert_eq!(records[0].first_build, BuildId::from("s1"), "built here, so first produced here");
    assert_eq!(records[0].at.millis(), 5_000);
    assert_eq!(started_steps(&effects), vec!["report".to_owned()], "the finalizer runs after the publish");
    sim.finish(6_000, "s1", "report", 1, StepResult::Exited(0));
    assert_eq!(conclusion(&sim, "s1"), Some(Conclusion::Success), "{}", sim.trace);
    assert_eq!(sim.machine.deliverables("acme/shop").len(), 2);
}

#[test]
fn a_transient_failure_is_tried_again_with_backoff_and_publishes_once() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "s1", SPEC, "staging", context("master"));
    sim.finish(1_000, "s1", "wheel", 1, StepResult::Exited(0));
    let busy = |n| PublishOutcome::Failed {
        deliverable: "pypi http://127.0.0.1:1/".into(),
        message: format!("the index answered 503 (time {n})"),
        transient: true,
        artifacts: Vec::new(),
    };
    let effects = published(&mut sim, 2_000, "s1", 1, busy(1));
    let timer = TimerId::PublishRetry { build: "s1".into(), attempt: 2 };
    assert!(
        effects.contains(&Effect::ArmTimer {
            timer: timer.clone(),
            at: cib_core::time::Timestamp(2_000) + publish_backoff(2)
        }),
        "{}",
        sim.trace
    );
    assert!(started_steps(&effects).is_empty(), "finalizers wait while a publish will be tried again");
    let effects = sim.input(3_000, Input::TimerFired { timer });
    assert_eq!(publish_jobs(&effects).iter().map(|j| j.attempt).collect::<Vec<_>>(), vec![2]);
    published(&mut sim, 3_500, "s1", 2, busy(2));
    let effects =
        sim.input(5_500, Input::TimerFired { timer: TimerId::PublishRetry { build: "s1".into(), attempt: 3 } });
    assert_eq!(publish_jobs(&effects).len(), 1);
    // A late report of an earlier attempt changes nothing.
    assert!(published(&mut sim, 5_600, "s1", 2, busy(9)).is_empty(), "{}", sim.trace);
    let effects = published(&mut sim, 6_000, "s1", 3, PublishOutcome::Published { artifacts: vec![wheel()] });
    let count = events(&effects).iter().filter(|e| matches!(e, EventBody::DeliverablePublished { .. })).count();
    assert_eq!(count, 1, "published once: {}", sim.trace);
    sim.finish(7_000, "s1", "report", 1, StepResult::Exited(0));
    assert_eq!(conclusion(&sim, "s1"), Some(Conclusion::Success), "{}", sim.trace);
    let attempts = &sim.machine.deliverables("acme/shop");
    assert_eq!(attempts.len(), 1);
    assert!(publish_backoff(3) > publish_backoff(2), "the backoff grows");
}

#[test]
fn transient_failures_run_out_and_fail_the_build_naming_the_deliverable() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "s1", SPEC, "staging", context("master"));
    sim.finish(1_000, "s1", "wheel", 1, StepResult::Exited(0));
    let mut at = 2_000;
    for attempt in 1..=MAX_PUBLISH_ATTEMPTS {
        if attempt > 1 {
            sim.input(at, Input::TimerFired { timer: TimerId::PublishRetry { build: "s1".into(), attempt } });
        }
        at += 100;
        let outcome = PublishOutcome::Failed {
            deliverable: "docker 127.0.0.1:2/app".into(),
            message: "connection refused".into(),
            transient: true,
            artifacts: Vec::new(),
        };
        published(&mut sim, at, "s1", attempt, outcome);
        at += 100_000;
    }
    let b = sim.machine.build(&BuildId::from("s1")).expect("build");
    assert_eq!(b.publish.status, PublishStatus::Done(StepConclusion::Errored), "{}", sim.trace);
    assert_eq!(b.publish.attempts.len() as u32, MAX_PUBLISH_ATTEMPTS);
    assert!(b.publish.attempts[0].detail.contains("docker 127.0.0.1:2/app"), "{:?}", b.publish.attempts);
    // The on-failure finalizer runs, then the build ends errored.
    sim.finish(at, "s1", "report", 1, StepResult::Exited(0));
    sim.finish(at + 1, "s1", "alarm", 1, StepResult::Exited(0));
    assert_eq!(conclusion(&sim, "s1"), Some(Conclusion::Errored), "{}", sim.trace);
}

#[test]
fn a_permanent_failure_fails_the_build_and_keeps_what_was_published() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "s1", SPEC, "staging", context("master"));
    sim.finish(1_000, "s1", "wheel", 1, StepResult::Exited(0));
    let outcome = PublishOutcome::Failed {
        deliverable: "docker 127.0.0.1:2/app".into(),
        message: "the registry refused the credentials of secret 'REGISTRY'".into(),
        transient: false,
        artifacts: vec![wheel()],
    };
    let effects = published(&mut sim, 2_000, "s1", 1, outcome);
    assert!(effects.iter().all(|e| !matches!(e, Effect::ArmTimer { .. })), "not tried again: {}", sim.trace);
    let mut started = started_steps(&effects);
    started.sort();
    assert_eq!(started, vec!["alarm".to_owned(), "report".to_owned()]);
    assert!(
        events(&effects)
            .iter()
            .any(|e| matches!(e, EventBody::StepFinished { step, conclusion: StepConclusion::Failed, detail, .. }
        if step == "publish" && detail.starts_with("docker 127.0.0.1:2/app: ")))
    );
    sim.finish(3_000, "s1", "report", 1, StepResult::Exited(0));
    sim.finish(3_000, "s1", "alarm", 1, StepResult::Exited(0));
    assert_eq!(conclusion(&sim, "s1"), Some(Conclusion::Failed), "{}", sim.trace);
    assert_eq!(sim.machine.deliverables("acme/shop").len(), 1, "the wheel is out there, so it is recorded");
}

#[test]
fn an_untrusted_build_publishes_nothing_and_says_why() {
    let mut sim = Sim::new(Config::default());
    let fork = BuildContext {
        repo: "acme/shop".into(),
        commit: "f0f0".into(),
        branch: Some("master".into()),
        pull_request: Some(7),
        event: TriggerEvent { kind: EventKind::PullRequest, ..TriggerEvent::push("master") },
        actor: Some("stranger".into()),
        trusted: false,
        upstream: None,
    };
    sim.enqueue(0, "f1", SPEC, "staging", fork);
    let effects = sim.input(
        1_000,
        Input::StepFinished { build: "f1".into(), step: "wheel".into(), attempt: 1, result: StepResult::Exited(0) },
    );
    assert!(publish_jobs(&effects).is_empty(), "{}", sim.trace);
    let reason = events(&effects)
        .into_iter()
        .find_map(|e| match e {
            EventBody::StepSkipped { step, reason, .. } if step == "publish" => Some(reason.clone()),
            _ => None,
        })
        .expect("the publish step is skipped with a reason");
    assert!(reason.contains("untrusted"), "{reason}");
    sim.finish(2_000, "f1", "report", 1, StepResult::Exited(0));
    assert_eq!(conclusion(&sim, "f1"), Some(Conclusion::Neutral), "never a pass: {}", sim.trace);
    assert!(sim.machine.deliverables("acme/shop").is_empty());
}

#[test]
fn a_failed_step_skips_publishing() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "s1", SPEC, "staging", context("master"));
    let effects = sim.input(
        1_000,
        Input::StepFinished { build: "s1".into(), step: "wheel".into(), attempt: 1, result: StepResult::Exited(1) },
    );
    assert!(publish_jobs(&effects).is_empty(), "{}", sim.trace);
    assert_eq!(started_steps(&effects).len(), 2, "both finalizers run: {}", sim.trace);
}

/// Staging publishes at a commit; production, at the same commit, promotes those records.
fn promotion_run() -> Sim {
    let mut sim = Sim::new(Config::default());
    let mut master = context("master");
    master.commit = "c1".into();
    let mut production = context("production");
    production.commit = "c1".into();
    production.event = TriggerEvent { kind: EventKind::Promotion, ..TriggerEvent::push("production") };
    sim.enqueue(0, "s1", SPEC, "staging", master);
    sim.finish(1_000, "s1", "wheel", 1, StepResult::Exited(0));
    published(&mut sim, 2_000, "s1", 1, PublishOutcome::Published { artifacts: vec![wheel(), image()] });
    sim.finish(3_000, "s1", "report", 1, StepResult::Exited(0));
    sim.enqueue(10_000, "p1", SPEC, "production", production);
    sim.finish(11_000, "p1", "smoke", 1, StepResult::Exited(0));
    let busy = PublishOutcome::Failed {
        deliverable: "pypi http://127.0.0.1:3/".into(),
        message: "503".into(),
        transient: true,
        artifacts: Vec::new(),
    };
    published(&mut sim, 12_000, "p1", 1, busy);
    sim.input(13_000, Input::TimerFired { timer: TimerId::PublishRetry { build: "p1".into(), attempt: 2 } });
    let promoted = |a: Artifact| Artifact { first_build: Some("s1".into()), location: "elsewhere".into(), ..a };
    let artifacts = vec![promoted(wheel()), promoted(Artifact { tags: vec!["production".into()], ..image() })];
    published(&mut sim, 14_000, "p1", 2, PublishOutcome::Published { artifacts });
    sim
}

#[test]
fn a_promotion_carries_what_the_source_pipeline_published_for_the_same_commit() {
    let mut sim = Sim::new(Config::default());
    let mut master = context("master");
    master.commit = "c1".into();
    sim.enqueue(0, "s1", SPEC, "staging", master);
    sim.finish(1_000, "s1", "wheel", 1, StepResult::Exited(0));
    published(&mut sim, 2_000, "s1", 1, PublishOutcome::Published { artifacts: vec![wheel(), image()] });
    let mut other = context("production");
    other.commit = "c2".into();
    sim.enqueue(5_000, "p0", SPEC, "production", other);
    let effects = sim.input(
        6_000,
        Input::StepFinished { build: "p0".into(), step: "smoke".into(), attempt: 1, result: StepResult::Exited(0) },
    );
    assert!(publish_jobs(&effects)[0].promoted.is_empty(), "nothing was published for c2: {}", sim.trace);

    let sim = promotion_run();
    let job = sim
        .machine
        .builds()
        .find(|b| b.id == BuildId::from("p1"))
        .map(|b| b.publish.records.clone())
        .expect("p1 is live until forgotten");
    assert_eq!(job.len(), 2, "{}", sim.trace);
    assert!(job.iter().all(|r| r.first_build == BuildId::from("s1") && r.build == BuildId::from("p1")));
    assert_eq!(conclusion(&sim, "p1"), Some(Conclusion::Success), "{}", sim.trace);
    // The job the second attempt got names staging's digests.
    assert!(sim.trace.contains("publish p1#2 2 deliverables, promoting [sha256:aaaa, sha256:bbbb]"), "{}", sim.trace);
}

#[test]
fn every_state_of_the_publish_phase_survives_a_snapshot_and_a_replay() {
    let sim = promotion_run();
    let config = sim.machine.config().clone();
    let mut live = Machine::new(config.clone()).expect("machine");
    let mut states = vec![live.clone()];
    for (input, at) in &sim.inputs {
        // Through JSON, as the journal keeps inputs.
        let json = serde_json::to_string(input).expect("input json");
        live.handle(serde_json::from_str(&json).expect("input back"), *at);
        states.push(live.clone());
    }
    assert_eq!(&live, &sim.machine, "a replay reaches the same machine");
    for (prefix, state) in states.iter().enumerate() {
        let bytes = serde_json::to_vec(&state.snapshot()).expect("snapshot bytes");
        let mut restored = Machine::restore(serde_json::from_slice(&bytes).expect("json")).expect("restore");
        assert_eq!(&restored, state, "restored after {prefix} inputs");
        let mut original = state.clone();
        for (input, at) in &sim.inputs[prefix..] {
            let expected = original.handle(input.clone(), *at);
            assert_eq!(restored.handle(input.clone(), *at), expected, "effects after a restore at {prefix}");
        }
        assert_eq!(restored, original, "the run finished from a restore at {prefix}");
    }
}

#[test]
fn a_cancel_waits_for_a_running_publish_and_cancels_a_waiting_one() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "s1", SPEC, "staging", context("master"));
    sim.finish(1_000, "s1", "wheel", 1, StepResult::Exited(0));
    sim.input(1_500, Input::Cancel { build: "s1".into(), by: "dev".into(), reason: "no".into() });
    assert_eq!(conclusion(&sim, "s1"), None, "the publish in progress is waited for: {}", sim.trace);
    published(&mut sim, 2_000, "s1", 1, PublishOutcome::Published { artifacts: vec![wheel()] });
    assert_eq!(conclusion(&sim, "s1"), Some(Conclusion::Cancelled), "{}", sim.trace);
    assert_eq!(sim.machine.deliverables("acme/shop").len(), 1, "what was published is recorded");

    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "s2", SPEC, "staging", context("master"));
    sim.finish(1_000, "s2", "wheel", 1, StepResult::Exited(0));
    let busy =
        PublishOutcome::Failed { deliverable: "x".into(), message: "503".into(), transient: true, artifacts: vec![] };
    published(&mut sim, 2_000, "s2", 1, busy);
    let effects = sim.input(2_500, Input::Cancel { build: "s2".into(), by: "dev".into(), reason: "no".into() });
    let timer = TimerId::PublishRetry { build: "s2".into(), attempt: 2 };
    assert!(effects.contains(&Effect::CancelTimer { timer }), "{}", sim.trace);
    assert_eq!(conclusion(&sim, "s2"), Some(Conclusion::Cancelled), "{}", sim.trace);
}

fn diagnostics(text: &str) -> Vec<String> {
    match spec::parse(text) {
        Ok(_) => Vec::new(),
        Err(diags) => diags.iter().map(|d| d.line(".cib.yml")).collect(),
    }
}

#[test]
fn from_must_name_another_pipeline_of_the_spec_with_its_position() {
    let text = "pipelines:\n  staging:\n    steps: [{ name: a, image: busybox, commands: [true] }]\n  production:\n    steps: [{ name: a, image: busybox, commands: [true] }]\n    deliverables:\n      - pypi: { index: \"http://x/\", credentials: T, from: stagin }\n      - docker: { image: x/app, from: production, context: api }\n";
    let found = diagnostics(text);
    assert!(
        found.contains(&".cib.yml:7:59: error: unknown pipeline 'stagin' (did you mean 'staging'?)".to_owned()),
        "{found:#?}"
    );
    assert!(
        found.iter().any(|d| d.starts_with(".cib.yml:8:39: error: a deliverable cannot be promoted from its own")),
        "{found:#?}"
    );
    assert!(found.iter().any(|d| d.contains("'context' and 'dockerfile' exclude 'from'")), "{found:#?}");
    let reserved = "pipelines:\n  staging:\n    steps: [{ name: publish, image: busybox, commands: [true] }]\n    deliverables: [{ docker: { image: x/app } }]\n";
    let found = diagnostics(reserved);
    assert!(
        found.iter().any(|d| d.starts_with(".cib.yml:3:21: error: the step name 'publish' is taken")),
        "{found:#?}"
    );
    assert!(diagnostics(SPEC).is_empty(), "{:?}", diagnostics(SPEC));
}
