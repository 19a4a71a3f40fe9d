//! Limits and hardening, as Docker reports them and as the step sees them from inside.

use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use cib_core::event::BuildId;
use cib_core::pipeline::StopReason;
use cib_core::ports::{Executor, Outcome, StopSignal, Stream};
use cib_core::spec;
use cib_docker::DEFAULT_CAPABILITIES;

use crate::common::*;

/// The effective capability set of DEFAULT_CAPABILITIES, as /proc/self/status shows it.
const EXPECTED_CAP_EFF: &str = "00000000000004fb";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_hardening_are_applied() {
    let exec = executor("limits").await;
    let dir = tempdir();
    let sink = Sink::new();
    let (handle, stop) = StopSignal::new();
    let mut job = isolated(job(
        "limits",
        "inspected",
        &["grep -E '^(CapEff|NoNewPrivs)' /proc/self/status", "echo ready", "sleep 60"],
    ));
    job.step.limits = spec::Limits { memory: Some(spec::Memory(64 << 20)), cpus: Some(0.5), pids: Some(100) };
    let run = step_run(job, dir.path());
    let inspect = async {
        sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(30)).await;
        let ids = step_containers(exec.docker(), &exec.options().instance).await;
        let id = ids.first().cloned().unwrap_or_else(|| panic!("no step container"));
        let inspected = exec.docker().inspect_container(&id, None::<InspectContainerOptions>).await;
        handle.stop(StopReason::Cancelled);
        inspected.unwrap_or_else(|e| panic!("inspect: {e}"))
    };
    let (outcome, inspected) = tokio::join!(exec.run(&run, sink.clone(), stop), inspect);
    assert_eq!(outcome.ok(), Some(Outcome::Cancelled));

    let hc = inspected.host_config.unwrap_or_default();
    assert_eq!(hc.memory, Some(64 << 20));
    assert_eq!(hc.memory_swap, Some(64 << 20), "no swap on top of the memory limit");
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    assert_eq!(hc.pids_limit, Some(100));
    assert_eq!(hc.privileged, Some(false));
    assert!(hc.security_opt.unwrap_or_default().contains(&"no-new-privileges".to_owned()));
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
    let mut added = hc.cap_add.unwrap_or_default();
    added.sort();
    let mut expected: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
    expected.sort();
    assert_eq!(added, expected);
    assert!(hc.binds.unwrap_or_default().is_empty(), "no bind mounts");
    let mounts = inspected.mounts.unwrap_or_default();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].destination.as_deref(), Some("/workspace"));
    assert_eq!(mounts[0].typ.as_deref(), Some("volume"));
    for m in &mounts {
        let source = m.source.as_deref().unwrap_or_default();
        assert!(!source.contains("docker.sock"), "the Docker socket is mounted: {m:?}");
    }

    // From inside: the capabilities are the small set, and no-new-privileges holds.
    let status = sink.text(Stream::Stdout);
    assert!(status.contains(&format!("CapEff:\t{EXPECTED_CAP_EFF}")), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    exec.cleanup(&BuildId::from("limits")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_none_has_only_loopback() {
    let exec = executor("net-none").await;
    let dir = tempdir();
    let sink = Sink::new();
    let mut isolated = job("net", "isolated", &["ls /sys/class/net"]);
    isolated.step.network = spec::Network::None;
    let (_keep, stop) = StopSignal::new();
    assert_eq!(exec.run(&step_run(isolated, dir.path()), sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    assert_eq!(sink.text(Stream::Stdout), "lo\n");
    // The same command on the build's network sees an interface besides loopback.
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let connected = job("net", "connected", &["ls /sys/class/net"]);
    assert_eq!(exec.run(&step_run(connected, dir.path()), sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    assert!(sink.text(Stream::Stdout).contains("eth0"), "{:?}", sink.text(Stream::Stdout));
    exec.cleanup(&BuildId::from("net")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_stopped_by_the_pids_limit() {
    let exec = executor("fork-bomb").await;
    let dir = tempdir();
    let sink = Sink::new();
    let mut job = job(
        "bomb",
        "bomb",
        &[
            "b() { b | b & }; b",
            // Forks fail until the bomb has burnt out; the loop retries until one succeeds.
            "until sleep 3; do :; done",
            "echo survived",
        ],
    );
    job.step.limits.pids = Some(32);
    job.step.timeout = Some(spec::Duration::from_secs(60));
    let (_keep, stop) = StopSignal::new();
    let outcome = exec.run(&step_run(job, dir.path()), sink.clone(), stop).await;
    assert_eq!(outcome.ok(), Some(Outcome::Exited(0)), "stderr: {}", sink.text(Stream::Stderr));
    assert!(sink.text(Stream::Stdout).contains("survived"));
    assert!(sink.text(Stream::Stderr).contains("can't fork"), "the pids limit never bit");
    exec.cleanup(&BuildId::from("bomb")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}
