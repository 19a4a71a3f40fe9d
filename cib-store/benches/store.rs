//! Prints the store's throughput: log ingest (lines/s, MB/s) and inbox inserts per second, on
//! a real SQLite file with the default options (synchronous FULL) and with synchronous NORMAL.
//! Run with `cargo bench -p cib-store`.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::event::BuildId;
use cib_core::ports::{Delivery, LogKey, Store};
use cib_core::time::Timestamp;
use cib_store::{SqliteOptions, SqliteStore, Synchronous};

/// Lines like a build's: compiler progress and test results, with numbers that vary.
fn lines(count: usize, seed: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in seed..seed + count {
        let line = match i % 4 {
            0 => format!("   Compiling crate-{} v0.{}.{} (/work/src/crate-{})\n", i % 311, i % 17, i % 5, i % 311),
            1 => format!("test module_{}::tests::case_{} ... ok\n", i % 97, i),
            2 => format!(
                "[{:>6}.{:03}s] step output line {} with value={:x}\n",
                i / 1000,
                i % 1000,
                i,
                i * 2_654_435_761
            ),
            _ => format!("warning: unused variable `x{}` at src/lib.rs:{}:{}\n", i % 13, i % 900, i % 80),
        };
        out.extend_from_slice(line.as_bytes());
    }
    out
}

fn say(text: String) {
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

fn open(dir: &tempfile::TempDir, name: &str, synchronous: Synchronous) -> Arc<SqliteStore> {
    let options = SqliteOptions { synchronous, ..SqliteOptions::default() };
    Arc::new(SqliteStore::open(dir.path().join(name), options).expect("open"))
}

fn rate(count: f64, elapsed: Duration) -> f64 {
    count / elapsed.as_secs_f64()
}

/// One step printing 256 MiB, appended in 64 KiB batches as the engine gathers a flood.
async fn one_loud_step(store: Arc<SqliteStore>, label: &str) {
    let batch_lines = 1200;
    let batches: Vec<Vec<u8>> = (0..16).map(|i| lines(batch_lines, i * batch_lines)).collect();
    let key = LogKey { build: BuildId::from("bench"), step: "loud".into(), attempt: 1 };
    let (mut bytes, mut count) = (0u64, 0u64);
    let started = Instant::now();
    while bytes < 256 << 20 {
        let batch = &batches[(count as usize) % batches.len()];
        store.append_log(&key, batch).await.expect("append");
        bytes += batch.len() as u64;
        count += 1;
    }
    store.finish_log(&key).await.expect("finish");
    let elapsed = started.elapsed();
    say(format!(
        "log ingest, one step, {} KiB appends, {label}: {:.0} lines/s, {:.1} MB/s ({} MiB in {elapsed:.2?})",
        batches[0].len() >> 10,
        rate((count * batch_lines as u64) as f64, elapsed),
        rate(bytes as f64, elapsed) / 1e6,
        bytes >> 20
    ));
}

/// Sixteen steps printing one line per append, each waiting for its write: group commits
/// are what make this fast.
async fn many_chatty_steps(store: Arc<SqliteStore>, label: &str) {
    let per_step = 4000;
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|s| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = LogKey { build: BuildId::from("bench"), step: format!("chatty-{s}"), attempt: 1 };
                let text = lines(per_step, s * per_step);
                let mut bytes = 0;
                for line in text.split_inclusive(|b| *b == b'\n') {
                    store.append_log(&key, line).await.expect("append");
                    bytes += line.len();
                }
                store.finish_log(&key).await.expect("finish");
                bytes
            })
        })
        .collect();
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.expect("join");
    }
    let elapsed = started.elapsed();
    say(format!(
        "log ingest, 16 steps, one line per append, {label}: {:.0} lines/s, {:.1} MB/s",
        rate((16 * per_step) as f64, elapsed),
        rate(bytes as f64, elapsed) / 1e6
    ));
}

/// Webhook deliveries of 8 KiB, one at a time and from 16 receivers at once.
async fn inbox(store: Arc<SqliteStore>, label: &str) {
    let body = vec![b'{'; 8 << 10];
    let delivery = |id: String| Delivery {
        id,
        source: "github".into(),
        event: "push".into(),
        received_at: Timestamp(1),
        body: body.clone(),
    };
    let n = 2000;
    let started = Instant::now();
    for i in 0..n {
        assert!(store.insert_delivery(&delivery(format!("seq-{i}"))).await.expect("insert"));
    }
    let sequential = rate(n as f64, started.elapsed());

    let per_task = 1000;
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let (store, body) = (store.clone(), body.clone());
            tokio::spawn(async move {
                for i in 0..per_task {
                    let d = Delivery {
                        id: format!("par-{t}-{i}"),
                        source: "github".into(),
                        event: "push".into(),
                        received_at: Timestamp(1),
                        body: body.clone(),
                    };
                    assert!(store.insert_delivery(&d).await.expect("insert"));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("join");
    }
    let concurrent = rate((16 * per_task) as f64, started.elapsed());
    say(format!(
        "inbox inserts, 8 KiB bodies, {label}: {sequential:.0}/s one at a time, {concurrent:.0}/s from 16 receivers"
    ));
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    // `cargo bench -p cib-store -- chatty inbox` runs only the scenarios named.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    rt.block_on(async {
        for (sync, label) in [(Synchronous::Full, "synchronous FULL"), (Synchronous::Normal, "synchronous NORMAL")] {
            if run("loud") {
                one_loud_step(open(&dir, &format!("loud-{label}.db"), sync), label).await;
            }
            if run("chatty") {
                many_chatty_steps(open(&dir, &format!("chatty-{label}.db"), sync), label).await;
            }
            if run("inbox") {
                inbox(open(&dir, &format!("inbox-{label}.db"), sync), label).await;
            }
        }
    });
}
