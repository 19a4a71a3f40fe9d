//! `cib lint`, `cib schema` and `cib plan`, run as processes, with their output and exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cib")).args(args).output().expect("run cib")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn temp_spec(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cib-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(".cib.yml");
    std::fs::write(&path, text).expect("write spec");
    path
}

#[test]
fn lint_accepts_every_example() {
    for example in ["python-app", "python-tests", "rust-app", "node-app", "shell", "image-app"] {
        let path = repo().join("examples").join(example).join(".cib.yml");
        let out = cib(&["lint", path.to_str().expect("utf-8 path")]);
        assert_eq!(out.status.code(), Some(0), "{example}: {}", String::from_utf8_lossy(&out.stdout));
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn lint_names_an_unknown_from_pipeline_at_its_line_and_column() {
    let path = temp_spec(
        "from",
        "pipelines:\n  staging:\n    steps: [{ name: a, image: busybox, commands: [true] }]\n  production:\n    steps: [{ name: a, image: busybox, commands: [true] }]\n    deliverables:\n      - docker: { image: x/app, tags: [production], from: stagng }\n",
    );
    let shown = path.to_str().expect("utf-8 path");
    let out = cib(&["lint", "--short", shown]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{shown}:7:59: error: unknown pipeline 'stagng' (did you mean 'staging'?)")),
        "{text}"
    );
}

#[test]
fn lint_prints_every_problem_with_line_and_column_and_exits_1() {
    let path = temp_spec(
        "invalid",
        "pipelines:\n  test:\n    steps:\n      - name: a\n        image: busybox\n        comands: [ls]\n      - name: b\n        image: busybox\n        commands: [ls]\n        depends_on: [c]\n",
    );
    let shown = path.to_str().expect("utf-8 path");
    let out = cib(&["lint", "--short", shown]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [format!("{shown}:6:9: error: unknown key 'comands' (did you mean 'commands'?)")],
        "the unknown key is reported; references are not checked on a partly malformed spec"
    );
    let path = temp_spec(
        "unknown-dep",
        "pipelines:\n  test:\n    steps:\n      - { name: b, image: x, commands: [ls], depends_on: [c] }\n",
    );
    let out = cib(&["lint", path.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let first = stdout.lines().next().unwrap_or_default();
    assert!(first.ends_with(":4:59: error: unknown step 'c' in depends_on"), "{stdout}");
    assert!(stdout.contains("4 |       - { name: b"), "the excerpt shows the line: {stdout}");
}

#[test]
fn lint_exits_2_when_the_file_cannot_be_read() {
    let out = cib(&["lint", "/nonexistent/.cib.yml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the spec"));
}

#[test]
fn lint_reports_text_that_is_not_utf8_where_it_starts() {
    let path = temp_spec("not-utf8", "");
    // Latin-1 "é" in the third line, after "    - " and "caf".
    std::fs::write(&path, b"pipelines:\n  test:\n    - caf\xe9\n").expect("write");
    let shown = path.to_str().expect("utf-8 path");
    let out = cib(&["lint", "--short", shown]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert!(stdout.starts_with(&format!("{shown}:3:10: error: the spec is not UTF-8 text")), "{stdout}");
}

#[test]
fn lint_refuses_a_spec_over_one_mib() {
    let path = temp_spec("huge", &format!("# {}\n", "x".repeat(1024 * 1024)));
    let shown = path.to_str().expect("utf-8 path");
    let out = cib(&["lint", "--short", shown]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert!(stdout.starts_with(&format!("{shown}:1:1: error: the spec is")), "{stdout}");
    assert!(stdout.contains("1 MiB"), "{stdout}");
}

#[test]
fn lint_defaults_to_the_spec_in_the_current_directory() {
    let path =
        temp_spec("default", "pipelines:\n  test:\n    steps: [{ name: a, image: busybox, commands: [true] }]\n");
    let out = Command::new(env!("CARGO_BIN_EXE_cib"))
        .arg("lint")
        .current_dir(path.parent().expect("dir"))
        .output()
        .expect("run cib");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn schema_command_prints_the_committed_schema() {
    let out = cib(&["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let committed = std::fs::read_to_string(repo().join("docs/cib.schema.json")).expect("schema");
    assert_eq!(String::from_utf8(out.stdout).expect("utf-8"), committed);
}

#[test]
fn plan_shows_the_pipelines_an_event_starts() {
    let path = repo().join("examples/python-app/.cib.yml");
    let path = path.to_str().expect("utf-8 path");
    let out = cib(&["plan", "--branch", "master", path]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.starts_with("push on master\n└─ staging (deploy, 3 steps)\n"), "{text}");
    assert!(text.contains("manual-qa [hold gate]  after smoke"), "{text}");
    assert!(text.contains("└─ publish: 1 deliverable\n"), "{text}");

    let out = cib(&["plan", "--event", "pull_request", "--branch", "master", "--json", path]);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let names: Vec<&str> =
        value["pipelines"].as_array().expect("array").iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["test"]);

    let out = cib(&["plan", "--event", "deploy", path]);
    assert_eq!(out.status.code(), Some(2), "an unknown event is a command-line error");
}
