//! cib-github's integration tests, in one binary to keep link time down (see DESIGN.md).
//!
//! `recorded` pins what every payload from `@octokit/webhooks-examples` parses into; `derived`
//! edits those payloads to reach the cases the recordings lack (forks, merges, commands);
//! `malformed` checks the reasons given for bad bodies; `fuzz` checks nothing makes `parse` panic.
//! `api_fake`, `vcs`, `notifier` and `app_auth` run the API ports against the fake GitHub of
//! `cib_github::testing`, which checks every request against GitHub's OpenAPI description;
//! `child` re-runs this binary as a process the notifier test kills.

mod api_fake;
mod app_auth;
mod child;
mod derived;
mod fuzz;
mod malformed;
mod notifier;
mod recorded;
mod signature;
mod vcs;

use std::path::{Path, PathBuf};

use cib_core::forge::ForgeEvent;
use cib_github::webhook::{self, ParseError};
use serde_json::Value;

/// The events whose recorded payloads live under `tests/fixtures/webhooks/<event>/`.
pub const EVENTS: [&str; 5] = ["ping", "push", "pull_request", "issue_comment", "check_run"];

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhooks")
}

/// Every recorded payload as `(event, file stem, bytes)`, in a stable order.
pub fn all_fixtures() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut all = Vec::new();
    for event in EVENTS {
        let dir = fixtures_dir().join(event);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
        for path in files {
            let stem = path.file_stem().expect("file name").to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            all.push((event, stem, bytes));
        }
    }
    all
}

/// One recorded payload as a JSON value, to be edited by a test.
pub fn fixture(event: &str, stem: &str) -> Value {
    let path = fixtures_dir().join(event).join(format!("{stem}.json"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn parse_value(event: &str, payload: &Value) -> Result<ForgeEvent, ParseError> {
    webhook::parse(event, &serde_json::to_vec(payload).expect("a Value always serialises"))
}
