//! The [`Executor`] on the Docker Engine API.
//!
//! Per build there is a workspace volume holding the checkout (created and filled with the
//! build's first container) and, when a step or a service uses one, a private bridge network;
//! both are removed by `cleanup`. Per step there is an exec in a warm container (see `warm`) or
//! a container of its own, created with its script and attached to, started, watched and
//! removed, on every path: an error, a stop, a timeout, or the future being dropped.
//! Everything carries the engine's and the build's labels, which is how `cleanup` and
//! `reconcile` find it again without any state surviving a crash.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::exec::StartExecResults;
use bollard::models::{ContainerCreateBody, ExecConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions, KillContainerOptions,
    ListContainersOptions, ListNetworksOptions, ListVolumesOptions, LogsOptions, RemoveContainerOptions,
    RemoveVolumeOptions, UploadToContainerOptions, WaitContainerOptions,
};
use cib_core::event::BuildId;
use cib_core::pipeline::StopReason;
use cib_core::ports::{
    Attached, CacheInfo, CacheJob, ExecError, Executor, LogSink, Outcome, StepRun, StopSignal, Stream,
};
use cib_core::spec;
use futures_util::{StreamExt, TryStreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache;
use crate::containers::{self, StepContainer};
use crate::errors::{exec_error, is_not_found, status};
use crate::image;
use crate::mask::Masker;
use crate::naming::{
    BuildNames, LABEL_ATTEMPT, LABEL_BUILD, LABEL_ENGINE, LABEL_ROLE, LABEL_SERVICE, LABEL_STDIN, LABEL_STEP, Role,
    label_filter,
};
use crate::options::DockerOptions;
use crate::warm::{self, WarmKey};
use crate::workspace;

/// A warm container taken by one step. Given back when the step ended cleanly, thrown away
/// otherwise; when the step's future is dropped midway it is removed (its exec with it), unless
/// the engine detached.
struct WarmLease {
    docker: Docker,
    id: Option<String>,
    key: WarmKey,
    state: Arc<tokio::sync::Mutex<BuildState>>,
    build: BuildId,
    detached: Arc<AtomicBool>,
    removals: Removals,
}

/// Work running in the background for each build (removals, containers made ahead), which the
/// build's `cleanup` waits for before it lists what is left: a volume cannot go while a
/// container being removed still holds it. Kept per build, so that one build's cleanup neither
/// waits for another's nor takes its tasks away from it (that build's cleanup would then find
/// its container half-removed, and its volume still held).
type Removals = Arc<Mutex<HashMap<BuildId, Vec<tokio::task::JoinHandle<()>>>>>;

fn track(removals: &Removals, build: &BuildId, task: tokio::task::JoinHandle<()>) {
    let mut r = lock(removals);
    r.retain(|_, tasks| {
        tasks.retain(|t| !t.is_finished());
        !tasks.is_empty()
    });
    r.entry(build.clone()).or_default().push(task);
}

impl WarmLease {
    fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// For the build's next step with the same settings.
    async fn give_back(mut self) {
        let Some(id) = self.id.take() else { return };
        let mut state = self.state.lock().await;
        state.busy.remove(&id);
        state.idle.push((self.key.clone(), id));
    }

    /// Removed on a task of its own: nobody waits for it, and the build's cleanup or reconcile
    /// finds it by its labels should this fail.
    async fn discard(mut self) {
        let Some(id) = self.id.take() else { return };
        self.state.lock().await.busy.remove(&id);
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        let docker = self.docker.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = remove_container(&docker, &id).await {
                tracing::warn!(container = %id, error = %e, "could not remove a warm container");
            }
        });
        track(&self.removals, &self.build, task);
    }
}

impl Drop for WarmLease {
    fn drop(&mut self) {
        if let Some(id) = self.id.take()
            && !self.detached.load(Ordering::SeqCst)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (docker, state) = (self.docker.clone(), self.state.clone());
            let task = runtime.spawn(async move {
                state.lock().await.busy.remove(&id);
                if let Err(e) = remove_container(&docker, &id).await {
                    tracing::warn!(container = %id, error = %e, "could not remove an abandoned warm container");
                }
            });
            track(&self.removals, &self.build, task);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data behind these locks stays consistent at every point, so a panic elsewhere must not
    // make the executor unusable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a build's workspace volume needs before its next container starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// It holds the whole checkout.
    Done,
    /// It does not exist yet, or lacks its marker: the checkout goes in.
    New,
    /// It exists, made by another process: its marker tells.
    Unknown,
}

/// What exists of a build, as far as this process knows.
#[derive(Debug, Default)]
struct BuildState {
    network: bool,
    workspace: bool,
    /// Set when this process found no workspace volume for the build and made it: then every
    /// volume and network of the build is one this process knows of (`network` says whether it
    /// made one), and `cleanup` lists only containers.
    born_here: bool,
    /// Warm containers no step is using, with what they were made for.
    idle: Vec<(WarmKey, String)>,
    /// Warm containers a step of this process is using.
    busy: BTreeSet<String>,
    /// Warm containers being made ahead of their step (pipelining): the receiver wakes when the
    /// one for that key is idle, or was not made.
    preparing: Vec<(WarmKey, tokio::sync::watch::Receiver<()>)>,
    /// Set while a step's container fills the workspace through its stdin, after it started:
    /// the receiver wakes when the fill is over, one way or the other (its [`FillTicket`] is
    /// gone). Containers that need the workspace wait for it (`lock_build`).
    filling: Option<tokio::sync::watch::Receiver<()>>,
}

/// Held while a container fills the workspace through its stdin. `filled` records a whole
/// workspace; dropped without it, the fill failed, and the next container of the build looks
/// at the volume's marker again.
struct FillTicket {
    state: Arc<tokio::sync::Mutex<BuildState>>,
    /// Dropped with the ticket, which wakes the containers waiting for the fill.
    _over: tokio::sync::watch::Sender<()>,
}

impl FillTicket {
    async fn filled(self) {
        self.state.lock().await.workspace = true;
    }
}

/// What a step's own container still needs once it is created: the archive to stream into its
/// stdin, and the ticket of the workspace's fill when the archive carries the checkout.
struct Feed {
    upload: workspace::Upload,
    ticket: Option<FillTicket>,
}

/// What a container filled through its stdin said first (see `containers::STDIN_WRAPPER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Said {
    Unpacked,
    NoTar,
}

/// Which token `buf`, the first bytes of a container's stdout, begins with: `None` while it
/// could still become one, `Some(None)` when it is none of them (ordinary output).
fn opening(buf: &[u8]) -> Option<Option<(Said, usize)>> {
    let mut undecided = false;
    for (token, said) in [(containers::UNPACKED, Said::Unpacked), (containers::NO_TAR, Said::NoTar)] {
        if buf.starts_with(token) {
            return Some(Some((said, token.len())));
        }
        undecided |= token.starts_with(buf);
    }
    if undecided { None } else { Some(None) }
}

/// How a step in a container of its own went.
enum Supervised {
    Ran(Outcome),
    /// The image has no `tar`: nothing ran, and the step goes again, filled by an upload.
    NoTar,
    /// Filling the container through its stdin failed before the step ran.
    FillFailed(ExecError),
}

/// The image a command step runs in; caches are copied through containers of it.
fn step_image(run: &StepRun) -> Result<&str, ExecError> {
    match &run.job.step.action {
        spec::Action::Run { image, .. } => Ok(image),
        spec::Action::Gate(_) => Err(ExecError::Permanent("a gate has no container to cache for".into())),
    }
}

/// A kind of Docker resource the executor creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResourceKind {
    // In removal order: containers hold volumes and networks.
    Container,
    Volume,
    Network,
}

/// A container, volume or network carrying this engine's label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Resource {
    pub kind: ResourceKind,
    /// The id (containers, networks) or name (volumes) to remove it by.
    pub id: String,
    /// The build it belongs to, from its label.
    pub build: Option<String>,
}

/// Runs steps and services in Docker containers. See the crate documentation.
///
/// The state lives behind an `Arc`, so that work the executor starts on its own (preparing the
/// container of a step that is about to run) can outlive the call that started it.
pub struct DockerExecutor(Arc<Inner>);

struct Inner {
    docker: Docker,
    options: DockerOptions,
    /// The daemon's CPU count, which caps CPU limits.
    host_cpus: Option<f64>,
    /// Each build's state behind its own async lock, so that two steps of one build starting
    /// together create its network and workspace once.
    builds: Mutex<HashMap<BuildId, Arc<tokio::sync::Mutex<BuildState>>>>,
    /// Set when the engine goes away with steps running (`detach`): their containers are then
    /// left to run, for the next engine to re-attach to.
    detached: Arc<AtomicBool>,
    /// Warm containers being removed in the background.
    removals: Removals,
    /// Images found without `tar`, whose step containers are filled by an upload instead.
    no_tar: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for DockerExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.0;
        f.debug_struct("DockerExecutor").field("options", &s.options).field("host_cpus", &s.host_cpus).finish()
    }
}

/// Removes a container when dropped, unless it was removed already: a step whose future is
/// dropped midway (the engine gave up on it) still leaves nothing behind.
struct ContainerGuard {
    docker: Docker,
    id: Option<String>,
    /// The executor's `detached`: once set, nothing is removed on a step's behalf.
    detached: Arc<AtomicBool>,
}

const REMOVE: RemoveContainerOptions = RemoveContainerOptions { v: true, force: true, link: false };

impl ContainerGuard {
    fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// Hands the container over to the build: from now on its cleanup removes it.
    fn keep(mut self) {
        self.id = None;
    }

    async fn remove(mut self) -> Result<(), ExecError> {
        let Some(id) = self.id.take() else { return Ok(()) };
        if self.detached.load(Ordering::SeqCst) {
            return Ok(());
        }
        remove_container(&self.docker, &id).await
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        // A detached engine's steps are dropped as its process exits: their containers stay.
        if let Some(id) = self.id.take()
            && !self.detached.load(Ordering::SeqCst)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let docker = self.docker.clone();
            runtime.spawn(async move {
                if let Err(e) = remove_container(&docker, &id).await {
                    tracing::warn!(container = %id, error = %e, "could not remove an abandoned container");
                }
            });
        }
    }
}

/// Removes a container with its anonymous volumes (an image's `VOLUME`s carry no labels of ours,
/// so this is the only chance to remove them). Gone already counts as done.
pub(crate) async fn remove_container(docker: &Docker, id: &str) -> Result<(), ExecError> {
    match docker.remove_container(id, Some(REMOVE)).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        // "Removal already in progress": another cleanup got there first.
        Err(e) if status(&e) == Some(409) => Ok(()),
        Err(e) => Err(exec_error(&format!("removing container {id}"), e)),
    }
}

fn stopped(reason: StopReason) -> Outcome {
    match reason {
        StopReason::Cancelled => Outcome::Cancelled,
        StopReason::TimedOut => Outcome::TimedOut,
        StopReason::NoOutput => Outcome::NoOutput,
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How the watched container ended.
enum Ending {
    /// With code 0, as the wait said.
    Clean,
    Exited,
    Stopped(StopReason),
}

impl DockerExecutor {
    /// Connects to the daemon, agrees on an API version (Debian's dockerd 20.10 speaks 1.41,
    /// older than bollard's default), and reads its CPU count. Fails as `Misconfigured` when no
    /// daemon answers.
    pub async fn connect(options: DockerOptions) -> Result<Self, ExecError> {
        Inner::connect(options).await.map(|inner| DockerExecutor(Arc::new(inner)))
    }

    /// The client, for callers that need more of the API than the port offers (tests, tools).
    pub fn docker(&self) -> &Docker {
        &self.0.docker
    }

    pub fn options(&self) -> &DockerOptions {
        &self.0.options
    }

    /// A default for the engine's `max_running_steps` that fits this daemon: twice its CPU
    /// count, at least 2 (see `Inner::suggested_running_steps`).
    pub fn suggested_running_steps(&self) -> usize {
        self.0.suggested_running_steps()
    }

    /// The names of every engine instance with something in this daemon (containers,
    /// volumes or networks labelled by cib), so that leftovers of dead instances can be found.
    pub async fn instances(&self) -> Result<Vec<String>, ExecError> {
        self.0.instances().await
    }

    /// Everything carrying this engine's label, of one build or of all, containers first.
    pub async fn resources(&self, build: Option<&BuildId>) -> Result<Vec<Resource>, ExecError> {
        self.0.resources(build).await
    }
}

#[async_trait]
impl Executor for DockerExecutor {
    async fn healthcheck(&self) -> Result<(), ExecError> {
        self.0.healthcheck().await
    }

    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, stop: StopSignal) -> Result<Outcome, ExecError> {
        self.0.run(run, logs, stop).await
    }

    async fn start_services(&self, build: &BuildId, services: &[spec::Service]) -> Result<(), (String, ExecError)> {
        self.0.start_services(build, services).await
    }

    async fn export_workspace(&self, build: &BuildId, dest: &Path) -> Result<(), ExecError> {
        self.0.export_workspace(build, dest).await
    }

    async fn import_archive(&self, run: &StepRun, archive: &Path) -> Result<(), ExecError> {
        self.0.import_archive(run, archive).await
    }

    async fn restore_cache(&self, run: &StepRun, cache: &CacheJob) -> Result<Option<String>, ExecError> {
        self.0.restore_cache(run, cache).await
    }

    async fn save_cache(&self, run: &StepRun, cache: &CacheJob) -> Result<bool, ExecError> {
        self.0.save_cache(run, cache).await
    }

    async fn list_caches(&self, repo: &str) -> Result<Vec<CacheInfo>, ExecError> {
        self.0.list_caches(repo).await
    }

    async fn remove_caches(&self, repo: &str, key: &str) -> Result<usize, ExecError> {
        self.0.remove_caches(repo, key).await
    }

    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError> {
        self.0.cleanup(build).await
    }

    async fn attach(
        &self,
        run: &StepRun,
        offset: u64,
        logs: Arc<dyn LogSink>,
        stop: StopSignal,
    ) -> Result<Attached, ExecError> {
        self.0.attach(run, offset, logs, stop).await
    }

    fn detach(&self) {
        self.0.detach();
    }

    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError> {
        self.0.reconcile(live).await
    }
}

impl Inner {
    async fn connect(options: DockerOptions) -> Result<Self, ExecError> {
        let address = options
            .host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned());
        let unreachable = |e: ExecError| match e {
            ExecError::Transient(m) | ExecError::Misconfigured(m) => {
                ExecError::Misconfigured(format!("cannot reach the Docker daemon at {address}: {m}"))
            }
            other => other,
        };
        // bollard reads the docker client's own variables: with its `ssl` feature (on, with ring
        // as the one crypto provider), `tcp://` plus `DOCKER_TLS_VERIFY` speaks TLS and presents
        // the client certificate in `DOCKER_CERT_PATH`, so a daemon on another machine is
        // reached the way the docker client reaches it (docs/operations.md).
        let docker = match &options.host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_defaults(),
        }
        .map_err(|e| unreachable(exec_error("connecting", e)))?
        .with_timeout(options.api_timeout);
        let docker =
            docker.negotiate_version().await.map_err(|e| unreachable(exec_error("negotiating the API version", e)))?;
        let info = docker.info().await.map_err(|e| unreachable(exec_error("reading the daemon's info", e)))?;
        let host_cpus = info.ncpu.filter(|n| *n > 0).map(|n| n as f64);
        Ok(Inner {
            docker,
            options,
            host_cpus,
            builds: Mutex::new(HashMap::new()),
            detached: Arc::new(AtomicBool::new(false)),
            removals: Removals::default(),
            no_tar: Mutex::new(BTreeSet::new()),
        })
    }

    /// A default for the engine's `max_running_steps` that fits this daemon: twice its CPU
    /// count, at least 2. The daemon serialises much of a container's lifecycle (its own locks,
    /// containerd's and the kernel's namespace and cgroup setup), so more steps in flight than
    /// that only queue inside the daemon, while fewer leave its CPUs idle between a step's API
    /// calls.
    pub fn suggested_running_steps(&self) -> usize {
        let cpus = self.host_cpus.unwrap_or(1.0).max(1.0) as usize;
        (2 * cpus).max(2)
    }

    fn build_state(&self, build: &BuildId) -> Arc<tokio::sync::Mutex<BuildState>> {
        lock(&self.builds).entry(build.clone()).or_default().clone()
    }

    /// Locks a build's state once no container of it is filling the workspace through its
    /// stdin, for work that needs the workspace whole (or its absence known).
    async fn lock_build(&self, build: &BuildId) -> tokio::sync::OwnedMutexGuard<BuildState> {
        let state = self.build_state(build);
        loop {
            let mut s = state.clone().lock_owned().await;
            let Some(mut over) = s.filling.clone() else { return s };
            // `has_changed` fails once the ticket is gone: the fill is over.
            if over.has_changed().is_err() {
                s.filling = None;
                return s;
            }
            drop(s);
            let _ = over.changed().await;
        }
    }

    /// The names of every engine instance with something in this daemon (containers,
    /// volumes or networks labelled by cib), so that leftovers of dead instances can be found.
    pub async fn instances(&self) -> Result<Vec<String>, ExecError> {
        let filters = HashMap::from([("label".to_owned(), vec![LABEL_ENGINE.to_owned()])]);
        let names: std::collections::BTreeSet<String> =
            self.labelled(filters).await?.into_iter().filter_map(|(_, _, mut l)| l.remove(LABEL_ENGINE)).collect();
        Ok(names.into_iter().collect())
    }

    /// Everything carrying this engine's label, of one build or of all, containers first.
    pub async fn resources(&self, build: Option<&BuildId>) -> Result<Vec<Resource>, ExecError> {
        let mut labels = vec![(LABEL_ENGINE, self.options.instance.as_str())];
        if let Some(b) = build {
            labels.push((LABEL_BUILD, b.0.as_str()));
        }
        let mut found: Vec<Resource> = self
            .labelled(label_filter(&labels))
            .await?
            .into_iter()
            .map(|(kind, id, mut l)| Resource { kind, id, build: l.remove(LABEL_BUILD) })
            .collect();
        found.sort();
        Ok(found)
    }

    /// The containers of one build, in one listing.
    async fn containers_of(&self, build: &BuildId) -> Result<Vec<Resource>, ExecError> {
        let filters = label_filter(&[(LABEL_ENGINE, self.options.instance.as_str()), (LABEL_BUILD, build.0.as_str())]);
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
            .await
            .map_err(|e| exec_error("listing containers", e))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| c.id)
            .map(|id| Resource { kind: ResourceKind::Container, id, build: Some(build.0.clone()) })
            .collect())
    }

    /// The containers, volumes and networks that match `filters`, each with its kind, the id
    /// (or volume name) to remove it by, and its labels.
    async fn labelled(
        &self,
        filters: HashMap<String, Vec<String>>,
    ) -> Result<Vec<(ResourceKind, String, HashMap<String, String>)>, ExecError> {
        let mut found = Vec::new();
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
            .map_err(|e| exec_error("listing containers", e))?;
        for c in containers {
            if let Some(id) = c.id {
                found.push((ResourceKind::Container, id, c.labels.unwrap_or_default()));
            }
        }
        let volumes = self
            .docker
            .list_volumes(Some(ListVolumesOptions { filters: Some(filters.clone()) }))
            .await
            .map_err(|e| exec_error("listing volumes", e))?;
        for v in volumes.volumes.unwrap_or_default() {
            found.push((ResourceKind::Volume, v.name, v.labels));
        }
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions { filters: Some(filters) }))
            .await
            .map_err(|e| exec_error("listing networks", e))?;
        for n in networks {
            if let Some(id) = n.id {
                found.push((ResourceKind::Network, id, n.labels.unwrap_or_default()));
            }
        }
        Ok(found)
    }

    /// Removes resources in order (containers, then volumes, then networks). Tries every one
    /// and reports the first failure, so that one stuck resource does not keep the rest.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn remove_all(&self, resources: &[Resource]) -> Result<usize, ExecError> {
        let mut removed = 0;
        let mut first_error = None;
        for r in resources {
            let result = match r.kind {
                ResourceKind::Container => remove_container(&self.docker, &r.id).await,
                ResourceKind::Volume => self.remove_volume(&r.id).await,
                ResourceKind::Network => match self.docker.remove_network(&r.id).await {
                    Ok(()) => Ok(()),
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(e) => Err(exec_error(&format!("removing network {}", r.id), e)),
                },
            };
            match result {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(resource = %r.id, error = %e, "could not remove");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// Removes a volume. A container that another task is removing still holds it for a moment
    /// ("volume is in use"), so that answer is waited out for up to two seconds.
    async fn remove_volume(&self, name: &str) -> Result<(), ExecError> {
        let patience = Instant::now() + Duration::from_secs(2);
        loop {
            match self.docker.remove_volume(name, Some(RemoveVolumeOptions { force: true })).await {
                Ok(()) => return Ok(()),
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) if status(&e) == Some(409) && Instant::now() < patience => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(exec_error(&format!("removing volume {name}"), e)),
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn ensure_network(&self, names: &BuildNames, state: &mut BuildState) -> Result<(), ExecError> {
        if state.network {
            return Ok(());
        }
        let name = names.network();
        match self.docker.inspect_network(&name, None).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                let request = NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("bridge".to_owned()),
                    labels: Some(names.labels(Role::Network)),
                    ..Default::default()
                };
                self.docker
                    .create_network(request)
                    .await
                    .map_err(|e| exec_error(&format!("creating network {name}"), e))?;
            }
            Err(e) => return Err(exec_error(&format!("inspecting network {name}"), e)),
        }
        state.network = true;
        Ok(())
    }

    /// What the build's workspace volume needs: nothing when this process filled it; the
    /// checkout when it does not exist yet (the next container of the build creates it); a look
    /// at its marker when another process made it (a restart). One inspection of a volume, much
    /// cheaper in the daemon than the container the marker used to be.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn fill_needed(&self, names: &BuildNames, state: &BuildState) -> Result<Fill, ExecError> {
        if state.workspace {
            return Ok(Fill::Done);
        }
        match self.docker.inspect_volume(&names.volume()).await {
            Ok(_) => Ok(Fill::Unknown),
            Err(e) if is_not_found(&e) => Ok(Fill::New),
            Err(e) => Err(exec_error("looking for the workspace volume", e)),
        }
    }

    /// Creates a container of the build and, before it starts, uploads `extras` into it (the
    /// warm directory, a step's script) together with the checkout when the workspace volume
    /// needs it, in one archive; or, with `stdin`, leaves that archive for the caller to stream
    /// into the container's stdin once it has started (see `containers::STDIN_WRAPPER`).
    ///
    /// This is how the workspace is filled, once per build: the first container of the build
    /// creates the labelled volume (it is one of its mounts), and the archive is extracted into
    /// it before anything of the step runs, with a marker file written last. A volume without
    /// the marker was left half-filled (an upload failed, or the engine died midway) and is
    /// filled again: extracting the whole checkout over a partial copy of it leaves the whole
    /// checkout, and no step ran on it. The caller holds the build's state, so two steps
    /// starting together fill it once; a fill through stdin happens after this returns, so it
    /// leaves a [`FillTicket`] in the state that other containers of the build wait for.
    #[tracing::instrument(level = "debug", skip_all)]
    #[allow(clippy::too_many_arguments, reason = "one call site each, and every argument differs")]
    async fn create_filled(
        &self,
        name: &str,
        body: ContainerCreateBody,
        names: &BuildNames,
        dir: &Path,
        extras: Vec<workspace::Extra>,
        mut state: tokio::sync::OwnedMutexGuard<BuildState>,
        stdin: bool,
    ) -> Result<(ContainerGuard, Option<Feed>), ExecError> {
        let mut fill = self.fill_needed(names, &state).await?;
        if fill == Fill::New {
            state.born_here = true;
        }
        if fill == Fill::Done {
            // Nothing to fill: other containers of the build may be made meanwhile.
            drop(state);
            let container = self.create(name, body).await?;
            let upload = workspace::Upload { extras, checkout: None };
            if stdin {
                return Ok((container, Some(Feed { upload, ticket: None })));
            }
            if let Err(e) = self.upload(container.id(), upload).await {
                let _ = container.remove().await;
                return Err(e);
            }
            return Ok((container, None));
        }
        if !dir.is_dir() {
            return Err(ExecError::Permanent(format!("the workspace {} is not a directory", dir.display())));
        }
        let container = self.create(name, body).await?;
        if fill == Fill::Unknown {
            let marker = bollard::query_parameters::ContainerArchiveInfoOptions {
                path: format!("{}/{}", containers::WORKSPACE, workspace::FILLED_MARKER),
            };
            fill = match self.docker.get_container_archive_info(container.id(), Some(marker)).await {
                Ok(_) => Fill::Done,
                Err(e) if is_not_found(&e) => Fill::New,
                Err(e) => {
                    let _ = container.remove().await;
                    return Err(exec_error("looking for the workspace's marker", e));
                }
            };
        }
        let upload = workspace::Upload { extras, checkout: (fill == Fill::New).then(|| dir.to_path_buf()) };
        if stdin {
            let ticket = (fill == Fill::New).then(|| {
                let (over, waiting) = tokio::sync::watch::channel(());
                state.filling = Some(waiting);
                FillTicket { state: tokio::sync::OwnedMutexGuard::mutex(&state).clone(), _over: over }
            });
            if ticket.is_none() {
                state.workspace = true;
            }
            return Ok((container, Some(Feed { upload, ticket })));
        }
        if let Err(e) = self.upload(container.id(), upload).await {
            // Best effort: what stays is found by the next attempt, or by cleanup.
            let _ = container.remove().await;
            if fill == Fill::New {
                let _ = self.discard_workspace(names).await;
            }
            return Err(e);
        }
        state.workspace = true;
        Ok((container, None))
    }

    /// Streams an upload to `/` of a container that has not started.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn upload(&self, id: &str, upload: workspace::Upload) -> Result<(), ExecError> {
        let with_checkout = upload.checkout.is_some();
        let (archive, writer) = workspace::archive(upload);
        let options = UploadToContainerOptions {
            path: "/".to_owned(),
            // When the image names a user, the checkout becomes that user's, so that it can
            // write it.
            copy_uidgid: with_checkout.then(|| "1".to_owned()),
            ..Default::default()
        };
        let uploaded = self.docker.upload_to_container(id, Some(options), bollard::body_try_stream(archive)).await;
        let written = writer.await.map_err(|e| ExecError::Transient(format!("archiving the workspace: {e}")))?;
        // The archiving error explains an upload failure better than the daemon's "unexpected EOF".
        written.map_err(|e| ExecError::Permanent(e.to_string()))?;
        uploaded.map_err(|e| {
            let what = if with_checkout { "copying the workspace into its volume" } else { "preparing the container" };
            exec_error(what, e)
        })
    }

    /// Removes a build's workspace volume after a failed fill, unless another container of the
    /// build holds it: then it stays without its marker, and the next container fills it again
    /// (extracting the whole checkout over a partial copy of it leaves the whole checkout, and no
    /// step ran on a volume without its marker).
    #[tracing::instrument(level = "debug", skip_all)]
    async fn discard_workspace(&self, names: &BuildNames) -> Result<(), ExecError> {
        let volume = names.volume();
        match self.docker.remove_volume(&volume, Some(RemoveVolumeOptions { force: true })).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) if status(&e) == Some(409) => Ok(()),
            Err(e) => Err(exec_error(&format!("removing the half-filled volume {volume}"), e)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn create(&self, name: &str, body: ContainerCreateBody) -> Result<ContainerGuard, ExecError> {
        let options = CreateContainerOptions { name: Some(name.to_owned()), ..Default::default() };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| exec_error(&format!("creating container {name}"), e))?;
        Ok(ContainerGuard { docker: self.docker.clone(), id: Some(created.id), detached: self.detached.clone() })
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), ExecError> {
        match self.docker.kill_container(id, Some(KillContainerOptions { signal: signal.to_owned() })).await {
            Ok(()) => Ok(()),
            // Not running (409) or gone (404): it stopped by itself meanwhile.
            Err(e) if matches!(status(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(exec_error(&format!("sending {signal} to container {id}"), e)),
        }
    }

    /// Runs the step in its container, which holds its script already or gets it, with the
    /// checkout when the workspace needs it, through its stdin (`feed`); the caller removes the
    /// container.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn supervise(
        &self,
        run: &StepRun,
        container: &ContainerGuard,
        feed: Option<Feed>,
        logs: Arc<dyn LogSink>,
        stop: &mut StopSignal,
    ) -> Result<Supervised, ExecError> {
        let id = container.id();
        let step = &run.job.step;

        // Attaching before the start is what keeps the first lines of output, and what lets
        // the archive in through stdin.
        let attach = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            stdin: feed.is_some(),
            ..Default::default()
        };
        let attached =
            self.docker.attach_container(id, Some(attach)).await.map_err(|e| exec_error("attaching to the step", e))?;
        let last_output = Arc::new(Mutex::new(Instant::now()));
        let (said_tx, said_rx) = match feed {
            Some(_) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let reader = tokio::spawn(forward_output(
            attached.output,
            run.secrets.values().chain(&run.mask).cloned().collect(),
            logs,
            last_output.clone(),
            said_tx,
        ));
        let feeding = match (feed, said_rx) {
            (Some(Feed { upload, ticket }), Some(said)) => {
                let (archive, writer) = workspace::archive(upload);
                let pump = tokio::spawn(feed_stdin(attached.input, archive));
                // The fill is recorded as soon as the container says so, not when the step
                // ends, so that other containers of the build need not wait for the step.
                let told = tokio::spawn(async move {
                    let said = said.await.ok();
                    if said == Some(Said::Unpacked)
                        && let Some(ticket) = ticket
                    {
                        ticket.filled().await;
                    }
                    said
                });
                Some((pump, writer, told))
            }
            _ => None,
        };

        self.docker.start_container(id, None).await.map_err(|e| exec_error("starting the step", e))?;
        let started = Instant::now();
        *lock(&last_output) = started;

        let wait_options = WaitContainerOptions { condition: "not-running".to_owned() };
        let mut wait = Box::pin(self.docker.wait_container(id, Some(wait_options)));
        let total = step.timeout.map(|t| started + t.as_std());
        let silence = step.no_output_timeout.map(|t| t.as_std());
        let ending = loop {
            let quiet_until = silence.map(|d| *lock(&last_output) + d);
            tokio::select! {
                exit = wait.next() => match exit {
                    // The wait's answer carries the exit code: a clean exit needs no inspection.
                    Some(Ok(response)) if response.status_code == 0 => break Ending::Clean,
                    None | Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) => break Ending::Exited,
                    Some(Err(e)) => return Err(exec_error("waiting for the step", e)),
                },
                reason = stop.stopped() => break Ending::Stopped(reason),
                () = until(total) => break Ending::Stopped(StopReason::TimedOut),
                () = until(quiet_until) => {
                    // Output may have arrived while we slept; then the deadline moved on.
                    if let Some(d) = silence && lock(&last_output).elapsed() >= d {
                        break Ending::Stopped(StopReason::NoOutput);
                    }
                }
            }
        };

        let stopped_early = matches!(ending, Ending::Stopped(_));
        let outcome = self.finish_step(id, &step.name, ending, &mut wait, reader).await?;
        let Some((pump, writer, told)) = feeding else { return Ok(Supervised::Ran(outcome)) };
        let said = told.await.ok().flatten();
        if said == Some(Said::Unpacked) || stopped_early {
            pump.abort();
            return Ok(Supervised::Ran(outcome));
        }
        if said == Some(Said::NoTar) {
            pump.abort();
            return Ok(Supervised::NoTar);
        }
        // The container ended without unpacking. An archiving error on this side explains it
        // best (a socket in the checkout); otherwise the container's stderr, in the step's log,
        // says what `tar` did not like.
        pump.abort();
        if let Ok(Err(e)) = writer.await {
            return Ok(Supervised::FillFailed(ExecError::Permanent(e.to_string())));
        }
        Ok(Supervised::FillFailed(ExecError::Transient(format!(
            "step {}: its container could not unpack the workspace ({outcome:?} before the step ran); its log says why",
            step.name
        ))))
    }

    /// Ends a watched step: stops its container when it was asked to, lets its output drain,
    /// and reads how it ended.
    async fn finish_step(
        &self,
        id: &str,
        step: &str,
        ending: Ending,
        wait: &mut (impl futures_util::Stream<Item = Result<bollard::models::ContainerWaitResponse, DockerError>> + Unpin),
        mut reader: tokio::task::JoinHandle<()>,
    ) -> Result<Outcome, ExecError> {
        if let Ending::Stopped(_) = ending {
            // SIGTERM first, so that the step can clean up; SIGKILL once the grace period is over.
            self.kill(id, "SIGTERM").await?;
            let exited = tokio::time::timeout(self.options.stop_grace, wait.next()).await.is_ok();
            if !exited {
                self.kill(id, "SIGKILL").await?;
                if tokio::time::timeout(self.options.api_timeout, wait.next()).await.is_err() {
                    return Err(ExecError::Transient("the step's container did not stop after SIGKILL".to_owned()));
                }
            }
        }

        // The output stream ends once the container has exited and its pipes are drained.
        if tokio::time::timeout(self.options.log_drain_timeout, &mut reader).await.is_err() {
            reader.abort();
            tracing::warn!(%step, "the step's output did not end after it exited; the rest is dropped");
        }

        if let Ending::Clean = ending {
            return Ok(Outcome::Exited(0));
        }
        let (code, oom_killed) = self.exit_state(id).await?;
        Ok(match ending {
            Ending::Clean => Outcome::Exited(0),
            Ending::Stopped(reason) => stopped(reason),
            // A command killed for memory that the script shrugged off (`|| true`) did not end
            // the step, so only a failing exit counts as out of memory.
            Ending::Exited if oom_killed && code != 0 => Outcome::OutOfMemory,
            Ending::Exited => Outcome::Exited(i32::try_from(code).unwrap_or(-1)),
        })
    }

    /// The container of one step attempt, found by its labels: the running one if any, else
    /// the newest.
    async fn step_container(
        &self,
        run: &StepRun,
    ) -> Result<Option<(String, bollard::models::ContainerSummaryStateEnum, bool)>, ExecError> {
        let attempt = run.job.attempt.to_string();
        let filters = label_filter(&[
            (LABEL_ENGINE, self.options.instance.as_str()),
            (LABEL_BUILD, run.job.build.0.as_str()),
            (LABEL_ROLE, Role::Step.as_str()),
            (LABEL_STEP, run.job.step.name.as_str()),
            (LABEL_ATTEMPT, attempt.as_str()),
        ]);
        let mut found = self
            .docker
            .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
            .await
            .map_err(|e| exec_error("looking for the step's container", e))?;
        found.sort_by_key(|c| {
            (c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING), c.created.unwrap_or_default())
        });
        Ok(found.pop().and_then(|c| {
            let fed = c.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_STDIN));
            Some((c.id?, c.state.unwrap_or(bollard::models::ContainerSummaryStateEnum::EMPTY), fed))
        }))
    }

    /// The exit code of a finished container and whether the kernel killed something in it for
    /// memory.
    ///
    /// The daemon hears of the exit and of the OOM kill through two separate events, and under
    /// load the exit can come first: the container then looks like a plain `exit 137` for a few
    /// milliseconds. So when the code is 137 (a SIGKILL, which is what the OOM killer sends) and
    /// the flag is not set yet, ask again for a short while before believing it.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn exit_state(&self, id: &str) -> Result<(i64, bool), ExecError> {
        let patience = Instant::now() + Duration::from_secs(1);
        loop {
            let inspected = self
                .docker
                .inspect_container(id, None::<InspectContainerOptions>)
                .await
                .map_err(|e| exec_error("inspecting the finished step", e))?;
            let state = inspected.state.unwrap_or_default();
            let code = state.exit_code.unwrap_or(-1);
            let oom_killed = state.oom_killed == Some(true);
            if oom_killed || code != 137 || Instant::now() >= patience {
                return Ok((code, oom_killed));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes an idle warm container made for `key`, waiting for one that is being prepared for
    /// it (pipelining), or makes one.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn take_warm(
        &self,
        run: &StepRun,
        key: &WarmKey,
        names: &BuildNames,
        reuse: bool,
    ) -> Result<WarmLease, ExecError> {
        let job = &run.job;
        let state = self.build_state(&job.build);
        let lease = |id: String| WarmLease {
            docker: self.docker.clone(),
            id: Some(id),
            key: key.clone(),
            state: state.clone(),
            build: job.build.clone(),
            detached: self.detached.clone(),
            removals: self.removals.clone(),
        };
        if reuse {
            loop {
                let preparing = {
                    let mut s = state.lock().await;
                    if let Some(at) = s.idle.iter().position(|(k, _)| k == key) {
                        let (_, id) = s.idle.swap_remove(at);
                        s.busy.insert(id.clone());
                        return Ok(lease(id));
                    }
                    s.preparing.iter().find(|(k, _)| k == key).map(|(_, ready)| ready.clone())
                };
                // The container being prepared is further along than a new one would be.
                let Some(mut ready) = preparing else { break };
                let _ = ready.changed().await;
            }
        }
        let id = self.make_warm(&job.build, key, names, &run.workspace).await?;
        state.lock().await.busy.insert(id.clone());
        Ok(lease(id))
    }

    /// Makes a warm container for `key` and starts it: the image, the build's network when the
    /// key uses it, and the container with the warm directory and, when the workspace needs it,
    /// the checkout. Returns its id; the caller owns it.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn make_warm(
        &self,
        build: &BuildId,
        key: &WarmKey,
        names: &BuildNames,
        dir: &Path,
    ) -> Result<String, ExecError> {
        image::ensure(&self.docker, &key.image, self.options.pull_timeout).await?;
        let mut s = self.lock_build(build).await;
        if key.network == spec::Network::Bridge {
            self.ensure_network(names, &mut s).await?;
        }
        let extras = vec![workspace::Extra::Dir { path: format!("{}/", warm::WARM_DIR), mode: 0o1777 }];
        let body = warm::warm_body(key, names, &self.options);
        let (container, _) = self.create_filled(&names.warm_container(), body, names, dir, extras, s, false).await?;
        self.docker
            .start_container(container.id(), None)
            .await
            .map_err(|e| exec_error("starting the warm container", e))?;
        let id = container.id().to_owned();
        container.keep();
        Ok(id)
    }

    /// Whether a step should run in a warm container: when one is there (or being prepared) for
    /// its settings, or when a step that has not started yet could use the container after it.
    /// Otherwise the step runs as the main process of a container of its own, which saves the
    /// exec (a second process start in the container's namespaces) over a warm container that
    /// nothing would use again.
    async fn warm_wanted(&self, run: &StepRun, key: &WarmKey) -> bool {
        let reusable = run.job.upcoming.iter().any(|s| self.warm_key(s).as_ref() == Some(key));
        if reusable {
            return true;
        }
        let state = self.build_state(&run.job.build);
        let s = state.lock().await;
        s.idle.iter().any(|(k, _)| k == key) || s.preparing.iter().any(|(k, _)| k == key)
    }

    /// The warm container a step would run in, if it runs in one.
    fn warm_key(&self, step: &spec::Step) -> Option<WarmKey> {
        match &step.action {
            spec::Action::Run { image, .. } if warm::eligible(step) => {
                Some(WarmKey::of(step, image, &self.options, self.host_cpus))
            }
            _ => None,
        }
    }

    /// Pipelining: while a step runs, makes ready the warm containers of the steps that depend
    /// on it alone and would not share its container (`own`), so that they start with an exec
    /// instead of a container's creation, fill and start. Each is made on a task of its own,
    /// tracked with the removals so that the build's cleanup waits for it; a step that comes
    /// while its container is being made waits for it (`take_warm`), and one that never comes
    /// (its dependency failed) leaves an idle container for the cleanup.
    fn prepare_followers(self: &Arc<Self>, run: &StepRun, own: Option<&WarmKey>) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        let job = &run.job;
        let mut keys: Vec<WarmKey> = Vec::new();
        for next in job.upcoming.iter().filter(|s| s.depends_on.len() == 1 && s.depends_on[0] == job.step.name) {
            if let Some(key) = self.warm_key(next)
                && Some(&key) != own
                && !keys.contains(&key)
            {
                keys.push(key);
            }
        }
        for key in keys {
            let this = Arc::clone(self);
            let (build, dir) = (job.build.clone(), run.workspace.clone());
            let names = BuildNames::new(&self.options.instance, &build);
            let task = tokio::spawn(
                async move {
                    let state = this.build_state(&build);
                    let (ready, _) = tokio::sync::watch::channel(());
                    {
                        let mut s = state.lock().await;
                        if s.idle.iter().any(|(k, _)| *k == key) || s.preparing.iter().any(|(k, _)| *k == key) {
                            return;
                        }
                        s.preparing.push((key.clone(), ready.subscribe()));
                    }
                    let made = this.make_warm(&build, &key, &names, &dir).await;
                    let mut s = state.lock().await;
                    s.preparing.retain(|(k, _)| *k != key);
                    match made {
                        Ok(id) => s.idle.push((key, id)),
                        Err(e) => tracing::warn!(%build, error = %e, "could not prepare a warm container ahead"),
                    }
                    // Dropping `ready` wakes the steps waiting for this container.
                    drop(ready);
                }
                .instrument(tracing::debug_span!("prepare_warm")),
            );
            track(&self.removals, &job.build, task);
        }
    }

    /// Runs a step as an exec in a warm container (see `warm`).
    #[tracing::instrument(level = "debug", skip_all)]
    async fn run_warm(
        &self,
        run: &StepRun,
        key: &WarmKey,
        commands: &[String],
        logs: Arc<dyn LogSink>,
        stop: &mut StopSignal,
    ) -> Result<Outcome, ExecError> {
        let job = &run.job;
        let names = BuildNames::new(&self.options.instance, &job.build);
        let script = containers::script(commands);
        let mut reuse = true;
        loop {
            let lease = tokio::select! {
                taken = self.take_warm(run, key, &names, reuse) => taken?,
                reason = stop.stopped() => return Ok(stopped(reason)),
            };
            match self.supervise_exec(run, lease.id(), &script, logs.clone(), stop).await {
                Ok(Some((outcome, reusable))) => {
                    if self.detached.load(Ordering::SeqCst) {
                        // Left running for nobody: the next engine reports the step gone.
                        let mut lease = lease;
                        lease.id = None;
                    } else if reusable {
                        lease.give_back().await;
                    } else {
                        lease.discard().await;
                    }
                    return Ok(outcome);
                }
                // The idle container had gone (removed, or its keeper died): a fresh one, once.
                Ok(None) if reuse => {
                    lease.discard().await;
                    reuse = false;
                }
                Ok(None) => {
                    lease.discard().await;
                    return Err(ExecError::Transient("the new warm container stopped before the step ran".to_owned()));
                }
                Err(e) => {
                    lease.discard().await;
                    return Err(e);
                }
            }
        }
    }

    /// Runs the step's exec and watches it. `None` when the container could not take an exec
    /// (it is not running); otherwise the outcome and whether the container may serve the
    /// next step.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn supervise_exec(
        &self,
        run: &StepRun,
        id: &str,
        script: &str,
        logs: Arc<dyn LogSink>,
        stop: &mut StopSignal,
    ) -> Result<Option<(Outcome, bool)>, ExecError> {
        let step = &run.job.step;
        let upload = |path: &str, archive: Vec<u8>| {
            self.docker.upload_to_container(
                id,
                Some(UploadToContainerOptions { path: path.to_owned(), ..Default::default() }),
                bollard::body_full(archive.into()),
            )
        };
        if script.len() > warm::INLINE_SCRIPT_MAX {
            let archive = containers::script_archive(script)
                .map_err(|e| ExecError::Transient(format!("packing the script: {e}")))?;
            match upload("/", archive).await {
                Ok(()) => {}
                Err(e) if matches!(status(&e), Some(404 | 409)) => return Ok(None),
                Err(e) => return Err(exec_error("copying the script into the container", e)),
            }
        }
        if !run.job.resources.is_empty() {
            let archive = containers::resources_archive(&run.job.resources)
                .map_err(|e| ExecError::Transient(format!("packing the resources file: {e}")))?;
            upload(containers::WORKSPACE, archive)
                .await
                .map_err(|e| exec_error("copying the resources file into the workspace", e))?;
        }
        let config = ExecConfig {
            cmd: Some(vec!["sh".to_owned(), "-c".to_owned(), warm::WRAPPER.to_owned(), "cib-step".to_owned()]),
            env: Some(warm::exec_env(&run.job, &run.secrets, script, &containers::workdir(step)?)),
            working_dir: Some(containers::WORKSPACE.to_owned()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            attach_stdin: Some(false),
            tty: Some(false),
            ..Default::default()
        };
        let exec = match self.docker.create_exec(id, config).instrument(tracing::debug_span!("create_exec")).await {
            Ok(exec) => exec,
            Err(e) if matches!(status(&e), Some(404 | 409)) => return Ok(None),
            Err(e) => return Err(exec_error("creating the step's exec", e)),
        };
        let output = match self.docker.start_exec(&exec.id, None).instrument(tracing::debug_span!("start_exec")).await {
            Ok(StartExecResults::Attached { output, .. }) => output,
            Ok(StartExecResults::Detached) => {
                return Err(ExecError::Transient("the step's exec started detached".to_owned()));
            }
            Err(e) if matches!(status(&e), Some(404 | 409)) => return Ok(None),
            Err(e) => return Err(exec_error("starting the step's exec", e)),
        };
        let started = Instant::now();
        let last_output = Arc::new(Mutex::new(started));
        let mut reader = tokio::spawn(forward_output(
            output,
            run.secrets.values().chain(&run.mask).cloned().collect(),
            logs,
            last_output.clone(),
            None,
        ));
        let total = step.timeout.map(|t| started + t.as_std());
        let silence = step.no_output_timeout.map(|t| t.as_std());
        // The output ends when the wrapper has exited, and with it every process of the step
        // (the wrapper kills what is left, which also closes any pipe a leftover held).
        let ending = loop {
            let quiet_until = silence.map(|d| *lock(&last_output) + d);
            tokio::select! {
                _ = &mut reader => break Ending::Exited,
                reason = stop.stopped() => break Ending::Stopped(reason),
                () = until(total) => break Ending::Stopped(StopReason::TimedOut),
                () = until(quiet_until) => {
                    if let Some(d) = silence && lock(&last_output).elapsed() >= d {
                        break Ending::Stopped(StopReason::NoOutput);
                    }
                }
            }
        };
        tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "the step's exec ended");
        if let Ending::Stopped(reason) = ending {
            // SIGTERM to the step's processes, sparing the keeper and the wrapper; after the
            // grace period the container goes, and everything in it with SIGKILL.
            if let Err(e) = self.exec(id, warm::TERM_SWEEP).await {
                tracing::warn!(step = %step.name, error = %e, "could not signal the step");
            }
            if tokio::time::timeout(self.options.stop_grace, &mut reader).await.is_err() {
                remove_container(&self.docker, id).await?;
                if tokio::time::timeout(self.options.log_drain_timeout, &mut reader).await.is_err() {
                    reader.abort();
                }
            }
            return Ok(Some((stopped(reason), false)));
        }
        let code = self.exec_exit_code(&exec.id).await?;
        if code == Some(0) {
            // Nothing to ask: should the container have died since, the next step's exec is
            // refused and that step gets a new one.
            return Ok(Some((Outcome::Exited(0), true)));
        }
        // A failure: was it memory, and is the container still fit for the next step?
        let (running, mut oom_killed) = self.container_health(id).await?;
        if code.is_some_and(|c| c != 0) && running && !oom_killed {
            let marker = bollard::query_parameters::ContainerArchiveInfoOptions { path: "/.cib/oom-killed".to_owned() };
            oom_killed = self.docker.get_container_archive_info(id, Some(marker)).await.is_ok();
        }
        let outcome = match code {
            Some(code) if oom_killed && code != 0 => Outcome::OutOfMemory,
            None if oom_killed => Outcome::OutOfMemory,
            Some(code) => Outcome::Exited(i32::try_from(code).unwrap_or(-1)),
            None => {
                return Err(ExecError::Transient(format!(
                    "step {}: its warm container stopped while the step ran",
                    step.name
                )));
            }
        };
        Ok(Some((outcome, running && !oom_killed)))
    }

    /// The exit code of a finished exec. The daemon may need a moment after the output ended to
    /// record it; `None` when it never does (the container went away).
    #[tracing::instrument(level = "debug", skip_all)]
    async fn exec_exit_code(&self, exec: &str) -> Result<Option<i64>, ExecError> {
        let patience = Instant::now() + Duration::from_secs(2);
        loop {
            let inspected =
                self.docker.inspect_exec(exec).await.map_err(|e| exec_error("reading the step's exit code", e))?;
            if inspected.running != Some(true) && inspected.exit_code.is_some() {
                return Ok(inspected.exit_code);
            }
            if Instant::now() >= patience {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether a warm container still runs, and whether Docker flagged it out of memory (which
    /// it does only when the container itself ended: a kill inside an exec shows in the
    /// wrapper's marker instead).
    #[tracing::instrument(level = "debug", skip_all)]
    async fn container_health(&self, id: &str) -> Result<(bool, bool), ExecError> {
        let state = match self.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(inspected) => inspected.state.unwrap_or_default(),
            Err(e) if is_not_found(&e) => return Ok((false, false)),
            Err(e) => return Err(exec_error("inspecting the warm container", e)),
        };
        Ok((state.running == Some(true), state.oom_killed == Some(true)))
    }

    /// Removes the warm containers of a build that this process does not know: a previous
    /// process left them, maybe with a step still running in them that nobody can follow.
    async fn remove_foreign_warm(&self, build: &BuildId) -> Result<(), ExecError> {
        let filters = label_filter(&[
            (LABEL_ENGINE, self.options.instance.as_str()),
            (LABEL_BUILD, build.0.as_str()),
            (LABEL_ROLE, Role::Warm.as_str()),
        ]);
        let found = self
            .docker
            .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
            .await
            .map_err(|e| exec_error("listing warm containers", e))?;
        let state = self.build_state(build);
        let known: BTreeSet<String> = {
            let s = state.lock().await;
            s.busy.iter().cloned().chain(s.idle.iter().map(|(_, id)| id.clone())).collect()
        };
        for id in found.into_iter().filter_map(|c| c.id).filter(|id| !known.contains(id)) {
            remove_container(&self.docker, &id).await?;
        }
        Ok(())
    }

    /// Creates, starts and checks one service.
    async fn start_service(
        &self,
        names: &BuildNames,
        build: &BuildId,
        service: &spec::Service,
    ) -> Result<(), ExecError> {
        image::ensure(&self.docker, &service.image, self.options.pull_timeout).await?;
        // Starting the services again (an engine that replays its journal) replaces them.
        let filters = label_filter(&[
            (LABEL_ENGINE, self.options.instance.as_str()),
            (LABEL_BUILD, build.0.as_str()),
            (LABEL_SERVICE, service.name.as_str()),
        ]);
        let old = self
            .docker
            .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
            .await
            .map_err(|e| exec_error("listing services", e))?;
        for c in old.iter().filter_map(|c| c.id.as_deref()) {
            remove_container(&self.docker, c).await?;
        }
        let body = containers::service_body(service, names, &self.options, self.host_cpus);
        let mut container = self.create(&names.service_container(&service.name), body).await?;
        let id = container.id().to_owned();
        self.docker
            .start_container(&id, None)
            .await
            .map_err(|e| exec_error(&format!("starting service {}", service.name), e))?;
        // From here the container belongs to the build: cleanup removes it.
        container.id = None;
        self.wait_ready(&id, service).await
    }

    /// Runs the readiness command in the service's container until it succeeds or time is up.
    async fn wait_ready(&self, id: &str, service: &spec::Service) -> Result<(), ExecError> {
        let Some(ready) = &service.ready else {
            return self.still_running(id, service).await;
        };
        let deadline = Instant::now() + ready.timeout.as_std();
        let interval = ready.interval.as_std().max(Duration::from_millis(100));
        let mut last = String::from("did not run");
        loop {
            self.still_running(id, service).await?;
            match tokio::time::timeout_at(deadline, self.exec(id, &ready.command)).await {
                Ok(Ok((0, _))) => return Ok(()),
                Ok(Ok((code, output))) => last = format!("exited with {code}: {}", output.trim()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => break,
            }
            if Instant::now() + interval >= deadline {
                break;
            }
            tokio::time::sleep(interval).await;
        }
        Err(ExecError::Permanent(format!(
            "service {} was not ready within {} s: its check `{}` {last}{}",
            service.name,
            ready.timeout.as_secs(),
            ready.command,
            self.tail(id).await
        )))
    }

    async fn still_running(&self, id: &str, service: &spec::Service) -> Result<(), ExecError> {
        let inspected = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| exec_error(&format!("inspecting service {}", service.name), e))?;
        let state = inspected.state.unwrap_or_default();
        if state.running == Some(true) {
            return Ok(());
        }
        Err(ExecError::Permanent(format!(
            "service {} exited with code {} before it was ready{}",
            service.name,
            state.exit_code.unwrap_or(-1),
            self.tail(id).await
        )))
    }

    /// The last lines a service printed, to explain why it failed.
    async fn tail(&self, id: &str) -> String {
        let options = LogsOptions { stdout: true, stderr: true, tail: "20".to_owned(), ..Default::default() };
        match self.docker.logs(id, Some(options)).try_collect::<Vec<_>>().await {
            Ok(lines) if !lines.is_empty() => {
                let text: String = lines.iter().map(ToString::to_string).collect();
                format!("; its last output:\n{}", text.trim_end())
            }
            _ => String::new(),
        }
    }

    /// Runs `sh -c command` in a running container and returns its exit code and output.
    async fn exec(&self, id: &str, command: &str) -> Result<(i64, String), ExecError> {
        let config = ExecConfig {
            cmd: Some(vec!["sh".to_owned(), "-c".to_owned(), command.to_owned()]),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let exec =
            self.docker.create_exec(id, config).await.map_err(|e| exec_error("creating a readiness check", e))?;
        let mut output = String::new();
        if let StartExecResults::Attached { output: mut stream, .. } =
            self.docker.start_exec(&exec.id, None).await.map_err(|e| exec_error("running a readiness check", e))?
        {
            while let Some(Ok(chunk)) = stream.next().await {
                // Enough to explain a failure; a chatty check must not fill memory.
                if output.len() < 2048 {
                    output.push_str(&String::from_utf8_lossy(chunk.as_ref()));
                }
            }
        }
        let inspected = self
            .docker
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| exec_error("reading a readiness check's result", e))?;
        Ok((inspected.exit_code.unwrap_or(-1), output))
    }
}

/// Passes output on past its first `skip` bytes: those the store already holds, when an engine
/// re-attaches to a step and reads its output from the start again.
struct Skip {
    inner: Arc<dyn LogSink>,
    skip: Mutex<u64>,
}

impl LogSink for Skip {
    fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut skip = lock(&self.skip);
        let dropped = usize::try_from(*skip).unwrap_or(usize::MAX).min(bytes.len());
        *skip -= dropped as u64;
        drop(skip);
        if dropped < bytes.len() {
            self.inner.write(stream, &bytes[dropped..]);
        }
    }
}

/// Streams a workspace archive into a container's stdin, then closes it: with `StdinOnce`, the
/// daemon then closes the container's stdin, and `tar` sees the end of its input. It is closed
/// after a failure too, so that `tar` fails on the truncated archive instead of waiting.
async fn feed_stdin(
    mut input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    archive: impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut archive = std::pin::pin!(archive);
    let mut result = Ok(());
    while let Some(chunk) = archive.next().await {
        match chunk {
            Ok(chunk) => {
                if let Err(e) = input.write_all(&chunk).await {
                    result = Err(e);
                    break;
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = input.shutdown().await;
    result
}

/// Copies a step's output into the sink, masked, and notes when output last arrived. With
/// `said`, the output of a container filled through its stdin begins with one of the tokens of
/// `containers::STDIN_WRAPPER`: it is taken out before anything reaches the sink, and sent to
/// `said` (dropped unsent when the output does not begin with one).
async fn forward_output(
    mut output: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<LogOutput, DockerError>> + Send>>,
    secrets: Vec<String>,
    sink: Arc<dyn LogSink>,
    last_output: Arc<Mutex<Instant>>,
    mut said: Option<tokio::sync::oneshot::Sender<Said>>,
) {
    // One masker per stream: a secret split between stdout and stderr is not one secret.
    let mut out = Masker::new(&secrets);
    let mut err = Masker::new(&secrets);
    // The first bytes of stdout, held back while they could still be a token.
    let mut head: Option<Vec<u8>> = said.is_some().then(Vec::new);
    while let Some(item) = output.next().await {
        let (stream, masker, message) = match item {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => (Stream::Stdout, &mut out, message),
            Ok(LogOutput::StdErr { message }) => (Stream::Stderr, &mut err, message),
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading the step's output failed");
                break;
            }
        };
        *lock(&last_output) = Instant::now();
        let message = match (stream, head.as_mut()) {
            (Stream::Stdout, Some(buf)) => {
                buf.extend_from_slice(&message);
                let Some(token) = opening(buf) else { continue };
                let mut buf = head.take().unwrap_or_default();
                match token {
                    Some((what, len)) => {
                        if let Some(tx) = said.take() {
                            let _ = tx.send(what);
                        }
                        bytes::Bytes::from(buf.split_off(len))
                    }
                    None => {
                        said = None;
                        bytes::Bytes::from(buf)
                    }
                }
            }
            _ => message,
        };
        let masked = masker.push(&message);
        if !masked.is_empty() {
            sink.write(stream, &masked);
        }
    }
    if let Some(buf) = head {
        // The output ended inside what could have been a token: it was output after all.
        let masked = out.push(&buf);
        if !masked.is_empty() {
            sink.write(Stream::Stdout, &masked);
        }
    }
    for (stream, masker) in [(Stream::Stdout, &mut out), (Stream::Stderr, &mut err)] {
        let rest = masker.finish();
        if !rest.is_empty() {
            sink.write(stream, &rest);
        }
    }
}

/// The executor's work; `DockerExecutor` hands the port's calls here.
impl Inner {
    async fn healthcheck(&self) -> Result<(), ExecError> {
        self.docker.ping().await.map(|_| ()).map_err(|e| exec_error("ping", e))
    }

    async fn run(
        self: &Arc<Self>,
        run: &StepRun,
        logs: Arc<dyn LogSink>,
        mut stop: StopSignal,
    ) -> Result<Outcome, ExecError> {
        let job = &run.job;
        let (image, commands) = match &job.step.action {
            spec::Action::Run { image, commands } => (image, commands),
            spec::Action::Gate(_) => {
                return Err(ExecError::Permanent(format!("step {} is a gate: there is nothing to run", job.step.name)));
            }
        };
        if let Some(reason) = stop.reason() {
            return Ok(stopped(reason));
        }
        if warm::eligible(&job.step) {
            let key = WarmKey::of(&job.step, image, &self.options, self.host_cpus);
            self.prepare_followers(run, Some(&key));
            if self.warm_wanted(run, &key).await {
                return self.run_warm(run, &key, commands, logs, &mut stop).await;
            }
        } else {
            self.prepare_followers(run, None);
        }
        self.run_own(run, image, commands, logs, &mut stop).await
    }

    /// Runs a step as the main process of a container of its own: `sh -e` on its script, with
    /// its variables and secrets in the container's environment. The container is removed in
    /// the background once the outcome is known, so that the outcome is reported first.
    ///
    /// The script, and the checkout when the workspace needs it, reach the container through
    /// its stdin when its image runs as root (see `containers::STDIN_WRAPPER`): that saves the
    /// daemon the archive upload, which mounts the container's file system and runs a helper
    /// process of its own under the container's lock, on every build. An image that runs as
    /// another user gets the upload (its user could not write `/.cib`, nor the workspace the
    /// daemon made for root), and so does one without `tar`, from the second time on.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn run_own(
        &self,
        run: &StepRun,
        image: &str,
        commands: &[String],
        logs: Arc<dyn LogSink>,
        stop: &mut StopSignal,
    ) -> Result<Outcome, ExecError> {
        let job = &run.job;
        let names = BuildNames::new(&self.options.instance, &job.build);
        loop {
            let prepare = async {
                let facts = image::ensure(&self.docker, image, self.options.pull_timeout).await?;
                let stdin = facts.runs_as_root() && !lock(&self.no_tar).contains(image);
                let mut state = self.lock_build(&job.build).await;
                if job.step.network == spec::Network::Bridge {
                    self.ensure_network(&names, &mut state).await?;
                }
                let body = StepContainer {
                    job,
                    image,
                    secrets: &run.secrets,
                    names: &names,
                    options: &self.options,
                    host_cpus: self.host_cpus,
                    stdin_fill: stdin,
                }
                .body()?;
                let mut extras = vec![
                    workspace::Extra::Dir { path: format!("{}/", containers::SCRIPT_DIR), mode: 0o755 },
                    // Readable by whatever user the image runs as; `sh` reads it, nobody executes it.
                    workspace::Extra::File {
                        path: containers::SCRIPT_PATH.trim_start_matches('/').to_owned(),
                        mode: 0o644,
                        data: containers::script(commands).into_bytes(),
                    },
                ];
                if !job.resources.is_empty() {
                    // In the same archive, rather than an upload of its own.
                    let json = serde_json::to_vec_pretty(&job.resources)
                        .map_err(|e| ExecError::Transient(format!("packing the resources file: {e}")))?;
                    let path = containers::RESOURCES_FILE.trim_start_matches('/');
                    if let Some((parent, _)) = path.rsplit_once('/') {
                        extras.push(workspace::Extra::Dir { path: format!("{parent}/"), mode: 0o755 });
                    }
                    extras.push(workspace::Extra::File { path: path.to_owned(), mode: 0o644, data: json });
                }
                let name = names.step_container(&job.step.name, job.attempt);
                self.create_filled(&name, body, &names, &run.workspace, extras, state, stdin).await
            };
            // A stop during the preparation ends it; whatever it had created is removed by its
            // guard or by the build's cleanup.
            let (container, feed) = tokio::select! {
                created = prepare => created?,
                reason = stop.stopped() => return Ok(stopped(reason)),
            };
            let filling = feed.as_ref().is_some_and(|f| f.ticket.is_some());
            let supervised = self.supervise(run, &container, feed, logs.clone(), stop).await;
            if self.detached.load(Ordering::SeqCst) {
                // The engine is going away and will not hear this outcome: the container stays,
                // so that the next engine reads the exit from it.
                container.keep();
                return supervised.and_then(|s| match s {
                    Supervised::Ran(outcome) => Ok(outcome),
                    Supervised::NoTar | Supervised::FillFailed(_) => {
                        Err(ExecError::Transient("the engine went away before the step ran".to_owned()))
                    }
                });
            }
            match supervised {
                Ok(Supervised::Ran(outcome)) => {
                    self.remove_later(&job.build, container);
                    return Ok(outcome);
                }
                Ok(Supervised::NoTar) => {
                    tracing::info!(%image, "the image has no tar: its steps' containers are filled by an upload");
                    lock(&self.no_tar).insert(image.to_owned());
                    self.remove_later(&job.build, container);
                }
                Ok(Supervised::FillFailed(e)) => {
                    // Removed now, with the volume it was filling, so that a failed fill leaves
                    // nothing (the volume stays when another container holds it; then it has
                    // no marker, and the next container fills it again).
                    let _ = container.remove().await;
                    if filling {
                        let _ = self.discard_workspace(&names).await;
                    }
                    return Err(e);
                }
                Err(e) => {
                    self.remove_later(&job.build, container);
                    return Err(e);
                }
            }
        }
    }

    /// Removes a container on a task of its own, which the build's cleanup waits for; should it
    /// fail, the cleanup or reconcile finds the container by its labels.
    fn remove_later(&self, build: &BuildId, mut container: ContainerGuard) {
        let Some(id) = container.id.take() else { return };
        let docker = self.docker.clone();
        let task = tokio::spawn(
            async move {
                if let Err(e) = remove_container(&docker, &id).await {
                    tracing::warn!(container = %id, error = %e, "could not remove a step's container");
                }
            }
            .instrument(tracing::debug_span!("remove_later")),
        );
        track(&self.removals, build, task);
    }

    async fn start_services(&self, build: &BuildId, services: &[spec::Service]) -> Result<(), (String, ExecError)> {
        let Some(first) = services.first() else { return Ok(()) };
        let names = BuildNames::new(&self.options.instance, build);
        {
            let state = self.build_state(build);
            let mut state = state.lock().await;
            self.ensure_network(&names, &mut state).await.map_err(|e| (first.name.clone(), e))?;
        }
        // Services start together, and each is checked on its own, so a slow database does not
        // delay the cache next to it.
        let results = futures_util::future::join_all(
            services
                .iter()
                .map(|s| async { self.start_service(&names, build, s).await.map_err(|e| (s.name.clone(), e)) }),
        )
        .await;
        results.into_iter().collect::<Result<Vec<()>, _>>().map(|_| ())
    }

    /// Reads the workspace volume as a tar archive, through a container made for it (created
    /// with the volume mounted, never started, removed after) of the image that created the
    /// volume, and unpacks it over `dest`. The archive goes to a temporary file first, so a
    /// large workspace is never held in memory.
    async fn export_workspace(&self, build: &BuildId, dest: &Path) -> Result<(), ExecError> {
        let names = BuildNames::new(&self.options.instance, build);
        let volume = self
            .docker
            .inspect_volume(&names.volume())
            .await
            .map_err(|e| exec_error("looking for the workspace volume", e))?;
        let image = volume.labels.get(crate::naming::LABEL_IMAGE).cloned().ok_or_else(|| {
            ExecError::Permanent(format!("the workspace volume {} names no image to read it through", volume.name))
        })?;
        let reader =
            self.create(&names.populate_container(), containers::populate_body(&image, &names, &self.options)).await?;
        let read = self.download_workspace(reader.id(), dest).await;
        if let Err(e) = reader.remove().await {
            tracing::warn!(%build, error = %e, "could not remove the workspace's reader");
        }
        read
    }

    async fn download_workspace(&self, reader: &str, dest: &Path) -> Result<(), ExecError> {
        let options =
            bollard::query_parameters::DownloadFromContainerOptions { path: format!("{}/.", containers::WORKSPACE) };
        let mut stream = self.docker.download_from_container(reader, Some(options));
        let file = tempfile::NamedTempFile::new_in(dest.parent().unwrap_or(dest))
            .map_err(|e| ExecError::Transient(format!("a temporary file for the workspace: {e}")))?;
        let mut out = tokio::fs::File::from_std(
            file.reopen().map_err(|e| ExecError::Transient(format!("a temporary file for the workspace: {e}")))?,
        );
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| exec_error("reading the workspace volume", e))?;
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                .await
                .map_err(|e| ExecError::Transient(format!("writing the workspace archive: {e}")))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut out)
            .await
            .map_err(|e| ExecError::Transient(format!("writing the workspace archive: {e}")))?;
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || workspace::unpack(file.path(), &dest))
            .await
            .map_err(|e| ExecError::Transient(format!("unpacking the workspace: {e}")))?
            .map_err(|e| ExecError::Transient(format!("unpacking the workspace: {e}")))
    }

    /// Removes one cache's marker and the volume it holds; `false` when it was gone already.
    async fn remove_cache(&self, c: bollard::models::ContainerSummary) -> Result<bool, ExecError> {
        let volumes: Vec<String> = c.mounts.unwrap_or_default().into_iter().filter_map(|m| m.name).collect();
        let force = RemoveContainerOptions { force: true, ..Default::default() };
        match self.docker.remove_container(c.id.as_deref().unwrap_or_default(), Some(force)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(exec_error("removing a cache", e)),
        }
        for volume in volumes {
            match self.docker.remove_volume(&volume, None::<RemoveVolumeOptions>).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(exec_error("removing a cache's volume", e)),
            }
        }
        Ok(true)
    }

    /// Holds `repo`'s caches to the budget (`DockerOptions::cache_budget`): the least recently
    /// used go first, as `cib_core::policy::caches_to_evict` decides. Answers the keys removed.
    pub(crate) async fn evict_caches(&self, repo: &str) -> Result<Vec<String>, ExecError> {
        let Some(budget) = self.options.cache_budget else { return Ok(Vec::new()) };
        let markers = cache::markers(&self.docker, repo).await?;
        let mut uses = Vec::with_capacity(markers.len());
        for (c, namespace, key) in &markers {
            let name = cache::marker_name(repo, namespace, key);
            let created_ms = u64::try_from(c.created.unwrap_or(0)).unwrap_or(0) * 1000;
            let last_used = cache::last_used(&self.docker, &name).await.unwrap_or(created_ms).max(created_ms);
            let bytes = c
                .labels
                .as_ref()
                .and_then(|l| l.get(cache::LABEL_CACHE_SIZE))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            uses.push(cib_core::policy::CacheUse {
                namespace: namespace.clone(),
                key: key.clone(),
                bytes,
                last_used: cib_core::time::Timestamp(last_used),
            });
        }
        let mut removed = Vec::new();
        let mut markers: Vec<Option<_>> = markers.into_iter().map(Some).collect();
        for i in cib_core::policy::caches_to_evict(&uses, budget) {
            if let Some((c, namespace, key)) = markers[i].take()
                && self.remove_cache(c).await?
            {
                tracing::info!(%repo, %namespace, %key, bytes = uses[i].bytes, budget, "cache evicted (least recently used)");
                removed.push(key);
            }
        }
        Ok(removed)
    }

    /// Puts an archive (a tar, gzip-compressed or not: the daemon unpacks both) into the
    /// build's workspace volume, through a short-lived container of the image the volume was
    /// made with, as `export_workspace` reads it. `false` when the build has no volume yet: the
    /// first step's container fills it from the host workspace, so the caller puts the files
    /// there instead. The build's lock is held across the check and the upload, so that a fill
    /// running meanwhile has finished before the archive goes in over it.
    async fn upload_into_workspace(
        &self,
        build: &BuildId,
        archive: bytes::Bytes,
        what: &str,
    ) -> Result<bool, ExecError> {
        let names = BuildNames::new(&self.options.instance, build);
        let _state = self.lock_build(build).await;
        let volume = match self.docker.inspect_volume(&names.volume()).await {
            Ok(volume) => volume,
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(exec_error("looking for the workspace volume", e)),
        };
        let image = volume.labels.get(crate::naming::LABEL_IMAGE).cloned().ok_or_else(|| {
            ExecError::Permanent(format!("the workspace volume {} names no image to write it through", volume.name))
        })?;
        let writer =
            self.create(&names.populate_container(), containers::populate_body(&image, &names, &self.options)).await?;
        let options = UploadToContainerOptions {
            path: containers::WORKSPACE.to_owned(),
            copy_uidgid: Some("1".to_owned()),
            ..Default::default()
        };
        let uploaded = self
            .docker
            .upload_to_container(writer.id(), Some(options), bollard::body_full(archive))
            .await
            .map_err(|e| exec_error(what, e));
        if let Err(e) = writer.remove().await {
            tracing::warn!(%build, error = %e, "could not remove the workspace's writer");
        }
        uploaded.map(|()| true)
    }

    /// Uploads an artifact's archive (gzip-compressed tar) into the workspace volume. A build
    /// with no volume yet needs nothing: the engine unpacked the archive into the host
    /// workspace already, which the first step's container copies.
    async fn import_archive(&self, run: &StepRun, archive: &Path) -> Result<(), ExecError> {
        let bytes = tokio::fs::read(archive)
            .await
            .map_err(|e| ExecError::Transient(format!("cannot read the artifact {}: {e}", archive.display())))?;
        self.upload_into_workspace(&run.job.build, bytes.into(), "copying the artifact into the workspace").await?;
        Ok(())
    }

    /// Copies a cache (see `cache.rs`) into the workspace: into the volume when the build has
    /// one, else into the host workspace, which the first step's container copies.
    async fn restore_cache(&self, run: &StepRun, job: &CacheJob) -> Result<Option<String>, ExecError> {
        let Some((marker, key)) = cache::find(&self.docker, job).await? else { return Ok(None) };
        let options =
            bollard::query_parameters::DownloadFromContainerOptions { path: format!("{}/.", cache::CACHE_DIR) };
        let archive: Vec<bytes::Bytes> = self
            .docker
            .download_from_container(&marker, Some(options))
            .try_collect()
            .await
            .map_err(|e| exec_error("reading the cache", e))?;
        let archive = bytes::Bytes::from(archive.concat());
        // Eviction removes the least recently used caches first, so a restore counts as a use.
        if let Err(e) = cache::touch(&self.docker, &marker, now_ms()).await {
            tracing::warn!(%marker, error = %e, "the cache's use could not be noted");
        }
        if self.upload_into_workspace(&run.job.build, archive.clone(), "copying the cache into the workspace").await? {
            return Ok(Some(key));
        }
        let dest = run.workspace.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file = tempfile::NamedTempFile::new()?;
            std::io::Write::write_all(&mut file, &archive)?;
            workspace::unpack(file.path(), &dest)
        })
        .await
        .map_err(|e| ExecError::Transient(format!("unpacking the cache: {e}")))?
        .map_err(|e| ExecError::Transient(format!("unpacking the cache into the workspace: {e}")))?;
        Ok(Some(key))
    }

    /// Saves the cache's paths into a fresh volume through a container of a unique name, then
    /// renames that container to the cache's marker: the rename is the commit, and the daemon
    /// lets one container only have the name, so a concurrent save of the same key loses and
    /// removes what it made.
    async fn save_cache(&self, run: &StepRun, job: &CacheJob) -> Result<bool, ExecError> {
        let marker = cache::marker_name(&job.repo, &job.write, &job.key);
        if cache::exists(&self.docker, &marker).await? {
            return Ok(false);
        }
        // What the step left, on the host, to pack the cache's paths from.
        self.export_workspace(&run.job.build, &run.workspace).await?;
        let (root, paths) = (run.workspace.clone(), job.paths.clone());
        let archive = tokio::task::spawn_blocking(move || workspace::pack_paths(&root, &paths))
            .await
            .map_err(|e| ExecError::Transient(format!("packing the cache: {e}")))?
            .map_err(|e| ExecError::Transient(format!("packing the cache: {e}")))?;
        let Some(archive) = archive else {
            return Err(ExecError::Permanent(format!("none of the cache's paths exists: {}", job.paths.join(", "))));
        };
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = format!("{}-{}", self.options.instance, SAVES.fetch_add(1, Ordering::Relaxed));
        let (volume, holder) = (format!("{marker}-v-{unique}"), format!("{marker}-tmp-{unique}"));
        let labels = cache::labels(&job.repo, &job.write, &job.key);
        let size = archive.len() as u64;
        let create = bollard::models::VolumeCreateRequest {
            name: Some(volume.clone()),
            labels: Some(labels.clone()),
            ..Default::default()
        };
        self.docker.create_volume(create).await.map_err(|e| exec_error("creating a cache volume", e))?;
        let image = step_image(run)?;
        let discard = |holder: Option<String>| {
            let (docker, volume) = (self.docker.clone(), volume.clone());
            async move {
                if let Some(holder) = holder {
                    let force = RemoveContainerOptions { force: true, ..Default::default() };
                    let _ = docker.remove_container(&holder, Some(force)).await;
                }
                let _ = docker.remove_volume(&volume, None::<RemoveVolumeOptions>).await;
            }
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions { name: Some(holder.clone()), ..Default::default() }),
                cache::holder_body(image, &volume, {
                    let mut labels = labels;
                    labels.insert(cache::LABEL_CACHE_SIZE.to_owned(), size.to_string());
                    labels
                }),
            )
            .await;
        if let Err(e) = created {
            discard(None).await;
            return Err(exec_error("creating a cache's container", e));
        }
        let upload = UploadToContainerOptions { path: cache::CACHE_DIR.to_owned(), ..Default::default() };
        if let Err(e) = self.docker.upload_to_container(&holder, Some(upload), bollard::body_full(archive.into())).await
        {
            discard(Some(holder)).await;
            return Err(exec_error("filling a cache", e));
        }
        // A cache just saved counts as just used.
        if let Err(e) = cache::touch(&self.docker, &holder, now_ms()).await {
            discard(Some(holder)).await;
            return Err(e);
        }
        match self
            .docker
            .rename_container(&holder, bollard::query_parameters::RenameContainerOptions { name: marker.clone() })
            .await
        {
            Ok(()) => {
                // A failed eviction leaves the repository over its budget until the next save;
                // the cache just saved is whole either way.
                if let Err(e) = self.evict_caches(&job.repo).await {
                    tracing::warn!(repo = %job.repo, error = %e, "caches over the budget could not be evicted");
                }
                Ok(true)
            }
            // Another save of the key committed first: its cache stands, whole, and this one goes.
            Err(e) if status(&e) == Some(409) => {
                discard(Some(holder)).await;
                Ok(false)
            }
            Err(e) => {
                discard(Some(holder)).await;
                Err(exec_error("committing a cache", e))
            }
        }
    }

    async fn list_caches(&self, repo: &str) -> Result<Vec<CacheInfo>, ExecError> {
        let mut found: Vec<CacheInfo> = cache::markers(&self.docker, repo)
            .await?
            .into_iter()
            .map(|(c, namespace, key)| CacheInfo {
                key,
                namespace,
                created_at: cib_core::time::Timestamp::from_secs(u64::try_from(c.created.unwrap_or(0)).unwrap_or(0)),
            })
            .collect();
        found.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.key.cmp(&b.key)));
        Ok(found)
    }

    /// Removes each marker of the key and the volume it holds.
    async fn remove_caches(&self, repo: &str, key: &str) -> Result<usize, ExecError> {
        let mut removed = 0;
        for (c, _, k) in cache::markers(&self.docker, repo).await? {
            if k == key && self.remove_cache(c).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError> {
        let pending = lock(&self.removals).remove(build).unwrap_or_default();
        for task in pending {
            let _ = task.await;
        }
        let state = lock(&self.builds).remove(build);
        let known = match state {
            Some(state) => {
                let state = state.lock().await;
                state.born_here.then_some(state.network)
            }
            None => None,
        };
        let found = match known {
            // Three listings are the dearest part of a cleanup in the daemon (issue 16), and
            // only the containers are unknown here (services, warm containers, a step's own
            // container still being removed): the build's one volume and its network have
            // names of their own, and a volume already gone counts as removed.
            Some(network) => {
                let names = BuildNames::new(&self.options.instance, build);
                let mut found = self.containers_of(build).await?;
                found.push(Resource { kind: ResourceKind::Volume, id: names.volume(), build: Some(build.0.clone()) });
                if network {
                    found.push(Resource {
                        kind: ResourceKind::Network,
                        id: names.network(),
                        build: Some(build.0.clone()),
                    });
                }
                found
            }
            None => self.resources(Some(build)).await?,
        };
        self.remove_all(&found).await.map(|_| ())
    }

    async fn attach(
        &self,
        run: &StepRun,
        offset: u64,
        logs: Arc<dyn LogSink>,
        mut stop: StopSignal,
    ) -> Result<Attached, ExecError> {
        use bollard::models::ContainerSummaryStateEnum as State;
        let Some((id, state, fed)) = self.step_container(run).await? else {
            // A warm step (an exec) cannot be followed: Docker keeps no copy of its output. It
            // is reported gone, after its container goes, so that a re-run never overlaps it.
            self.remove_foreign_warm(&run.job.build).await?;
            return Ok(Attached::Gone);
        };
        let container =
            ContainerGuard { docker: self.docker.clone(), id: Some(id.clone()), detached: self.detached.clone() };
        if matches!(state, State::CREATED | State::EMPTY) {
            // Created but never started: the step did not run, and it never will from here.
            container.remove().await?;
            return Ok(Attached::Gone);
        }
        let was_running = matches!(state, State::RUNNING | State::PAUSED | State::RESTARTING);
        // The daemon's copy of the output, from the start, masked again the same way, so that
        // the bytes the store holds are exactly the first `offset` of it.
        let options = LogsOptions { follow: true, stdout: true, stderr: true, ..Default::default() };
        let output = Box::pin(self.docker.logs(&id, Some(options)));
        let sink: Arc<dyn LogSink> = Arc::new(Skip { inner: logs, skip: Mutex::new(offset) });
        // A container filled through its stdin begins its output with a token, which the first
        // reader took out too.
        let (said_tx, said_rx) = if fed {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let reader = tokio::spawn(forward_output(
            output,
            run.secrets.values().chain(&run.mask).cloned().collect(),
            sink,
            Arc::new(Mutex::new(Instant::now())),
            said_tx,
        ));
        // The step's timeouts are the machine's timers here, armed again by the replay: they
        // arrive as a stop.
        let wait_options = WaitContainerOptions { condition: "not-running".to_owned() };
        let mut wait = Box::pin(self.docker.wait_container(&id, Some(wait_options)));
        let ending = tokio::select! {
            exit = wait.next() => match exit {
                None | Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) => Ending::Exited,
                Some(Err(e)) => return Err(exec_error("waiting for the step", e)),
            },
            reason = stop.stopped() => Ending::Stopped(reason),
        };
        let stopped_early = matches!(ending, Ending::Stopped(_));
        let outcome = self.finish_step(&id, &run.job.step.name, ending, &mut wait, reader).await;
        if let Some(said) = said_rx
            && !stopped_early
            && said.await.ok() != Some(Said::Unpacked)
        {
            // Its fill never finished (the engine that fed it went away midway), so the step
            // never ran: gone, and run again.
            if !self.detached.load(Ordering::SeqCst) {
                container.remove().await?;
            }
            return Ok(Attached::Gone);
        }
        if self.detached.load(Ordering::SeqCst) {
            container.keep();
        } else if let Err(e) = container.remove().await {
            tracing::warn!(step = %run.job.step.name, error = %e, "could not remove the step's container");
        }
        Ok(Attached::Ended { outcome: outcome?, was_running })
    }

    fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError> {
        let live: BTreeSet<&str> = live.iter().map(|b| b.0.as_str()).collect();
        // Something of ours without a build label belongs to no live build either.
        let dead: Vec<Resource> = self
            .resources(None)
            .await?
            .into_iter()
            .filter(|r| r.build.as_deref().is_none_or(|b| !live.contains(b)))
            .collect();
        lock(&self.builds).retain(|b, _| live.contains(b.0.as_str()));
        self.remove_all(&dead).await
    }
}

/// The wall clock in milliseconds, for noting when a cache was last used.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opening_token_is_told_apart_from_output_even_when_it_arrives_in_pieces() {
        let unpacked = containers::UNPACKED;
        assert_eq!(opening(b""), None, "nothing yet could still be a token");
        assert_eq!(opening(&unpacked[..3]), None, "a token's first bytes wait for the rest");
        assert_eq!(opening(unpacked), Some(Some((Said::Unpacked, unpacked.len()))));
        let mut with_output = unpacked.to_vec();
        with_output.extend_from_slice(b"hello\n");
        assert_eq!(opening(&with_output), Some(Some((Said::Unpacked, unpacked.len()))));
        assert_eq!(opening(containers::NO_TAR), Some(Some((Said::NoTar, containers::NO_TAR.len()))));
        assert_eq!(opening(b"hello"), Some(None), "ordinary output is no token");
        assert_eq!(opening(b"\x1ecib:x"), Some(None), "a token's start followed by something else is output");
    }

    #[test]
    fn the_wrapper_prints_the_tokens_the_reader_looks_for() {
        // The wrapper writes them with printf's octal escapes; the reader compares bytes.
        let printed = |token: &[u8]| {
            let text = String::from_utf8_lossy(token).replace('\x1e', "\\036");
            format!("printf '{text}'")
        };
        assert!(containers::STDIN_WRAPPER.contains(&printed(containers::UNPACKED)), "{}", containers::STDIN_WRAPPER);
        assert!(containers::STDIN_WRAPPER.contains(&printed(containers::NO_TAR)), "{}", containers::STDIN_WRAPPER);
    }
}
