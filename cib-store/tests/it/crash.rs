//! Crash safety: a child process writes inputs, events, logs and deliveries from several tasks
//! at once and reports each write once its call returned; the test kills it with SIGKILL at a
//! random moment, reopens the database and checks that it is intact, that every reported
//! write is there, and that nothing is half there: no event batch in part, no gap in the
//! journal, no log whose length disagrees with its chunks.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::pipeline::Input;
use cib_core::ports::{BuildStatus, Delivery, LogKey, Store, StoredInput};
use cib_core::time::Timestamp;
use cib_store::{SqliteOptions, SqliteStore};

use crate::{Rng, child, expected_log, log_bytes, open, read_whole};

/// A small limit and small chunks, so that a run of a few hundred milliseconds fills heads,
/// moves tails, compacts and evicts many times.
const LIMIT: u64 = 16 << 10;

fn options() -> SqliteOptions {
    SqliteOptions { log_limit: LIMIT, log_chunk_size: 1 << 10, ..SqliteOptions::default() }
}

/// What the writer reported as done.
#[derive(Debug, Default)]
struct Facts {
    inputs: BTreeSet<u64>,
    /// The first sequence number of each batch of five events, and its build.
    batches: Vec<(u64, String)>,
    logs: BTreeMap<(String, String), u64>,
    finished: BTreeSet<(String, String)>,
    deliveries: BTreeSet<String>,
    done: BTreeSet<String>,
}

impl Facts {
    fn record(&mut self, line: &str) {
        let words: Vec<&str> = line.split(' ').collect();
        let number = |i: usize| words[i].parse::<u64>().unwrap_or_else(|_| panic!("bad report {line:?}"));
        match words[0] {
            "ready" => {}
            "input" => {
                self.inputs.insert(number(1));
            }
            "events" => self.batches.push((number(1), words[2].to_owned())),
            "log" => {
                let len = self.logs.entry((words[1].to_owned(), words[2].to_owned())).or_default();
                *len = (*len).max(number(3));
            }
            "finished" => {
                self.finished.insert((words[1].to_owned(), words[2].to_owned()));
            }
            "delivery" => {
                self.deliveries.insert(words[1].to_owned());
            }
            "done" => {
                self.done.insert(words[1].to_owned());
            }
            _ => panic!("unknown report {line:?}"),
        }
    }
}

/// Five events of one build, as one batch: all of them or none must be stored.
fn batch(first: u64, build: &BuildId) -> Vec<Event> {
    let bodies = [
        EventBody::BuildQueued {
            build: build.clone(),
            pipeline: "crash".into(),
            repo: "crash/repo".into(),
            commit: "c".into(),
            branch: Some("main".into()),
        },
        EventBody::BuildStarted { build: build.clone() },
        EventBody::StepStarted { build: build.clone(), step: "unit".into(), attempt: 1 },
        EventBody::StepFinished {
            build: build.clone(),
            step: "unit".into(),
            attempt: 1,
            conclusion: StepConclusion::Success,
            detail: "exit code 0".into(),
            will_retry: false,
        },
        EventBody::BuildFinished { build: build.clone(), conclusion: Conclusion::Success },
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Event { seq: first + i as u64, at: Timestamp(first), body })
        .collect()
}

async fn last_event(store: &dyn Store) -> u64 {
    let mut last = 0;
    loop {
        let page = store.events_after(last, 10_000).await.expect("events");
        match page.last() {
            Some(e) => last = e.seq,
            None => return last,
        }
    }
}

type Report = Arc<dyn Fn(&str) + Send + Sync>;

/// Four tasks writing at once until `until`, reporting each write after it returned.
async fn workload(store: Arc<SqliteStore>, trial: u64, seed: u64, report: Report, until: Instant) {
    let next_event = Arc::new(AtomicU64::new(last_event(store.as_ref()).await + 1));
    let tasks: Vec<_> = (0..4u64)
        .map(|task| {
            let (store, report, next_event) = (store.clone(), report.clone(), next_event.clone());
            tokio::spawn(async move {
                let mut rng = Rng::new(seed ^ (task << 32) ^ trial);
                let name = format!("t{trial}-w{task}");
                let (mut step, mut length, mut n) = (0u32, 0u64, 0u64);
                while Instant::now() < until {
                    n += 1;
                    match rng.below(100) {
                        0..=34 => {
                            let key = LogKey { build: BuildId(name.clone()), step: format!("s{step}"), attempt: 1 };
                            let size = if rng.chance(10) { 2000 + rng.below(20_000) } else { 1 + rng.below(200) };
                            let got = store.append_log(&key, &log_bytes(length..length + size)).await.expect("append");
                            length += size;
                            assert_eq!(got, length, "the log's length");
                            report(&format!("log {name} s{step} {got}"));
                        }
                        35..=38 => {
                            let key = LogKey { build: BuildId(name.clone()), step: format!("s{step}"), attempt: 1 };
                            store.finish_log(&key).await.expect("finish");
                            report(&format!("finished {name} s{step}"));
                            (step, length) = (step + 1, 0);
                        }
                        39..=58 => {
                            let input = Input::Cancel {
                                build: BuildId(name.clone()),
                                by: "crash".into(),
                                reason: n.to_string(),
                            };
                            let seq =
                                store.append_input(&StoredInput { at: Timestamp(n), input }).await.expect("input");
                            report(&format!("input {seq}"));
                        }
                        59..=78 => {
                            let first = next_event.fetch_add(5, Ordering::SeqCst);
                            let build = BuildId(format!("{name}-b{n}"));
                            store.append_events(&batch(first, &build)).await.expect("events");
                            report(&format!("events {first} {build}"));
                        }
                        _ => {
                            let id = format!("{name}-d{}", if rng.chance(20) { rng.below(n) } else { n });
                            let delivery = Delivery {
                                id: id.clone(),
                                source: "crash".into(),
                                event: "push".into(),
                                received_at: Timestamp(n),
                                body: vec![b'x'; rng.below(3000) as usize],
                            };
                            let new = store.insert_delivery(&delivery).await.expect("delivery");
                            if new {
                                report(&format!("delivery {id}"));
                                if rng.chance(50) {
                                    store.mark_delivery_done(&id).await.expect("done");
                                    report(&format!("done {id}"));
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a writer task failed");
    }
}

/// Checks a database after a crash against what the writer reported. Returns how many writes
/// it checked.
async fn verify(path: &Path, facts: &Facts, context: &str) -> usize {
    let conn = rusqlite::Connection::open(path).expect("open");
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity check");
    assert_eq!(integrity, "ok", "{context}");
    let store = open(path, options());

    // The journal has no gaps and holds every reported input.
    let inputs = store.inputs_after(0, usize::MAX).await.expect("inputs");
    let seqs: Vec<u64> = inputs.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{context}: the journal has gaps");
    let missing: Vec<_> = facts.inputs.iter().filter(|s| **s > seqs.len() as u64).collect();
    assert!(missing.is_empty(), "{context}: reported inputs {missing:?} are lost ({} stored)", seqs.len());

    // Each batch of events is whole, and so is the build it recorded.
    let events = store.events_after(0, usize::MAX).await.expect("events");
    let mut by_build: BTreeMap<BuildId, Vec<u64>> = BTreeMap::new();
    for e in &events {
        by_build.entry(e.body.build().cloned().expect("a build event")).or_default().push(e.seq);
    }
    for (build, seqs) in &by_build {
        assert_eq!(seqs.len(), 5, "{context}: {build} has {} of its 5 events: {seqs:?}", seqs.len());
        assert_eq!(seqs[4] - seqs[0], 4, "{context}: {build}'s events are not one batch: {seqs:?}");
        let record = store.build(build).await.expect("build").unwrap_or_else(|| panic!("{context}: {build} lost"));
        assert_eq!(record.build.status, BuildStatus::Success, "{context}: {build}");
        assert_eq!(record.steps.len(), 1, "{context}: {build}'s steps: {:?}", record.steps);
    }
    for (first, build) in &facts.batches {
        let seqs = by_build.get(&BuildId(build.clone()));
        assert_eq!(seqs.map(|s| s[0]), Some(*first), "{context}: reported events of {build} are lost");
    }
    let listed = store.builds(&Default::default(), cib_core::ports::Page::first(usize::MAX)).await.expect("builds");
    assert_eq!(listed.len(), by_build.len(), "{context}: a build record without its events");

    // Each log is at least as long as reported, reads back exactly, and its chunks agree with
    // its length.
    type LogRow = (String, String, i64, i64, i64);
    let logs: Vec<LogRow> = conn
        .prepare("SELECT build, step, length, finished, raw_bytes FROM logs")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?.collect())
        .expect("logs");
    let stored: BTreeSet<(String, String)> = logs.iter().map(|(b, s, ..)| (b.clone(), s.clone())).collect();
    for (build, step, length, finished, raw_bytes) in &logs {
        let (length, id) = (*length as u64, format!("{build}/{step}"));
        let reported = facts.logs.get(&(build.clone(), step.clone())).copied().unwrap_or(0);
        assert!(length >= reported, "{context}: {id} has {length} bytes, {reported} were reported");
        if facts.finished.contains(&(build.clone(), step.clone())) {
            assert_eq!(*finished, 1, "{context}: {id} was reported finished");
        }
        let chunks: Vec<(i64, i64, i64)> = conn
            .prepare("SELECT start_offset, end_offset, codec FROM log_chunks WHERE build = ?1 AND step = ?2 ORDER BY start_offset")
            .and_then(|mut s| s.query_map([build, step], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
            .expect("chunks");
        for pair in chunks.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{context}: {id}'s chunks overlap: {pair:?}");
        }
        let end = chunks.last().map_or(0, |c| c.1 as u64);
        assert_eq!(end, length, "{context}: {id}'s chunks end at {end}, its length is {length}");
        let raw: i64 = chunks.iter().filter(|c| c.2 == 0).map(|c| c.1 - c.0).sum();
        assert_eq!(raw, *raw_bytes, "{context}: {id}'s raw bytes");
        assert!(*finished == 0 || raw == 0, "{context}: finished log {id} has raw chunks");
        let key = LogKey { build: BuildId(build.clone()), step: step.clone(), attempt: 1 };
        let whole = read_whole(&store, &key, 7000).await;
        assert!(whole == expected_log(LIMIT, length, log_bytes), "{context}: {id} reads back wrong ({length} bytes)");
    }
    let lost: Vec<_> = facts.logs.keys().filter(|k| !stored.contains(*k)).collect();
    assert!(lost.is_empty(), "{context}: reported logs {lost:?} are lost");

    for id in &facts.deliveries {
        assert!(store.delivery(id).await.expect("delivery").is_some(), "{context}: delivery {id} is lost");
    }
    let pending: BTreeSet<String> =
        store.pending_deliveries(usize::MAX).await.expect("pending").into_iter().map(|d| d.id).collect();
    let undone: Vec<_> = facts.done.intersection(&pending).collect();
    assert!(undone.is_empty(), "{context}: deliveries {undone:?} were reported done but are pending");
    store.integrity_check().await.expect("integrity");
    facts.inputs.len() + facts.batches.len() + facts.logs.len() + facts.deliveries.len()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// The child: writes until killed (or for a minute, should the parent be gone).
pub fn child_main() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let path = var("CIB_STORE_DB");
    let trial: u64 = var("CIB_STORE_TRIAL").parse().expect("trial");
    let seed: u64 = var("CIB_STORE_SEED").parse().expect("seed");
    runtime().block_on(async {
        let store = Arc::new(open(Path::new(&path), options()));
        child::report("ready");
        let report: Report = Arc::new(child::report);
        workload(store, trial, seed, report, Instant::now() + Duration::from_secs(60)).await;
    });
}

/// The workload for a moment in this process, without a kill: the checks must accept it.
pub fn in_process_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let report: Report = Arc::new(move |l: &str| sink.lock().expect("lines").push(l.to_owned()));
    let rt = runtime();
    rt.block_on(async {
        let store = Arc::new(open(&path, options()));
        workload(store, 0, Rng::seed(), report, Instant::now() + Duration::from_millis(500)).await;
    });
    let mut facts = Facts::default();
    for line in lines.lock().expect("lines").iter() {
        facts.record(line);
    }
    assert!(
        !facts.inputs.is_empty() && !facts.batches.is_empty() && !facts.logs.is_empty() && !facts.deliveries.is_empty(),
        "the workload wrote too little: {facts:?}"
    );
    let checked = rt.block_on(verify(&path, &facts, "in process"));
    assert!(checked > 10, "only {checked} writes checked");
}

#[test]
fn sixty_kills_at_random_moments_lose_no_committed_write_and_leave_nothing_half_done() {
    let seed = Rng::seed();
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let rt = runtime();
    let mut facts = Facts::default();
    let started = Instant::now();
    let (mut reported, mut killed_before_ready) = (0usize, 0usize);
    let trials = 60u64;
    for trial in 0..trials {
        let stderr = dir.path().join(format!("child-{trial}.stderr"));
        let env = [
            ("CIB_STORE_DB", path.display().to_string()),
            ("CIB_STORE_TRIAL", trial.to_string()),
            ("CIB_STORE_SEED", (seed ^ trial).to_string()),
        ];
        let mut child = child::spawn("crash-writer", &env, &stderr);
        let (lines, reader) = child::lines(&mut child);
        let context = format!("seed {seed}, trial {trial}");
        let mut got = Vec::new();
        // Every twelfth child dies while it may still be opening (and, first, migrating) the
        // database; the others some time after they started writing.
        let delay = if trial % 12 == 0 {
            Duration::from_millis(rng.below(8))
        } else {
            let ready = loop {
                match lines.recv_timeout(Duration::from_secs(30)) {
                    Ok(line) if line == "ready" => break true,
                    Ok(line) => got.push(line),
                    Err(_) => break false,
                }
            };
            let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
            assert!(ready, "{context}: the child did not start: {errors}");
            Duration::from_millis(1 + rng.below(300))
        };
        std::thread::sleep(delay);
        if let Ok(Some(status)) = child.try_wait() {
            let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
            panic!("{context}: the writer ended by itself ({status}): {errors}");
        }
        child.kill().expect("kill");
        child.wait().expect("wait");
        reader.join().expect("reader");
        got.extend(lines.try_iter());
        if !got.iter().any(|l| l == "ready") && trial % 12 == 0 {
            killed_before_ready += 1;
        }
        reported += got.len();
        for line in &got {
            facts.record(line);
        }
        rt.block_on(verify(&path, &facts, &context));
    }
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "crash: {trials} kills ({killed_before_ready} before the writer was ready), {reported} reported writes checked, \
         {} inputs, {} event batches, {} logs, {} deliveries ({} done), {size} byte database, {:.1?}",
        facts.inputs.len(),
        facts.batches.len(),
        facts.logs.len(),
        facts.deliveries.len(),
        facts.done.len(),
        started.elapsed()
    );
    assert!(facts.inputs.len() > 100 && facts.logs.len() > 50, "seed {seed}: the writers wrote too little: {facts:?}");
}
