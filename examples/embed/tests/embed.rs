//! The embedding example run as its user would: the program on a directory with a spec, against
//! the real Docker daemon, with its exit code and the events its notifier printed.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs the program on `dir`, and checks that it left nothing in Docker: every container,
/// volume and network it made carries its instance name, `cib-embed-PID`.
fn embed(dir: &Path) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_cib-embed"))
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cib-embed starts");
    let label = format!("label=org.cib.engine=cib-embed-{}", child.id());
    let out = child.wait_with_output().expect("cib-embed ends");
    for kind in [&["ps", "-a", "-q"][..], &["volume", "ls", "-q"][..], &["network", "ls", "-q"][..]] {
        let left = Command::new("docker").args(kind).args(["--filter", &label]).output().expect("docker answers");
        assert!(left.status.success(), "docker {kind:?} failed");
        assert!(left.stdout.is_empty(), "left in Docker ({kind:?}): {}", String::from_utf8_lossy(&left.stdout));
    }
    out
}

/// The events printed on standard output, one JSON object a line.
fn events(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not an event ({e}): {line}")))
        .collect()
}

fn report(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn runs_the_shell_example_green_and_prints_its_events() {
    let shell = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shell");
    let out = embed(&shell);
    assert!(out.status.success(), "{}", report(&out));
    let events = events(&out);
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types.first(), Some(&"build_queued"), "{}", report(&out));
    // Both steps of the example ran, in their order, and the build finished last, green.
    let finished_steps: Vec<&str> =
        events.iter().filter(|e| e["type"] == "step_finished").filter_map(|e| e["step"].as_str()).collect();
    assert_eq!(finished_steps, ["check", "offline"], "{}", report(&out));
    let last = events.last().expect("events");
    assert_eq!((last["type"].as_str(), last["conclusion"].as_str()), (Some("build_finished"), Some("success")));
    // Events are numbered in order, as the engine stored them.
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[test]
fn a_failing_step_fails_the_program() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = "version: 1\npipelines:\n  test:\n    steps:\n      - name: broken\n        image: busybox\n        network: none\n        commands: [\"echo about to fail\", \"exit 7\"]\n";
    std::fs::write(dir.path().join(".cib.yml"), spec).expect("write spec");
    let out = embed(dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", report(&out));
    let last = events(&out).pop().expect("events");
    assert_eq!((last["type"].as_str(), last["conclusion"].as_str()), (Some("build_finished"), Some("failed")));
}

#[test]
fn a_directory_without_a_spec_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = embed(dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", report(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no .cib.yml"), "{}", report(&out));
    assert!(out.stdout.is_empty(), "{}", report(&out));
}
