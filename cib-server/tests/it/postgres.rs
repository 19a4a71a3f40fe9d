//! `cib serve` on PostgreSQL, as a process with real Docker: a pushed commit built and its log
//! read back; and `cib store copy` moving a served SQLite store to PostgreSQL, after which the
//! server serves the same builds and logs from there.

use std::path::{Path, PathBuf};
use std::process::Command;

use cib_store::testing::TestDatabase;

use super::restart::{Server, builds, config_with, free_port, hook, http, start, wait_clean, wait_for};
use super::server::{push_payload, repo};

fn database() -> TestDatabase {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(TestDatabase::create()).unwrap_or_else(|e| panic!("a test database: {e}"))
}

/// The restart tests' configuration, with `store` set (a top-level key, so it goes first).
fn config_on(dir: &Path, port: u16, repo_path: &Path, store: Option<&str>) -> PathBuf {
    let path = config_with(dir, port, repo_path, "");
    if let Some(store) = store {
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, format!("store = \"{store}\"\n{text}")).expect("config");
    }
    path
}

fn read(server: &Server, path: &str) -> String {
    let (status, body) = http(&server.url, "GET", path, &[("authorization", "Bearer reader-token-0123456789")], b"");
    assert_eq!(status, 200, "{path}: {body}");
    body
}

const SPEC: &str =
    "pipelines:\n  test:\n    steps:\n      - { name: hello, image: busybox, commands: [echo hello from postgres] }\n";

/// Pushes a commit and waits for its one build to succeed: the build's id.
fn push_and_build(server: &Server, commit: &str, delivery: &str) -> String {
    assert_eq!(hook(&server.url, delivery, &push_payload(commit)), 202);
    let done = wait_for(&server.url, "the pushed commit was built", |b| {
        b["builds"].as_array().is_some_and(|a| a.len() == 1 && a[0]["status"] == "success")
    });
    done["builds"][0]["id"].as_str().expect("id").to_owned()
}

#[test]
fn cib_serve_on_postgres_builds_a_pushed_commit_and_serves_its_log() {
    let db = database();
    let dir = tempfile::tempdir().expect("temp dir");
    let commit = repo(&dir.path().join("shop"), SPEC);
    let port = free_port();
    let config = config_on(dir.path(), port, &dir.path().join("shop"), Some(&db.url));
    let server = start(&config, port);
    let id = push_and_build(&server, &commit, "pg-1");
    let log = read(&server, &format!("/api/v1/builds/{id}/steps/hello/log?attempt=1"));
    assert!(log.contains("hello from postgres"), "{log}");
    // A repeat of the delivery is answered and builds nothing: the inbox is PostgreSQL's.
    assert_eq!(hook(&server.url, "pg-1", &push_payload(&commit)), 202);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let all = builds(&server.url);
    assert_eq!(all["builds"].as_array().map(Vec::len), Some(1), "{all:#}");
    // Nothing went to a SQLite file.
    assert!(!dir.path().join("data/cib.db").exists(), "the SQLite file was made");
    server.kill();
    // A new server on the same database serves the same build.
    let server = start(&config, port);
    let record = read(&server, &format!("/api/v1/builds/{id}"));
    assert!(record.contains("\"success\""), "{record}");
    wait_clean(&id);
}

fn cib(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cib")).args(args).output().expect("run cib");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cib_store_copy_moves_a_served_sqlite_store_and_the_server_serves_it_from_postgres() {
    let db = database();
    let dir = tempfile::tempdir().expect("temp dir");
    let commit = repo(&dir.path().join("shop"), SPEC);
    let port = free_port();
    let on_sqlite = config_on(dir.path(), port, &dir.path().join("shop"), None);
    let server = start(&on_sqlite, port);
    let id = push_and_build(&server, &commit, "sq-1");
    let log = read(&server, &format!("/api/v1/builds/{id}/steps/hello/log?attempt=1"));
    let record = read(&server, &format!("/api/v1/builds/{id}"));
    server.kill();

    let from = format!("sqlite:{}", dir.path().join("data/cib.db").display());
    let (code, out, err) = cib(&["store", "copy", "--from", &from, "--to", &db.url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every table's rows and checksum match"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("builds ") && l.contains(" 1 ")), "{out}");
    // Again: the target holds rows now, and is refused.
    let (code, _, err) = cib(&["store", "copy", "--from", &from, "--to", &db.url]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not empty"), "{err}");
    // Arguments that are not a SQLite store and a PostgreSQL URL are usage errors.
    assert_eq!(cib(&["store", "copy", "--from", &db.url, "--to", &db.url]).0, 2);
    assert_eq!(cib(&["store", "copy", "--from", &from, "--to", "mysql://x/y"]).0, 2);

    let on_postgres = config_on(dir.path(), port, &dir.path().join("shop"), Some(&db.url));
    let server = start(&on_postgres, port);
    assert_eq!(read(&server, &format!("/api/v1/builds/{id}")), record, "the same build");
    assert_eq!(read(&server, &format!("/api/v1/builds/{id}/steps/hello/log?attempt=1")), log, "the same log");
    // The copied inbox remembers the delivery: a repeat builds nothing.
    assert_eq!(hook(&server.url, "sq-1", &push_payload(&commit)), 202);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let all = builds(&server.url);
    assert_eq!(all["builds"].as_array().map(Vec::len), Some(1), "{all:#}");
    wait_clean(&id);
}
