//! Property tests: no body, however broken, makes `parse` or `verify` panic.
//!
//! Random bytes mostly exercise the JSON syntax errors; mutated recorded payloads get past the
//! syntax and reach the field handling, which is where a careless `unwrap` would hide.

use std::sync::LazyLock;

use cib_github::webhook::{self, ParseError};
use proptest::prelude::*;
use serde_json::Value;

use super::{EVENTS, all_fixtures};

/// The recorded payloads, read once for all cases.
static FIXTURES: LazyLock<Vec<(&'static str, Value)>> = LazyLock::new(|| {
    all_fixtures()
        .into_iter()
        .map(|(event, stem, bytes)| {
            let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{event}/{stem}: {e}"));
            (event, value)
        })
        .collect()
});

fn event_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(EVENTS.to_vec()).prop_map(str::to_owned),
        1 => "[a-z_]{0,20}",
    ]
}

/// A JSON value to put where a field was: every type, including the ones serde refuses.
fn replacement() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        Just(Value::String("/cib merge".to_owned())),
        Just(Value::String("refs/heads/".to_owned())),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the value at the n-th visited position (wrapping) with another value.
    Replace(usize, Value),
    /// Remove the n-th visited object key or array element (wrapping).
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), replacement()).prop_map(|(at, value)| Mutation::Replace(at, value)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

/// Every position in the tree, as JSON pointers, in a stable (depth-first) order.
fn pointers(value: &Value, prefix: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let pointer = format!("{prefix}/{}", key.replace('~', "~0").replace('/', "~1"));
                out.push(pointer.clone());
                pointers(child, pointer, out);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                let pointer = format!("{prefix}/{index}");
                out.push(pointer.clone());
                pointers(child, pointer, out);
            }
        }
        _ => {}
    }
}

fn apply(payload: &mut Value, mutation: &Mutation) {
    let mut all = Vec::new();
    pointers(payload, String::new(), &mut all);
    if all.is_empty() {
        return;
    }
    match mutation {
        Mutation::Replace(at, value) => {
            if let Some(slot) = payload.pointer_mut(&all[at % all.len()]) {
                *slot = value.clone();
            }
        }
        Mutation::Remove(at) => {
            let pointer = &all[at % all.len()];
            let Some((parent, key)) = pointer.rsplit_once('/') else { return };
            match payload.pointer_mut(parent) {
                Some(Value::Object(map)) => {
                    map.remove(&key.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(items)) => {
                    if let Ok(index) = key.parse::<usize>() {
                        items.remove(index);
                    }
                }
                _ => {}
            }
        }
    }
}

/// What every outcome must satisfy besides not panicking.
fn check(result: Result<cib_core::forge::ForgeEvent, ParseError>) {
    match result {
        Ok(event) => {
            // Anything parsed must be storable in the inbox.
            serde_json::to_string(&event).expect("a forge event serialises");
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(event in event_name(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
        check(webhook::parse(&event, &body));
    }

    #[test]
    fn mutated_recorded_payloads_never_panic(
        index in any::<usize>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
        as_other_event in proptest::option::weighted(0.1, event_name()),
    ) {
        let (recorded_as, payload) = &FIXTURES[index % FIXTURES.len()];
        let mut payload = payload.clone();
        for mutation in &mutations {
            apply(&mut payload, mutation);
        }
        let event = as_other_event.unwrap_or_else(|| (*recorded_as).to_owned());
        let body = serde_json::to_vec(&payload).expect("a Value always serialises");
        check(webhook::parse(&event, &body));
    }

    #[test]
    fn mutated_recorded_bytes_never_panic(
        index in any::<usize>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let (event, payload) = &FIXTURES[index % FIXTURES.len()];
        let mut body = serde_json::to_vec(payload).expect("a Value always serialises");
        for (at, byte) in edits {
            let at = at % body.len();
            body[at] = byte;
        }
        check(webhook::parse(event, &body));
    }

    #[test]
    fn any_signature_header_is_an_answer_not_a_panic(
        secret in proptest::collection::vec(any::<u8>(), 0..80),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        header in proptest::option::of(prop_oneof![".{0,80}", "sha256=[0-9a-fA-F]{60,68}", "sha256=.{64}"]),
    ) {
        let verdict = webhook::verify(&secret, &body, header.as_deref());
        // Only the real signature may pass.
        if verdict.is_ok() {
            let header = header.as_deref().map(|h| h.trim().to_ascii_lowercase());
            prop_assert_eq!(header, Some(webhook::sign(&secret, &body)));
        }
    }
}
