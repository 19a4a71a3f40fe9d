//! The JSON Schema: the committed copy is current, the examples pass it, and whatever it
//! rejects the reader rejects too, checked with a real JSON Schema validator.

use std::path::{Path, PathBuf};

use super::spec::{CASES, unindent};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft7::new(&cib_core::spec::schema()).expect("the generated schema is a valid draft-07 schema")
}

fn example_specs() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root().join("examples")).expect("examples/") {
        let path = entry.expect("entry").path().join(".cib.yml");
        if path.exists() {
            found.push(path);
        }
    }
    found.sort();
    found
}

#[test]
fn committed_schema_is_current() {
    let committed = std::fs::read_to_string(root().join("docs/cib.schema.json")).expect("docs/cib.schema.json");
    let generated = serde_json::to_string_pretty(&cib_core::spec::schema()).expect("json") + "\n";
    assert!(
        committed == generated,
        "docs/cib.schema.json is stale: run `cargo run -p cib-server -- schema > docs/cib.schema.json`"
    );
}

/// Every complete spec shown in the spec reference (a YAML block with a top-level `pipelines:`)
/// is read without a diagnostic, so that what the documentation teaches works.
#[test]
fn every_complete_spec_in_the_reference_parses() {
    let text = std::fs::read_to_string(root().join("docs/spec.md")).expect("docs/spec.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    let complete: Vec<&String> = blocks.iter().filter(|b| b.lines().any(|l| l.starts_with("pipelines:"))).collect();
    assert!(complete.len() >= 5, "expected the complete examples and the inputs example, found {}", complete.len());
    for block in complete {
        if let Err(diags) = cib_core::spec::parse(block) {
            let rendered: Vec<String> = diags.iter().map(|d| d.render("docs/spec.md", block)).collect();
            panic!("a spec in docs/spec.md does not parse:\n{}\n{block}", rendered.join("\n"));
        }
    }
}

#[test]
fn every_example_passes_the_schema_and_the_reader() {
    let validator = validator();
    let examples = example_specs();
    assert!(examples.len() >= 4, "expected the example projects, found {examples:?}");
    for path in examples {
        let text = std::fs::read_to_string(&path).expect("read example");
        let json = cib_core::spec::to_json(&text).expect("example is YAML");
        let errors: Vec<String> =
            validator.iter_errors(&json).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        assert!(errors.is_empty(), "{}: schema errors: {errors:#?}", path.display());
        if let Err(diags) = cib_core::spec::parse(&text) {
            panic!("{}: reader errors: {diags:#?}", path.display());
        }
        assert!(
            text.starts_with("# yaml-language-server: $schema="),
            "{} should name the schema for editors",
            path.display()
        );
    }
}

#[test]
fn whatever_the_schema_rejects_the_reader_rejects() {
    let validator = validator();
    let mut rejected_by_schema = 0;
    let mut accepted_by_both = 0;
    for (name, input) in CASES {
        let text = unindent(input);
        let Ok(json) = cib_core::spec::to_json(&text) else {
            // Not YAML at all: only the reader can say so, and it must.
            assert!(cib_core::spec::parse(&text).is_err(), "{name}: invalid YAML accepted");
            continue;
        };
        let schema_ok = validator.is_valid(&json);
        let reader_ok = cib_core::spec::parse(&text).is_ok();
        if !schema_ok {
            rejected_by_schema += 1;
            assert!(
                !reader_ok,
                "{name}: the schema rejects it but the reader accepts it: {:?}",
                validator.iter_errors(&json).map(|e| format!("{e} at {}", e.instance_path())).collect::<Vec<_>>()
            );
        }
        if reader_ok {
            accepted_by_both += 1;
            assert!(
                schema_ok,
                "{name}: the reader accepts it but the schema rejects it: {:?}",
                validator.iter_errors(&json).map(|e| e.to_string()).collect::<Vec<_>>()
            );
        }
    }
    assert!(
        rejected_by_schema >= 15,
        "the corpus should hold many specs the schema rejects, found {rejected_by_schema}"
    );
    assert!(accepted_by_both >= 15, "the corpus should hold many valid specs, found {accepted_by_both}");
}

#[test]
fn schema_rejects_what_editors_should_flag() {
    let validator = validator();
    for bad in [
        r#"{"pipelines": {"test": {"steps": [{"name": "a", "image": "b", "comands": ["x"]}]}}}"#,
        r#"{"pipelines": {"test": {"steps": [{"name": "a", "network": "host"}]}}}"#,
        r#"{"pipelines": {"test": {"steps": [{"name": "a", "timeout": "10x"}]}}}"#,
        r#"{"pipelines": {"test": {"steps": "a"}}}"#,
        r#"{"version": 1}"#,
    ] {
        let json: serde_json::Value = serde_json::from_str(bad).expect("json");
        assert!(!validator.is_valid(&json), "schema accepted {bad}");
    }
}
