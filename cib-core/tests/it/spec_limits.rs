//! What reading a spec may cost: texts over the size limit, texts that are not UTF-8, and
//! hostile YAML shaped to make the reader work hard, each answered with a diagnostic, quickly.

use std::time::{Duration, Instant};

use cib_core::spec::{self, MAX_SPEC_BYTES, Pos};
use cib_core::testing::hostile;

/// Generous enough for a debug build on a loaded machine; the shapes this guards against took
/// tens of seconds before they were bounded.
const TIME_LIMIT: Duration = Duration::from_secs(2);

const VALID: &str = "pipelines:\n  test:\n    steps: [{ name: unit, image: busybox, commands: [echo hi] }]\n";

/// What reading a case must give.
enum Expect {
    Accepted,
    /// Refused, with a diagnostic at this position whose message holds this text.
    Refused(Pos, &'static str),
}

fn at(line: u32, col: u32) -> Pos {
    Pos { line, col }
}

/// Parses `bytes` within [`TIME_LIMIT`] and checks the outcome.
fn check(name: &str, bytes: &[u8], expect: &Expect) {
    let started = Instant::now();
    let outcome = spec::parse_bytes(bytes);
    let took = started.elapsed();
    assert!(took < TIME_LIMIT, "{name}: took {took:?}");
    match (expect, outcome) {
        (Expect::Accepted, Ok(_)) => {}
        (Expect::Accepted, Err(diags)) => panic!("{name}: refused: {diags:?}"),
        (Expect::Refused(..), Ok(_)) => panic!("{name}: accepted"),
        (Expect::Refused(pos, text), Err(diags)) => assert!(
            diags.iter().any(|d| d.pos == *pos && d.message.contains(text)),
            "{name}: no diagnostic at {pos} saying '{text}' among {:?}",
            diags.iter().take(5).collect::<Vec<_>>()
        ),
    }
}

/// The merge-key chain of issue 14, about 365 KB long.
fn issue_merge_chain() -> Vec<u8> {
    hostile::merge_key_chain(365 * 1024).into_bytes()
}

/// A valid spec padded with a comment to exactly `len` bytes.
fn padded(len: usize) -> Vec<u8> {
    let mut text = format!("{VALID}# ");
    text.push_str(&"x".repeat(len - text.len() - 1));
    text.push('\n');
    text.into_bytes()
}

fn with_bad_byte(before: &str) -> Vec<u8> {
    let mut bytes = before.as_bytes().to_vec();
    bytes.push(0xFF);
    bytes.extend_from_slice(b" rest\n");
    bytes
}

#[test]
fn limits_cases() {
    let mut truncated_utf8 = b"pipelines:\n  caf".to_vec();
    // The first byte of a two-byte sequence with nothing after it.
    truncated_utf8.push(0xC3);
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("merge-key chain of the issue", issue_merge_chain(), Expect::Refused(at(1, 1), "expands to more than")),
        ("exactly 1 MiB", padded(MAX_SPEC_BYTES), Expect::Accepted),
        ("one byte over 1 MiB", padded(MAX_SPEC_BYTES + 1), Expect::Refused(at(1, 1), "at most 1048576 bytes")),
        ("bad byte first", with_bad_byte(""), Expect::Refused(at(1, 1), "byte 0xFF here is not valid UTF-8")),
        ("bad byte in line 3", with_bad_byte("pipelines:\n  test:\n    st"), Expect::Refused(at(3, 7), "not UTF-8")),
        ("columns count characters", with_bad_byte("x-é: ü"), Expect::Refused(at(1, 7), "not UTF-8")),
        ("CRLF counts once", with_bad_byte("a: 1\r\nb: 2\r\n  "), Expect::Refused(at(3, 3), "not UTF-8")),
        ("lone CR is a line break", with_bad_byte("a: 1\rb"), Expect::Refused(at(2, 2), "not UTF-8")),
        ("truncated sequence at the end", truncated_utf8, Expect::Refused(at(2, 6), "byte 0xC3")),
    ];
    for (name, bytes, expect) in &cases {
        check(name, bytes, expect);
    }
}

#[test]
fn hostile_shapes_are_answered_quickly() {
    for (shape, text) in hostile::all() {
        let name = shape.name;
        assert!(text.len() <= MAX_SPEC_BYTES && text.len() > MAX_SPEC_BYTES - 1024, "{name}: {} bytes", text.len());
        // Where a refused shape is refused is each shape's own business; that it is, and fast,
        // is what matters here.
        let started = Instant::now();
        let outcome = spec::parse_bytes(text.as_bytes());
        let took = started.elapsed();
        assert!(took < TIME_LIMIT, "{name}: took {took:?}");
        assert_eq!(
            outcome.is_err(),
            shape.refused,
            "{name}: {:?}",
            outcome.err().map(|d| d.into_iter().take(3).collect::<Vec<_>>())
        );
        let started = Instant::now();
        let json = spec::to_json(&text);
        let took = started.elapsed();
        assert!(took < TIME_LIMIT, "{name} as JSON: took {took:?}");
        // Only what the parser itself refuses is refused as JSON; the shapes refused later (by
        // the deserializer) still give JSON.
        if !shape.refused {
            assert!(json.is_ok(), "{name}: {json:?}");
        }
    }
}

#[test]
fn text_over_the_limit_is_refused_by_every_entry_point() {
    let text = String::from_utf8(padded(MAX_SPEC_BYTES + 1)).expect("ASCII");
    for diags in [spec::parse(&text).err(), spec::parse_raw(&text).err(), spec::to_json(&text).err().map(|d| vec![d])] {
        let diags = diags.expect("refused");
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert!(diags[0].message.contains("1 MiB"), "{diags:?}");
    }
}

#[test]
fn too_many_problems_stop_at_the_cap_with_a_last_word() {
    // Duplicate keys are found as they are read, so reading stops at the cap, where it stopped.
    let dups = format!("{VALID}{}", "x-k: 1\n".repeat(5_000));
    let diags = spec::parse(&dups).expect_err("duplicates");
    assert_eq!(diags.len(), spec::MAX_DIAGNOSTICS, "{:?}", diags.last());
    let last = diags.last().expect("diagnostics");
    assert!(last.message.contains("stopped reading here"), "{last:?}");
    // The first duplicate is on line 5 (line 4 is the first `x-k`); reading stops at the 999th
    // duplicate, on line 1003, keeping the last place for the diagnostic that says so.
    assert_eq!(diags[0].pos, at(5, 1), "{:?}", diags[0]);
    assert_eq!(last.pos.line, 1003, "{last:?}");

    // Unknown keys past the cap are counted, exactly, in one last diagnostic.
    let unknown = format!("{VALID}{}", (0..1_500).map(|i| format!("pipelinez{i}: 1\n")).collect::<String>());
    let diags = spec::parse(&unknown).expect_err("unknown keys");
    assert_eq!(diags.len(), spec::MAX_DIAGNOSTICS, "{:?}", diags.last());
    let last = diags.last().expect("diagnostics");
    assert!(last.message.contains("and 501 more unknown keys"), "{last:?}");
    assert_eq!(last.pos, at(4 + 999, 1), "{last:?}");
}

#[test]
fn duplicate_keys_of_a_nested_mapping_do_not_hide_the_outer_ones() {
    let text = "x-a:\n  b: 1\n  c: { b: 2, d: { b: 3 } }\n  b: 4\n";
    let diags = spec::parse(text).expect_err("duplicate");
    let dups: Vec<_> = diags.iter().filter(|d| d.message.contains("duplicate key 'b'")).collect();
    assert_eq!(dups.len(), 1, "{diags:?}");
    assert_eq!(dups[0].pos, at(4, 3), "{diags:?}");
    assert!(dups[0].message.contains("first defined at line 2"), "{diags:?}");
}
