//! Operator limits: the default and the maximum a server sets for step timeouts, pipeline
//! timeouts, memory and processes, whatever a spec asks for.
//!
//! Two pure functions: [`OperatorLimits::check`] reads the spec as written (where every value
//! still has its line and column) and reports each value over a maximum, naming its key path,
//! the value and the limit; [`OperatorLimits::apply`] fills the defaults into a checked
//! pipeline, so that every step that runs commands has a timeout even when its spec gives none.
//! The server refuses a spec that `check` finds fault with, as it refuses an invalid one;
//! `apply` runs where a build is planned (the machine, when it reads the spec of a build).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::diag::Diagnostic;
use super::matrix;
use super::model::{Action, Pipeline};
use super::raw::RawSpec;
use super::types::{Duration, Spanned};

/// A default (what a spec that says nothing gets) and a maximum (what a spec may ask for at
/// most). Either may be absent: no default leaves the value unset, no maximum caps nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
// An absent field is `None`, which needs no `T: Default` (serde's derive would ask for one).
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Bound<T> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<T>,
}

impl<T> Default for Bound<T> {
    fn default() -> Self {
        Bound { default: None, max: None }
    }
}

impl<T: Copy + Ord> Bound<T> {
    pub fn new(default: Option<T>, max: Option<T>) -> Self {
        Bound { default, max }
    }

    /// The value a spec gets: its own, or the default, never above the maximum.
    pub fn resolve(&self, asked: Option<T>) -> Option<T> {
        let value = asked.or(self.default);
        match (value, self.max) {
            (Some(v), Some(max)) => Some(v.min(max)),
            (v, _) => v,
        }
    }

    /// The maximum, when `value` is over it.
    fn exceeded_by(&self, value: T) -> Option<T> {
        self.max.filter(|max| value > *max)
    }
}

/// What a server allows specs, and what it gives them when they say nothing. The default value
/// (`OperatorLimits::default()`) sets nothing and caps nothing; [`OperatorLimits::builtin`] is
/// what `cib serve` and `cib run` use when their configuration says nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OperatorLimits {
    /// A step's `timeout`: the time one attempt may run.
    pub step_timeout: Bound<Duration>,
    /// A pipeline's `timeout`: the time from its start (after its queue and leases) to its end,
    /// gates included.
    pub pipeline_timeout: Bound<Duration>,
    /// A step's `limits.memory`, in bytes.
    pub memory: Bound<u64>,
    /// A step's `limits.pids`.
    pub pids: Bound<u32>,
    /// The most cells one matrix may make; [`matrix::DEFAULT_MAX_CELLS`] when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_matrix_cells: Option<u32>,
}

/// The built-in default step timeout: an hour.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(3_600);
/// The built-in maximum step timeout: a day.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(86_400);
/// The built-in default memory of a step: 2 GiB, as the Docker executor gives one that sets none.
pub const DEFAULT_MEMORY: u64 = 2 << 30;
/// The built-in default process limit of a step: 1024, as the Docker executor gives.
pub const DEFAULT_PIDS: u32 = 1024;

impl OperatorLimits {
    /// What a server uses when its configuration says nothing: a step runs at most an hour
    /// unless its spec says otherwise, and never more than a day; 2 GiB and 1024 processes unless
    /// the spec says otherwise, with no maximum. Pipelines get no default timeout: a deploy
    /// pipeline waits at its approval gates for as long as people take, and a default would end
    /// it there.
    pub fn builtin() -> Self {
        OperatorLimits {
            step_timeout: Bound::new(Some(DEFAULT_STEP_TIMEOUT), Some(MAX_STEP_TIMEOUT)),
            pipeline_timeout: Bound::default(),
            memory: Bound::new(Some(DEFAULT_MEMORY), None),
            pids: Bound::new(Some(DEFAULT_PIDS), None),
            max_matrix_cells: None,
        }
    }

    /// The most cells one matrix may make: the server's `max_matrix_cells`, else 256.
    pub fn max_cells(&self) -> u32 {
        self.max_matrix_cells.unwrap_or(matrix::DEFAULT_MAX_CELLS)
    }

    /// Every value of the spec over a maximum, each at its line and column, naming its key path
    /// (`pipelines.test.steps.unit.timeout`), the value and the limit. Values the spec leaves
    /// out are never over: they get the default, which is at most the maximum.
    pub fn check(&self, raw: &RawSpec) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for (name, p) in &raw.pipelines {
            let at = format!("pipelines.{}", name.value);
            if let Some(t) = &p.timeout {
                over(&mut out, &self.pipeline_timeout, t, &format!("{at}.timeout"), "max_pipeline_timeout", show);
            }
            for s in &p.steps.value {
                let at = format!("{at}.steps.{}", s.name.value);
                if let Some(t) = &s.timeout {
                    over(&mut out, &self.step_timeout, t, &format!("{at}.timeout"), "max_step_timeout", show);
                }
                let Some(limits) = &s.limits else { continue };
                if let Some(m) = &limits.memory {
                    let m = Spanned::new(m.pos, m.value.0);
                    over(&mut out, &self.memory, &m, &format!("{at}.limits.memory"), "max_memory", show_bytes);
                }
                if let Some(n) = &limits.pids {
                    over(&mut out, &self.pids, n, &format!("{at}.limits.pids"), "max_pids", show);
                }
            }
        }
        out.sort();
        out
    }

    /// Fills the defaults into a checked pipeline and holds every value to its maximum: the
    /// pipeline's timeout, and each command step's timeout, memory and processes. Gates run no
    /// container, so they get none of these (a gate's own `timeout` is the time people have).
    ///
    /// A spec over a maximum is refused before it is planned ([`OperatorLimits::check`]); the
    /// cap here holds for what reaches a build without that check, such as a retry of a build
    /// whose spec was planned under larger limits.
    pub fn apply(&self, pipeline: &mut Pipeline) {
        pipeline.timeout = self.pipeline_timeout.resolve(pipeline.timeout);
        for step in &mut pipeline.steps {
            if matches!(step.action, Action::Gate(_)) {
                continue;
            }
            step.timeout = self.step_timeout.resolve(step.timeout);
            let memory = self.memory.resolve(step.limits.memory.map(|m| m.0));
            step.limits.memory = memory.map(super::types::Memory);
            step.limits.pids = self.pids.resolve(step.limits.pids);
        }
    }
}

fn over<T: Copy + Ord>(
    out: &mut Vec<Diagnostic>,
    bound: &Bound<T>,
    value: &Spanned<T>,
    path: &str,
    key: &str,
    show: impl Fn(T) -> String,
) {
    if let Some(max) = bound.exceeded_by(value.value) {
        out.push(Diagnostic::error(
            value.pos,
            format!(
                "{path} is {}, over this server's limit of {} ({key} in its [limits]): ask for {} or less",
                show(value.value),
                show(max),
                show(max)
            ),
        ));
    }
}

fn show<T: fmt::Display>(value: T) -> String {
    value.to_string()
}

/// Bytes the way the spec writes them: `512m`, `2g`, or a plain number when no suffix fits.
pub fn show_bytes(bytes: u64) -> String {
    for (shift, unit) in [(30, 'g'), (20, 'm'), (10, 'k')] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;

    fn limits() -> OperatorLimits {
        OperatorLimits {
            step_timeout: Bound::new(Some(Duration::from_secs(600)), Some(Duration::from_secs(3_600))),
            pipeline_timeout: Bound::new(Some(Duration::from_secs(7_200)), Some(Duration::from_secs(14_400))),
            memory: Bound::new(Some(1 << 30), Some(4 << 30)),
            pids: Bound::new(Some(256), Some(2048)),
            max_matrix_cells: None,
        }
    }

    const OVER: &str = "pipelines:
  test:
    timeout: 5h
    steps:
      - name: unit
        image: busybox
        commands: [make]
        timeout: 2h
        limits: {memory: 8g, pids: 4096}
      - name: fine
        image: busybox
        commands: [make]
        timeout: 1h
        limits: {memory: 4g, pids: 2048}
";

    #[test]
    fn values_over_a_maximum_are_reported_with_key_path_value_limit_and_position() {
        let raw = spec::parse_raw(OVER).expect("valid YAML");
        let diags = limits().check(&raw);
        let lines: Vec<String> = diags.iter().map(|d| d.line("f")).collect();
        assert_eq!(
            lines,
            [
                "f:3:14: error: pipelines.test.timeout is 5h, over this server's limit of 4h (max_pipeline_timeout in its [limits]): ask for 4h or less",
                "f:8:18: error: pipelines.test.steps.unit.timeout is 2h, over this server's limit of 1h (max_step_timeout in its [limits]): ask for 1h or less",
                "f:9:26: error: pipelines.test.steps.unit.limits.memory is 8g, over this server's limit of 4g (max_memory in its [limits]): ask for 4g or less",
                "f:9:36: error: pipelines.test.steps.unit.limits.pids is 4096, over this server's limit of 2048 (max_pids in its [limits]): ask for 2048 or less",
            ]
        );
    }

    #[test]
    fn values_at_the_maximum_and_no_limits_at_all_pass() {
        let fine =
            OVER.replace("timeout: 5h", "timeout: 4h").replace("2h", "1h").replace("8g", "4g").replace("4096", "8");
        assert_eq!(limits().check(&spec::parse_raw(&fine).expect("valid")), []);
        assert_eq!(OperatorLimits::default().check(&spec::parse_raw(OVER).expect("valid")), []);
    }

    #[test]
    fn defaults_fill_what_the_spec_leaves_out_and_keep_what_it_gives() {
        let text = "pipelines:
  test:
    steps:
      - name: bare
        image: busybox
        commands: [make]
      - name: own
        image: busybox
        commands: [make]
        timeout: 20m
        limits: {memory: 512m, pids: 64}
      - name: approve
        gate: {kind: approval}
";
        let mut spec = spec::parse(text).expect("valid");
        let p = &mut spec.pipelines[0];
        limits().apply(p);
        assert_eq!(p.timeout, Some(Duration::from_secs(7_200)));
        let bare = p.step("bare").expect("bare");
        assert_eq!(bare.timeout, Some(Duration::from_secs(600)));
        assert_eq!(bare.limits.memory, Some(spec::Memory(1 << 30)));
        assert_eq!(bare.limits.pids, Some(256));
        let own = p.step("own").expect("own");
        assert_eq!(own.timeout, Some(Duration::from_secs(1_200)));
        assert_eq!(own.limits.memory, Some(spec::Memory(512 << 20)));
        assert_eq!(own.limits.pids, Some(64));
        let gate = p.step("approve").expect("gate");
        assert_eq!((gate.timeout, gate.limits.memory, gate.limits.pids), (None, None, None));
    }

    #[test]
    fn apply_holds_values_to_the_maximum_and_the_empty_limits_change_nothing() {
        // What `check` would refuse, reaching `apply` unchecked (a retry after the limits
        // were lowered), is cut down to the maximum.
        let mut spec = spec::parse(OVER).expect("valid");
        let untouched = spec.clone();
        OperatorLimits::default().apply(&mut spec.pipelines[0]);
        assert_eq!(spec, untouched);
        let p = &mut spec.pipelines[0];
        limits().apply(p);
        assert_eq!(p.timeout, Some(Duration::from_secs(14_400)));
        let unit = p.step("unit").expect("unit");
        assert_eq!(unit.timeout, Some(Duration::from_secs(3_600)));
        assert_eq!(unit.limits.memory, Some(spec::Memory(4 << 30)));
        assert_eq!(unit.limits.pids, Some(2048));
    }

    #[test]
    fn the_builtin_limits_give_every_command_step_an_hour_and_refuse_more_than_a_day() {
        let mut spec = spec::parse(OVER).expect("valid");
        OperatorLimits::builtin().apply(&mut spec.pipelines[0]);
        assert_eq!(spec.pipelines[0].timeout, Some(Duration::from_secs(5 * 3_600)), "no pipeline maximum built in");
        let long = OVER.replace("timeout: 2h", "timeout: 2d");
        let diags = OperatorLimits::builtin().check(&spec::parse_raw(&long).expect("valid"));
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert!(diags[0].message.contains("pipelines.test.steps.unit.timeout is 2d"), "{}", diags[0].message);
        assert!(diags[0].message.contains("limit of 1d"), "{}", diags[0].message);
    }

    #[test]
    fn bytes_are_shown_as_the_spec_writes_them() {
        assert_eq!(show_bytes(2 << 30), "2g");
        assert_eq!(show_bytes(512 << 20), "512m");
        assert_eq!(show_bytes(3 << 10), "3k");
        assert_eq!(show_bytes(1000), "1000");
    }
}
