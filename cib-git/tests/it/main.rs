//! The local Git backend against real repositories made with the git command.

use std::path::Path;
use std::process::Command;

use cib_core::ports::{Comparison, Permission, Vcs, VcsError};
use cib_git::{GitVcs, WorkingTree};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn commit(dir: &Path, file: &str, content: &str) -> String {
    std::fs::write(dir.join(file), content).expect("write");
    git(dir, &["add", file]);
    git(dir, &["commit", "-q", "-m", &format!("change {file}")]);
    git(dir, &["rev-parse", "HEAD"])
}

/// A repository with `master` (two commits, the second adding the spec) and `feature`
/// branched from master's first commit with one commit of its own.
fn repo() -> (tempfile::TempDir, String, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    git(dir.path(), &["init", "-q", "-b", "master"]);
    let first = commit(dir.path(), "README", "hello\n");
    let second = commit(dir.path(), ".cib.yml", "pipelines: {}\n");
    git(dir.path(), &["checkout", "-q", "-b", "feature", &first]);
    let feature = commit(dir.path(), "feature.txt", "new\n");
    git(dir.path(), &["checkout", "-q", "master"]);
    (dir, first, second, feature)
}

#[tokio::test]
async fn reads_the_spec_at_a_revision() {
    let (dir, first, second, _) = repo();
    let vcs = GitVcs::new().with_repo("acme/shop", dir.path());
    assert_eq!(vcs.read_spec("acme/shop", "master").await.expect("read"), Some("pipelines: {}\n".into()));
    assert_eq!(vcs.read_spec("acme/shop", &second).await.expect("read"), Some("pipelines: {}\n".into()));
    assert_eq!(vcs.read_spec("acme/shop", &first).await.expect("read"), None, "no spec before it was added");
    let err = vcs.read_spec("acme/shop", "nope").await.expect_err("unknown revision");
    assert!(matches!(err, VcsError::Permanent(_)), "{err:?}");
    assert!(vcs.read_spec("/nonexistent/repo", "master").await.is_err());
}

#[tokio::test]
async fn prepares_a_workspace_at_the_commit() {
    let (dir, _, _, feature) = repo();
    let vcs = GitVcs::new();
    let repo = dir.path().to_string_lossy().into_owned();
    let dest = tempfile::tempdir().expect("temp dir");
    let ws = dest.path().join("ws");
    vcs.prepare_workspace(&repo, &feature, &ws).await.expect("prepare");
    assert_eq!(std::fs::read_to_string(ws.join("feature.txt")).expect("file"), "new\n");
    assert!(!ws.join(".cib.yml").exists(), "the feature branch has no spec");
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), feature);
}

#[tokio::test]
async fn compares_revisions() {
    let (dir, first, second, feature) = repo();
    let vcs = GitVcs::new().with_repo("r", dir.path());
    assert_eq!(vcs.compare("r", "master", "feature").await.expect("compare"), Comparison { ahead: 1, behind: 1 });
    assert_eq!(vcs.compare("r", &first, &second).await.expect("compare"), Comparison { ahead: 1, behind: 0 });
    assert!(vcs.compare("r", &first, &second).await.expect("compare").can_fast_forward());
    assert!(!vcs.compare("r", "master", &feature).await.expect("compare").can_fast_forward());
}

#[tokio::test]
async fn moves_branches_by_fast_forward_only() {
    let (dir, first, second, feature) = repo();
    let vcs = GitVcs::new().with_repo("r", dir.path());
    vcs.fast_forward("r", "production", &first).await.expect("a new branch may start anywhere");
    vcs.fast_forward("r", "production", &second).await.expect("fast-forward");
    assert_eq!(vcs.resolve("r", "production").await.expect("resolve"), second);
    let err = vcs.fast_forward("r", "production", &feature).await.expect_err("diverged");
    assert!(err.to_string().contains("not a fast-forward"), "{err}");
    assert_eq!(vcs.resolve("r", "production").await.expect("resolve"), second, "a refused move changes nothing");
    assert!(vcs.fast_forward("r", "bad..name", &second).await.is_err());
}

#[tokio::test]
async fn works_on_a_bare_repository() {
    let (dir, _, second, _) = repo();
    let bare = tempfile::tempdir().expect("temp dir");
    let bare_path = bare.path().join("shop.git");
    git(Path::new("."), &["clone", "-q", "--bare", &dir.path().to_string_lossy(), &bare_path.to_string_lossy()]);
    let vcs = GitVcs::new().with_repo("shop", &bare_path);
    assert_eq!(vcs.resolve("shop", "master").await.expect("resolve"), second);
    assert!(vcs.read_spec("shop", "master").await.expect("read").is_some());
    let ws = bare.path().join("ws");
    vcs.prepare_workspace("shop", "master", &ws).await.expect("prepare");
    assert!(ws.join("README").exists());
}

#[tokio::test]
async fn permissions_are_configured() {
    let vcs = GitVcs::new().with_permission("alice", Permission::Admin);
    assert_eq!(vcs.permission("r", "alice").await.expect("permission"), Permission::Admin);
    assert_eq!(vcs.permission("r", "bob").await.expect("permission"), Permission::None);
    let open = GitVcs::new().with_default_permission(Permission::Write);
    assert_eq!(open.permission("r", "bob").await.expect("permission"), Permission::Write);
}

#[tokio::test]
async fn a_working_tree_is_copied_as_it_is() {
    let (dir, _, _, _) = repo();
    std::fs::write(dir.path().join(".gitignore"), "target/\n").expect("write");
    std::fs::write(dir.path().join("untracked.txt"), "draft\n").expect("write");
    std::fs::write(dir.path().join("README"), "edited\n").expect("write");
    std::fs::create_dir_all(dir.path().join("target")).expect("mkdir");
    std::fs::write(dir.path().join("target/big.bin"), "ignored").expect("write");
    std::fs::write(dir.path().join("run.sh"), "#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(dir.path().join("run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::create_dir_all(dir.path().join(".cib-data")).expect("mkdir");
    std::fs::write(dir.path().join(".cib-data/cib.db"), "data").expect("write");
    let tree = WorkingTree::new(dir.path()).excluding(dir.path().join(".cib-data"));
    assert_eq!(tree.read_spec("", "").await.expect("read"), Some("pipelines: {}\n".into()));
    let dest = tempfile::tempdir().expect("temp dir");
    tree.prepare_workspace("", "", dest.path()).await.expect("copy");
    assert_eq!(std::fs::read_to_string(dest.path().join("README")).expect("file"), "edited\n", "edits are included");
    assert!(dest.path().join("untracked.txt").exists(), "untracked files are included");
    assert!(!dest.path().join("target/big.bin").exists(), "ignored files are not");
    assert!(!dest.path().join(".git").exists());
    assert!(!dest.path().join(".cib-data").exists(), "excluded paths are not copied");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dest.path().join("run.sh")).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o111, 0o111, "scripts stay executable");
}

#[tokio::test]
async fn a_plain_directory_is_copied_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("src")).expect("mkdir");
    std::fs::write(dir.path().join("src/main.sh"), "echo\n").expect("write");
    let tree = WorkingTree::new(dir.path());
    assert_eq!(tree.read_spec("", "").await.expect("read"), None);
    let dest = tempfile::tempdir().expect("temp dir");
    tree.prepare_workspace("", "", dest.path()).await.expect("copy");
    assert!(dest.path().join("src/main.sh").exists());
}
