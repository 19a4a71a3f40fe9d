//! Prints how fast the spec reader reads the example specs, and how fast it reports errors.
//!
//! Run with `cargo bench -p cib-benches --bench spec`.

// Benchmarks exist to print their figures.
#![allow(clippy::print_stdout)]

use std::time::Instant;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("examples/python-app/.cib.yml")).expect("example spec");
    let rounds = 2_000;
    let started = Instant::now();
    for _ in 0..rounds {
        assert!(cib_core::spec::parse(&text).is_ok());
    }
    let ok = started.elapsed();
    let broken = text.replace("commands:", "comands:").replace("timeout: 15m", "timeout: 15x");
    let started = Instant::now();
    for _ in 0..rounds {
        assert!(cib_core::spec::parse(&broken).is_err());
    }
    let bad = started.elapsed();
    println!(
        "spec: valid {} bytes in {:.1} µs ({:.1} MB/s); with errors in {:.1} µs",
        text.len(),
        ok.as_secs_f64() * 1e6 / f64::from(rounds),
        (text.len() as f64 * f64::from(rounds)) / ok.as_secs_f64() / 1e6,
        bad.as_secs_f64() * 1e6 / f64::from(rounds)
    );
}
