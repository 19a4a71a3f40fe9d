//! Active/standby (issue 22): two real `cib serve` processes on one PostgreSQL database and
//! real Docker. Both take webhooks; the active one is killed (SIGKILL) or paused (SIGSTOP) in
//! the middle of a build; the standby takes over, re-attaches to the running step, and every
//! acknowledged delivery is built exactly once; a paused leader that wakes up steps down.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cib_store::testing::TestDatabase;

use super::restart::{config_with, free_port, http, wait_clean};
use super::server::{SECRET, push_payload, repo};

/// A pipeline whose middle step leaves a mark in the build's shared workspace volume and then
/// sleeps, so that a server can be stopped under it; the last step counts the marks (how many
/// times the middle step ran). `isolated`: only a step in a container of its own is
/// re-attached to after its server is gone (see docs/operations.md).
const SPEC: &str = r#"pipelines:
  test:
    steps:
      - { name: one, image: busybox, commands: [echo one] }
      - { name: two, image: busybox, isolated: true, commands: ["echo run >> /workspace/runs", echo before, sleep 4, echo after], depends_on: [one] }
      - { name: three, image: busybox, commands: ["echo runs=$(grep -c run /workspace/runs)"], depends_on: [two] }
"#;

const READER: (&str, &str) = ("authorization", "Bearer reader-token-0123456789");

struct Proc {
    child: Child,
    url: String,
    stderr: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A paused process is woken first, or the kill would wait for it.
        let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// Two servers' configuration files on one database, one data directory and one Docker
/// instance name (so the new active server finds the old one's containers by their labels).
fn configs(dir: &Path, db: &TestDatabase, leadership: &str) -> [(PathBuf, u16); 2] {
    let repo_path = dir.join("shop");
    [dir.join("a"), dir.join("b")].map(|own| {
        std::fs::create_dir_all(&own).expect("mkdir");
        let port = free_port();
        let path = config_with(&own, port, &repo_path, leadership);
        let text = std::fs::read_to_string(&path).expect("config");
        let text = text
            .lines()
            .map(|line| {
                if line.starts_with("data_dir = ") {
                    format!("data_dir = \"{}\"", dir.join("data").display())
                } else if line.starts_with("instance = ") {
                    format!("instance = \"failover-{}\"", db.name())
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&path, format!("store = \"{}\"\n{text}\n", db.url)).expect("config");
        (path, port)
    })
}

fn spawn(config: &Path, port: u16) -> Proc {
    let stderr = config.with_extension("stderr");
    let child = Command::new(env!("CARGO_BIN_EXE_cib"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start cib serve");
    let url = format!("http://127.0.0.1:{port}");
    let proc = Proc { child, url, stderr };
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(&proc.url).is_none() {
        assert!(Instant::now() < deadline, "cib serve did not answer /readyz: {}", proc.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

/// `/readyz`'s answer, or `None` while nothing listens.
fn readyz(url: &str) -> Option<(u16, serde_json::Value)> {
    let address = url.trim_start_matches("http://");
    std::net::TcpStream::connect(address).ok()?;
    let (status, body) = http(url, "GET", "/readyz", &[], b"");
    Some((status, serde_json::from_str(&body).ok()?))
}

fn role(url: &str) -> String {
    readyz(url).map(|(_, r)| r["role"].as_str().unwrap_or("?").to_owned()).unwrap_or_default()
}

/// A push of `commit` to `branch`, signed: the status of the answer.
fn push(url: &str, delivery: &str, commit: &str, branch: &str) -> u16 {
    let mut payload: serde_json::Value = serde_json::from_slice(&push_payload(commit)).expect("json");
    payload["ref"] = serde_json::Value::String(format!("refs/heads/{branch}"));
    let body = serde_json::to_vec(&payload).expect("json");
    let signature = cib_server::outgoing::sign(SECRET.as_bytes(), &body);
    let headers =
        [("x-github-event", "push"), ("x-github-delivery", delivery), ("x-hub-signature-256", signature.as_str())];
    http(url, "POST", "/hooks/github", &headers, &body).0
}

fn json(url: &str, path: &str) -> serde_json::Value {
    let (status, body) = http(url, "GET", path, &[READER], b"");
    assert_eq!(status, 200, "{path}: {body}");
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |e| e + 1);
    serde_json::from_str(&body[start..end]).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn log(url: &str, id: &str, step: &str) -> String {
    http(url, "GET", &format!("/api/v1/builds/{id}/steps/{step}/log?attempt=1"), &[READER], b"").1
}

/// The builds, by branch, once `count` builds exist and none is queued or running.
fn wait_finished(url: &str, count: usize) -> Vec<(String, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let all = json(url, "/api/v1/builds");
        let builds = all["builds"].as_array().cloned().unwrap_or_default();
        let finished = builds
            .iter()
            .all(|b| !matches!(b["status"].as_str(), Some("queued" | "running" | "waiting" | "cancelling")));
        if builds.len() >= count && finished {
            let mut out: Vec<(String, String, String)> = builds
                .iter()
                .map(|b| {
                    let field = |k: &str| b[k].as_str().unwrap_or("?").to_owned();
                    (field("branch"), field("id"), field("status"))
                })
                .collect();
            out.sort();
            return out;
        }
        assert!(Instant::now() < deadline, "the builds did not finish: {all:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The build of `branch`, once its middle step has printed its first line (so it sleeps).
fn wait_middle_step(url: &str, branch: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = json(url, "/api/v1/builds");
        let id = all["builds"]
            .as_array()
            .and_then(|a| a.iter().find(|b| b["branch"] == branch))
            .and_then(|b| b["id"].as_str())
            .map(str::to_owned);
        if let Some(id) = id
            && log(url, &id, "two").contains("before")
        {
            return id;
        }
        assert!(Instant::now() < deadline, "the middle step of {branch} never printed its first line: {all:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The middle step ran once, in one attempt, whose log holds what was printed before the
/// server went away and after, each once: re-attached, not re-run.
fn assert_re_attached(url: &str, id: &str) {
    let record = json(url, &format!("/api/v1/builds/{id}"));
    let attempts: Vec<(u64, String)> = record["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter(|s| s["name"] == "two")
                .map(|s| (s["attempt"].as_u64().unwrap_or(0), s["status"].as_str().unwrap_or("?").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(attempts, [(1, "success".to_owned())], "re-attached, not re-run: {record:#}");
    let two = log(url, id, "two");
    assert_eq!((two.matches("before").count(), two.matches("after").count()), (1, 1), "{two}");
    assert!(log(url, id, "three").contains("runs=1"), "the middle step ran once: {}", log(url, id, "three"));
}

fn database() -> TestDatabase {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(TestDatabase::create()).unwrap_or_else(|e| panic!("a test database: {e}"))
}

/// Waits until `url` says it is active: how long that took.
fn wait_active(url: &str, within: Duration) -> Duration {
    let start = Instant::now();
    while role(url) != "active" {
        assert!(start.elapsed() < within, "{url} did not become active within {within:?}: {:?}", readyz(url));
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

#[test]
fn the_standby_takes_over_from_a_killed_active_server_and_builds_every_delivery_once() {
    let db = database();
    let dir = tempfile::tempdir().expect("temp dir");
    let commit = repo(&dir.path().join("shop"), SPEC);
    let [(config_a, port_a), (config_b, port_b)] = configs(dir.path(), &db, "");
    let a = spawn(&config_a, port_a);
    let b = spawn(&config_b, port_b);

    // One active, one standby: both ready, and the standby names the active server.
    let (status, ready) = readyz(&a.url).expect("a answers");
    assert_eq!((status, ready["role"].as_str(), ready["epoch"].as_i64()), (200, Some("active"), Some(1)), "{ready}");
    let (status, ready) = readyz(&b.url).expect("b answers");
    assert_eq!((status, ready["role"].as_str()), (200, Some("standby")), "{ready}");
    assert_eq!(ready["active"].as_str(), Some(a.url.as_str()), "{ready}");
    // An API write at the standby is sent to the active server: 503, Retry-After, its address.
    let raw = raw_request(&b.url, "POST", "/api/v1/builds", "Bearer tester-token-0123456789");
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    let lower = raw.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1\r\n"), "{raw}");
    assert!(lower.contains(&format!("x-cib-active: {}\r\n", a.url)), "{raw}");
    // Reads are the standby's own.
    assert_eq!(json(&b.url, "/api/v1/builds")["builds"].as_array().map(Vec::len), Some(0));

    // Webhooks to both; the active server builds both.
    assert_eq!(push(&a.url, "fo-1", &commit, "one"), 202);
    assert_eq!(push(&b.url, "fo-2", &commit, "two"), 202);
    let running = wait_middle_step(&a.url, "one");
    wait_middle_step(&a.url, "two");

    // Killed mid-build; a delivery arrives at the standby while no server is active.
    let killed = Instant::now();
    drop(a);
    assert_eq!(push(&b.url, "fo-3", &commit, "three"), 202);
    let took = wait_active(&b.url, Duration::from_secs(5));
    let since_kill = killed.elapsed();
    assert!(since_kill < Duration::from_secs(5), "takeover took {since_kill:?} after the kill");
    // The figure, for docs/operations.md (shown with --no-capture).
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!("failover: the standby was active {since_kill:?} after the kill ({took:?} of polling)\n"),
    );
    assert_eq!(readyz(&b.url).expect("b").1["epoch"].as_i64(), Some(2));

    // Every acknowledged delivery built exactly once, the running steps re-attached to.
    let builds = wait_finished(&b.url, 3);
    let branches: Vec<(&str, &str)> = builds.iter().map(|(br, _, st)| (br.as_str(), st.as_str())).collect();
    assert_eq!(branches, [("one", "success"), ("three", "success"), ("two", "success")], "{builds:?}");
    assert_re_attached(&b.url, &running);
    for (_, id, _) in &builds {
        wait_clean(id);
    }
    // Repeats of every delivery, at either server, build nothing more.
    for (delivery, branch) in [("fo-1", "one"), ("fo-2", "two"), ("fo-3", "three")] {
        assert_eq!(push(&b.url, delivery, &commit, branch), 202);
    }
    std::thread::sleep(Duration::from_millis(600));
    let all = json(&b.url, "/api/v1/builds");
    assert_eq!(all["builds"].as_array().map(Vec::len), Some(3), "{all:#}");
}

#[test]
fn a_paused_active_server_loses_its_lease_and_steps_down_harmlessly_when_it_wakes() {
    let db = database();
    let dir = tempfile::tempdir().expect("temp dir");
    let commit = repo(&dir.path().join("shop"), SPEC);
    let [(config_a, port_a), (config_b, port_b)] =
        configs(dir.path(), &db, "[leadership]\nlease_ms = 1500\nrenew_ms = 500\n");
    let mut a = spawn(&config_a, port_a);
    let b = spawn(&config_b, port_b);
    assert_eq!(role(&a.url), "active");
    assert_eq!(role(&b.url), "standby");

    assert_eq!(push(&b.url, "st-1", &commit, "one"), 202);
    let id = wait_middle_step(&a.url, "one");
    a.signal("STOP");
    // Past its lease, the other server takes over, under a new epoch.
    wait_active(&b.url, Duration::from_secs(4));
    assert_eq!(readyz(&b.url).expect("b").1["epoch"].as_i64(), Some(2));
    a.signal("CONT");
    // The woken server finds its lease gone and steps down: it writes nothing more.
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(status) = a.child.try_wait().expect("wait") {
            break status.code();
        }
        assert!(Instant::now() < deadline, "the old active server did not step down: {}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(5), "{}", a.log());
    assert!(a.log().contains("stepping down"), "{}", a.log());
    // No harm: the new active server finishes the build, the step re-attached to and run once.
    let builds = wait_finished(&b.url, 1);
    assert_eq!(builds.len(), 1, "{builds:?}");
    assert_eq!(builds[0].2, "success", "{builds:?}");
    assert_re_attached(&b.url, &id);
    assert_eq!(role(&b.url), "active");
    wait_clean(&id);
}

/// A request with a token and no body, answered whole (head and body) as text.
fn raw_request(url: &str, method: &str, path: &str, authorization: &str) -> String {
    use std::io::{Read, Write};
    let address = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nauthorization: {authorization}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The `[leadership]` example of docs/operations.md is accepted with its values, and a renewal
/// that could not keep a lease is refused when the configuration loads.
#[test]
fn the_leadership_example_in_the_docs_is_accepted_and_bad_timings_are_refused() {
    let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"))
        .expect("docs/operations.md");
    let from = docs.find("<!-- leadership -->").expect("the example is marked");
    let start = from + docs[from..].find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = start + docs[start..].find("```").expect("the block ends");
    let config = cib_server::config::ServerConfig::parse(&docs[start..end]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((config.leadership.lease_ms, config.leadership.renew_ms), (3000, 1000));
    assert_eq!(config.leadership.address.as_deref(), Some("http://cib-1.internal:8080"));
    let dir = tempfile::tempdir().expect("temp dir");
    for bad in ["lease_ms = 1500\nrenew_ms = 1000", "renew_ms = 0"] {
        let path = dir.path().join("cib.toml");
        std::fs::write(&path, format!("[leadership]\n{bad}\n")).expect("config");
        let error = cib_server::config::ServerConfig::load(Some(&path), &Default::default()).expect_err(bad);
        assert!(error.contains("[leadership]"), "{error}");
    }
}
