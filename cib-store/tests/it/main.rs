//! cib-store's integration tests, in one binary so that linking happens once. They use real
//! SQLite files in temporary directories; the crash and large-log tests re-run this binary as
//! a child process (see [`child`]).

mod artifacts;
mod big_log;
mod child;
mod conformance;
mod crash;
mod deliveries;
#[cfg(feature = "testing")]
mod postgres;
mod reads;
mod schema;
mod secrets;
mod sessions;

use std::path::Path;

use cib_store::{SqliteOptions, SqliteStore};

/// A small deterministic generator (SplitMix64), so that a failing case can be replayed from
/// the seed its message prints.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A seed from `CIB_STORE_SEED`, or from the clock.
    pub fn seed() -> u64 {
        std::env::var("CIB_STORE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Opens a store, failing the test with the reason when it cannot.
pub fn open(path: &Path, options: SqliteOptions) -> SqliteStore {
    SqliteStore::open(path, options).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The byte at `offset` of the logs the tests write: lines of digits and letters, so that a
/// misplaced range shows.
pub fn log_byte(offset: u64) -> u8 {
    b"0123456789abcdefghijklmnopqrstuvwxyz\n"[(offset % 37) as usize]
}

pub fn log_bytes(range: std::ops::Range<u64>) -> Vec<u8> {
    range.map(log_byte).collect()
}

/// What a store with `limit` holds of a log of `length` bytes of [`log_byte`]s, read whole.
pub fn expected_log(limit: u64, length: u64, byte: impl Fn(std::ops::Range<u64>) -> Vec<u8>) -> Vec<u8> {
    let limit = cib_core::ports::LogLimit::new(limit);
    let mut v = byte(0..limit.head.min(length));
    if let Some(gap) = limit.omitted(length) {
        v.extend_from_slice(cib_core::ports::omitted_marker(gap.end - gap.start).as_bytes());
    }
    v.extend(byte(limit.tail_start(length)..length));
    v
}

/// Reads a whole log in pieces of `max` bytes.
pub async fn read_whole(store: &dyn cib_core::ports::Store, key: &cib_core::ports::LogKey, max: usize) -> Vec<u8> {
    let mut offset = 0;
    let mut data = Vec::new();
    loop {
        let read = store.read_log(key, offset, max).await.expect("read log");
        data.extend_from_slice(&read.data);
        if read.next_offset == offset {
            return data;
        }
        offset = read.next_offset;
    }
}

/// The peak resident memory of this process, in KiB.
pub fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}
