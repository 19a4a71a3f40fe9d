//! Per-step overhead of the Docker executor next to `docker run --rm --network none` of the
//! same image and command, measured side by side (interleaved) in one run and printed as a
//! ratio. Run it with `cargo bench -p cib-docker --bench overhead`; `CIB_BENCH_RUNS` sets the
//! number of runs of each (default 20).
//!
//! Both sides run `true` in busybox without a network, so what is measured is the cost of
//! getting a container to run and of getting rid of it: for cib a script upload, attach,
//! start, wait, inspect and removal through the API; for the CLI its own create, attach,
//! start, wait and auto-removal, plus starting the CLI process. The first step of a build also
//! creates and fills the workspace volume; that cost is measured apart.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::event::BuildId;
use cib_core::pipeline::StepJob;
use cib_core::ports::{Executor, LogSink, Outcome, StepRun, StopSignal, Stream};
use cib_core::spec::Network;
use cib_core::testing::conformance_job;
use cib_docker::{DockerExecutor, DockerOptions};

const IMAGE: &str = "busybox";

struct Discard;

impl LogSink for Discard {
    fn write(&self, _: Stream, _: &[u8]) {}
}

fn job(build: &str, n: usize) -> StepJob {
    let mut job = conformance_job(build, &format!("step-{n}"), IMAGE, &["true"]);
    job.step.network = Network::None;
    job
}

async fn cib_step(exec: &DockerExecutor, job: StepJob, workspace: &std::path::Path) -> Duration {
    let run = StepRun { job, secrets: BTreeMap::new(), mask: Vec::new(), workspace: workspace.to_path_buf() };
    let (_keep, stop) = StopSignal::new();
    let started = Instant::now();
    let outcome = exec.run(&run, Arc::new(Discard), stop).await;
    let took = started.elapsed();
    assert_eq!(outcome, Ok(Outcome::Exited(0)), "the cib step failed");
    took
}

async fn docker_run() -> Duration {
    tokio::task::spawn_blocking(|| {
        let started = Instant::now();
        let status = std::process::Command::new("docker")
            .args(["run", "--rm", "--network", "none", IMAGE, "sh", "-c", "true"])
            .status()
            .unwrap_or_else(|e| panic!("running the docker CLI: {e}"));
        let took = started.elapsed();
        assert!(status.success(), "docker run failed: {status}");
        took
    })
    .await
    .unwrap_or_else(|e| panic!("join: {e}"))
}

struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    Stats { median: samples[samples.len() / 2], min: samples[0], max: samples[samples.len() - 1] }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn line(what: &str, s: &Stats) {
    println!("  {what:<44} median {:>7}   min {:>7}   max {:>7}", ms(s.median), ms(s.min), ms(s.max));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("CIB_BENCH_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(20).max(3);
    let options = DockerOptions::new(format!("bench-{}", std::process::id()));
    let exec = DockerExecutor::connect(options)
        .await
        .unwrap_or_else(|e| panic!("cannot reach Docker ({e}); start one with scripts/ensure-docker"));
    let workspace = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));

    // Warm up both paths once: the image's layers, the daemon's caches, the workspace.
    docker_run().await;
    cib_step(&exec, job("bench", 0), workspace.path()).await;

    let (mut cli, mut cib, mut first) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=runs {
        // Alternate which goes first, so that neither always runs on a warmer daemon.
        if n % 2 == 0 {
            cli.push(docker_run().await);
            cib.push(cib_step(&exec, job("bench", n), workspace.path()).await);
        } else {
            cib.push(cib_step(&exec, job("bench", n), workspace.path()).await);
            cli.push(docker_run().await);
        }
        // The first step of a fresh build, which also creates and fills its workspace volume.
        let build = format!("bench-first-{n}");
        first.push(cib_step(&exec, job(&build, 0), workspace.path()).await);
        exec.cleanup(&BuildId::from(build.as_str())).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    }
    exec.cleanup(&BuildId::from("bench")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    let left = exec.reconcile(&[]).await.unwrap_or_else(|e| panic!("reconcile: {e}"));
    assert_eq!(left, 0, "the benchmark left resources behind");

    let (cli, cib, first) = (stats(cli), stats(cib), stats(first));
    println!("per-step overhead: `true` in {IMAGE}, no network, {runs} runs of each, interleaved");
    line("docker run --rm --network none", &cli);
    line("cib DockerExecutor::run (workspace ready)", &cib);
    line("cib first step of a build (+ workspace)", &first);
    println!(
        "  ratio cib / docker run (medians): {:.2}; first step of a build: {:.2}",
        cib.median.as_secs_f64() / cli.median.as_secs_f64(),
        first.median.as_secs_f64() / cli.median.as_secs_f64()
    );
}
