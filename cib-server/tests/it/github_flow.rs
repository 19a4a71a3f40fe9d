//! The whole way on GitHub's terms: a local bare Git repository served by the fake GitHub
//! (every request checked against GitHub's OpenAPI description), real Docker and SQLite. A pull request is tested, merged by a comment
//! once reviewed, staging deploys with its unit and passes manual QA, approvals are given by
//! comment, the commit is promoted by fast-forward and production deploys; statuses, comments
//! and refs are checked at every point.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_github::testing::{FakeGithub, TEST_TOKEN};
use cib_server::config::{GithubConfig, PoolFileConfig, ServerConfig};
use cib_server::outgoing::sign;
use cib_server::server;

use super::server::{SECRET, git, tokens};

const SPEC: &str = r#"
pipelines:
  test:
    on: { pull_request: { branches: [master] } }
    steps:
      - { name: unit, image: busybox, commands: ["test -f feature.txt", "echo unit tests pass"] }
  staging:
    on: { push: { branches: [master] } }
    resources: [{ pool: staging-env }]
    steps:
      - { name: deploy, image: busybox, commands: ["echo deploying to $CIB_RESOURCE_STAGING_ENV_0_NAME"] }
      - { name: e2e, image: busybox, commands: ["echo end-to-end tests pass"], depends_on: [deploy] }
      - name: manual-qa
        depends_on: [e2e]
        gate: { kind: hold, from: { users: [approve] } }
  production:
    on: { push: { branches: [production] } }
    steps: [{ name: deploy, image: busybox, commands: ["echo deploying to production"] }]
promotion:
  requires:
    pipelines: [staging]
    approvals: { count: 2, from: { users: [alice, bob] } }
merge:
  requires: { pipelines: [test], reviews: 1 }
"#;

const REPO: &str = "acme/shop";

struct World {
    fake: FakeGithub,
    url: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    _dir: tempfile::TempDir,
}

/// Posts a delivery to the server's GitHub receiver, signed with the test secret, and expects
/// its 202.
pub(super) async fn signed_hook(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    url: &str,
    event: &str,
    delivery: &str,
    body: serde_json::Value,
) {
    use http_body_util::BodyExt;
    let body = serde_json::to_vec(&body).expect("json");
    let request = http::Request::post(format!("{url}/hooks/github"))
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", sign(SECRET.as_bytes(), &body))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    let response = client.request(request).await.expect("response");
    let status = response.status();
    let text = response.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&text));
}

impl World {
    async fn hook(&self, event: &str, delivery: &str, body: serde_json::Value) {
        signed_hook(&self.client, &self.url, event, delivery, body).await;
    }

    /// Waits until the status `context` on `sha` is `state`.
    async fn status(&self, sha: &str, context: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let latest = self.fake.statuses(REPO).into_iter().rev().find(|s| s.sha == sha && s.context == context);
            if latest.as_ref().is_some_and(|s| s.state == state) {
                return;
            }
            assert!(Instant::now() < deadline, "{context} on {sha} never became {state}: {latest:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for a comment on the pull request containing `text`.
    async fn comment(&self, number: u64, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((_, body)) =
                self.fake.comments(REPO).into_iter().find(|(n, b)| *n == number && b.contains(text))
            {
                return body;
            }
            assert!(Instant::now() < deadline, "no comment containing {text:?}: {:?}", self.fake.comments(REPO));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn pull_request(number: u64, head: &str, base: &str) -> serde_json::Value {
    serde_json::json!({
        "action": "opened",
        "pull_request": {
            "number": number, "merged": false, "user": { "login": "dev" },
            "base": { "ref": "master", "sha": base, "repo": { "full_name": REPO } },
            "head": { "ref": "feature/x", "sha": head, "repo": { "full_name": REPO } }
        },
        "repository": { "full_name": REPO }, "sender": { "login": "dev" }
    })
}

fn comment(number: u64, body: &str, by: &str, id: u64) -> serde_json::Value {
    serde_json::json!({
        "action": "created",
        "issue": { "number": number, "pull_request": { "url": "u" } },
        "comment": { "id": id, "body": body },
        "repository": { "full_name": REPO }, "sender": { "login": by }
    })
}

fn push(branch: &str, before: &str, after: &str) -> serde_json::Value {
    serde_json::json!({
        "ref": format!("refs/heads/{branch}"), "before": before, "after": after,
        "created": false, "deleted": false, "forced": false, "commits": [],
        "repository": { "full_name": REPO }, "sender": { "login": "cib" }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_pull_request_to_production_on_github() {
    // The repository is a local bare Git repository, pushed to with git, which the fake
    // GitHub serves; the refs cib moves through GitHub's API move there.
    let dir = tempfile::tempdir().expect("temp dir");
    let bare = dir.path().join("shop.git");
    let work = dir.path().join("work");
    git(dir.path(), &["init", "-q", "--bare", "-b", "master", &bare.to_string_lossy()]);
    git(dir.path(), &["clone", "-q", &bare.to_string_lossy(), &work.to_string_lossy()]);
    std::fs::write(work.join(".cib.yml"), SPEC).expect("spec");
    std::fs::write(work.join("README"), "shop\n").expect("readme");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "start"]);
    git(&work, &["push", "-q", "origin", "HEAD:master", "HEAD:production"]);
    git(&work, &["checkout", "-q", "-b", "feature/x"]);
    std::fs::write(work.join("feature.txt"), "new\n").expect("feature");
    git(&work, &["add", "feature.txt"]);
    git(&work, &["commit", "-q", "-m", "feature"]);
    git(&work, &["push", "-q", "origin", "feature/x"]);
    let on_disk = |branch: &str| git(&bare, &["rev-parse", branch]);
    let (base, head) = (on_disk("master"), on_disk("feature/x"));
    let fake = FakeGithub::start().await.expect("fake GitHub");
    fake.import_bare(REPO, &bare).expect("the bare repository is served");
    for user in ["dev", "alice", "bob"] {
        fake.set_permission(REPO, user, "write");
    }

    let config = ServerConfig {
        data_dir: dir.path().join("data"),
        instance: format!("it-github-flow-{}", std::process::id()),
        tokens: tokens(),
        github: GithubConfig {
            webhook_secret: Some(SECRET.into()),
            api_url: Some(fake.url().to_owned()),
            token: Some(TEST_TOKEN.into()),
            repos: vec![REPO.into()],
            ..GithubConfig::default()
        },
        pools: vec![PoolFileConfig { name: "staging-env".into(), units: vec![], capacity: Some(1) }],
        ..ServerConfig::default()
    };
    std::fs::create_dir_all(&config.data_dir).expect("data dir");
    let store = Arc::new(
        cib_store::SqliteStore::open(config.data_dir.join("cib.db"), cib_store::SqliteOptions::default())
            .expect("store"),
    );
    let executor = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(config.instance.clone()))
        .await
        .expect("a Docker daemon answers (scripts/ensure-docker starts one)");
    let client = cib_server::forge::github_client(&config).expect("config").expect("a GitHub client");
    let notifier = cib_server::forge::github_notifier(&config, client.clone(), None).expect("notifier");
    let vcs = cib_server::forge::Forges::new(&config, Some(client));
    let running = server::start_with(config, Arc::new(executor), store, Arc::new(vcs), vec![notifier]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(server::serve(running.state.clone(), listener, std::future::pending()));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let w = World { fake, url, client, _dir: dir };

    // The pull request is tested, in Docker, on a checkout of its head from GitHub.
    w.hook("pull_request", "d-pr", pull_request(1, &head, &base)).await;
    w.status(&head, "cib/up-to-date", "success").await;
    w.status(&head, "cib/test", "success").await;

    // Merging needs a review; the refusal is a comment; nothing moves.
    w.hook("issue_comment", "d-c1", comment(1, "/cib merge", "dev", 11)).await;
    let answer = w.comment(1, "cib cannot merge").await;
    assert_eq!(answer, "cib cannot merge this branch:\n- 0 approving review(s), 1 needed");
    assert_eq!(w.fake.branch(REPO, "master").as_deref(), Some(base.as_str()));
    assert_eq!(on_disk("master"), base, "nothing moved on disk either");
    w.fake.add_review(REPO, 1, "alice", "APPROVED", &head);
    w.hook("issue_comment", "d-c2", comment(1, "/cib merge", "dev", 12)).await;
    w.comment(1, "Merged by fast-forward").await;
    assert_eq!(w.fake.branch(REPO, "master").as_deref(), Some(head.as_str()), "master moved by fast-forward");
    assert_eq!(on_disk("master"), head, "and in the bare repository");
    assert_eq!(on_disk("production"), base, "production has not moved");

    // GitHub announces the push to master: staging deploys, tests, and waits for manual QA.
    w.hook("push", "d-push-master", push("master", &base, &head)).await;
    w.status(&head, "cib/staging", "pending").await;
    // Manual QA is passed by a comment of the tester the gate names; anyone else is refused.
    let staging = "d-push-master-staging";
    let deadline = Instant::now() + Duration::from_secs(90);
    for n in 100.. {
        let before = w.fake.comments(REPO).len();
        w.hook("issue_comment", &format!("d-qa-{n}"), comment(1, "/cib pass", "dev", n)).await;
        let answer = loop {
            let all = w.fake.comments(REPO);
            if all.len() > before {
                break all[before].1.clone();
            }
            assert!(Instant::now() < deadline, "no answer to /cib pass");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if answer.contains("not marked") {
            assert!(answer.contains("not one of the people this gate asks"), "{answer}");
            break;
        }
        assert!(answer.contains("0 manual tests wait"), "{answer}");
        assert!(Instant::now() < deadline, "manual QA never waited");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.fake.set_permission(REPO, "approve", "write");
    w.hook("issue_comment", "d-qa-ok", comment(1, "/cib pass", "approve", 200)).await;
    w.comment(1, &format!("Manual test manual-qa of {staging} marked as passed")).await;
    w.status(&head, "cib/staging", "success").await;

    // Promotion needs two approvals of this commit, given by comment.
    w.hook("issue_comment", "d-c3", comment(1, &format!("/cib promote {head}"), "dev", 13)).await;
    let answer = w.comment(1, "cib cannot promote").await;
    assert_eq!(answer, "cib cannot promote this commit:\n- 0 valid approval(s), 2 needed");
    w.hook("issue_comment", "d-c4", comment(1, &format!("/cib approve {head}"), "alice", 14)).await;
    w.hook("issue_comment", "d-c5", comment(1, &format!("/cib approve {head}"), "bob", 15)).await;
    w.hook("issue_comment", "d-c6", comment(1, &format!("/cib promote {head}"), "dev", 16)).await;
    w.comment(1, "Promoted").await;
    assert_eq!(w.fake.branch(REPO, "production").as_deref(), Some(head.as_str()), "production moved by fast-forward");
    assert_eq!(on_disk("production"), head, "and in the bare repository");
    assert_eq!(git(&bare, &["rev-list", "--count", "--merges", "--all"]), "0", "no merge commit anywhere");

    // GitHub announces the push to production: production deploys.
    w.hook("push", "d-push-production", push("production", &base, &head)).await;
    w.status(&head, "cib/production", "success").await;
    w.fake.assert_no_violations();
}
