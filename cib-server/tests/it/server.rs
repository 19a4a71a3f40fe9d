//! The server through real HTTP on loopback, with SQLite, a local Git repository and the fake
//! executor (the Docker executor has its own tests; `restart.rs` runs the real one).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cib_core::ports::{BuildStatus, Store};
use cib_core::testing::FakeExecutor;
use cib_git::GitVcs;
use cib_server::config::{Role, ServerConfig, TokenConfig};
use cib_server::outgoing::sign;
use cib_server::server;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub const SECRET: &str = "It's a Secret to Everybody";

/// The secret `POST /hooks/git` pushes for acme/shop are signed with.
pub const GIT_SECRET: &str = "a plain git server's secret";

pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
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

/// A repository whose `feature/x` branch holds `spec`; returns the commit.
pub fn repo(dir: &std::path::Path, spec: &str) -> String {
    std::fs::create_dir_all(dir).expect("mkdir");
    git(dir, &["init", "-q", "-b", "feature/x"]);
    std::fs::write(dir.join(".cib.yml"), spec).expect("spec");
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "spec"]);
    git(dir, &["rev-parse", "HEAD"])
}

pub fn token(role: Role) -> String {
    format!("{role:?}-token-0123456789").to_lowercase()
}

pub fn tokens() -> Vec<TokenConfig> {
    [Role::Read, Role::Trigger, Role::Approve, Role::Admin]
        .into_iter()
        .map(|role| TokenConfig {
            name: format!("{role:?}").to_lowercase(),
            token: token(role),
            token_sha256: None,
            role,
            teams: Vec::new(),
        })
        .collect()
}

/// A push payload with the fields GitHub sends that cib reads.
pub fn push_payload(commit: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ref": "refs/heads/feature/x",
        "before": "0000000000000000000000000000000000000000",
        "after": commit,
        "created": true,
        "deleted": false,
        "forced": false,
        "commits": [{ "added": [".cib.yml"], "modified": [], "removed": [] }],
        "repository": { "full_name": "acme/shop" },
        "sender": { "login": "octocat" }
    }))
    .expect("json")
}

pub struct TestServer {
    pub url: String,
    pub repo_path: std::path::PathBuf,
    pub data_dir: std::path::PathBuf,
    pub store: Arc<cib_store::SqliteStore>,
    pub commit: String,
    pub client: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile::TempDir,
}

pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl TestServer {
    pub async fn start(spec: &str) -> Self {
        Self::start_with(spec, Vec::new()).await
    }

    pub async fn start_with(spec: &str, webhooks: Vec<cib_server::config::WebhookConfig>) -> Self {
        Self::start_configured(spec, |c| c.webhooks = webhooks).await
    }

    pub async fn start_configured(spec: &str, configure: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_with_store(spec, configure, cib_store::SqliteOptions::default()).await
    }

    pub async fn start_with_store(
        spec: &str,
        configure: impl FnOnce(&mut ServerConfig),
        options: cib_store::SqliteOptions,
    ) -> Self {
        Self::start_full(spec, configure, options, FakeExecutor::new(), &[]).await
    }

    /// A server with this executor, serving `acme/shop` (holding `spec`) and, for each
    /// `(name, spec)` of `others`, a repository `acme/<name>` of its own.
    pub async fn start_full(
        spec: &str,
        configure: impl FnOnce(&mut ServerConfig),
        options: cib_store::SqliteOptions,
        executor: Arc<dyn cib_core::ports::Executor>,
        others: &[(&str, &str)],
    ) -> Self {
        Self::start_with_vcs(spec, configure, options, executor, others, None).await
    }

    /// [`TestServer::start_full`], with another `Vcs` (GitHub's, say) instead of the local
    /// repositories, when given.
    pub async fn start_with_vcs(
        spec: &str,
        configure: impl FnOnce(&mut ServerConfig),
        options: cib_store::SqliteOptions,
        executor: Arc<dyn cib_core::ports::Executor>,
        others: &[(&str, &str)],
        other_vcs: Option<Arc<dyn cib_core::ports::Vcs>>,
    ) -> Self {
        Self::start_notifying(spec, configure, options, executor, others, other_vcs, Vec::new()).await
    }

    /// [`TestServer::start_with_vcs`], publishing events to these notifiers as well.
    pub async fn start_notifying(
        spec: &str,
        configure: impl FnOnce(&mut ServerConfig),
        options: cib_store::SqliteOptions,
        executor: Arc<dyn cib_core::ports::Executor>,
        others: &[(&str, &str)],
        other_vcs: Option<Arc<dyn cib_core::ports::Vcs>>,
        notifiers: Vec<Arc<dyn cib_core::ports::Notifier>>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let commit = repo(&dir.path().join("shop"), spec);
        for (name, spec) in others {
            repo(&dir.path().join(name), spec);
        }
        let mut config = ServerConfig {
            data_dir: dir.path().join("data"),
            tokens: tokens(),
            github: cib_server::config::GithubConfig { webhook_secret: Some(SECRET.into()), ..Default::default() },
            max_body_bytes: 1024 * 1024,
            repos: vec![cib_server::config::RepoConfig {
                name: "acme/shop".into(),
                path: dir.path().join("shop"),
                webhook_secret: Some(GIT_SECRET.into()),
            }],
            ..ServerConfig::default()
        };
        configure(&mut config);
        std::fs::create_dir_all(&config.data_dir).expect("data dir");
        let store = Arc::new(cib_store::SqliteStore::open(config.data_dir.join("cib.db"), options).expect("store"));
        // Local repositories have no accounts: every user writes, as on a team's own server.
        let mut vcs = GitVcs::new()
            .with_repo("acme/shop", dir.path().join("shop"))
            .with_default_permission(cib_core::ports::Permission::Write);
        for (name, _) in others {
            vcs = vcs.with_repo(format!("acme/{name}"), dir.path().join(name));
        }
        let vcs: Arc<dyn cib_core::ports::Vcs> = other_vcs.unwrap_or_else(|| Arc::new(vcs));
        let running = server::start_with(config, executor, store.clone(), vcs, notifiers);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(server::serve(running.state.clone(), listener, std::future::pending()));
        let client = Client::builder(TokioExecutor::new()).build_http();
        TestServer {
            url,
            repo_path: dir.path().join("shop"),
            data_dir: dir.path().join("data"),
            store,
            commit,
            client,
            _dir: dir,
        }
    }

    pub async fn request(&self, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Answer {
        let mut req = http::Request::builder().method(method).uri(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).expect("request");
        let response = self.client.request(req).await.expect("response");
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        super::openapi_check::check_answer(method, path, status, content_type.as_deref(), &body);
        Answer { status, body: String::from_utf8_lossy(&body).into_owned() }
    }

    pub async fn hook(&self, event: &str, delivery: &str, body: &[u8], signature: Option<&str>) -> Answer {
        let mut req = http::Request::post(format!("{}/hooks/github", self.url))
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("content-type", "application/json");
        if let Some(s) = signature {
            req = req.header("x-hub-signature-256", s);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).expect("request");
        let response = self.client.request(req).await.expect("response");
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        super::openapi_check::check_answer("POST", "/hooks/github", status, content_type.as_deref(), &body);
        Answer { status, body: String::from_utf8_lossy(&body).into_owned() }
    }

    /// Waits until the store lists builds matching `pred`, or panics after 20 s.
    pub async fn wait_builds(
        &self,
        pred: impl Fn(&[cib_core::ports::BuildSummary]) -> bool,
    ) -> Vec<cib_core::ports::BuildSummary> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let builds = self
                .store
                .builds(&cib_core::ports::BuildFilter::default(), cib_core::ports::Page::first(100))
                .await
                .expect("builds");
            if pred(&builds) {
                return builds;
            }
            assert!(Instant::now() < deadline, "builds never matched: {builds:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub const SPEC: &str = r#"
pipelines:
  test:
    on: { push: {}, pull_request: {}, manual: {} }
    steps:
      - { name: talk, image: busybox, commands: ["echo line one", "echo line two", "echo line three"] }
      - name: sign-off
        depends_on: [talk]
        gate: { kind: approval }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_signatures_are_checked_before_anything_else() {
    let s = TestServer::start(SPEC).await;
    // GitHub's published known answer.
    let known = sign(SECRET.as_bytes(), b"Hello, World!");
    assert_eq!(known, "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17");
    let body = push_payload(&s.commit);
    let good = sign(SECRET.as_bytes(), &body);
    let mut flipped = body.clone();
    flipped[10] ^= 1;
    assert_eq!(s.hook("push", "d-flip", &flipped, Some(&good)).await.status, 401, "one flipped byte");
    for bad in [None, Some("sha256=zz"), Some("sha1=abcd"), Some(""), Some("sha256="), Some("sha256=00")] {
        let answer = s.hook("push", "d-bad", &body, bad).await;
        assert_eq!(answer.status, 401, "{bad:?}: {}", answer.body);
    }
    let answer = s.hook("push", "d-good", &body, Some(&good)).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    assert_eq!(s.hook("ping", "d-ping", ping, Some(&sign(SECRET.as_bytes(), ping))).await.status, 200);
    let junk = b"{not json";
    let answer = s.hook("push", "d-junk", junk, Some(&sign(SECRET.as_bytes(), junk))).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let unknown = br#"{"action":"started"}"#;
    let answer = s.hook("watch", "d-watch", unknown, Some(&sign(SECRET.as_bytes(), unknown))).await;
    assert_eq!(answer.status, 202, "unknown events are stored and ignored: {}", answer.body);
    let big = vec![b' '; 2 * 1024 * 1024];
    assert_eq!(s.hook("push", "d-big", &big, Some(&sign(SECRET.as_bytes(), &big))).await.status, 413);
    let builds = s.wait_builds(|b| b.len() == 1).await;
    assert_eq!(builds[0].commit, s.commit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_copies_of_one_delivery_make_one_build() {
    let s = Arc::new(TestServer::start(SPEC).await);
    let body = push_payload(&s.commit);
    let signature = sign(SECRET.as_bytes(), &body);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (s, body, signature) = (s.clone(), body.clone(), signature.clone());
        tasks.push(tokio::spawn(async move { s.hook("push", "same-delivery", &body, Some(&signature)).await }));
    }
    let mut new = 0;
    for t in tasks {
        let answer = t.await.expect("join");
        assert_eq!(answer.status, 202, "{}", answer.body);
        if answer.body.contains("\"duplicate\": false") {
            new += 1;
        }
    }
    assert_eq!(new, 1, "exactly one copy is new");
    s.wait_builds(|b| b.len() == 1 && b[0].status == BuildStatus::Running).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let builds = s.wait_builds(|_| true).await;
    assert_eq!(builds.len(), 1, "{builds:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_is_denied_what_it_may_not_do() {
    let s = TestServer::start(SPEC).await;
    let trigger =
        serde_json::to_vec(&serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }))
            .expect("json");
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &trigger).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let id: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    let id = id["build"].as_str().expect("id").to_owned();
    s.wait_builds(|b| b.iter().any(|x| x.id.0 == id)).await;
    // (method, path, body, the least role allowed)
    let routes: Vec<(&str, String, Vec<u8>, Role)> = vec![
        ("GET", "/api/v1/builds".into(), vec![], Role::Read),
        ("GET", format!("/api/v1/builds/{id}"), vec![], Role::Read),
        ("GET", format!("/api/v1/builds/{id}/steps/talk/log"), vec![], Role::Read),
        ("POST", "/api/v1/builds".into(), trigger.clone(), Role::Trigger),
        ("POST", format!("/api/v1/builds/{id}/retry"), vec![], Role::Trigger),
        ("POST", format!("/api/v1/builds/{id}/gates/sign-off/reject"), b"{}".to_vec(), Role::Approve),
    ];
    for (method, path, body, least) in &routes {
        let answer = s.request(method, path, None, body).await;
        assert_eq!(answer.status, 401, "{method} {path} without a token");
        let answer = s.request(method, path, Some("not-a-real-token-at-all"), body).await;
        assert_eq!(answer.status, 401, "{method} {path} with a wrong token");
        for role in [Role::Read, Role::Trigger, Role::Approve, Role::Admin] {
            let answer = s.request(method, path, Some(&token(role)), body).await;
            if role < *least {
                assert_eq!(answer.status, 403, "{method} {path} as {role:?}: {}", answer.body);
            } else {
                assert!(
                    answer.status != 401 && answer.status != 403,
                    "{method} {path} as {role:?}: {} {}",
                    answer.status,
                    answer.body
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_input_gets_a_reason_never_a_500() {
    let s = TestServer::start(SPEC).await;
    let t = token(Role::Admin);
    for (method, path, body, status) in [
        ("POST", "/api/v1/builds", &b"{oops"[..], 400),
        ("POST", "/api/v1/builds", br#"{"repo":"acme/shop","ref":"feature/x"}"#, 400),
        ("POST", "/api/v1/builds", br#"{"repo":"acme/shop","ref":"nope","pipeline":"test"}"#, 422),
        ("POST", "/api/v1/builds", br#"{"repo":"acme/shop","ref":"feature/x","pipeline":"deploy"}"#, 422),
        ("POST", "/api/v1/builds", br#"{"repo":"acme/shop","ref":"feature/x","pipeline":"test","extra":1}"#, 400),
        ("GET", "/api/v1/builds?limit=0", b"", 400),
        ("GET", "/api/v1/builds?status=weird", b"", 400),
        ("GET", "/api/v1/builds?after=garbage", b"", 400),
        ("GET", "/api/v1/builds/nope", b"", 404),
        ("POST", "/api/v1/builds/nope/cancel", b"", 404),
        ("GET", "/api/v1/nothing-here", b"", 404),
        ("DELETE", "/api/v1/builds", b"", 405),
    ] {
        let answer = s.request(method, path, Some(&t), body).await;
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
        assert!(answer.body.contains("\"error\""), "{method} {path} gives a reason: {}", answer.body);
    }
    let answer = s.request("GET", "/api/v1/openapi.json", None, b"").await;
    assert_eq!(answer.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&answer.body).expect("the OpenAPI document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
}

/// Reads a server-sent event stream until `stop` says so; returns (id, event, data) triples.
pub async fn read_sse(
    s: &TestServer,
    path: &str,
    last_event_id: Option<&str>,
    stop: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    let mut req =
        http::Request::get(format!("{}{path}", s.url)).header("authorization", format!("Bearer {}", token(Role::Read)));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let response = s.client.request(req.body(Full::new(Bytes::new())).expect("request")).await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stop(&events) {
        assert!(Instant::now() < deadline, "the stream stalled after {events:?}");
        let Ok(Some(frame)) =
            tokio::time::timeout(Duration::from_secs(20), body.frame()).await.map(|f| f.transpose().ok().flatten())
        else {
            break;
        };
        if let Ok(data) = frame.into_data() {
            buf.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut fields: BTreeMap<&str, String> = BTreeMap::new();
            for line in block.lines() {
                if let Some((k, v)) = line.split_once(": ") {
                    fields.entry(k).or_default().push_str(v);
                }
            }
            if let (Some(id), Some(event)) = (fields.get("id"), fields.get("event")) {
                events.push((id.clone(), event.clone(), fields.get("data").cloned().unwrap_or_default()));
            }
        }
    }
    events
}

const CHATTY: &str = r#"
pipelines:
  test:
    on: { push: {}, pull_request: {}, manual: {} }
    steps:
      - name: chatty
        image: busybox
        commands:
          - echo alpha é ünïcode
          - echo beta
          - sleep 0.3
          - echo gamma
          - echo delta
          - sleep 0.3
          - echo epsilon
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_log_stream_resumes_with_no_byte_lost_or_repeated() {
    let s = TestServer::start(CHATTY).await;
    let trigger =
        serde_json::to_vec(&serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }))
            .expect("json");
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &trigger).await;
    let id = serde_json::from_str::<serde_json::Value>(&answer.body).expect("json")["build"]
        .as_str()
        .expect("id")
        .to_owned();
    s.wait_builds(|b| b.iter().any(|x| x.id.0 == id)).await;
    let path = format!("/api/v1/builds/{id}/steps/chatty/log/stream?attempt=1");
    // Read the first piece, then cut the connection.
    let first = read_sse(&s, &path, None, |e| !e.is_empty()).await;
    let (cut_at, _, _) = first.last().cloned().expect("a first event");
    let rest = read_sse(&s, &path, Some(&cut_at), |e| e.last().is_some_and(|(_, kind, _)| kind == "end")).await;
    let text = |events: &[(String, String, String)]| -> String {
        events
            .iter()
            .filter(|(_, kind, _)| kind == "log")
            .map(|(_, _, data)| {
                serde_json::from_str::<serde_json::Value>(data).expect("json")["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    let streamed = text(&first) + &text(&rest);
    let stored = s
        .request("GET", &format!("/api/v1/builds/{id}/steps/chatty/log?attempt=1"), Some(&token(Role::Read)), b"")
        .await;
    assert_eq!(streamed, stored.body, "the resumed stream equals the stored log");
    assert_eq!(streamed, "alpha é ünïcode\nbeta\ngamma\ndelta\nepsilon\n");
    // Each line can be shown with when it was printed.
    let stamped = s
        .request(
            "GET",
            &format!("/api/v1/builds/{id}/steps/chatty/log?attempt=1&timestamps=true"),
            Some(&token(Role::Read)),
            b"",
        )
        .await;
    let lines: Vec<&str> = stamped.body.lines().collect();
    assert_eq!(lines.len(), 5, "{}", stamped.body);
    for (line, text) in lines.iter().zip(["alpha é ünïcode", "beta", "gamma", "delta", "epsilon"]) {
        let (time, rest) = line.split_once("] ").expect("a time prefix");
        assert!(time.starts_with("[20") && time.ends_with('Z'), "{line}");
        assert_eq!(rest, text);
    }
    // Offsets chain: each event starts where the previous one ended.
    let mut offset = 0u64;
    for (id, kind, data) in first.iter().chain(&rest).filter(|(_, k, _)| k == "log") {
        let v: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(v["offset"].as_u64(), Some(offset), "{kind} {data}");
        offset = id.parse().expect("offset id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_over_its_limit_streams_its_marker_once_and_its_tail_once() {
    let options = cib_store::SqliteOptions { log_limit: 100, ..Default::default() };
    let s = TestServer::start_with_store(SPEC, |_| {}, options).await;
    // A head of 50 bytes, 200 omitted, and a tail of 50 whose last byte starts a character
    // that never ends: the first read holds the marker and is cut before that byte.
    let key = cib_core::ports::LogKey { build: "b-limit".into(), step: "loud".into(), attempt: 1 };
    let mut log = vec![b'a'; 50];
    log.extend(vec![b'b'; 200]);
    log.extend(vec![b'c'; 49]);
    log.push(0xC3);
    s.store.append_log(&key, &log).await.expect("append");
    s.store.finish_log(&key).await.expect("finish");
    let path = "/api/v1/builds/b-limit/steps/loud/log/stream?attempt=1";
    let events = read_sse(&s, path, None, |e| e.last().is_some_and(|(_, kind, _)| kind == "end")).await;
    let mut text = String::new();
    let mut bytes = Vec::new();
    let mut offset = 0u64;
    for (id, _, data) in events.iter().filter(|(_, kind, _)| kind == "log") {
        let v: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(v["offset"].as_u64(), Some(offset), "offsets chain: {events:?}");
        text.push_str(v["text"].as_str().unwrap_or_default());
        bytes.extend(v["bytes"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_u64));
        offset = id.parse().expect("offset id");
    }
    let want = "a".repeat(50) + &cib_core::ports::omitted_marker(200) + &"c".repeat(49);
    assert_eq!(text, want, "{events:?}");
    assert_eq!(bytes, [0xC3], "the unfinished character comes as a number");
    assert_eq!(offset, 300, "the stream ends at the log's end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_resumes_after_the_last_id() {
    let s = TestServer::start(SPEC).await;
    let trigger =
        serde_json::to_vec(&serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }))
            .expect("json");
    s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &trigger).await;
    let all = read_sse(&s, "/api/v1/events", None, |e| e.iter().any(|(_, _, d)| d.contains("gate_waiting"))).await;
    assert!(all.len() >= 4, "{all:?}");
    let ids: Vec<u64> = all.iter().map(|(id, _, _)| id.parse().expect("seq")).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "events come in order with no gap");
    let resumed = read_sse(&s, "/api/v1/events", Some("2"), |e| e.len() >= all.len() - 2).await;
    assert_eq!(resumed.first().map(|(id, _, _)| id.as_str()), Some("3"));
    assert_eq!(&resumed[..all.len() - 2], &all[2..], "the same events, from the one after the last id");
}

/// A receiver of outgoing webhooks that fails its first answer, then records what it gets.
async fn receiver() -> (String, Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/cib", listener.local_addr().expect("address"));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let recorded = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (recorded, calls) = (recorded.clone(), calls.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (recorded, calls) = (recorded.clone(), calls.clone());
                    async move {
                        let header =
                            |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                        let (signature, seq) = (header("x-cib-signature-256"), header("x-cib-event-seq"));
                        let body = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                        // The very first delivery is refused with a 503, to see it retried.
                        let status =
                            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 { 503 } else { 200 };
                        if status == 200 {
                            recorded.lock().expect("lock").push((signature, seq, body));
                        }
                        let mut response = http::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_webhooks_are_signed_ordered_and_retried() {
    let (url, seen) = receiver().await;
    // The receiver is on loopback, which the guard refuses unless the receiver allows it.
    let hook = cib_server::config::WebhookConfig {
        allow_private: true,
        ..cib_server::config::WebhookConfig::new(url, "hook-secret")
    };
    let s = TestServer::start_with(SPEC, vec![hook]).await;
    let trigger =
        serde_json::to_vec(&serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }))
            .expect("json");
    assert_eq!(s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &trigger).await.status, 201);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = seen.lock().expect("lock").clone();
        if got.iter().any(|(_, _, body)| String::from_utf8_lossy(body).contains("gate_waiting")) {
            let seqs: Vec<u64> = got.iter().map(|(_, seq, _)| seq.parse().expect("seq")).collect();
            assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "in order, the refused first one retried");
            for (signature, _, body) in &got {
                assert_eq!(signature, &sign(b"hook-secret", body), "every delivery is signed over its body");
                let event: serde_json::Value = serde_json::from_slice(body).expect("an event as JSON");
                assert!(event["seq"].is_u64() && event["type"].is_string(), "{event}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "the receiver got {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
