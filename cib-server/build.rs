//! Records the commit `cib` is built from, for `cib --version`.
//!
//! The commit comes from `CIB_BUILD_COMMIT` when it is set (a container build or a source
//! tarball has no `.git`, but its builder knows the commit), else from `git` in the source tree,
//! else it is `unknown`: a build never fails for want of Git.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CIB_BUILD_COMMIT");
    let given = std::env::var("CIB_BUILD_COMMIT").ok().map(|c| c.trim().to_owned()).filter(|c| !c.is_empty());
    let (commit, date) = match given {
        Some(commit) => (commit, None),
        None => match git(&["rev-parse", "--short=12", "HEAD"]) {
            Some(commit) => {
                watch_head();
                // No "modified" mark: this script reruns only when HEAD moves, so a mark
                // would go stale with the next edit and the version would lie.
                (commit, git(&["log", "-1", "--format=%cs", "HEAD"]))
            }
            None => ("unknown".to_owned(), None),
        },
    };
    let text = match date {
        Some(date) => format!("commit {commit}, {date}"),
        None => format!("commit {commit}"),
    };
    println!("cargo:rustc-env=CIB_BUILD_COMMIT_TEXT={text}");
}

/// Reruns this script when HEAD moves: HEAD itself (a checkout) and the branch it points at (a
/// commit), wherever this repository or worktree keeps them. A path that does not exist would
/// make cargo rerun the script on every build, so only existing files are named.
fn watch_head() {
    for name in ["HEAD", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name]).map(PathBuf::from)
            && path.exists()
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &reference]).map(PathBuf::from)
        && path.exists()
    {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
