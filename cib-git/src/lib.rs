//! cib's `Vcs` port on plain Git repositories on disk (a working tree or a bare repository),
//! through the `git` command.
//!
//! The `git` command is the reference implementation of Git: using it rather than a library
//! means every repository format, hook and configuration a team has works as it does for them.
//! Repositories are named by path, or by names mapped to paths. Branches move only by
//! fast-forward, with a compare-and-swap on the old value, so a concurrent push is never lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use cib_core::ports::{Comparison, Permission, Vcs, VcsError};
use cib_core::spec;
use tokio::process::Command;

mod working_tree;
pub use working_tree::WorkingTree;

/// Git repositories on this machine.
#[derive(Debug, Clone, Default)]
pub struct GitVcs {
    repos: BTreeMap<String, PathBuf>,
    permissions: BTreeMap<String, Permission>,
    default_permission: Option<Permission>,
}

impl GitVcs {
    /// Repositories are named by their path.
    pub fn new() -> Self {
        GitVcs::default()
    }

    /// Names a repository: `repo` arguments equal to `name` mean `path`.
    pub fn with_repo(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.repos.insert(name.into(), path.into());
        self
    }

    /// A user's permission. Local repositories have no users of their own, so permissions
    /// are configured here; users not listed get `default_permission` (none unless set).
    pub fn with_permission(mut self, user: impl Into<String>, permission: Permission) -> Self {
        self.permissions.insert(user.into(), permission);
        self
    }

    pub fn with_default_permission(mut self, permission: Permission) -> Self {
        self.default_permission = Some(permission);
        self
    }

    fn path(&self, repo: &str) -> PathBuf {
        self.repos.get(repo).cloned().unwrap_or_else(|| PathBuf::from(repo))
    }
}

/// Runs `git` in `dir` and returns its standard output.
pub(crate) async fn git(dir: &Path, args: &[&str]) -> Result<Vec<u8>, VcsError> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        // A repository's own configuration must not make git ask questions or page output.
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_PAGER", "cat")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VcsError::Misconfigured("the git command is not installed".into()),
            _ => VcsError::Transient(format!("cannot run git: {e}")),
        })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let message = format!("git {}: {stderr}", args.first().copied().unwrap_or_default());
    // Unknown revisions and paths will not appear by asking again; lock contention may pass.
    if stderr.contains("index.lock") || stderr.contains("cannot lock ref") {
        Err(VcsError::Transient(message))
    } else {
        Err(VcsError::Permanent(message))
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

impl GitVcs {
    async fn commit_of(&self, repo: &str, rev: &str) -> Result<String, VcsError> {
        let dir = self.path(repo);
        if !dir.exists() {
            return Err(VcsError::Permanent(format!("no repository at {}", dir.display())));
        }
        let spec = format!("{rev}^{{commit}}");
        git(&dir, &["rev-parse", "--verify", "--quiet", "--end-of-options", &spec])
            .await
            .map(text)
            .map_err(|_| VcsError::Permanent(format!("no commit '{rev}' in {}", dir.display())))
    }
}

#[async_trait]
impl Vcs for GitVcs {
    async fn read_spec(&self, repo: &str, rev: &str) -> Result<Option<String>, VcsError> {
        let commit = self.commit_of(repo, rev).await?;
        let dir = self.path(repo);
        let object = format!("{commit}:{}", spec::FILE_NAME);
        if git(&dir, &["cat-file", "-e", &object]).await.is_err() {
            return Ok(None);
        }
        let bytes = git(&dir, &["cat-file", "blob", &object]).await?;
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| VcsError::Permanent(format!("{} at {commit} is not UTF-8 text", spec::FILE_NAME)))
    }

    async fn prepare_workspace(&self, repo: &str, rev: &str, dest: &Path) -> Result<(), VcsError> {
        let commit = self.commit_of(repo, rev).await?;
        let source = self.path(repo);
        tokio::fs::create_dir_all(dest)
            .await
            .map_err(|e| VcsError::Transient(format!("cannot create {}: {e}", dest.display())))?;
        // A clone keeps `.git` in the workspace, as build tools that read versions from tags
        // expect; `--no-hardlinks` keeps the build from touching the source's objects.
        let source_text = source.to_string_lossy().into_owned();
        let dest_text = dest.to_string_lossy().into_owned();
        git(Path::new("."), &["clone", "--quiet", "--no-hardlinks", "--no-checkout", "--", &source_text, &dest_text])
            .await?;
        git(dest, &["checkout", "--quiet", "--detach", &commit]).await?;
        Ok(())
    }

    async fn compare(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, VcsError> {
        let base = self.commit_of(repo, base).await?;
        let head = self.commit_of(repo, head).await?;
        let range = format!("{base}...{head}");
        let counts = text(git(&self.path(repo), &["rev-list", "--left-right", "--count", &range]).await?);
        let mut parts = counts.split_whitespace().map(str::parse::<u32>);
        match (parts.next(), parts.next()) {
            (Some(Ok(behind)), Some(Ok(ahead))) => Ok(Comparison { ahead, behind }),
            _ => Err(VcsError::Transient(format!("unexpected rev-list output: {counts}"))),
        }
    }

    async fn fast_forward(&self, repo: &str, branch: &str, to: &str) -> Result<(), VcsError> {
        let dir = self.path(repo);
        let target = self.commit_of(repo, to).await?;
        let reference = format!("refs/heads/{branch}");
        git(&dir, &["check-ref-format", &reference])
            .await
            .map_err(|_| VcsError::Permanent(format!("'{branch}' is not a valid branch name")))?;
        let current = git(&dir, &["rev-parse", "--verify", "--quiet", &reference]).await.ok().map(text);
        let old = match current {
            Some(old) => {
                if git(&dir, &["merge-base", "--is-ancestor", &old, &target]).await.is_err() {
                    return Err(VcsError::Permanent(format!(
                        "refusing to move {branch} from {old} to {target}: it is not a fast-forward"
                    )));
                }
                old
            }
            // A branch that does not exist yet may be created at any commit.
            None => "0000000000000000000000000000000000000000".to_owned(),
        };
        // The old value makes the update a compare-and-swap: a push in between is not lost.
        let message = format!("cib: fast-forward {branch} to {target}");
        git(&dir, &["update-ref", "-m", &message, &reference, &target, &old]).await.map(|_| ())
    }

    async fn resolve(&self, repo: &str, rev: &str) -> Result<String, VcsError> {
        self.commit_of(repo, rev).await
    }

    /// The author's name: local repositories have no accounts, so names stand for people.
    async fn author(&self, repo: &str, rev: &str) -> Result<Option<String>, VcsError> {
        let commit = self.commit_of(repo, rev).await?;
        let name = text(git(&self.path(repo), &["log", "-1", "--format=%an", &commit]).await?);
        Ok((!name.is_empty()).then_some(name))
    }

    /// The branch `HEAD` names: in a bare repository, the one a clone checks out.
    async fn default_branch(&self, repo: &str) -> Result<Option<String>, VcsError> {
        let dir = self.path(repo);
        if !dir.exists() {
            return Err(VcsError::Permanent(format!("no repository at {}", dir.display())));
        }
        // A detached HEAD names no branch; that is not an error, only an unknown.
        Ok(git(&dir, &["symbolic-ref", "--quiet", "--short", "HEAD"]).await.ok().map(text).filter(|b| !b.is_empty()))
    }

    async fn on_branch(&self, repo: &str, commit: &str) -> Result<Option<bool>, VcsError> {
        let commit = self.commit_of(repo, commit).await?;
        let branches = text(git(&self.path(repo), &["branch", "--contains", &commit, "--format=%(refname)"]).await?);
        Ok(Some(!branches.is_empty()))
    }

    async fn permission(&self, _repo: &str, user: &str) -> Result<Permission, VcsError> {
        Ok(self.permissions.get(user).copied().or(self.default_permission).unwrap_or(Permission::None))
    }
}
