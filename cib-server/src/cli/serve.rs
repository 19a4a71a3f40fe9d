//! `cib serve`: the server with its real backends: Docker, SQLite or PostgreSQL, and local Git
//! repositories.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use cib_server::config::{ServerConfig, StoreLocation};
use cib_server::server::{self, Running};

fn eprint(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

pub fn run(config_path: Option<&Path>, log_format: &str) -> ExitCode {
    super::init_logs(log_format, None);
    // The `CIB_*` overrides, and the variables `[chat]` names for its credentials (read from
    // the file first, so that no other variable of the environment is read).
    let named = config_path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| ServerConfig::parse(&text).ok())
        .map(|c| c.chat.env_names())
        .unwrap_or_default();
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("CIB_") || named.contains(k))
        .collect();
    let config = match ServerConfig::load(config_path, &env) {
        Ok(c) => c,
        Err(e) => {
            eprint(&format!("cib serve: {e}"));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprint(&format!("cib serve: cannot start the runtime: {e}"));
            return ExitCode::from(3);
        }
    };
    runtime.block_on(async move {
        if let Err(e) = cib_server::secrets::create_private_dir(&config.data_dir) {
            eprint(&format!("cib serve: cannot create {}: {e}", config.data_dir.display()));
            return ExitCode::from(3);
        }
        match config.store_location() {
            Ok(StoreLocation::Sqlite(db)) => {
                if let Err(e) = cib_server::secrets::create_private_file(&db) {
                    eprint(&format!("cib serve: cannot create {}: {e}", db.display()));
                    return ExitCode::from(3);
                }
                match cib_store::SqliteStore::open(db, store_options(&config.limits)) {
                    Ok(store) => serve_on(config, Arc::new(store), None).await,
                    Err(e) => {
                        eprint(&format!("cib serve: cannot open the store: {e}"));
                        ExitCode::from(3)
                    }
                }
            }
            Ok(StoreLocation::Postgres(url)) => {
                match cib_store::PgStore::connect(&url, pg_options(&config.limits)).await {
                    Ok(store) => {
                        eprint(&format!("cib serve: the store is PostgreSQL at {}", store.target()));
                        let address =
                            config.leadership.address.clone().unwrap_or_else(|| format!("http://{}", config.listen));
                        let lease = std::time::Duration::from_millis(config.leadership.lease_ms);
                        match store.leadership(&holder_id(), &address, lease).await {
                            Ok(leadership) => serve_on(config, Arc::new(store), Some(leadership)).await,
                            Err(e) => {
                                eprint(&format!("cib serve: cannot take part in leadership: {e}"));
                                ExitCode::from(3)
                            }
                        }
                    }
                    Err(e) => {
                        eprint(&format!("cib serve: cannot open the store {}: {e}", cib_store::redact_url(&url)));
                        ExitCode::from(3)
                    }
                }
            }
            Err(e) => {
                eprint(&format!("cib serve: {e}"));
                ExitCode::from(2)
            }
        }
    })
}

/// This process's id in the leadership row: the host, the process and when it started, so
/// that a restarted server is a new holder (and a takeover always moves the epoch).
fn holder_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{host}:{}:{started}", std::process::id())
}

/// The exit code of a server that stepped down: it lost the leadership lease, or its lease
/// ran out before it could renew it.
const STEPPED_DOWN: u8 = 5;

/// Ends the process at once, because it no longer holds the lease. Going back to standby
/// inside the process would leave the old engine's tasks (steps it follows, logs in flight)
/// running beside the new active server; ending the process ends them without one more
/// write or Docker call, and the containers stay for the new active server to re-attach to.
/// A supervisor (systemd's `Restart=always`) starts it again as a standby.
fn step_down(why: &str) -> ! {
    tracing::error!(reason = %why, "cib serve is stepping down");
    eprint(&format!("cib serve: stepping down: {why}"));
    std::process::exit(i32::from(STEPPED_DOWN))
}

/// The role a leadership round gives this server.
fn role_of(tenure: cib_store::Tenure) -> Option<cib_server::state::Role> {
    use cib_server::state::Role;
    match tenure {
        cib_store::Tenure::Active { epoch } => Some(Role::Active { epoch }),
        cib_store::Tenure::Standby { active } => Some(Role::Standby { active: active.map(|h| h.address) }),
        cib_store::Tenure::Lost { .. } => None,
    }
}

/// Renews the lease, or asks for it, every `renew`, for as long as the process lives, and
/// moves the server's role; steps down when the lease is lost or runs out. A thread of its
/// own watches the lease's end by the monotonic clock, so that a process paused past its lease
/// (SIGSTOP, a frozen VM) stops within 50 ms of running again, whichever task runs first.
fn lead(
    leadership: cib_store::Leadership,
    role: tokio::sync::watch::Sender<cib_server::state::Role>,
    renew: std::time::Duration,
) {
    let watched = leadership.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(50));
            if watched.expired() {
                step_down("the leadership lease ran out before it was renewed");
            }
        }
    });
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(renew).await;
            match leadership.round().await {
                Ok(tenure) => {
                    let Some(new) = role_of(tenure.clone()) else {
                        let holder = match tenure {
                            cib_store::Tenure::Lost { active: Some(h) } => format!("{} (epoch {})", h.address, h.epoch),
                            _ => "another server".to_owned(),
                        };
                        step_down(&format!("the leadership lease was taken by {holder}"));
                    };
                    role.send_if_modified(|current| {
                        if *current == new {
                            return false;
                        }
                        match &new {
                            cib_server::state::Role::Active { epoch } => {
                                eprint(&format!("cib serve: this server is now active (epoch {epoch})"));
                                tracing::info!(epoch, "this server holds the leadership lease and starts its engine");
                            }
                            other => tracing::info!(role = ?other, "leadership"),
                        }
                        *current = new.clone();
                        true
                    });
                }
                Err(error) => tracing::warn!(%error, "cannot renew or ask for the leadership lease"),
            }
        }
    });
}

/// Serves with `store`, SQLite or PostgreSQL alike, until SIGTERM, ^C, or the engine or the
/// inbox stops. With `leadership` (PostgreSQL), the server is active or a standby.
async fn serve_on<S>(mut config: ServerConfig, store: Arc<S>, leadership: Option<cib_store::Leadership>) -> ExitCode
where
    S: cib_core::ports::Store
        + cib_core::ports::SecretStore
        + cib_core::ports::SessionStore
        + cib_core::ports::ArtifactIndex
        + 'static,
{
    // A key that cannot be had, or that does not open the stored secrets, stops the server
    // here with the file's or the variable's name, rather than failing each build that
    // asks for a secret.
    if let Err(e) = cib_server::secrets::check_key(&config, &*store).await {
        eprint(&format!("cib serve: {e}"));
        return ExitCode::from(2);
    }
    // Chat credentials kept in the encrypted store are opened once, here; a missing one stops
    // the server with its setting's and the secret's names.
    let key = cib_server::secrets::load_key(&config);
    if let Err(e) = config.chat.open_secrets(&*store, key).await {
        eprint(&format!("cib serve: {e}"));
        return ExitCode::from(2);
    }
    let mut options = docker_options(config.instance.clone(), &config.operator_limits());
    options.cache_budget = config.cache_budget.map(|b| b.0);
    let executor: Arc<dyn cib_core::ports::Executor> = match config.executor {
        cib_server::config::ExecutorKind::Docker => match cib_docker::DockerExecutor::connect(options).await {
            Ok(e) => {
                // Unset, the limit fits the daemon: its CPU count decides (issue 16).
                config.max_running_steps.get_or_insert(e.suggested_running_steps());
                Arc::new(e)
            }
            Err(e) => {
                eprint(&format!("cib serve: cannot use Docker: {e}\nStart a Docker daemon (or set DOCKER_HOST)."));
                return ExitCode::from(3);
            }
        },
        cib_server::config::ExecutorKind::Swarm => {
            match cib_docker::SwarmExecutor::connect(swarm_options(options, &config.swarm)).await {
                Ok(e) => Arc::new(e),
                Err(e) => {
                    eprint(&format!("cib serve: cannot use Docker Swarm: {e}"));
                    return ExitCode::from(3);
                }
            }
        }
    };
    let github = match cib_server::forge::github_client(&config) {
        Ok(g) => g,
        Err(e) => {
            eprint(&format!("cib serve: {e}"));
            return ExitCode::from(2);
        }
    };
    let mut notifiers = Vec::new();
    if let Some(client) = github.clone() {
        match cib_server::forge::github_notifier(
            &config,
            client,
            Some(store.clone() as Arc<dyn cib_core::ports::Store>),
        ) {
            Ok(n) => notifiers.push(n),
            Err(e) => {
                eprint(&format!("cib serve: cannot set up GitHub statuses: {e}"));
                return ExitCode::from(3);
            }
        }
    }
    let vcs = cib_server::forge::Forges::new(&config, github);
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprint(&format!("cib serve: cannot listen on {}: {e}", config.listen));
            return ExitCode::from(3);
        }
    };
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    // With `[broker]`, steps that ask for another operating system (or labels Docker lacks)
    // go to remote workers; every other step to Docker, as without it.
    let docker = executor;
    let (executor, workers) = match &config.broker {
        Some(broker) => match cib_worker::BrokerExecutor::start(broker.executor_config(&config.data_dir)) {
            Ok(b) => {
                eprint(&format!(
                    "cib serve: remote workers through the broker {}",
                    cib_worker::broker::redact(&broker.url)
                ));
                let routed = cib_worker::RoutingExecutor::new(docker, b.clone(), broker.local_offer());
                (Arc::new(routed) as Arc<dyn cib_core::ports::Executor>, Some(b))
            }
            Err(e) => {
                eprint(&format!("cib serve: [broker]: {e}"));
                return ExitCode::from(3);
            }
        },
        None => (docker, None),
    };
    let renew = std::time::Duration::from_millis(config.leadership.renew_ms);
    let role = match &leadership {
        None => cib_server::state::Role::Single,
        Some(l) => match l.round().await.map(role_of) {
            Ok(Some(role)) => role,
            // A first round cannot have lost a lease it never held; a failed one starts as a
            // standby, and the next round decides.
            Ok(None) => cib_server::state::Role::Standby { active: None },
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask for the leadership lease");
                cib_server::state::Role::Standby { active: None }
            }
        },
    };
    eprint(&format!("cib serve: role {}", role.name()));
    let clock: Arc<dyn cib_core::ports::Clock> = Arc::new(cib_core::engine::SystemClock);
    let running = server::start_in_role(config, executor, store, Arc::new(vcs), notifiers, clock, role);
    if let Some(l) = &leadership {
        lead(l.clone(), running.state.role.clone(), renew);
    }
    if let Some(broker) = workers {
        let _ = running.state.workers.set(broker);
    }
    eprint(&format!("cib serve: listening on http://{address}"));
    let Running { state, mut engine_task, mut inbox_task, outgoing: _outgoing, scheduler_task: _scheduler } = running;
    // Serving ends on SIGTERM or ^C, or when the engine or the inbox task ends: a server
    // whose engine is gone must not live on answering as if nothing happened.
    let mut died: Option<String> = None;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            ended = &mut engine_task => died = Some(format!("the engine stopped: {ended:?}")),
            ended = &mut inbox_task => died = Some(format!("the inbox task stopped: {ended:?}")),
        }
    };
    if let Err(e) = server::serve(state.clone(), listener, shutdown).await {
        eprint(&format!("cib serve: {e}"));
    }
    if let Some(why) = died {
        if why.contains(cib_store::FENCED) {
            step_down(&why);
        }
        tracing::error!(reason = %why, "cib serve is exiting");
        eprint(&format!("cib serve: {why}"));
        return ExitCode::from(4);
    }
    if matches!(*state.role.borrow(), cib_server::state::Role::Standby { .. }) {
        // A standby's engine never started: there is nothing to drain.
        eprint("cib serve: stopped (standby)");
        return ExitCode::SUCCESS;
    }
    // No new work: the inbox stops, and the engine starts no more steps. Running steps get
    // the grace period to finish; what still runs then is left running, never failed, and
    // the next start re-attaches to it.
    inbox_task.abort();
    let grace = std::time::Duration::from_secs(state.config.shutdown_grace);
    eprint(&format!("cib serve: stopping: waiting up to {} s for running steps", grace.as_secs()));
    match state.engine.drain(grace).await {
        Ok(true) => eprint("cib serve: no step is running"),
        Ok(false) => eprint("cib serve: steps still run; the next start re-attaches to them"),
        Err(e) => eprint(&format!("cib serve: {e}")),
    }
    state.engine.shutdown().await;
    let _ = engine_task.await;
    if let Some(l) = &leadership {
        // Given up rather than left to run out, so that a standby takes over within a second.
        match l.release().await {
            Ok(()) => eprint("cib serve: the leadership lease is given up"),
            Err(e) => eprint(&format!("cib serve: cannot give the leadership lease up ({e}); it runs out by itself")),
        }
    }
    ExitCode::SUCCESS
}

/// The Docker executor's options: this server's instance name, and the defaults of `[limits]`
/// for containers that set none (services, which specs give no limits).
pub fn docker_options(instance: String, limits: &cib_core::spec::OperatorLimits) -> cib_docker::DockerOptions {
    let mut options = cib_docker::DockerOptions::new(instance);
    if let Some(memory) = limits.memory.default {
        options.default_limits.memory = memory;
    }
    if let Some(pids) = limits.pids.default {
        options.default_limits.pids = pids;
    }
    options
}

/// The Swarm executor's options: the daemon's, and `[swarm]`.
pub fn swarm_options(
    docker: cib_docker::DockerOptions,
    file: &cib_server::config::SwarmFileConfig,
) -> cib_docker::SwarmOptions {
    let mut options = cib_docker::SwarmOptions::new(docker.instance.clone());
    options.docker = docker;
    if let Some(image) = &file.helper_image {
        options.helper_image = image.clone();
    }
    if let Some(bind) = file.serve_bind {
        options.serve_bind = bind;
    }
    options.serve_address = file.serve_address.clone();
    if let Some(secs) = file.placement_timeout_secs {
        options.placement_timeout = std::time::Duration::from_secs(secs);
    }
    options
}

/// The PostgreSQL store's options: a step's log keeps `[limits] log_size` bytes, as on SQLite.
pub fn pg_options(limits: &cib_server::config::LimitsConfig) -> cib_store::PgOptions {
    cib_store::PgOptions { log_limit: limits.log_size(), ..Default::default() }
}

/// The store's options: a step's log keeps `[limits] log_size` bytes.
pub fn store_options(limits: &cib_server::config::LimitsConfig) -> cib_store::SqliteOptions {
    cib_store::SqliteOptions { log_limit: limits.log_size(), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_reach_the_store_and_the_executor() {
        let config =
            cib_server::config::ServerConfig::parse("[limits]\nmemory = \"1g\"\npids = 256\nlog_size = \"8m\"\n")
                .expect("valid");
        assert_eq!(store_options(&config.limits).log_limit, 8 << 20);
        let docker = docker_options(config.instance.clone(), &config.operator_limits());
        let budget = cib_server::config::ServerConfig::parse("cache_budget = \"2g\"\n").expect("valid").cache_budget;
        assert_eq!(budget.map(|b| b.0), Some(2 << 30));
        assert_eq!((docker.default_limits.memory, docker.default_limits.pids), (1 << 30, 256));
        assert_eq!(docker.instance, config.instance);
        // Without [limits], the built-in values, which are the executor's and the store's own.
        let plain = cib_server::config::ServerConfig::default();
        assert_eq!(store_options(&plain.limits).log_limit, cib_store::SqliteOptions::default().log_limit);
        let defaults = cib_docker::DockerOptions::new("x").default_limits;
        let docker = docker_options(plain.instance.clone(), &plain.operator_limits());
        assert_eq!((docker.default_limits.memory, docker.default_limits.pids), (defaults.memory, defaults.pids));
    }
}
