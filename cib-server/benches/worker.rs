//! Worker step overhead on a real RabbitMQ node (`scripts/ensure-rabbitmq`): a `cib serve`
//! state in process with the broker executor, its worker API on real HTTP, and one worker (the
//! same code as `cib worker`) with the host executor. Each of N one-command steps (`true`) is
//! timed from `Executor::run` (the job is published) to its claim by the worker (queue → start:
//! publish with confirm, delivery, claim over HTTP), and to its result (the whole step: the
//! workspace fetched, the process run, the result synced and acknowledged). Prints p50 and p99.
//!
//! Run with `cargo bench -p cib-server --bench worker`; `CIB_BENCH_STEPS` sets N (default 50).

// Benchmarks exist to print their figures.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cib_core::ports::{Executor, LogSink, Outcome, StepRun, StopSignal, Stream};
use cib_core::testing::conformance_job;
use cib_git::GitVcs;
use cib_server::config::ServerConfig;
use cib_server::server;

/// Notes when the worker's claim was logged.
#[derive(Default)]
struct Timing {
    claimed: Mutex<Option<Instant>>,
}

impl LogSink for Timing {
    fn write(&self, _stream: Stream, bytes: &[u8]) {
        if bytes.starts_with(b"cib: running on worker") {
            self.claimed.lock().expect("lock").get_or_insert_with(Instant::now);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let out = std::process::Command::new(root.join("scripts/ensure-rabbitmq")).output().expect("ensure-rabbitmq");
    assert!(out.status.success(), "scripts/ensure-rabbitmq failed");
    let url = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    let steps: usize = std::env::var("CIB_BENCH_STEPS").ok().and_then(|n| n.parse().ok()).unwrap_or(50);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(
            cib_store::SqliteStore::open(dir.path().join("cib.db"), cib_store::SqliteOptions::default())
                .expect("store"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_url = format!("http://{}", listener.local_addr().expect("address"));
        let mut config = cib_worker::BrokerConfig::new(url.clone(), server_url, dir.path().join("worker-jobs"));
        config.heartbeat = Duration::from_secs(1);
        config.stale_after = Duration::from_secs(3);
        let broker = cib_worker::BrokerExecutor::start(config).expect("broker executor");
        let server_config = ServerConfig { data_dir: dir.path().to_path_buf(), ..ServerConfig::default() };
        let running = server::start(server_config, broker.clone(), store, Arc::new(GitVcs::new()));
        running.state.workers.set(broker.clone()).expect("set once");
        tokio::spawn(server::serve(running.state.clone(), listener, std::future::pending()));
        // A label of this run's own, so that no other worker takes these jobs.
        let os = format!("bench{}", std::process::id());
        let labels = cib_worker::protocol::parse_labels(&format!("os={os}")).expect("labels");
        let options =
            cib_worker::worker::WorkerOptions { broker: url.clone(), labels, name: "bench".into(), state_dir: None };
        tokio::spawn(cib_worker::worker::run(options, std::future::pending()));
        let workspace = dir.path().join("workspace");
        std::fs::create_dir_all(&workspace).expect("workspace");
        std::fs::write(workspace.join("README"), "a small checkout\n").expect("file");

        let mut queue_to_start = Vec::new();
        let mut whole = Vec::new();
        // The first step also waits for the worker to connect; it is not counted.
        for i in 0..=steps {
            let mut job = conformance_job(&format!("wb{i}"), "remote", "none", &["true"]);
            job.step.runs_on = Some(cib_core::spec::RunsOn { os: Some(os.clone()), labels: Default::default() });
            let run = StepRun { job, secrets: Default::default(), mask: Vec::new(), workspace: workspace.clone() };
            let timing = Arc::new(Timing::default());
            let (_stop, signal) = StopSignal::new();
            let started = Instant::now();
            let outcome = broker.run(&run, timing.clone(), signal).await.expect("the step runs");
            let ended = started.elapsed();
            assert_eq!(outcome, Outcome::Exited(0));
            let claimed = timing.claimed.lock().expect("lock").expect("claimed") - started;
            if i > 0 {
                queue_to_start.push(claimed);
                whole.push(ended);
            }
        }
        queue_to_start.sort();
        whole.sort();
        println!("worker step overhead over {steps} sequential steps (one worker, RabbitMQ on loopback):");
        println!(
            "  queue -> start (publish, confirm, delivery, claim): p50 {:.1} ms, p99 {:.1} ms",
            percentile(&queue_to_start, 0.5).as_secs_f64() * 1e3,
            percentile(&queue_to_start, 0.99).as_secs_f64() * 1e3
        );
        println!(
            "  whole step (to the result synced and acknowledged): p50 {:.1} ms, p99 {:.1} ms",
            percentile(&whole, 0.5).as_secs_f64() * 1e3,
            percentile(&whole, 0.99).as_secs_f64() * 1e3
        );
    });
}
