//! The operator's limits in the machine: a build's pipeline gets the defaults when it is
//! enqueued (every command step has a timeout, armed when the step starts) and is held to the
//! maximums even when it arrives unchecked.

use std::time::Duration as StdDuration;

use cib_core::event::BuildId;
use cib_core::pipeline::{Config, Effect, Input, Machine, TimerId};
use cib_core::spec::limits::{Bound, OperatorLimits};
use cib_core::spec::{Duration, Memory};
use cib_core::time::Timestamp;

use crate::machine::context;

const SPEC: &str = "pipelines:
  test:
    steps:
      - name: bare
        image: busybox
        commands: [make]
      - name: long
        image: busybox
        commands: [make]
        timeout: 3h
        limits: {memory: 16g}
";

fn limits() -> OperatorLimits {
    OperatorLimits {
        step_timeout: Bound::new(Some(Duration::from_secs(600)), Some(Duration::from_secs(3_600))),
        pipeline_timeout: Bound::new(Some(Duration::from_secs(7_200)), None),
        memory: Bound::new(Some(1 << 30), Some(4 << 30)),
        pids: Bound::new(Some(128), None),
        max_matrix_cells: None,
    }
}

fn enqueue(config: Config) -> (Machine, Vec<Effect>, Timestamp) {
    let mut machine = Machine::new(config).expect("config");
    let now = Timestamp::from_secs(1_000);
    let input = Input::Enqueue {
        build: BuildId("b1".into()),
        spec: SPEC.into(),
        pipeline: "test".into(),
        context: context("master"),
        only: None,
        variables: Default::default(),
    };
    let effects = machine.handle(input, now);
    (machine, effects, now)
}

fn armed(effects: &[Effect], want: impl Fn(&TimerId) -> bool) -> Option<Timestamp> {
    effects.iter().find_map(|e| match e {
        Effect::ArmTimer { timer, at } if want(timer) => Some(*at),
        _ => None,
    })
}

#[test]
fn a_step_without_a_timeout_gets_the_default_and_its_timer_is_armed() {
    let (machine, effects, now) = enqueue(Config { limits: limits(), ..Config::default() });
    let step_timer =
        |name: &'static str| move |t: &TimerId| matches!(t, TimerId::StepTimeout { step, .. } if step == name);
    assert_eq!(armed(&effects, step_timer("bare")), Some(now + StdDuration::from_secs(600)));
    // Over the maximum (it was not checked on its way in): held to it.
    assert_eq!(armed(&effects, step_timer("long")), Some(now + StdDuration::from_secs(3_600)));
    assert_eq!(
        armed(&effects, |t| matches!(t, TimerId::BuildTimeout { .. })),
        Some(now + StdDuration::from_secs(7_200)),
        "the pipeline gets the default pipeline timeout"
    );
    let build = machine.build(&BuildId("b1".into())).expect("build");
    let long = build.pipeline.step("long").expect("long");
    assert_eq!(long.limits.memory, Some(Memory(4 << 30)));
    assert_eq!(long.limits.pids, Some(128));
    let job = effects.iter().find_map(|e| match e {
        Effect::StartStep(job) if job.step.name == "bare" => Some(job),
        _ => None,
    });
    let job = job.expect("bare starts");
    assert_eq!(job.step.timeout, Some(Duration::from_secs(600)), "the executor sees the default too");
    assert_eq!(job.step.limits.memory, Some(Memory(1 << 30)));
}

#[test]
fn without_limits_the_machine_arms_only_what_the_spec_says() {
    let (_, effects, now) = enqueue(Config::default());
    assert_eq!(armed(&effects, |t| matches!(t, TimerId::StepTimeout { step, .. } if step == "bare")), None);
    assert_eq!(
        armed(&effects, |t| matches!(t, TimerId::StepTimeout { step, .. } if step == "long")),
        Some(now + StdDuration::from_secs(3 * 3_600))
    );
}
