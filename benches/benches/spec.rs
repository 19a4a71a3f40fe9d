//! Prints how fast the spec reader reads the example specs, and how fast it reports errors;
//! then, for each hostile shape of 1 MiB, how long cib takes to refuse or accept it next to
//! the bare YAML parser's event stream over the same bytes.
//!
//! Run with `cargo bench -p cib-benches --bench spec`.

// Benchmarks exist to print their figures.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

/// What cib may take over a hostile 1 MiB spec in a release build.
const HOSTILE_LIMIT: Duration = Duration::from_millis(100);

fn main() {
    // Words on the command line (not flags such as cargo's `--bench`) pick the hostile shapes
    // whose name contains one of them, so that one shape can be profiled alone.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if !only.is_empty() {
        hostile(&only);
        return;
    }
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
    hostile(&[]);
}

/// The fastest of a few runs of `f`, so that one slow run on a busy machine does not count.
fn fastest(mut f: impl FnMut()) -> Duration {
    (0..5)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Times every hostile shape, or those whose name contains one of `only` when it is not empty.
fn hostile(only: &[String]) {
    println!("hostile specs of 1 MiB: cib against the bare parser's events");
    let mut slow = Vec::new();
    for (shape, text) in cib_core::testing::hostile::all() {
        if !only.is_empty() && !only.iter().any(|o| shape.name.contains(o.as_str())) {
            continue;
        }
        let cib = fastest(|| {
            let outcome = cib_core::spec::parse_bytes(text.as_bytes());
            assert_eq!(outcome.is_err(), shape.refused, "{}", shape.name);
        });
        let raw = fastest(|| {
            // The bare parser may stop early at an error of its own (deep nesting); it is
            // timed over as much of the stream as it gives.
            let events = saphyr_parser::Parser::new_from_str(&text).take_while(Result::is_ok).count();
            assert!(events > 0);
        });
        println!(
            "  {:<22} {:>5} KiB  cib {:>8.2} ms ({})  parser {:>8.2} ms  ratio {:>6.2}",
            shape.name,
            text.len() / 1024,
            cib.as_secs_f64() * 1e3,
            if shape.refused { "refused" } else { "accepted" },
            raw.as_secs_f64() * 1e3,
            cib.as_secs_f64() / raw.as_secs_f64().max(1e-9),
        );
        if cib > HOSTILE_LIMIT {
            slow.push(shape.name);
        }
    }
    // Debug builds are many times slower; the limit holds for the release builds benches use.
    if !cfg!(debug_assertions) {
        assert!(slow.is_empty(), "over {HOSTILE_LIMIT:?}: {slow:?}");
    }
}
