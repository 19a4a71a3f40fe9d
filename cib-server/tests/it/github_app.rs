//! cib as a GitHub App against the fake GitHub (every request checked against GitHub's OpenAPI
//! description): check runs with summaries and annotations, a check run's "Re-run", workspaces
//! fetched with git over the smart HTTP protocol, teams from GitHub's memberships, and
//! repositories of two installations. The repositories are local bare Git repositories that
//! the fake serves through the API and to `git`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::ports::{LogKey, Store};
use cib_github::testing::{CheckRunRecord, FakeGithub};
use cib_server::config::{GithubConfig, ServerConfig};
use cib_server::server;

use super::server::{SECRET, git, tokens};

const APP_ID: u64 = 42;
/// The installation of `acme/*`; `other/lib` is on [`OTHER_INSTALLATION`].
const INSTALLATION: u64 = 7;
const OTHER_INSTALLATION: u64 = 8;
const REPO: &str = "acme/shop";
const OTHER: &str = "other/lib";

fn key_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cib-github/tests/fixtures/app/test-app-key.pem")
}

const PUBLIC_KEY: &[u8] = include_bytes!("../../../cib-github/tests/fixtures/app/test-app-key.pub.pem");

/// A bare repository holding `spec` as `.cib.yml`, a commit tagged `v1.2.0`, and one commit
/// after it on `main`; answers its path and the head commit.
fn bare_repo(dir: &Path, name: &str, spec: &str) -> (PathBuf, String) {
    let bare = dir.join(format!("{}.git", name.replace('/', "-")));
    let work = dir.join(format!("{}-work", name.replace('/', "-")));
    git(dir, &["init", "-q", "--bare", "-b", "main", &bare.to_string_lossy()]);
    git(dir, &["clone", "-q", &bare.to_string_lossy(), &work.to_string_lossy()]);
    git(&work, &["checkout", "-q", "-b", "main"]);
    std::fs::write(work.join(".cib.yml"), spec).expect("spec");
    std::fs::write(work.join("README"), "one\n").expect("readme");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "first"]);
    git(&work, &["tag", "-a", "v1.2.0", "-m", "release 1.2.0"]);
    std::fs::write(work.join("README"), "two\n").expect("readme");
    git(&work, &["commit", "-q", "-am", "after the release"]);
    git(&work, &["push", "-q", "--follow-tags", "origin", "main"]);
    let head = git(&bare, &["rev-parse", "main"]);
    (bare, head)
}

struct World {
    fake: FakeGithub,
    url: String,
    store: Arc<cib_store::SqliteStore>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    _dir: tempfile::TempDir,
}

impl World {
    /// A server acting as the App for `repos` (name and spec), with no installation id
    /// configured, so that each repository's installation is looked up; `other/lib` is on
    /// another installation than `acme/*`.
    async fn start(repos: &[(&str, &str)], docker: bool) -> (World, Vec<String>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = FakeGithub::start().await.expect("fake GitHub");
        fake.enable_app(APP_ID, PUBLIC_KEY, INSTALLATION, Duration::from_secs(3600));
        let mut heads = Vec::new();
        for (name, spec) in repos {
            let (bare, head) = bare_repo(dir.path(), name, spec);
            fake.import_bare(name, &bare).expect("the bare repository is served");
            heads.push(head);
        }
        fake.install(OTHER, OTHER_INSTALLATION);
        let config = ServerConfig {
            data_dir: dir.path().join("data"),
            instance: format!("it-github-app-{}-{}", std::process::id(), heads[0].get(..8).unwrap_or("x")),
            tokens: tokens(),
            github: GithubConfig {
                webhook_secret: Some(SECRET.into()),
                api_url: Some(fake.url().to_owned()),
                app_id: Some(APP_ID),
                private_key_path: Some(key_path()),
                installation_id: None,
                git_url: Some(fake.url().to_owned()),
                repos: repos.iter().map(|(name, _)| (*name).to_owned()).collect(),
                ..GithubConfig::default()
            },
            ..ServerConfig::default()
        };
        std::fs::create_dir_all(&config.data_dir).expect("data dir");
        let store = Arc::new(
            cib_store::SqliteStore::open(config.data_dir.join("cib.db"), cib_store::SqliteOptions::default())
                .expect("store"),
        );
        let executor: Arc<dyn cib_core::ports::Executor> = if docker {
            Arc::new(
                cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(config.instance.clone()))
                    .await
                    .expect("a Docker daemon answers (scripts/ensure-docker starts one)"),
            )
        } else {
            cib_core::testing::FakeExecutor::new()
        };
        let client = cib_server::forge::github_client(&config).expect("config").expect("a GitHub client");
        assert!(client.is_app());
        let notifier =
            cib_server::forge::github_notifier(&config, client.clone(), Some(store.clone() as Arc<dyn Store>))
                .expect("notifier");
        let vcs = cib_server::forge::Forges::new(&config, Some(client));
        let running = server::start_with(config, executor, store.clone(), Arc::new(vcs), vec![notifier]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(server::serve(running.state.clone(), listener, std::future::pending()));
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        (World { fake, url, store, client, _dir: dir }, heads)
    }

    async fn hook(&self, event: &str, delivery: &str, body: serde_json::Value) {
        super::github_flow::signed_hook(&self.client, &self.url, event, delivery, body).await;
    }

    /// Waits until the completed check runs of `repo` named `name` number `count`, and answers
    /// them, oldest first.
    async fn completed(&self, repo: &str, name: &str, count: usize) -> Vec<CheckRunRecord> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let runs: Vec<CheckRunRecord> =
                self.fake.check_runs(repo).into_iter().filter(|r| r.name == name && r.status == "completed").collect();
            if runs.len() >= count {
                return runs;
            }
            assert!(
                Instant::now() < deadline,
                "{count} completed {name} run(s) never appeared: {:#?}\nrequests: {:#?}",
                self.fake.check_runs(repo),
                self.fake.violations()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sets a secret of `acme/shop` through the API, as an admin.
    async fn put_secret(&self, name: &str, value: &str) {
        use http_body_util::BodyExt;
        let body = serde_json::to_vec(&serde_json::json!({ "value": value })).expect("json");
        let request = http::Request::put(format!("{}/api/v1/secrets/{REPO}/{name}", self.url))
            .header("authorization", format!("Bearer {}", super::server::token(cib_server::config::Role::Admin)))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .expect("request");
        let response = self.client.request(request).await.expect("response");
        let status = response.status();
        let text = response.into_body().collect().await.expect("body").to_bytes();
        assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&text));
    }

    async fn comment(&self, repo: &str, number: u64, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((_, body)) =
                self.fake.comments(repo).into_iter().find(|(n, b)| *n == number && b.contains(text))
            {
                return body;
            }
            assert!(Instant::now() < deadline, "no comment containing {text:?}: {:?}", self.fake.comments(repo));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn log(&self, build: &str, step: &str) -> String {
        let key = LogKey { build: cib_core::event::BuildId(build.to_owned()), step: step.to_owned(), attempt: 1 };
        let read = self.store.read_log(&key, 0, 1 << 20).await.expect("log");
        String::from_utf8_lossy(&read.data).into_owned()
    }
}

fn push(repo: &str, after: &str) -> serde_json::Value {
    serde_json::json!({
        "ref": "refs/heads/main", "before": "0".repeat(39) + "1", "after": after,
        "created": false, "deleted": false, "forced": false, "commits": [],
        "repository": { "full_name": repo }, "sender": { "login": "dev" }
    })
}

fn rerequested(repo: &str, run: &CheckRunRecord, by: &str) -> serde_json::Value {
    serde_json::json!({
        "action": "rerequested",
        "check_run": { "name": run.name, "head_sha": run.head_sha, "external_id": run.external_id },
        "repository": { "full_name": repo }, "sender": { "login": by }
    })
}

fn comment(repo: &str, number: u64, body: &str, by: &str, id: u64) -> serde_json::Value {
    serde_json::json!({
        "action": "created",
        "issue": { "number": number },
        "comment": { "id": id, "body": body },
        "repository": { "full_name": repo }, "sender": { "login": by }
    })
}

const BROKEN_SPEC: &str = "pipelines:\n  test:\n    stepz: []\n";

/// With an App, a broken spec is a failed `cib/spec` check run whose annotations sit at each
/// diagnostic's line and column of `.cib.yml`, instead of a commit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_spec_is_a_check_run_with_an_annotation_at_its_line() {
    let (w, heads) = World::start(&[(REPO, BROKEN_SPEC)], false).await;
    w.hook("push", "broken", push(REPO, &heads[0])).await;
    let runs = w.completed(REPO, "cib/spec", 1).await;
    let run = &runs[0];
    assert_eq!(run.head_sha, heads[0]);
    assert_eq!(run.conclusion.as_deref(), Some("failure"));
    let diagnostics = cib_core::spec::parse(BROKEN_SPEC).expect_err("the spec is broken");
    assert_eq!(run.annotations.len(), diagnostics.len(), "{:#?}", run.annotations);
    let first = &run.annotations[0];
    assert_eq!(first.path, ".cib.yml");
    assert_eq!((first.start_line, first.end_line, first.start_column), (3, 3, Some(5)), "{first:#?}");
    assert_eq!(first.level, "failure");
    assert_eq!(first.message, diagnostics[0].message);
    assert!(run.summary.as_deref().unwrap_or_default().contains(".cib.yml:3:5: error:"), "{run:#?}");
    assert!(w.fake.statuses(REPO).is_empty(), "an App reports through check runs: {:?}", w.fake.statuses(REPO));
    w.fake.assert_no_violations();
}

const FAILING_SPEC: &str = r#"
pipelines:
  test:
    on: { push: { branches: [main] } }
    steps:
      - name: build
        image: busybox
        commands: ["echo compiling", "sleep 1"]
      - name: unit
        image: busybox
        depends_on: [build]
        secrets: [DEPLOY_KEY]
        commands: ["echo running 3 tests with key=$DEPLOY_KEY", "echo FAILED test_checkout", "exit 1"]
"#;

/// A pipeline is one check run, created once and updated in place, whose summary lists the
/// steps and the failing step's last log lines and whose annotation points at the failing
/// step's line; a "Re-run" from someone with write access builds the pipeline again as a new
/// build with a check run of its own, and one from someone without does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerequested_check_run_makes_a_new_build() {
    let (w, heads) = World::start(&[(REPO, FAILING_SPEC)], false).await;
    w.fake.set_permission(REPO, "dev", "write");
    w.fake.set_permission(REPO, "guest", "read");
    w.put_secret("DEPLOY_KEY", "s3cr3t-deploy-value").await;
    w.hook("push", "first", push(REPO, &heads[0])).await;
    let runs = w.completed(REPO, "cib/test", 1).await;
    let run = runs[0].clone();
    assert_eq!(run.conclusion.as_deref(), Some("failure"));
    assert!(run.writes >= 2, "created, then updated in place: {run:#?}");
    assert_eq!(w.fake.check_runs(REPO).len(), 1, "one run per pipeline");
    let summary = run.summary.clone().unwrap_or_default();
    for expected in ["| build | success", "| unit | failed", "exit code 1", "FAILED test_checkout", "key=***"] {
        assert!(summary.contains(expected), "{expected:?} is not in the summary:\n{summary}");
    }
    assert!(!summary.contains("s3cr3t-deploy-value"), "the log lines are masked:\n{summary}");
    let unit_line = FAILING_SPEC.lines().position(|l| l.contains("name: unit")).expect("unit") as u64 + 1;
    assert_eq!(run.annotations.len(), 1, "{:#?}", run.annotations);
    assert_eq!((run.annotations[0].path.as_str(), run.annotations[0].start_line), (".cib.yml", unit_line));
    let build = run.external_id.clone().expect("the run names its build");
    assert!(w.log(&build, "unit").await.contains("FAILED test_checkout"));

    // Someone who may only read asks first: nothing is built. Nor is anything for a run whose
    // external id names this build but whose commit is another: the payload cannot pick builds.
    w.hook("check_run", "rerun-guest", rerequested(REPO, &run, "guest")).await;
    let forged = CheckRunRecord { head_sha: "f".repeat(40), ..run.clone() };
    w.hook("check_run", "rerun-forged", rerequested(REPO, &forged, "dev")).await;
    // A writer asks: a new build, with its own run of the same name.
    w.hook("check_run", "rerun-dev", rerequested(REPO, &run, "dev")).await;
    let runs = w.completed(REPO, "cib/test", 2).await;
    let again = &runs[1];
    assert_eq!(again.head_sha, heads[0]);
    let rebuilt = again.external_id.clone().expect("the new run names its build");
    assert_ne!(rebuilt, build, "a new build");
    assert!(rebuilt.starts_with(&build), "{rebuilt} retries {build}");
    assert!(w.log(&rebuilt, "unit").await.contains("FAILED test_checkout"), "the same pipeline ran again");
    // A redelivery of the same event builds nothing more.
    w.hook("check_run", "rerun-dev", rerequested(REPO, &run, "dev")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.fake.check_runs(REPO).len(), 2, "{:#?}", w.fake.check_runs(REPO));
    w.fake.assert_no_violations();
}

/// The local stand-in of an image with git: the bookworm base of the local `python:3.11-slim`
/// with this machine's `git` copied in (no image can be pulled here, and the base already
/// holds the libraries git links). Docker's layer cache makes the second build instant.
fn git_image() -> &'static str {
    const TAG: &str = "cib-test/git:local";
    let dir = tempfile::tempdir().expect("context");
    let which = std::process::Command::new("sh").args(["-c", "command -v git"]).output().expect("sh");
    let host_git = String::from_utf8_lossy(&which.stdout).trim().to_owned();
    std::fs::copy(&host_git, dir.path().join("git")).expect("copy git");
    std::fs::write(dir.path().join("Dockerfile"), "FROM python:3.11-slim\nCOPY git /usr/bin/git\n")
        .expect("Dockerfile");
    let out = std::process::Command::new("docker")
        .args(["build", "-q", "-t", TAG])
        .arg(dir.path())
        .output()
        .expect("docker build");
    assert!(
        out.status.success(),
        "building {TAG} (run scripts/build-test-images first): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    TAG
}

/// A step in a GitHub workspace sees the repository's history and tags: `git describe --tags`
/// names the tag. The installation token fetched the commit but is in neither `.git/config`
/// nor the step's environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_runs_git_describe_in_a_github_workspace() {
    let image = git_image();
    let spec = format!(
        r#"
pipelines:
  test:
    on: {{ push: {{ branches: [main] }} }}
    steps:
      - name: describe
        image: {image}
        commands: ["git describe --tags", "echo ENV-START", "env", "echo CONFIG-START", "cat .git/config", "git rev-parse HEAD"]
"#
    );
    let (w, heads) = World::start(&[(REPO, &spec)], true).await;
    w.hook("push", "describe", push(REPO, &heads[0])).await;
    let runs = w.completed(REPO, "cib/test", 1).await;
    let build = runs[0].external_id.clone().expect("build");
    let log = w.log(&build, "describe").await;
    assert_eq!(runs[0].conclusion.as_deref(), Some("success"), "{log}\n{:#?}", runs[0]);
    let short = heads[0].get(..7).expect("sha");
    assert!(log.contains(&format!("v1.2.0-1-g{short}")), "git describe names the tag:\n{log}");
    assert!(log.contains(&heads[0]), "the exact commit is checked out:\n{log}");
    // The token the fetch used is nowhere the step can see.
    let token_requests = w.fake.tokens_of(INSTALLATION);
    assert!(token_requests >= 1, "an installation token was minted");
    assert!(!log.contains("ghs_"), "an installation token leaked:\n{log}");
    let config = log.split("CONFIG-START").nth(1).expect("the config was printed");
    assert!(config.contains("[remote \"origin\"]"), "{config}");
    for secret_sign in ["extraheader", "Authorization", "x-access-token", "Basic "] {
        assert!(
            !config.to_ascii_lowercase().contains(&secret_sign.to_ascii_lowercase()),
            "{secret_sign} in:\n{config}"
        );
    }
    let env = log.split("ENV-START").nth(1).and_then(|s| s.split("CONFIG-START").next()).expect("env");
    assert!(!env.contains("GIT_CONFIG"), "the fetch's configuration is not in the step:\n{env}");
    // git fetched over the smart HTTP protocol, authenticated with the installation token.
    let git_requests: Vec<_> = w.fake.requests().into_iter().filter(|r| r.uri.contains(".git/")).collect();
    assert!(git_requests.iter().any(|r| r.uri.contains("git-upload-pack") && r.status == 200), "{git_requests:#?}");
    w.fake.assert_no_violations();
}

const GATED_SPEC: &str = r#"
pipelines:
  release:
    on: { push: { branches: [main] } }
    steps:
      - { name: build, image: busybox, commands: ["echo built"] }
      - name: qa
        depends_on: [build]
        gate: { kind: hold, from: { teams: [qa] } }
"#;

/// A gate that names a team takes the word of the team's active members, as GitHub's team
/// memberships say, and refuses everyone else, even with write access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_members_approval_counts() {
    let (w, heads) = World::start(&[(REPO, GATED_SPEC)], false).await;
    for user in ["tess", "mallory", "pat"] {
        w.fake.set_permission(REPO, user, "write");
    }
    w.fake.set_team_member("acme", "qa", "tess", "active");
    // An invitation not yet accepted is no membership.
    w.fake.set_team_member("acme", "qa", "pat", "pending");
    w.hook("push", "gated", push(REPO, &heads[0])).await;
    // The build waits at the gate.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !w
        .fake
        .check_runs(REPO)
        .iter()
        .any(|r| r.summary.as_deref().unwrap_or_default().contains("| build | success"))
    {
        assert!(Instant::now() < deadline, "the build never reached the gate: {:#?}", w.fake.check_runs(REPO));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.hook("issue_comment", "c-mallory", comment(REPO, 5, "/cib pass", "mallory", 1)).await;
    let refused = w.comment(REPO, 5, "was not marked").await;
    assert!(refused.contains("qa"), "{refused}");
    w.hook("issue_comment", "c-pat", comment(REPO, 5, "/cib pass", "pat", 2)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.fake.comments(REPO).iter().filter(|(_, b)| b.contains("was not marked")).count() < 2 {
        assert!(Instant::now() < deadline, "pat was not refused: {:?}", w.fake.comments(REPO));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.hook("issue_comment", "c-tess", comment(REPO, 5, "/cib pass", "tess", 3)).await;
    w.comment(REPO, 5, "marked as passed").await;
    let runs = w.completed(REPO, "cib/release", 1).await;
    assert_eq!(runs[0].conclusion.as_deref(), Some("success"), "{:#?}", runs[0]);
    let asked: Vec<String> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.operation.as_deref() == Some("teams/get-membership-for-user-in-org"))
        .map(|r| r.uri)
        .collect();
    assert!(asked.iter().any(|u| u.ends_with("/orgs/acme/teams/qa/memberships/tess")), "{asked:?}");
    w.fake.assert_no_violations();
}

const SIMPLE_SPEC: &str = r#"
pipelines:
  test:
    on: { push: { branches: [main] } }
    steps: [{ name: unit, image: busybox, commands: ["echo ok"] }]
"#;

/// Two repositories on two installations of the App: each installation is found once through
/// GitHub, mints one token (cached for the next requests), and each repository is reached with
/// its own installation's token (the fake answers 404 to another's, as GitHub does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_of_two_installations_use_their_own_tokens() {
    let (w, heads) = World::start(&[(REPO, SIMPLE_SPEC), (OTHER, SIMPLE_SPEC)], false).await;
    w.hook("push", "p-shop", push(REPO, &heads[0])).await;
    w.hook("push", "p-lib", push(OTHER, &heads[1])).await;
    for repo in [REPO, OTHER] {
        let runs = w.completed(repo, "cib/test", 1).await;
        assert_eq!(runs[0].conclusion.as_deref(), Some("success"), "{repo}: {:#?}", runs[0]);
    }
    assert_eq!(w.fake.tokens_of(INSTALLATION), 1, "one cached token for acme/shop's installation");
    assert_eq!(w.fake.tokens_of(OTHER_INSTALLATION), 1, "one cached token for other/lib's installation");
    assert_eq!(w.fake.count("apps/get-repo-installation"), 2, "each repository's installation is asked once");
    let not_found: Vec<_> = w.fake.requests().into_iter().filter(|r| r.status == 404).collect();
    assert!(not_found.is_empty(), "no request went with another installation's token: {not_found:#?}");
    w.fake.assert_no_violations();
}
