//! The client commands (`cib builds`, `cib logs -f`, `cib trigger`, ...) as processes against a
//! real `cib serve`, on a local Git repository, SQLite and real Docker: every command, a log
//! followed across cut connections, profiles, and the exit codes 1, 2 and 3.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::restart::{config_with, free_port, start, wait_clean};
use super::server::git;

const SPEC: &str = r#"
pipelines:
  test:
    on: { push: { branches: ["**"], branches_ignore: [master, production] }, manual: {} }
    steps:
      # A container of its own, so that a restarted server re-attaches to it: a warm step's
      # exec is lost with the server and runs again as a new attempt.
      - name: count
        image: busybox
        isolated: true
        commands: ['for i in $(seq 1 25); do echo "line $i"; sleep 0.2; done']
  release:
    on: { manual: {} }
    inputs:
      version: { type: string, required: true }
    steps:
      - { name: build, image: busybox, commands: ['echo "building $INPUT_VERSION"'] }
      - name: sign-off
        depends_on: [build]
        gate: { kind: approval, approvals: 1, from: { users: [approver] }, instructions: Read the notes. }
      - { name: notes, image: busybox, depends_on: [sign-off], commands: [echo published] }
    deliverables:
      - docker: { image: registry.example.com/acme/shop, tags: ["{{commit}}", latest] }
  staging:
    on: { push: { branches: [master] } }
    steps: [{ name: deploy, image: busybox, commands: [echo staging] }]
  production:
    on: { push: { branches: [production] } }
    steps: [{ name: deploy, image: busybox, commands: [echo production] }]
promotion:
  requires:
    pipelines: [staging]
    approvals: { count: 1, from: { users: [approver] } }
merge:
  requires: { pipelines: [test], reviews: 0 }
"#;

const READER: &str = "reader-token-0123456789";
const TESTER: &str = "tester-token-0123456789";
const APPROVER: &str = "approver-token-0123456789";

const MORE_TOKENS: &str = r#"
[[tokens]]
name = "approver"
token = "approver-token-0123456789"
role = "approve"
teams = ["release-managers"]
"#;

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `cib` with only the given server and token (or none), and a home of its own, so that
/// neither the environment nor a profile of whoever runs the tests gets in.
fn cib_in(home: &Path, server: Option<&str>, token: Option<&str>, args: &[&str]) -> Out {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cib"));
    command
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CIB_SERVER")
        .env_remove("CIB_TOKEN")
        .env_remove("CIB_PROFILE");
    if let Some(server) = server {
        command.env("CIB_SERVER", server);
    }
    if let Some(token) = token {
        command.env("CIB_TOKEN", token);
    }
    let out = command.output().expect("run cib");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

struct Env {
    home: PathBuf,
    url: String,
}

impl Env {
    /// Waits until the step has printed `text` (so its container runs and is past its start).
    fn wait_output(&self, id: &str, step: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.cib(READER, &["logs", id, step]).stdout.contains(text) {
            assert!(Instant::now() < deadline, "{step} of {id} never printed {text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn cib(&self, token: &str, args: &[&str]) -> Out {
        cib_in(&self.home, Some(&self.url), Some(token), args)
    }

    fn json(&self, token: &str, args: &[&str]) -> serde_json::Value {
        let out = self.cib(token, args);
        assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out:?}"))
    }

    /// Waits until `cib build ID --json` satisfies `pred`.
    fn wait_build(&self, id: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.json(READER, &["build", id, "--json"]);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: {v:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_status(&self, id: &str, status: &str) -> serde_json::Value {
        self.wait_build(id, &format!("{id} reaches {status}"), |v| v["build"]["status"] == status)
    }

    fn wait_gate(&self, id: &str) {
        self.wait_build(id, "the gate waits", |v| {
            v["steps"].as_array().into_iter().flatten().any(|s| s["name"] == "sign-off" && s["status"] == "waiting")
        });
    }
}

/// A TCP proxy in front of the server that cuts the first `cuts` connections carrying a log
/// stream once they have passed on some of the log (so that each cut falls in the middle, however
/// slowly the step starts), as a load balancer's timeout or a network blip would; it records
/// every request sent through it.
struct CuttingProxy {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl CuttingProxy {
    fn start(upstream: &str, cuts: usize) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let cut_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = TcpStream::connect(&upstream) else { continue };
                let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                // When this connection first carried a log stream request. The client may send
                // it on a connection it already used for another request, so every request
                // head is read, not only the first.
                let stream_since: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
                let marker = stream_since.clone();
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = client_in.read(&mut buf) {
                        if n == 0 || server_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        // GET requests have no body: the bytes are a run of request heads.
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = pending.drain(..end + 4).collect();
                            let head = String::from_utf8_lossy(&head).into_owned();
                            if head.contains("/log/stream") {
                                marker.lock().expect("lock").get_or_insert_with(Instant::now);
                            }
                            seen.lock().expect("lock").push(head);
                        }
                    }
                    let _ = server_out.shutdown(std::net::Shutdown::Both);
                });
                let cut_so_far = cut_so_far.clone();
                std::thread::spawn(move || {
                    let _ = server.set_read_timeout(Some(Duration::from_millis(50)));
                    let mut buf = [0u8; 4096];
                    let mut passed_on_log = false;
                    loop {
                        let streaming = stream_since.lock().expect("lock").is_some();
                        if streaming
                            && passed_on_log
                            && cut_so_far
                                .fetch_update(
                                    std::sync::atomic::Ordering::SeqCst,
                                    std::sync::atomic::Ordering::SeqCst,
                                    |n| (n < cuts).then_some(n + 1),
                                )
                                .is_ok()
                        {
                            break;
                        }
                        match server.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if client.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                passed_on_log |= buf[..n].windows(10).any(|w| w == b"event: log");
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { url, requests }
    }

    fn stream_requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").iter().filter(|h| h.contains("/log/stream")).cloned().collect()
    }
}

/// `acme/shop`: the spec on master, and `feature/x` one commit ahead of it.
fn shop(dir: &Path) -> (String, String) {
    std::fs::create_dir_all(dir).expect("mkdir");
    git(dir, &["init", "-q", "-b", "master"]);
    std::fs::write(dir.join(".cib.yml"), SPEC).expect("spec");
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "spec"]);
    let master = git(dir, &["rev-parse", "HEAD"]);
    git(dir, &["checkout", "-q", "-b", "feature/x"]);
    std::fs::write(dir.join("feature.txt"), "x\n").expect("file");
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "feature"]);
    let feature = git(dir, &["rev-parse", "HEAD"]);
    // The server moves branches by fast-forward; a checked-out branch would refuse to move.
    git(dir, &["checkout", "-q", "--detach"]);
    (master, feature)
}

fn lines(n: usize) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

#[test]
fn every_client_command_against_a_real_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let (master, feature) = shop(&dir.path().join("shop"));
    let port = free_port();
    let config = config_with(dir.path(), port, &dir.path().join("shop"), MORE_TOKENS);
    let server = start(&config, port);
    let env = Env { home: home.clone(), url: server.url.clone() };

    // whoami, with each way of naming the server and the token.
    let out = env.cib(APPROVER, &["whoami"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), format!("approver, role approve, teams release-managers on {}", server.url));
    let me = env.json(READER, &["whoami", "--json"]);
    assert_eq!((me["name"].as_str(), me["role"].as_str()), (Some("reader"), Some("read")), "{me}");
    let out = cib_in(&home, None, None, &["whoami", "--server", &server.url, "--token", TESTER]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("tester, role trigger"), "{out:?}");

    // Exit 3: a token the server does not know, no token, and a server that is not there.
    let out = env.cib("not-a-token-0123456789", &["builds"]);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("does not know this token"), "{out:?}");
    let out = cib_in(&home, Some(&server.url), None, &["builds"]);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("no token"), "{out:?}");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = cib_in(&home, Some(&closed), Some(READER), &["builds"]);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("cannot reach") && out.stderr.contains("refused"), "{out:?}");

    // Exit 2: the command line is wrong, and nothing is sent.
    for args in [
        &["builds", "--limit", "0"][..],
        &["builds", "--status", "green"],
        &["trigger", "shop", "release"],
        &["trigger", "acme/shop", "release", "--input", "version"],
        &["logs", "some-build"],
        &["frobnicate"],
    ] {
        let out = env.cib(TESTER, args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?} says why");
    }

    // A test build on the feature branch, its log followed through a proxy that cuts the
    // stream twice: every line once, in order, and the reconnections resumed where they were.
    let id = env.cib(TESTER, &["trigger", "acme/shop", "test", "--ref", "feature/x"]);
    assert_eq!(id.code, Some(0), "{id:?}");
    let id = id.stdout.trim().to_owned();
    let proxy = CuttingProxy::start(&server.url, 2);
    let followed = cib_in(&home, Some(&proxy.url), Some(READER), &["logs", &id, "count", "-f"]);
    assert_eq!(followed.code, Some(0), "{followed:?}");
    assert_eq!(followed.stdout, lines(25), "{followed:?}");
    let heads = proxy.stream_requests();
    assert!(heads.len() >= 3, "the stream was cut twice and followed three times: {heads:#?}");
    let offsets: Vec<u64> = heads[1..]
        .iter()
        .map(|head| {
            let head = head.to_ascii_lowercase();
            let value =
                head.split("last-event-id: ").nth(1).unwrap_or_else(|| panic!("resumed from an offset: {head}"));
            value.lines().next().and_then(|v| v.trim().parse().ok()).expect("a byte offset")
        })
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]) && offsets.iter().any(|o| *o > 0), "{offsets:?}");
    assert_eq!(followed.stderr.matches("resuming at byte").count(), heads.len() - 1, "{followed:?}");
    env.wait_status(&id, "success");

    // The log read once, with and without timestamps.
    let out = env.cib(READER, &["logs", &id, "count"]);
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), lines(25).as_str()), "{out:?}");
    let out = env.cib(READER, &["logs", &id, "count", "--timestamps", "--attempt", "1"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let stamped: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(stamped.len(), 25, "{out:?}");
    for (i, line) in stamped.iter().enumerate() {
        assert!(line.starts_with("[20") && line.ends_with(&format!("Z] line {}", i + 1)), "{line}");
    }
    let out = env.cib(READER, &["logs", &id, "count", "-f", "--timestamps"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.lines().count(), 25, "{out:?}");
    let out = env.cib(READER, &["logs", &id, "nothing"]);
    assert_eq!(out.code, Some(1), "a step that never ran: {out:?}");

    // The list of builds and the build.
    let out = env.cib(READER, &["builds", "--repo", "acme/shop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut table = out.stdout.lines();
    let header = table.next().unwrap_or_default();
    assert!(header.starts_with("ID") && header.contains("STATUS") && header.contains("PIPELINE"), "{out:?}");
    let row = table.next().unwrap_or_default();
    assert!(row.starts_with(&id) && row.contains("feature/x") && row.contains("success"), "{out:?}");
    let listed =
        env.json(READER, &["builds", "--status", "success,failed", "--branch", "feature/x", "--limit", "5", "--json"]);
    assert_eq!(listed["builds"][0]["id"], id.as_str(), "{listed}");
    let none = env.json(READER, &["builds", "--status", "running", "--json"]);
    assert_eq!(none["builds"].as_array().map(Vec::len), Some(0), "{none}");
    let out = env.cib(READER, &["build", &id]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&format!("commit    {feature} (feature/x)")), "{out:?}");
    assert!(out.stdout.lines().any(|l| l.starts_with("count") && l.contains("success")), "{out:?}");

    // A refusal is exit 1 with every reason on its own line.
    let out = env.cib(TESTER, &["promote", "acme/shop", &master]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let reasons: Vec<&str> = out.stderr.lines().collect();
    assert!(reasons[0].contains("409") && reasons[0].contains("cib cannot promote"), "{out:?}");
    assert!(reasons.len() >= 3 && reasons[1..].iter().all(|r| r.starts_with("- ")), "one reason a line: {out:?}");
    assert!(reasons.iter().any(|r| r.contains("staging")), "{out:?}");
    assert!(reasons.contains(&"- 0 valid approval(s), 1 needed"), "{out:?}");
    let out = env.cib(READER, &["merge", "acme/shop", "feature/x"]);
    assert_eq!(out.code, Some(1), "a reader may not merge: {out:?}");
    assert!(out.stderr.contains("403"), "{out:?}");

    // Merge, staging, an approval, promotion, and where everything is.
    let merged = env.json(TESTER, &["merge", "acme/shop", "feature/x", "--json"]);
    assert_eq!(merged["merged"], feature.as_str(), "{merged}");
    let staging = merged["builds"][0].as_str().expect("a staging build").to_owned();
    env.wait_status(&staging, "success");
    let out = env.cib(APPROVER, &["approvals", "acme/shop", &feature]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), format!("{feature}: promotion approved by approver"));
    let out = env.cib(TESTER, &["promote", "acme/shop", &feature]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with(&format!("promoted {feature} to production; started: ")), "{out:?}");
    let production = out.stdout.trim().rsplit(' ').next().expect("the production build").to_owned();
    env.wait_status(&production, "success");
    let out = env.cib(READER, &["envs", "acme/shop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let row = out.stdout.lines().find(|l| l.starts_with("production")).unwrap_or_default();
    assert!(row.contains(&feature[..10]) && row.contains("approver"), "{out:?}");
    let envs = env.json(READER, &["envs", "acme/shop", "--json"]);
    assert_eq!(envs["environments"]["master"]["commit"], feature.as_str(), "{envs}");

    // A manual pipeline with an input, a gate and a deliverable: approved, then another rejected.
    let release =
        env.json(TESTER, &["trigger", "acme/shop", "release", "--ref", "master", "--input", "version=1.2", "--json"]);
    let release = release["build"].as_str().expect("id").to_owned();
    env.wait_gate(&release);
    let out = env.cib(READER, &["build", &release]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("sign-off (approval): 0 of 1 approvals; from users approver"), "{out:?}");
    assert!(out.stdout.contains("    Read the notes."), "{out:?}");
    assert!(out.stdout.contains("docker registry.example.com/acme/shop (tags {{commit}}, latest)"), "{out:?}");
    let out = env.cib(READER, &["logs", &release, "build"]);
    assert_eq!(out.stdout, "building 1.2\n", "{out:?}");
    let out = env.cib(TESTER, &["approve", &release, "sign-off"]);
    assert_eq!(out.code, Some(1), "not an allowed approver: {out:?}");
    let out = env.cib(APPROVER, &["approve", &release, "sign-off", "--comment", "fine"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), format!("{release}/sign-off: approved (1 of 1)"));
    // Its deliverable is published after the gate: the workspace has no Dockerfile, so the
    // image does not build, and the failed publish fails the build, naming the deliverable.
    let done = env.wait_status(&release, "failed");
    let publish = done["steps"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "publish")).expect("publish");
    let detail = publish["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("docker registry.example.com/acme/shop: "), "{done}");
    // A finished build is read from the store: its gate is still described (planned again
    // from the enqueue the store keeps), and the gate step's record says who approved.
    assert_eq!(done["gates"][0]["step"], "sign-off", "{done}");
    let gate = done["steps"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "sign-off")).expect("gate step");
    assert_eq!(gate["detail"], "approved by approver", "{done}");

    let rejected = env.cib(TESTER, &["trigger", "acme/shop", "release", "--input", "version=1.3"]);
    let rejected = rejected.stdout.trim().to_owned();
    env.wait_gate(&rejected);
    let out = env.cib(APPROVER, &["reject", &rejected, "sign-off"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), format!("{rejected}/sign-off: rejected"));
    env.wait_status(&rejected, "failed");
    let out = env.cib(TESTER, &["trigger", "acme/shop", "release", "--input", "colour=red"]);
    assert_eq!(out.code, Some(1), "an undeclared input: {out:?}");
    assert!(out.stderr.contains("422") && out.stderr.contains("version"), "{out:?}");

    // Cancel a running build, then once more when it has ended; retry the first build.
    let running = env.cib(TESTER, &["trigger", "acme/shop", "test"]).stdout.trim().to_owned();
    env.wait_output(&running, "count", "line 2\n");
    let out = env.cib(TESTER, &["cancel", &running]);
    assert_eq!((out.code, out.stdout.trim()), (Some(0), format!("{running}: cancelling").as_str()), "{out:?}");
    env.wait_status(&running, "cancelled");
    let out = env.cib(TESTER, &["cancel", &running]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("already finished"), "{out:?}");
    let retried = env.json(TESTER, &["retry", &id, "--json"]);
    assert_eq!(retried["retry_of"], id.as_str(), "{retried}");
    let retried = retried["build"].as_str().expect("id").to_owned();
    env.wait_status(&retried, "success");
    let out = env.cib(TESTER, &["retry", "no-such-build"]);
    assert_eq!(out.code, Some(1), "{out:?}");

    for build in [&id, &staging, &production, &release, &rejected, &running, &retried] {
        wait_clean(build);
    }
    drop(server);
}

#[test]
fn profiles_name_the_server_and_the_token_and_flags_win() {
    let dir = tempfile::tempdir().expect("temp dir");
    super::server::repo(
        &dir.path().join("shop"),
        "pipelines:\n  test:\n    steps: [{ name: a, image: busybox, commands: [true] }]\n",
    );
    let port = free_port();
    let config = config_with(dir.path(), port, &dir.path().join("shop"), "");
    let server = start(&config, port);
    let home = dir.path().join("home");
    let xdg = dir.path().join("xdg");
    let write = |base: &Path, text: &str| {
        std::fs::create_dir_all(base.join("cib")).expect("mkdir");
        let path = base.join("cib/config.toml");
        std::fs::write(&path, text).expect("config");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
    };
    // $HOME/.config, with the file's `default`.
    write(
        &home.join(".config"),
        &format!(
            "default = \"ci\"\n[profiles.ci]\nserver = \"{}\"\ntoken = \"{READER}\"\n[profiles.tester]\nserver = \"{}\"\ntoken = \"{TESTER}\"\n",
            server.url, server.url
        ),
    );
    let run = |xdg: Option<&Path>, profile_env: Option<&str>, args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cib"));
        command
            .args(args)
            .env("HOME", &home)
            .env_remove("CIB_SERVER")
            .env_remove("CIB_TOKEN")
            .env_remove("CIB_PROFILE");
        match xdg {
            Some(x) => command.env("XDG_CONFIG_HOME", x),
            None => command.env_remove("XDG_CONFIG_HOME"),
        };
        if let Some(p) = profile_env {
            command.env("CIB_PROFILE", p);
        }
        let out = command.output().expect("run cib");
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let out = run(None, None, &["whoami"]);
    assert!(out.stdout.starts_with("reader, role read"), "the default profile: {out:?}");
    let out = run(None, None, &["whoami", "--profile", "tester"]);
    assert!(out.stdout.starts_with("tester, role trigger"), "a named profile: {out:?}");
    let out = run(None, Some("tester"), &["whoami"]);
    assert!(out.stdout.starts_with("tester, role trigger"), "CIB_PROFILE: {out:?}");
    let out = run(None, None, &["whoami", "--token", TESTER]);
    assert!(out.stdout.starts_with("tester, role trigger"), "a flag wins over the profile: {out:?}");
    let out = run(None, None, &["whoami", "--profile", "nobody"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("no profile 'nobody' (it has: ci, tester)"), "{out:?}");

    // $XDG_CONFIG_HOME comes first; a mistake in the file is a usage error naming it.
    write(&xdg, &format!("[profiles.default]\nserver = \"{}\"\ntoken = \"{TESTER}\"\n", server.url));
    let out = run(Some(&xdg), None, &["whoami"]);
    assert!(out.stdout.starts_with("tester, role trigger"), "the profile called default: {out:?}");
    write(&xdg, "[profiles.default]\nserver = \"http://x\"\ntokn = \"typo\"\n");
    let out = run(Some(&xdg), None, &["whoami"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("config.toml") && out.stderr.contains("tokn"), "{out:?}");
    write(&xdg, "[profiles.default]\nserver = \"ftp://x\"\n");
    let out = run(Some(&xdg), None, &["whoami"]);
    assert_eq!(out.code, Some(2), "{out:?}");

    // Flags and variables that give both values need no file: a broken one is not read.
    let out = run(Some(&xdg), None, &["whoami", "--server", &server.url, "--token", READER]);
    assert_eq!(out.code, Some(0), "{out:?}");

    // A token others can read is used, with a warning.
    write(&xdg, &format!("[profiles.default]\nserver = \"{}\"\ntoken = \"{READER}\"\n", server.url));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(xdg.join("cib/config.toml"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = run(Some(&xdg), None, &["whoami"]);
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(out.stderr.contains("chmod 600"), "{out:?}");
    }
    drop(server);
}

#[test]
fn logs_follow_goes_on_across_a_server_restart_and_gives_up_on_a_server_that_stays_away() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    shop(&dir.path().join("shop"));
    let port = free_port();
    let config = config_with(dir.path(), port, &dir.path().join("shop"), "");
    let server = start(&config, port);
    let env = Env { home: home.clone(), url: server.url.clone() };
    let id = env.cib(TESTER, &["trigger", "acme/shop", "test", "--ref", "feature/x"]).stdout.trim().to_owned();
    let follower = Command::new(env!("CARGO_BIN_EXE_cib"))
        .args(["logs", &id, "count", "--follow"])
        .env("HOME", &home)
        .env("CIB_SERVER", &server.url)
        .env("CIB_TOKEN", READER)
        .env_remove("XDG_CONFIG_HOME")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("follow");
    // Once some of the log has been written, the server dies and comes back on the same port.
    env.wait_output(&id, "count", "line 3\n");
    server.kill();
    std::thread::sleep(Duration::from_millis(500));
    let server = start(&config, port);
    let followed = follower.wait_with_output().expect("the follower ends");
    let stdout = String::from_utf8_lossy(&followed.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&followed.stderr).into_owned();
    assert_eq!(followed.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, lines(25), "{stderr}");
    assert!(stderr.contains("resuming at byte"), "{stderr}");
    env.wait_status(&id, "success");
    wait_clean(&id);
    let url = server.url.clone();
    drop(server);

    // Reading once does not wait for a server that is gone; following waits, then gives up.
    let started = Instant::now();
    let out = cib_in(&home, Some(&url), Some(READER), &["logs", &id, "count"]);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "at once: {:?}", started.elapsed());
    let mut command = Command::new(env!("CARGO_BIN_EXE_cib"));
    command
        .args(["logs", &id, "count", "-f"])
        .env("HOME", &home)
        .env("CIB_SERVER", &url)
        .env("CIB_TOKEN", READER)
        .env("CIB_FOLLOW_RETRY_FOR", "2");
    let started = Instant::now();
    let out = command.output().expect("run cib");
    assert_eq!(out.status.code(), Some(3));
    assert!(started.elapsed() >= Duration::from_secs(2), "it tried for a while: {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gave up following the log after 2s") && stderr.contains("cannot reach"), "{stderr}");
}
