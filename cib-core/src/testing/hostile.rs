//! Hostile specs: texts just under [`spec::MAX_SPEC_BYTES`] shaped to make a YAML reader do as
//! much work as possible. The spec tests check that each is answered quickly, and the spec
//! bench prints how long each takes next to the bare YAML parser.

use crate::spec;

/// One hostile shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    /// Builds the text, at most `limit` bytes long.
    pub build: fn(limit: usize) -> String,
    /// Whether cib must refuse it (`true`) or accept it (`false`).
    pub refused: bool,
}

/// Every shape, each built up to 1 MiB by [`Shape::build`] with [`spec::MAX_SPEC_BYTES`].
pub const SHAPES: &[Shape] = &[
    Shape { name: "merge-key chain", build: merge_key_chain, refused: true },
    Shape { name: "alias bomb", build: alias_bomb, refused: true },
    Shape { name: "deep nesting", build: deep_nesting, refused: true },
    Shape { name: "many keys", build: many_keys, refused: true },
    Shape { name: "many duplicate keys", build: duplicate_keys, refused: true },
    Shape { name: "long scalars", build: long_scalars, refused: true },
    Shape { name: "long aliased keys", build: long_aliased_keys, refused: true },
    Shape { name: "many anchors", build: many_anchors, refused: true },
    Shape { name: "many merge sources", build: many_merge_sources, refused: true },
];

/// A valid spec that the hostile parts are added to, so that the shapes that are accepted
/// reach the deserializer and validator too.
const VALID: &str = "pipelines:\n  test:\n    steps: [{ name: unit, image: busybox, commands: [echo hi] }]\n";

/// Appends `line(i)` for i = 0, 1, ... while the text stays within `limit` bytes.
fn fill(mut text: String, limit: usize, mut line: impl FnMut(usize) -> String) -> String {
    for i in 0.. {
        let next = line(i);
        if text.len() + next.len() > limit {
            break;
        }
        text.push_str(&next);
    }
    text
}

/// `a0: &a0 {k0: 1}`, `a1: &a1 {<<: *a0, k1: 1}`, ...: each mapping merges all of the one
/// before, so copying merged entries costs the square of the chain's length.
pub fn merge_key_chain(limit: usize) -> String {
    fill(String::new(), limit, |i| match i {
        0 => "x-a0: &a0 {k0: 1}\n".to_owned(),
        i => format!("x-a{i}: &a{i} {{<<: *a{}, k{i}: 1}}\n", i - 1),
    })
}

/// Each list holds the one before ten times: the classic "billion laughs".
pub fn alias_bomb(limit: usize) -> String {
    fill(String::new(), limit, |i| match i {
        0 => "x-l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n".to_owned(),
        i => {
            let p = i - 1;
            format!("x-l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n")
        }
    })
}

/// Half a mebibyte of `[`, closed by as many `]`.
pub fn deep_nesting(limit: usize) -> String {
    let half = limit.saturating_sub(VALID.len() + 10) / 2;
    format!("{VALID}x-deep: {}{}\n", "[".repeat(half), "]".repeat(half))
}

/// A hundred thousand keys that cib does not know, each one asking for a did-you-mean.
pub fn many_keys(limit: usize) -> String {
    fill(VALID.to_owned(), limit, |i| format!("pipelinez{i}: 1\n"))
}

/// The same key again and again, each time a diagnostic.
pub fn duplicate_keys(limit: usize) -> String {
    fill(VALID.to_owned(), limit, |_| "x-k: 1\n".to_owned())
}

/// A long string, then as many aliases to it as fit: sixteen times the text once expanded.
pub fn long_scalars(limit: usize) -> String {
    let text = format!("{VALID}x-long: &long \"{}\"\nx-uses: [\n", "x".repeat(limit / 2));
    let mut text = fill(text, limit.saturating_sub(2), |_| "  *long,\n".to_owned());
    text.push_str("]\n");
    text
}

/// A long key, used through aliases as the key of many mappings: checking keys must not hash
/// or copy its text at every use.
pub fn long_aliased_keys(limit: usize) -> String {
    let text = format!("{VALID}x-key: &k \"{}\"\n", "k".repeat(limit / 2));
    fill(text, limit, |i| format!("x-m{i}: {{*k : 1}}\n"))
}

/// Tens of thousands of anchors, each used once: refused at the first over the limit.
pub fn many_anchors(limit: usize) -> String {
    let text = format!("{VALID}x-anchors: [\n");
    let mut text = fill(text, limit.saturating_sub(64), |i| format!("  &a{i} x, *a{i},\n"));
    text.push_str("]\n");
    text
}

/// One list of many empty mappings, merged again and again: merging must cost something per
/// source even when the sources are empty.
pub fn many_merge_sources(limit: usize) -> String {
    let text = fill("x-e: &e {}\nx-s: &s [\n".to_owned(), limit / 2, |_| "  *e,\n".to_owned()) + "]\n";
    fill(text, limit, |i| format!("x-m{i}: {{<<: *s}}\n"))
}

/// Every shape built to [`spec::MAX_SPEC_BYTES`].
pub fn all() -> Vec<(Shape, String)> {
    SHAPES.iter().map(|s| (*s, (s.build)(spec::MAX_SPEC_BYTES))).collect()
}
