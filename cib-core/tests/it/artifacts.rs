//! `artifacts` and `needs_artifacts` in the spec: what the model holds, and every mistake
//! reported at its line and column.

use cib_core::spec;

fn errors(text: &str) -> Vec<String> {
    spec::parse(text).expect_err("invalid").iter().map(|d| d.line(".cib.yml")).collect()
}

const GOOD: &str = r#"pipelines:
  test:
    steps:
      - name: package
        image: python:3.11-slim
        commands: [python -m build]
        artifacts: { paths: ["dist/*.whl", report.xml], expire: 7d }
  staging:
    steps:
      - name: deploy
        image: busybox
        needs_artifacts: [{ pipeline: test, step: package }]
        commands: [ls dist]
"#;

#[test]
fn a_step_keeps_artifacts_and_another_pipeline_needs_them() {
    let spec = spec::parse(GOOD).expect("valid");
    let package = spec.pipeline("test").and_then(|p| p.step("package")).expect("package");
    let kept = package.artifacts.as_ref().expect("artifacts");
    assert_eq!(kept.paths.iter().map(|g| g.as_str()).collect::<Vec<_>>(), ["dist/*.whl", "report.xml"]);
    assert_eq!(kept.expire.as_secs(), 7 * 24 * 3600);
    assert!(kept.paths[0].is_match("dist/app-1.0-py3-none-any.whl"));
    assert!(!kept.paths[0].is_match("dist/sub/app.whl"), "* stays within a directory");
    let deploy = spec.pipeline("staging").and_then(|p| p.step("deploy")).expect("deploy");
    assert_eq!(deploy.needs_artifacts, [spec::NeedArtifacts { pipeline: "test".into(), step: "package".into() }]);
    // Without `expire`, artifacts are kept 30 days.
    let default = spec::parse(&GOOD.replace(", expire: 7d", "")).expect("valid");
    let kept = default.pipeline("test").and_then(|p| p.step("package")).and_then(|s| s.artifacts.clone());
    assert_eq!(kept.expect("artifacts").expire, spec::DEFAULT_ARTIFACT_EXPIRY);
}

#[test]
fn artifact_mistakes_are_reported_with_line_and_column() {
    let text = r#"pipelines:
  test:
    steps:
      - name: package
        image: busybox
        commands: [make]
        artifacts:
          paths: ["/etc/passwd", "../up", "[oops"]
          expire: 0s
      - name: empty
        image: busybox
        commands: [make]
        artifacts: { paths: [] }
      - name: gate
        gate: { kind: approval }
        artifacts: { paths: [x] }
      - name: typo
        image: busybox
        commands: [make]
        artifacts: { path: [x] }
  staging:
    steps:
      - name: deploy
        image: busybox
        commands: [ls]
        needs_artifacts:
          - { pipeline: staging, step: deploy }
          - { pipeline: test, step: package, extra: 1 }
"#;
    insta::assert_snapshot!(errors(text).join("\n"), @r"
    .cib.yml:8:19: error: '/etc/passwd' leaves the workspace: artifact paths are relative to it
    .cib.yml:8:34: error: '../up' leaves the workspace: artifact paths are relative to it
    .cib.yml:8:43: error: invalid glob '[oops': unclosed character class; missing ']'
    .cib.yml:9:19: error: 'expire' must be longer than 0s
    .cib.yml:13:29: error: 'paths' names no file: list globs relative to the workspace, such as dist/**
    .cib.yml:16:9: error: a gate step runs no container, so it makes no artifacts: remove 'artifacts'
    .cib.yml:20:20: error: missing key 'paths'
    .cib.yml:20:22: error: unknown key 'path' (did you mean 'paths'?)
    .cib.yml:27:25: error: 'staging' is this step's own pipeline: its steps share the workspace, so use depends_on
    .cib.yml:28:46: error: unknown key 'extra'
    ");
}

#[test]
fn needs_artifacts_names_a_pipeline_and_a_step_of_it() {
    let text = GOOD.replace(
        "        needs_artifacts: [{ pipeline: test, step: package }]\n",
        "        needs_artifacts:\n          - { pipeline: tset, step: package }\n          - { pipeline: test, step: pakage }\n",
    );
    assert_eq!(
        errors(&text),
        [
            ".cib.yml:13:25: error: unknown pipeline 'tset' (did you mean 'test'?)",
            ".cib.yml:14:37: error: pipeline 'test' has no step 'pakage' (did you mean 'package'?)",
        ]
    );
}

#[test]
fn needing_a_step_that_keeps_nothing_is_an_error_at_the_step() {
    let text = GOOD.replace("        artifacts: { paths: [\"dist/*.whl\", report.xml], expire: 7d }\n", "");
    assert_eq!(
        errors(&text),
        [".cib.yml:11:51: error: step 'package' of pipeline 'test' keeps no artifacts: give it 'artifacts'"]
    );
}

// ---- caches ----------------------------------------------------------------------------------

#[test]
fn a_cache_key_is_text_and_checksums_of_workspace_files() {
    use spec::CacheKeyPart::{Checksum, Text};
    let text = r#"pipelines:
  test:
    steps:
      - name: unit
        image: python:3.11-slim
        commands: [pip install -r requirements.txt]
        cache:
          - key: "pip-{{ checksum 'requirements.txt' }}-{{checksum \"constraints.txt\"}}"
            paths: [.cache/pip/]
            restore_keys: [pip-]
"#;
    let spec = spec::parse(text).expect("valid");
    let unit = spec.pipeline("test").and_then(|p| p.step("unit")).expect("unit");
    assert_eq!(
        unit.cache,
        [spec::Cache {
            key: vec![
                Text("pip-".into()),
                Checksum("requirements.txt".into()),
                Text("-".into()),
                Checksum("constraints.txt".into())
            ],
            paths: vec![".cache/pip".into()],
            restore_keys: vec!["pip-".into()],
        }]
    );
}

#[test]
fn cache_mistakes_are_reported_with_line_and_column() {
    let text = r#"pipelines:
  test:
    steps:
      - name: unit
        image: busybox
        commands: [make]
        cache:
          - { key: "a-{{ sha 'x' }}", paths: [x] }
          - { key: "b-{{ checksum '../etc/passwd' }}", paths: [/root, ../up] }
          - { key: "c-{{ checksum 'x'", paths: [] }
          - { key: k, paths: [x], restore: [k-] }
      - name: gate
        gate: { kind: approval }
        cache: [{ key: k, paths: [x] }]
"#;
    insta::assert_snapshot!(errors(text).join("\n"), @r"
    .cib.yml:8:20: error: '{{ sha 'x' }}' is not a key function: write {{ checksum 'path' }}
    .cib.yml:9:20: error: checksum '../etc/passwd' must name a file inside the workspace
    .cib.yml:9:64: error: '/root' leaves the workspace: cache paths are relative to it
    .cib.yml:9:71: error: '../up' leaves the workspace: cache paths are relative to it
    .cib.yml:10:20: error: a '{{' in the key is never closed with '}}'
    .cib.yml:10:48: error: 'paths' names nothing to cache: list directories of the workspace, such as .cache/pip
    .cib.yml:11:35: error: unknown key 'restore' (did you mean 'restore_keys'?)
    .cib.yml:14:17: error: a gate step runs no container, so it fills no cache: remove 'cache'
    ");
}

#[test]
fn forks_and_untrusted_builds_write_their_own_cache_namespace() {
    use cib_core::policy::cache_namespaces;
    let mut context = crate::machine::context("master");
    assert_eq!(cache_namespaces(&context), ("trusted".to_owned(), vec!["trusted".to_owned()]));
    context.pull_request = Some(7);
    assert_eq!(cache_namespaces(&context), ("pr-7".to_owned(), vec!["pr-7".to_owned(), "trusted".to_owned()]));
    context.trusted = false;
    assert_eq!(
        cache_namespaces(&context),
        ("fork-pr-7".to_owned(), vec!["fork-pr-7".to_owned(), "trusted".to_owned()])
    );
    context.pull_request = None;
    let (write, reads) = cache_namespaces(&context);
    assert!(write.starts_with("untrusted-") && reads == [write.clone(), "trusted".to_owned()], "{write} {reads:?}");
}
