//! Every recorded payload from `@octokit/webhooks-examples`, parsed and pinned with insta.
//!
//! The fixtures are extracted by `scripts/extract-examples.mjs` (see `tests/fixtures/webhooks/
//! SOURCE.md`). Each one gets its own snapshot, named after its file, so a parser change shows
//! exactly which recorded deliveries it affects.

use cib_core::forge::ForgeEvent;
use cib_github::webhook;

use super::{EVENTS, all_fixtures};

/// Every recorded payload parses, and into the event pinned in `snapshots/it__recorded__pinned@<event>__<file>.snap`.
#[test]
fn pinned() {
    insta::glob!("../fixtures/webhooks", "*/*.json", |path| {
        let event = path.parent().and_then(|dir| dir.file_name()).and_then(|name| name.to_str()).expect("event folder");
        let body = std::fs::read(path).expect("fixture is readable");
        let parsed = webhook::parse(event, &body).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        insta::with_settings!({ omit_expression => true, description => format!("X-GitHub-Event: {event}") }, {
            insta::assert_yaml_snapshot!(parsed);
        });
    });
}

/// The snapshots above cannot notice a fixture that went missing, so the counts are pinned too.
#[test]
fn the_fixture_set_is_complete() {
    let fixtures = all_fixtures();
    let count = |event: &str| fixtures.iter().filter(|(e, _, _)| *e == event).count();
    let counts: Vec<(&str, usize)> = EVENTS.iter().map(|event| (*event, count(event))).collect();
    assert_eq!(counts, [("ping", 5), ("push", 10), ("pull_request", 35), ("issue_comment", 12), ("check_run", 12)]);
}

/// A recorded payload delivered under another event's name never panics and never passes for
/// the wrong kind of event: it is refused or ignored, or (for `ping`, which needs no field) a ping.
#[test]
fn recorded_payloads_under_the_wrong_event_name_are_refused_or_ignored() {
    for (recorded_as, stem, body) in all_fixtures() {
        for event in EVENTS.iter().copied().filter(|e| *e != recorded_as) {
            let Ok(parsed) = webhook::parse(event, &body) else { continue };
            let plausible = matches!(parsed, ForgeEvent::Ignored { .. } | ForgeEvent::Ping { .. });
            assert!(plausible, "{recorded_as}/{stem} parsed as {event}: {parsed:?}");
        }
    }
}
