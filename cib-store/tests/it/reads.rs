//! The API's reads on SQLite, checked against the in-memory store (which the same conformance
//! suite holds to the same promises) on random histories: build listings with every filter
//! and page size, single builds with their steps, and log ranges at every offset.

use std::sync::Arc;

use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::ports::{BuildFilter, BuildStatus, ErrorKind, LogKey, Page, Store};
use cib_core::testing::MemoryStore;
use cib_core::time::Timestamp;
use cib_store::SqliteOptions;

use crate::{Rng, log_bytes, open};

/// A random history of `builds` builds over three repositories and branches, with retries,
/// gates, skips and cancellations, in the engine's order.
fn history(rng: &mut Rng, builds: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut seq = 0;
    let mut push = |at: u64, body: EventBody| {
        seq += 1;
        events.push(Event { seq, at: Timestamp(at), body });
    };
    for i in 0..builds {
        let build = BuildId(format!("b{:03}", rng.below(1000) * 1000 + i as u64));
        // Few distinct times, so that ties (broken by id) are common.
        let at = rng.below(20) * 1000;
        let repo = ["acme/app", "acme/lib", "other/tool"][rng.below(3) as usize];
        let branch = [Some("main"), Some("dev"), None][rng.below(3) as usize].map(Into::into);
        push(
            at,
            EventBody::BuildQueued {
                build: build.clone(),
                pipeline: "test".into(),
                repo: repo.into(),
                // A few commits, so that filtering by one finds several builds.
                commit: COMMITS[rng.below(4) as usize].into(),
                branch,
            },
        );
        let stage = rng.below(5);
        if stage == 0 {
            continue;
        }
        if stage == 1 {
            push(at + 1, EventBody::BuildWaitingForTurn { build: build.clone(), behind: BuildId("x".into()) });
            continue;
        }
        push(at + 2, EventBody::BuildStarted { build: build.clone() });
        for (n, step) in ["lint", "unit", "deploy"].iter().enumerate().take(rng.below(4) as usize) {
            let t = at + 10 * n as u64;
            if rng.chance(20) {
                push(t, EventBody::StepSkipped { build: build.clone(), step: (*step).into(), reason: "no".into() });
                continue;
            }
            for attempt in 1..=1 + rng.below(2) as u32 {
                push(t + 3, EventBody::StepStarted { build: build.clone(), step: (*step).into(), attempt });
                if rng.chance(85) {
                    let conclusion = [StepConclusion::Success, StepConclusion::Failed][rng.below(2) as usize];
                    push(
                        t + 4,
                        EventBody::StepFinished {
                            build: build.clone(),
                            step: (*step).into(),
                            attempt,
                            conclusion,
                            detail: format!("exit code {}", rng.below(3)),
                            will_retry: false,
                        },
                    );
                }
            }
        }
        if rng.chance(30) {
            push(at + 50, EventBody::BuildCancelling { build: build.clone(), by: "x".into(), reason: "y".into() });
        }
        if stage >= 3 {
            let conclusion = [Conclusion::Success, Conclusion::Failed, Conclusion::Cancelled, Conclusion::Errored]
                [rng.below(4) as usize];
            push(at + 60, EventBody::BuildFinished { build: build.clone(), conclusion });
        }
    }
    events
}

/// The commits builds are of, and one that no build is of.
const COMMITS: [&str; 5] = ["c0", "c1", "c2", "c3", "c-none"];

fn random_filter(rng: &mut Rng) -> BuildFilter {
    let pick = |rng: &mut Rng, options: &[&str]| -> Option<String> {
        rng.chance(40).then(|| options[rng.below(options.len() as u64) as usize].to_owned())
    };
    let statuses =
        if rng.chance(40) { BuildStatus::ALL.into_iter().filter(|_| rng.chance(30)).collect() } else { Vec::new() };
    let from = rng.chance(30).then(|| Timestamp(rng.below(20) * 1000));
    let until = rng.chance(30).then(|| Timestamp(rng.below(20) * 1000 + rng.below(2)));
    BuildFilter {
        repo: pick(rng, &["acme/app", "acme/lib", "other/tool", "nobody/none"]),
        branch: pick(rng, &["main", "dev", "feature"]),
        commit: pick(rng, &COMMITS),
        statuses,
        queued_from: from,
        queued_until: until,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_listings_and_records_match_the_reference_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = open(&dir.path().join("cib.db"), SqliteOptions::default());
    build_listings_match(&sqlite).await;
}

/// Random histories appended (some batches twice) to `sqlite`, a store under test of any kind,
/// and to the memory store; every build and random filtered pages must read alike.
pub(crate) async fn build_listings_match(sqlite: &dyn Store) {
    let seed = Rng::seed();
    let mut rng = Rng::new(seed);
    let memory = MemoryStore::new();
    let events = history(&mut rng, 150);
    // Appended in batches of random size, some of them twice, as a replay would.
    let mut i = 0;
    while i < events.len() {
        let n = 1 + rng.below(20) as usize;
        let batch = &events[i..(i + n).min(events.len())];
        for _ in 0..1 + rng.below(2) {
            sqlite.append_events(batch).await.expect("append to sqlite");
            memory.append_events(batch).await.expect("append to memory");
        }
        i += n;
    }

    let all = memory.builds(&BuildFilter::default(), Page::first(usize::MAX)).await.expect("memory builds");
    assert!(all.len() >= 140, "seed {seed}: only {} distinct builds", all.len());
    for summary in &all {
        let want = memory.build(&summary.id).await.expect("memory build");
        let got = sqlite.build(&summary.id).await.expect("sqlite build");
        assert_eq!(got, want, "seed {seed}: build {}", summary.id);
    }
    let mut nonempty = 0;
    for _ in 0..150 {
        let filter = random_filter(&mut rng);
        let size = 1 + rng.below(12) as usize;
        let mut page = Page::first(size);
        let mut pages = 0;
        loop {
            let want = memory.builds(&filter, page.clone()).await.expect("memory page");
            let got = sqlite.builds(&filter, page.clone()).await.expect("sqlite page");
            assert_eq!(got, want, "seed {seed}: {filter:?} page {pages} of {size}");
            let Some(last) = got.last() else { break };
            nonempty += 1;
            page = Page::after(size, last);
            pages += 1;
        }
    }
    assert!(nonempty > 100, "seed {seed}: the random filters matched too little ({nonempty} pages)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_ranges_match_the_reference_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = SqliteOptions { log_limit: LOG_LIMIT, log_chunk_size: LOG_CHUNK, ..SqliteOptions::default() };
    let sqlite = open(&dir.path().join("cib.db"), options);
    log_ranges_match(&sqlite).await;
}

/// The log limit and chunk size of the store [`log_ranges_match`] checks.
pub(crate) const LOG_LIMIT: u64 = 3000;
pub(crate) const LOG_CHUNK: usize = 200;

/// Random appends (lines, bursts past a chunk and past the limit) and finishes on three logs
/// of `sqlite`, a store of any kind set up with [`LOG_LIMIT`] and [`LOG_CHUNK`], and of the
/// memory store; random reads must give the same bytes.
pub(crate) async fn log_ranges_match(sqlite: &dyn Store) {
    let seed = Rng::seed();
    let mut rng = Rng::new(seed);
    let limit = LOG_LIMIT;
    let memory = MemoryStore::with_log_limit(limit);
    let stores: [&dyn Store; 2] = [sqlite, memory.as_ref()];
    let keys: Vec<LogKey> =
        (1..=3).map(|attempt| LogKey { build: BuildId::from("b"), step: "s".into(), attempt }).collect();
    let mut lengths = [0u64; 3];
    let mut finished = [false; 3];
    for round in 0..400 {
        let k = rng.below(3) as usize;
        // Mostly lines, sometimes a burst larger than the chunk or than the whole limit.
        let n = match rng.below(10) {
            0 => rng.below(5000),
            1..=3 => rng.below(400),
            _ => rng.below(60),
        };
        let data = log_bytes(lengths[k]..lengths[k] + n);
        for store in stores {
            let got = store.append_log(&keys[k], &data).await;
            if finished[k] {
                let kind = got.as_ref().map_err(|e| e.kind());
                assert_eq!(kind, Err(ErrorKind::Permanent), "seed {seed}: round {round}: a finished log grew");
            } else {
                assert_eq!(got, Ok(lengths[k] + n), "seed {seed}: round {round}");
            }
        }
        if !finished[k] {
            lengths[k] += n;
        }
        if rng.chance(1) {
            for store in stores {
                store.finish_log(&keys[k]).await.expect("finish");
            }
            finished[k] = true;
        }
        for _ in 0..3 {
            let k = rng.below(3) as usize;
            let offset = rng.below(lengths[k] + 10);
            let max = [0, 1, 30, 200, 1000, 1 << 20][rng.below(6) as usize];
            let want = memory.read_log(&keys[k], offset, max).await.expect("memory read");
            let got = sqlite.read_log(&keys[k], offset, max).await.expect("sqlite read");
            assert_eq!(got, want, "seed {seed}: round {round}: read {offset}+{max} of log {k} ({})", lengths[k]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_written_is_there_after_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let key = LogKey { build: BuildId::from("b"), step: "s".into(), attempt: 1 };
    {
        let store = Arc::new(open(&path, SqliteOptions { log_limit: 1000, ..SqliteOptions::default() }));
        cib_core::testing::store_conformance(store.clone()).await.expect("conformance");
        store.append_log(&LogKey { attempt: 9, ..key.clone() }, &log_bytes(0..5000)).await.expect("append");
    }
    // A different limit now applies to new logs only; the old one reads as it was written.
    let store = open(&path, SqliteOptions { log_limit: 10, ..SqliteOptions::default() });
    // The suite's last snapshot took every input; the snapshot, the kept enqueue and the
    // numbering survive the reopening.
    assert_eq!(store.inputs_after(0, 100).await.expect("inputs").len(), 0);
    assert_eq!(store.latest_snapshot().await.expect("snapshot"), Some((8, b"third".to_vec())));
    assert!(store.enqueued(&BuildId::from("e2")).await.expect("enqueue").is_some());
    let next = store
        .append_input(&cib_core::ports::StoredInput { at: Timestamp(9), input: cib_core::pipeline::Input::Tick })
        .await
        .expect("append");
    assert_eq!(next, 9, "numbering goes on after the snapshot");
    assert_eq!(store.events_after(0, 100).await.expect("events").len(), 23);
    assert!(store.delivery("d-1").await.expect("delivery").is_some());
    assert!(store.build(&BuildId::from("b1")).await.expect("build").is_some());
    let read = store.read_log(&key, 0, 100).await.expect("read");
    assert_eq!((read.data.as_slice(), read.complete), (&b"hello world\n"[..], true));
    let old = LogKey { attempt: 9, ..key.clone() };
    let whole = crate::read_whole(&store, &old, 1 << 20).await;
    assert_eq!(whole, crate::expected_log(1000, 5000, log_bytes), "the old log keeps its limit");
    store.append_log(&old, &log_bytes(5000..5010)).await.expect("append after reopening");
    let whole = crate::read_whole(&store, &old, 1 << 20).await;
    assert_eq!(whole, crate::expected_log(1000, 5010, log_bytes));
    store.integrity_check().await.expect("integrity");
}
