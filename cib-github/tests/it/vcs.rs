//! `GithubVcs` against the fake GitHub.

use cib_core::ports::{ErrorKind, Permission, Vcs};
use cib_github::GithubVcs;
use cib_github::client::{Auth, GithubClient};
use cib_github::testing::{FakeGithub, TEST_TOKEN};

struct Setup {
    fake: FakeGithub,
    vcs: GithubVcs,
    first: String,
    second: String,
}

/// `o/r` with `main` at `second`, whose parent is `first`.
async fn setup() -> Setup {
    let fake = FakeGithub::start().await.expect("fake");
    fake.create_repo("o/r");
    let first = fake.commit("o/r", &[], &[(".cib.yml", "pipelines: {}\n"), ("src/lib.rs", "fn a() {}\n")], "one");
    let second = fake.commit("o/r", &[&first], &[("bin/run.sh", "#!/bin/sh\necho hi\n")], "two");
    fake.set_branch("o/r", "main", &second);
    let vcs = GithubVcs::new(GithubClient::new(fake.url(), Auth::Token(TEST_TOKEN.into())).expect("client"));
    Setup { fake, vcs, first, second }
}

#[tokio::test]
async fn specs_are_read_at_a_revision() {
    let s = setup().await;
    assert_eq!(s.vcs.read_spec("o/r", &s.first).await.expect("read"), Some("pipelines: {}\n".to_owned()));
    assert_eq!(s.vcs.read_spec("o/r", "main").await.expect("read"), Some("pipelines: {}\n".to_owned()));
    let other = s.vcs.clone().with_spec_path("missing.yml");
    assert_eq!(other.read_spec("o/r", "main").await.expect("read"), None);
    let e = s.vcs.read_spec("o/absent", "main").await;
    assert_eq!(e.expect("a missing repository has no spec"), None);
    s.fake.assert_no_violations();
}

#[tokio::test]
async fn workspaces_are_unpacked_from_the_tarball() {
    let s = setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    s.vcs.prepare_workspace("o/r", "main", dir.path()).await.expect("workspace");
    assert_eq!(std::fs::read_to_string(dir.path().join("src/lib.rs")).expect("file"), "fn a() {}\n");
    assert_eq!(std::fs::read_to_string(dir.path().join("bin/run.sh")).expect("file"), "#!/bin/sh\necho hi\n");
    assert!(dir.path().join(".cib.yml").exists());
    s.fake.assert_no_violations();
}

#[tokio::test]
async fn compare_resolve_and_fast_forward() {
    let s = setup().await;
    assert_eq!(s.vcs.resolve("o/r", "main").await.expect("resolve"), s.second);
    let c = s.vcs.compare("o/r", &s.first, &s.second).await.expect("compare");
    assert_eq!((c.ahead, c.behind), (1, 0));

    // A third commit on top of main fast-forwards; a sibling of it does not.
    let third = s.fake.commit("o/r", &[&s.second], &[("c", "3")], "three");
    let sibling = s.fake.commit("o/r", &[&s.second], &[("d", "4")], "sibling");
    s.vcs.fast_forward("o/r", "main", &third).await.expect("fast-forward");
    assert_eq!(s.fake.branch("o/r", "main"), Some(third.clone()));
    let e = s.vcs.fast_forward("o/r", "main", &sibling).await.expect_err("diverged");
    assert_eq!(e.kind(), ErrorKind::Permanent);
    assert_eq!(s.fake.branch("o/r", "main"), Some(third.clone()));
    let c = s.vcs.compare("o/r", &third, &sibling).await.expect("compare");
    assert_eq!((c.ahead, c.behind), (1, 1));

    // Moving backwards is refused too.
    let e = s.vcs.fast_forward("o/r", "main", &s.first).await.expect_err("backwards");
    assert_eq!(e.kind(), ErrorKind::Permanent);
    let e = s.vcs.resolve("o/r", "no-such-branch").await.expect_err("unknown");
    assert_eq!(e.kind(), ErrorKind::Permanent);
    s.fake.assert_no_violations();
}

#[tokio::test]
async fn a_branch_that_moves_during_a_fast_forward_is_refused() {
    let s = setup().await;
    let third = s.fake.commit("o/r", &[&s.second], &[("c", "3")], "three");
    // GitHub refuses the update itself, as if main had moved after cib's comparison.
    s.fake.inject(
        "git/update-ref",
        422,
        &[],
        serde_json::json!({"message": "Update is not a fast forward", "documentation_url": "https://docs.github.com"}),
        Some(1),
    );
    let e = s.vcs.fast_forward("o/r", "main", &third).await.expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Permanent);
    assert!(e.message().contains("no longer a fast-forward"), "{e}");
    s.fake.assert_no_violations();
}

#[tokio::test]
async fn permissions_and_approvals() {
    let s = setup().await;
    s.fake.set_permission("o/r", "alice", "admin");
    s.fake.set_permission("o/r", "bob", "write");
    s.fake.set_permission("o/r", "carol", "read");
    assert_eq!(s.vcs.permission("o/r", "alice").await.expect("permission"), Permission::Admin);
    assert_eq!(s.vcs.permission("o/r", "bob").await.expect("permission"), Permission::Write);
    assert_eq!(s.vcs.permission("o/r", "carol").await.expect("permission"), Permission::Read);
    assert_eq!(s.vcs.permission("o/r", "dave").await.expect("permission"), Permission::None);

    let head = s.second.clone();
    s.fake.add_review("o/r", 5, "alice", "APPROVED", &head);
    s.fake.add_review("o/r", 5, "alice", "COMMENTED", &head);
    s.fake.add_review("o/r", 5, "bob", "APPROVED", &s.first);
    s.fake.add_review("o/r", 5, "carol", "APPROVED", &head);
    s.fake.add_review("o/r", 5, "carol", "CHANGES_REQUESTED", &head);
    assert_eq!(s.vcs.approvals("o/r", 5, &head).await.expect("reviews"), vec!["alice".to_owned()]);
    s.fake.assert_no_violations();
}

#[tokio::test]
async fn server_errors_are_transient() {
    let s = setup().await;
    s.fake.inject("repos/get-commit", 503, &[], serde_json::json!({"message": "unavailable"}), Some(1));
    let e = s.vcs.resolve("o/r", "main").await.expect_err("503");
    assert_eq!(e.kind(), ErrorKind::Transient);
    assert_eq!(s.vcs.resolve("o/r", "main").await.expect("then fine"), s.second);
    s.fake.assert_no_violations();
}

#[tokio::test]
async fn a_commits_author_is_the_account_github_links_never_the_name_written_in_it() {
    let s = setup().await;
    // The commit says "Test Author"; without an account linked, cib knows no author.
    assert_eq!(s.vcs.author("o/r", &s.second).await.expect("author"), None);
    s.fake.set_commit_author("o/r", &s.second, "octocat");
    assert_eq!(s.vcs.author("o/r", "main").await.expect("author"), Some("octocat".to_owned()));
    s.fake.assert_no_violations();
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
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

/// A bare repository with 60 commits, `v1` tagged at the 5th and `v2` at the 55th; answers it
/// and the head.
fn history(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let bare = dir.join("r.git");
    let work = dir.join("work");
    git(dir, &["init", "-q", "--bare", "-b", "main", &bare.to_string_lossy()]);
    git(dir, &["init", "-q", "-b", "main", &work.to_string_lossy()]);
    for i in 1..=60 {
        std::fs::write(work.join("n"), format!("{i}\n")).expect("write");
        git(&work, &["add", "n"]);
        git(&work, &["commit", "-q", "-m", &format!("commit {i}")]);
        if i == 5 {
            git(&work, &["tag", "-a", "v1", "-m", "one"]);
        }
        if i == 55 {
            git(&work, &["tag", "-a", "v2", "-m", "two"]);
        }
    }
    git(&work, &["push", "-q", "--follow-tags", &bare.to_string_lossy(), "main"]);
    let head = git(&bare, &["rev-parse", "main"]);
    (bare, head)
}

/// A git workspace is the exact commit with `clone_depth` commits of history and the tags in
/// it, fetched with the token, which stays out of `.git`.
#[tokio::test]
async fn a_git_workspace_has_the_history_and_tags_of_its_depth() {
    let dir = tempfile::tempdir().expect("temp");
    let (bare, head) = history(dir.path());
    let fake = FakeGithub::start().await.expect("fake");
    fake.import_bare("o/r", &bare).expect("import");
    let client = GithubClient::new(fake.url(), Auth::Token(TEST_TOKEN.into())).expect("client");
    let vcs = GithubVcs::new(client.clone()).with_git(fake.url(), 50);
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).expect("ws");
    vcs.prepare_workspace("o/r", &head, &ws).await.expect("fetched");
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&ws, &["rev-list", "--count", "HEAD"]), "50", "--depth 50");
    assert_eq!(git(&ws, &["describe", "--tags"]), format!("v2-5-g{}", &head[..7]));
    assert_eq!(git(&ws, &["tag", "-l"]), "v2", "v1 lies beyond the depth");
    let config = std::fs::read_to_string(ws.join(".git/config")).expect("config");
    assert!(!config.contains(TEST_TOKEN) && !config.to_ascii_lowercase().contains("extraheader"), "{config}");

    // A shallower depth, and a token GitHub refuses.
    let ws = dir.path().join("ws2");
    std::fs::create_dir_all(&ws).expect("ws");
    GithubVcs::new(client).with_git(fake.url(), 3).prepare_workspace("o/r", &head, &ws).await.expect("fetched");
    assert_eq!(git(&ws, &["rev-list", "--count", "HEAD"]), "3");
    let ws = dir.path().join("ws3");
    std::fs::create_dir_all(&ws).expect("ws");
    let refused = GithubVcs::new(GithubClient::new(fake.url(), Auth::Token("ghp_wrong".into())).expect("client"))
        .with_git(fake.url(), 50)
        .prepare_workspace("o/r", &head, &ws)
        .await
        .expect_err("refused");
    assert_eq!(refused.kind(), ErrorKind::Misconfigured, "{refused}");
    fake.assert_no_violations();
}
