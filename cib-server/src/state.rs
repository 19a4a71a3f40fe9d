//! The server's shared state. Every other module of the server imports [`AppState`] from
//! here, and this module imports none of them but the configuration, so the modules form no
//! cycle through it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use cib_core::engine::EngineHandle;
use cib_core::policy::People;
use cib_core::ports::{Clock, SecretStore, SessionStore, Store, Vcs};
use tokio::sync::Notify;

use crate::config::ServerConfig;
use crate::secrets::Keyring;

/// Everything a request handler may touch.
pub struct AppState {
    pub config: ServerConfig,
    pub engine: EngineHandle,
    pub store: Arc<dyn Store>,
    pub vcs: Arc<dyn Vcs>,
    pub clock: Arc<dyn Clock>,
    /// The encrypted secrets and the key that opens them.
    pub secrets: Arc<dyn SecretStore>,
    pub keys: Arc<Keyring>,
    /// The web pages' sessions (stored by the digest of their id).
    pub sessions: Arc<dyn SessionStore>,
    /// Who is who across tokens and logins, from `[[people]]`.
    pub people: People,
    /// Wakes the inbox processor when a delivery is stored.
    pub inbox: Arc<Notify>,
    /// Tells long-lived answers (event and log streams) that the server is stopping.
    pub stopping: Arc<Notify>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Cleared when the inbox task ends, for `/readyz`.
    pub inbox_alive: Arc<std::sync::atomic::AtomicBool>,
    /// The notifiers the engine publishes to, for their outbox depths in `/metrics`.
    pub notifiers: Vec<Arc<dyn cib_core::ports::Notifier>>,
    /// The kept artifacts (the engine's own store of them), for the API and their expiry.
    pub artifacts: Arc<dyn cib_core::ports::Artifacts>,
    /// The engine's executor, for what it keeps beyond builds (caches).
    pub executor: Option<Arc<dyn cib_core::ports::Executor>>,
    /// The broker side of remote workers, when `[broker]` is configured: the worker API
    /// (`api/workers.rs`) calls it. Set once, by `cib serve`, after the server started.
    pub workers: std::sync::OnceLock<Arc<cib_worker::BrokerExecutor>>,
    /// Builds the API's router, for requests the server makes to itself on a person's behalf
    /// (chat commands). Set by `server.rs`; a function rather than a router, since a router
    /// holds this state and would keep it alive.
    pub api_router: std::sync::OnceLock<fn(Arc<AppState>) -> axum::Router>,
    /// Slack signatures seen in the last minutes, so that a replayed request does nothing.
    pub slack_replays: cib_chat::verify::ReplayGuard,
    /// Whether this server runs the engine (see [`Role`]); the leadership task moves it.
    pub role: tokio::sync::watch::Sender<Role>,
    counter: AtomicU64,
}

/// A server's part among the servers of one database (issue 22).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The only server of its store (SQLite, or PostgreSQL without leadership): it runs the
    /// engine from the start.
    Single,
    /// It holds the leadership lease under this epoch and runs the engine.
    Active { epoch: i64 },
    /// Another server holds the lease (its address, when known): this one takes webhooks and
    /// serves reads, and its engine, inbox processor and scheduler wait.
    Standby { active: Option<String> },
}

impl Role {
    /// `single`, `active` or `standby`, as `/readyz` says it.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Active { .. } => "active",
            Role::Standby { .. } => "standby",
        }
    }
}

/// Returns once the role is no longer standby: the engine's, the inbox's and the scheduler's
/// tasks start behind it. Never returns if the role's sender is gone, since nothing could then
/// say that this server leads.
pub async fn wait_active(mut role: tokio::sync::watch::Receiver<Role>) {
    if role.wait_for(|r| !matches!(r, Role::Standby { .. })).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl AppState {
    /// The state of a server whose engine is already running.
    // Each argument is one of the parts the server is assembled from, passed once by
    // `server::start_with`; a builder would only spell the same list twice.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ServerConfig,
        engine: EngineHandle,
        store: Arc<dyn Store>,
        vcs: Arc<dyn Vcs>,
        clock: Arc<dyn Clock>,
        secrets: Arc<dyn SecretStore>,
        keys: Arc<Keyring>,
        sessions: Arc<dyn SessionStore>,
    ) -> Self {
        AppState {
            people: config.people_directory(),
            config,
            engine,
            store,
            vcs,
            clock,
            secrets,
            keys,
            sessions,
            inbox: Arc::new(Notify::new()),
            stopping: Arc::new(Notify::new()),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            inbox_alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            notifiers: Vec::new(),
            artifacts: Arc::new(cib_core::ports::NoArtifacts),
            executor: None,
            workers: std::sync::OnceLock::new(),
            api_router: std::sync::OnceLock::new(),
            slack_replays: cib_chat::verify::ReplayGuard::default(),
            role: tokio::sync::watch::Sender::new(Role::Single),
            counter: AtomicU64::new(0),
        }
    }

    /// Whether cib starts a branch's pipelines itself when it moves the branch: yes for local
    /// repositories, no for a forge that sends its own push webhook (a second build would
    /// deploy twice).
    pub fn builds_on_move(&self, repo: &str) -> bool {
        self.config.github.api_url.is_none() || self.config.repos.iter().any(|r| r.name == repo)
    }

    /// The person an API token stands for: the `[[people]]` entry that lists it, else the
    /// token's own name (as before people were configured, so approver lists naming tokens
    /// keep working). Decisions are recorded against this name, so two tokens of one person
    /// count once.
    pub fn person_of_token(&self, token_name: &str) -> String {
        match self.people.find(&cib_core::policy::Identity::Token(token_name.to_owned())) {
            Some(p) => p.name.clone(),
            None => token_name.to_owned(),
        }
    }

    /// The person behind a GitHub login: the `[[people]]` entry that lists it, else the login.
    pub fn person_of_login(&self, login: &str) -> String {
        match self.people.find(&cib_core::policy::Identity::Github(login.to_owned())) {
            Some(p) => p.name.clone(),
            None => login.to_owned(),
        }
    }

    /// The teams of the person behind a GitHub login, from `[[people]]`.
    pub fn teams_of_login(&self, login: &str) -> Vec<String> {
        self.people.teams(&cib_core::policy::Identity::Github(login.to_owned())).to_vec()
    }

    /// Whether a repository is one of the local Git repositories (no forge, no accounts).
    pub fn is_local(&self, repo: &str) -> bool {
        self.config.github.api_url.is_none() || self.config.repos.iter().any(|r| r.name == repo)
    }

    /// A counter for ids made by this process (API builds, people's leases).
    pub fn counter(&self) -> &AtomicU64 {
        &self.counter
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("listen", &self.config.listen).finish_non_exhaustive()
    }
}
