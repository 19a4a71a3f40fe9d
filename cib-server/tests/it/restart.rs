//! `cib serve` as a process, killed with SIGKILL and started again, on real Docker and SQLite.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cib_server::outgoing::sign;

use super::server::{SECRET, push_payload, repo};

pub(super) struct Server {
    child: Child,
    pub(super) url: String,
}

fn config(dir: &Path, port: u16, repo_path: &Path) -> PathBuf {
    config_with(dir, port, repo_path, "")
}

pub(super) fn config_with(dir: &Path, port: u16, repo_path: &Path, extra: &str) -> PathBuf {
    let path = dir.join("cib.toml");
    let text = format!(
        r#"
listen = "127.0.0.1:{port}"
data_dir = "{data}"
instance = "test-server-{port}"

[github]
webhook_secret = "{SECRET}"

[[tokens]]
name = "reader"
token = "reader-token-0123456789"
role = "read"

[[tokens]]
name = "tester"
token = "tester-token-0123456789"
role = "trigger"

[[repos]]
name = "acme/shop"
path = "{repo}"
{extra}
"#,
        data = dir.join("data").display(),
        repo = repo_path.display(),
    );
    std::fs::write(&path, text).expect("config");
    path
}

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

pub(super) fn start(config: &Path, port: u16) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_cib"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start cib serve");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    // A connection to a port in the ephemeral range that nothing listens on can, rarely, be
    // given that very port as its source and connect to itself (a TCP simultaneous open); it
    // then looks like a server that is listening. Only a peer other than ourselves counts.
    let listening = || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok_and(|s| matches!((s.local_addr(), s.peer_addr()), (Ok(l), Ok(p)) if l != p))
    };
    while !listening() {
        assert!(Instant::now() < deadline, "cib serve did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, url }
}

impl Server {
    pub(super) fn kill(mut self) {
        // SIGKILL: no chance to clean anything up.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP/1.1 request over a plain socket, enough for a test.
pub(super) fn http(url: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let address = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    stream.write_all(body).expect("write body");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

pub(super) fn hook(url: &str, delivery: &str, body: &[u8]) -> u16 {
    let signature = sign(SECRET.as_bytes(), body);
    let headers =
        [("x-github-event", "push"), ("x-github-delivery", delivery), ("x-hub-signature-256", signature.as_str())];
    http(url, "POST", "/hooks/github", &headers, body).0
}

pub(super) fn builds(url: &str) -> serde_json::Value {
    let (status, body) =
        http(url, "GET", "/api/v1/builds", &[("authorization", "Bearer reader-token-0123456789")], b"");
    assert_eq!(status, 200, "{body}");
    // The answer may be chunked; the JSON object sits between the first `{` and the last `}`.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |e| e + 1);
    serde_json::from_str(&body[start..end]).unwrap_or_else(|e| panic!("{e}: {body}"))
}

pub(super) fn wait_for(url: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let b = builds(url);
        if pred(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "{what}: {b:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn docker_left(build: &str) -> Vec<String> {
    let mut left = Vec::new();
    for kind in ["container", "volume", "network"] {
        let out = Command::new("docker")
            .args([kind, "ls", "-q", "--filter", &format!("label=org.cib.build={build}")])
            .args(if kind == "container" { &["-a"][..] } else { &[][..] })
            .output()
            .expect("docker answers");
        left.extend(String::from_utf8_lossy(&out.stdout).lines().map(|l| format!("{kind} {l}")));
    }
    left
}

/// Waits until nothing of `build` is left in Docker (the engine cleans up on a task of its own).
pub(super) fn wait_clean(build: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker_left(build).is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", docker_left(build));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_delivery_answered_but_not_processed_before_a_kill_builds_once_after_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The repository is not there yet, so the first server cannot process the delivery.
    let later = dir.path().join("shop");
    let staged = dir.path().join("staged");
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: hello, image: busybox, commands: [echo hello] }\n";
    let commit = repo(&staged, spec);
    let port = free_port();
    let config = config(dir.path(), port, &later);
    let server = start(&config, port);
    let body = push_payload(&commit);
    assert_eq!(hook(&server.url, "d-1", &body), 202);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(builds(&server.url)["builds"].as_array().map(Vec::len), Some(0), "nothing could be processed yet");
    server.kill();

    std::fs::rename(&staged, &later).expect("the repository arrives");
    let server = start(&config, port);
    let done = wait_for(&server.url, "the stored delivery was built after the restart", |b| {
        b["builds"].as_array().is_some_and(|a| a.len() == 1 && a[0]["status"] == "success")
    });
    assert_eq!(hook(&server.url, "d-1", &body), 202, "a repeat is answered");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(builds(&server.url)["builds"].as_array().map(Vec::len), Some(1), "and builds nothing new: {done:#}");
    wait_clean(done["builds"][0]["id"].as_str().expect("id"));
}

#[test]
fn a_build_running_when_the_server_is_killed_is_reported_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = "pipelines:\n  test:\n    steps:\n      - name: slow\n        image: busybox\n        commands: [echo started, sleep 4, echo done]\n        retry: { count: 1 }\n";
    let commit = repo(&dir.path().join("shop"), spec);
    let port = free_port();
    let config = config(dir.path(), port, &dir.path().join("shop"));
    let server = start(&config, port);
    assert_eq!(hook(&server.url, "d-run", &push_payload(&commit)), 202);
    let running = wait_for(&server.url, "the build runs", |b| b["builds"][0]["status"] == "running");
    let id = running["builds"][0]["id"].as_str().expect("id").to_owned();
    // Give the step's container time to start, then kill the server under it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker_left(&id).iter().any(|r| r.starts_with("container")) {
        assert!(Instant::now() < deadline, "the step's container never appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.kill();
    assert!(!docker_left(&id).is_empty(), "the killed server left its containers behind");

    let server = start(&config, port);
    let done = wait_for(&server.url, "the interrupted build ends after the restart", |b| {
        b["builds"][0]["status"] != "running" && b["builds"][0]["status"] != "queued"
    });
    let (_, record) = http(
        &server.url,
        "GET",
        &format!("/api/v1/builds/{id}"),
        &[("authorization", "Bearer reader-token-0123456789")],
        b"",
    );
    assert_eq!(done["builds"][0]["status"], "success", "the interrupted step was retried: {record}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker_left(&id).is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", docker_left(&id));
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(server);
}

fn api(url: &str, method: &str, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let text = body.to_string();
    let (status, answer) = http(
        url,
        method,
        path,
        &[("authorization", "Bearer tester-token-0123456789"), ("content-type", "application/json")],
        text.as_bytes(),
    );
    let start = answer.find('{').unwrap_or(0);
    let end = answer.rfind('}').map_or(answer.len(), |e| e + 1);
    (status, serde_json::from_str(&answer[start..end]).unwrap_or(serde_json::Value::Null))
}

#[test]
fn leases_survive_a_kill_and_a_dead_holder_is_freed_at_its_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = "pipelines:\n  test:\n    on: { manual: {} }\n    resources: [{ pool: env }]\n    steps:\n      - { name: use, image: busybox, commands: [echo got it] }\n";
    repo(&dir.path().join("shop"), spec);
    let port = free_port();
    let pools = "\n[[pools]]\nname = \"env\"\nunits = [{ name = \"stage-1\" }]\n";
    let config = config_with(dir.path(), port, &dir.path().join("shop"), pools);
    let server = start(&config, port);
    let (status, lease) = api(
        &server.url,
        "POST",
        "/api/v1/leases",
        serde_json::json!({ "pool": "env", "for": "4s", "reason": "by hand" }),
    );
    assert_eq!(status, 201, "{lease}");
    let id = lease["lease"].as_str().expect("id").to_owned();
    let token = lease["token"].clone();
    let (status, build) = api(
        &server.url,
        "POST",
        "/api/v1/builds",
        serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }),
    );
    assert_eq!(status, 201, "{build}");
    server.kill();

    let server = start(&config, port);
    let (status, after) = api(&server.url, "GET", &format!("/api/v1/leases/{id}"), serde_json::Value::Null);
    assert_eq!(status, 200, "the lease is still there: {after}");
    assert_eq!(after["granted"], true);
    assert_eq!(after["token"], token, "with the same fencing token");
    // Nobody returns it: at its deadline it expires and the waiting build gets the unit.
    wait_for(&server.url, "the waiting build ran once the dead holder's lease expired", |b| {
        b["builds"].as_array().is_some_and(|a| a.len() == 1 && a[0]["status"] == "success")
    });
    let (status, _) = api(&server.url, "GET", &format!("/api/v1/leases/{id}"), serde_json::Value::Null);
    assert_eq!(status, 404, "the expired lease is gone");
    wait_clean(build["build"].as_str().expect("id"));
}

#[test]
fn cib_serve_keeps_its_data_private_and_stops_on_a_key_that_opens_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: hello, image: busybox, commands: [echo hello] }\n";
    repo(&dir.path().join("shop"), spec);
    let port = free_port();
    let admin = "[[tokens]]\nname = \"root\"\ntoken = \"root-token-0123456789\"\nrole = \"admin\"\n";
    let config = config_with(dir.path(), port, &dir.path().join("shop"), admin);
    let server = start(&config, port);
    let data = dir.path().join("data");
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data directory");
    assert_eq!(mode(&data.join("cib.db")), 0o600, "the database");
    assert_eq!(mode(&data.join("secret.key")), 0o600, "the key file");
    let (status, body) = http(
        &server.url,
        "PUT",
        "/api/v1/secrets/acme/shop/TOKEN",
        &[("authorization", "Bearer root-token-0123456789"), ("content-type", "application/json")],
        br#"{"value": "a-value-long-enough"}"#,
    );
    assert_eq!(status, 200, "{body}");
    server.kill();

    // Another key opens none of the stored secrets: the server says so, naming the file.
    std::fs::write(data.join("secret.key"), format!("{}\n", "ab".repeat(32))).expect("replace the key");
    let out = Command::new(env!("CARGO_BIN_EXE_cib")).arg("serve").arg("--config").arg(&config).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&data.join("secret.key").display().to_string()), "{stderr}");
}

/// Three steps; the middle one leaves a mark in the workspace volume (which every step of the
/// build shares), then sleeps: the marks count how often it ran. It is `isolated`, in a
/// container of its own, since only such steps are re-attached after a restart (a warm step,
/// an exec, is reported interrupted: see docs/operations.md).
const THREE_STEPS: &str = r#"
    steps:
      - { name: one, image: busybox, commands: [echo one] }
      - { name: two, image: busybox, isolated: true, commands: ["echo run >> /workspace/runs", echo before, sleep 5, echo after], depends_on: [one] }
      - { name: three, image: busybox, commands: ["echo runs=$(grep -c run /workspace/runs)"], depends_on: [two] }
      - { name: report, image: busybox, commands: ["echo runs=$(grep -c run /workspace/runs)"], when: { status: always } }
"#;

fn read_api(url: &str, path: &str) -> String {
    let (status, body) = http(url, "GET", path, &[("authorization", "Bearer reader-token-0123456789")], b"");
    assert_eq!(status, 200, "{path}: {body}");
    body
}

pub(super) fn record(url: &str, id: &str) -> serde_json::Value {
    let body = read_api(url, &format!("/api/v1/builds/{id}"));
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |e| e + 1);
    serde_json::from_str(&body[start..end]).unwrap_or_else(|e| panic!("{e}: {body}"))
}

pub(super) fn log(url: &str, id: &str, step: &str, attempt: u32) -> String {
    read_api(url, &format!("/api/v1/builds/{id}/steps/{step}/log?attempt={attempt}"))
}

/// The attempts of one step, as the build's record lists them: (attempt, status).
pub(super) fn attempts(record: &serde_json::Value, step: &str) -> Vec<(u64, String)> {
    record["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter(|s| s["name"] == step)
                .map(|s| (s["attempt"].as_u64().unwrap_or(0), s["status"].as_str().unwrap_or("?").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a server on a repository whose pipeline `name` is [`THREE_STEPS`], pushes, and returns
/// the server and the build's id once the middle step's first line is stored (so it sleeps).
fn start_until_the_middle_step_sleeps(
    dir: &Path,
    name: &str,
    header: &str,
    grace: Option<u64>,
) -> (Server, String, PathBuf, u16) {
    let spec = format!("pipelines:\n  {name}:\n{header}{THREE_STEPS}");
    let commit = repo(&dir.join("shop"), &spec);
    let port = free_port();
    let config = config(dir, port, &dir.join("shop"));
    if let Some(grace) = grace {
        let text = std::fs::read_to_string(&config).expect("config");
        std::fs::write(&config, format!("shutdown_grace = {grace}\n{text}")).expect("config");
    }
    let server = start(&config, port);
    assert_eq!(hook(&server.url, "d-three", &push_payload(&commit)), 202);
    let running = wait_for(&server.url, "the build runs", |b| b["builds"][0]["status"] == "running");
    let id = running["builds"][0]["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log(&server.url, &id, "two", 1).contains("before") {
        assert!(Instant::now() < deadline, "the middle step never printed its first line");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, id, config, port)
}

/// The containers of one step of a build, running or not, of the server on `port` (build ids
/// come from delivery ids, so tests running at once may share one; their instances differ).
fn step_containers(port: u16, build: &str, step: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["container", "ls", "-a", "-q", "--filter", &format!("label=org.cib.build={build}")])
        .args(["--filter", &format!("label=org.cib.engine=test-server-{port}")])
        .args(["--filter", &format!("label=org.cib.step={step}")])
        .output()
        .expect("docker answers");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn a_step_running_at_a_kill_is_re_attached_and_the_build_succeeds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, id, config, port) = start_until_the_middle_step_sleeps(dir.path(), "test", "", None);
    server.kill();
    assert_eq!(step_containers(port, &id, "two").len(), 1, "the middle step's container outlived the server");

    let server = start(&config, port);
    wait_for(&server.url, "the build ends after the restart", |b| {
        b["builds"][0]["status"] != "running" && b["builds"][0]["status"] != "queued"
    });
    let record = record(&server.url, &id);
    assert_eq!(record["build"]["status"], "success", "{record:#}");
    // The container was still running, so the new process followed it: one attempt, whose log
    // holds what was printed before the kill and after it, each once.
    assert_eq!(attempts(&record, "two"), [(1, "success".to_owned())], "re-attached, not re-run: {record:#}");
    let two = log(&server.url, &id, "two", 1);
    assert_eq!((two.matches("before").count(), two.matches("after").count()), (1, 1), "{two}");
    assert!(log(&server.url, &id, "three", 1).contains("runs=1"), "the middle step ran once");
    wait_clean(&id);
}

#[test]
fn a_deploy_step_lost_at_a_kill_is_interrupted_run_once_and_retried_by_a_person() {
    let dir = tempfile::tempdir().expect("temp dir");
    let header = "    kind: deploy\n    on: { push: { branches: [\"feature/x\"] } }\n";
    let (server, id, config, port) = start_until_the_middle_step_sleeps(dir.path(), "ship", header, None);
    server.kill();
    // The daemon loses the step's container while no server runs (a daemon restart would).
    let lost = step_containers(port, &id, "two");
    assert_eq!(lost.len(), 1, "{lost:?}");
    let removed = Command::new("docker").args(["rm", "-f"]).args(&lost).output().expect("docker answers");
    assert!(removed.status.success(), "{removed:?}");

    let server = start(&config, port);
    wait_for(&server.url, "the build ends after the restart", |b| {
        b["builds"][0]["status"] != "running" && b["builds"][0]["status"] != "queued"
    });
    let first = record(&server.url, &id);
    assert_eq!(first["build"]["status"], "errored", "{first:#}");
    assert_eq!(attempts(&first, "two"), [(1, "interrupted".to_owned())], "never run again by itself: {first:#}");
    assert_eq!(attempts(&first, "three"), [(0, "skipped".to_owned())], "{first:#}");
    // The mark the middle step left in the shared volume, counted after the restart.
    assert!(log(&server.url, &id, "report", 1).contains("runs=1"), "the deploy step ran exactly once");

    // A person retries it through the ordinary retry, as a new build of the same commit.
    let (status, retried) = api(&server.url, "POST", &format!("/api/v1/builds/{id}/retry"), serde_json::json!({}));
    assert_eq!(status, 201, "{retried}");
    let again = retried["build"].as_str().expect("the new build's id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(90);
    while record_status(&server.url, &again) != "success" {
        assert!(Instant::now() < deadline, "the retry did not succeed: {:#}", record(&server.url, &again));
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_clean(&id);
    wait_clean(&again);
}

fn record_status(url: &str, id: &str) -> String {
    record(url, id)["build"]["status"].as_str().unwrap_or("?").to_owned()
}

#[test]
fn sigterm_during_a_step_leaves_it_running_and_the_next_start_finishes_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut server, id, config, port) = start_until_the_middle_step_sleeps(dir.path(), "test", "", Some(1));
    let term = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().expect("kill");
    assert!(term.success());
    let exited = server.child.wait().expect("the server exits");
    assert!(exited.success(), "SIGTERM is a clean stop: {exited:?}");
    // The grace period (1 s) was shorter than the step's sleep: the step was left running.
    let left = Command::new("docker")
        .args(["container", "ls", "-q", "--filter", &format!("label=org.cib.build={id}")])
        .args(["--filter", &format!("label=org.cib.engine=test-server-{port}")])
        .args(["--filter", "label=org.cib.step=two", "--filter", "status=running"])
        .output()
        .expect("docker answers");
    assert_eq!(String::from_utf8_lossy(&left.stdout).lines().count(), 1, "the step still runs after the stop");

    let server = start(&config, port);
    wait_for(&server.url, "the build ends after the restart", |b| {
        b["builds"][0]["status"] != "running" && b["builds"][0]["status"] != "queued"
    });
    let record = record(&server.url, &id);
    assert_eq!(record["build"]["status"], "success", "{record:#}");
    assert_eq!(attempts(&record, "two"), [(1, "success".to_owned())], "the step was not failed: {record:#}");
    assert!(log(&server.url, &id, "two", 1).contains("after"));
    wait_clean(&id);
}
