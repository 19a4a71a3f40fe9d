//! Replay: for every prefix of a recorded run, a machine rebuilt from the stored inputs equals
//! the machine that was never interrupted.

use std::time::Duration;

use cib_core::lease::{Holder, LeaseId, PoolConfig, Request, Unit, Want};
use cib_core::pipeline::{Config, Input, Machine, StepResult, TimerId};
use cib_core::ports::{Store, StoredInput};
use cib_core::testing::MemoryStore;

use super::machine::{Sim, context, person};

const SPEC: &str = r#"
pipelines:
  test:
    steps:
      - { name: unit, image: busybox, commands: [x], retry: { count: 1 }, no_output_timeout: 1m }
      - { name: lint, image: busybox, commands: [x] }
  staging:
    resources: [{ pool: env }]
    steps:
      - { name: deploy, image: busybox, commands: [x] }
      - { name: e2e, image: busybox, commands: [x], depends_on: [deploy], resources: [{ pool: licences }] }
      - name: sign-off
        depends_on: [e2e]
        gate: { kind: approval, approvals: 2, from: { users: [alice, bob] } }
"#;

fn recorded_run() -> Sim {
    let pools = vec![
        PoolConfig::units("env", [Unit::new("e1").with_meta("host", "e1.local")]),
        PoolConfig::counting("licences", 1),
    ];
    let mut sim = Sim::new(Config { pools, build_lease_ttl: Duration::from_secs(60), ..Config::default() });
    let hold = Request::new("carol-1", Holder::person("carol"), vec![Want::new("env", 1)], Duration::from_secs(30));
    sim.input(0, Input::TakeLease { request: hold });
    sim.enqueue(10, "t1", SPEC, "test", context("feature/a"));
    sim.enqueue(20, "s1", SPEC, "staging", context("master"));
    sim.finish(30, "t1", "unit", 1, StepResult::Infrastructure("lost".into()));
    sim.enqueue(40, "t2", SPEC, "test", context("feature/a"));
    sim.finish(50, "t1", "lint", 1, StepResult::Exited(0));
    sim.finish(60, "t1", "unit", 2, StepResult::Cancelled);
    sim.timer(30_000, TimerId::Leases);
    sim.input(31_000, Input::Tick);
    sim.finish(32_000, "s1", "deploy", 1, StepResult::Exited(0));
    sim.finish(33_000, "s1", "e2e", 1, StepResult::Exited(0));
    sim.decide(34_000, "s1", "sign-off", person("alice"), true);
    sim.input(35_000, Input::ReturnLease { lease: LeaseId::new("carol-1"), token: 1 });
    sim.decide(36_000, "s1", "sign-off", person("bob"), true);
    sim.timer(100_000, TimerId::NoOutput { build: "t2".into(), step: "unit".into(), attempt: 1 });
    sim.finish(101_000, "t2", "unit", 1, StepResult::Cancelled);
    sim.finish(102_000, "t2", "lint", 1, StepResult::Exited(0));
    sim.finish(103_000, "t2", "unit", 2, StepResult::Exited(0));
    sim
}

#[tokio::test]
async fn every_prefix_rebuilds_the_same_machine() {
    let sim = recorded_run();
    let config = sim.machine.config().clone();
    // Run again, keeping the machine after each input and storing each input as the engine
    // would, through JSON.
    let store = MemoryStore::new();
    let mut live = Machine::new(config.clone()).expect("machine");
    let mut states = vec![live.clone()];
    for (input, at) in &sim.inputs {
        let json = serde_json::to_string(&StoredInput { at: *at, input: input.clone() }).expect("serialize input");
        let stored: StoredInput = serde_json::from_str(&json).expect("deserialize input");
        store.append_input(&stored).await.expect("append");
        live.handle(stored.input, stored.at);
        states.push(live.clone());
    }
    assert_eq!(states.len(), sim.inputs.len() + 1);
    assert_eq!(&live, &sim.machine, "the recorded run and the stored run agree");
    for (prefix, expected) in states.iter().enumerate() {
        let mut rebuilt = Machine::new(config.clone()).expect("machine");
        for (_, stored) in store.inputs_after(0, prefix).await.expect("read") {
            rebuilt.handle(stored.input, stored.at);
        }
        assert_eq!(&rebuilt, expected, "prefix of {prefix} inputs");
    }
    assert!(sim.machine.builds().all(|b| b.finished_at.is_some()), "{}", sim.trace);
}

#[test]
fn a_snapshot_after_any_input_restores_the_same_machine_and_runs_on_alike() {
    let sim = recorded_run();
    let config = sim.machine.config().clone();
    let mut live = Machine::new(config.clone()).expect("machine");
    let mut states = vec![live.clone()];
    for (input, at) in &sim.inputs {
        live.handle(input.clone(), *at);
        states.push(live.clone());
    }
    for (prefix, state) in states.iter().enumerate() {
        // Through bytes, as the store keeps it.
        let bytes = serde_json::to_vec(&state.snapshot()).expect("snapshot bytes");
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("snapshot json");
        let mut restored = Machine::restore(value).expect("restore");
        assert_eq!(&restored, state, "restored after {prefix} inputs");
        // The rest of the run from the restored machine gives the same effects and end state.
        let mut original = state.clone();
        for (input, at) in &sim.inputs[prefix..] {
            let expected = original.handle(input.clone(), *at);
            assert_eq!(restored.handle(input.clone(), *at), expected, "effects after a restore at {prefix}");
        }
        assert_eq!(restored, original, "the run finished from a restore at {prefix}");
    }
}

#[test]
fn a_snapshot_of_another_version_or_of_garbage_is_refused_with_a_reason() {
    let mut value = recorded_run().machine.snapshot();
    value["version"] = serde_json::json!(99);
    let error = Machine::restore(value).expect_err("another version");
    assert!(error.to_string().contains("version 99"), "{error}");
    let error = Machine::restore(serde_json::json!({ "version": 1, "machine": [] })).expect_err("garbage");
    assert!(error.to_string().contains("snapshot cannot be read"), "{error}");
}
