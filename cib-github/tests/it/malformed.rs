//! Bodies that cannot be parsed: each is a `ParseError` whose message names what is wrong, since
//! the server sends that message back in its 400 answer.

use cib_github::webhook::{ParseError, parse};
use serde_json::{Value, json};

use super::{EVENTS, fixture, parse_value};

fn missing(event: &str, field: &str) -> ParseError {
    ParseError::MissingField { event: event.to_owned(), field: field.to_owned() }
}

fn without(mut payload: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer has a slash");
    let object = payload.pointer_mut(parent).and_then(Value::as_object_mut).expect("parent object");
    object.remove(key).unwrap_or_else(|| panic!("no {pointer}"));
    payload
}

#[test]
fn bodies_that_are_not_json_are_refused_for_every_known_event() {
    for event in EVENTS {
        for body in [&b""[..], b"{", b"{\"action\": }", b"\xff\xfe", b"{} trailing", b"null null", b"{} {}"] {
            match parse(event, body) {
                Err(ParseError::Json { event: e, reason }) => assert!(e == event && !reason.is_empty()),
                other => panic!("{event} {body:?}: {other:?}"),
            }
        }
    }
}

#[test]
fn a_body_that_is_not_an_object_names_the_root() {
    for event in ["push", "pull_request"] {
        for body in ["[]", "42", "\"push\"", "null"] {
            match parse(event, body.as_bytes()) {
                Err(ParseError::InvalidField { field, .. }) => assert_eq!(field, "(root)", "{event} {body}"),
                other => panic!("{event} {body}: {other:?}"),
            }
        }
    }
}

#[test]
fn a_missing_action_is_named() {
    for event in ["pull_request", "issue_comment", "check_run"] {
        assert_eq!(parse(event, b"{}"), Err(missing(event, "action")));
    }
}

#[test]
fn missing_fields_are_named_with_their_path() {
    let cases = [
        ("pull_request", "dotcom-00", "/pull_request/head/sha", "pull_request.head.sha"),
        ("pull_request", "dotcom-00", "/pull_request/head/repo", "pull_request.head.repo"),
        ("pull_request", "dotcom-00", "/pull_request/base/repo/full_name", "pull_request.base.repo.full_name"),
        ("pull_request", "dotcom-00", "/pull_request/merged", "pull_request.merged"),
        ("pull_request", "dotcom-00", "/pull_request", "pull_request"),
        ("pull_request", "dotcom-00", "/sender", "sender"),
        ("push", "dotcom-04", "/ref", "ref"),
        ("push", "dotcom-04", "/forced", "forced"),
        ("push", "dotcom-04", "/repository/full_name", "repository.full_name"),
        ("push", "dotcom-04", "/sender/login", "sender.login"),
        ("check_run", "dotcom-07", "/check_run/head_sha", "check_run.head_sha"),
        ("issue_comment", "dotcom-00", "/comment/body", "comment.body"),
        ("issue_comment", "dotcom-00", "/issue/number", "issue.number"),
    ];
    for (event, stem, pointer, field) in cases {
        let payload = without(fixture(event, stem), pointer);
        let error = parse_value(event, &payload).expect_err(pointer);
        assert_eq!(error, missing(event, field));
        assert_eq!(error.to_string(), format!("the {event} payload is missing `{field}`"));
    }
}

#[test]
fn fields_of_the_wrong_type_are_named_with_their_path() {
    let cases = [
        ("pull_request", "/pull_request/number", json!("1"), "pull_request.number"),
        ("pull_request", "/pull_request/number", json!(-1), "pull_request.number"),
        ("pull_request", "/pull_request/head/sha", Value::Null, "pull_request.head.sha"),
        ("pull_request", "/pull_request/merged", json!("yes"), "pull_request.merged"),
        ("pull_request", "/sender", Value::Null, "sender"),
        ("pull_request", "/action", json!(7), "action"),
    ];
    for (event, pointer, value, field) in cases {
        let mut payload = fixture(event, "dotcom-00");
        *payload.pointer_mut(pointer).expect(pointer) = value;
        match parse_value(event, &payload) {
            Err(ParseError::InvalidField { field: f, reason, .. }) => {
                assert_eq!(f, field);
                assert!(reason.starts_with("invalid type") || reason.starts_with("invalid value"), "{reason}");
            }
            other => panic!("{pointer}: {other:?}"),
        }
    }
}

#[test]
fn a_wrongly_typed_commit_list_is_named_with_its_index() {
    let mut payload = fixture("push", "dotcom-04");
    payload["commits"] = json!([{ "added": ["a"], "modified": [], "removed": [] }, { "added": "a" }]);
    match parse_value("push", &payload) {
        Err(ParseError::InvalidField { field, .. }) => assert_eq!(field, "commits[1].added"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    // serde_json skips an unread field without recursing and stops at 128 levels for a read one,
    // so neither a million-deep ignored field nor a deep value in a read field can crash the server.
    let open = "[".repeat(1_000_000);
    let close = "]".repeat(1_000_000);
    let ignored_field = format!("{{\"action\": \"opened\", \"x\": {open}{close}}}");
    assert_eq!(parse("pull_request", ignored_field.as_bytes()), Err(missing("pull_request", "pull_request")));
    let read_field = format!("{{\"action\": \"opened\", \"pull_request\": {open}{close}}}");
    assert!(matches!(parse("pull_request", read_field.as_bytes()), Err(ParseError::InvalidField { .. })));
    let unclosed = format!("{{\"action\": \"opened\", \"x\": {open}}}");
    assert!(matches!(parse("pull_request", unclosed.as_bytes()), Err(ParseError::Json { .. })));
}
