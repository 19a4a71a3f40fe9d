//! Matrix steps: the cells a spec makes (names, values, images, include and exclude), the
//! limit on their number with its position, and how the machine runs them (`depends_on` waits
//! for every cell, `fail_fast` cancels the others, snapshots restore them).

use cib_core::event::{Conclusion, StepConclusion};
use cib_core::pipeline::{BuildState, Config, Effect, Input, Machine, StepResult, StepStatus};
use cib_core::spec::{self, Action, OperatorLimits};

use crate::machine::{Sim, context};

const TWO_BY_TWO: &str = r#"pipelines:
  test:
    steps:
      - name: unit
        image: "python:{{ matrix.python }}-slim"
        matrix:
          python: ["3.11", "3.12"]
          db: [sqlite, postgres]
          exclude:
            - { python: "3.11", db: postgres }
          include:
            - { python: "3.13", db: sqlite }
            - { python: "3.12", experimental: "yes" }
        commands: [pytest]
      - name: package
        image: busybox
        depends_on: [unit]
        commands: [make dist]
"#;

fn cell_names(spec: &spec::Spec, pipeline: &str) -> Vec<String> {
    spec.pipeline(pipeline).expect("pipeline").steps.iter().map(|s| s.name.clone()).collect()
}

#[test]
fn a_two_by_two_matrix_with_one_exclude_and_one_include_makes_four_cells() {
    let spec = spec::parse(TWO_BY_TWO).expect("valid");
    assert_eq!(
        cell_names(&spec, "test"),
        [
            "unit (python=3.11, db=sqlite)",
            "unit (python=3.12, db=sqlite, experimental=yes)",
            "unit (python=3.12, db=postgres, experimental=yes)",
            "unit (python=3.13, db=sqlite)",
            "package",
        ]
    );
    let p = spec.pipeline("test").expect("test");
    let cell = p.step("unit (python=3.13, db=sqlite)").expect("cell");
    assert_eq!(cell.env.get("MATRIX_PYTHON").map(String::as_str), Some("3.13"));
    assert_eq!(cell.env.get("MATRIX_DB").map(String::as_str), Some("sqlite"));
    let Action::Run { image, .. } = &cell.action else { panic!("a run step") };
    assert_eq!(image, "python:3.13-slim");
    let extra = p.step("unit (python=3.12, db=postgres, experimental=yes)").expect("cell");
    assert_eq!(extra.env.get("MATRIX_EXPERIMENTAL").map(String::as_str), Some("yes"));
    let m = extra.matrix.as_ref().expect("a cell knows its matrix");
    assert_eq!(m.step, "unit");
    assert!(!m.fail_fast, "fail_fast defaults to false");
    // A step that depends on the matrix waits for every cell.
    let package = p.step("package").expect("package");
    assert_eq!(package.depends_on.len(), 4);
    assert!(package.depends_on.iter().all(|d| d.starts_with("unit (")), "{:?}", package.depends_on);
    // `--step unit` picks every cell.
    assert_eq!(p.closure(&["unit"]).len(), 4);
}

fn errors(text: &str) -> Vec<String> {
    spec::parse(text).expect_err("invalid").iter().map(|d| d.line(".cib.yml")).collect()
}

fn errors_limited(text: &str, limits: &OperatorLimits) -> Vec<String> {
    spec::parse_limited(text, limits).expect_err("invalid").iter().map(|d| d.line(".cib.yml")).collect()
}

fn values(n: usize, prefix: &str) -> String {
    (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>().join(", ")
}

#[test]
fn two_hundred_and_fifty_seven_cells_are_an_error_at_the_matrix_line_with_the_count() {
    // 16 × 16 = 256 is allowed; one include more is 257.
    let at_limit = format!(
        "pipelines:\n  test:\n    steps:\n      - name: unit\n        image: busybox\n        commands: [true]\n        matrix:\n          a: [{}]\n          b: [{}]\n",
        values(16, "a"),
        values(16, "b")
    );
    assert_eq!(cell_names(&spec::parse(&at_limit).expect("256 cells"), "test").len(), 256);
    let over = format!("{at_limit}          include: [{{ a: extra, b: extra }}]\n");
    assert_eq!(
        errors(&over),
        ["[.cib.yml:7:9: error: the matrix makes 257 cells, over the limit of 256 (max_matrix_cells in the server's [limits]): remove values or exclude cells"]
            .map(|s| s.trim_start_matches('[').trim_end_matches(']').to_owned())
    );
    // The limit is the server's to set.
    let lower = OperatorLimits { max_matrix_cells: Some(100), ..OperatorLimits::default() };
    let lines = errors_limited(&at_limit, &lower);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(".cib.yml:7:9: error: the matrix makes 256 cells, over the limit of 100"),
        "{lines:?}"
    );
    let higher = OperatorLimits { max_matrix_cells: Some(300), ..OperatorLimits::default() };
    assert!(spec::parse_limited(&over, &higher).is_ok());
    // A product far past any limit is refused before its cells are built.
    let huge = format!(
        "pipelines:\n  test:\n    steps:\n      - {{ name: unit, image: busybox, commands: [true], matrix: {{ a: [{}], b: [{}], c: [{}], d: [{}] }} }}\n",
        values(64, "a"),
        values(64, "b"),
        values(64, "c"),
        values(64, "d")
    );
    let lines = errors(&huge);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("the matrix makes 16777216 cells before exclude"), "{lines:?}");
}

#[test]
fn matrix_mistakes_are_reported_with_line_and_column() {
    let text = r#"pipelines:
  test:
    steps:
      - name: unit
        image: "python:{{ matrix.pyton }}"
        fail_fast: maybe
        matrix:
          python: ["3.11", "3.11"]
          db: []
          exclude: [{ dbs: sqlite }]
        commands: [pytest]
      - name: lone
        image: busybox
        fail_fast: true
        commands: [true]
      - name: sign-off
        gate: { kind: approval }
        matrix: { who: [a, b] }
"#;
    let lines = errors(text);
    assert_eq!(
        lines,
        [
            ".cib.yml:6:20: error: expected a boolean (true or false), found 'maybe'",
            ".cib.yml:8:28: error: '3.11' is listed twice (first at 8:20)",
            ".cib.yml:9:15: error: matrix key 'db' lists no values",
            ".cib.yml:10:23: error: exclude names 'dbs', which is not a key of this matrix (did you mean 'db'?)",
            ".cib.yml:14:20: error: 'fail_fast' applies to a step with a 'matrix'",
            ".cib.yml:18:9: error: a gate cannot have a matrix: people answer it once",
        ],
    );
    let image = "pipelines:\n  test:\n    steps:\n      - name: unit\n        image: \"python:{{ matrix.pyton }}\"\n        matrix: { python: [\"3.12\"] }\n        commands: [pytest]\n";
    assert_eq!(
        errors(image),
        [
            ".cib.yml:5:16: error: 'image' uses {{ matrix.pyton }}, but cell 'unit (python=3.12)' has no value for 'pyton' (did you mean 'python'?)"
        ]
    );
    let no_matrix = "pipelines:\n  test:\n    steps:\n      - { name: unit, image: \"python:{{ matrix.python }}\", commands: [pytest] }\n";
    assert_eq!(
        errors(no_matrix),
        [".cib.yml:4:30: error: 'image' uses {{ matrix.python }}, but step 'unit' has no matrix"]
    );
}

const FAIL_FAST: &str = r#"pipelines:
  test:
    steps:
      - name: unit
        image: busybox
        matrix: { n: ["1", "2", "3"] }
        fail_fast: true
        commands: [test]
      - name: after
        image: busybox
        depends_on: [unit]
        commands: [echo after]
"#;

fn step_status(sim: &Sim, build: &str, step: &str) -> StepStatus {
    let b = sim.machine.build(&build.into()).expect("build");
    b.steps.iter().find(|s| s.name == step).map(|s| s.status.clone()).expect("step")
}

#[test]
fn fail_fast_cancels_the_other_cells_and_the_build_fails() {
    let mut sim = Sim::new(Config { max_running_steps: 2, ..Config::default() });
    sim.enqueue(0, "b1", FAIL_FAST, "test", context("feature/a"));
    // Two cells run (two slots), the third waits for a slot.
    assert!(matches!(step_status(&sim, "b1", "unit (n=1)"), StepStatus::Running { .. }));
    assert!(matches!(step_status(&sim, "b1", "unit (n=3)"), StepStatus::Ready { .. }));
    let effects = sim.input(
        10,
        Input::StepFinished {
            build: "b1".into(),
            step: "unit (n=1)".into(),
            attempt: 1,
            result: StepResult::Exited(1),
        },
    );
    assert!(
        effects.iter().any(|e| matches!(e, Effect::StopStep { step, .. } if step == "unit (n=2)")),
        "the running sibling is stopped: {effects:?}"
    );
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::StartStep(job) if job.step.name == "unit (n=3)")),
        "the waiting sibling never starts"
    );
    assert_eq!(step_status(&sim, "b1", "unit (n=3)"), StepStatus::Done(StepConclusion::Cancelled));
    sim.finish(20, "b1", "unit (n=2)", 1, StepResult::Exited(143));
    assert_eq!(step_status(&sim, "b1", "unit (n=2)"), StepStatus::Done(StepConclusion::Cancelled));
    assert_eq!(step_status(&sim, "b1", "after"), StepStatus::Done(StepConclusion::Skipped));
    assert_eq!(sim.state("b1"), BuildState::Finished(Conclusion::Failed), "{}", sim.trace);
}

#[test]
fn without_fail_fast_the_other_cells_run_on_and_dependents_wait_for_all() {
    let spec = FAIL_FAST.replace("        fail_fast: true\n", "");
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", &spec, "test", context("feature/a"));
    sim.finish(10, "b1", "unit (n=1)", 1, StepResult::Exited(0));
    sim.finish(11, "b1", "unit (n=2)", 1, StepResult::Exited(0));
    assert_eq!(step_status(&sim, "b1", "after"), StepStatus::Pending, "waits for the third cell");
    sim.finish(12, "b1", "unit (n=3)", 1, StepResult::Exited(2));
    assert_eq!(step_status(&sim, "b1", "unit (n=3)"), StepStatus::Done(StepConclusion::Failed));
    assert_eq!(step_status(&sim, "b1", "unit (n=1)"), StepStatus::Done(StepConclusion::Success));
    assert_eq!(step_status(&sim, "b1", "after"), StepStatus::Done(StepConclusion::Skipped));
    assert_eq!(sim.state("b1"), BuildState::Finished(Conclusion::Failed), "{}", sim.trace);
}

#[test]
fn a_snapshot_taken_while_cells_run_restores_them() {
    let mut sim = Sim::new(Config::default());
    sim.enqueue(0, "b1", TWO_BY_TWO, "test", context("feature/a"));
    sim.finish(10, "b1", "unit (python=3.11, db=sqlite)", 1, StepResult::Exited(0));
    let restored = Machine::restore(sim.machine.snapshot()).expect("restore");
    assert_eq!(restored, sim.machine);
    let job = restored
        .running_job(&"b1".into(), "unit (python=3.13, db=sqlite)", 1)
        .expect("a running cell's job is rebuilt");
    assert_eq!(job.env.get("MATRIX_PYTHON").map(String::as_str), Some("3.13"));
    assert_eq!(job.env.get("CIB_STEP").map(String::as_str), Some("unit (python=3.13, db=sqlite)"));
}
