//! Property tests: the spec reader never panics, whatever bytes or YAML it is given.

use proptest::prelude::*;

/// Fragments of spec-like YAML, so that random documents reach deep into the reader.
fn fragment() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "version",
        "pipelines",
        "test",
        "staging",
        "on",
        "push",
        "branches",
        "steps",
        "name",
        "image",
        "commands",
        "depends_on",
        "gate",
        "kind",
        "approvals",
        "from",
        "users",
        "timeout",
        "retry",
        "count",
        "limits",
        "memory",
        "services",
        "ready",
        "resources",
        "pool",
        "deliverables",
        "docker",
        "pypi",
        "promotion",
        "requires",
        "x-a",
        "<<",
        "when",
        "status",
        "schedule",
        "cron",
        "upstream",
        "downstream",
        "network",
    ]);
    let values = prop::sample::select(vec![
        "1",
        "-1",
        "0.5",
        "true",
        "yes",
        "~",
        "\"\"",
        "busybox",
        "[a, b]",
        "{}",
        "[]",
        "10m",
        "1h30m",
        "0s",
        "2g",
        "*a",
        "&a x",
        "\"0 3 * * *\"",
        "\"[\"",
        "approval",
        "hold",
        "none",
        "!tag x",
        "|\n  line",
        "{ a: 1, a: 2 }",
    ]);
    (0usize..6, keys, values, any::<bool>())
        .prop_map(|(indent, k, v, dash)| format!("{}{}{k}: {v}", "  ".repeat(indent), if dash { "- " } else { "" }))
}

/// Cases per property: 2,000 in the test suite; `CIB_FUZZ_CASES=500000` for a long run.
fn config() -> ProptestConfig {
    let cases = std::env::var("CIB_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = cib_core::spec::parse(&text);
    }

    #[test]
    fn random_spec_like_yaml_never_panics(lines in prop::collection::vec(fragment(), 0..40)) {
        let text = lines.join("\n");
        match cib_core::spec::parse(&text) {
            Ok(spec) => prop_assert!(!spec.pipelines.is_empty()),
            Err(diags) => {
                prop_assert!(!diags.is_empty());
                for d in diags {
                    prop_assert!(d.pos.line >= 1 && d.pos.col >= 1, "{d:?}");
                }
            }
        }
    }
}
