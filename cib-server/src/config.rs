//! The server's configuration: a TOML file, with environment overrides for what operators set
//! per deployment (`CIB_LISTEN`, `CIB_DATA_DIR`, `CIB_GITHUB_WEBHOOK_SECRET`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cib_core::lease::{PoolConfig, PoolKind, Unit};
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

/// A bearer token and the identity it stands for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who the token belongs to: the name events and decisions record.
    pub name: String,
    pub token: String,
    pub role: Role,
    /// Teams the holder belongs to, for gates that name teams.
    #[serde(default)]
    pub teams: Vec<String>,
}

/// A repository the server builds, as the forge names it, and where its Git data lives.
#[derive(Debug, Clone, Deserialize)]
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

/// A URL that receives every event, signed with HMAC-SHA256.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
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
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The name on everything this server makes in Docker. Two servers on one daemon need
    /// different names, or each would remove the other's containers as leftovers.
    #[serde(default = "default_instance")]
    pub instance: String,
    #[serde(default = "default_running")]
    pub max_running_steps: usize,
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
    /// Secret values by name, for the steps that ask for them.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
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

fn default_running() -> usize {
    4
}

fn default_body_limit() -> usize {
    25 * 1024 * 1024
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            data_dir: default_data_dir(),
            instance: default_instance(),
            max_running_steps: default_running(),
            max_body_bytes: default_body_limit(),
            github: GithubConfig::default(),
            tokens: Vec::new(),
            repos: Vec::new(),
            pools: Vec::new(),
            webhooks: Vec::new(),
            secrets: BTreeMap::new(),
            inbox: InboxConfig::default(),
        }
    }
}

/// How the inbox retries a delivery whose processing failed: after `retry_base_ms`, doubling
/// up to `retry_max_ms`, for at most `max_attempts` attempts, then it is set aside as dead.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxConfig {
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub max_attempts: u32,
    /// Repositories processed at once (deliveries of one repository go in arrival order).
    pub concurrency: usize,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig { retry_base_ms: 1_000, retry_max_ms: 600_000, max_attempts: 8, concurrency: 8 }
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
        if let Some(secret) = env.get("CIB_GITHUB_WEBHOOK_SECRET") {
            config.github.webhook_secret = Some(secret.clone());
        }
        if let Some(token) = env.get("CIB_GITHUB_TOKEN") {
            config.github.token = Some(token.clone());
        }
        config.check()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn check(&self) -> Result<(), String> {
        for t in &self.tokens {
            if t.token.len() < 16 {
                return Err(format!("the token of '{}' is shorter than 16 characters", t.name));
            }
        }
        for g in &self.github.repos {
            cib_core::spec::Glob::parse(g).map_err(|e| format!("[github] repos: '{g}': {e}"))?;
        }
        if self.inbox.max_attempts == 0 || self.inbox.concurrency == 0 {
            return Err("[inbox] max_attempts and concurrency must be at least 1".into());
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
