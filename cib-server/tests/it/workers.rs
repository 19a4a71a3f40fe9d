//! Remote workers end to end: `cib serve` with `[broker]` on a real RabbitMQ node
//! (`scripts/ensure-rabbitmq`), and two `cib worker` processes with the host executor standing
//! in for an operating system the Docker daemon does not have (`runs_on: {os: ...}`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::restart::{Server, attempts, config_with, free_port, hook, http, log, record, start, wait_for};
use super::server::{push_payload, repo};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// The tests' RabbitMQ node on `port` (55672 is the one `scripts/test` starts), started when it
/// does not answer; its URL.
fn broker(port: u16) -> String {
    let out = Command::new(repo_root().join("scripts/ensure-rabbitmq"))
        .env("CIB_RABBIT_PORT", port.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/ensure-rabbitmq runs");
    assert!(out.status.success(), "scripts/ensure-rabbitmq failed");
    String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
}

fn stop_broker(port: u16) {
    let status = Command::new(repo_root().join("scripts/ensure-rabbitmq"))
        .arg("stop")
        .env("CIB_RABBIT_PORT", port.to_string())
        .status()
        .expect("scripts/ensure-rabbitmq stop runs");
    assert!(status.success(), "the node did not stop");
}

/// A `cib worker` process, killed when dropped.
struct Worker {
    child: Child,
    name: String,
    state: PathBuf,
}

impl Worker {
    fn start(dir: &Path, broker: &str, labels: &str, name: &str) -> Worker {
        let state = dir.join(format!("state-{name}"));
        let child = Command::new(env!("CARGO_BIN_EXE_cib"))
            .args(["worker", "--broker", broker, "--labels", labels, "--name", name, "--state-dir"])
            .arg(&state)
            .env("CIB_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cib worker");
        Worker { child, name: name.to_owned(), state }
    }

    /// The claims it holds now: (job, claim token), from its state directory.
    fn claims(&self) -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir(&self.state) else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| (v["job"].as_str().unwrap_or("").to_owned(), v["claim"].as_str().unwrap_or("").to_owned()))
            .collect()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.child.id().to_string()]).stderr(Stdio::null()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn broker_section(url: &str, port: u16) -> String {
    format!("\n[broker]\nurl = \"{url}\"\nserver_url = \"http://127.0.0.1:{port}\"\nheartbeat = 0.5\n")
}

/// A server with `[broker]` on a repository holding `spec`, a push, and the build's id once
/// it runs.
fn serve_and_push(dir: &Path, spec: &str, url: &str) -> (Server, String) {
    let commit = repo(&dir.join("shop"), spec);
    let port = free_port();
    let config = config_with(dir, port, &dir.join("shop"), &broker_section(url, port));
    let server = start(&config, port);
    assert_eq!(hook(&server.url, "d-worker", &push_payload(&commit)), 202);
    let running = wait_for(&server.url, "the build starts", |b| {
        b["builds"][0]["status"] == "running" || b["builds"][0]["status"] == "success"
    });
    let id = running["builds"][0]["id"].as_str().expect("id").to_owned();
    (server, id)
}

fn wait_log(url: &str, id: &str, step: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = log(url, id, step, 1);
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: the log is {text:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finished(url: &str) -> serde_json::Value {
    wait_for(url, "the build ends", |b| !matches!(b["builds"][0]["status"].as_str(), Some("running" | "queued")))
}

#[test]
fn a_testos_step_runs_on_a_worker_with_its_output_streamed_live() {
    let url = broker(55672);
    let dir = tempfile::tempdir().expect("temp dir");
    let _w1 = Worker::start(dir.path(), &url, "os=testos", "w1");
    let _w2 = Worker::start(dir.path(), &url, "os=testos,arch=x86", "w2");
    let spec = "pipelines:\n  test:\n    steps:\n      - name: remote\n        image: busybox\n        runs_on: { os: testos }\n        env: { GREETING: hello }\n        commands:\n          - echo \"first $GREETING\"\n          - sleep 2\n          - echo \"workspace has $(head -n 1 .cib.yml)\"\n          - echo \"home is $HOME\"\n";
    let (server, id) = serve_and_push(dir.path(), spec, &url);
    // Live: the first line is there while the step still sleeps, before the second.
    let early = wait_log(&server.url, &id, "remote", "the first line arrives", |t| t.contains("first hello"));
    assert!(!early.contains("workspace has"), "the output came all at once: {early}");
    let running = super::restart::builds(&server.url);
    assert_eq!(running["builds"][0]["status"], "running", "the first line came while the step ran");
    let done = finished(&server.url);
    let rec = record(&server.url, &id);
    assert_eq!(done["builds"][0]["status"], "success", "{rec:#}");
    assert_eq!(attempts(&rec, "remote"), vec![(1, "success".to_owned())]);
    let text = log(&server.url, &id, "remote", 1);
    assert!(text.contains("cib: running on worker w"), "{text}");
    assert!(text.contains("workspace has pipelines:"), "the checkout reached the worker: {text}");
    // On the host, in a directory of the step's own (a container's home would be /root).
    assert!(text.contains("home is /tmp/cib-step-"), "it ran on the host, in a fresh directory: {text}");
    drop(server);
}

#[test]
fn a_worker_killed_mid_step_is_taken_over_and_its_late_result_is_refused() {
    let url = broker(55672);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut workers = [
        Worker::start(dir.path(), &url, "os=testos-kill", "k1"),
        Worker::start(dir.path(), &url, "os=testos-kill", "k2"),
    ];
    let spec = "pipelines:\n  test:\n    steps:\n      - name: remote\n        image: busybox\n        runs_on: { os: testos-kill }\n        commands: [echo started, sleep 3, echo finished]\n";
    let (server, id) = serve_and_push(dir.path(), spec, &url);
    wait_log(&server.url, &id, "remote", "the step starts", |t| t.contains("started"));
    let (index, job, token) = workers
        .iter()
        .enumerate()
        .find_map(|(i, w)| w.claims().into_iter().next().map(|(job, token)| (i, job, token)))
        .expect("one worker holds the job");
    let dead = workers[index].name.clone();
    workers[index].kill();
    // The other worker takes it over once the dead one's heartbeats are stale.
    let over =
        wait_log(&server.url, &id, "remote", "the other worker takes over", |t| t.contains("takes the step over"));
    assert!(over.contains(&format!("worker {dead} stopped heartbeating")), "{over}");
    // The dead worker's result, replayed with its claim token while the new claim runs, is
    // refused as fenced.
    let (status, body) = http(
        &server.url,
        "POST",
        &format!("/api/v1/worker/jobs/{job}/result"),
        &[("authorization", &format!("Bearer {token}")), ("content-type", "application/json")],
        br#"{"outcome": {"exited": 0}}"#,
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("\"fenced\""), "{body}");
    let done = finished(&server.url);
    let rec = record(&server.url, &id);
    assert_eq!(done["builds"][0]["status"], "success", "{rec:#}");
    assert_eq!(attempts(&rec, "remote"), vec![(1, "success".to_owned())], "the step passed once");
    let text = log(&server.url, &id, "remote", 1);
    assert_eq!(text.matches("finished").count(), 1, "one run's result counts: {text}");
    // After the step, the old token opens nothing at all.
    let (status, body) = http(
        &server.url,
        "POST",
        &format!("/api/v1/worker/jobs/{job}/result"),
        &[("authorization", &format!("Bearer {token}")), ("content-type", "application/json")],
        br#"{"outcome": {"exited": 1}}"#,
    );
    assert_eq!(status, 410, "{body}");
    assert_eq!(record(&server.url, &id)["steps"], rec["steps"], "nothing changed");
    drop(server);
}

#[test]
fn a_broker_restart_mid_build_loses_nothing() {
    // A node of this test's own, so that restarting it disturbs no other test.
    let port = 55682;
    let url = broker(port);
    let dir = tempfile::tempdir().expect("temp dir");
    let _w1 = Worker::start(dir.path(), &url, "os=testos-restart", "r1");
    let _w2 = Worker::start(dir.path(), &url, "os=testos-restart", "r2");
    let spec = "pipelines:\n  test:\n    steps:\n      - name: one\n        image: busybox\n        runs_on: { os: testos-restart }\n        commands: [echo one, sleep 2, echo one done]\n      - name: two\n        image: busybox\n        runs_on: { os: testos-restart }\n        depends_on: [one]\n        commands: [echo two]\n";
    let (server, id) = serve_and_push(dir.path(), spec, &url);
    wait_log(&server.url, &id, "one", "step one starts", |t| t.contains("one"));
    stop_broker(port);
    let restarted = broker(port);
    assert_eq!(restarted, url);
    let done = finished(&server.url);
    let rec = record(&server.url, &id);
    assert_eq!(done["builds"][0]["status"], "success", "{rec:#}");
    assert_eq!(attempts(&rec, "one"), vec![(1, "success".to_owned())]);
    assert_eq!(attempts(&rec, "two"), vec![(1, "success".to_owned())]);
    assert!(log(&server.url, &id, "one", 1).contains("one done"));
    assert!(log(&server.url, &id, "two", 1).contains("two"));
    drop(server);
    stop_broker(port);
}

#[test]
fn a_job_that_kills_every_worker_is_dead_lettered_with_the_reason_on_the_step() {
    let url = broker(55672);
    let dir = tempfile::tempdir().expect("temp dir");
    let labels = "os=testos-deadly";
    let mut workers =
        vec![Worker::start(dir.path(), &url, labels, "d1"), Worker::start(dir.path(), &url, labels, "d2")];
    let spec = "pipelines:\n  test:\n    steps:\n      - name: deadly\n        image: busybox\n        runs_on: { os: testos-deadly }\n        commands: [echo \"killing $PPID\", kill -9 $PPID]\n";
    let (server, id) = serve_and_push(dir.path(), spec, &url);
    // Workers die with each try; like a supervisor, the test starts new ones.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut started = 2;
    loop {
        let b = super::restart::builds(&server.url);
        if !matches!(b["builds"][0]["status"].as_str(), Some("running" | "queued")) {
            break;
        }
        assert!(Instant::now() < deadline, "the job was never dead-lettered: {}", log(&server.url, &id, "deadly", 1));
        for w in &mut workers {
            if !w.alive() {
                started += 1;
                *w = Worker::start(dir.path(), &url, labels, &format!("d{started}"));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rec = record(&server.url, &id);
    let step =
        rec["steps"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "deadly")).expect("the step").clone();
    assert_ne!(rec["build"]["status"], "success", "{rec:#}");
    let detail = step["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(
            "the job was dead-lettered after 3 tries (2 redeliveries): every worker that took it was lost before reporting a result"
        ),
        "the reason is on the step: {rec:#}"
    );
    let text = log(&server.url, &id, "deadly", 1);
    // Three claims, one per try: the first delivery and 2 redeliveries (max_tries = 3 by
    // default). The step's own output may die with its worker before it is sent, so the
    // claims are what is counted.
    assert!(text.contains("takes the step over (claim 3)"), "{text}");
    assert!(!text.contains("(claim 4)"), "no fourth try: {text}");
    drop(server);
}

/// `[broker] max_tries` is the job queues' `x-delivery-limit`, which a quorum queue cannot
/// change: a queue made with another limit is made again when it is empty, and left alone
/// with a clear refusal while it holds jobs.
#[test]
fn a_changed_max_tries_replaces_an_empty_queue_and_refuses_one_that_holds_jobs() {
    use cib_worker::broker::{self, DeclareError};
    let url = broker(55672);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let queue = format!("cib.jobs.os=testos-tries-{}", std::process::id());
        let connection = broker::connect(&url, 5, "cib test max_tries").await.expect("connects");
        let channel = broker::confirm_channel(&connection).await.expect("a channel");
        broker::declare_job_queue(&connection, &queue, 3).await.expect("made with 3 tries");
        broker::declare_job_queue(&connection, &queue, 3).await.expect("declared again alike");
        assert_eq!(broker::job_queue_waiting(&connection, &queue).await.expect("asks"), Some(0), "a worker finds it");
        broker::publish(&channel, &queue, b"{}").await.expect("a job in it");
        // It holds a job: not replaced, and the reason says what to do.
        let refused = broker::declare_job_queue(&connection, &queue, 2).await.expect_err("refused");
        let DeclareError::Inequivalent(reason) = &refused else { panic!("not the clear refusal: {refused}") };
        assert!(reason.contains(&format!("the job queue {queue} exists with another delivery limit")), "{reason}");
        assert!(reason.contains("max_tries = 2") && reason.contains("still holds jobs"), "{reason}");
        assert!(reason.contains(&format!("rabbitmqctl delete_queue '{queue}'")), "{reason}");
        // The job is still there.
        let held = broker::job_queue_waiting(&connection, &queue).await.expect("asks");
        assert_eq!(held, Some(1), "the refusal lost nothing");
        // Once empty, it is made again with the new limit: a job in it, declaring with 2
        // again needs no replacement, and declaring with 3 is now the one refused.
        channel.queue_purge(queue.as_str().into(), Default::default()).await.expect("purged");
        broker::declare_job_queue(&connection, &queue, 2).await.expect("replaced with 2 tries");
        broker::publish(&channel, &queue, b"{}").await.expect("a job in it");
        broker::declare_job_queue(&connection, &queue, 2).await.expect("it has the limit of 2 tries");
        let refused = broker::declare_job_queue(&connection, &queue, 3).await.expect_err("3 is refused now");
        assert!(matches!(refused, DeclareError::Inequivalent(_)), "{refused}");
        channel.queue_delete(queue.as_str().into(), Default::default()).await.expect("removed");
    });
}
