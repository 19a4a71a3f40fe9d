//! The ways of installing cib that the docs give: `cargo install --locked` and the systemd
//! unit in `docs/cib.service`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The unit's settings as `(section, key, value)`, in order.
fn settings(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not a setting: {line}"));
            out.push((section.clone(), key.to_owned(), value.to_owned()));
        }
    }
    out
}

fn setting<'a>(all: &'a [(String, String, String)], key: &str) -> Option<&'a str> {
    all.iter().find(|(s, k, _)| s == "Service" && k == key).map(|(_, _, v)| v.as_str())
}

/// The unit with its `ExecStart` pointing at the binary these tests built, since the
/// installed path does not exist here and `systemd-analyze verify` checks that it does.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let unit = read("docs/cib.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/cib "), "the unit runs /usr/local/bin/cib");
    let path = dir.join("cib.service");
    std::fs::write(
        &path,
        unit.replace("ExecStart=/usr/local/bin/cib ", &format!("ExecStart={} ", env!("CARGO_BIN_EXE_cib"))),
    )
    .expect("write unit");
    path
}

#[test]
fn the_service_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_for_this_build(dir.path());
    // `verify` reports unknown keys and values it cannot parse as warnings with exit 0, so
    // any output at all counts as a failure.
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn the_service_unit_restarts_hardens_and_serves() {
    let all = settings(&read("docs/cib.service"));
    for (key, value) in [
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", "/var/lib/cib"),
        ("StateDirectory", "cib"),
        ("SupplementaryGroups", "docker"),
    ] {
        assert_eq!(setting(&all, key), Some(value), "{key}");
    }
    // The stop allows more than the default shutdown_grace of 30 s, as docs/operations.md asks.
    let stop = setting(&all, "TimeoutStopSec").expect("TimeoutStopSec");
    let seconds: u64 = stop.trim_end_matches('s').parse().expect("seconds");
    assert!(seconds > 30, "TimeoutStopSec={stop}");

    // ExecStart is `cib serve` with options the real binary accepts: run it with `--help`.
    let exec = setting(&all, "ExecStart").expect("ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(&words[..2], ["/usr/local/bin/cib", "serve"], "{exec}");
    let help = Command::new(env!("CARGO_BIN_EXE_cib")).args(&words[1..]).arg("--help").output().expect("cib runs");
    assert!(help.status.success(), "{}", String::from_utf8_lossy(&help.stderr));
    for option in words[2..].iter().filter(|w| w.starts_with("--")) {
        assert!(String::from_utf8_lossy(&help.stdout).contains(option), "cib serve has no {option}");
    }
}

#[test]
fn the_docs_give_the_install_command_and_the_unit() {
    let install = "cargo install --locked --path cib-server";
    for doc in ["README.md", "docs/operations.md", "docs/cib.service"] {
        assert!(read(doc).contains(install), "{doc} does not say {install}");
    }
    assert!(read("README.md").contains("docs/cib.service"));
    assert!(read("docs/operations.md").contains("(cib.service)"));
    // The unit's data directory is the one docs/operations.md configures.
    assert!(read("docs/operations.md").contains("data_dir = \"/var/lib/cib\""));
}

/// `--locked` refuses to build when `Cargo.lock` does not match the manifests, so the
/// documented install works only while the lock file is up to date.
#[test]
fn the_lock_file_is_up_to_date_for_a_locked_install() {
    let out = Command::new(env!("CARGO"))
        // `tree` resolves like `install` does, for this machine's platform only, so it needs no
        // crate that the build does not need.
        .args(["tree", "--locked", "--offline", "-p", "cib-server", "-e", "normal"])
        .current_dir(root())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
