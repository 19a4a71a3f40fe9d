//! Prints the pipeline machine's step transitions per second and the lease table's operations
//! per second, with 10,000 queued pipelines contending for a pool of 1,000 units.
//!
//! Run with `cargo bench -p cib-benches --bench machine`.

// Benchmarks exist to print their figures.
#![allow(clippy::print_stdout)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::event::BuildId;
use cib_core::lease::{Holder, LeaseTable, PoolConfig, Request, Unit, Want};
use cib_core::pipeline::{BuildContext, Config, Effect, Input, Machine, StepResult};
use cib_core::spec::TriggerEvent;
use cib_core::time::Timestamp;

const PIPELINES: usize = 10_000;
const UNITS: usize = 1_000;

const SPEC: &str = r#"
pipelines:
  test:
    resources: [{ pool: devices }]
    steps:
      - { name: build, image: busybox, commands: [make] }
      - { name: unit, image: busybox, commands: [make test], depends_on: [build] }
      - { name: lint, image: busybox, commands: [make lint], depends_on: [build] }
      - { name: package, image: busybox, commands: [make dist], depends_on: [unit, lint] }
"#;

fn pool() -> Vec<PoolConfig> {
    vec![PoolConfig::units(
        "devices",
        (0..UNITS).map(|i| Unit::new(format!("device-{i}")).with_meta("serial", format!("SN{i:05}"))),
    )]
}

fn machine_bench() {
    let mut machine =
        Machine::new(Config { max_running_steps: UNITS * 4, pools: pool(), ..Config::default() }).expect("config");
    let spec: Arc<str> = Arc::from(SPEC);
    let mut running: VecDeque<(BuildId, String, u32)> = VecDeque::new();
    let collect = |effects: Vec<Effect>, running: &mut VecDeque<(BuildId, String, u32)>| {
        for e in effects {
            if let Effect::StartStep(job) = e {
                running.push_back((job.build.clone(), job.step.name.clone(), job.attempt));
            }
        }
    };
    let started = Instant::now();
    for i in 0..PIPELINES {
        let branch = format!("feature/{i}");
        let input = Input::Enqueue {
            build: BuildId(format!("b{i}")),
            spec: spec.clone(),
            pipeline: "test".into(),
            context: BuildContext {
                repo: "acme/shop".into(),
                commit: format!("{i:040x}"),
                branch: Some(branch.clone()),
                pull_request: None,
                event: TriggerEvent::push(&branch),
                actor: None,
                trusted: true,
                upstream: None,
            },
            only: None,
            variables: Default::default(),
        };
        let effects = machine.handle(input, Timestamp(i as u64));
        collect(effects, &mut running);
    }
    let enqueue = started.elapsed();
    let started = Instant::now();
    let mut now = PIPELINES as u64;
    let mut finished_steps = 0u64;
    while let Some((build, step, attempt)) = running.pop_front() {
        now += 1;
        let effects =
            machine.handle(Input::StepFinished { build, step, attempt, result: StepResult::Exited(0) }, Timestamp(now));
        finished_steps += 1;
        collect(effects, &mut running);
    }
    let drive = started.elapsed();
    let done = machine.builds().filter(|b| b.finished_at.is_some()).count();
    assert_eq!(done, PIPELINES, "every pipeline finished");
    // Each step is started once and finished once: two transitions.
    let transitions = finished_steps * 2;
    println!(
        "machine: {PIPELINES} pipelines queued for {UNITS} units in {:.2} s ({:.0} enqueues/s)",
        enqueue.as_secs_f64(),
        PIPELINES as f64 / enqueue.as_secs_f64()
    );
    println!(
        "machine: {finished_steps} steps run to completion in {:.2} s: {:.0} step transitions/s",
        drive.as_secs_f64(),
        transitions as f64 / drive.as_secs_f64()
    );
}

fn lease_bench() {
    let mut table = LeaseTable::new(pool()).expect("pools");
    let ttl = Duration::from_secs(600);
    let started = Instant::now();
    for i in 0..PIPELINES {
        let request =
            Request::new(format!("r{i}"), Holder::build(format!("b{i}"), None), vec![Want::new("devices", 1)], ttl);
        table.request(request, Timestamp(i as u64)).expect("request");
    }
    let requests = started.elapsed();
    assert_eq!(table.leases().count(), UNITS);
    assert_eq!(table.waiting().len(), PIPELINES - UNITS);
    let started = Instant::now();
    let mut ops = 0u64;
    let mut next = 0;
    let mut grants = 0u64;
    let mut latencies: Vec<Duration> = Vec::with_capacity(PIPELINES);
    while table.leases().count() > 0 {
        let held: Vec<(cib_core::lease::LeaseId, u64)> =
            table.leases().take(100).map(|l| (l.id.clone(), l.token)).collect();
        for (id, token) in held {
            let op = Instant::now();
            let events = table.release(&id, token, Timestamp((PIPELINES + next) as u64)).expect("release");
            latencies.push(op.elapsed());
            if events.iter().any(|e| matches!(e, cib_core::lease::LeaseEvent::Granted { .. })) {
                grants += 1;
            }
            next += 1;
            ops += 1;
        }
    }
    let releases = started.elapsed();
    assert_eq!(ops as usize, PIPELINES, "every request was granted and released once");
    println!(
        "leases: {PIPELINES} requests for {UNITS} units in {:.2} s ({:.0} requests/s)",
        requests.as_secs_f64(),
        PIPELINES as f64 / requests.as_secs_f64()
    );
    println!(
        "leases: {ops} releases, each granting the next waiter, in {:.2} s ({:.0} release+grant operations/s)",
        releases.as_secs_f64(),
        ops as f64 / releases.as_secs_f64()
    );
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "leases: grant latency under contention ({grants} grants to waiters, {} waiting at the start): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        PIPELINES - UNITS,
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e6
    );
}

fn main() {
    machine_bench();
    lease_bench();
}
