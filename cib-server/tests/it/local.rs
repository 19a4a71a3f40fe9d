//! The local commands added for everyday use: `cib init` for each kind of project,
//! `cib lint --format json`, `cib run --json`, `cib completions`, `cib man` and `cib --version`.

use std::path::Path;
use std::process::{Command, Output};

use super::server::git;

fn cib(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cib")).args(args).current_dir(dir).output().expect("run cib")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A kind of project: its name, the files that mark it, the kind `cib init` names, and a text
/// its spec must hold.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);

#[test]
fn init_writes_a_spec_that_lints_clean_for_each_kind_of_project() {
    let cases: [Case; 5] = [
        ("python", &[("pyproject.toml", "[project]\nname = \"x\"\n")], "Python", "python:3.11-slim"),
        ("node", &[("package.json", "{\"name\": \"x\"}\n"), ("package-lock.json", "{}\n")], "Node", "npm ci"),
        ("rust", &[("Cargo.toml", "[package]\nname = \"x\"\n")], "Rust", "cargo test"),
        ("go", &[("go.mod", "module example.com/x\n")], "Go", "go test ./..."),
        ("shell", &[("run.sh", "echo hi\n")], "shell", "sh -n"),
    ];
    for (name, files, kind, expected) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        for (file, content) in files {
            std::fs::write(dir.path().join(file), content).expect("write");
        }
        let out = cib(dir.path(), &["init"]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains(&format!("for a {kind} project")), "{name}: {}", text(&out.stdout));
        let spec = std::fs::read_to_string(dir.path().join(".cib.yml")).expect("written");
        assert_eq!(
            spec.lines().next(),
            Some("# yaml-language-server: $schema=https://cib.invalid/schema/cib.schema.json"),
            "{name}: the modeline comes first"
        );
        assert!(spec.contains("docs/spec.md"), "{name}: points at the reference");
        assert!(spec.contains(expected), "{name}: {spec}");
        let out = cib(dir.path(), &["lint"]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}{spec}", text(&out.stdout));
        let out = cib(dir.path(), &["plan", "--branch", "feature/x"]);
        assert!(text(&out.stdout).contains("test"), "{name}: a push to a branch runs it: {}", text(&out.stdout));

        // Never over an existing spec, unless asked.
        std::fs::write(dir.path().join(".cib.yml"), "# mine\n").expect("write");
        let out = cib(dir.path(), &["init"]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(text(&out.stderr).contains("--force"), "{name}: {}", text(&out.stderr));
        assert_eq!(std::fs::read_to_string(dir.path().join(".cib.yml")).expect("kept"), "# mine\n");
        let out = cib(dir.path(), &["init", "--force"]);
        assert_eq!(out.status.code(), Some(0), "{name}");
        assert_eq!(std::fs::read_to_string(dir.path().join(".cib.yml")).expect("replaced"), spec);
    }

    // The kind may be named, the directory given; a missing directory is a usage error.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("Cargo.toml"), "").expect("write");
    let target = dir.path().to_str().expect("utf-8");
    let out = cib(Path::new("/"), &["init", target, "--kind", "go"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(std::fs::read_to_string(dir.path().join(".cib.yml")).expect("written").contains("golang"));
    let out = cib(Path::new("/"), &["init", "/nonexistent/project"]);
    assert_eq!(out.status.code(), Some(2));
    let out = cib(Path::new("/"), &["init", target, "--kind", "cobol"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Copies a directory tree (files and directories only, as the examples hold).
pub(crate) fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Makes `dir` a Git repository on a feature branch with everything committed, as a person's
/// checkout would be, so that `cib run` runs the `test` pipeline there.
pub(crate) fn commit_all(dir: &Path) {
    if !dir.join(".git").exists() {
        git(dir, &["init", "-q", "-b", "feature/x"]);
    }
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "start"]);
}

/// `cib run` in `dir`: exit 0 and the `test` pipeline green.
fn run_green(name: &str, dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_cib"))
        .args(["run", "--color", "never"])
        .current_dir(dir)
        .env("CIB_DATA_DIR", dir.join(".cib-data"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{name}: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("pipeline test succeeded"), "{name}: {}", text(&out.stdout));
}

/// `cib init` in a copy of an example without its spec, then `cib run`: green.
fn init_and_run_example(name: &str, kind: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
    copy_tree(&example, dir.path());
    std::fs::remove_file(dir.path().join(".cib.yml")).expect("the example's own spec goes");
    git(dir.path(), &["init", "-q", "-b", "feature/x"]);
    let out = cib(dir.path(), &["init"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("for a {kind} project")), "{}", text(&out.stdout));
    commit_all(dir.path());
    run_green(name, dir.path());
}

/// Every example's own spec, unchanged, runs green with `cib run` in a copy of it.
fn run_example(name: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
    copy_tree(&example, dir.path());
    commit_all(dir.path());
    run_green(name, dir.path());
}

#[test]
fn the_shell_example_runs_green() {
    run_example("shell");
}

#[test]
fn the_python_tests_example_runs_green() {
    run_example("python-tests");
}

/// Its test pipeline: ruff and build from the package index (the local python image trusts
/// this machine's certificate authorities, as the host does), pytest on an editable install.
#[test]
fn the_python_app_example_runs_green() {
    run_example("python-app");
}

#[test]
fn the_node_example_runs_green() {
    run_example("node-app");
}

#[test]
fn the_rust_example_runs_green() {
    run_example("rust-app");
}

#[test]
fn init_in_the_node_example_runs_green() {
    init_and_run_example("node-app", "Node");
}

#[test]
fn init_in_the_rust_example_runs_green() {
    init_and_run_example("rust-app", "Rust");
}

/// The local stand-ins for `node:20` and `rust:1.95` (scripts/build-test-images) run the
/// versions their tags name.
#[test]
fn the_toolchain_images_run_the_versions_their_tags_name() {
    let version = |image: &str, command: &str| {
        let out = Command::new("docker")
            .args(["run", "--rm", "--network", "none", image, "sh", "-c", command])
            .output()
            .expect("docker run");
        assert!(out.status.success(), "{image}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let node = version("node:20", "node --version");
    assert!(node.starts_with("v20."), "node:20 runs node {node}");
    let rust = version("rust:1.95", "rustc --version && cargo --version");
    assert!(rust.starts_with("rustc 1.95.") && rust.contains("\ncargo 1.95."), "rust:1.95 runs {rust}");
}

/// The README's first command, `scripts/demo`, prints each step and a green summary.
#[test]
fn the_demo_script_runs_the_shell_example_green() {
    let data = tempfile::tempdir().expect("temp dir");
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo"))
        .args(["--color", "never", "--branch", "demo"])
        .env("CIB_BIN", env!("CARGO_BIN_EXE_cib"))
        .env("CIB_DATA_DIR", data.path())
        .output()
        .expect("run scripts/demo");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for line in ["check", "offline", "pipeline test succeeded"] {
        assert!(stdout.contains(line), "the summary names {line}: {stdout}");
    }
}

#[test]
fn init_in_the_shell_example_runs_green() {
    init_and_run_example("shell", "shell");
}

#[test]
fn init_in_the_python_example_runs_green() {
    init_and_run_example("python-tests", "Python");
}

#[test]
fn lint_json_gives_each_problem_with_its_place_and_suggestion() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(".cib.yml");
    std::fs::write(
        &path,
        "pipelines:\n  test:\n    steps:\n      - name: a\n        image: busybox\n        comands: [ls]\n        timeout: 10x\n",
    )
    .expect("write");
    let shown = path.to_str().expect("utf-8");
    let out = cib(dir.path(), &["lint", "--format", "json", shown]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(v["valid"], false);
    let diags = v["diagnostics"].as_array().expect("a list");
    assert_eq!(diags.len(), 2, "{v:#}");
    assert_eq!(
        diags[0],
        serde_json::json!({
            "path": shown,
            "line": 6,
            "column": 9,
            "message": "unknown key 'comands' (did you mean 'commands'?)",
            "suggestion": "commands",
        })
    );
    assert_eq!((diags[1]["line"].as_u64(), diags[1]["column"].as_u64()), (Some(7), Some(18)), "{v:#}");
    assert!(diags[1]["message"].as_str().is_some_and(|m| m.contains("invalid duration '10x'")), "{v:#}");
    assert_eq!(diags[1]["suggestion"], serde_json::Value::Null, "no suggestion where there is none");

    std::fs::write(&path, "pipelines:\n  test:\n    steps: [{ name: a, image: busybox, commands: [true] }]\n")
        .expect("write");
    let out = cib(dir.path(), &["lint", "--format", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((v["valid"].as_bool(), v["diagnostics"].as_array().map(Vec::len)), (Some(true), Some(0)));
    let out = cib(dir.path(), &["lint", "--format", "yaml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_json_prints_one_event_per_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    git(dir.path(), &["init", "-q", "-b", "feature/json"]);
    let spec = "pipelines:\n  test:\n    steps:\n      - { name: hello, image: busybox, commands: ['echo one', 'printf two'] }\n      - { name: after, image: busybox, depends_on: [hello], commands: ['echo three'] }\n";
    std::fs::write(dir.path().join(".cib.yml"), spec).expect("write");
    git(dir.path(), &["add", "."]);
    git(dir.path(), &["commit", "-q", "-m", "start"]);
    let out = Command::new(env!("CARGO_BIN_EXE_cib"))
        .args(["run", "--json"])
        .current_dir(dir.path())
        .env("CIB_DATA_DIR", dir.path().join(".cib-data"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object a line ({e}): {l}")))
        .collect();
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types.first(), Some(&"run_started"), "{stdout}");
    assert_eq!(types.last(), Some(&"run_finished"), "{stdout}");
    assert_eq!(events[0]["pipelines"][0]["pipeline"], "test");
    let output: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["type"] == "output")
        .map(|e| (e["step"].as_str().unwrap_or(""), e["text"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(output, [("hello", "one"), ("hello", "two"), ("after", "three")], "{stdout}");
    // The unfinished last line of a step comes before the step's end.
    let two = types.iter().zip(&events).position(|(_, e)| e["text"] == "two").expect("two");
    let finished = events
        .iter()
        .position(|e| e["type"] == "step_finished" && e["step"] == "hello")
        .expect("the step's end, as the event stream has it");
    assert!(two < finished, "{stdout}");
    assert!(events[finished]["seq"].as_u64().is_some(), "events keep their sequence numbers: {stdout}");
    let last = events.last().expect("last");
    assert_eq!(last["exit"], 0);
    assert_eq!(last["pipelines"][0]["conclusion"], "success", "{last}");
    let steps: Vec<&str> =
        last["steps"].as_array().expect("steps").iter().filter_map(|s| s["result"].as_str()).collect();
    assert_eq!(steps, ["success", "success"], "{last}");
    assert!(!stdout.contains('\x1b'), "no colour codes in JSON");

    // A failing step: exit 1 and the closing line says so.
    std::fs::write(
        dir.path().join(".cib.yml"),
        "pipelines:\n  test:\n    steps: [{ name: bad, image: busybox, commands: ['exit 4'] }]\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cib"))
        .args(["run", "--json"])
        .current_dir(dir.path())
        .env("CIB_DATA_DIR", dir.path().join(".cib-data"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let last: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap_or_default()).expect("json");
    assert_eq!((last["exit"].as_u64(), last["steps"][0]["result"].as_str()), (Some(1), Some("failed")), "{last}");
}

const SUBCOMMANDS: [&str; 16] = [
    "builds",
    "build",
    "logs",
    "trigger",
    "cancel",
    "retry",
    "approve",
    "reject",
    "merge",
    "promote",
    "approvals",
    "envs",
    "whoami",
    "init",
    "lint",
    "run",
];

#[test]
fn completions_and_the_manual_name_every_command() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = cib(here, &["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = text(&out.stdout);
        for command in SUBCOMMANDS {
            assert!(script.contains(command), "{shell} completes {command}");
        }
        assert!(script.contains("follow") && script.contains("timestamps"), "{shell} completes flags");
    }
    assert_eq!(cib(here, &["completions", "tcsh"]).status.code(), Some(2));

    let out = cib(here, &["man"]);
    assert_eq!(out.status.code(), Some(0));
    let page = text(&out.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH cib 1"), "roff: {page}");
    for command in SUBCOMMANDS {
        assert!(page.contains(&format!("cib\\-{command}")) || page.contains(command), "the page names {command}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let out = cib(here, &["man", "--dir", dir.path().to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for page in ["cib.1", "cib-builds.1", "cib-logs.1", "cib-init.1"] {
        let written = std::fs::read_to_string(dir.path().join(page)).unwrap_or_default();
        assert!(written.contains(".TH"), "{page} is a manual page");
    }
    let logs = std::fs::read_to_string(dir.path().join("cib-logs.1")).unwrap_or_default();
    assert!(logs.contains("follow") && logs.contains("attempt"), "{logs}");
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = cib(here, &["--version"]);
    assert_eq!(out.status.code(), Some(0));
    let version = text(&out.stdout);
    assert!(version.starts_with(&format!("cib {} (commit ", env!("CARGO_PKG_VERSION"))), "{version}");
    // The test binary and `cib` are built together, from the same tree: the commit is HEAD's
    // (or what CIB_BUILD_COMMIT named for a tree without Git).
    let expected = match std::env::var("CIB_BUILD_COMMIT") {
        Ok(given) if !given.trim().is_empty() => given.trim().to_owned(),
        _ => git(here, &["rev-parse", "--short=12", "HEAD"]),
    };
    assert!(version.contains(&format!("(commit {expected}")), "{version} names {expected}");
}

/// cib builds itself: `cib run` at the repository's root runs its own `.cib.yml` (formatting,
/// then the tests of cib-core in rust:1.95) green.
#[test]
fn cib_runs_its_own_spec_green() {
    let data = tempfile::tempdir().expect("temp dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(env!("CARGO_BIN_EXE_cib"))
        .args(["run", "--color", "never", "--branch", "self-test"])
        .current_dir(&root)
        .env("CIB_DATA_DIR", data.path())
        .output()
        .expect("run");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("pipeline test succeeded"), "{stdout}");
    assert!(stdout.contains("test result: ok"), "cib-core's tests ran: {stdout}");
}
