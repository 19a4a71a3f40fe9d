//! Prints how long the engine takes to start again, and how much memory it holds then, after
//! 10,000 and 100,000 finished builds: the engine forgets finished builds and writes snapshots,
//! so neither should grow with the history.
//!
//! Run with `cargo bench -p cib-benches --bench restart_with_history` (sizes can be given as
//! arguments: `-- 1000 5000`). For each size it runs that many one-step builds through the real
//! engine on a SQLite store (with the fake executor, so that the history takes a minute rather
//! than hours of containers), stops the engine, then starts it again in a fresh process and
//! measures from the store's opening to the engine answering. Each history ends with 4,999 more
//! builds, so the restart replays the longest journal tail a snapshot allows. The history is written with
//! `synchronous = NORMAL` to spare 100,000s of fsyncs; the restart opens the file as a server
//! does.

// Benchmarks exist to print their figures.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::engine::{Engine, EngineConfig, EngineHandle, Ports, SnapshotPolicy, SystemClock};
use cib_core::event::BuildId;
use cib_core::pipeline::{BuildContext, Config, Input};
use cib_core::ports::{BuildFilter, Page, Store};
use cib_core::spec::TriggerEvent;
use cib_core::testing::{FakeExecutor, FakeVcs, StaticSecrets};
use cib_store::{SqliteOptions, SqliteStore, Synchronous};

const SPEC: &str = "pipelines:\n  test:\n    steps:\n      - { name: unit, image: busybox, commands: [echo ok] }\n";

/// The environment variable that makes this binary the restarted process.
const CHILD: &str = "CIB_BENCH_RESTART_DB";

/// Builds submitted at once while the history is written.
const WAVE: usize = 200;

/// Builds run after the history, so that the journal after the last snapshot is as long as it
/// gets (each build journals two inputs, a snapshot comes every 10,000): the restart measured
/// is the slowest one, replaying 9,998 inputs, not the lucky one right after a snapshot.
const TAIL: usize = 4_999;

fn engine(store: Arc<dyn Store>, vcs: Arc<FakeVcs>, workspaces: &Path) -> (EngineHandle, tokio::task::JoinHandle<()>) {
    let ports = Ports {
        executor: FakeExecutor::new(),
        vcs,
        store,
        notifiers: Vec::new(),
        clock: Arc::new(SystemClock),
        secrets: Arc::new(StaticSecrets::default()),
        publisher: Arc::new(cib_core::publish::NoPublisher),
        artifacts: Arc::new(cib_core::ports::NoArtifacts),
    };
    let config = EngineConfig {
        machine: Config { max_running_steps: 64, ..Config::default() },
        workspace_root: workspaces.to_path_buf(),
        tick_every: Duration::from_secs(15),
        reconcile_every: cib_core::engine::RECONCILE_EVERY,
        snapshots: SnapshotPolicy::default(),
    };
    let (handle, future) = Engine::start(ports, config);
    let task = tokio::spawn(async move {
        if let Err(error) = future.await {
            eprintln!("the engine stopped: {error}");
            std::process::exit(1);
        }
    });
    (handle, task)
}

/// Runs `builds` one-step builds to their end through the engine, on the database at `db`.
async fn write_history(db: &Path, workspaces: &Path, builds: usize) -> Duration {
    let options = SqliteOptions { synchronous: Synchronous::Normal, ..SqliteOptions::default() };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db, options).expect("open the store"));
    let vcs = FakeVcs::new();
    let commit = vcs.commit("acme/shop", "master", &[(".cib.yml", SPEC)]);
    let (engine, task) = engine(store.clone(), vcs, workspaces);
    let spec: Arc<str> = Arc::from(SPEC);
    let started = Instant::now();
    let mut next = 0;
    while next < builds {
        let wave = WAVE.min(builds - next);
        let submits = (next..next + wave).map(|i| {
            let engine = engine.clone();
            let input = Input::Enqueue {
                build: BuildId(format!("b{i}")),
                spec: spec.clone(),
                pipeline: "test".into(),
                context: BuildContext {
                    repo: "acme/shop".into(),
                    commit: commit.clone(),
                    branch: Some(format!("feature/{i}")),
                    pull_request: None,
                    event: TriggerEvent::push(&format!("feature/{i}")),
                    actor: Some("dev".into()),
                    trusted: true,
                    upstream: None,
                },
                only: None,
                variables: Default::default(),
            };
            tokio::spawn(async move { engine.submit(input).await })
        });
        for submit in submits.collect::<Vec<_>>() {
            submit.await.expect("join").expect("submit");
        }
        next += wave;
        // The wave is done when the machine holds no build: it forgets each one that finishes.
        while engine.query(|m| m.builds().count()).await.expect("query") > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if next % 10_000 == 0 {
            eprintln!("  {next} builds in {:.0?}", started.elapsed());
        }
    }
    let took = started.elapsed();
    engine.shutdown().await;
    let _ = task.await;
    let recorded = store.builds(&BuildFilter::default(), Page::first(builds + 1)).await.expect("read").len();
    assert_eq!(recorded, builds, "every build is recorded");
    took
}

/// The restarted process: opens the store, starts the engine, and prints how long until it
/// answers and how much memory it holds then.
async fn restart(db: &Path) {
    let started = Instant::now();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db, SqliteOptions::default()).expect("open the store"));
    let snapshot = store.latest_snapshot().await.expect("read").map_or(0, |(seq, _)| seq);
    let workspaces = tempfile::tempdir().expect("temp dir");
    let (engine, _task) = engine(store, FakeVcs::new(), workspaces.path());
    let live = engine.query(|m| m.builds().count()).await.expect("the engine answers");
    let took = started.elapsed();
    let replayed = engine.journal_length();
    println!(
        "restart_ms={} rss_kib={} peak_kib={} live={live} replayed={replayed} snapshot={snapshot}",
        took.as_millis(),
        status_kib("VmRSS"),
        status_kib("VmHWM")
    );
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn field(line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    if let Ok(db) = std::env::var(CHILD) {
        runtime.block_on(restart(Path::new(&db)));
        return;
    }
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.replace('_', "").parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10_000, 100_000] } else { sizes };
    println!("restart_with_history: the engine restarted in a fresh process after N (+{TAIL}) finished builds");
    println!(
        "{:>9}  {:>11}  {:>11}  {:>9}  {:>9}  {:>8}  {:>9}",
        "builds", "history", "restart", "rss", "peak rss", "replayed", "db size"
    );
    for builds in sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("cib.db");
        let workspaces = dir.path().join("workspaces");
        let history = runtime.block_on(write_history(&db, &workspaces, builds + TAIL));
        let size: u64 = std::fs::read_dir(dir.path())
            .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
            .unwrap_or(0);
        // Three restarts, the median reported, so a stray hiccup does not decide the figure.
        let mut runs: Vec<String> = (0..3)
            .map(|_| {
                let out = std::process::Command::new(std::env::current_exe().expect("this binary"))
                    .env(CHILD, &db)
                    .output()
                    .expect("run the restart");
                assert!(out.status.success(), "the restart failed: {}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned()
            })
            .collect();
        runs.sort_by_key(|line| field(line, "restart_ms").parse::<u64>().unwrap_or(u64::MAX));
        let median = &runs[1];
        let mib = |kib: String| kib.parse::<f64>().map_or("?".into(), |k| format!("{:.1} MiB", k / 1024.0));
        println!(
            "{builds:>9}  {:>11}  {:>8} ms  {:>9}  {:>9}  {:>8}  {:>6.1} MiB",
            format!("{:.1?}", history),
            field(median, "restart_ms"),
            mib(field(median, "rss_kib")),
            mib(field(median, "peak_kib")),
            field(median, "replayed"),
            size as f64 / 1_048_576.0
        );
    }
}
