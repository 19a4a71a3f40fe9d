//! The Swarm mode of the executor: every step runs as a Docker Swarm service in
//! `replicated-job` mode (API 1.41), on whichever node Swarm places it.
//!
//! - **Placement**: a step's `runs_on` becomes placement constraints (`node.labels.K==V`,
//!   `node.platform.os==OS`). Before a step's service is made, the nodes are read: when none
//!   could ever take the step, it fails at once with the reason; a task Swarm still holds as
//!   pending after `placement_timeout` (no node has the CPUs or memory it reserves) fails the
//!   same way, so that nothing waits forever.
//! - **Workspaces**: the first step of a build decides its node. A fill job, placed by that
//!   step's constraints, downloads the checkout from the executor's workspace server (see
//!   `serve`) into the build's workspace volume on the node Swarm picked; from then on every
//!   step and service of the build is pinned there (`node.id==…`), so the steps share the
//!   volume as they do on one daemon. ARCHITECTURE.md weighs this against moving workspaces.
//! - **Secrets** become Swarm secrets, one per value and attempt, mounted as files that the
//!   step's wrapper reads into the environment, and removed with the attempt's service: the
//!   values are never in the service's spec, where `docker service inspect` would show them.
//! - **Output** comes from the task's logs, followed while it runs and read once more from the
//!   start when it ends (Swarm's log stream does not end with the task): what the follow
//!   missed is taken from that read, byte for byte per stream, so nothing is lost or doubled.
//!   It is masked like the single daemon's output.
//! - **Outcomes**: the exit code from the task's status; out of memory from the wrapper, which
//!   reads the container's cgroup counter (a manager cannot inspect another node's container);
//!   a stop (cancel, timeout) removes the service.
//! - **Labels**: services, secrets, the overlay network and the workspace volume carry
//!   `org.cib.engine` and `org.cib.build`, so `cleanup` and `reconcile` find them.

mod serve;
pub mod specs;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{NetworkCreateRequest, SecretSpec, ServiceSpec, Task, TaskState};
use bollard::query_parameters::{
    ListContainersOptions, ListNetworksOptions, ListNodesOptions, ListSecretsOptions, ListServicesOptions,
    ListTasksOptions, ListVolumesOptions, LogsOptions, RemoveVolumeOptions,
};
use cib_core::event::BuildId;
use cib_core::pipeline::StopReason;
use cib_core::ports::{CacheJob, ExecError, Executor, LogSink, Outcome, StepRun, StopSignal, Stream};
use cib_core::spec;
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::errors::{exec_error, is_not_found, status};
use crate::mask::Masker;
use crate::naming::{BuildNames, LABEL_BUILD, LABEL_ENGINE, Role, fnv1a, label_filter, nonce};
use crate::options::DockerOptions;
use crate::workspace;

pub use serve::WorkspaceServer;
use specs::{NodeFacts, OOM_TOKEN};

/// Settings of the Swarm executor: the daemon's, and what only Swarm needs.
#[derive(Debug, Clone)]
pub struct SwarmOptions {
    /// The manager to talk to, the engine instance, limits, capabilities and timeouts, as for
    /// one daemon.
    pub docker: DockerOptions,
    /// The image the workspace fill job runs: it needs `sh`, `ip`, `wget` and `tar` (busybox
    /// has them all). It must be on every node that may run steps.
    pub helper_image: String,
    /// Where the workspace server listens.
    pub serve_bind: std::net::SocketAddr,
    /// The address (`host:port`) at which nodes reach the workspace server. `None` means the
    /// fill task's default gateway and the server's port, which is right when the executor
    /// runs on the node itself (one node, or a manager that runs steps).
    pub serve_address: Option<String>,
    /// How long a task may stay pending (no node with the resources it reserves) before its
    /// step fails with Swarm's reason.
    pub placement_timeout: Duration,
    /// Time between two looks at a task's status.
    pub poll: Duration,
}

impl SwarmOptions {
    pub fn new(instance: impl Into<String>) -> Self {
        SwarmOptions {
            docker: DockerOptions::new(instance),
            helper_image: "busybox".to_owned(),
            serve_bind: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            serve_address: None,
            placement_timeout: Duration::from_secs(30),
            poll: Duration::from_millis(50),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn stopped(reason: StopReason) -> Outcome {
    match reason {
        StopReason::Cancelled => Outcome::Cancelled,
        StopReason::TimedOut => Outcome::TimedOut,
        StopReason::NoOutput => Outcome::NoOutput,
    }
}

/// A name Swarm takes for a service or a secret: a DNS label (letters, digits and `-`, at most
/// 63 characters, no `-` at either end).
fn dns_label(text: &str, max: usize) -> String {
    let s: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(max).collect();
    let s = s.trim_matches('-').to_owned();
    if s.is_empty() { "x".to_owned() } else { s }
}

/// What the executor remembers of a build: the node its workspace is on, and its overlay
/// network once its services made one.
#[derive(Debug, Default)]
struct SwarmBuild {
    node: Option<String>,
    network: Option<String>,
}

/// Removes a service when dropped before it was settled (a step's future dropped midway),
/// unless the engine detached.
struct ServiceGuard {
    docker: Docker,
    id: Option<String>,
    detached: Arc<AtomicBool>,
}

impl ServiceGuard {
    async fn remove(mut self) {
        if let Some(id) = self.id.take() {
            remove_service(&self.docker, &id).await;
        }
    }
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take()
            && !self.detached.load(Ordering::SeqCst)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let docker = self.docker.clone();
            rt.spawn(async move { remove_service(&docker, &id).await });
        }
    }
}

async fn remove_service(docker: &Docker, id: &str) {
    match docker.delete_service(id).await {
        Ok(()) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => tracing::warn!(service = %id, error = %e, "could not remove a Swarm service"),
    }
}

/// The executor on a Swarm manager.
#[derive(Clone)]
pub struct SwarmExecutor(Arc<Inner>);

struct Inner {
    docker: Docker,
    options: SwarmOptions,
    host_cpus: Option<f64>,
    server: WorkspaceServer,
    builds: Mutex<HashMap<BuildId, Arc<tokio::sync::Mutex<SwarmBuild>>>>,
    detached: Arc<AtomicBool>,
}

impl std::fmt::Debug for SwarmExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmExecutor").field("instance", &self.0.options.docker.instance).finish()
    }
}

/// Output of one task on its way to the sink: masked per stream, with the out-of-memory token
/// taken out, and counted per stream so that a second read from the start skips what the
/// first one forwarded.
struct Forward {
    sink: Arc<dyn LogSink>,
    maskers: [Masker; 2],
    /// Raw bytes forwarded per stream (stdout, stderr).
    seen: [usize; 2],
    /// While reading again from the start: raw bytes of that read per stream.
    replay: Option<[usize; 2]>,
    oom: bool,
}

impl Forward {
    fn new(sink: Arc<dyn LogSink>, secrets: &[String]) -> Self {
        Forward { sink, maskers: [Masker::new(secrets), Masker::new(secrets)], seen: [0, 0], replay: None, oom: false }
    }

    fn feed(&mut self, stream: Stream, data: &[u8]) {
        let i = usize::from(stream == Stream::Stderr);
        let mut data = data;
        if let Some(r) = self.replay.as_mut() {
            let skip = self.seen[i].saturating_sub(r[i]).min(data.len());
            r[i] += data.len();
            data = &data[skip..];
        }
        if data.is_empty() {
            return;
        }
        self.seen[i] += data.len();
        let stripped;
        if stream == Stream::Stdout
            && let Some(at) = data.windows(OOM_TOKEN.len()).position(|w| w == OOM_TOKEN)
        {
            self.oom = true;
            stripped = [&data[..at], &data[at + OOM_TOKEN.len()..]].concat();
            data = &stripped;
        }
        let masked = self.maskers[i].push(data);
        if !masked.is_empty() {
            self.sink.write(stream, &masked);
        }
    }

    fn finish(&mut self) {
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            let rest = self.maskers[i].finish();
            if !rest.is_empty() {
                self.sink.write(stream, &rest);
            }
        }
    }
}

fn feed_item(forward: &Mutex<Forward>, item: Result<LogOutput, bollard::errors::Error>) -> bool {
    match item {
        Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
            lock(forward).feed(Stream::Stdout, &message);
            true
        }
        Ok(LogOutput::StdErr { message }) => {
            lock(forward).feed(Stream::Stderr, &message);
            true
        }
        Ok(LogOutput::StdIn { .. }) => true,
        Err(e) => {
            tracing::debug!(error = %e, "reading a task's logs ended");
            false
        }
    }
}

fn logs_options(follow: bool) -> LogsOptions {
    LogsOptions { follow, stdout: true, stderr: true, tail: "all".to_owned(), ..Default::default() }
}

/// How a task ended, as far as the executor cares.
enum TaskEnd {
    /// Ran to its end with this exit code, on this node.
    Exited { code: i64, node: String },
    /// Stopped on request.
    Stopped(StopReason),
}

fn state_of(task: &Task) -> Option<TaskState> {
    task.status.as_ref().and_then(|s| s.state)
}

fn err_of(task: &Task) -> String {
    task.status.as_ref().and_then(|s| s.err.clone().or_else(|| s.message.clone())).unwrap_or_default()
}

impl SwarmExecutor {
    /// Connects to a Swarm manager: the daemon must be in an active swarm and able to manage
    /// it, else `Misconfigured` says how to make it so. Starts the workspace server.
    pub async fn connect(options: SwarmOptions) -> Result<Self, ExecError> {
        let docker = match &options.docker.host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_defaults(),
        }
        .map_err(|e| exec_error("connecting", e))?
        .with_timeout(options.docker.api_timeout);
        let docker = docker.negotiate_version().await.map_err(|e| {
            ExecError::Misconfigured(format!("cannot reach the Docker daemon: {}", exec_error("negotiating", e)))
        })?;
        let info = docker.info().await.map_err(|e| exec_error("reading the daemon's info", e))?;
        let swarm = info.swarm.unwrap_or_default();
        let active = swarm.local_node_state.is_some_and(|s| s.to_string() == "active");
        if !active || swarm.control_available != Some(true) {
            return Err(ExecError::Misconfigured(
                "the Docker daemon is not a Swarm manager: run `docker swarm init` (see docs/scaling.md)".to_owned(),
            ));
        }
        let server = WorkspaceServer::start(options.serve_bind)
            .await
            .map_err(|e| ExecError::Misconfigured(format!("cannot serve workspaces on {}: {e}", options.serve_bind)))?;
        Ok(SwarmExecutor(Arc::new(Inner {
            docker,
            host_cpus: info.ncpu.filter(|n| *n > 0).map(|n| n as f64),
            options,
            server,
            builds: Mutex::new(HashMap::new()),
            detached: Arc::new(AtomicBool::new(false)),
        })))
    }

    pub fn docker(&self) -> &Docker {
        &self.0.docker
    }

    pub fn options(&self) -> &SwarmOptions {
        &self.0.options
    }

    /// The nodes as placement sees them.
    pub async fn nodes(&self) -> Result<Vec<NodeFacts>, ExecError> {
        self.0.nodes().await
    }
}

#[async_trait]
impl Executor for SwarmExecutor {
    async fn healthcheck(&self) -> Result<(), ExecError> {
        self.0.docker.inspect_swarm().await.map(|_| ()).map_err(|e| exec_error("inspecting the swarm", e))
    }

    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, stop: StopSignal) -> Result<Outcome, ExecError> {
        self.0.run(run, logs, stop).await
    }

    async fn start_services(&self, build: &BuildId, services: &[spec::Service]) -> Result<(), (String, ExecError)> {
        self.0.start_services(build, services).await
    }

    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError> {
        self.0.remove_builds(|b| b == build.0.as_str()).await?;
        lock(&self.0.builds).remove(build);
        Ok(())
    }

    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError> {
        let live: std::collections::BTreeSet<&str> = live.iter().map(|b| b.0.as_str()).collect();
        self.0.remove_builds(|b| !live.contains(b)).await
    }

    fn detach(&self) {
        self.0.detached.store(true, Ordering::SeqCst);
    }

    // The workspace of a Swarm build lives in a volume on whichever node runs it, out of the
    // server's reach: what reads or writes it from the server is refused in words, rather than
    // left to the trait's defaults, which would keep no cache and publish or keep the files of
    // the checkout instead of those the steps made.
    async fn export_workspace(&self, _build: &BuildId, _dest: &Path) -> Result<(), ExecError> {
        Err(unavailable("deliverables and `artifacts` (they read the steps' workspace back)"))
    }

    async fn import_archive(&self, _run: &StepRun, _archive: &Path) -> Result<(), ExecError> {
        Err(unavailable("`needs_artifacts`"))
    }

    async fn restore_cache(&self, _run: &StepRun, _cache: &CacheJob) -> Result<Option<String>, ExecError> {
        Err(unavailable("`cache`"))
    }

    async fn save_cache(&self, _run: &StepRun, _cache: &CacheJob) -> Result<bool, ExecError> {
        Err(unavailable("`cache`"))
    }
}

/// Why a feature that needs the build's workspace on the server's daemon is refused on Swarm.
fn unavailable(what: &str) -> ExecError {
    ExecError::Permanent(format!(
        "{what} cannot be had on Docker Swarm, where the workspace stays on the node that runs the build \
         (docs/scaling.md): run this pipeline with the single-daemon executor"
    ))
}

impl Inner {
    fn instance(&self) -> &str {
        &self.options.docker.instance
    }

    fn build_state(&self, build: &BuildId) -> Arc<tokio::sync::Mutex<SwarmBuild>> {
        lock(&self.builds).entry(build.clone()).or_default().clone()
    }

    /// A short name for a service of this build: Swarm wants a DNS label of at most 63
    /// characters, which `BuildNames`' container names can exceed.
    fn service_name(&self, build: &BuildId, what: &str) -> String {
        let key = fnv1a(&format!("{}\u{0}{}", self.instance(), build.0)) & 0xffff_ffff;
        format!("cib-{key:08x}-{}-{}", dns_label(what, 30), nonce())
    }

    async fn nodes(&self) -> Result<Vec<NodeFacts>, ExecError> {
        let nodes = self
            .docker
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(|e| exec_error("listing the swarm's nodes", e))?;
        Ok(nodes
            .into_iter()
            .map(|n| {
                let spec = n.spec.unwrap_or_default();
                let description = n.description.unwrap_or_default();
                let ready = n.status.and_then(|s| s.state).is_some_and(|s| s.to_string() == "ready");
                let active = spec.availability.is_none_or(|a| a.to_string() == "active");
                NodeFacts {
                    id: n.id.unwrap_or_default(),
                    hostname: description.hostname.unwrap_or_default(),
                    os: description.platform.and_then(|p| p.os).unwrap_or_default(),
                    labels: spec.labels.unwrap_or_default().into_iter().collect(),
                    available: ready && active,
                }
            })
            .collect())
    }

    async fn create_service(&self, spec: ServiceSpec) -> Result<ServiceGuard, ExecError> {
        let name = spec.name.clone().unwrap_or_default();
        let created = self
            .docker
            .create_service(spec, None)
            .await
            .map_err(|e| exec_error(&format!("creating service {name}"), e))?;
        let id = created.id.ok_or_else(|| ExecError::Transient(format!("service {name} was created without an id")))?;
        Ok(ServiceGuard { docker: self.docker.clone(), id: Some(id), detached: self.detached.clone() })
    }

    async fn task_of(&self, service: &str) -> Result<Option<Task>, ExecError> {
        let filters = HashMap::from([("service".to_owned(), vec![service.to_owned()])]);
        let mut tasks = self
            .docker
            .list_tasks(Some(ListTasksOptions { filters: Some(filters) }))
            .await
            .map_err(|e| exec_error("listing tasks", e))?;
        // A job of one completion has one task; the newest is the one that counts.
        tasks.sort_by_key(|t| t.created_at.clone().map(|d| d.to_string()));
        Ok(tasks.pop())
    }

    /// Waits for the one task of a job service to end, following its output into `forward`
    /// (when given) once it runs. A stop removes the service. A task Swarm cannot place is an
    /// error after `placement_timeout`, with Swarm's reason.
    async fn wait_job(
        &self,
        what: &str,
        guard: &mut ServiceGuard,
        forward: Option<Arc<Mutex<Forward>>>,
        stop: &mut StopSignal,
    ) -> Result<TaskEnd, ExecError> {
        let service = guard.id.clone().unwrap_or_default();
        let started = Instant::now();
        let mut follow: Option<tokio::task::JoinHandle<()>> = None;
        let mut container: Option<String> = None;
        let end = loop {
            tokio::select! {
                reason = stop.stopped() => break Ok(TaskEnd::Stopped(reason)),
                () = tokio::time::sleep(self.options.poll) => {}
            }
            let Some(task) = self.task_of(&service).await? else { continue };
            let state = state_of(&task);
            let task_container =
                task.status.as_ref().and_then(|s| s.container_status.as_ref()).and_then(|c| c.container_id.clone());
            let has_container = task_container.is_some();
            if container.is_none() {
                container = task_container;
            }
            if follow.is_none()
                && has_container
                && let (Some(fwd), Some(id)) = (forward.clone(), task.id.clone())
            {
                let docker = self.docker.clone();
                follow = Some(tokio::spawn(async move {
                    let mut logs = docker.task_logs(&id, Some(logs_options(true)));
                    while let Some(item) = logs.next().await {
                        if !feed_item(&fwd, item) {
                            break;
                        }
                    }
                }));
            }
            let node = task.node_id.clone().unwrap_or_default();
            match state {
                Some(TaskState::COMPLETE) => break Ok(TaskEnd::Exited { code: 0, node }),
                Some(TaskState::FAILED) => {
                    match task.status.as_ref().and_then(|s| s.container_status.as_ref()).and_then(|c| c.exit_code) {
                        Some(code) if code != 0 => break Ok(TaskEnd::Exited { code, node }),
                        _ => break Err(ExecError::Transient(format!("{what}: the task failed: {}", err_of(&task)))),
                    }
                }
                Some(TaskState::REJECTED) => {
                    let err = err_of(&task);
                    let kind = if err.contains("No such image") || err.contains("not found") {
                        ExecError::Permanent
                    } else {
                        ExecError::Transient
                    };
                    break Err(kind(format!("{what}: Swarm rejected the task: {err}")));
                }
                Some(TaskState::SHUTDOWN | TaskState::ORPHANED | TaskState::REMOVE) => {
                    break Err(ExecError::Transient(format!(
                        "{what}: the task was shut down ({}), its node may have left the swarm",
                        err_of(&task)
                    )));
                }
                Some(TaskState::NEW | TaskState::PENDING | TaskState::ALLOCATED)
                    if started.elapsed() > self.options.placement_timeout =>
                {
                    let err = err_of(&task);
                    let err = if err.is_empty() { "no node took it".to_owned() } else { err };
                    break Err(ExecError::Permanent(format!(
                        "{what}: Swarm could not place the task within {:?}: {err}",
                        self.options.placement_timeout
                    )));
                }
                _ => {}
            }
        };
        if let Some(f) = follow {
            f.abort();
        }
        match &end {
            Ok(TaskEnd::Exited { .. }) => {
                // Swarm's stream of a task's logs does not end with the task: read them again
                // from the start and take what the follow had not forwarded yet.
                if let Some(fwd) = &forward
                    && let Some(task) = self.task_of(&service).await?
                    && let Some(id) = task.id
                {
                    lock(fwd).replay = Some([0, 0]);
                    let mut logs = self.docker.task_logs(&id, Some(logs_options(false)));
                    while let Some(item) = logs.next().await {
                        if !feed_item(fwd, item) {
                            break;
                        }
                    }
                }
                guard_remove(guard).await;
            }
            Ok(TaskEnd::Stopped(_)) | Err(_) => guard_remove(guard).await,
        }
        // Docker 20.10 keeps a job's container after its service is removed; when it is on
        // this daemon, remove it now (on another node, the node's own Docker keeps it until
        // pruned: docs/scaling.md).
        if let Some(id) = container {
            let _ = crate::executor::remove_container(&self.docker, &id).await;
        }
        if let Some(fwd) = &forward {
            lock(fwd).finish();
        }
        end
    }

    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, mut stop: StopSignal) -> Result<Outcome, ExecError> {
        if let Some(reason) = stop.reason() {
            return Ok(stopped(reason));
        }
        let job = &run.job;
        let image = match &job.step.action {
            spec::Action::Run { image, .. } => image.as_str(),
            spec::Action::Gate(_) => return Err(ExecError::Permanent("a gate has no container to run".into())),
        };
        if job.step.network == spec::Network::None {
            return Err(ExecError::Permanent(format!(
                "step {}: `network: none` cannot be had on Docker Swarm (a service cannot join the `none` network): \
                 run it with the single-daemon executor",
                job.step.name
            )));
        }
        let names = BuildNames::new(self.instance(), &job.build);
        let runs_on = job.step.runs_on.as_ref();
        let state = self.build_state(&job.build);
        let (node, network) = {
            let mut s = state.lock().await;
            let nodes = self.nodes().await?;
            if let Some(why) = specs::unplaceable(&nodes, runs_on, s.node.as_deref()) {
                return Err(ExecError::Permanent(format!("step {}: {why}", job.step.name)));
            }
            if s.node.is_none() {
                let fill = self.fill(run, &names, image, &mut stop);
                match fill.await? {
                    Some(node) => s.node = Some(node),
                    None => return Ok(stopped(stop.reason().unwrap_or(StopReason::Cancelled))),
                }
            }
            (s.node.clone().unwrap_or_default(), s.network.clone().filter(|_| !job.step.services.is_empty()))
        };
        let name = self.service_name(&job.build, &format!("{}-{}", job.step.name, job.attempt));
        let secrets = match self.make_secrets(run, &names, &name).await {
            Ok(s) => s,
            Err(e) => {
                self.remove_secrets(&name).await;
                return Err(e);
            }
        };
        let spec = specs::step_service(
            &specs::StepService {
                run,
                image,
                names: &names,
                options: &self.options.docker,
                host_cpus: self.host_cpus,
                node: &node,
                network,
                secrets: &secrets,
            },
            &name,
        );
        let result = async {
            let mut guard = self.create_service(spec?).await?;
            let mut mask: Vec<String> = run.secrets.values().cloned().collect();
            mask.extend(run.mask.iter().cloned());
            let forward = Arc::new(Mutex::new(Forward::new(logs, &mask)));
            let what = format!("step {}", job.step.name);
            let end = self.wait_job(&what, &mut guard, Some(forward.clone()), &mut stop).await?;
            Ok(match end {
                TaskEnd::Stopped(reason) => stopped(reason),
                TaskEnd::Exited { code, .. } if code != 0 && lock(&forward).oom => Outcome::OutOfMemory,
                TaskEnd::Exited { code, .. } => Outcome::Exited(i32::try_from(code).unwrap_or(i32::MAX)),
            })
        }
        .await;
        self.remove_secrets(&name).await;
        result
    }

    /// Fills the build's workspace volume on the node Swarm picks for the step `run` (placed
    /// by its `runs_on`), and answers that node. `None` when a stop came first.
    async fn fill(
        &self,
        run: &StepRun,
        names: &BuildNames,
        image: &str,
        stop: &mut StopSignal,
    ) -> Result<Option<String>, ExecError> {
        let (stream, done) =
            workspace::archive(workspace::Upload { extras: Vec::new(), checkout: Some(run.workspace.clone()) });
        let chunks: Vec<bytes::Bytes> = stream
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<std::io::Result<_>>()
            .map_err(|e| ExecError::Permanent(format!("packing the workspace: {e}")))?;
        done.await
            .map_err(|e| ExecError::Transient(format!("packing the workspace: {e}")))?
            .map_err(|e| ExecError::Permanent(format!("packing the workspace: {e}")))?;
        let archive = bytes::Bytes::from(chunks.concat());
        let token = self.server.offer(archive).map_err(|e| ExecError::Transient(format!("a workspace token: {e}")))?;
        let name = self.service_name(&run.job.build, "fill");
        let spec = specs::fill_service(
            &specs::Fill {
                names,
                options: &self.options.docker,
                helper: &self.options.helper_image,
                image,
                runs_on: run.job.step.runs_on.as_ref(),
                address: self.options.serve_address.as_deref().unwrap_or(""),
                port: self.server.port(),
                token: &token,
            },
            &name,
        );
        let result = async {
            let mut guard = self.create_service(spec).await?;
            let sink = Arc::new(Tail::default());
            let forward = Arc::new(Mutex::new(Forward::new(sink.clone(), &[])));
            match self.wait_job("filling the workspace", &mut guard, Some(forward), stop).await? {
                TaskEnd::Stopped(_) => Ok(None),
                TaskEnd::Exited { code: 0, node } => Ok(Some(node)),
                TaskEnd::Exited { code, node } => Err(ExecError::Transient(format!(
                    "filling the workspace on node {node} failed (exit {code}): {}",
                    String::from_utf8_lossy(&lock(&sink.0)).trim()
                ))),
            }
        }
        .await;
        self.server.withdraw(&token);
        result
    }

    /// One Swarm secret per secret value of the step, labelled with the build, named after
    /// the attempt's service: (id, name, variable).
    async fn make_secrets(
        &self,
        run: &StepRun,
        names: &BuildNames,
        service: &str,
    ) -> Result<Vec<(String, String, String)>, ExecError> {
        let mut made = Vec::new();
        for (i, (var, value)) in run.secrets.iter().enumerate() {
            let name = format!("{service}-s{i}");
            let spec = SecretSpec {
                name: Some(name.clone()),
                labels: Some(names.labels(Role::Step)),
                data: Some(base64::engine::general_purpose::STANDARD.encode(value.as_bytes())),
                ..Default::default()
            };
            let created =
                self.docker.create_secret(spec).await.map_err(|e| exec_error(&format!("creating secret {name}"), e))?;
            made.push((created.id, name, var.clone()));
        }
        Ok(made)
    }

    async fn remove_secrets(&self, service: &str) {
        let filters = HashMap::from([("name".to_owned(), vec![format!("{service}-s")])]);
        let Ok(secrets) = self.docker.list_secrets(Some(ListSecretsOptions { filters: Some(filters) })).await else {
            return;
        };
        for s in secrets {
            if let Some(id) = s.id {
                let _ = self.docker.delete_secret(&id).await;
            }
        }
    }

    async fn start_services(&self, build: &BuildId, services: &[spec::Service]) -> Result<(), (String, ExecError)> {
        if services.is_empty() {
            return Ok(());
        }
        let names = BuildNames::new(self.instance(), build);
        let state = self.build_state(build);
        let network = {
            let mut s = state.lock().await;
            if s.network.is_none() {
                let name = names.network();
                let request = NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("overlay".to_owned()),
                    attachable: Some(true),
                    labels: Some(names.labels(Role::Network)),
                    ..Default::default()
                };
                match self.docker.create_network(request).await {
                    Ok(_) => {}
                    Err(e) if status(&e) == Some(409) => {}
                    Err(e) => return Err((String::new(), exec_error(&format!("creating network {name}"), e))),
                }
                s.network = Some(name);
            }
            s.network.clone().unwrap_or_default()
        };
        for service in services {
            let name = self.service_name(build, &format!("svc-{}", service.name));
            let spec = specs::build_service(service, &names, &self.options.docker, self.host_cpus, &network, &name);
            let fail = |e: ExecError| (service.name.clone(), e);
            let mut guard = self.create_service(spec).await.map_err(fail)?;
            let id = guard.id.clone().unwrap_or_default();
            let patience = service.ready.as_ref().map_or(Duration::from_secs(60), |r| r.timeout.as_std());
            let deadline = Instant::now() + patience.max(self.options.placement_timeout);
            loop {
                tokio::time::sleep(self.options.poll).await;
                let task = self.task_of(&id).await.map_err(fail)?;
                match task.as_ref().and_then(state_of) {
                    Some(TaskState::RUNNING) => break,
                    Some(TaskState::FAILED | TaskState::REJECTED | TaskState::COMPLETE | TaskState::SHUTDOWN) => {
                        let err = task.as_ref().map(err_of).unwrap_or_default();
                        return Err(fail(ExecError::Permanent(format!("service {} ended: {err}", service.name))));
                    }
                    _ if Instant::now() > deadline => {
                        let err = task.as_ref().map(err_of).unwrap_or_default();
                        return Err(fail(ExecError::Permanent(format!(
                            "service {} was not ready within {patience:?} {err}",
                            service.name
                        ))));
                    }
                    _ => {}
                }
            }
            // From here the service belongs to the build: cleanup removes it.
            guard.id = None;
        }
        Ok(())
    }

    /// Removes the services, containers left by them, secrets, volumes (on this node) and
    /// networks of the builds `doomed` picks, in that order. Tries everything and reports the
    /// first failure.
    async fn remove_builds(&self, doomed: impl Fn(&str) -> bool) -> Result<usize, ExecError> {
        let filters = label_filter(&[(LABEL_ENGINE, self.instance())]);
        let pick = |labels: Option<&HashMap<String, String>>| {
            labels.and_then(|l| l.get(LABEL_BUILD)).is_some_and(|b| doomed(b))
        };
        let mut removed = 0;
        let mut first_error: Option<ExecError> = None;
        let services = self
            .docker
            .list_services(Some(ListServicesOptions { filters: Some(filters.clone()), ..Default::default() }))
            .await
            .map_err(|e| exec_error("listing services", e))?;
        for s in services {
            if pick(s.spec.as_ref().and_then(|s| s.labels.as_ref()))
                && let Some(id) = s.id
            {
                match self.docker.delete_service(&id).await {
                    Ok(()) => removed += 1,
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        first_error.get_or_insert(exec_error("removing a service", e));
                    }
                }
            }
        }
        // Docker 20.10 keeps the containers of a job's tasks after its service is removed,
        // and a volume cannot go while one holds it: remove those this daemon has.
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
            if pick(c.labels.as_ref())
                && let Some(id) = c.id
            {
                match crate::executor::remove_container(&self.docker, &id).await {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        let secrets = self
            .docker
            .list_secrets(Some(ListSecretsOptions { filters: Some(filters.clone()) }))
            .await
            .map_err(|e| exec_error("listing secrets", e))?;
        for s in secrets {
            if pick(s.spec.as_ref().and_then(|s| s.labels.as_ref()))
                && let Some(id) = s.id
            {
                match self.docker.delete_secret(&id).await {
                    Ok(()) => removed += 1,
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        first_error.get_or_insert(exec_error("removing a secret", e));
                    }
                }
            }
        }
        let volumes = self
            .docker
            .list_volumes(Some(ListVolumesOptions { filters: Some(filters.clone()) }))
            .await
            .map_err(|e| exec_error("listing volumes", e))?;
        for v in volumes.volumes.unwrap_or_default() {
            if pick(Some(&v.labels)) {
                match self.remove_volume(&v.name).await {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions { filters: Some(filters) }))
            .await
            .map_err(|e| exec_error("listing networks", e))?;
        for n in networks {
            if pick(n.labels.as_ref())
                && let Some(id) = n.id
            {
                match self.remove_network(&id).await {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// Removes an overlay network. Swarm lets go of a removed service's attachments in the
    /// background, so "in use" is waited out, and the removal is confirmed by the network
    /// being gone, for up to ten seconds.
    async fn remove_network(&self, id: &str) -> Result<(), ExecError> {
        let patience = Instant::now() + Duration::from_secs(10);
        loop {
            match self.docker.remove_network(id).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) if Instant::now() >= patience => return Err(exec_error(&format!("removing network {id}"), e)),
                Err(_) => {}
            }
            match self.docker.inspect_network(id, None).await {
                Err(e) if is_not_found(&e) => return Ok(()),
                _ if Instant::now() >= patience => {
                    return Err(ExecError::Transient(format!("network {id} is still there after its removal")));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn remove_volume(&self, name: &str) -> Result<(), ExecError> {
        let patience = Instant::now() + Duration::from_secs(5);
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
}

async fn guard_remove(guard: &mut ServiceGuard) {
    let taken = ServiceGuard { docker: guard.docker.clone(), id: guard.id.take(), detached: guard.detached.clone() };
    taken.remove().await;
}

/// Keeps what a fill job printed, for its error message.
#[derive(Debug, Default)]
struct Tail(Mutex<Vec<u8>>);

impl LogSink for Tail {
    fn write(&self, _stream: Stream, bytes: &[u8]) {
        let mut t = lock(&self.0);
        if t.len() < 4096 {
            t.extend_from_slice(bytes);
        }
    }
}
