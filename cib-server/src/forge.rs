//! Which forge serves which repository: local Git repositories listed in the configuration,
//! and GitHub (through its API) for the rest when it is configured.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use cib_core::ports::{Comparison, Notifier, Permission, Store, Vcs, VcsError};
use cib_git::GitVcs;
use cib_github::{Auth, GithubClient, GithubNotifier, GithubVcs, NotifierConfig};

use crate::config::ServerConfig;

/// Local repositories by name; every other one on GitHub, when GitHub is configured.
pub struct Forges {
    local: GitVcs,
    names: Vec<String>,
    github: Option<GithubVcs>,
}

impl std::fmt::Debug for Forges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forges").field("local", &self.names).field("github", &self.github.is_some()).finish()
    }
}

/// The GitHub client the configuration asks for, if any.
pub fn github_client(config: &ServerConfig) -> Result<Option<GithubClient>, String> {
    let g = &config.github;
    let Some(url) = &g.api_url else { return Ok(None) };
    let auth = match (&g.token, g.app_id, &g.private_key_path, g.installation_id) {
        (Some(token), _, _, _) => Auth::Token(token.clone()),
        // Without installation_id, each repository's installation is found through GitHub.
        (None, Some(app_id), Some(key), installation_id) => {
            let private_key_pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
            Auth::App { app_id, private_key_pem, installation_id }
        }
        _ => return Err("[github] api_url needs a token, or app_id and private_key_path".into()),
    };
    GithubClient::new(url, auth).map(Some).map_err(|e| e.to_string())
}

impl Forges {
    pub fn new(config: &ServerConfig, github: Option<GithubClient>) -> Self {
        let mut local = GitVcs::new();
        for repo in &config.repos {
            local = local.with_repo(repo.name.clone(), repo.path.clone());
        }
        Forges {
            local,
            names: config.repos.iter().map(|r| r.name.clone()).collect(),
            github: github.map(|client| {
                let vcs = GithubVcs::new(client);
                match config.github.git_base() {
                    Some(base) => {
                        vcs.with_git(&base, config.github.clone_depth.unwrap_or(cib_github::vcs::DEFAULT_CLONE_DEPTH))
                    }
                    None => vcs,
                }
            }),
        }
    }

    fn pick(&self, repo: &str) -> &dyn Vcs {
        match &self.github {
            Some(github) if !self.names.iter().any(|n| n == repo) => github,
            _ => &self.local,
        }
    }
}

/// The notifier that reports to GitHub, with its outbox under the data directory: check runs
/// for an App (their summaries read the failing steps' logs from `store`), commit statuses for
/// a token.
pub fn github_notifier(
    config: &ServerConfig,
    client: GithubClient,
    store: Option<Arc<dyn Store>>,
) -> Result<Arc<dyn Notifier>, String> {
    let dir = config.data_dir.join("github-outbox");
    let notifier_config = NotifierConfig { target_url: config.github.public_url.clone(), ..NotifierConfig::default() };
    let notifier = GithubNotifier::new(client, &dir, notifier_config).map_err(|e| e.to_string())?;
    Ok(Arc::new(match store {
        Some(store) => notifier.with_store(store),
        None => notifier,
    }))
}

#[async_trait]
impl Vcs for Forges {
    async fn read_spec(&self, repo: &str, rev: &str) -> Result<Option<String>, VcsError> {
        self.pick(repo).read_spec(repo, rev).await
    }

    async fn prepare_workspace(&self, repo: &str, rev: &str, dest: &Path) -> Result<(), VcsError> {
        self.pick(repo).prepare_workspace(repo, rev, dest).await
    }

    async fn compare(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, VcsError> {
        self.pick(repo).compare(repo, base, head).await
    }

    async fn fast_forward(&self, repo: &str, branch: &str, to: &str) -> Result<(), VcsError> {
        self.pick(repo).fast_forward(repo, branch, to).await
    }

    async fn resolve(&self, repo: &str, rev: &str) -> Result<String, VcsError> {
        self.pick(repo).resolve(repo, rev).await
    }

    async fn permission(&self, repo: &str, user: &str) -> Result<Permission, VcsError> {
        self.pick(repo).permission(repo, user).await
    }

    async fn approving_reviews(&self, repo: &str, pull: u64, head: &str) -> Result<Option<Vec<String>>, VcsError> {
        self.pick(repo).approving_reviews(repo, pull, head).await
    }

    async fn author(&self, repo: &str, rev: &str) -> Result<Option<String>, VcsError> {
        self.pick(repo).author(repo, rev).await
    }
    async fn on_branch(&self, repo: &str, commit: &str) -> Result<Option<bool>, VcsError> {
        self.pick(repo).on_branch(repo, commit).await
    }

    async fn default_branch(&self, repo: &str) -> Result<Option<String>, VcsError> {
        self.pick(repo).default_branch(repo).await
    }

    async fn team_member(&self, repo: &str, team: &str, user: &str) -> Result<Option<bool>, VcsError> {
        self.pick(repo).team_member(repo, team, user).await
    }
}
