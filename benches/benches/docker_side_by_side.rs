//! cib next to the raw Docker Engine API, side by side and interleaved in one run, with the same
//! image (`busybox`) and command (`true`, no network) on both sides:
//!
//! - (a) the raw container lifecycle through bollard, with no cib code: create, start, wait,
//!   remove;
//! - (b) a 10-step sequential cib pipeline through the engine (SQLite store, the working-tree
//!   Vcs, the Docker executor), per step: the build's time from enqueue to its end, over 10;
//! - (c) a 1-step cib build, end to end through the same engine;
//! - (d) 50 concurrent 1-step builds (distinct branches), as builds per second, next to
//! - (e) Docker's own containers per second: 50 raw lifecycles with as many in flight as the
//!   engine runs steps at once (`max_running_steps`).
//!
//! It prints p50 and p90 of each, and the ratios b/a, c/a (lower is better) and d/e (higher is
//! better). Run it with `cargo bench -p cib-benches --bench docker_side_by_side`.
//! `CIB_BENCH_ROUNDS` (default 3) sets the rounds; each round takes (a) 4 times, (b) once,
//! (c) 4 times, then (d) and (e) once each, alternating which side goes first.
//! `CIB_BENCH_TRACE` (an env-filter such as `cib_docker=debug`) prints the executor's spans, one
//! per Docker call or phase, with their durations: the profile. `CIB_BENCH_CONCURRENCY` overrides the engine's `max_running_steps` (default: what the
//! executor derives from the daemon's CPU count).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions, WaitContainerOptions};
use cib_core::engine::{Engine, EngineConfig, EngineHandle, Ports, SystemClock};
use cib_core::event::{BuildId, Conclusion, EventBody};
use cib_core::pipeline::{BuildContext, Config, Input};
use cib_core::spec::TriggerEvent;
use cib_core::testing::StaticSecrets;
use cib_docker::{DockerExecutor, DockerOptions};
use futures_util::StreamExt;
use tokio::sync::{Mutex, Notify};

const IMAGE: &str = "busybox";
const CONCURRENT_BUILDS: usize = 50;

/// The spec both builds use: `one` has a single step, `ten` a chain of ten.
fn spec() -> String {
    let mut text = String::from(
        "version: 1\npipelines:\n  one:\n    on: { push: {} }\n    steps:\n      - { name: s, image: busybox, network: none, commands: [\"true\"] }\n  ten:\n    on: { push: {} }\n    steps:\n",
    );
    for i in 0..10 {
        let after = if i == 0 { String::new() } else { format!(", depends_on: [s{}]", i - 1) };
        text.push_str(&format!(
            "      - {{ name: s{i}, image: busybox, network: none, commands: [\"true\"]{after} }}\n"
        ));
    }
    text
}

// ---------------------------------------------------------------- the raw API side

/// One raw lifecycle through bollard: create, start, wait, remove.
async fn raw_lifecycle(docker: &Docker, label: &str) -> Duration {
    let started = Instant::now();
    let body = ContainerCreateBody {
        image: Some(IMAGE.to_owned()),
        cmd: Some(vec!["true".to_owned()]),
        labels: Some(HashMap::from([("org.cib.bench".to_owned(), label.to_owned())])),
        host_config: Some(HostConfig { network_mode: Some("none".to_owned()), ..Default::default() }),
        ..Default::default()
    };
    let created = docker
        .create_container(None::<CreateContainerOptions>, body)
        .await
        .unwrap_or_else(|e| panic!("creating a container: {e}"));
    docker.start_container(&created.id, None).await.unwrap_or_else(|e| panic!("starting a container: {e}"));
    let mut wait = docker.wait_container(&created.id, Some(WaitContainerOptions { condition: "not-running".into() }));
    while let Some(status) = wait.next().await {
        status.unwrap_or_else(|e| panic!("waiting for a container: {e}"));
    }
    docker
        .remove_container(&created.id, Some(RemoveContainerOptions { force: true, v: true, link: false }))
        .await
        .unwrap_or_else(|e| panic!("removing a container: {e}"));
    started.elapsed()
}

/// `n` raw lifecycles with `concurrency` in flight; containers per second.
async fn raw_rate(docker: &Docker, label: &str, n: usize, concurrency: usize) -> f64 {
    let started = Instant::now();
    futures_util::stream::iter(0..n)
        .for_each_concurrent(concurrency, |_| async {
            raw_lifecycle(docker, label).await;
        })
        .await;
    n as f64 / started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------- the cib side

/// Builds that have finished, with their conclusions, fed by the engine's event stream.
#[derive(Default)]
struct Finished {
    done: Mutex<HashMap<BuildId, Conclusion>>,
    changed: Notify,
}

impl Finished {
    async fn wait(&self, builds: &[BuildId]) {
        loop {
            let changed = self.changed.notified();
            {
                let done = self.done.lock().await;
                if builds.iter().all(|b| done.contains_key(b)) {
                    for b in builds {
                        assert_eq!(done.get(b), Some(&Conclusion::Success), "build {b} did not succeed");
                    }
                    return;
                }
            }
            changed.await;
        }
    }
}

struct Cib {
    engine: EngineHandle,
    finished: Arc<Finished>,
    spec: Arc<str>,
    next: std::sync::atomic::AtomicUsize,
}

impl Cib {
    fn build(&self, pipeline: &str) -> (BuildId, Input) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let build = BuildId(format!("bench-{n}"));
        // Distinct branches, so that no build supersedes another.
        let branch = format!("b{n}");
        let input = Input::Enqueue {
            build: build.clone(),
            spec: self.spec.clone(),
            pipeline: pipeline.to_owned(),
            context: BuildContext {
                repo: "bench".into(),
                commit: "0000000000000000000000000000000000000000".into(),
                branch: Some(branch.clone()),
                pull_request: None,
                event: TriggerEvent::push(&branch),
                actor: None,
                trusted: true,
                upstream: None,
            },
            only: None,
            variables: BTreeMap::new(),
        };
        (build, input)
    }

    /// One build from enqueue to its end.
    async fn run(&self, pipeline: &str) -> Duration {
        let (build, input) = self.build(pipeline);
        let started = Instant::now();
        self.engine.submit(input).await.unwrap_or_else(|e| panic!("submit: {e}"));
        self.finished.wait(&[build]).await;
        started.elapsed()
    }

    /// `n` builds submitted at once; builds per second until the last one ended.
    async fn rate(&self, n: usize) -> f64 {
        let started = Instant::now();
        let mut builds = Vec::new();
        for _ in 0..n {
            let (build, input) = self.build("one");
            self.engine.submit(input).await.unwrap_or_else(|e| panic!("submit: {e}"));
            builds.push(build);
        }
        self.finished.wait(&builds).await;
        n as f64 / started.elapsed().as_secs_f64()
    }
}

// ---------------------------------------------------------------- figures

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    // Nearest rank: with few samples p90 is close to the largest.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(samples: &[Duration]) -> Vec<f64> {
    samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The profile: `CIB_BENCH_TRACE=cib_docker=debug` prints every span of the Docker executor
    // (one per Docker call or phase) as it closes, with its busy and idle time.
    if let Ok(filter) = std::env::var("CIB_BENCH_TRACE") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(std::io::stderr)
            .init();
    }
    let rounds: usize = std::env::var("CIB_BENCH_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(3).max(1);
    let instance = format!("bench-sbs-{}", std::process::id());
    let label = instance.clone();
    let exec = Arc::new(
        DockerExecutor::connect(DockerOptions::new(instance))
            .await
            .unwrap_or_else(|e| panic!("cannot reach Docker ({e}); start one with scripts/ensure-docker")),
    );
    let concurrency: usize = std::env::var("CIB_BENCH_CONCURRENCY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| exec.suggested_running_steps())
        .max(1);
    let docker = exec.docker().clone();

    let data = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let tree = data.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap_or_else(|e| panic!("mkdir: {e}"));
    std::fs::write(tree.join("README"), "a small checkout\n").unwrap_or_else(|e| panic!("write: {e}"));
    let store = cib_store::SqliteStore::open(data.path().join("cib.db"), cib_store::SqliteOptions::default())
        .unwrap_or_else(|e| panic!("store: {e}"));
    let ports = Ports {
        executor: exec.clone(),
        vcs: Arc::new(cib_git::WorkingTree::new(&tree)),
        store: Arc::new(store),
        notifiers: Vec::new(),
        clock: Arc::new(SystemClock),
        secrets: Arc::new(StaticSecrets(BTreeMap::new())),
        publisher: Arc::new(cib_core::publish::NoPublisher),
        artifacts: Arc::new(cib_core::ports::NoArtifacts),
    };
    let config = EngineConfig {
        machine: Config { max_running_steps: concurrency, ..Config::default() },
        workspace_root: data.path().join("workspaces"),
        tick_every: Duration::from_secs(30),
        reconcile_every: cib_core::engine::RECONCILE_EVERY,
        snapshots: cib_core::engine::SnapshotPolicy::default(),
    };
    let (engine, future) = Engine::start(ports, config);
    let engine_task = tokio::spawn(future);
    let finished = Arc::new(Finished::default());
    let mut events = engine.subscribe();
    let debug = std::env::var_os("CIB_BENCH_DEBUG").is_some();
    let feed = {
        let finished = finished.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if debug {
                            println!("{:?}", event.body);
                        }
                        if let EventBody::BuildFinished { build, conclusion } = event.body {
                            finished.done.lock().await.insert(build, conclusion);
                            finished.changed.notify_waiters();
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        panic!("the benchmark fell {n} events behind the engine")
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    };
    let text = spec();
    if let Err(diagnostics) = cib_core::spec::parse(&text) {
        panic!("the benchmark's spec is invalid: {diagnostics:?}\n{text}");
    }
    let cib = Cib { engine, finished, spec: Arc::from(text.as_str()), next: Default::default() };

    // Warm up both sides once: the image's layers, the daemon's caches, SQLite's file.
    raw_lifecycle(&docker, &label).await;
    cib.run("one").await;

    let (mut a, mut b, mut c, mut d, mut e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for i in 0..4 {
            // Alternate which side goes first, so that neither always meets a warmer daemon.
            if (round + i) % 2 == 0 {
                a.push(raw_lifecycle(&docker, &label).await);
                c.push(cib.run("one").await);
            } else {
                c.push(cib.run("one").await);
                a.push(raw_lifecycle(&docker, &label).await);
            }
        }
        b.push(cib.run("ten").await / 10);
        if round % 2 == 0 {
            d.push(cib.rate(CONCURRENT_BUILDS).await);
            e.push(raw_rate(&docker, &label, CONCURRENT_BUILDS, concurrency).await);
        } else {
            e.push(raw_rate(&docker, &label, CONCURRENT_BUILDS, concurrency).await);
            d.push(cib.rate(CONCURRENT_BUILDS).await);
        }
    }

    // The engine removes each build's containers on a task of its own, after the build ended:
    // wait for that before reading the leftovers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while exec.resources(None).await.is_ok_and(|r| !r.is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cib.engine.shutdown().await;
    let _ = engine_task.await;
    feed.abort();
    let left = cib_core::ports::Executor::reconcile(&*exec, &[]).await.unwrap_or_else(|e| panic!("reconcile: {e}"));

    let (a, b, c) = (ms(&a), ms(&b), ms(&c));
    println!(
        "docker side by side: `true` in {IMAGE}, no network; {rounds} rounds; concurrency {concurrency} \
         (max_running_steps); {} raw lifecycles, {} 10-step builds, {} 1-step builds, {} x {CONCURRENT_BUILDS} \
         concurrent builds",
        a.len(),
        b.len(),
        c.len(),
        d.len()
    );
    println!("  {:<58} {:>10} {:>10}", "", "p50", "p90");
    let row = |what: &str, s: &[f64], unit: &str| {
        println!("  {what:<58} {:>7.1} {unit:<2} {:>7.1} {unit:<2}", percentile(s, 0.5), percentile(s, 0.9));
    };
    row("(a) raw API lifecycle (create, start, wait, remove)", &a, "ms");
    row("(b) cib 10-step sequential pipeline, per step", &b, "ms");
    row("(c) cib 1-step build end to end (engine, SQLite)", &c, "ms");
    row(&format!("(d) cib {CONCURRENT_BUILDS} concurrent 1-step builds"), &d, "/s");
    row(&format!("(e) raw API containers at concurrency {concurrency}"), &e, "/s");
    let ratio = |what: &str, x: &[f64], y: &[f64], target: &str| {
        println!(
            "  {what:<58} {:>10.2} {:>10.2}   target {target}",
            percentile(x, 0.5) / percentile(y, 0.5),
            percentile(x, 0.9) / percentile(y, 0.9)
        );
    };
    ratio("b/a", &b, &a, "<= 0.35");
    ratio("c/a", &c, &a, "<= 1.1");
    ratio("d/e", &d, &e, ">= 0.9");
    // Raw containers carry only the bench label; remove any a panic would have left.
    println!("  leftovers removed by reconcile after the engine's own cleanup: {left}");
}
