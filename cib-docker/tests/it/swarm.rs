//! The Swarm executor against a real single-node swarm on the test daemon.
//!
//! Each test takes a file lock (`/tmp/cib-swarm-tests.lock`), so that swarm tests of any
//! process run one at a time, makes the daemon a swarm manager when it is not one
//! (`docker swarm init --advertise-addr 127.0.0.1`), and leaves the swarm afterwards only if it
//! made it. Plain containers of other tests keep working meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::{ListSecretsOptions, ListServicesOptions};
use cib_core::event::BuildId;
use cib_core::pipeline::{StepJob, StopReason};
use cib_core::ports::{CacheJob, ExecError, Executor, Outcome, StepRun, StopSignal, Stream};
use cib_core::spec::{self, RunsOn};
use cib_core::testing::executor_conformance;
use cib_docker::naming::LABEL_ENGINE;
use cib_docker::{SwarmExecutor, SwarmOptions};

use crate::common::*;

/// The daemon as a swarm manager for one test, serialised with every other swarm test.
struct Swarm {
    _lock: std::fs::File,
    created: bool,
}

fn docker_cli(args: &[&str]) -> String {
    let out =
        std::process::Command::new("docker").args(args).output().unwrap_or_else(|e| panic!("docker {args:?}: {e}"));
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn swarm() -> Swarm {
    let lock = std::fs::File::create("/tmp/cib-swarm-tests.lock").unwrap_or_else(|e| panic!("lock file: {e}"));
    lock.lock().unwrap_or_else(|e| panic!("locking: {e}"));
    let state = docker_cli(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
    let created = state == "inactive";
    if created {
        docker_cli(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
    }
    Swarm { _lock: lock, created }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.created {
            let _ = std::process::Command::new("docker").args(["swarm", "leave", "--force"]).output();
        }
    }
}

async fn swarm_executor(test: &str, adjust: impl FnOnce(&mut SwarmOptions)) -> Arc<SwarmExecutor> {
    let mut options = SwarmOptions::new(instance(&format!("swarm-{test}")));
    options.docker.stop_grace = Duration::from_secs(2);
    adjust(&mut options);
    Arc::new(SwarmExecutor::connect(options).await.unwrap_or_else(|e| panic!("connecting to the swarm: {e}")))
}

/// Everything of this executor's instance that Docker still has: services and secrets as well
/// as containers, volumes and networks, asked of Docker directly.
async fn swarm_leftovers(exec: &SwarmExecutor) -> Vec<String> {
    let instance = &exec.options().docker.instance;
    let mut left = leftovers(exec.docker(), instance).await;
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![format!("{LABEL_ENGINE}={instance}")])]);
    let services = exec
        .docker()
        .list_services(Some(ListServicesOptions { filters: Some(filters.clone()), ..Default::default() }))
        .await
        .unwrap_or_else(|e| panic!("listing services: {e}"));
    left.extend(services.into_iter().map(|s| format!("service {:?}", s.spec.and_then(|s| s.name))));
    let secrets = exec
        .docker()
        .list_secrets(Some(ListSecretsOptions { filters: Some(filters) }))
        .await
        .unwrap_or_else(|e| panic!("listing secrets: {e}"));
    left.extend(secrets.into_iter().map(|s| format!("secret {:?}", s.spec.and_then(|s| s.name))));
    left
}

async fn assert_swarm_clean(exec: &SwarmExecutor) {
    let left = swarm_leftovers(exec).await;
    assert!(left.is_empty(), "left behind: {left:#?}");
}

async fn run_step(exec: &SwarmExecutor, run: &StepRun, sink: Arc<Sink>) -> Result<Outcome, ExecError> {
    let (_keep, stop) = StopSignal::new();
    exec.run(run, sink, stop).await
}

/// Runs a step and stops it with `reason` once `ready` is on stdout; the outcome and the time
/// from the stop to the end.
async fn run_and_stop(exec: &SwarmExecutor, job: StepJob, reason: StopReason) -> (Outcome, Duration) {
    let dir = tempdir();
    let sink = Sink::new();
    let (handle, stop) = StopSignal::new();
    let run = step_run(job, dir.path());
    let stopper = async {
        sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(30)).await;
        handle.stop(reason);
        Instant::now()
    };
    let (outcome, stopped_at) = tokio::join!(exec.run(&run, sink.clone(), stop), stopper);
    (outcome.unwrap_or_else(|e| panic!("run: {e}")), stopped_at.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_passes_the_executor_conformance_suite() {
    let _swarm = swarm();
    let exec = swarm_executor("conformance", |_| {}).await;
    let dir = tempdir();
    if let Err(broken) = executor_conformance(exec.clone(), IMAGE, dir.path()).await {
        panic!("conformance on Swarm: {broken}");
    }
    assert_swarm_clean(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_output_keeps_its_order_and_secrets_stay_out_of_logs_and_service_specs() {
    let _swarm = swarm();
    let exec = swarm_executor("output", |_| {}).await;
    let dir = tempdir();
    let mut job = job(
        "order",
        "count",
        &[
            "i=0; while [ $i -lt 300 ]; do echo \"line $i\"; i=$((i+1)); done",
            "echo \"token=$API_TOKEN\"",
            "echo ready; sleep 2",
            "echo after; echo to-stderr >&2",
        ],
    );
    job.step.secrets = vec!["API_TOKEN".into()];
    let mut run = step_run(job, dir.path());
    run.secrets = BTreeMap::from([("API_TOKEN".to_owned(), "sw4rm-s3cr3t".to_owned())]);
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let inspect = async {
        sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(60)).await;
        // While the step runs, its service's spec holds no secret value.
        let filters = std::collections::HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_ENGINE}={}", exec.options().docker.instance)],
        )]);
        let services = exec
            .docker()
            .list_services(Some(ListServicesOptions { filters: Some(filters), ..Default::default() }))
            .await
            .unwrap_or_else(|e| panic!("listing services: {e}"));
        assert_eq!(services.len(), 1, "one service for the running step");
        serde_json::to_string(&services).unwrap_or_default()
    };
    let (outcome, specs) = tokio::join!(exec.run(&run, sink.clone(), stop), inspect);
    assert_eq!(outcome.unwrap_or_else(|e| panic!("run: {e}")), Outcome::Exited(0));
    assert!(!specs.contains("sw4rm-s3cr3t"), "the secret is in the service's spec");
    let out = sink.text(Stream::Stdout);
    let expected: String = (0..300).map(|i| format!("line {i}\n")).collect::<String>() + "token=***\nready\nafter\n";
    assert_eq!(out, expected);
    assert_eq!(sink.text(Stream::Stderr), "to-stderr\n");
    exec.cleanup(&BuildId::from("order")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_swarm_clean(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_out_of_memory_timeout_and_cancel_are_outcomes() {
    let _swarm = swarm();
    let exec = swarm_executor("outcomes", |_| {}).await;
    let dir = tempdir();
    // `sort` keeps all its input in memory; 200 MiB of it does not fit in 16 MiB.
    let mut hog = job("oom", "hog", &["head -c 200m /dev/zero | sort > /dev/null", "echo unreachable"]);
    hog.step.limits.memory = Some(spec::Memory(16 << 20));
    let sink = Sink::new();
    let outcome = run_step(&exec, &step_run(hog, dir.path()), sink.clone()).await;
    assert_eq!(outcome.unwrap_or_else(|e| panic!("run: {e}")), Outcome::OutOfMemory);
    assert!(!sink.text(Stream::Stdout).contains("unreachable"));
    assert!(!sink.text(Stream::Stdout).contains("cib:oom"), "the token is taken out of the log");
    // A step that fails on its own, with memory to spare, is not out of memory.
    let fails = job("oom", "fails", &["exit 137"]);
    let outcome = run_step(&exec, &step_run(fails, dir.path()), Sink::new()).await;
    assert_eq!(outcome.unwrap_or_else(|e| panic!("run: {e}")), Outcome::Exited(137));
    for (build, reason, expected) in
        [("timeout", StopReason::TimedOut, Outcome::TimedOut), ("cancel", StopReason::Cancelled, Outcome::Cancelled)]
    {
        let (outcome, took) = run_and_stop(&exec, job(build, "sleeper", &["echo ready", "sleep 60"]), reason).await;
        assert_eq!(outcome, expected);
        assert!(took < Duration::from_secs(10), "{build} took {took:?}");
    }
    for build in ["oom", "timeout", "cancel"] {
        exec.cleanup(&BuildId::from(build)).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    }
    assert_swarm_clean(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_reconcile_after_a_kill_removes_everything() {
    let _swarm = swarm();
    let exec = swarm_executor("kill", |_| {}).await;
    let dir = tempdir();
    let mut job = job("killed", "long", &["echo ready", "sleep 120"]);
    job.step.secrets = vec!["TOKEN".into()];
    let mut run = step_run(job, dir.path());
    run.secrets = BTreeMap::from([("TOKEN".to_owned(), "kill-s3cr3t".to_owned())]);
    let sink = Sink::new();
    let task = {
        let (exec, sink) = (exec.clone(), sink.clone());
        tokio::spawn(async move {
            let (_keep, stop) = StopSignal::new();
            let _ = exec.run(&run, sink, stop).await;
        })
    };
    sink.wait_for(Stream::Stdout, "ready", Duration::from_secs(60)).await;
    // The engine dies: nothing of its own removes anything any more.
    exec.detach();
    task.abort();
    let _ = task.await;
    let left = swarm_leftovers(&exec).await;
    assert!(left.iter().any(|l| l.starts_with("service")), "{left:?}");
    assert!(left.iter().any(|l| l.starts_with("secret")), "{left:?}");
    assert!(left.iter().any(|l| l.starts_with("volume")), "{left:?}");
    // The next process of the same instance finds all of it by its labels.
    let next = swarm_executor("kill", |_| {}).await;
    let removed = next.reconcile(&[]).await.unwrap_or_else(|e| panic!("reconcile: {e}"));
    assert!(removed >= 3, "reconcile removed {removed}");
    assert_swarm_clean(&next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_runs_a_multi_step_build_with_a_shared_workspace_and_a_service() {
    let _swarm = swarm();
    let exec = swarm_executor("build", |_| {}).await;
    let dir = tempdir();
    std::fs::write(dir.path().join("input.txt"), "from the checkout\n").unwrap_or_else(|e| panic!("{e}"));
    let build = BuildId::from("multi");
    let web = spec::Service {
        name: "web".into(),
        image: IMAGE.into(),
        env: BTreeMap::from([("GREETING".to_owned(), "pong".to_owned())]),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            "mkdir -p /www && echo \"$GREETING\" > /www/ping && exec httpd -f -p 8080 -h /www".into(),
        ]),
        ready: Some(spec::Readiness {
            command: "wget -q -O - http://127.0.0.1:8080/ping".into(),
            interval: spec::Duration::from_secs(1),
            timeout: spec::Duration::from_secs(30),
        }),
    };
    exec.start_services(&build, &[web]).await.unwrap_or_else(|(name, e)| panic!("service {name}: {e}"));
    let first = job("multi", "make", &["cat input.txt > made.txt", "echo made-by-one >> made.txt"]);
    let sink = Sink::new();
    let outcome = run_step(&exec, &step_run(first, dir.path()), sink.clone()).await;
    assert_eq!(outcome.unwrap_or_else(|e| panic!("first step: {e}")), Outcome::Exited(0));
    let mut second = job("multi", "use", &["cat made.txt", "wget -q -O - http://web:8080/ping"]);
    second.step.services = vec!["web".into()];
    second.step.depends_on = vec!["make".into()];
    let outcome = run_step(&exec, &step_run(second, dir.path()), sink.clone()).await;
    assert_eq!(outcome.unwrap_or_else(|e| panic!("second step: {e}")), Outcome::Exited(0));
    assert_eq!(sink.text(Stream::Stdout), "from the checkout\nmade-by-one\npong\n");
    exec.cleanup(&build).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_swarm_clean(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_places_by_node_labels_and_refuses_what_no_node_can_take() {
    let _swarm = swarm();
    let exec = swarm_executor("placement", |o| o.placement_timeout = Duration::from_secs(3)).await;
    let dir = tempdir();
    let node = docker_cli(&["info", "--format", "{{.Swarm.NodeID}}"]);
    let label = format!("cib-test-{}", std::process::id());
    docker_cli(&["node", "update", "--label-add", &format!("{label}=here"), &node]);
    let on = |labels: &[(&str, &str)]| RunsOn {
        os: Some("linux".into()),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    };

    // A label this node has: the step runs here.
    let mut placed = job("placed", "here", &["echo placed"]);
    placed.step.runs_on = Some(on(&[(&label, "here")]));
    let sink = Sink::new();
    let outcome = run_step(&exec, &step_run(placed, dir.path()), sink.clone()).await;
    assert_eq!(outcome.unwrap_or_else(|e| panic!("placed: {e}")), Outcome::Exited(0));
    assert_eq!(sink.text(Stream::Stdout), "placed\n");

    // A label no node has: a clear reason, at once, and nothing made.
    let mut nowhere = job("nowhere", "gpu", &["echo never"]);
    nowhere.step.runs_on = Some(on(&[("gpu", "yes")]));
    let started = Instant::now();
    let err = run_step(&exec, &step_run(nowhere, dir.path()), Sink::new()).await.expect_err("no node has gpu=yes");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(err.message().contains("no Swarm node has os linux, gpu=yes"), "{err}");

    // Labels fit but the resources do not: Swarm holds the task pending, and the step fails
    // with Swarm's reason after the placement timeout instead of waiting for ever.
    let mut huge = job("huge", "big", &["echo never"]);
    huge.step.limits.cpus = Some(512.0);
    huge.step.limits.memory = Some(spec::Memory(1 << 50));
    let started = Instant::now();
    let err = run_step(&exec, &step_run(huge, dir.path()), Sink::new()).await.expect_err("no node has 1 PiB");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(err.message().contains("could not place"), "{err}");

    docker_cli(&["node", "update", "--label-rm", &label, &node]);
    for build in ["placed", "nowhere", "huge"] {
        exec.cleanup(&BuildId::from(build)).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    }
    assert_swarm_clean(&exec).await;
}

/// A second node of the swarm (`scripts/swarm-second-node`): a second dockerd in a network
/// namespace of its own, joined over a private veth pair, the test daemon its manager. Made
/// under the swarm tests' lock; everything is undone when dropped, also when the test fails.
struct SecondNode {
    _lock: std::fs::File,
    id: String,
}

const NODE2_SOCKET: &str = "unix:///tmp/cib-swarm-node2/docker.sock";

fn second_node_script(action: &str) -> std::process::Output {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/swarm-second-node");
    std::process::Command::new(script)
        .arg(action)
        .output()
        .unwrap_or_else(|e| panic!("swarm-second-node {action}: {e}"))
}

impl SecondNode {
    fn up() -> SecondNode {
        let lock = std::fs::File::create("/tmp/cib-swarm-tests.lock").unwrap_or_else(|e| panic!("lock file: {e}"));
        lock.lock().unwrap_or_else(|e| panic!("locking: {e}"));
        let out = second_node_script("up");
        if !out.status.success() {
            second_node_script("down");
            panic!("the second node could not be made: {}", String::from_utf8_lossy(&out.stderr));
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        SecondNode { _lock: lock, id }
    }
}

impl Drop for SecondNode {
    fn drop(&mut self) {
        let out = second_node_script("down");
        // A failed undo fails a test that passed; during a failure's unwinding a second panic
        // would abort, and the first failure is the one to read.
        if !out.status.success() && !std::thread::panicking() {
            panic!("swarm-second-node down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The volumes of `instance` that the daemon at `host` holds (`None`: the test daemon).
fn volumes_on(host: Option<&str>, instance: &str) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(host) = host {
        args.extend(["-H", host]);
    }
    let filter = format!("label={LABEL_ENGINE}={instance}");
    args.extend(["volume", "ls", "-q", "--filter", &filter]);
    docker_cli(&args).lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_places_builds_on_a_second_node_by_label_and_keeps_each_build_on_one_node() {
    let node2 = SecondNode::up();
    let node1 = docker_cli(&["info", "--format", "{{.Swarm.NodeID}}"]);
    assert_ne!(node1, node2.id);
    let label = format!("cib-node-{}", std::process::id());
    docker_cli(&["node", "update", "--label-add", &format!("{label}=one"), &node1]);
    docker_cli(&["node", "update", "--label-add", &format!("{label}=two"), &node2.id]);
    // The second node reaches the workspace server over the veth pair, not through its own
    // default gateway.
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("a free port: {e}"))
        .port();
    let exec = swarm_executor("node2", |o| {
        o.serve_bind = std::net::SocketAddr::from(([0, 0, 0, 0], port));
        o.serve_address = Some(format!("192.168.251.1:{port}"));
        o.placement_timeout = Duration::from_secs(20);
    })
    .await;
    let instance = exec.options().docker.instance.clone();
    let dir = tempdir();
    std::fs::write(dir.path().join("input.txt"), "from the checkout\n").unwrap_or_else(|e| panic!("{e}"));
    let on = |value: &str| RunsOn { os: None, labels: BTreeMap::from([(label.clone(), value.to_owned())]) };

    // A build whose first step asks for node two: its workspace is filled there, and its
    // second step, which asks for nothing, follows it there and finds what the first wrote.
    let mut first = job("far", "make", &["cat input.txt > made.txt", "echo made-on-two >> made.txt"]);
    first.step.runs_on = Some(on("two"));
    let sink = Sink::new();
    let outcome = run_step(&exec, &step_run(first, dir.path()), sink.clone()).await;
    assert_eq!(outcome.unwrap_or_else(|e| panic!("first step on node two: {e}")), Outcome::Exited(0));
    let mut second = job("far", "use", &["cat made.txt"]);
    second.step.depends_on = vec!["make".into()];
    let outcome = run_step(&exec, &step_run(second, dir.path()), sink.clone()).await;
    assert_eq!(outcome.unwrap_or_else(|e| panic!("second step: {e}")), Outcome::Exited(0));
    assert_eq!(sink.text(Stream::Stdout), "from the checkout\nmade-on-two\n");
    assert_eq!(volumes_on(Some(NODE2_SOCKET), &instance).len(), 1, "the build's workspace is on node two");
    assert!(volumes_on(None, &instance).is_empty(), "and not on node one");

    // A later step of that build that asks for node one cannot follow: a clear reason.
    let mut elsewhere = job("far", "back", &["echo never"]);
    elsewhere.step.runs_on = Some(on("one"));
    let err = run_step(&exec, &step_run(elsewhere, dir.path()), Sink::new()).await.expect_err("pinned to node two");
    assert!(err.message().contains(&format!("{label}=one")), "{err}");

    // A build that asks for node one runs there.
    let mut near = job("near", "here", &["cat input.txt"]);
    near.step.runs_on = Some(on("one"));
    let sink = Sink::new();
    let outcome = run_step(&exec, &step_run(near, dir.path()), sink.clone()).await;
    assert_eq!(outcome.unwrap_or_else(|e| panic!("step on node one: {e}")), Outcome::Exited(0));
    assert_eq!(sink.text(Stream::Stdout), "from the checkout\n");
    assert_eq!(volumes_on(None, &instance).len(), 1, "the second build's workspace is on node one");

    for build in ["far", "near"] {
        exec.cleanup(&BuildId::from(build)).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    }
    assert_swarm_clean(&exec).await;
    docker_cli(&["node", "update", "--label-rm", &label, &node1]);
    drop(node2);
}

/// What needs the build's workspace on the server's daemon (caches, artifacts, deliverables
/// that read the workspace back) is refused in words on Swarm, never quietly skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_refuses_caches_artifacts_and_workspace_reads_in_words() {
    let _swarm = swarm();
    let exec = swarm_executor("unavailable", |_| {}).await;
    let dir = tempdir();
    let run = step_run(job("unavailable", "cached", &["true"]), dir.path());
    let cache = CacheJob {
        repo: "acme/shop".into(),
        key: "deps-1".into(),
        restore_keys: vec!["deps-".into()],
        paths: vec!["target".into()],
        write: "trusted".into(),
        reads: vec!["trusted".into()],
    };
    let said = |what: &str, err: ExecError| {
        assert_eq!(err.kind(), cib_core::ports::ErrorKind::Permanent, "{what}: {err}");
        assert!(err.message().contains(what), "{err}");
        assert!(err.message().contains("cannot be had on Docker Swarm"), "{err}");
        assert!(err.message().contains("single-daemon executor"), "{err}");
    };
    said("`cache`", exec.restore_cache(&run, &cache).await.expect_err("restore refused"));
    said("`cache`", exec.save_cache(&run, &cache).await.expect_err("save refused"));
    said("`needs_artifacts`", exec.import_archive(&run, &dir.path().join("a.tgz")).await.expect_err("import refused"));
    said(
        "deliverables and `artifacts`",
        exec.export_workspace(&run.job.build, dir.path()).await.expect_err("export refused"),
    );
    assert_swarm_clean(&exec).await;
}
