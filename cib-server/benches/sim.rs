//! The simulation (issue 22, P8): a million builds a day, with a ten-minute peak of 100
//! webhooks a second, into the real server (HTTP intake, the inbox, the engine, the store) on
//! PostgreSQL, with a simulated executor.
//!
//! - **The server** is `cib serve`'s own code, started in this process (`server::start` and
//!   `server::serve`, as `cib serve` calls them) on a runtime of its own, with the PostgreSQL
//!   store on a database of its own (`scripts/ensure-postgres`'s cluster) and `[retention]` on.
//! - **The simulated executor** ([`SimExecutor`]) is a real `Executor`: the engine hands it
//!   each step, and it prints a log and finishes after a duration drawn from a log-normal
//!   distribution (median 15 s, 88% under a minute, a long tail cut at an hour), divided by
//!   the time compression (`CIB_SIM_COMPRESSION`, 60 by default). Steps are not limited by
//!   runners: the simulation measures cib, not a fleet.
//! - **The arrival pattern**: signed GitHub push webhooks, at the rate of a day of 1,000,000
//!   builds outside the peak (the day's builds less the peak's, over the rest of the day: about
//!   11/s), then the peak (100/s for `CIB_SIM_PEAK_MINUTES`, 10 by default), then the off-peak
//!   rate again. Arrivals are real-time: the rates are the day's own, so a wall second is a
//!   second of that day's busiest part; what is compressed is the steps' durations.
//! - **It prints** a table: sustained builds/s, p50/p99 webhook → 202 and webhook → first step
//!   started, outside and within the peak; CPU cores of cib (this process less the load
//!   generator's threads) and of PostgreSQL (its processes, from /proc); RSS; database growth
//!   per simulated day; and the database's size under `[retention]`.
//!
//! Run with `cargo bench -p cib-server --bench sim`. Environment: `CIB_SIM_MINUTES` (wall
//! time, 15 by default), `CIB_SIM_PEAK_MINUTES` (10, at most the run less a minute),
//! `CIB_SIM_PEAK_RATE` (100), `CIB_SIM_DAY_BUILDS` (1000000), `CIB_SIM_COMPRESSION` (60),
//! `CIB_SIM_REPOS` (200), `CIB_SIM_LOG_BYTES` (bytes of log per step, 8192),
//! `CIB_SIM_RETAIN_SECS` (the `[retention]` age of logs, events and deliveries, 120).

// Benchmarks exist to print their figures.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cib_core::event::BuildId;
use cib_core::pipeline::StopReason;
use cib_core::ports::{ExecError, Executor, LogSink, Outcome, StepRun, StopSignal, Stream};
use cib_core::testing::FakeVcs;
use cib_server::config::{GithubConfig, RetentionConfig, ServerConfig};
use cib_server::outgoing::sign;
use cib_server::server;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const SECRET: &str = "simulation-secret";

const SPEC: &str = "pipelines:
  test:
    steps:
      - { name: compile, image: sim, commands: [make] }
      - { name: test, image: sim, commands: [make test], depends_on: [compile] }
      - { name: package, image: sim, commands: [make dist], depends_on: [test] }
";
const STEPS_PER_BUILD: usize = 3;

fn env_f64(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(text) => text.parse().unwrap_or_else(|_| panic!("{name}={text} is not a number")),
        Err(_) => default,
    }
}

#[derive(Debug, Clone)]
struct Params {
    minutes: f64,
    peak_minutes: f64,
    peak_rate: f64,
    day_builds: f64,
    compression: f64,
    repos: usize,
    log_bytes: usize,
    retain_secs: u64,
}

impl Params {
    fn from_env() -> Params {
        let minutes = env_f64("CIB_SIM_MINUTES", 15.0);
        assert!(minutes > 0.0, "CIB_SIM_MINUTES must be above 0");
        let peak_minutes = env_f64("CIB_SIM_PEAK_MINUTES", 10.0).min((minutes - 1.0).max(minutes / 2.0));
        Params {
            minutes,
            peak_minutes,
            peak_rate: env_f64("CIB_SIM_PEAK_RATE", 100.0),
            day_builds: env_f64("CIB_SIM_DAY_BUILDS", 1_000_000.0),
            compression: env_f64("CIB_SIM_COMPRESSION", 60.0).max(1.0),
            repos: env_f64("CIB_SIM_REPOS", 200.0).max(1.0) as usize,
            log_bytes: env_f64("CIB_SIM_LOG_BYTES", 8192.0) as usize,
            retain_secs: env_f64("CIB_SIM_RETAIN_SECS", 120.0).max(1.0) as u64,
        }
    }

    /// The rate outside the peak: the day's builds less the peak's, over the rest of the day.
    fn base_rate(&self) -> f64 {
        let peak_secs = 600.0;
        (self.day_builds - self.peak_rate * peak_secs) / (86_400.0 - peak_secs)
    }

    /// The peak's start and end, in seconds from the start: in the middle of the run.
    fn peak(&self) -> (f64, f64) {
        let start = (self.minutes - self.peak_minutes) * 60.0 / 2.0;
        (start, start + self.peak_minutes * 60.0)
    }

    fn rate_at(&self, t: f64) -> f64 {
        let (start, end) = self.peak();
        if (start..end).contains(&t) { self.peak_rate } else { self.base_rate() }
    }
}

/// A small, seeded generator (xorshift64*), so that a run's durations can be drawn again.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A step's duration in seconds: log-normal with median 15 s and sigma 1.2 (so 88% are under
    /// a minute, 1% over five), at least a second, at most an hour.
    fn step_secs(&mut self) -> f64 {
        let (u1, u2) = (self.next_f64().max(1e-12), self.next_f64());
        let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (15f64.ln() + 1.2 * normal).exp().clamp(1.0, 3600.0)
    }
}

/// What the simulation records about each webhook: when it was sent, and whether in the peak.
#[derive(Default)]
struct Ledger {
    sent: Mutex<HashMap<(String, String), (Instant, bool)>>,
    /// Webhook → first step started, in the peak and outside it.
    to_start: Mutex<(Vec<Duration>, Vec<Duration>)>,
    started_builds: Mutex<std::collections::HashSet<BuildId>>,
    finished_builds: AtomicUsize,
    running_steps: AtomicUsize,
    steps_run: AtomicU64,
}

/// The simulated executor: a real [`Executor`] whose steps print a log and end after a drawn
/// duration, compressed.
struct SimExecutor {
    ledger: Arc<Ledger>,
    rng: Mutex<Rng>,
    compression: f64,
    log_bytes: usize,
}

#[async_trait]
impl Executor for SimExecutor {
    async fn healthcheck(&self) -> Result<(), ExecError> {
        Ok(())
    }

    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, mut stop: StopSignal) -> Result<Outcome, ExecError> {
        let job = &run.job;
        let first = self.ledger.started_builds.lock().expect("ledger").insert(job.build.clone());
        if first {
            let key = (job.context.repo.clone(), job.context.commit.clone());
            if let Some((sent, peak)) = self.ledger.sent.lock().expect("ledger").remove(&key) {
                let mut to_start = self.ledger.to_start.lock().expect("ledger");
                if peak { to_start.0.push(sent.elapsed()) } else { to_start.1.push(sent.elapsed()) }
            }
        }
        self.ledger.running_steps.fetch_add(1, Ordering::Relaxed);
        let secs = self.rng.lock().expect("rng").step_secs();
        let wall = Duration::from_secs_f64(secs / self.compression);
        // The log: a line now, the rest in a few pieces while the step runs, as a build prints.
        let line = |i: usize| {
            format!(
                "[{:>6.1}s] {} {}: compiling module {i} of {} ... ok\n",
                i as f64 * 0.4,
                job.build,
                job.step.name,
                i
            )
        };
        logs.write(Stream::Stdout, line(0).as_bytes());
        let pieces = 4u32;
        let mut printed = 0usize;
        let mut n = 1;
        let mut outcome = Outcome::Exited(0);
        for _ in 0..pieces {
            let mut chunk = String::new();
            while chunk.len() < self.log_bytes / pieces as usize {
                chunk.push_str(&line(n));
                n += 1;
            }
            printed += chunk.len();
            tokio::select! {
                () = tokio::time::sleep(wall / pieces) => logs.write(Stream::Stdout, chunk.as_bytes()),
                reason = stop.stopped() => {
                    outcome = if reason == StopReason::TimedOut { Outcome::TimedOut } else { Outcome::Cancelled };
                    break;
                }
            }
        }
        let _ = printed;
        self.ledger.running_steps.fetch_sub(1, Ordering::Relaxed);
        self.ledger.steps_run.fetch_add(1, Ordering::Relaxed);
        if job.step.name == "package" {
            self.ledger.finished_builds.fetch_add(1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    async fn start_services(
        &self,
        _build: &BuildId,
        _services: &[cib_core::spec::Service],
    ) -> Result<(), (String, ExecError)> {
        Ok(())
    }

    async fn cleanup(&self, _build: &BuildId) -> Result<(), ExecError> {
        Ok(())
    }

    async fn reconcile(&self, _live: &[BuildId]) -> Result<usize, ExecError> {
        Ok(0)
    }
}

/// CPU time, in clock ticks, of this process's threads, split into the load generator's
/// (named `sim-load`) and the rest (cib's).
fn own_ticks() -> (u64, u64) {
    let (mut load, mut rest) = (0, 0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return (0, 0) };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let ticks = stat_ticks(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
        if comm.starts_with("sim-load") { load += ticks } else { rest += ticks }
    }
    (load, rest)
}

/// utime + stime from a `stat` line.
fn stat_ticks(stat: &str) -> u64 {
    let Some(close) = stat.rfind(')') else { return 0 };
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // After the command: state is field 3 of the line, utime 14 and stime 15.
    field(11) + field(12)
}

/// CPU ticks of the PostgreSQL processes that serve this database: its backends, and the
/// cluster's own processes (writer, checkpointer, WAL writer, autovacuum), which are shared
/// with whatever else uses the cluster.
fn postgres_ticks(database: &str) -> u64 {
    let mut total = 0;
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    for p in procs.flatten() {
        let path = p.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("postgres") {
            continue;
        }
        let cmdline = std::fs::read_to_string(path.join("cmdline")).unwrap_or_default().replace('\0', " ");
        // Other databases' backends are not this run's.
        if cmdline.contains("cib_test_") && !cmdline.contains(database) {
            continue;
        }
        total += stat_ticks(&std::fs::read_to_string(path.join("stat")).unwrap_or_default());
    }
    total
}

fn clock_ticks() -> f64 {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output().ok();
    out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
}

fn status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn psql(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql").args([url, "-Atc", sql]).output().expect("psql runs");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn db_size(url: &str) -> u64 {
    psql(url, "SELECT pg_database_size(current_database())").parse().unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// A CPU sample: when, this process's ticks (load generator, rest) and PostgreSQL's.
#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    load: u64,
    cib: u64,
    pg: u64,
}

fn cpu(database: &str) -> Cpu {
    let (load, cib) = own_ticks();
    Cpu { at: Instant::now(), load, cib, pg: postgres_ticks(database) }
}

fn cores(a: Cpu, b: Cpu, hz: f64) -> (f64, f64, f64) {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / hz / secs;
    (per(a.cib, b.cib), per(a.pg, b.pg), per(a.load, b.load))
}

fn main() {
    // The server's own log, for a run that goes wrong: `RUST_LOG=info` (off by default).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let params = Params::from_env();
    let hz = clock_ticks();
    let ledger = Arc::new(Ledger::default());
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cib-server")
        .enable_all()
        .build()
        .expect("runtime");
    let load_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sim-load")
        .enable_all()
        .build()
        .expect("runtime");

    let dir = tempfile::tempdir().expect("temp dir");
    let db = server_runtime.block_on(cib_store::testing::TestDatabase::create()).expect("a database of its own");
    let retention = RetentionConfig {
        logs: Some(cib_core::spec::Duration::from_secs(params.retain_secs)),
        events: Some(cib_core::spec::Duration::from_secs(params.retain_secs)),
        inbox: Some(cib_core::spec::Duration::from_secs(params.retain_secs)),
        every: cib_core::spec::Duration::from_secs(10),
        batch: 1_000,
    };
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        github: GithubConfig { webhook_secret: Some(SECRET.into()), repos: vec!["sim/*".into()], ..Default::default() },
        // The simulation measures cib, not a fleet of runners: every step may start at once.
        max_running_steps: Some(1_000_000),
        retention: retention.clone(),
        ..ServerConfig::default()
    };
    let vcs = FakeVcs::new();
    let executor = Arc::new(SimExecutor {
        ledger: ledger.clone(),
        rng: Mutex::new(Rng(0x9E37_79B9_7F4A_7C15)),
        compression: params.compression,
        log_bytes: params.log_bytes,
    });
    let (url, state) = server_runtime.block_on(async {
        let store = Arc::new(
            cib_store::PgStore::connect(&db.url, cib_store::PgOptions::default()).await.expect("connect to PostgreSQL"),
        );
        let running = server::start(config, executor.clone(), store, vcs.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hooks/github", listener.local_addr().expect("address"));
        tokio::spawn(server::serve(running.state.clone(), listener, std::future::pending()));
        (url, running.state)
    });
    let _ = state;

    let repos: Vec<String> = (0..params.repos).map(|i| format!("sim/app-{i:03}")).collect();
    let size_at_start = db_size(&db.url);
    let (peak_start, peak_end) = params.peak();
    let total_secs = params.minutes * 60.0;
    println!(
        "sim: {:.1} min, peak {:.1} min at {:.0}/s from {:.0} s, off-peak {:.2}/s, {} repositories, steps / {}, {} log bytes per step, retention {} s; load average at start {}",
        params.minutes,
        params.peak_minutes,
        params.peak_rate,
        peak_start,
        params.base_rate(),
        params.repos,
        params.compression,
        params.log_bytes,
        params.retain_secs,
        loadavg()
    );

    // The load generator: open-loop arrivals at the pattern's rate, each webhook its own task,
    // so that a slow answer does not slow the arrivals.
    let start = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new((Vec::<Duration>::new(), Vec::<Duration>::new())));
    let failures = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::<(f64, u64, usize, usize, String)>::new()));
    let cpu_start = cpu(db.name());
    let cpu_marks = Arc::new(Mutex::new(Vec::<(&'static str, Cpu)>::new()));
    load_runtime.block_on(async {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let sampler = tokio::spawn({
            let (url, samples, ledger, sent) = (db.url.clone(), samples.clone(), ledger.clone(), sent.clone());
            async move {
                loop {
                    let t = start.elapsed().as_secs_f64();
                    let url = url.clone();
                    let size = tokio::task::spawn_blocking(move || db_size(&url)).await.unwrap_or(0);
                    let entry = (
                        t,
                        size,
                        sent.load(Ordering::Relaxed),
                        ledger.finished_builds.load(Ordering::Relaxed),
                        loadavg(),
                    );
                    samples.lock().expect("samples").push(entry);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        });
        let mut tasks = tokio::task::JoinSet::new();
        let mut next = 0.0f64;
        let mut n = 0usize;
        let (mut marked_in, mut marked_out) = (false, false);
        while next < total_secs {
            let due = start + Duration::from_secs_f64(next);
            tokio::time::sleep_until(due.into()).await;
            if !marked_in && next >= peak_start {
                cpu_marks.lock().expect("marks").push(("peak start", cpu(db.name())));
                marked_in = true;
            }
            if !marked_out && next >= peak_end {
                cpu_marks.lock().expect("marks").push(("peak end", cpu(db.name())));
                marked_out = true;
            }
            let peak = (peak_start..peak_end).contains(&next);
            let repo = &repos[n % repos.len()];
            // A branch of its own per push: a newer push to a branch would supersede (cancel) the
            // branch's older build, which is cib working as documented, not the load asked for.
            let branch = format!("topic-{n}");
            let commit = vcs.commit(repo, &branch, &[(".cib.yml", SPEC)]);
            let body = Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "ref": format!("refs/heads/{branch}"),
                    "before": "0000000000000000000000000000000000000000",
                    "after": commit,
                    "created": true,
                    "deleted": false,
                    "forced": false,
                    "commits": [{ "added": [], "modified": ["src/main.rs"], "removed": [] }],
                    "repository": { "full_name": repo },
                    "sender": { "login": "octocat" }
                }))
                .expect("json"),
            );
            let signature = sign(SECRET.as_bytes(), &body);
            let request = http::Request::post(&url)
                .header("x-github-event", "push")
                .header("x-github-delivery", format!("sim-{n}"))
                .header("x-hub-signature-256", &signature)
                .body(Full::new(body))
                .expect("request");
            let sent_at = Instant::now();
            ledger.sent.lock().expect("ledger").insert((repo.clone(), commit), (sent_at, peak));
            let (client, latencies, failures) = (client.clone(), latencies.clone(), failures.clone());
            tasks.spawn(async move {
                match client.request(request).await {
                    Ok(response) if response.status() == 202 => {
                        let _ = response.into_body().collect().await;
                        let took = sent_at.elapsed();
                        let mut l = latencies.lock().expect("latencies");
                        if peak { l.0.push(took) } else { l.1.push(took) }
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            while tasks.try_join_next().is_some() {}
            n += 1;
            sent.store(n, Ordering::Relaxed);
            // Poisson arrivals at the rate of this moment.
            let u = {
                let mut r = Rng(0x2545_F491_4F6C_DD1D ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                r.next_f64();
                r.next_f64().max(1e-12)
            };
            next += -u.ln() / params.rate_at(next);
        }
        let arrivals_end = cpu(db.name());
        cpu_marks.lock().expect("marks").push(("arrivals end", arrivals_end));
        while tasks.join_next().await.is_some() {}
        // The builds still running finish (the longest step is an hour, compressed), and a
        // backlog gets a minute more.
        let drain = Instant::now() + Duration::from_secs_f64(3.0 * 3600.0 / params.compression + 60.0);
        while ledger.finished_builds.load(Ordering::Relaxed) < n && Instant::now() < drain {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sampler.abort();
    });
    let wall = start.elapsed().as_secs_f64();
    let cpu_end = cpu(db.name());
    let sent = sent.load(Ordering::Relaxed);
    let finished = ledger.finished_builds.load(Ordering::Relaxed);
    let size_at_end = db_size(&db.url);

    let (mut l_peak, mut l_off) = latencies.lock().expect("latencies").clone();
    l_peak.sort();
    l_off.sort();
    let (mut s_peak, mut s_off) = ledger.to_start.lock().expect("ledger").clone();
    // Builds whose first step never started count with what they waited so far: a lower bound,
    // so that a backlog shows in the percentiles instead of leaving them.
    let never_started = {
        let sent = ledger.sent.lock().expect("ledger");
        for (at, peak) in sent.values() {
            if *peak { s_peak.push(at.elapsed()) } else { s_off.push(at.elapsed()) }
        }
        sent.len()
    };
    s_peak.sort();
    s_off.sort();
    let marks = cpu_marks.lock().expect("marks").clone();
    let mark = |name: &str| marks.iter().find(|(n, _)| *n == name).map(|(_, c)| *c);
    let whole = cores(cpu_start, mark("arrivals end").unwrap_or(cpu_end), hz);
    let in_peak = match (mark("peak start"), mark("peak end")) {
        (Some(a), Some(b)) => cores(a, b, hz),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    };

    let statuses = psql(&db.url, "SELECT status || '=' || count(*) FROM builds GROUP BY status ORDER BY status");
    let tables = psql(
        &db.url,
        "SELECT relname || '=' || pg_total_relation_size(relid) FROM pg_stat_user_tables ORDER BY pg_total_relation_size(relid) DESC LIMIT 8",
    );
    let samples = samples.lock().expect("samples").clone();
    // Growth per build before retention first deleted anything (its ages had not passed), and
    // after, from the samples.
    let before_pruning: Vec<_> = samples.iter().filter(|s| s.0 <= params.retain_secs as f64 + 5.0).collect();
    let growth_unpruned =
        before_pruning.iter().rev().find(|s| s.2 > 0).map(|s| (s.1.saturating_sub(size_at_start)) as f64 / s.2 as f64);
    let late: Vec<_> = samples.iter().filter(|s| s.0 >= wall * 0.5).collect();
    let growth_pruned = match (late.first(), late.last()) {
        (Some(a), Some(b)) if b.2 > a.2 => Some((b.1 as f64 - a.1 as f64) / (b.2 - a.2) as f64),
        _ => None,
    };

    println!();
    println!("| figure | outside the peak | within the peak |");
    println!("|---|---|---|");
    println!(
        "| webhooks sent / answered 202 / failed | {} / {} / {} | {} of them |",
        sent,
        l_off.len() + l_peak.len(),
        failures.load(Ordering::Relaxed),
        l_peak.len()
    );
    println!(
        "| webhook → 202, p50 / p99 (ms) | {:.1} / {:.1} | {:.1} / {:.1} |",
        percentile(&l_off, 0.5),
        percentile(&l_off, 0.99),
        percentile(&l_peak, 0.5),
        percentile(&l_peak, 0.99)
    );
    println!(
        "| webhook → first step started, p50 / p99 (ms); target p99 ≤ 50 outside, ≤ 500 within | {:.1} / {:.1} | {:.1} / {:.1} |",
        percentile(&s_off, 0.5),
        percentile(&s_off, 0.99),
        percentile(&s_peak, 0.5),
        percentile(&s_peak, 0.99)
    );
    println!(
        "| CPU cores: cib (this process less the load generator) / PostgreSQL / load generator | {:.2} / {:.2} / {:.2} (whole arrival period) | {:.2} / {:.2} / {:.2} |",
        whole.0, whole.1, whole.2, in_peak.0, in_peak.1, in_peak.2
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| builds finished / sent; sustained | {finished} / {sent} in {wall:.0} s: {:.1} builds/s ({:.1}/s over the arrivals' {:.0} s) |",
        finished as f64 / wall,
        finished as f64 / total_secs,
        total_secs
    );
    println!("| steps run | {} |", ledger.steps_run.load(Ordering::Relaxed));
    println!(
        "| builds whose first step had not started at the end (counted in the percentiles with their wait so far) | {never_started} |"
    );
    println!("| builds by status | {} |", statuses.replace('\n', ", "));
    println!(
        "| RSS of the process (server, simulated executor and load generator): now / peak | {} / {} |",
        mib(status_kib("VmRSS:") as f64 * 1024.0),
        mib(status_kib("VmHWM:") as f64 * 1024.0)
    );
    println!("| database size: start / end | {} / {} |", mib(size_at_start as f64), mib(size_at_end as f64));
    if let Some(per_build) = growth_unpruned {
        println!(
            "| growth per build before retention deleted anything | {:.0} bytes: {} per simulated day of {:.0} builds |",
            per_build,
            mib(per_build * params.day_builds),
            params.day_builds
        );
    }
    if let Some(per_build) = growth_pruned {
        println!(
            "| growth per build in the second half, with `[retention]` logs/events/inbox = {} s | {:.0} bytes: {} per simulated day |",
            params.retain_secs,
            per_build,
            mib(per_build * params.day_builds)
        );
    }
    println!("| largest tables at the end (bytes) | {} |", tables.replace('\n', ", "));
    println!("| load average at the end | {} |", loadavg());
    println!();
    println!("samples (s, database bytes, webhooks sent, builds finished, load average):");
    for s in &samples {
        println!("  {:>6.0} {:>12} {:>8} {:>8}  {}", s.0, s.1, s.2, s.3, s.4);
    }
    // Every webhook must have been answered 202: a refused one is a defect, not a figure. A
    // backlog that did not drain in time is a figure, printed above.
    if finished < sent {
        println!("NOTE: {} of {sent} builds had not finished when the drain ended", sent - finished);
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "webhooks that were not answered 202");
    let _ = STEPS_PER_BUILD;
    drop(server_runtime);
    drop(db);
}
