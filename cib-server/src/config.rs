//! The server's configuration: a TOML file, with environment overrides for what operators set
//! per deployment (`CIB_LISTEN`, `CIB_DATA_DIR`, `CIB_GITHUB_WEBHOOK_SECRET`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cib_core::lease::{PoolConfig, PoolKind, Unit};
use cib_core::spec::limits::{Bound, OperatorLimits};
use cib_core::spec::{Duration, Memory};
use serde::Deserialize;

/// What a token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read builds, logs and events.
    Read,
    /// Also start, cancel and retry builds.
    Trigger,
    /// Also approve and reject gates.
    Approve,
    /// Everything, including pools and leases of others.
    Admin,
}

/// A bearer token and the identity it stands for. `Debug` redacts the token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who the token belongs to: the name events and decisions record.
    pub name: String,
    /// The token itself; empty when `token_sha256` is given instead.
    #[serde(default)]
    pub token: String,
    /// The SHA-256 of the token in hexadecimal, so that the file need not hold the token.
    #[serde(default)]
    pub token_sha256: Option<String>,
    pub role: Role,
    /// Teams the holder belongs to, for gates that name teams.
    #[serde(default)]
    pub teams: Vec<String>,
}

/// A repository the server builds, as the forge names it, and where its Git data lives.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub name: String,
    pub path: PathBuf,
    /// The secret a plain Git server signs its pushes to `POST /hooks/git` with.
    #[serde(default)]
    pub webhook_secret: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitConfig {
    pub name: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A resource pool: named units with metadata, or a capacity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFileConfig {
    pub name: String,
    #[serde(default)]
    pub units: Vec<UnitConfig>,
    #[serde(default)]
    pub capacity: Option<u32>,
}

/// A URL that receives every event, signed with HMAC-SHA256. `Debug` redacts the secret.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://`.
    pub url: String,
    pub secret: String,
    /// The receiver's name: the key of its cursor in the store and its label in the metrics.
    /// By default the URL's host and port (never its path or query, which may hold a token).
    #[serde(default)]
    pub name: Option<String>,
    /// Lets the receiver be on a loopback, link-local or private address, which the guard
    /// against server-side request forgery refuses otherwise.
    #[serde(default)]
    pub allow_private: bool,
    /// A PEM file of certificates trusted for this receiver, besides the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl WebhookConfig {
    /// A receiver with the defaults: its host as its name, public addresses only, public roots.
    pub fn new(url: impl Into<String>, secret: impl Into<String>) -> Self {
        WebhookConfig { url: url.into(), secret: secret.into(), name: None, allow_private: false, ca_file: None }
    }

    /// The receiver's name: `name`, or else the URL's host and port.
    pub fn receiver(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match self.url.parse::<http::Uri>() {
            Ok(uri) => match (uri.host(), uri.port_u16()) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.to_owned(),
                (None, _) => self.url.clone(),
            },
            Err(_) => self.url.clone(),
        }
    }

    /// What is wrong with this receiver's settings, if anything, in words for its operator.
    fn check(&self) -> Result<(), String> {
        let at = format!("[[webhooks]] {}", self.receiver());
        let uri: http::Uri = self.url.parse().map_err(|e| format!("{at}: url '{}' is not a URL: {e}", self.url))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("{at}: url '{}' must start with http:// or https://", self.url)),
        }
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            return Err(format!("{at}: url '{}' has no host", self.url));
        };
        if !self.allow_private
            && let Some(ip) = crate::ssrf::literal_ip(host)
            && let Some(reason) = crate::ssrf::refused(ip)
        {
            return Err(format!(
                "{at}: {ip} is a {reason} address, which outgoing webhooks refuse so that a receiver's URL cannot \
                 reach into the server's own network; set allow_private = true on this receiver if that is intended"
            ));
        }
        if self.secret.is_empty() {
            return Err(format!("{at}: secret is empty; receivers check the signature made with it"));
        }
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(format!("[[webhooks]] url '{}': name is empty", self.url));
        }
        if let Some(path) = &self.ca_file {
            let count = crate::outgoing::read_ca_file(path).map_err(|e| format!("{at}: ca_file: {e}"))?.len();
            if count == 0 {
                return Err(format!("{at}: ca_file {} holds no PEM certificate", path.display()));
            }
        }
        Ok(())
    }
}

/// GitHub's settings. `Debug` redacts the webhook secret and the token.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// The secret GitHub signs deliveries with.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// The GitHub repositories this server builds, as globs (`acme/*`, `other/app`). A delivery
    /// for any other repository is stored and set aside, never built.
    #[serde(default)]
    pub repos: Vec<String>,
    /// The REST API's address (`https://api.github.com`, or a GitHub Enterprise server's).
    /// Repositories not listed under `[[repos]]` are reached through it.
    #[serde(default)]
    pub api_url: Option<String>,
    /// A token (`CIB_GITHUB_TOKEN` overrides), or the App settings below.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub app_id: Option<u64>,
    #[serde(default)]
    pub private_key_path: Option<PathBuf>,
    #[serde(default)]
    pub installation_id: Option<u64>,
    /// Links from commit statuses to builds: `<public_url>/builds/<id>`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Where workspaces are fetched with git: `<git_url>/<owner>/<repo>.git`. Unset, it is
    /// `https://github.com` for the public API and the server's address for a GitHub
    /// Enterprise Server's `https://host/api/v3`; for any other `api_url` (a test's fake),
    /// workspaces are tarballs without `.git`.
    #[serde(default)]
    pub git_url: Option<String>,
    /// How many commits of history a workspace fetch takes (default 50), so that `git
    /// describe` finds a tag that recent.
    #[serde(default)]
    pub clone_depth: Option<u32>,
}

impl GithubConfig {
    /// The base URL workspaces are fetched from with git, if any.
    pub fn git_base(&self) -> Option<String> {
        if let Some(url) = &self.git_url {
            return Some(url.trim_end_matches('/').to_owned());
        }
        let api = self.api_url.as_deref()?.trim_end_matches('/');
        if api == cib_github::client::GITHUB_API {
            return Some("https://github.com".into());
        }
        api.strip_suffix("/api/v3").map(str::to_owned)
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where builds, logs, the inbox and sealed secrets are kept: `sqlite:PATH`, or a
    /// PostgreSQL URL (`postgres://user:password@host:port/database`). Unset, the SQLite file
    /// `<data_dir>/cib.db`. `CIB_STORE` overrides it. `Debug` hides a password in it.
    #[serde(default)]
    pub store: Option<StoreSetting>,
    /// The name on everything this server makes in Docker. Two servers on one daemon need
    /// different names, or each would remove the other's containers as leftovers.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Steps running at once across all builds. Unset, `cib serve` takes what the Docker
    /// executor suggests for its daemon (twice its CPU count); 4 where no executor says.
    #[serde(default)]
    pub max_running_steps: Option<usize>,
    /// Largest request body accepted, in bytes (GitHub sends at most 25 MB).
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub github: GithubConfig,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    #[serde(default)]
    pub repos: Vec<RepoConfig>,
    #[serde(default)]
    pub pools: Vec<PoolFileConfig>,
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// How the inbox retries deliveries that fail.
    #[serde(default)]
    pub inbox: InboxConfig,
    /// Connections served at once; more wait until one closes.
    #[serde(default = "default_connections")]
    pub max_connections: usize,
    /// Seconds a SIGTERM waits for running steps to finish before the server exits anyway,
    /// leaving them running for the next start to re-attach to.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: u64,
    /// Secrets by name, each scoped to repositories (deprecated: the encrypted store,
    /// `cib secret set`, is where secrets belong).
    #[serde(default)]
    pub secrets: BTreeMap<String, ConfigSecret>,
    /// The file holding the key that seals stored secrets; `<data_dir>/secret.key` when not
    /// given. Made, readable by its owner only, on first start.
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    /// The key itself, from `CIB_SECRET_KEY` (never from the file): it wins over the file.
    #[serde(skip)]
    pub secret_key: Option<SecretText>,
    /// People and their identities, so that two identities of one person count once.
    #[serde(default)]
    pub people: Vec<cib_core::policy::Person>,
    /// Defaults and maximums for what specs ask: step and pipeline timeouts, memory,
    /// processes, and the size of a step's log.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The time zone `on: schedule` cron expressions are read in: `UTC` (the default) or a
    /// fixed offset such as `+02:00`.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// The most bytes of caches (`cache:` in specs) kept per repository, such as `"10g"`. A
    /// save that goes past it removes the repository's least recently used caches until the
    /// rest fit. Unset: caches are kept until removed (`cib cache rm`).
    #[serde(default)]
    pub cache_budget: Option<ByteSize>,
    /// Slack and Zulip (`[chat.slack]`, `[chat.zulip]`, `[[chat.repos]]`).
    #[serde(default)]
    pub chat: ChatFileConfig,
    /// `[leadership]`: active/standby servers on one PostgreSQL store.
    #[serde(default)]
    pub leadership: LeadershipConfig,
    /// Remote workers over RabbitMQ (`[broker]`): steps whose `runs_on` asks for another
    /// operating system, or labels the Docker side lacks, run on `cib worker` processes.
    #[serde(default)]
    pub broker: Option<BrokerFileConfig>,
    /// Where steps run: `docker` (the default: every step a container on one daemon) or
    /// `swarm` (every step a Docker Swarm service; see docs/scaling.md).
    #[serde(default)]
    pub executor: ExecutorKind,
    /// `[swarm]`: settings of the Swarm executor.
    #[serde(default)]
    pub swarm: SwarmFileConfig,
    /// `[retention]`: how long logs, events and processed webhook deliveries are kept (all
    /// of them, unless set). See `crate::retention`.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// `[retention]`: what the active server deletes, and how often it looks. A kind left unset
/// is kept for ever (the default).
///
/// ```toml
/// [retention]
/// logs = "30d"      # the logs of builds that finished this long ago
/// events = "30d"    # events this old, once every outgoing webhook receiver has them
/// inbox = "7d"      # processed webhook deliveries received this long ago (never pending or dead ones)
/// every = "1m"      # how often a round runs (the default)
/// batch = 1000      # the most rows of each kind one transaction deletes (the default)
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub logs: Option<Duration>,
    pub events: Option<Duration>,
    pub inbox: Option<Duration>,
    pub every: Duration,
    pub batch: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { logs: None, events: None, inbox: None, every: Duration::from_secs(60), batch: 1_000 }
    }
}

impl RetentionConfig {
    /// Whether anything is ever deleted.
    pub fn enabled(&self) -> bool {
        self.logs.is_some() || self.events.is_some() || self.inbox.is_some()
    }

    fn check(&self) -> Result<(), String> {
        for (key, age) in [("logs", self.logs), ("events", self.events), ("inbox", self.inbox)] {
            if age.is_some_and(|a| a.as_secs() == 0) {
                return Err(format!(
                    "[retention] {key} is 0s: keep things for some time, or leave {key} unset to keep them all"
                ));
            }
        }
        if self.every.as_secs() == 0 {
            return Err("[retention] every is 0s: a round needs a pause after it (\"1m\" is the default)".into());
        }
        if self.batch == 0 || self.batch > 100_000 {
            return Err(format!("[retention] batch is {}: give 1 to 100000 rows per transaction", self.batch));
        }
        Ok(())
    }
}

/// `[leadership]`: how the servers of one PostgreSQL store choose the one that runs the
/// engine (SQLite has one server, and ignores it).
///
/// ```toml
/// [leadership]
/// lease_ms = 3000                      # a holder silent this long loses the lease
/// renew_ms = 1000                      # how often the holder renews (and a standby asks)
/// address = "http://cib-1.internal:8080"  # where standbys send clients (default: http://LISTEN)
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeadershipConfig {
    pub lease_ms: u64,
    pub renew_ms: u64,
    pub address: Option<String>,
}

impl Default for LeadershipConfig {
    fn default() -> Self {
        LeadershipConfig { lease_ms: 3_000, renew_ms: 1_000, address: None }
    }
}

/// `[broker]`: the RabbitMQ that carries jobs to remote workers (see `docs/scaling.md`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFileConfig {
    /// `amqp://user:password@host:5672/vhost`, or `amqps://` with TLS. `CIB_BROKER_URL`
    /// overrides it (so that the password need not be in the file).
    #[serde(default)]
    pub url: String,
    /// The base URL at which workers reach this server's API, `https://cib.example.com`: each
    /// job names it, and workers fetch the workspace and send output and results there.
    pub server_url: String,
    /// Seconds between a worker's heartbeats on a job (5). A job whose worker misses three is
    /// taken over by the next worker the broker hands it to.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: f64,
    /// The operating system of the Docker daemon's steps (`linux`): a step with another
    /// `runs_on.os` goes to the broker.
    #[serde(default = "default_docker_os")]
    pub docker_os: String,
    /// Labels the Docker side has: a step asking for a `runs_on` label not listed here goes to
    /// the broker.
    #[serde(default)]
    pub docker_labels: BTreeMap<String, String>,
    /// How many tries a job gets (3): the first delivery and `max_tries - 1` redeliveries
    /// after a worker was lost; then it is dead-lettered and the step fails with that reason.
    #[serde(default = "default_max_tries")]
    pub max_tries: u32,
}

impl std::fmt::Debug for BrokerFileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL's password never reaches a log line.
        f.debug_struct("BrokerFileConfig")
            .field("url", &cib_worker::broker::redact(&self.url))
            .field("server_url", &self.server_url)
            .field("heartbeat", &self.heartbeat)
            .field("docker_os", &self.docker_os)
            .field("docker_labels", &self.docker_labels)
            .field("max_tries", &self.max_tries)
            .finish()
    }
}

fn default_heartbeat() -> f64 {
    5.0
}

fn default_max_tries() -> u32 {
    cib_worker::protocol::DEFAULT_MAX_TRIES
}

fn default_docker_os() -> String {
    "linux".into()
}

impl BrokerFileConfig {
    /// The executor's settings, its job files under `data_dir`.
    pub fn executor_config(&self, data_dir: &Path) -> cib_worker::BrokerConfig {
        let mut config =
            cib_worker::BrokerConfig::new(self.url.clone(), self.server_url.clone(), data_dir.join("worker-jobs"));
        config.heartbeat = std::time::Duration::from_secs_f64(self.heartbeat);
        config.stale_after = config.heartbeat * 3;
        config.max_tries = self.max_tries;
        config
    }

    /// What the Docker side offers, for routing.
    pub fn local_offer(&self) -> cib_worker::LocalOffer {
        cib_worker::LocalOffer { os: self.docker_os.clone(), labels: self.docker_labels.clone() }
    }

    fn check(&self) -> Result<(), String> {
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err("[broker] url must start with amqp:// or amqps:// (or set CIB_BROKER_URL)".into());
        }
        if !(self.server_url.starts_with("http://") || self.server_url.starts_with("https://")) {
            return Err("[broker] server_url must start with https:// (or http://)".into());
        }
        if !(self.heartbeat.is_finite() && (0.1..=300.0).contains(&self.heartbeat)) {
            return Err("[broker] heartbeat must be between 0.1 and 300 seconds".into());
        }
        let most = cib_worker::protocol::MAX_TRIES_LIMIT;
        if !(1..=most).contains(&self.max_tries) {
            return Err(format!("[broker] max_tries must be between 1 and {most} (it is {})", self.max_tries));
        }
        for (k, v) in &self.docker_labels {
            cib_worker::protocol::check_label_word(k).map_err(|e| format!("[broker] docker_labels: {e}"))?;
            cib_worker::protocol::check_label_word(v).map_err(|e| format!("[broker] docker_labels: {e}"))?;
        }
        Ok(())
    }
}

/// The executor steps run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// One Docker daemon.
    #[default]
    Docker,
    /// A Docker Swarm, through a manager.
    Swarm,
}

/// `[swarm]`: how the Swarm executor reaches its nodes.
///
/// ```toml
/// executor = "swarm"
/// [swarm]
/// helper_image = "busybox"              # fills workspaces: needs sh, ip, wget, tar
/// serve_bind = "0.0.0.0:7070"           # where the workspace server listens
/// serve_address = "10.0.0.5:7070"       # where nodes reach it (unset: the task's gateway)
/// placement_timeout_secs = 30           # a task no node can take fails after this
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmFileConfig {
    #[serde(default)]
    pub helper_image: Option<String>,
    #[serde(default)]
    pub serve_bind: Option<SocketAddr>,
    #[serde(default)]
    pub serve_address: Option<String>,
    #[serde(default)]
    pub placement_timeout_secs: Option<u64>,
}

/// `[chat]`: the chat services cib posts notices to and takes commands from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatFileConfig {
    #[serde(default)]
    pub slack: Option<SlackFileConfig>,
    #[serde(default)]
    pub zulip: Option<ZulipFileConfig>,
    /// Where each repository's notices go.
    #[serde(default)]
    pub repos: Vec<ChatRepoConfig>,
    /// Where notices about no one repository (leases) go.
    #[serde(default)]
    pub default: Option<ChatRepoConfig>,
}

/// `[chat.slack]`. Each credential is named as a secret of cib's encrypted store (`*_secret`,
/// a secret of [`SERVER_SECRETS_REPO`], opened when `cib serve` starts), or by an environment
/// variable (`*_env`, read when the configuration is loaded), or, least well, given in the
/// file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackFileConfig {
    #[serde(default)]
    pub bot_token: Option<SecretText>,
    #[serde(default)]
    pub bot_token_env: Option<String>,
    #[serde(default)]
    pub bot_token_secret: Option<String>,
    #[serde(default)]
    pub signing_secret: Option<SecretText>,
    #[serde(default)]
    pub signing_secret_env: Option<String>,
    #[serde(default)]
    pub signing_secret_secret: Option<String>,
    /// Slack's Web API; another only for tests.
    #[serde(default = "default_slack_api")]
    pub api_url: String,
    /// Where Slack's `response_url`s point; an answer goes to no other address, so that a
    /// request cannot make cib post elsewhere.
    #[serde(default = "default_slack_responses")]
    pub response_url_prefix: String,
}

impl Default for SlackFileConfig {
    fn default() -> Self {
        SlackFileConfig {
            bot_token: None,
            bot_token_env: None,
            bot_token_secret: None,
            signing_secret: None,
            signing_secret_env: None,
            signing_secret_secret: None,
            api_url: default_slack_api(),
            response_url_prefix: default_slack_responses(),
        }
    }
}

fn default_slack_api() -> String {
    "https://slack.com/api".into()
}

fn default_slack_responses() -> String {
    "https://hooks.slack.com/".into()
}

/// `[chat.zulip]`, whose credentials come as `[chat.slack]`'s do.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZulipFileConfig {
    /// The organisation's address, `https://chat.example.com`.
    pub site: String,
    pub bot_email: String,
    #[serde(default)]
    pub api_key: Option<SecretText>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub api_key_secret: Option<String>,
    /// The outgoing webhook's token, which Zulip puts in each payload.
    #[serde(default)]
    pub webhook_token: Option<SecretText>,
    #[serde(default)]
    pub webhook_token_env: Option<String>,
    #[serde(default)]
    pub webhook_token_secret: Option<String>,
}

/// The repository the server's own credentials are stored under in the encrypted secret store
/// (`cib secret set _cib/server SLACK_BOT_TOKEN`). No forge can have a repository of that name
/// (GitHub's owners cannot begin with `_`), `[[repos]]` may not take it, and no build is ever
/// given its secrets, so a credential stored there reaches the server and nothing else.
pub const SERVER_SECRETS_REPO: &str = "_cib/server";

/// `[[chat.repos]]`: one repository's Slack channel and Zulip stream and topic.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRepoConfig {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub stream: Option<String>,
    #[serde(default)]
    pub topic: Option<String>,
}

impl std::fmt::Debug for SlackFileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackFileConfig")
            .field("bot_token", &redacted(&self.bot_token))
            .field("bot_token_env", &self.bot_token_env)
            .field("bot_token_secret", &self.bot_token_secret)
            .field("signing_secret", &redacted(&self.signing_secret))
            .field("signing_secret_env", &self.signing_secret_env)
            .field("signing_secret_secret", &self.signing_secret_secret)
            .field("api_url", &self.api_url)
            .finish()
    }
}

impl std::fmt::Debug for ZulipFileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZulipFileConfig")
            .field("site", &self.site)
            .field("bot_email", &self.bot_email)
            .field("api_key", &redacted(&self.api_key))
            .field("api_key_env", &self.api_key_env)
            .field("api_key_secret", &self.api_key_secret)
            .field("webhook_token", &redacted(&self.webhook_token))
            .field("webhook_token_env", &self.webhook_token_env)
            .field("webhook_token_secret", &self.webhook_token_secret)
            .finish()
    }
}

/// A credential from the file, or from the environment variable it names; the error names
/// the setting and the variable, never a value. One named as a stored secret (`secret`) is
/// opened later, by [`ChatFileConfig::open_secrets`], when the store can be read.
fn credential(
    value: &mut Option<SecretText>,
    var: &Option<String>,
    secret: &Option<String>,
    env: &BTreeMap<String, String>,
    what: &str,
) -> Result<(), String> {
    let given = [value.is_some(), var.is_some(), secret.is_some()].into_iter().filter(|g| *g).count();
    if given > 1 {
        return Err(format!("{what}: give one of {what}, {what}_env and {what}_secret"));
    }
    if let Some(name) = secret {
        // Stored secrets are named like environment variables; another name cannot be there.
        let mut chars = name.chars();
        let env_like = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !env_like {
            return Err(format!(
                "{what}_secret: '{name}' is not a secret's name (they are named like environment variables)"
            ));
        }
        return Ok(());
    }
    if let Some(var) = var {
        match env.get(var) {
            Some(v) if !v.is_empty() => *value = Some(SecretText(v.clone())),
            _ => return Err(format!("{what}_env names {var}, which is not set")),
        }
    }
    if value.as_ref().is_none_or(|v| v.0.is_empty()) {
        return Err(format!(
            "{what} is missing (give {what}_secret, a secret stored with `cib secret set {SERVER_SECRETS_REPO} NAME`, or {what}_env, the environment variable holding it)"
        ));
    }
    Ok(())
}

impl ChatFileConfig {
    /// Reads the credentials named by environment variables, and checks that each is there.
    fn resolve(&mut self, env: &BTreeMap<String, String>) -> Result<(), String> {
        if let Some(s) = &mut self.slack {
            credential(&mut s.bot_token, &s.bot_token_env, &s.bot_token_secret, env, "[chat.slack] bot_token")?;
            credential(
                &mut s.signing_secret,
                &s.signing_secret_env,
                &s.signing_secret_secret,
                env,
                "[chat.slack] signing_secret",
            )?;
        }
        if let Some(z) = &mut self.zulip {
            credential(&mut z.api_key, &z.api_key_env, &z.api_key_secret, env, "[chat.zulip] api_key")?;
            credential(
                &mut z.webhook_token,
                &z.webhook_token_env,
                &z.webhook_token_secret,
                env,
                "[chat.zulip] webhook_token",
            )?;
        }
        for r in &self.repos {
            if r.name.is_empty() {
                return Err("[[chat.repos]]: an entry has no name".into());
            }
        }
        Ok(())
    }

    /// The environment variables the credentials name, so that `cib serve` reads those and no
    /// others of its environment.
    pub fn env_names(&self) -> Vec<String> {
        let slack = self.slack.iter().flat_map(|s| [&s.bot_token_env, &s.signing_secret_env]);
        let zulip = self.zulip.iter().flat_map(|z| [&z.api_key_env, &z.webhook_token_env]);
        slack.chain(zulip).flatten().cloned().collect()
    }

    /// Opens the credentials named as stored secrets (`*_secret`) with the server's key. The
    /// error names the setting and the secret, never a value.
    pub async fn open_secrets(
        &mut self,
        store: &dyn cib_core::ports::SecretStore,
        key: Result<cib_core::ports::SecretKey, String>,
    ) -> Result<(), String> {
        let mut wanted: Vec<(&mut Option<SecretText>, &str, String)> = Vec::new();
        if let Some(s) = &mut self.slack {
            if let Some(n) = &s.bot_token_secret {
                wanted.push((&mut s.bot_token, "[chat.slack] bot_token_secret", n.clone()));
            }
            if let Some(n) = &s.signing_secret_secret {
                wanted.push((&mut s.signing_secret, "[chat.slack] signing_secret_secret", n.clone()));
            }
        }
        if let Some(z) = &mut self.zulip {
            if let Some(n) = &z.api_key_secret {
                wanted.push((&mut z.api_key, "[chat.zulip] api_key_secret", n.clone()));
            }
            if let Some(n) = &z.webhook_token_secret {
                wanted.push((&mut z.webhook_token, "[chat.zulip] webhook_token_secret", n.clone()));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let key = key.map_err(|e| format!("[chat]: the stored credentials cannot be opened: {e}"))?;
        let stored = store
            .open_secrets(&key, SERVER_SECRETS_REPO)
            .await
            .map_err(|e| format!("[chat]: the stored credentials cannot be opened: {e}"))?;
        for (value, what, name) in wanted {
            let Some(secret) = stored.iter().find(|s| s.info.name == name) else {
                return Err(format!(
                    "{what} names {name}, which is not stored: store it with `cib secret set {SERVER_SECRETS_REPO} {name}`"
                ));
            };
            *value = Some(SecretText(secret.value.expose().to_owned()));
        }
        Ok(())
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_instance() -> String {
    "cib-server".into()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("cib-data")
}

fn default_connections() -> usize {
    1024
}

fn default_shutdown_grace() -> u64 {
    30
}

/// Steps running at once when neither the configuration nor the executor says.
pub const DEFAULT_RUNNING_STEPS: usize = 4;

fn default_body_limit() -> usize {
    25 * 1024 * 1024
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            data_dir: default_data_dir(),
            store: None,
            instance: default_instance(),
            max_running_steps: None,
            max_body_bytes: default_body_limit(),
            github: GithubConfig::default(),
            tokens: Vec::new(),
            repos: Vec::new(),
            pools: Vec::new(),
            webhooks: Vec::new(),
            secrets: BTreeMap::new(),
            inbox: InboxConfig::default(),
            max_connections: default_connections(),
            shutdown_grace: default_shutdown_grace(),
            secret_key_file: None,
            secret_key: None,
            people: Vec::new(),
            limits: LimitsConfig::default(),
            time_zone: None,
            cache_budget: None,
            chat: ChatFileConfig::default(),
            leadership: LeadershipConfig::default(),
            broker: None,
            executor: ExecutorKind::Docker,
            swarm: SwarmFileConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

impl ServerConfig {
    /// The zone schedules are read in: `time_zone`, else UTC. [`ServerConfig::load`] has
    /// checked it; one built in code that does not parse is UTC.
    pub fn schedule_zone(&self) -> chrono::FixedOffset {
        self.time_zone
            .as_deref()
            .and_then(|z| cib_core::schedule::parse_zone(z).ok())
            .unwrap_or_else(|| chrono::FixedOffset::east_opt(0).expect("UTC is a valid offset"))
    }
}

/// `[limits]`: what specs get when they say nothing, and the most they may ask for. Every
/// key is optional; see [`LimitsConfig::resolve`] for what an absent one means.
///
/// ```toml
/// [limits]
/// step_timeout = "1h"          # a step without `timeout` gets this
/// max_step_timeout = "6h"      # a spec asking more is refused
/// pipeline_timeout = "3h"
/// max_pipeline_timeout = "12h"
/// memory = "2g"
/// max_memory = "8g"
/// pids = 1024
/// max_pids = 4096
/// log_size = "64m"             # bytes of a step's log kept (head and tail)
/// max_matrix_cells = 256       # the most cells one matrix step may make
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub step_timeout: Option<Duration>,
    pub max_step_timeout: Option<Duration>,
    pub pipeline_timeout: Option<Duration>,
    pub max_pipeline_timeout: Option<Duration>,
    pub memory: Option<Memory>,
    pub max_memory: Option<Memory>,
    pub pids: Option<u32>,
    pub max_pids: Option<u32>,
    pub log_size: Option<ByteSize>,
    pub max_matrix_cells: Option<u32>,
}

/// A number of bytes: a whole number, or text with a `k`, `m` or `g` suffix (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("invalid size '{text}': write it like 64m, 512k or 1g");
        let t = text.trim().to_ascii_lowercase();
        let t = t.strip_suffix('b').unwrap_or(&t);
        let (digits, shift) = match t.as_bytes().last() {
            Some(b'k') => (&t[..t.len() - 1], 10),
            Some(b'm') => (&t[..t.len() - 1], 20),
            Some(b'g') => (&t[..t.len() - 1], 30),
            Some(_) => (t, 0),
            None => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(1 << shift).map(ByteSize).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(d)? {
            Written::Bytes(n) => Ok(ByteSize(n)),
            Written::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// The smallest log a step may keep: room for an error message and the lines before it.
pub const MIN_LOG_SIZE: u64 = 64 << 10;

impl LimitsConfig {
    /// The limits as the spec reader and the machine take them. An absent default is the
    /// built-in one ([`OperatorLimits::builtin`]: a step runs an hour, 2 GiB, 1024 processes),
    /// lowered to the maximum when one is set below it; a pipeline has no default timeout
    /// unless a maximum is set, which is then the default. An absent maximum caps nothing,
    /// except the step timeout, whose built-in maximum is a day.
    pub fn resolve(&self) -> Result<OperatorLimits, String> {
        // The values as written, so that the message names the key the operator wrote.
        for (key, value) in [
            ("step_timeout", self.step_timeout),
            ("max_step_timeout", self.max_step_timeout),
            ("pipeline_timeout", self.pipeline_timeout),
            ("max_pipeline_timeout", self.max_pipeline_timeout),
        ] {
            if value.is_some_and(|d| d.as_secs() == 0) {
                return Err(format!("[limits] {key} must be longer than 0s"));
            }
        }
        for (key, value) in [("pids", self.pids), ("max_pids", self.max_pids)] {
            if value.is_some_and(|n| n < 8) {
                return Err(format!(
                    "[limits] {key} must be at least 8: a shell and its commands need a few processes"
                ));
            }
        }
        let builtin = OperatorLimits::builtin();
        let step = bound(
            "step_timeout",
            self.step_timeout,
            self.max_step_timeout.or(builtin.step_timeout.max),
            builtin.step_timeout.default,
            Duration::to_string,
        )?;
        let pipeline = bound(
            "pipeline_timeout",
            self.pipeline_timeout,
            self.max_pipeline_timeout,
            builtin.pipeline_timeout.default,
            Duration::to_string,
        )?;
        let memory =
            bound("memory", self.memory.map(|m| m.0), self.max_memory.map(|m| m.0), builtin.memory.default, |b| {
                cib_core::spec::limits::show_bytes(*b)
            })?;
        let pids = bound("pids", self.pids, self.max_pids, builtin.pids.default, u32::to_string)?;
        if self.max_matrix_cells == Some(0) {
            return Err("[limits] max_matrix_cells must be at least 1".into());
        }
        Ok(OperatorLimits {
            step_timeout: step,
            pipeline_timeout: pipeline,
            memory,
            pids,
            max_matrix_cells: self.max_matrix_cells,
        })
    }

    /// The bytes of a step's log the store keeps (its head and its tail): `log_size`, else the
    /// store's default of 64 MiB.
    pub fn log_size(&self) -> u64 {
        self.log_size.map_or(cib_core::ports::DEFAULT_LOG_LIMIT, |s| s.0)
    }
}

/// One value's default and maximum. The default given must not be over the maximum; the
/// built-in default is lowered to it; with no default at all, the maximum is the default, so
/// that a spec saying nothing is still held to it.
fn bound<T: Copy + Ord>(
    key: &str,
    default: Option<T>,
    max: Option<T>,
    builtin: Option<T>,
    show: impl Fn(&T) -> String,
) -> Result<Bound<T>, String> {
    let default = match (default, max) {
        (Some(d), Some(m)) if d > m => {
            return Err(format!(
                "[limits] {key} is {}, over max_{key} ({}): a spec that says nothing would get more than one may ask for",
                show(&d),
                show(&m)
            ));
        }
        (Some(d), _) => Some(d),
        (None, Some(m)) => Some(builtin.map_or(m, |b| b.min(m))),
        (None, None) => builtin,
    };
    Ok(Bound::new(default, max))
}

/// How the inbox retries a delivery whose processing failed: after `retry_base_ms`, doubling
/// up to `retry_max_ms`, for at most `max_attempts` attempts, then it is set aside as dead.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxConfig {
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub max_attempts: u32,
    /// Deliveries processed at once, of different repositories (deliveries of one repository
    /// go one at a time, in arrival order). Processing mostly waits on the engine and the
    /// store, so this is well above the cores.
    pub concurrency: usize,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig { retry_base_ms: 1_000, retry_max_ms: 600_000, max_attempts: 8, concurrency: 32 }
    }
}

impl ServerConfig {
    /// Reads the file (when given), then applies the environment.
    pub fn load(path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                Self::parse(&text).map_err(|e| format!("{}: {e}", p.display()))?
            }
            None => ServerConfig::default(),
        };
        if let Some(listen) = env.get("CIB_LISTEN") {
            config.listen = listen.parse().map_err(|e| format!("CIB_LISTEN '{listen}': {e}"))?;
        }
        if let Some(dir) = env.get("CIB_DATA_DIR") {
            config.data_dir = PathBuf::from(dir);
        }
        if let Some(store) = env.get("CIB_STORE") {
            config.store = Some(StoreSetting(store.clone()));
        }
        if let Some(secret) = env.get("CIB_GITHUB_WEBHOOK_SECRET") {
            config.github.webhook_secret = Some(secret.clone());
        }
        if let Some(token) = env.get("CIB_GITHUB_TOKEN") {
            config.github.token = Some(token.clone());
        }
        if let Some(key) = env.get("CIB_SECRET_KEY") {
            config.secret_key = Some(SecretText(key.clone()));
        }
        config.chat.resolve(env)?;
        if let (Some(broker), Some(url)) = (config.broker.as_mut(), env.get("CIB_BROKER_URL")) {
            broker.url = url.clone();
        }
        config.check()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn check(&self) -> Result<(), String> {
        self.store_location()?;
        if let Some(broker) = &self.broker {
            broker.check()?;
        }
        for t in &self.tokens {
            match &t.token_sha256 {
                None if t.token.len() < 16 => {
                    return Err(format!("the token of '{}' is shorter than 16 characters", t.name));
                }
                None => {}
                Some(_) if !t.token.is_empty() => {
                    return Err(format!("the token of '{}' has both token and token_sha256: give one", t.name));
                }
                Some(digest) if digest_bytes(digest).is_none() => {
                    return Err(format!("token_sha256 of '{}' is not 64 hexadecimal digits", t.name));
                }
                Some(_) => {}
            }
        }
        for g in &self.github.repos {
            cib_core::spec::Glob::parse(g).map_err(|e| format!("[github] repos: '{g}': {e}"))?;
        }
        let LeadershipConfig { lease_ms, renew_ms, .. } = self.leadership;
        if renew_ms == 0 || lease_ms < 2 * renew_ms {
            return Err(format!(
                "[leadership] renew_ms is {renew_ms} and lease_ms {lease_ms}: renew at least once a millisecond \
                 and at least twice per lease, or a holder loses its lease between two renewals"
            ));
        }
        self.retention.check()?;
        if self.inbox.max_attempts == 0 || self.inbox.concurrency == 0 {
            return Err("[inbox] max_attempts and concurrency must be at least 1".into());
        }
        for (name, secret) in &self.secrets {
            secret.check(name)?;
        }
        if let Err(problems) = cib_core::policy::People::new(self.people.clone()) {
            return Err(format!("[[people]]: {}", problems.join("; ")));
        }
        let mut receivers = std::collections::BTreeSet::new();
        for hook in &self.webhooks {
            hook.check()?;
            if !receivers.insert(hook.receiver()) {
                return Err(format!(
                    "[[webhooks]]: two receivers are named '{}'; give each a distinct name = \"...\" (it keys the \
                     receiver's place in the event stream)",
                    hook.receiver()
                ));
            }
        }
        self.limits.resolve()?;
        if let Some(zone) = &self.time_zone {
            cib_core::schedule::parse_zone(zone).map_err(|e| format!("time_zone: {e}"))?;
        }
        if self.limits.log_size() < MIN_LOG_SIZE {
            return Err(format!(
                "[limits] log_size is {} bytes; a step's log keeps at least {MIN_LOG_SIZE} bytes (64k)",
                self.limits.log_size()
            ));
        }
        if let Some(r) = self.repos.iter().find(|r| r.name.starts_with("_cib/")) {
            return Err(format!(
                "[[repos]] '{}': names under _cib/ are kept for the server's own credentials ({SERVER_SECRETS_REPO})",
                r.name
            ));
        }
        for p in &self.pools {
            if p.units.is_empty() == p.capacity.is_none() {
                return Err(format!("pool '{}' needs either units or a capacity", p.name));
            }
        }
        Ok(())
    }

    /// Whether this server builds `repo`: a `[[repos]]` entry, or a match of `[github] repos`.
    pub fn serves(&self, repo: &str) -> bool {
        self.repos.iter().any(|r| r.name == repo)
            || self.github.repos.iter().any(|g| cib_core::spec::Glob::parse(g).is_ok_and(|g| g.is_match(repo)))
    }

    /// Where the store is: `store` (or `CIB_STORE`) read, else the SQLite file in the data
    /// directory.
    pub fn store_location(&self) -> Result<StoreLocation, String> {
        match &self.store {
            None => Ok(StoreLocation::Sqlite(self.data_dir.join("cib.db"))),
            Some(setting) => StoreLocation::parse(&setting.0).map_err(|e| format!("store: {e}")),
        }
    }

    /// Where the key that seals stored secrets lives.
    pub fn secret_key_path(&self) -> PathBuf {
        self.secret_key_file.clone().unwrap_or_else(|| self.data_dir.join("secret.key"))
    }

    /// The people directory. [`ServerConfig::load`] has checked it; a configuration built in
    /// code that fails the check gets an empty directory, so nobody is merged with anyone.
    pub fn people_directory(&self) -> cib_core::policy::People {
        cib_core::policy::People::new(self.people.clone()).unwrap_or_default()
    }

    /// The operator's limits. [`ServerConfig::load`] has checked them; a configuration built
    /// in code whose limits do not resolve gets the built-in ones.
    pub fn operator_limits(&self) -> OperatorLimits {
        self.limits.resolve().unwrap_or_else(|_| OperatorLimits::builtin())
    }

    /// The pools as the lease table takes them.
    pub fn lease_pools(&self) -> Vec<PoolConfig> {
        self.pools
            .iter()
            .map(|p| PoolConfig {
                name: p.name.clone(),
                kind: match p.capacity {
                    Some(capacity) => PoolKind::Counting { capacity },
                    None => PoolKind::Units(
                        p.units.iter().map(|u| Unit { name: u.name.clone(), metadata: u.metadata.clone() }).collect(),
                    ),
                },
            })
            .collect()
    }
}

/// A secret in the configuration file: `[secrets.NAME]` with `value` and the `repos` it
/// belongs to, optionally narrowed to `branches`, `pipelines` and `environments`. The old
/// flat form (`NAME = "value"`) is refused: it gave every repository the secret.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum ConfigSecret {
    Scoped(ScopedSecret),
    Flat(String),
}

/// The fields of `[secrets.NAME]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedSecret {
    pub value: String,
    #[serde(default)]
    pub repos: Vec<String>,
    #[serde(default)]
    pub branches: Vec<cib_core::spec::Glob>,
    #[serde(default)]
    pub pipelines: Vec<String>,
    #[serde(default)]
    pub environments: Vec<String>,
}

impl ConfigSecret {
    fn check(&self, name: &str) -> Result<(), String> {
        match self {
            ConfigSecret::Flat(_) => Err(format!(
                "[secrets] {name}: a secret needs the repositories it belongs to; write [secrets.{name}] with \
                 value = \"...\" and repos = [\"owner/name\"], or better, store it with `cib secret set`"
            )),
            ConfigSecret::Scoped(s) if s.repos.is_empty() => Err(format!(
                "[secrets.{name}] needs repos = [\"owner/name\", ...]: without it every repository would get it"
            )),
            ConfigSecret::Scoped(s) if s.value.len() < cib_core::ports::MIN_SECRET_LEN => Err(format!(
                "[secrets.{name}] is {} bytes long: values shorter than {} bytes cannot be masked safely in logs",
                s.value.len(),
                cib_core::ports::MIN_SECRET_LEN
            )),
            ConfigSecret::Scoped(_) => Ok(()),
        }
    }

    /// The secret's scopes, one per repository, and its value; nothing for the refused form.
    pub fn scopes(&self) -> Vec<(cib_core::policy::SecretScope, &str)> {
        match self {
            ConfigSecret::Flat(_) => Vec::new(),
            ConfigSecret::Scoped(s) => s
                .repos
                .iter()
                .map(|repo| {
                    let scope = cib_core::policy::SecretScope {
                        repo: repo.clone(),
                        branches: s.branches.clone(),
                        pipelines: s.pipelines.clone(),
                        environments: s.environments.clone(),
                    };
                    (scope, s.value.as_str())
                })
                .collect(),
        }
    }
}

/// The 32 bytes of a `token_sha256`, when it is 64 hexadecimal digits.
pub fn digest_bytes(hex_digest: &str) -> Option<[u8; 32]> {
    hex::decode(hex_digest.trim()).ok().and_then(|v| <[u8; 32]>::try_from(v).ok())
}

// `Debug` of the configuration shows its shape and never a token, secret or key: configs
// end up in logs and panic messages.

const REDACTED: &str = "<redacted>";

/// The `store` setting as written. `Debug` shows it without a password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct StoreSetting(pub String);

impl std::fmt::Debug for StoreSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StoreSetting").field(&cib_store::redact_url(&self.0)).finish()
    }
}

/// Where the server keeps its store.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file, made when missing.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by its URL (which may hold a password).
    Postgres(String),
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            StoreLocation::Postgres(url) => f.debug_tuple("Postgres").field(&cib_store::redact_url(url)).finish(),
        }
    }
}

impl StoreLocation {
    /// Reads `sqlite:PATH`, `postgres://...` or `postgresql://...`; anything else is an error
    /// that says what is accepted.
    pub fn parse(text: &str) -> Result<StoreLocation, String> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("'sqlite:' needs a file: sqlite:/var/lib/cib/cib.db".into());
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(StoreLocation::Postgres(text.to_owned()));
        }
        Err(format!("'{}' is neither sqlite:PATH nor a postgres:// URL", cib_store::redact_url(text)))
    }
}

/// Text that must not be shown: `Debug` redacts it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

fn redacted<T>(value: &Option<T>) -> Option<&'static str> {
    value.as_ref().map(|_| REDACTED)
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &REDACTED)
            .field("token_sha256", &redacted(&self.token_sha256))
            .field("role", &self.role)
            .field("teams", &self.teams)
            .finish()
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &REDACTED)
            .field("name", &self.name)
            .field("allow_private", &self.allow_private)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl std::fmt::Debug for RepoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoConfig")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("webhook_secret", &redacted(&self.webhook_secret))
            .finish()
    }
}

impl std::fmt::Debug for GithubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubConfig")
            .field("webhook_secret", &redacted(&self.webhook_secret))
            .field("api_url", &self.api_url)
            .field("token", &redacted(&self.token))
            .field("repos", &self.repos)
            .field("app_id", &self.app_id)
            .field("private_key_path", &self.private_key_path)
            .field("installation_id", &self.installation_id)
            .field("public_url", &self.public_url)
            .field("git_url", &self.git_url)
            .field("clone_depth", &self.clone_depth)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ConfigSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSecret::Flat(_) => f.write_str("Flat(<redacted>)"),
            ConfigSecret::Scoped(s) => s.fmt(f),
        }
    }
}

impl std::fmt::Debug for ScopedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedSecret")
            .field("value", &REDACTED)
            .field("repos", &self.repos)
            .field("branches", &self.branches)
            .field("pipelines", &self.pipelines)
            .field("environments", &self.environments)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executor_is_docker_unless_the_file_says_swarm() {
        let plain = ServerConfig::parse("data_dir = \"/srv/cib\"\n").expect("valid");
        assert_eq!(plain.executor, ExecutorKind::Docker);
        let swarm = ServerConfig::parse(
            "executor = \"swarm\"\n[swarm]\nhelper_image = \"busybox\"\nserve_bind = \"0.0.0.0:7070\"\n\
             serve_address = \"10.0.0.5:7070\"\nplacement_timeout_secs = 5\n",
        )
        .expect("valid");
        assert_eq!(swarm.executor, ExecutorKind::Swarm);
        assert_eq!(swarm.swarm.serve_address.as_deref(), Some("10.0.0.5:7070"));
        assert_eq!(swarm.swarm.placement_timeout_secs, Some(5));
        assert!(ServerConfig::parse("executor = \"kubernetes\"\n").is_err());
        assert!(ServerConfig::parse("[swarm]\nserve_adress = \"x\"\n").is_err(), "unknown keys are refused");
    }

    #[test]
    fn the_store_is_sqlite_in_the_data_dir_unless_set_in_the_file_or_cib_store() {
        let plain = ServerConfig::parse("data_dir = \"/srv/cib\"\n").expect("valid");
        assert_eq!(plain.store_location(), Ok(StoreLocation::Sqlite(PathBuf::from("/srv/cib/cib.db"))));
        let pg = ServerConfig::parse("store = \"postgres://cib:pw@db:5432/cib\"\n").expect("valid");
        assert_eq!(pg.store_location(), Ok(StoreLocation::Postgres("postgres://cib:pw@db:5432/cib".into())));
        // Debug never shows the password, in the setting or the location.
        assert!(!format!("{pg:?}").contains("pw"), "{pg:?}");
        assert!(!format!("{:?}", pg.store_location()).contains("pw"));
        let env: BTreeMap<String, String> =
            [("CIB_STORE".to_owned(), "sqlite:/tmp/other.db".to_owned())].into_iter().collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cib.toml");
        std::fs::write(&file, "store = \"postgresql://db/cib\"\n").expect("write");
        let overridden = ServerConfig::load(Some(&file), &env).expect("valid");
        assert_eq!(overridden.store_location(), Ok(StoreLocation::Sqlite(PathBuf::from("/tmp/other.db"))));
        // Anything else is refused when the configuration loads, saying what is accepted.
        std::fs::write(&file, "store = \"mysql://u:secretpw@db/cib\"\n").expect("write");
        let error = ServerConfig::load(Some(&file), &BTreeMap::new()).expect_err("refused");
        assert!(error.contains("neither sqlite:PATH nor a postgres:// URL"), "{error}");
        assert!(!error.contains("secretpw"), "{error}");
        assert!(StoreLocation::parse("sqlite:").is_err());
    }

    fn limits(toml_text: &str) -> Result<OperatorLimits, String> {
        let config = ServerConfig::parse(toml_text)?;
        config.check()?;
        config.limits.resolve()
    }

    #[test]
    fn every_key_of_limits_is_read() {
        let config = ServerConfig::parse(
            r#"
[limits]
step_timeout = "10m"
max_step_timeout = "6h"
pipeline_timeout = "3h"
max_pipeline_timeout = "12h"
memory = "1g"
max_memory = "8g"
pids = 256
max_pids = 4096
log_size = "16m"
max_matrix_cells = 64
"#,
        )
        .expect("valid");
        let l = config.limits.resolve().expect("resolves");
        assert_eq!(l.step_timeout, Bound::new(Some(Duration::from_secs(600)), Some(Duration::from_secs(6 * 3600))));
        assert_eq!(
            l.pipeline_timeout,
            Bound::new(Some(Duration::from_secs(3 * 3600)), Some(Duration::from_secs(12 * 3600)))
        );
        assert_eq!(l.memory, Bound::new(Some(1 << 30), Some(8 << 30)));
        assert_eq!(l.pids, Bound::new(Some(256), Some(4096)));
        assert_eq!(l.max_cells(), 64);
        assert_eq!(config.limits.log_size(), 16 << 20);
        assert_eq!(config.operator_limits(), l);
    }

    #[test]
    fn absent_keys_take_the_built_in_values_lowered_to_a_given_maximum() {
        assert_eq!(limits("").expect("empty"), OperatorLimits::builtin());
        assert_eq!(ServerConfig::default().limits.log_size(), cib_core::ports::DEFAULT_LOG_LIMIT);
        let l = limits("[limits]\nmax_step_timeout = \"30m\"\nmax_pipeline_timeout = \"2h\"\nmax_memory = \"512m\"")
            .expect("valid");
        assert_eq!(l.step_timeout.default, Some(Duration::from_secs(1800)), "the built-in hour, lowered");
        assert_eq!(l.pipeline_timeout.default, Some(Duration::from_secs(7200)), "a maximum alone is the default");
        assert_eq!(l.memory.default, Some(512 << 20));
        assert_eq!(l.pids, Bound::new(Some(1024), None));
        let raised = limits("[limits]\nmax_step_timeout = \"3d\"").expect("valid");
        assert_eq!(raised.step_timeout.default, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let cases = [
            ("[limits]\nstep_timeout = \"soon\"", "invalid duration 'soon'"),
            ("[limits]\nmax_memory = \"lots\"", "invalid memory size 'lots'"),
            ("[limits]\npids = \"many\"", "pids"),
            ("[limits]\nlog_size = \"big\"", "invalid size 'big'"),
            ("[limits]\nstep_timout = \"1h\"", "step_timout"),
            (
                "[limits]\nstep_timeout = \"2h\"\nmax_step_timeout = \"1h\"",
                "step_timeout is 2h, over max_step_timeout (1h)",
            ),
            ("[limits]\nstep_timeout = \"2d\"", "step_timeout is 2d, over max_step_timeout (1d)"),
            ("[limits]\nmemory = \"8g\"\nmax_memory = \"4g\"", "memory is 8g, over max_memory (4g)"),
            ("[limits]\nmax_pipeline_timeout = \"0s\"", "max_pipeline_timeout must be longer than 0s"),
            ("[limits]\npids = 4", "[limits] pids must be at least 8"),
            ("[limits]\nlog_size = 100", "[limits] log_size is 100 bytes"),
        ];
        for (text, want) in cases {
            let error = limits(text).expect_err(text);
            assert!(error.contains(want), "{text}: {error}");
        }
        // A TOML error says where; the key is on the line it shows.
        let error = limits("[limits]\nstep_timeout = \"soon\"").expect_err("bad");
        assert!(error.contains("step_timeout = \"soon\""), "{error}");
    }

    #[test]
    fn retention_is_off_unless_set_and_bad_values_name_the_key() {
        let off = ServerConfig::parse("").expect("empty");
        assert!(!off.retention.enabled());
        assert!(off.check().is_ok());
        let on = ServerConfig::parse("[retention]\nlogs = \"30d\"\ninbox = \"7d\"\nbatch = 500").expect("valid");
        assert_eq!(on.retention.logs.map(|d| d.as_secs()), Some(30 * 86_400));
        assert_eq!(on.retention.inbox.map(|d| d.as_secs()), Some(7 * 86_400));
        assert_eq!(on.retention.events, None);
        assert_eq!((on.retention.every.as_secs(), on.retention.batch), (60, 500));
        assert!(on.check().is_ok());
        let cases = [
            ("[retention]\nlogs = \"a month\"", "logs = \"a month\""),
            ("[retention]\nevents = 30", "events"),
            ("[retention]\ninbox = \"0s\"", "[retention] inbox is 0s"),
            ("[retention]\nevery = \"0s\"", "[retention] every is 0s"),
            ("[retention]\nbatch = 0", "[retention] batch is 0"),
            ("[retention]\nlog = \"1d\"", "log"),
        ];
        for (text, want) in cases {
            let error = ServerConfig::parse(text).and_then(|c| c.check().map(|()| c)).expect_err(text);
            assert!(error.contains(want), "{text}: {error}");
        }
    }

    /// The `[retention]` example of docs/operations.md loads with the values it shows.
    #[test]
    fn the_documented_retention_example_loads() {
        let doc = include_str!("../../docs/operations.md");
        let from = doc.find("<!-- retention -->").expect("the example is marked");
        let start = from + doc[from..].find("```toml\n").expect("a toml block") + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("its end");
        let config = ServerConfig::parse(&doc[start..end]).unwrap_or_else(|e| panic!("{e}"));
        config.check().expect("valid");
        let r = &config.retention;
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs());
        assert_eq!(
            (secs(r.logs), secs(r.events), secs(r.inbox)),
            (Some(30 * 86_400), Some(30 * 86_400), Some(7 * 86_400))
        );
        assert_eq!((r.every.as_secs(), r.batch), (60, 1_000));
    }

    #[test]
    fn sizes_are_read_with_their_suffixes() {
        assert_eq!(ByteSize::parse("64m"), Ok(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("512K"), Ok(ByteSize(512 << 10)));
        assert_eq!(ByteSize::parse("1gb"), Ok(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("1000"), Ok(ByteSize(1000)));
        assert!(ByteSize::parse("").is_err());
        assert!(ByteSize::parse("99999999999g").is_err(), "overflow is refused");
        let config = ServerConfig::parse("[limits]\nlog_size = 1048576").expect("an integer is bytes");
        assert_eq!(config.limits.log_size(), 1 << 20);
    }
}

#[cfg(test)]
mod broker_tests {
    use super::*;

    /// The `[broker]` example of docs/scaling.md, as written there.
    fn documented() -> String {
        let doc = include_str!("../../docs/scaling.md");
        let start = doc.find("```toml\n[broker]").expect("the example") + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("its end");
        doc[start..end].to_owned()
    }

    #[test]
    fn the_documented_broker_section_loads_and_the_url_comes_from_the_environment() {
        let config = ServerConfig::parse(&documented()).expect("parses");
        let broker = config.broker.clone().expect("[broker]");
        assert_eq!(broker.server_url, "https://cib.example.com");
        assert_eq!(broker.heartbeat, 5.0);
        assert_eq!(broker.docker_os, "linux");
        assert!(format!("{broker:?}").contains("cib:***@"), "the password stays out of Debug");
        let executor = broker.executor_config(Path::new("/var/lib/cib"));
        assert_eq!(executor.stale_after, std::time::Duration::from_secs(15));
        assert_eq!(executor.state_dir, Path::new("/var/lib/cib/worker-jobs"));
        assert_eq!(executor.max_tries, 3, "three tries, as the example says");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("cib.toml");
        std::fs::write(&path, documented()).expect("write");
        let env = BTreeMap::from([("CIB_BROKER_URL".to_owned(), "amqp://other@127.0.0.1:5672/%2f".to_owned())]);
        let loaded = ServerConfig::load(Some(&path), &env).expect("loads");
        assert_eq!(loaded.broker.expect("[broker]").url, "amqp://other@127.0.0.1:5672/%2f");
    }

    #[test]
    fn a_bad_broker_section_is_refused_with_the_reason() {
        let bad = |text: &str| ServerConfig::parse(text).expect("parses").check().expect_err("refused");
        assert!(bad("[broker]\nurl = \"http://x\"\nserver_url = \"https://c\"\n").contains("amqp://"));
        assert!(bad("[broker]\nurl = \"amqp://x\"\nserver_url = \"c\"\n").contains("server_url"));
        assert!(bad("[broker]\nurl = \"amqp://x\"\nserver_url = \"https://c\"\nheartbeat = 0\n").contains("heartbeat"));
        assert!(bad("[broker]\nurl = \"amqp://x\"\nserver_url = \"https://c\"\nmax_tries = 0\n").contains("max_tries"));
        assert!(
            bad("[broker]\nurl = \"amqp://x\"\nserver_url = \"https://c\"\nmax_tries = 101\n").contains("max_tries")
        );
        assert!(ServerConfig::parse("[broker]\nurl = \"amqp://x\"\nserverurl = \"https://c\"\n").is_err());
    }
}
