//! `cib serve` assembled: the engine and the inbox started over the given backends, and the
//! router (built from [`crate::routes::table`]) served on hyper with graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use cib_core::engine::{Engine, EngineConfig, Ports, SystemClock};
use cib_core::pipeline::Config;
use cib_core::ports::{ArtifactIndex, Artifacts, Clock, Notifier, SecretStore, SessionStore, Store, Vcs};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

use crate::config::ServerConfig;
pub use crate::state::AppState;

/// The running parts of a server: its state and the engine's task.
#[derive(Debug)]
pub struct Running {
    pub state: Arc<AppState>,
    pub engine_task: tokio::task::JoinHandle<Result<(), cib_core::engine::EngineError>>,
    pub inbox_task: tokio::task::JoinHandle<()>,
    /// The outgoing webhook receivers' tasks.
    pub outgoing: Arc<crate::outgoing::Outgoing>,
    /// The scheduler of `on: schedule` pipelines.
    pub scheduler_task: tokio::task::JoinHandle<()>,
}

/// Starts the engine and the inbox processor with these backends. The store keeps the
/// builds and the encrypted secrets both.
pub fn start<S: Store + SecretStore + SessionStore + ArtifactIndex + 'static>(
    config: ServerConfig,
    executor: Arc<dyn cib_core::ports::Executor>,
    store: Arc<S>,
    vcs: Arc<dyn Vcs>,
) -> Running {
    start_with(config, executor, store, vcs, Vec::new())
}

/// [`start`], with more notifiers (the forge's, say) besides the configured webhooks.
pub fn start_with<S: Store + SecretStore + SessionStore + ArtifactIndex + 'static>(
    config: ServerConfig,
    executor: Arc<dyn cib_core::ports::Executor>,
    store: Arc<S>,
    vcs: Arc<dyn Vcs>,
    notifiers: Vec<Arc<dyn Notifier>>,
) -> Running {
    start_clocked(config, executor, store, vcs, notifiers, Arc::new(SystemClock))
}

/// [`start_with`] on this clock: the engine's time and the scheduler's (tests hand in a clock
/// they move by hand).
pub fn start_clocked<S: Store + SecretStore + SessionStore + ArtifactIndex + 'static>(
    config: ServerConfig,
    executor: Arc<dyn cib_core::ports::Executor>,
    store: Arc<S>,
    vcs: Arc<dyn Vcs>,
    notifiers: Vec<Arc<dyn Notifier>>,
    clock: Arc<dyn Clock>,
) -> Running {
    start_in_role(config, executor, store, vcs, notifiers, clock, crate::state::Role::Single)
}

/// [`start_clocked`] in a role among the servers of one database. A standby serves webhooks
/// and reads at once; its engine (which loads the snapshot and replays the journal's tail
/// when it starts, as after a restart), inbox processor, scheduler, outgoing webhooks and
/// artifact expiry start only when [`AppState::role`] leaves `Standby`.
pub fn start_in_role<S: Store + SecretStore + SessionStore + ArtifactIndex + 'static>(
    config: ServerConfig,
    executor: Arc<dyn cib_core::ports::Executor>,
    store: Arc<S>,
    vcs: Arc<dyn Vcs>,
    mut notifiers: Vec<Arc<dyn Notifier>>,
    clock: Arc<dyn Clock>,
    role: crate::state::Role,
) -> Running {
    let role = tokio::sync::watch::Sender::new(role);
    let secret_store: Arc<dyn SecretStore> = store.clone();
    let sessions: Arc<dyn SessionStore> = store.clone();
    // Artifacts are archives under the data directory, indexed in the same store.
    let artifacts: Arc<dyn Artifacts> =
        Arc::new(cib_store::FileArtifacts::new(config.data_dir.join("artifacts"), store.clone()));
    let store: Arc<dyn Store> = store;
    let keys = Arc::new(crate::secrets::Keyring::load(&config));
    let mut receivers = Vec::new();
    for hook in &config.webhooks {
        match crate::outgoing::Receiver::new(hook) {
            Ok(receiver) => receivers.push(receiver),
            // `ServerConfig::load` refuses such a receiver; a configuration built in code that
            // has one still starts, without it, and says so.
            Err(error) => tracing::error!(%error, "an outgoing webhook receiver is not started"),
        }
    }
    let names: Vec<String> = receivers.iter().map(|r| r.name.clone()).collect();
    let outgoing = Arc::new(crate::outgoing::Outgoing::start_when(receivers, store.clone(), role.subscribe()));
    notifiers.push(outgoing.clone());
    if let Some(chat) = crate::api::chat::notifier_config(&config) {
        match cib_chat::ChatNotifier::new(chat, &config.data_dir.join("chat-outbox")) {
            Ok(n) => notifiers.push(Arc::new(n.with_store(store.clone()))),
            Err(error) => tracing::error!(%error, "the chat notifier is not started"),
        }
    }
    let ports = Ports {
        executor: executor.clone(),
        vcs: vcs.clone(),
        store: store.clone(),
        notifiers: notifiers.clone(),
        clock: clock.clone(),
        secrets: Arc::new(crate::secrets::ServerSecrets::new(&config, secret_store.clone(), keys.clone())),
        // Images are built on the daemon Docker's defaults name (DOCKER_HOST), like the steps.
        publisher: Arc::new(cib_publish::DeliveryPublisher::new(None)),
        artifacts: artifacts.clone(),
    };
    let engine_config = EngineConfig {
        machine: Config {
            max_running_steps: config.max_running_steps.unwrap_or(crate::config::DEFAULT_RUNNING_STEPS),
            pools: config.lease_pools(),
            limits: config.operator_limits(),
            ..Config::default()
        },
        workspace_root: config.data_dir.join("workspaces"),
        tick_every: Duration::from_secs(15),
        reconcile_every: cib_core::engine::RECONCILE_EVERY,
        snapshots: cib_core::engine::SnapshotPolicy::default(),
    };
    let (engine, future) = Engine::start(ports, engine_config);
    let engine_task = tokio::spawn({
        let store = store.clone();
        let role = role.subscribe();
        async move {
            crate::state::wait_active(role).await;
            // Receivers new to the store start after the last event stored before the engine
            // runs, so that none of the events it makes from now on is missed. A failure here
            // is not fatal: each receiver's task sets its own cursor when it finds none.
            if let Err(error) = crate::outgoing::start_cursors(store.as_ref(), &names).await {
                tracing::warn!(%error, "cannot set the new outgoing webhook receivers' cursors before the engine starts");
            }
            future.await
        }
    });
    let mut state = AppState::new(config, engine, store, vcs, clock, secret_store, keys, sessions);
    state.notifiers = notifiers;
    state.artifacts = artifacts;
    state.executor = Some(executor);
    state.role = role;
    let _ = state.api_router.set(crate::routes::router);
    let state = Arc::new(state);
    let inbox_task = tokio::spawn({
        let state = state.clone();
        async move {
            // Cleared however the inbox ends, a panic included, so `/readyz` tells.
            let _alive = AliveGuard(state.inbox_alive.clone());
            crate::state::wait_active(state.role.subscribe()).await;
            crate::inbox::run(state).await;
        }
    });
    tokio::spawn(feed_metrics(state.clone()));
    tokio::spawn({
        let state = state.clone();
        async move {
            crate::state::wait_active(state.role.subscribe()).await;
            expire_artifacts(state).await;
        }
    });
    tokio::spawn({
        let state = state.clone();
        async move {
            crate::state::wait_active(state.role.subscribe()).await;
            crate::retention::run(state).await;
        }
    });
    let scheduler_task = tokio::spawn({
        let state = state.clone();
        async move {
            crate::state::wait_active(state.role.subscribe()).await;
            crate::scheduler::run(state).await;
        }
    });
    Running { state, engine_task, inbox_task, outgoing, scheduler_task }
}

/// How often expired artifacts are looked for.
const ARTIFACT_EXPIRY_EVERY: Duration = Duration::from_secs(600);

/// Removes expired artifacts at start and then every ten minutes, for as long as the server
/// runs. A failure is logged and tried again at the next round.
async fn expire_artifacts(state: Arc<AppState>) {
    loop {
        match state.artifacts.remove_expired(state.clock.now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed expired artifacts"),
            Err(error) => tracing::warn!(%error, "cannot remove expired artifacts"),
        }
        tokio::select! {
            () = tokio::time::sleep(ARTIFACT_EXPIRY_EVERY) => {}
            () = state.stopping.notified() => return,
        }
    }
}

struct AliveGuard(Arc<std::sync::atomic::AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::error!("the inbox task ended");
    }
}

/// Feeds the metrics from the engine's events until the engine stops. A lag loses counts,
/// never correctness: the gauges that matter are read from the store when scraped.
async fn feed_metrics(state: Arc<AppState>) {
    let mut events = state.engine.subscribe();
    loop {
        match events.recv().await {
            Ok(event) => state.metrics.event(&event),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "metrics fell behind the event stream");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// How long a client may take to send a request's head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `shutdown` resolves, then stops accepting, lets requests in flight finish
/// (server-sent streams are ended), and returns.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let router = crate::routes::router(state.clone());
    // At most this many connections are served at once; more wait in the listen backlog, so a
    // flood of idle connections cannot take every file descriptor.
    let connections = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    // A client that takes longer than this to send its request head is cut off: a slow client
    // holds only its own connection, never a worker, and not for long.
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let service = TowerToHyperService::new(router.clone());
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    state.stopping.notify_waiters();
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(20), graceful.shutdown()).await;
    Ok(())
}
