//! Which executor runs a step: [`RoutingExecutor`] sends a step whose `runs_on` asks for an
//! operating system the Docker daemon is not (or labels the Docker side does not have) to the
//! broker, and every other step to the local executor (Docker, or Swarm).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use cib_core::event::BuildId;
use cib_core::ports::{Attached, CacheInfo, CacheJob, ExecError, Executor, LogSink, Outcome, StepRun, StopSignal};
use cib_core::spec;

use crate::dispatch::BrokerExecutor;
use crate::protocol::Labels;

/// The label set a step asks for: its `runs_on.labels`, and its `runs_on.os` as the label `os`.
pub fn step_labels(step: &spec::Step) -> Labels {
    let mut labels = Labels::new();
    if let Some(runs_on) = &step.runs_on {
        labels.extend(runs_on.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(os) = &runs_on.os {
            labels.insert("os".into(), os.clone());
        }
    }
    labels
}

/// What the local executor offers: the daemon's operating system (`linux`), and the labels its
/// nodes have.
#[derive(Debug, Clone)]
pub struct LocalOffer {
    pub os: String,
    pub labels: Labels,
}

impl LocalOffer {
    /// Whether a step must go to a remote worker: it names an operating system other than the
    /// daemon's, or a label (other than `os`) the local side does not have with that value.
    pub fn is_remote(&self, step: &spec::Step) -> bool {
        let Some(runs_on) = &step.runs_on else { return false };
        if runs_on.os.as_ref().is_some_and(|os| *os != self.os) {
            return true;
        }
        runs_on.labels.iter().any(|(k, v)| self.labels.get(k) != Some(v))
    }
}

/// Docker (or Swarm) for most steps, the broker for steps that ask for what it lacks.
pub struct RoutingExecutor {
    local: Arc<dyn Executor>,
    broker: Arc<BrokerExecutor>,
    offer: LocalOffer,
}

impl std::fmt::Debug for RoutingExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingExecutor").field("broker", &self.broker).field("offer", &self.offer).finish()
    }
}

impl RoutingExecutor {
    pub fn new(local: Arc<dyn Executor>, broker: Arc<BrokerExecutor>, offer: LocalOffer) -> Self {
        RoutingExecutor { local, broker, offer }
    }

    fn remote(&self, run: &StepRun) -> bool {
        self.offer.is_remote(&run.job.step)
    }
}

#[async_trait]
impl Executor for RoutingExecutor {
    async fn healthcheck(&self) -> Result<(), ExecError> {
        // The broker being away is not the server being unhealthy: remote steps wait for it.
        self.local.healthcheck().await
    }

    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, stop: StopSignal) -> Result<Outcome, ExecError> {
        if self.remote(run) { self.broker.run(run, logs, stop).await } else { self.local.run(run, logs, stop).await }
    }

    async fn start_services(&self, build: &BuildId, services: &[spec::Service]) -> Result<(), (String, ExecError)> {
        self.local.start_services(build, services).await
    }

    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError> {
        let broker = self.broker.cleanup(build).await;
        self.local.cleanup(build).await?;
        broker
    }

    async fn export_workspace(&self, build: &BuildId, dest: &Path) -> Result<(), ExecError> {
        self.local.export_workspace(build, dest).await
    }

    async fn import_archive(&self, run: &StepRun, archive: &Path) -> Result<(), ExecError> {
        if self.remote(run) { Ok(()) } else { self.local.import_archive(run, archive).await }
    }

    async fn restore_cache(&self, run: &StepRun, cache: &CacheJob) -> Result<Option<String>, ExecError> {
        if self.remote(run) { Ok(None) } else { self.local.restore_cache(run, cache).await }
    }

    async fn save_cache(&self, run: &StepRun, cache: &CacheJob) -> Result<bool, ExecError> {
        if self.remote(run) { Ok(false) } else { self.local.save_cache(run, cache).await }
    }

    async fn list_caches(&self, repo: &str) -> Result<Vec<CacheInfo>, ExecError> {
        self.local.list_caches(repo).await
    }

    async fn remove_caches(&self, repo: &str, key: &str) -> Result<usize, ExecError> {
        self.local.remove_caches(repo, key).await
    }

    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError> {
        let broker = self.broker.reconcile(live).await.unwrap_or(0);
        Ok(self.local.reconcile(live).await? + broker)
    }

    async fn attach(
        &self,
        run: &StepRun,
        offset: u64,
        logs: Arc<dyn LogSink>,
        stop: StopSignal,
    ) -> Result<Attached, ExecError> {
        if self.remote(run) {
            self.broker.attach(run, offset, logs, stop).await
        } else {
            self.local.attach(run, offset, logs, stop).await
        }
    }

    fn detach(&self) {
        self.local.detach();
    }
}
