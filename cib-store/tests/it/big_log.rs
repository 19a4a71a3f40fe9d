//! A step that prints 1 GiB: the store keeps its head and tail within the limit, with the
//! marker between, and its memory stays bounded. The writing happens in a child process so
//! that its peak resident memory (`VmHWM`) is the store's and nothing else's.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cib_core::event::BuildId;
use cib_core::ports::{DEFAULT_LOG_LIMIT, LogKey, Store, omitted_marker};
use cib_store::SqliteOptions;

use crate::{child, open, peak_rss_kib};

const TOTAL: u64 = 1 << 30;
/// The output repeats a block of lines, each block stamped with its number.
const BLOCK: u64 = 64 << 10;
/// What the child appends at a time, about what the engine gathers from a flooding step.
const APPEND: u64 = 1 << 20;
/// The bound on the writer's peak memory.
const MAX_RSS_MIB: u64 = 200;

fn template() -> Vec<u8> {
    let mut block = Vec::with_capacity(BLOCK as usize);
    let mut line = 0;
    while block.len() < BLOCK as usize {
        let text = format!(
            "block ############ line {line:05}: compiling crate_{:03} v0.{}.{} (build script)\n",
            line * 7 % 997,
            line % 13,
            line % 7
        );
        block.extend_from_slice(text.as_bytes());
        line += 1;
    }
    block.truncate(BLOCK as usize);
    block
}

/// The bytes printed at `range`, which must start and end on block boundaries.
fn output(template: &[u8], range: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    for block in range.start / BLOCK..range.end.div_ceil(BLOCK) {
        let start = out.len();
        out.extend_from_slice(template);
        out[start + 6..start + 18].copy_from_slice(format!("{block:012}").as_bytes());
    }
    out
}

fn key() -> LogKey {
    LogKey { build: BuildId::from("loud"), step: "flood".into(), attempt: 1 }
}

/// The child: prints 1 GiB into the store while a live reader follows, then reports its
/// figures and its peak memory.
pub fn child_main() {
    let path = std::env::var("CIB_STORE_DB").expect("CIB_STORE_DB");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = Arc::new(open(Path::new(&path), SqliteOptions::default()));
        let template = template();
        let lines_per_block = template.iter().filter(|b| **b == b'\n').count() as u64;
        let done = Arc::new(AtomicBool::new(false));
        // A live reader (what the server's log stream does) follows from offset 0.
        let follower = {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                let (mut offset, mut seen, mut reads) = (0u64, 0u64, 0u64);
                loop {
                    let read = store.read_log(&key(), offset, 1 << 20).await.expect("follow");
                    seen += read.data.len() as u64;
                    reads += 1;
                    offset = read.next_offset;
                    if read.complete {
                        return (seen, reads);
                    }
                    if read.data.is_empty() && done.load(Ordering::SeqCst) {
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let started = Instant::now();
        let mut offset = 0;
        while offset < TOTAL {
            let data = output(&template, offset..offset + APPEND);
            let length = store.append_log(&key(), &data).await.expect("append");
            offset += APPEND;
            assert_eq!(length, offset);
        }
        store.finish_log(&key()).await.expect("finish");
        let elapsed = started.elapsed();
        done.store(true, Ordering::SeqCst);
        let (seen, reads) = follower.await.expect("follower");
        let secs = elapsed.as_secs_f64();
        child::report(&format!("elapsed_ms {}", elapsed.as_millis()));
        child::report(&format!("lines_per_s {:.0}", (TOTAL / BLOCK * lines_per_block) as f64 / secs));
        child::report(&format!("mb_per_s {:.1}", TOTAL as f64 / secs / 1e6));
        child::report(&format!("follower {seen} {reads}"));
        child::report(&format!("peak_rss_kib {}", peak_rss_kib()));
    });
}

#[test]
fn a_step_printing_one_gib_is_kept_within_the_limit_with_bounded_memory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cib.db");
    let stderr = dir.path().join("child.stderr");
    let started = Instant::now();
    let mut child = child::spawn("big-log", &[("CIB_STORE_DB", path.display().to_string())], &stderr);
    let (lines, reader) = child::lines(&mut child);
    let status = child.wait().expect("wait");
    reader.join().expect("reader");
    let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(status.success(), "the child failed ({status}): {errors}");
    let figures: std::collections::BTreeMap<String, String> =
        lines.try_iter().filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
    let figure = |k: &str| figures.get(k).cloned().unwrap_or_else(|| panic!("no {k} in {figures:?}: {errors}"));
    let rss_kib: u64 = figure("peak_rss_kib").parse().expect("a number");
    let (follower_bytes, follower_reads) =
        figure("follower").split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).expect("two numbers");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (stored, chunk_bytes) = rt.block_on(async {
        let store = open(&path, SqliteOptions::default());
        let whole = crate::read_whole(&store, &key(), 8 << 20).await;
        store.integrity_check().await.expect("integrity");
        let conn = rusqlite::Connection::open(&path).expect("open");
        let chunk_bytes: i64 =
            conn.query_row("SELECT SUM(end_offset - start_offset) FROM log_chunks", [], |r| r.get(0)).expect("sum");
        (whole, chunk_bytes as u64)
    });
    let template = template();
    let half = DEFAULT_LOG_LIMIT / 2;
    let marker = omitted_marker(TOTAL - DEFAULT_LOG_LIMIT);
    assert!(stored.len() as u64 <= DEFAULT_LOG_LIMIT + marker.len() as u64, "stored {} bytes", stored.len());
    assert!(stored[..half as usize] == output(&template, 0..half), "the head is the first half of the limit");
    let rest = &stored[half as usize..];
    assert!(
        rest.starts_with(marker.as_bytes()),
        "the marker follows the head: {:?}",
        String::from_utf8_lossy(&rest[..80])
    );
    assert!(rest[marker.len()..] == output(&template, TOTAL - half..TOTAL), "the tail is the last half of the limit");
    // The file holds at most one chunk more than the limit, however much was printed.
    assert!(chunk_bytes <= DEFAULT_LOG_LIMIT + (64 << 10), "{chunk_bytes} bytes in chunks");
    let file = std::fs::metadata(&path).map_or(0, |m| m.len())
        + std::fs::metadata(path.with_extension("db-wal")).map_or(0, |m| m.len());
    assert!(follower_bytes.parse::<u64>().expect("bytes") > 0, "the live reader saw output");

    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "big log: 1 GiB in {} ms ({} MB/s, {} lines/s), peak RSS {} MiB, stored {} bytes in {file} bytes of file, \
         live reader saw {follower_bytes} bytes in {follower_reads} reads, test took {:.1?}",
        figure("elapsed_ms"),
        figure("mb_per_s"),
        figure("lines_per_s"),
        rss_kib / 1024,
        stored.len(),
        started.elapsed()
    );
    assert!(rss_kib < MAX_RSS_MIB << 10, "the writer peaked at {} MiB", rss_kib / 1024);
}
