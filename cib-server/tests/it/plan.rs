//! `cib plan` for each kind of event on the example project, pinned with insta.

use std::path::Path;
use std::process::Command;

fn plan(args: &[&str]) -> String {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-app/.cib.yml");
    let out = Command::new(env!("CARGO_BIN_EXE_cib")).arg("plan").args(args).arg(spec).output().expect("run cib");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn plan_for_a_push_to_a_feature_branch() {
    insta::assert_snapshot!(plan(&["--branch", "feature/login"]));
}

#[test]
fn plan_for_a_push_to_master() {
    insta::assert_snapshot!(plan(&["--branch", "master"]));
}

#[test]
fn plan_for_a_pull_request() {
    insta::assert_snapshot!(plan(&["--event", "pull_request", "--branch", "master", "--json"]));
}

#[test]
fn plan_for_a_promotion_and_a_push_to_production() {
    insta::assert_snapshot!(plan(&["--event", "promotion", "--branch", "production"]));
    insta::assert_snapshot!(plan(&["--branch", "production"]));
}

#[test]
fn plan_shows_the_deliverables_each_pipeline_would_publish() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/image-app/.cib.yml");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cib")).arg("plan").args(args).arg(&spec).output().expect("run cib");
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    insta::assert_snapshot!(run(&["--branch", "master"]));
    insta::assert_snapshot!(run(&["--event", "promotion", "--branch", "production"]));
    let json: serde_json::Value = serde_json::from_str(&run(&["--branch", "production", "--json"])).expect("json");
    assert_eq!(json["pipelines"][0]["deliverables"][0]["pypi"]["from"], "staging", "{json:#}");
}

#[test]
fn plan_for_a_tag_and_for_changed_paths() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rust-app/.cib.yml");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cib")).arg("plan").args(args).arg(&spec).output().expect("run cib");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    insta::assert_snapshot!(run(&["--branch", "feature/x", "--changed", "docs/guide.md,README.md"]));
    insta::assert_snapshot!(run(&["--branch", "feature/x", "--changed", "src/main.rs"]));
}

/// `cib plan --json` on a spec written to a temporary file, with these extra arguments.
fn plan_spec(spec: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(".cib.yml");
    std::fs::write(&path, spec).expect("spec");
    let out = Command::new(env!("CARGO_BIN_EXE_cib"))
        .current_dir(dir.path())
        .args(["plan", "--json", "--branch", "master"])
        .args(args)
        .arg(&path)
        .env_remove("CIB_CONFIG")
        .output()
        .expect("run cib");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8");
    (out.status.code(), text(out.stdout), text(out.stderr))
}

const NO_TIMEOUT: &str = "pipelines:
  test:
    on: { push: {} }
    steps:
      - { name: unit, image: busybox, commands: [make] }
      - { name: slow, image: busybox, commands: [make], timeout: 3h, limits: { pids: 64 } }
";

#[test]
fn a_step_without_a_timeout_is_planned_with_the_default() {
    let (code, out, err) = plan_spec(NO_TIMEOUT, &[]);
    assert_eq!(code, Some(0), "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).expect("json");
    let steps = &plan["pipelines"][0]["steps"];
    assert_eq!(steps[0]["name"], "unit");
    assert_eq!(steps[0]["timeout"], "1h", "the built-in default: {plan}");
    assert_eq!(steps[0]["memory"], "2g");
    assert_eq!(steps[0]["pids"], 1024);
    assert_eq!(steps[1]["timeout"], "3h", "the spec's own value stays");
    assert_eq!(steps[1]["pids"], 64);
    assert_eq!(plan["pipelines"][0]["timeout"], serde_json::Value::Null, "no pipeline default is built in");

    // A server configuration's [limits] apply instead.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cib.toml");
    std::fs::write(&config, "[limits]\nstep_timeout = \"20m\"\nmax_step_timeout = \"4h\"\npipeline_timeout = \"5h\"\n")
        .expect("config");
    let (code, out, err) = plan_spec(NO_TIMEOUT, &["--config", config.to_str().expect("path")]);
    assert_eq!(code, Some(0), "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(plan["pipelines"][0]["steps"][0]["timeout"], "20m");
    assert_eq!(plan["pipelines"][0]["timeout"], "5h");
}

#[test]
fn a_spec_over_a_maximum_is_refused_naming_the_key_and_the_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cib.toml");
    std::fs::write(&config, "[limits]\nmax_step_timeout = \"2h\"\n").expect("config");
    let (code, out, err) = plan_spec(NO_TIMEOUT, &["--config", config.to_str().expect("path")]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        err.contains(
            ".cib.yml:6:66: error: pipelines.test.steps.slow.timeout is 3h, over this server's limit of 2h \
             (max_step_timeout in its [limits])"
        ),
        "{err}"
    );
    // Past the built-in day, too, with no configuration at all.
    let (code, _, err) = plan_spec(&NO_TIMEOUT.replace("3h", "2d"), &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("pipelines.test.steps.slow.timeout is 2d, over this server's limit of 1d"), "{err}");
    // A configuration with a bad value is refused, naming the key.
    std::fs::write(&config, "[limits]\nmax_step_timeout = \"forever\"\n").expect("config");
    let (code, _, err) = plan_spec(NO_TIMEOUT, &["--config", config.to_str().expect("path")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("max_step_timeout") && err.contains("invalid duration 'forever'"), "{err}");
}

#[test]
fn plan_shows_the_cells_of_a_matrix() {
    let spec = "pipelines:
  test:
    on: { push: {} }
    steps:
      - name: unit
        image: \"python:{{ matrix.python }}-slim\"
        matrix: { python: [\"3.11\", \"3.12\"], db: [sqlite, postgres], exclude: [{ python: \"3.11\", db: postgres }] }
        fail_fast: true
        commands: [pytest]
      - { name: package, image: busybox, depends_on: [unit], commands: [make] }
";
    let (code, out, err) = plan_spec(spec, &[]);
    assert_eq!(code, Some(0), "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).expect("json");
    let steps = plan["pipelines"][0]["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap_or_default()).collect();
    assert_eq!(
        names,
        [
            "unit (python=3.11, db=sqlite)",
            "unit (python=3.12, db=sqlite)",
            "unit (python=3.12, db=postgres)",
            "package"
        ]
    );
    assert_eq!(steps[2]["image"], "python:3.12-slim");
    assert_eq!(
        steps[2]["matrix"],
        serde_json::json!({ "step": "unit", "values": { "python": "3.12", "db": "postgres" }, "fail_fast": true })
    );
    assert_eq!(steps[3]["depends_on"].as_array().map(Vec::len), Some(3));
    // The text plan lists each cell, and a dependent as waiting for all of them.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(".cib.yml"), spec).expect("spec");
    let out = Command::new(env!("CARGO_BIN_EXE_cib"))
        .current_dir(dir.path())
        .args(["plan", "--branch", "feature/x"])
        .env_remove("CIB_CONFIG")
        .output()
        .expect("run cib");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("test (test, 4 steps)"), "{text}");
    assert!(text.contains("├─ unit (python=3.12, db=postgres) [python:3.12-slim]"), "{text}");
    assert!(text.contains("└─ package [busybox]  after unit (all 3 cells)"), "{text}");
}
