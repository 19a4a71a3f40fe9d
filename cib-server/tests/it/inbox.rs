//! The inbox on the real server: repositories it does not build are set aside at once,
//! failures back off and end dead, replays build nothing, plain Git servers push through the
//! same inbox, and none of it holds up a good push.

use std::time::{Duration, Instant};

use cib_core::ports::BuildStatus;
use cib_server::config::{InboxConfig, RepoConfig};
use cib_server::outgoing::sign;
use serde_json::Value;

use super::server::{GIT_SECRET, SECRET, TestServer, token};
use cib_server::config::Role;

const SPEC: &str = r#"
pipelines:
  test:
    steps:
      - { name: talk, image: busybox, commands: ["echo hello"] }
"#;

/// A push of `repo` to `feature/x`, made unique by `n` (a replayed body is a duplicate).
fn push(repo: &str, commit: &str, n: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ref": "refs/heads/feature/x",
        "before": format!("{n:040}"),
        "after": commit,
        "created": false,
        "deleted": false,
        "forced": false,
        "commits": [],
        "repository": { "full_name": repo },
        "sender": { "login": "octocat" }
    }))
    .expect("json")
}

async fn deliveries(s: &TestServer, state: &str) -> Vec<Value> {
    let answer = s
        .request("GET", &format!("/api/v1/deliveries?state={state}&limit=10000"), Some(&token(Role::Admin)), b"")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let v: Value = serde_json::from_str(&answer.body).expect("json");
    v["deliveries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_and_failing_deliveries_never_hold_up_a_good_push() {
    let s = TestServer::start_configured(SPEC, |c| {
        // A served repository whose files are gone: every attempt fails.
        c.repos.push(RepoConfig { name: "acme/gone".into(), path: "/nonexistent/gone".into(), webhook_secret: None });
        c.inbox = InboxConfig { retry_base_ms: 10, retry_max_ms: 80, ..InboxConfig::default() };
    })
    .await;
    for n in 0..1000 {
        let body = push("elsewhere/app", &s.commit, n);
        let answer = s.hook("push", &format!("unserved-{n}"), &body, Some(&sign(SECRET.as_bytes(), &body))).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
    }
    for n in 0..200 {
        let body = push("acme/gone", &s.commit, n);
        let answer = s.hook("push", &format!("failing-{n}"), &body, Some(&sign(SECRET.as_bytes(), &body))).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
    }
    let body = push("acme/shop", &s.commit, 7);
    let answer = s.hook("push", "good", &body, Some(&sign(SECRET.as_bytes(), &body))).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let sent = Instant::now();
    s.wait_builds(|b| b.iter().any(|b| b.repo == "acme/shop" && b.status != BuildStatus::Queued)).await;
    let waited = sent.elapsed();
    assert!(waited < Duration::from_secs(2), "the good push's build started after {waited:?}");

    // The unserved ones are done, with the reason; the failing ones end dead after 8 attempts.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = deliveries(&s, "done").await;
        let unserved = done
            .iter()
            .filter(|d| d["id"].as_str().is_some_and(|id| id.starts_with("unserved-")))
            .filter(|d| d["reason"] == "not a repository this server builds")
            .count();
        let dead = deliveries(&s, "dead").await;
        let dead_failing =
            dead.iter().filter(|d| d["id"].as_str().is_some_and(|id| id.starts_with("failing-"))).collect::<Vec<_>>();
        if unserved == 1000 && dead_failing.len() == 200 {
            for d in &dead_failing {
                assert_eq!(d["attempts"], 8, "{d}");
                assert!(d["reason"].as_str().is_some_and(|r| r.contains("acme/gone")), "{d}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "unserved done: {unserved}, failing dead: {}", dead_failing.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(deliveries(&s, "pending").await.is_empty(), "nothing is left pending");

    // /metrics shows all of it.
    let scrape = super::metrics::scrape(&s).await;
    let pushes = super::metrics::labelled(&scrape, "cib_deliveries_total", "outcome");
    assert_eq!(pushes.get("accepted"), Some(&1201.0), "{pushes:?}");
    assert_eq!(pushes.get("unserved"), Some(&1000.0), "{pushes:?}");
    assert_eq!(pushes.get("dead"), Some(&200.0), "{pushes:?}");
    assert_eq!(pushes.get("retry"), Some(&(200.0 * 7.0)), "seven retries each before the eighth attempt: {pushes:?}");
    assert_eq!(pushes.get("built"), Some(&1.0), "{pushes:?}");
    assert_eq!(super::metrics::single(&scrape, "cib_inbox_dead"), 200.0);
    assert_eq!(super::metrics::single(&scrape, "cib_inbox_pending"), 0.0);

    // A dead delivery can be redelivered: it is pending again from its first attempt.
    let answer = s.request("POST", "/api/v1/deliveries/failing-0/redeliver", Some(&token(Role::Admin)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = s.request("POST", "/api/v1/deliveries/no-such/redeliver", Some(&token(Role::Admin)), b"").await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    let answer = s.request("GET", "/api/v1/deliveries?state=dead", Some(&token(Role::Trigger)), b"").await;
    assert_eq!(answer.status, 403, "deliveries are for admins: {}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_for_a_repository_this_server_does_not_build_is_done_within_a_second() {
    let s = TestServer::start(SPEC).await;
    let body = push("someone/else", &s.commit, 1);
    let answer = s.hook("push", "stranger", &body, Some(&sign(SECRET.as_bytes(), &body))).await;
    assert_eq!(answer.status, 202);
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let done = deliveries(&s, "done").await;
        if let Some(d) = done.iter().find(|d| d["id"] == "stranger") {
            assert_eq!(d["reason"], "not a repository this server builds");
            break;
        }
        assert!(Instant::now() < deadline, "the delivery is still not done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = s.request("GET", "/api/v1/repos", Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 200);
    let v: Value = serde_json::from_str(&answer.body).expect("json");
    assert_eq!(v["repos"][0]["repo"], "acme/shop");
    assert!(s.wait_builds(|_| true).await.is_empty(), "no build was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_body_under_a_new_delivery_id_builds_nothing() {
    let s = TestServer::start(SPEC).await;
    let body = push("acme/shop", &s.commit, 1);
    let signature = sign(SECRET.as_bytes(), &body);
    let first = s.hook("push", "original", &body, Some(&signature)).await;
    assert_eq!(first.status, 202);
    assert!(first.body.contains("\"duplicate\": false"), "{}", first.body);
    s.wait_builds(|b| b.len() == 1).await;
    let replay = s.hook("push", "captured-and-replayed", &body, Some(&signature)).await;
    assert_eq!(replay.status, 202);
    assert!(replay.body.contains("\"duplicate\": true"), "{}", replay.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.wait_builds(|_| true).await.len(), 1, "the replay made no build");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_git_push_builds_and_a_wrongly_signed_one_is_refused() {
    let s = TestServer::start(SPEC).await;
    let body = serde_json::to_vec(&serde_json::json!({
        "repo": "acme/shop",
        "ref": "refs/heads/feature/x",
        "before": "0000000000000000000000000000000000000000",
        "after": s.commit,
        "pusher": "alice",
    }))
    .expect("json");
    let post = |signature: Option<String>, delivery: Option<&'static str>, body: Vec<u8>| {
        let s = &s;
        async move {
            let mut req =
                http::Request::post(format!("{}/hooks/git", s.url)).header("content-type", "application/json");
            if let Some(sig) = signature {
                req = req.header("x-cib-signature-256", sig);
            }
            if let Some(d) = delivery {
                req = req.header("x-cib-delivery", d);
            }
            let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body))).expect("request");
            let response = s.client.request(req).await.expect("response");
            let status = response.status().as_u16();
            let ct = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let bytes = http_body_util::BodyExt::collect(response.into_body()).await.expect("body").to_bytes();
            super::openapi_check::check_answer("POST", "/hooks/git", status, ct.as_deref(), &bytes);
            status
        }
    };
    assert_eq!(post(Some(sign(b"wrong secret", &body)), Some("git-1"), body.clone()).await, 401);
    assert_eq!(post(None, Some("git-1"), body.clone()).await, 401);
    assert_eq!(post(Some(sign(GIT_SECRET.as_bytes(), &body)), None, body.clone()).await, 400);
    assert_eq!(post(Some(sign(GIT_SECRET.as_bytes(), b"{")), Some("git-2"), b"{".to_vec()).await, 400);
    let other = body.clone().into_iter().collect::<Vec<u8>>();
    let other = String::from_utf8(other).expect("utf-8").replace("acme/shop", "acme/other").into_bytes();
    assert_eq!(post(Some(sign(GIT_SECRET.as_bytes(), &other)), Some("git-3"), other).await, 401);
    assert!(s.wait_builds(|_| true).await.is_empty(), "nothing was built from refused pushes");
    assert_eq!(post(Some(sign(GIT_SECRET.as_bytes(), &body)), Some("git-4"), body.clone()).await, 202);
    let builds = s.wait_builds(|b| b.len() == 1 && b[0].status == BuildStatus::Success).await;
    assert_eq!(builds[0].branch.as_deref(), Some("feature/x"));
}

fn operations_md() -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"))
        .expect("docs/operations.md")
}

/// The first fenced block after `marker` (or the first of `lang` when no marker) in `text`.
fn block(text: &str, marker: &str, lang: &str) -> String {
    let from = text.find(marker).unwrap_or_else(|| panic!("{marker} is in the docs"));
    let open = format!("```{lang}\n");
    let start = text[from..].find(&open).map(|i| from + i + open.len()).expect("a fenced block");
    let end = text[start..].find("```").map(|i| start + i).expect("the block ends");
    text[start..end].to_owned()
}

#[test]
fn the_configuration_example_in_the_docs_is_accepted() {
    let text = block(&operations_md(), "## Configuration", "toml");
    let config = cib_server::config::ServerConfig::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.serves("acme/shop") && config.serves("other/app"), "{:?}", config.github.repos);
    assert!(!config.serves("someone/else"));
    assert_eq!(config.inbox.max_attempts, 8);
}

/// The `post-receive` hook of docs/operations.md, run by Git on a real push, makes a build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_post_receive_hook_in_the_docs_builds_a_push() {
    let s = TestServer::start(SPEC).await;
    let hook = s.repo_path.join(".git/hooks/post-receive");
    std::fs::write(&hook, block(&operations_md(), "<!-- post-receive -->", "sh")).expect("hook");
    std::process::Command::new("chmod").arg("+x").arg(&hook).status().expect("chmod");
    let work = tempfile::tempdir().expect("temp dir");
    let clone = work.path().join("clone");
    let out = std::process::Command::new("git")
        .arg("clone")
        .arg("-q")
        .arg(&s.repo_path)
        .arg(&clone)
        .output()
        .expect("git clone");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(clone.join("more.txt"), "more\n").expect("file");
    super::server::git(&clone, &["add", "more.txt"]);
    super::server::git(&clone, &["commit", "-q", "-m", "more"]);
    let pushed = super::server::git(&clone, &["rev-parse", "HEAD"]);
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(&clone)
        .args(["push", "-q", "origin", "HEAD:refs/heads/feature/hooked"])
        .env("CIB_URL", &s.url)
        .env("CIB_GIT_SECRET", GIT_SECRET)
        .output()
        .expect("git push");
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    let builds = s
        .wait_builds(|b| {
            b.iter().any(|b| b.branch.as_deref() == Some("feature/hooked") && b.status == BuildStatus::Success)
        })
        .await;
    let build = builds.iter().find(|b| b.branch.as_deref() == Some("feature/hooked")).expect("the build");
    assert_eq!(build.commit, pushed);
}

/// A spec that cannot be read: an unknown key, and a step with no image.
const BROKEN_SPEC: &str = "pipelines:\n  test:\n    stepz: []\n";

/// A push of a broken spec on GitHub fails the `cib/spec` status of the commit, naming the
/// first problem; a pull request gets every problem in a comment; and both are events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_spec_is_reported_on_github_never_silently_dropped() {
    use cib_github::testing::{FakeGithub, TEST_TOKEN};
    let fake = FakeGithub::start().await.expect("fake GitHub");
    let good = fake.commit("acme/app", &[], &[(".cib.yml", SPEC)], "good");
    fake.set_branch("acme/app", "master", &good);
    let broken = fake.commit("acme/app", &[&good], &[(".cib.yml", BROKEN_SPEC)], "broken");
    fake.set_branch("acme/app", "feature/x", &broken);
    let github = cib_server::config::GithubConfig {
        webhook_secret: Some(SECRET.into()),
        api_url: Some(fake.url().to_owned()),
        token: Some(TEST_TOKEN.into()),
        repos: vec!["acme/app".into()],
        ..Default::default()
    };
    let client = cib_server::forge::github_client(&cib_server::config::ServerConfig {
        github: github.clone(),
        ..Default::default()
    })
    .expect("config")
    .expect("a client");
    let outbox = tempfile::tempdir().expect("outbox");
    let notifier: std::sync::Arc<dyn cib_core::ports::Notifier> = std::sync::Arc::new(
        cib_github::GithubNotifier::new(client.clone(), outbox.path(), cib_github::NotifierConfig::default())
            .expect("notifier"),
    );
    let vcs: std::sync::Arc<dyn cib_core::ports::Vcs> = std::sync::Arc::new(cib_github::GithubVcs::new(client));
    let s = TestServer::start_notifying(
        SPEC,
        |c| c.github = github,
        cib_store::SqliteOptions::default(),
        cib_core::testing::FakeExecutor::new(),
        &[],
        Some(vcs),
        vec![notifier],
    )
    .await;

    // The push: a failed cib/spec status on its commit, naming the first problem.
    let body = push("acme/app", &broken, 1);
    let answer = s.hook("push", "broken-push", &body, Some(&sign(SECRET.as_bytes(), &body))).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let found = fake.statuses("acme/app").into_iter().find(|st| st.sha == broken && st.context == "cib/spec");
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no cib/spec status: {:?}", fake.statuses("acme/app"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.state, "failure");
    let description = status.description.clone().unwrap_or_default();
    let diagnostics = cib_core::spec::parse(BROKEN_SPEC).expect_err("the spec is broken");
    assert_eq!(description, diagnostics[0].line(cib_core::spec::FILE_NAME), "the first diagnostic, with its place");
    assert!(description.starts_with(".cib.yml:3:5: "), "{description}");
    assert!(fake.comments("acme/app").is_empty(), "a push is not a pull request: no comment");

    // The pull request: a comment listing every diagnostic as PATH:LINE:COL: message.
    let pr = serde_json::json!({
        "action": "opened",
        "number": 7,
        "pull_request": {
            "number": 7,
            "merged": null,
            "user": { "login": "octocat" },
            "head": { "ref": "feature/x", "sha": broken, "repo": { "full_name": "acme/app" } },
            "base": { "ref": "master", "sha": good, "repo": { "full_name": "acme/app" } }
        },
        "repository": { "full_name": "acme/app" },
        "sender": { "login": "octocat" }
    });
    let body = serde_json::to_vec(&pr).expect("json");
    let answer = s.hook("pull_request", "broken-pr", &body, Some(&sign(SECRET.as_bytes(), &body))).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.comments("acme/app").is_empty() {
        assert!(Instant::now() < deadline, "the diagnostics were never posted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let comments = fake.comments("acme/app");
    assert_eq!(comments[0].0, 7, "on the pull request: {comments:?}");
    assert!(diagnostics.len() >= 2, "the test wants several problems: {diagnostics:?}");
    assert!(comments[0].1.contains("stepz"), "{}", comments[0].1);
    for d in &diagnostics {
        let line = d.line(cib_core::spec::FILE_NAME);
        assert!(line.starts_with(".cib.yml:"), "{line}");
        assert!(comments[0].1.contains(&line), "every diagnostic is listed; {line} is missing: {}", comments[0].1);
    }

    // Both are events, with the diagnostics, and nothing was built.
    let events = cib_core::ports::Store::events_after(&*s.store, 0, 10_000).await.expect("events");
    let invalid: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.body {
            cib_core::event::EventBody::SpecInvalid { commit, pull_request, diagnostics, .. } => {
                Some((commit.clone(), *pull_request, diagnostics.len()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        invalid,
        [(broken.clone(), None, diagnostics.len()), (broken.clone(), Some(7), diagnostics.len())],
        "one spec_invalid event for the push and one for the pull request"
    );
    let json = serde_json::to_string(&events).expect("json");
    assert!(json.contains("\"type\":\"spec_invalid\""), "the event's name is spec_invalid");
    let builds = s.request("GET", "/api/v1/builds", Some(&token(Role::Read)), b"").await;
    assert!(!builds.body.contains("acme/app"), "nothing was built: {}", builds.body);
    // The GitHub notifier's outbox is in /metrics, and empty once the statuses went out.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let scrape = super::metrics::scrape(&s).await;
        let outbox = super::metrics::labelled(&scrape, "cib_notifier_outbox_depth", "notifier");
        if outbox.get("github") == Some(&0.0) {
            break;
        }
        assert!(outbox.contains_key("github"), "{outbox:?}");
        assert!(Instant::now() < deadline, "the outbox never emptied: {outbox:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.assert_no_violations();
}
