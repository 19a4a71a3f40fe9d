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
fn plan_for_a_tag_and_for_changed_paths() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rust-app/.cib.yml");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cib")).arg("plan").args(args).arg(&spec).output().expect("run cib");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    insta::assert_snapshot!(run(&["--branch", "feature/x", "--changed", "docs/guide.md,README.md"]));
    insta::assert_snapshot!(run(&["--branch", "feature/x", "--changed", "src/main.rs"]));
}
