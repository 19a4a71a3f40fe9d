//! A working tree as it is on disk, for `cib run`: the spec and the files a person is editing,
//! committed or not, so that what passes locally is what they are about to push.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use cib_core::ports::{Comparison, Permission, Vcs, VcsError};
use cib_core::spec;

use crate::{GitVcs, git};

/// The files of a directory as they are now: tracked and untracked, but not ignored ones
/// when the directory is a Git working tree; every file otherwise.
#[derive(Debug, Clone)]
pub struct WorkingTree {
    root: PathBuf,
    git: GitVcs,
    /// Paths under the root that are never copied (cib's own data directory, say).
    exclude: Vec<PathBuf>,
}

impl WorkingTree {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        WorkingTree { git: GitVcs::new().with_repo("", &root), root, exclude: Vec::new() }
    }

    /// Never copies `path` (absolute, or relative to the root) or anything under it.
    pub fn excluding(mut self, path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        let relative = path.strip_prefix(&self.root).unwrap_or(path);
        if relative.is_relative() {
            self.exclude.push(relative.to_path_buf());
        }
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Relative paths of the files to copy, in a stable order.
    pub async fn files(&self) -> Result<Vec<PathBuf>, VcsError> {
        let listed = git(&self.root, &["ls-files", "-z", "--cached", "--others", "--exclude-standard"]).await;
        let mut files: Vec<PathBuf> = match listed {
            Ok(out) => out
                .split(|b| *b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
                // A tracked file deleted in the working tree is not part of it any more.
                .filter(|p| self.root.join(p).symlink_metadata().is_ok())
                .collect(),
            Err(_) => walk(&self.root)
                .map_err(|e| VcsError::Transient(format!("cannot list {}: {e}", self.root.display())))?,
        };
        files.retain(|f| !self.exclude.iter().any(|x| f.starts_with(x)));
        files.sort();
        files.dedup();
        Ok(files)
    }
}

/// Every file under `root`, except version control directories.
fn walk(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for entry in std::fs::read_dir(root.join(&rel))? {
            let entry = entry?;
            let name = entry.file_name();
            if name == ".git" {
                continue;
            }
            let path = rel.join(&name);
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

fn copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let meta = from.symlink_metadata()?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else {
        // `fs::copy` keeps the permission bits, so scripts stay executable.
        std::fs::copy(from, to).map(|_| ())
    }
}

#[async_trait]
impl Vcs for WorkingTree {
    async fn read_spec(&self, _repo: &str, _rev: &str) -> Result<Option<String>, VcsError> {
        match tokio::fs::read_to_string(self.root.join(spec::FILE_NAME)).await {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(VcsError::Transient(format!("cannot read {}: {e}", spec::FILE_NAME))),
        }
    }

    async fn prepare_workspace(&self, _repo: &str, _rev: &str, dest: &Path) -> Result<(), VcsError> {
        let files = self.files().await?;
        let root = self.root.clone();
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dest)?;
            for file in files {
                copy(&root.join(&file), &dest.join(&file))?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| VcsError::Transient(format!("copying the working tree stopped: {e}")))?
        .map_err(|e| VcsError::Transient(format!("cannot copy the working tree: {e}")))
    }

    async fn compare(&self, _repo: &str, base: &str, head: &str) -> Result<Comparison, VcsError> {
        self.git.compare("", base, head).await
    }

    async fn fast_forward(&self, _repo: &str, branch: &str, to: &str) -> Result<(), VcsError> {
        self.git.fast_forward("", branch, to).await
    }

    async fn resolve(&self, _repo: &str, rev: &str) -> Result<String, VcsError> {
        self.git.resolve("", rev).await
    }

    /// The person at the keyboard owns their working tree.
    async fn permission(&self, _repo: &str, _user: &str) -> Result<Permission, VcsError> {
        Ok(Permission::Admin)
    }
}
