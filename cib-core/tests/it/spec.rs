//! Data-driven spec tests: each case is a spec's text, and its expectation is an insta snapshot
//! of either the checked model or the rendered diagnostics.

use cib_core::spec::{self, EventKind, TriggerEvent};

/// Parses `input` and snapshots the outcome under `name`: the model as YAML when the spec is
/// valid, every diagnostic rendered like a compiler's when it is not.
fn check(name: &str, input: &str) {
    let input = unindent(input);
    insta::with_settings!({ description => input.as_str(), omit_expression => true, prepend_module_to_snapshot => false }, {
        match spec::parse(&input) {
            Ok(model) => insta::assert_yaml_snapshot!(name, model),
            Err(diags) => {
                let rendered: Vec<String> = diags.iter().map(|d| d.render(".cib.yml", &input)).collect();
                insta::assert_snapshot!(name, rendered.join("\n"));
            }
        }
    });
}

/// Strips the common indentation so that cases can be indented with the code.
pub fn unindent(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent =
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    text.lines().map(|l| if l.len() >= indent { &l[indent..] } else { l.trim_start() }).collect::<Vec<_>>().join("\n")
        + "\n"
}

/// Each case becomes a test of its own, and all of them together are the corpus the schema
/// test checks the JSON Schema against.
macro_rules! cases {
    ($($name:ident = $input:expr;)*) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name), $input);
            }
        )*
        pub const CASES: &[(&str, &str)] = &[$((stringify!($name), $input)),*];
    };
}

cases! {
    // ---- valid specs: the model they give -------------------------------------------------
    default_layout = r#"
        pipelines:
          test:
            steps: [{ name: unit, image: busybox, commands: [echo hi] }]
          staging:
            steps: [{ name: deploy, image: busybox, commands: [./deploy.sh] }]
          production:
            steps: [{ name: deploy, image: busybox, commands: [./deploy.sh] }]
    "#;
    every_trigger = r#"
        version: 1
        pipelines:
          ci:
            on:
              push: { branches: ["feature/**", "fix-*"], branches_ignore: ["feature/wip-*"], tags: ["v*"], paths: ["src/**"], paths_ignore: ["**/*.md"] }
              pull_request: { branches: [master], paths: ["src/**"] }
              promotion: { branches: [production] }
              manual: {}
              schedule:
                - cron: "0 3 * * 1-5"
                - { cron: "@daily", branch: develop }
            steps: [{ name: unit, image: busybox, commands: [true] }]
    "#;
    manual_inputs = r#"
        pipelines:
          deploy:
            on: { manual: { branches: [master] } }
            inputs:
              version: { type: string, required: true, description: The version to deploy. }
              dry_run: { type: bool, default: false }
              region: { type: choice, options: [eu, us], default: eu }
            steps: [{ name: go, image: busybox, commands: [./deploy.sh] }]
    "#;
    invalid_inputs = r#"
        pipelines:
          deploy:
            on: { manual: {} }
            env: { INPUT_REGION: eu }
            inputs:
              region: { type: choice }
              REGION: { type: string }
              dry-run: { type: bool, default: maybe }
              size: { type: string, options: [s, m] }
              level: { type: choice, options: [a, a], default: b }
              version: { type: string, required: true, default: "1" }
            steps: [{ name: go, image: busybox, commands: [x], env: { INPUT_VERSION: "2" } }]
          nightly:
            on: { push: {} }
            inputs:
              x: { type: string }
            steps: [{ name: go, image: busybox, commands: [x] }]
    "#;
    gate_self_approval = r#"
        pipelines:
          staging:
            steps:
              - { name: deploy, image: busybox, commands: [x] }
              - { name: ok, depends_on: [deploy], gate: { kind: approval, self_approval: true } }
    "#;
    trigger_without_value_means_every_branch = r#"
        pipelines:
          ci:
            on:
              push:
              manual:
            steps: [{ name: unit, image: busybox, commands: [true] }]
    "#;
    tags_only_push_does_not_fire_on_branches = r#"
        pipelines:
          release:
            on: { push: { tags: ["v*"] } }
            steps: [{ name: build, image: busybox, commands: [true] }]
    "#;
    durations = r#"
        pipelines:
          test:
            timeout: 1h30m
            steps:
              - { name: a, image: busybox, commands: [true], timeout: 90s, no_output_timeout: 10m }
              - name: b
                gate: { kind: approval, timeout: 2d }
    "#;
    anchors_and_merge_keys = r#"
        x-defaults: &defaults
          image: python:3.12-slim
          timeout: 15m
          limits: { memory: 2g, cpus: 2, pids: 512 }
        x-env: &env { LANG: C.UTF-8 }
        pipelines:
          test:
            steps:
              - name: lint
                <<: *defaults
                commands: [ruff check .]
              - name: unit
                <<: *defaults
                timeout: 20m
                env: *env
                commands: [pytest]
    "#;
    merge_key_list_first_wins = r#"
        x-a: &a { image: first, timeout: 1m }
        x-b: &b { image: second, no_output_timeout: 2m }
        pipelines:
          test:
            steps:
              - name: s
                <<: [*a, *b]
                commands: [true]
    "#;
    x_keys_are_ignored_everywhere = r#"
        x-note: top level
        pipelines:
          test:
            x-owner: platform-team
            steps:
              - name: a
                x-comment: ignored
                image: busybox
                commands: [true]
    "#;
    services_and_readiness = r#"
        pipelines:
          test:
            services:
              db:
                image: postgres:16
                env: { POSTGRES_PASSWORD: test }
                ready: pg_isready -h localhost
              cache:
                image: redis:7
                command: [redis-server, --save, ""]
                ready: { command: redis-cli ping, interval: 2s, timeout: 1m }
              queue:
                image: rabbitmq:3
            steps:
              - { name: all, image: busybox, commands: [true] }
              - { name: only-db, image: busybox, commands: [true], services: [db] }
    "#;
    resources_for_pipeline_and_step = r#"
        pipelines:
          staging:
            resources: [{ pool: staging-env }]
            steps:
              - name: phone-tests
                image: busybox
                commands: [true]
                resources: [{ pool: android-phones, count: 2 }, { pool: licences, count: 1 }]
    "#;
    gates_approval_and_hold = r#"
        pipelines:
          staging:
            steps:
              - { name: deploy, image: busybox, commands: [true] }
              - name: sign-off
                depends_on: [deploy]
                gate:
                  kind: approval
                  approvals: 2
                  from: { users: [alice, bob, carol] }
                  instructions: Read the release notes.
                  timeout: 1d
              - name: manual-qa
                depends_on: [deploy]
                gate: { kind: hold, from: { teams: [qa] }, instructions: Try checkout by hand. }
    "#;
    deliverables_with_defaults = r#"
        pipelines:
          production:
            steps: [{ name: build, image: busybox, commands: [true] }]
            deliverables:
              - pypi: { index: "https://index.example/legacy/", credentials: PYPI_TOKEN }
              - docker: { image: registry.example.com/team/app }
              - docker: { image: registry.example.com/team/app, context: api, dockerfile: api.Dockerfile, tags: ["{{commit}}", latest], credentials: REGISTRY_AUTH }
    "#;
    promotion_and_merge_policies = r#"
        pipelines:
          test:
            steps: [{ name: unit, image: busybox, commands: [true] }]
          staging:
            steps: [{ name: deploy, image: busybox, commands: [true] }]
        promotion:
          from: master
          to: production
          requires:
            pipelines: [staging]
            approvals: { count: 2, from: { teams: [stakeholders] }, self_approval: false, expires: 3d }
        merge:
          into: master
          fast_forward_only: true
          requires: { pipelines: [test], reviews: 1, up_to_date: true }
    "#;
    policies_with_defaults = r#"
        pipelines:
          staging:
            steps: [{ name: deploy, image: busybox, commands: [true] }]
        promotion: {}
        merge: {}
    "#;
    retry_policies = r#"
        pipelines:
          test:
            steps:
              - { name: default-on, image: busybox, commands: [true], retry: { count: 2 } }
              - { name: explicit, image: busybox, commands: [true], retry: { count: 1, on: [timeout, infrastructure, timeout] } }
              - { name: codes, image: busybox, commands: [true], retry: { count: 3, exit_codes: [75, 137] } }
    "#;
    limits_network_workdir_allow_failure = r#"
        pipelines:
          test:
            steps:
              - name: sandboxed
                image: busybox
                commands: [true]
                network: none
                workdir: sub/dir
                allow_failure: true
                limits: { memory: 512m, cpus: 0.5, pids: 64 }
    "#;
    when_conditions = r#"
        pipelines:
          test:
            steps:
              - { name: unit, image: busybox, commands: [true] }
              - name: docs
                image: busybox
                commands: [true]
                when: { branches: ["docs/**"], paths: ["docs/**"], events: [push, manual] }
              - name: report
                image: busybox
                commands: [true]
                depends_on: [unit]
                when: { status: always }
    "#;
    commands_as_one_string = r#"
        pipelines:
          test:
            steps:
              - name: script
                image: busybox
                commands: |
                  echo one
                  echo two
              - { name: single, image: busybox, commands: echo three }
    "#;
    env_values_are_text = r#"
        pipelines:
          test:
            env: { PORT: 8080, DEBUG: true, RATIO: 0.5, NAME: shop }
            steps:
              - { name: a, image: busybox, commands: [true], env: { PORT: 9090, EMPTY: "" }, secrets: [API_TOKEN] }
    "#;
    kind_defaults_and_override = r#"
        pipelines:
          staging:
            steps: [{ name: a, image: busybox, commands: [true] }]
          docs:
            on: { push: { branches: [master] } }
            kind: deploy
            steps: [{ name: a, image: busybox, commands: [true] }]
    "#;
    matrix_cells = r#"
        pipelines:
          test:
            steps:
              - name: unit
                image: "python:{{ matrix.python }}-slim"
                matrix:
                  python: ["3.11", "3.12"]
                  db: [sqlite, postgres]
                  exclude: [{ python: "3.11", db: postgres }]
                  include: [{ python: "3.13", db: sqlite }]
                fail_fast: true
                commands: [pytest]
              - { name: package, image: busybox, depends_on: [unit], commands: [make dist] }
    "#;
    matrix_mistakes = r#"
        pipelines:
          test:
            steps:
              - name: unit
                image: busybox
                matrix:
                  python: []
                  exclude: [{ pyton: "3.11" }]
                commands: [pytest]
              - { name: lone, image: busybox, fail_fast: true, commands: [true] }
    "#;
    yaml_1_1_words_are_strings = r#"
        pipelines:
          test:
            env: { ENABLED: yes, COUNTRY: NO, MODE: on }
            steps: [{ name: a, image: busybox, commands: [true] }]
    "#;

    // ---- YAML-level problems -------------------------------------------------------------
    yaml_syntax_error = r#"
        pipelines:
          test:
            steps: [{ name: a, image: busybox
    "#;
    tab_indentation = "pipelines:\n\ttest: {}\n";
    empty_file = "\n";
    root_is_a_list = r#"
        - name: a
        - name: b
    "#;
    duplicate_keys = r#"
        pipelines:
          test:
            steps: [{ name: a, image: busybox, commands: [true] }]
          test:
            steps: [{ name: b, image: busybox, commands: [true] }]
    "#;
    two_documents = r#"
        pipelines: {}
        ---
        pipelines: {}
    "#;
    unsupported_tag = r#"
        pipelines:
          test:
            steps: [{ name: a, image: !reference [.base, image], commands: [true] }]
    "#;
    alias_bomb_is_refused = r#"
        a: &a [x, x, x, x, x, x, x, x, x, x]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
        c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
        d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
        e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
        f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
        pipelines: *f
    "#;

    // ---- shape problems: keys, types, missing fields ---------------------------------------
    unknown_step_key_did_you_mean = r#"
        pipelines:
          test:
            steps:
              - name: a
                image: busybox
                comands: [true]
    "#;
    unknown_keys_at_every_level = r#"
        pipelne: {}
        pipelines:
          test:
            trigger: {}
            steps:
              - { name: a, image: busybox, commands: [true], retry: { count: 1, when: [x] } }
    "#;
    wrong_types = r#"
        pipelines:
          test:
            steps:
              - name: a
                image: [busybox]
                commands: [true]
                depends_on: b
                allow_failure: "sometimes"
                retry: { count: many }
    "#;
    missing_keys = r#"
        pipelines:
          test:
            steps:
              - image: busybox
                commands: [true]
          other:
            on: { push: {} }
        promotion:
          requires: { approvals: { from: { users: [a] } } }
    "#;
    missing_pipelines = r#"
        version: 1
    "#;
    unknown_enum_values = r#"
        pipelines:
          test:
            kind: build
            steps:
              - { name: a, image: busybox, commands: [true], network: host }
              - { name: b, gate: { kind: aproval } }
              - { name: c, image: busybox, commands: [true], when: { events: [pull-request], status: sometimes } }
    "#;
    deliverable_shapes = r#"
        pipelines:
          production:
            steps: [{ name: a, image: busybox, commands: [true] }]
            deliverables:
              - npm: { package: x }
              - { pypi: { index: "https://x", credentials: T }, docker: { image: y } }
              - docker
    "#;
    yes_is_not_a_boolean = r#"
        pipelines:
          test:
            steps: [{ name: a, image: busybox, commands: [true], allow_failure: yes }]
    "#;
    negative_and_fractional_counts = r#"
        pipelines:
          test:
            resources: [{ pool: p, count: -1 }, { pool: q, count: 1.5 }]
            steps: [{ name: a, image: busybox, commands: [true] }]
    "#;

    // ---- values with their own syntax ------------------------------------------------------
    invalid_durations = r#"
        pipelines:
          test:
            timeout: 90
            steps:
              - { name: a, image: busybox, commands: [true], timeout: 10x, no_output_timeout: 30m1h }
              - { name: b, image: busybox, commands: [true], timeout: 0s }
    "#;
    invalid_globs = r#"
        pipelines:
          test:
            on:
              push: { branches: ["feature/[", "ok/*"], paths: ["src/{a,b"] }
              pull_request: { branches: [""] }
            steps: [{ name: a, image: busybox, commands: [true] }]
    "#;
    invalid_cron = r#"
        pipelines:
          nightly:
            on:
              schedule:
                - cron: "61 * * * *"
                - cron: "0 3 * *"
                - cron: "0 0 3 * * *"
            steps: [{ name: a, image: busybox, commands: [true] }]
    "#;
    invalid_upstream = r#"
        pipelines:
          client:
            on: { upstream: { repo: "acme", branch: "" } }
            steps: [{ name: a, image: busybox, commands: [true] }]
          other:
            on: { upstream: { repo: "acme/api/x" } }
            steps: [{ name: a, image: busybox, commands: [true] }]
        promotion:
          requires: { downstream: ["acme/client", "acme/client", "not a repo"] }
    "#;
    runs_on_os_and_labels = r#"
        pipelines:
          test:
            steps:
              - { name: mac, image: busybox, commands: [true], runs_on: { os: macos } }
              - name: gpu
                image: busybox
                commands: [true]
                runs_on: { os: linux, labels: { gpu: "yes", zone: eu-west.1 } }
    "#;
    invalid_runs_on = r#"
        pipelines:
          test:
            steps:
              - { name: a, image: busybox, commands: [true], runs_on: {} }
              - { name: b, image: busybox, commands: [true], runs_on: { os: MacOS, labels: { "gpu type": x, ok: "a=b", empty: "" } } }
              - { name: c, image: busybox, commands: [true], runs_on: { os: linux, labels: { gpu: yes }, arch: arm64 } }
              - { name: d, gate: { kind: hold }, runs_on: { os: linux } }
              - { name: e, image: busybox, commands: [true], runs_on: { labels: [gpu] } }
    "#;
    invalid_limits = r#"
        pipelines:
          test:
            steps:
              - { name: a, image: busybox, commands: [true], limits: { memory: 1q, cpus: 0, pids: 2 } }
              - { name: b, image: busybox, commands: [true], limits: { memory: 1k } }
    "#;

    // ---- meaning: names, references, the step graph, gates -----------------------------------
    duplicate_step_names = r#"
        pipelines:
          test:
            steps:
              - { name: unit, image: busybox, commands: [true] }
              - { name: unit, image: busybox, commands: [true] }
    "#;
    depends_on_cycle = r#"
        pipelines:
          test:
            steps:
              - { name: a, image: busybox, commands: [true], depends_on: [c] }
              - { name: b, image: busybox, commands: [true], depends_on: [a] }
              - { name: c, image: busybox, commands: [true], depends_on: [b] }
              - { name: d, image: busybox, commands: [true], depends_on: [d] }
    "#;
    depends_on_unknown_step = r#"
        pipelines:
          test:
            steps:
              - { name: build, image: busybox, commands: [true] }
              - { name: test, image: busybox, commands: [true], depends_on: [biuld, deploy] }
    "#;
    unknown_service_reference = r#"
        pipelines:
          test:
            services:
              postgres: { image: postgres:16 }
            steps:
              - { name: a, image: busybox, commands: [true], services: [postgre, redis] }
    "#;
    unknown_pipeline_references = r#"
        pipelines:
          test:
            steps: [{ name: a, image: busybox, commands: [true] }]
        promotion:
          requires: { pipelines: [stagin] }
        merge:
          requires: { pipelines: [tests] }
    "#;
    impossible_gate_approvals = r#"
        pipelines:
          staging:
            steps:
              - name: three-of-two
                gate: { kind: approval, approvals: 3, from: { users: [alice, bob] } }
              - name: none-needed
                gate: { kind: approval, approvals: 0 }
              - name: hold-with-count
                gate: { kind: hold, approvals: 2 }
              - name: twice
                gate: { kind: approval, from: { users: [alice, alice] } }
    "#;
    impossible_promotion_approvals = r#"
        pipelines:
          staging:
            steps: [{ name: a, image: busybox, commands: [true] }]
        promotion:
          from: master
          to: master
          requires:
            approvals: { count: 2, from: { users: [alice] } }
    "#;
    gate_with_container_keys = r#"
        pipelines:
          staging:
            steps:
              - name: approve
                image: busybox
                commands: [true]
                gate: { kind: approval }
    "#;
    step_without_image_or_commands = r#"
        pipelines:
          test:
            steps:
              - name: nothing
              - { name: no-image, commands: [true] }
              - { name: empty-commands, image: busybox, commands: [] }
    "#;
    unsupported_version = r#"
        version: 2
        pipelines:
          test:
            steps: [{ name: a, image: busybox, commands: [true] }]
    "#;
    invalid_names = r#"
        pipelines:
          "my pipeline":
            on: { manual: {} }
            services:
              Postgres_DB: { image: postgres }
            steps:
              - { name: "unit tests", image: busybox, commands: [true], secrets: [api-token, OK_1], env: { 1BAD: x } }
    "#;
    pipelines_without_triggers = r#"
        pipelines:
          lint:
            steps: [{ name: a, image: busybox, commands: [true] }]
          docs:
            on: {}
            steps: [{ name: a, image: busybox, commands: [true] }]
          empty:
            on: { manual: {} }
            steps: []
    "#;
    resource_requests = r#"
        pipelines:
          test:
            resources: [{ pool: phones, count: 0 }, { pool: phones }]
            steps:
              - { name: a, image: busybox, commands: [true], retry: { count: 11 }, workdir: /etc }
              - { name: b, image: busybox, commands: [true], workdir: ../outside }
    "#;
    fast_forward_only_cannot_be_turned_off = r#"
        pipelines:
          test:
            steps: [{ name: a, image: busybox, commands: [true] }]
        merge: { fast_forward_only: false }
    "#;
    every_mistake_in_one_pass = r#"
        version: 3
        pipelines:
          test:
            on:
              push: { branches: ["feature/["] }
            steps:
              - name: lint
                image: busybox
                comands: [ls]
                timeout: 10x
              - name: unit
                image: busybox
                commands: [true]
                depends_on: [lint, unit]
                network: nope
              - name: unit
                gate: { kind: approval, approvals: 3, from: { users: [a, b] } }
          other:
            steps: []
    "#;
}

fn parsed(input: &str) -> spec::Spec {
    match spec::parse(&unindent(input)) {
        Ok(s) => s,
        Err(d) => panic!("spec should be valid: {d:?}"),
    }
}

#[test]
fn default_layout_plans_the_master_production_strategy() {
    let s = parsed(
        r#"
        pipelines:
          test: { steps: [{ name: a, image: busybox, commands: [true] }] }
          staging: { steps: [{ name: a, image: busybox, commands: [true] }] }
          production: { steps: [{ name: a, image: busybox, commands: [true] }] }
        "#,
    );
    let names = |e: TriggerEvent| s.plan(&e).iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(TriggerEvent::push("feature/login")), ["test"]);
    assert_eq!(names(TriggerEvent::pull_request("master")), ["test"]);
    assert_eq!(names(TriggerEvent::push("master")), ["staging"]);
    assert_eq!(names(TriggerEvent::push("production")), ["production"]);
    assert!(names(TriggerEvent::of(EventKind::Manual, "master")).is_empty());
    assert_eq!(s.pipeline("staging").map(|p| p.kind), Some(spec::PipelineKind::Deploy));
    assert_eq!(s.pipeline("test").map(|p| p.kind), Some(spec::PipelineKind::Test));
    assert_eq!(names(TriggerEvent::of(EventKind::Promotion, "production")), ["production"]);
}

#[test]
fn upstream_pipelines_are_chosen_by_the_repository_and_branch_that_moved() {
    let s = parsed(
        r#"
        pipelines:
          against-api:
            on: { upstream: { repo: acme/api, branch: master } }
            steps: [{ name: a, image: busybox, commands: [true] }]
          against-api-next:
            on: { upstream: { repo: acme/api, branch: next }, push: { branches: [master] } }
            steps: [{ name: a, image: busybox, commands: [true] }]
          test: { steps: [{ name: a, image: busybox, commands: [true] }] }
        promotion: { requires: { downstream: [acme/client, acme/cli] } }
        "#,
    );
    let names =
        |repo: &str, branch: &str| s.downstream_of(repo, branch).iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names("acme/api", "master"), ["against-api"]);
    assert_eq!(names("acme/api", "next"), ["against-api-next"]);
    assert!(names("acme/api", "production").is_empty());
    assert!(names("acme/other", "master").is_empty(), "another repository's master starts nothing");
    // A push to this repository never starts a pipeline that has only `on: upstream`.
    let pushed: Vec<String> = s.plan(&TriggerEvent::push("master")).iter().map(|p| p.name.clone()).collect();
    assert_eq!(pushed, ["against-api-next"]);
    let promotion = s.promotion.as_ref().expect("a promotion policy");
    assert_eq!(promotion.downstream, ["acme/client", "acme/cli"]);
}

#[test]
fn the_default_layout_follows_the_branches_the_spec_names() {
    let s = parsed(
        r#"
        pipelines:
          test: { steps: [{ name: a, image: busybox, commands: [true] }] }
          staging: { steps: [{ name: a, image: busybox, commands: [true] }] }
          production: { steps: [{ name: a, image: busybox, commands: [true] }] }
          nightly:
            on: { schedule: [{ cron: "0 3 * * *" }] }
            steps: [{ name: a, image: busybox, commands: [true] }]
        promotion: { from: main, to: release }
        merge: { requires: { reviews: 1 } }
        "#,
    );
    let names = |e: TriggerEvent| s.plan(&e).iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(TriggerEvent::push("main")), ["staging"]);
    assert_eq!(names(TriggerEvent::push("release")), ["production"]);
    assert_eq!(names(TriggerEvent::of(EventKind::Promotion, "release")), ["production"]);
    // master and production are ordinary branches here.
    assert_eq!(names(TriggerEvent::push("master")), ["test"]);
    assert_eq!(names(TriggerEvent::push("production")), ["test"]);
    assert_eq!(s.merge.as_ref().map(|m| m.into.as_str()), Some("main"), "merge.into follows promotion.from");
    let promotion = s.promotion.as_ref().expect("a promotion policy");
    assert_eq!((promotion.from.as_str(), promotion.to.as_str()), ("main", "release"));
    let nightly = s.pipeline("nightly").expect("nightly");
    assert_eq!(nightly.triggers.schedule[0].branch, "main", "a schedule builds the integration branch by default");

    // merge.into alone names the integration branch for promotions too.
    let s = parsed(
        r#"
        pipelines:
          staging: { steps: [{ name: a, image: busybox, commands: [true] }] }
        merge: { into: trunk }
        promotion: { requires: { pipelines: [staging] } }
        "#,
    );
    assert_eq!(s.promotion.as_ref().map(|p| p.from.as_str()), Some("trunk"));
    assert_eq!(s.plan(&TriggerEvent::push("trunk")).len(), 1);
}

#[test]
fn path_filters_and_tags_decide_pushes() {
    let s = parsed(
        r#"
        pipelines:
          code:
            on: { push: { branches: ["**"], paths: ["src/**"], paths_ignore: ["**/*.md"] } }
            steps: [{ name: a, image: busybox, commands: [true] }]
          release:
            on: { push: { tags: ["v*"] } }
            steps: [{ name: a, image: busybox, commands: [true] }]
        "#,
    );
    let plan = |branch: Option<&str>, tag: Option<&str>, paths: Option<&[&str]>| {
        let e = TriggerEvent {
            kind: EventKind::Push,
            branch: branch.map(str::to_owned),
            tag: tag.map(str::to_owned),
            changed_paths: paths.map(|p| p.iter().map(|x| (*x).to_owned()).collect()),
        };
        s.plan(&e).iter().map(|p| p.name.clone()).collect::<Vec<_>>()
    };
    assert_eq!(plan(Some("feature/x"), None, Some(&["src/main.rs"])), ["code"]);
    assert!(plan(Some("feature/x"), None, Some(&["README.md"])).is_empty());
    assert!(plan(Some("feature/x"), None, Some(&["src/notes.md"])).is_empty(), "every changed file is ignored");
    assert_eq!(plan(Some("feature/x"), None, None), ["code"], "unknown changes build");
    assert_eq!(plan(None, Some("v1.2.0"), None), ["release"]);
    assert!(plan(None, Some("nightly"), None).is_empty());
    assert!(plan(Some("main"), None, Some(&["lib/x.rs"])).is_empty());
}

#[test]
fn step_closure_follows_dependencies() {
    let s = parsed(
        r#"
        pipelines:
          test:
            steps:
              - { name: a, image: busybox, commands: [true] }
              - { name: b, image: busybox, commands: [true], depends_on: [a] }
              - { name: c, image: busybox, commands: [true], depends_on: [b] }
              - { name: d, image: busybox, commands: [true] }
        "#,
    );
    let p = s.pipeline("test").expect("pipeline");
    let names: Vec<&str> = p.closure(&["c"]).iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn durations_read_and_print_alike() {
    for (text, secs) in [("90s", 90), ("10m", 600), ("1h30m", 5400), ("2d", 172_800), ("1d2h3m4s", 93_784)] {
        let d = spec::Duration::parse(text).expect(text);
        assert_eq!(d.as_secs(), secs, "{text}");
        assert_eq!(spec::Duration::parse(&d.to_string()).expect("round trip"), d);
    }
    for bad in ["", "90", "m", "1x", "30m1h", "1h1h", "-1s", "1.5h", "99999999999999999999d"] {
        assert!(spec::Duration::parse(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn memory_sizes() {
    assert_eq!(spec::Memory::parse("512m").map(|m| m.0), Ok(512 << 20));
    assert_eq!(spec::Memory::parse("2G").map(|m| m.0), Ok(2 << 30));
    assert_eq!(spec::Memory::parse("8388608").map(|m| m.0), Ok(8 << 20));
    assert_eq!(spec::Memory::parse("4mb").map(|m| m.0), Ok(4 << 20));
    for bad in ["", "1q", "1k", "1.5g", "g"] {
        assert!(spec::Memory::parse(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn lint_line_format_is_path_line_col() {
    let Err(diags) = spec::parse("pipelines:\n  test:\n    steps:\n      - name: a\n        imag: x\n") else {
        panic!("should fail");
    };
    let lines: Vec<String> = diags.iter().map(|d| d.line("dir/.cib.yml")).collect();
    assert!(
        lines.contains(&"dir/.cib.yml:5:9: error: unknown key 'imag' (did you mean 'image'?)".to_owned()),
        "{lines:?}"
    );
}

#[test]
fn carriage_returns_count_as_line_breaks() {
    for newline in ["\r\n", "\r"] {
        let text = ["pipelines:", "  test:", "    steps:", "      - name: a", "        imag: x"].join(newline);
        let Err(diags) = spec::parse(&text) else { panic!("should fail") };
        assert_eq!(diags[0].line("f"), "f:5:9: error: unknown key 'imag' (did you mean 'image'?)", "{newline:?}");
        assert!(diags[0].render("f", &text).contains("5 |         imag: x"), "{newline:?}");
    }
}

#[test]
fn isolated_is_read_and_defaults_to_false() {
    let spec = parsed(
        r#"
        pipelines:
          test:
            steps:
              - { name: shared, image: busybox, commands: [true] }
              - { name: alone, image: busybox, commands: [true], isolated: true }
        "#,
    );
    let steps = &spec.pipelines[0].steps;
    assert!(!steps[0].isolated);
    assert!(steps[1].isolated);
    let wrong = spec::parse(
        "pipelines:\n  test:\n    steps:\n      - { name: a, image: b, commands: [c], isolated: sometimes }\n",
    );
    let diagnostics = wrong.err().unwrap_or_default();
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].pos.line, 4, "{diagnostics:?}");
}
