//! Per-step overhead of the Swarm executor next to the single-daemon executor, on the same
//! daemon made a one-node swarm for the run: each side runs `true` in busybox as the second
//! step of a build (the workspace is there already), interleaved, and the medians and the
//! ratio are printed. Run it with `cargo bench -p cib-docker --bench swarm_overhead`;
//! `CIB_BENCH_RUNS` sets the number of steps of each (default 10). It makes the daemon a
//! swarm manager when it is not one and leaves the swarm at the end only then.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::event::BuildId;
use cib_core::ports::{Executor, LogSink, Outcome, StepRun, StopSignal, Stream};
use cib_core::testing::conformance_job;
use cib_docker::{DockerExecutor, DockerOptions, SwarmExecutor, SwarmOptions};

struct Discard;

impl LogSink for Discard {
    fn write(&self, _: Stream, _: &[u8]) {}
}

async fn step(exec: &dyn Executor, build: &str, n: usize, workspace: &std::path::Path) -> Duration {
    let mut job = conformance_job(build, &format!("step-{n}"), "busybox", &["true"]);
    job.step.isolated = true;
    let run = StepRun { job, secrets: BTreeMap::new(), mask: Vec::new(), workspace: workspace.to_path_buf() };
    let (_keep, stop) = StopSignal::new();
    let started = Instant::now();
    let outcome = exec.run(&run, Arc::new(Discard), stop).await;
    let took = started.elapsed();
    assert_eq!(outcome, Ok(Outcome::Exited(0)), "the step failed");
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).output().unwrap_or_else(|e| panic!("docker: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("CIB_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let created = cli(&["info", "--format", "{{.Swarm.LocalNodeState}}"]) == "inactive";
    if created {
        cli(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
    }
    let instance = format!("bench-swarm-{}", std::process::id());
    let docker = DockerExecutor::connect(DockerOptions::new(format!("{instance}-d")))
        .await
        .unwrap_or_else(|e| panic!("docker: {e}"));
    let swarm = SwarmExecutor::connect(SwarmOptions::new(format!("{instance}-s")))
        .await
        .unwrap_or_else(|e| panic!("swarm: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // The first step of each build makes and fills the workspace: measured apart.
    let first_docker = step(&docker, "bench-d", 0, dir.path()).await;
    let first_swarm = step(&swarm, "bench-s", 0, dir.path()).await;
    let (mut d, mut s) = (Vec::new(), Vec::new());
    for n in 1..=runs {
        d.push(step(&docker, "bench-d", n, dir.path()).await);
        s.push(step(&swarm, "bench-s", n, dir.path()).await);
    }
    let (md, ms) = (median(d), median(s));
    println!("first step (with the workspace): docker {first_docker:?}, swarm {first_swarm:?}");
    println!("step, median of {runs}: docker {md:?}, swarm {ms:?}");
    println!("swarm overhead per step: {:?} ({:.2}x)", ms.saturating_sub(md), ms.as_secs_f64() / md.as_secs_f64());
    let _ = docker.cleanup(&BuildId::from("bench-d")).await;
    let _ = swarm.cleanup(&BuildId::from("bench-s")).await;
    if created {
        cli(&["swarm", "leave", "--force"]);
    }
}
