//! The server's secrets: the key that seals them, and the engine's `Secrets` port over the
//! encrypted store and the scoped `[secrets]` of the configuration. Which secret a build gets
//! is decided by `cib_core::policy::check_secret` on the build's facts, here and nowhere else.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use cib_core::policy::{BuildFacts, SecretScope, check_secret};
use cib_core::ports::{SecretKey, SecretStore, Secrets, StepSecrets};

use crate::config::ServerConfig;

/// Where the key comes from: the environment wins over the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `CIB_SECRET_KEY`: a rekey cannot change it, so the new key must be given.
    Environment,
    /// A key file, made on first start and replaced by a rekey.
    File(PathBuf),
}

/// Loads the key: `CIB_SECRET_KEY` when set, else the key file, made with mode 0600 when it
/// does not exist yet. Errors name the file or the variable.
pub fn load_key(config: &ServerConfig) -> Result<SecretKey, String> {
    match &config.secret_key {
        Some(text) => cib_store::parse_key(&text.0, "CIB_SECRET_KEY").map_err(|e| e.to_string()),
        None => cib_store::load_or_create_key_file(&config.secret_key_path()).map_err(|e| e.to_string()),
    }
}

/// Loads the key and checks that it opens the secrets already stored (one repository's are
/// enough: a store holds one key's secrets, as setting and rekeying make sure).
pub async fn check_key(config: &ServerConfig, store: &dyn SecretStore) -> Result<(), String> {
    let key = load_key(config)?;
    let stored = store.list_secrets(None).await.map_err(|e| e.to_string())?;
    if let Some(first) = stored.first() {
        store.open_secrets(&key, &first.scope.repo).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The current key, shared by the engine's port and the API (which replaces it on rekey).
/// A key that could not be loaded is kept as its error, so that builds without secrets still
/// run and every use of a secret says why it cannot be had.
#[derive(Debug)]
pub struct Keyring {
    key: RwLock<Result<SecretKey, String>>,
    pub source: KeySource,
    /// Held through a rekey, so that two never interleave.
    pub rekeying: tokio::sync::Mutex<()>,
}

impl Keyring {
    pub fn load(config: &ServerConfig) -> Self {
        let source = match config.secret_key {
            Some(_) => KeySource::Environment,
            None => KeySource::File(config.secret_key_path()),
        };
        Keyring { key: RwLock::new(load_key(config)), source, rekeying: tokio::sync::Mutex::new(()) }
    }

    /// The key, or why there is none.
    pub fn current(&self) -> Result<SecretKey, String> {
        match self.key.read() {
            Ok(k) => k.clone(),
            Err(_) => Err("the secret key's lock is poisoned; restart the server".into()),
        }
    }

    /// Replaces the key after a rekey.
    pub fn replace(&self, key: SecretKey) {
        if let Ok(mut k) = self.key.write() {
            *k = Ok(key);
        }
    }
}

/// A secret from the configuration file, with its scope.
#[derive(Clone)]
struct ConfigEntry {
    name: String,
    scope: SecretScope,
    value: String,
}

/// The engine's `Secrets` port: stored secrets first, then the configuration's.
pub struct ServerSecrets {
    store: Arc<dyn SecretStore>,
    keys: Arc<Keyring>,
    config: Vec<ConfigEntry>,
}

impl std::fmt::Debug for ServerSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and scopes only: values never reach a log line.
        let configured: Vec<(&str, &str)> =
            self.config.iter().map(|c| (c.name.as_str(), c.scope.repo.as_str())).collect();
        f.debug_struct("ServerSecrets")
            .field("keys", &self.keys)
            .field("configured", &configured)
            .finish_non_exhaustive()
    }
}

impl ServerSecrets {
    pub fn new(config: &ServerConfig, store: Arc<dyn SecretStore>, keys: Arc<Keyring>) -> Self {
        let mut entries = Vec::new();
        for (name, secret) in &config.secrets {
            for (scope, value) in secret.scopes() {
                entries.push(ConfigEntry { name: name.clone(), scope, value: value.to_owned() });
            }
        }
        if !entries.is_empty() {
            tracing::warn!(
                "secrets in the configuration file are deprecated: store them with `cib secret set` \
                 (encrypted, and never in a file others may read)"
            );
        }
        ServerSecrets { store, keys, config: entries }
    }
}

#[async_trait]
impl Secrets for ServerSecrets {
    async fn for_step(&self, build: &BuildFacts<'_>, asked: &[String]) -> Result<StepSecrets, String> {
        // The server's own credentials (chat tokens) are stored under a repository no build
        // may have; this holds even if one were somehow started for it.
        if build.repo == crate::config::SERVER_SECRETS_REPO {
            let mut out = StepSecrets::default();
            for name in asked {
                out.withheld.push((name.clone(), "the server's own credentials are given to no build".into()));
            }
            return Ok(out);
        }
        let stored = match self.keys.current() {
            Ok(key) => self.store.open_secrets(&key, build.repo).await.map_err(|e| e.to_string())?,
            // Without a key, only the configuration's secrets can be had; a stored one the
            // step asks for is withheld with the reason below.
            Err(_) if self.store.list_secrets(Some(build.repo)).await.map(|l| l.is_empty()).unwrap_or(false) => {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let mut out = StepSecrets::default();
        for name in asked {
            let candidates = stored
                .iter()
                .filter(|s| &s.info.name == name)
                .map(|s| (&s.info.scope, s.value.expose()))
                .chain(self.config.iter().filter(|c| &c.name == name).map(|c| (&c.scope, c.value.as_str())));
            let mut reasons = Vec::new();
            let mut found = None;
            for (scope, value) in candidates {
                match check_secret(scope, build, true) {
                    Ok(()) => {
                        found = Some(value);
                        break;
                    }
                    Err(denied) => {
                        reasons.extend(denied.iter().map(ToString::to_string));
                    }
                }
            }
            match found {
                Some(value) => {
                    out.values.insert(name.clone(), value.to_owned());
                }
                None if reasons.is_empty() => {
                    out.withheld.push((name.clone(), format!("no secret of that name is stored for {}", build.repo)));
                }
                None => {
                    reasons.dedup();
                    out.withheld.push((name.clone(), reasons.join("; ")));
                }
            }
        }
        Ok(out)
    }
}

/// Creates a directory (and its parents) readable by its owner only (mode 0700), as the data
/// directory holds the database and the key. An existing directory is left as it is.
pub fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

/// Creates an empty file readable by its owner only (mode 0600) when it does not exist, so
/// that SQLite opens it, and makes its journal files, with that mode rather than the umask's.
pub fn create_private_file(path: &std::path::Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}
