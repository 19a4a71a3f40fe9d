//! Records the commit `cib` is built from, for `cib --version`.
//!
//! The commit comes from `CIB_BUILD_COMMIT` when it is set (a container build or a source
//! tarball has no `.git`, but its builder knows the commit), else from `git` in the source tree,
//! else it is `unknown`: a build never fails for want of Git. No "modified" mark: this script
//! reruns only when HEAD moves, so a mark would go stale with the next edit and the version
//! would lie.

use std::path::{Path, PathBuf};

include!("build/version.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/version.rs");
    println!("cargo:rerun-if-env-changed=CIB_BUILD_COMMIT");
    let here = Path::new(".");
    let given = std::env::var("CIB_BUILD_COMMIT").ok();
    if given.as_deref().is_none_or(|g| g.trim().is_empty()) {
        watch_head(here);
    }
    println!("cargo:rustc-env=CIB_BUILD_COMMIT_TEXT={}", commit_text(here, given.as_deref()));
}

/// Reruns this script when HEAD moves: HEAD itself (a checkout) and the branch it points at (a
/// commit), wherever this repository or worktree keeps them. A path that does not exist would
/// make cargo rerun the script on every build, so only existing files are named.
fn watch_head(dir: &Path) {
    for name in ["HEAD", "packed-refs"] {
        if let Some(path) = git_in(dir, &["rev-parse", "--git-path", name]).map(PathBuf::from)
            && path.exists()
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    if let Some(reference) = git_in(dir, &["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git_in(dir, &["rev-parse", "--git-path", &reference]).map(PathBuf::from)
        && path.exists()
    {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
