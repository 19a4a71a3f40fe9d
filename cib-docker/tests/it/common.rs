//! Helpers shared by the integration tests: an executor per test, jobs, sinks, and the
//! "nothing is left" check that asks Docker directly rather than the code under test.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptions, ListNetworksOptions, ListVolumesOptions};
use cib_core::pipeline::StepJob;
use cib_core::ports::{Executor, LogSink, StepRun, Stream};
use cib_core::testing::conformance_job;
use cib_docker::naming::{LABEL_ENGINE, LABEL_ROLE};
use cib_docker::{DockerExecutor, DockerOptions};

/// The image every test runs, built locally by `scripts/build-test-images`.
pub const IMAGE: &str = "busybox";

/// An engine instance label unique to this test and process.
pub fn instance(test: &str) -> String {
    format!("it-{test}-{}", std::process::id())
}

/// Connects an executor for one test, with options adjusted by `adjust`. Fails the test, with
/// the way out, when no daemon answers.
pub async fn executor_with(test: &str, adjust: impl FnOnce(&mut DockerOptions)) -> Arc<DockerExecutor> {
    let mut options = DockerOptions::new(instance(test));
    adjust(&mut options);
    match DockerExecutor::connect(options).await {
        Ok(e) => {
            sweep_dead_test_instances(e.docker()).await;
            Arc::new(e)
        }
        Err(e) => panic!(
            "cannot reach Docker: {e}\nThe cib-docker tests run real containers and never skip: start a daemon with \
             scripts/ensure-docker (scripts/test does it first) and build the images with scripts/build-test-images."
        ),
    }
}

/// Removes what earlier test processes left when they failed before their cleanup: instances
/// named `it-…-<pid>` whose process is gone. Tests of a live process are never touched, so
/// parallel runs stay apart. Best effort: a failure here is not this test's failure.
async fn sweep_dead_test_instances(docker: &Docker) {
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![LABEL_ENGINE.to_owned()])]);
    let mut instances = std::collections::BTreeSet::new();
    let all = ListContainersOptions { all: true, filters: Some(filters.clone()), ..Default::default() };
    for c in docker.list_containers(Some(all)).await.unwrap_or_default() {
        instances.extend(c.labels.and_then(|mut l| l.remove(LABEL_ENGINE)));
    }
    let volumes = docker.list_volumes(Some(ListVolumesOptions { filters: Some(filters.clone()) })).await;
    for v in volumes.ok().and_then(|v| v.volumes).unwrap_or_default() {
        instances.extend(v.labels.get(LABEL_ENGINE).cloned());
    }
    for n in docker.list_networks(Some(ListNetworksOptions { filters: Some(filters) })).await.unwrap_or_default() {
        instances.extend(n.labels.and_then(|mut l| l.remove(LABEL_ENGINE)));
    }
    for instance in instances {
        let Some(pid) = instance.strip_prefix("it-").and_then(|rest| rest.rsplit('-').next()) else { continue };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(stale) = DockerExecutor::connect(DockerOptions::new(instance)).await {
            let _ = stale.reconcile(&[]).await;
        }
    }
}

pub async fn executor(test: &str) -> Arc<DockerExecutor> {
    executor_with(test, |_| {}).await
}

/// A step running `commands` in busybox.
pub fn job(build: &str, step: &str, commands: &[&str]) -> StepJob {
    conformance_job(build, step, IMAGE, commands)
}

/// A step that runs in a container of its own (`isolated: true`), for the tests about a step
/// container's life: its removal, re-attaching to it, what a crash leaves. Warm steps have
/// their own tests (`warm.rs`).
pub fn isolated(mut job: StepJob) -> StepJob {
    job.step.isolated = true;
    job
}

pub fn step_run(job: StepJob, workspace: &Path) -> StepRun {
    StepRun { job, secrets: BTreeMap::new(), mask: Vec::new(), workspace: workspace.to_path_buf() }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

/// A sink that keeps every write apart, so that tests can see how output was cut.
#[derive(Debug, Default)]
pub struct Sink {
    writes: Mutex<Vec<(Stream, Vec<u8>)>>,
}

impl Sink {
    pub fn new() -> Arc<Self> {
        Arc::new(Sink::default())
    }

    pub fn writes(&self, stream: Stream) -> Vec<Vec<u8>> {
        let w = self.writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.iter().filter(|(s, _)| *s == stream).map(|(_, b)| b.clone()).collect()
    }

    pub fn text(&self, stream: Stream) -> String {
        String::from_utf8_lossy(&self.writes(stream).concat()).into_owned()
    }

    /// Waits until `needle` shows up on `stream`; fails the test after `limit`.
    pub async fn wait_for(&self, stream: Stream, needle: &str, limit: Duration) {
        let start = tokio::time::Instant::now();
        while !self.text(stream).contains(needle) {
            assert!(start.elapsed() < limit, "{needle:?} did not appear within {limit:?}; got {:?}", self.text(stream));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl LogSink for Sink {
    fn write(&self, stream: Stream, bytes: &[u8]) {
        self.writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((stream, bytes.to_vec()));
    }
}

/// Every container, volume and network carrying this engine label, asked of Docker directly.
pub async fn leftovers(docker: &Docker, instance: &str) -> Vec<String> {
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![format!("{LABEL_ENGINE}={instance}")])]);
    let mut left = Vec::new();
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters.clone()),
            ..Default::default()
        }))
        .await
        .unwrap_or_else(|e| panic!("listing containers: {e}"));
    left.extend(containers.into_iter().map(|c| format!("container {:?}", c.names.unwrap_or_default())));
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions { filters: Some(filters.clone()) }))
        .await
        .unwrap_or_else(|e| panic!("listing volumes: {e}"));
    left.extend(volumes.volumes.unwrap_or_default().into_iter().map(|v| format!("volume {}", v.name)));
    let networks = docker
        .list_networks(Some(ListNetworksOptions { filters: Some(filters) }))
        .await
        .unwrap_or_else(|e| panic!("listing networks: {e}"));
    left.extend(networks.into_iter().map(|n| format!("network {}", n.name.unwrap_or_default())));
    left
}

pub async fn assert_nothing_left(exec: &DockerExecutor) {
    let left = leftovers(exec.docker(), &exec.options().instance).await;
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// The ids of the step containers of an engine instance that are still there.
pub async fn step_containers(docker: &Docker, instance: &str) -> Vec<String> {
    let filters = std::collections::HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_ENGINE}={instance}"), format!("{LABEL_ROLE}=step")],
    )]);
    let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    let containers = docker.list_containers(Some(options)).await.unwrap_or_else(|e| panic!("listing containers: {e}"));
    containers.into_iter().filter_map(|c| c.id).collect()
}
