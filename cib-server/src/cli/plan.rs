//! `cib plan`: which pipelines and steps an event would start, as a tree or as JSON.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use cib_core::spec::{self, Action, EventKind, TriggerEvent};
use serde_json::json;

pub struct PlanArgs<'a> {
    pub path: &'a Path,
    pub event: EventKind,
    pub branch: Option<String>,
    pub tag: Option<String>,
    pub changed: Option<Vec<String>>,
    pub json: bool,
    /// The server's configuration, whose `[limits]` apply; the built-in limits when `None`.
    pub config: Option<&'a Path>,
}

/// The operator limits of a server's configuration file, or the built-in ones without one, so
/// that `cib plan` and `cib run` refuse and fill in what the server would.
pub fn operator_limits(config: Option<&Path>) -> Result<spec::OperatorLimits, String> {
    limits_config(config).map(|(_, limits)| limits)
}

/// The `[limits]` of a server's configuration file (all absent without one), and what they
/// resolve to (the built-in limits where absent).
pub fn limits_config(
    config: Option<&Path>,
) -> Result<(cib_server::config::LimitsConfig, spec::OperatorLimits), String> {
    let (table, shown) = match config {
        None => (cib_server::config::LimitsConfig::default(), String::from("the built-in limits")),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let config =
                cib_server::config::ServerConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            (config.limits, path.display().to_string())
        }
    };
    let limits = table.resolve().map_err(|e| format!("{shown}: {e}"))?;
    Ok((table, limits))
}

/// The current branch of the repository around `path`, if git can tell.
fn current_branch(path: &Path) -> Option<String> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let out =
        std::process::Command::new("git").arg("-C").arg(dir).args(["symbolic-ref", "--short", "HEAD"]).output().ok()?;
    let name = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !name.is_empty()).then_some(name)
}

pub fn run(args: PlanArgs<'_>) -> ExitCode {
    let shown = args.path.display().to_string();
    let bytes = match std::fs::read(args.path) {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{shown}: error: cannot read the spec: {e}");
            return ExitCode::from(2);
        }
    };
    let limits = match operator_limits(args.config) {
        Ok(limits) => limits,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cib plan: {e}");
            return ExitCode::from(2);
        }
    };
    let source = String::from_utf8_lossy(&bytes);
    let parsed = match spec::parse_bytes_limited(&bytes, &limits) {
        Ok(s) => s,
        Err(diags) => {
            let mut err = std::io::stderr().lock();
            for d in &diags {
                let _ = writeln!(err, "{}", d.render(&shown, &source));
            }
            return ExitCode::from(2);
        }
    };
    let branch = args.branch.or_else(|| if args.tag.is_some() { None } else { current_branch(args.path) });
    let branch = branch.or_else(|| args.tag.is_none().then(|| parsed.integration_branch().to_owned()));
    let event = TriggerEvent { kind: args.event, branch, tag: args.tag, changed_paths: args.changed };
    let pipelines = parsed.plan(&event);
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = json!({
            "event": event,
            "pipelines": pipelines.iter().map(|p| json!({
                "name": p.name,
                "kind": p.kind,
                "timeout": p.timeout,
                "steps": p.steps.iter().map(|s| with_matrix(s, json!({
                    "name": s.name,
                    "timeout": s.timeout,
                    "memory": s.limits.memory.map(|m| spec::limits::show_bytes(m.0)),
                    "pids": s.limits.pids,
                    "depends_on": s.depends_on,
                    "runs": s.when.admits(&event),
                    "image": match &s.action { Action::Run { image, .. } => Some(image), Action::Gate(_) => None },
                    "gate": match &s.action { Action::Gate(g) => Some(g.kind), Action::Run { .. } => None },
                }))).collect::<Vec<_>>(),
                "deliverables": p.deliverables,
            })).collect::<Vec<_>>(),
        });
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let target = match (&event.tag, &event.branch) {
        (Some(t), _) => format!("tag {t}"),
        (None, Some(b)) => b.clone(),
        (None, None) => "(no branch)".into(),
    };
    let kind = serde_json::to_value(event.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let _ = writeln!(out, "{kind} on {target}");
    if pipelines.is_empty() {
        let _ = writeln!(out, "└─ no pipeline runs");
    }
    for (i, p) in pipelines.iter().enumerate() {
        let last_pipeline = i + 1 == pipelines.len();
        let (branch_mark, indent) = if last_pipeline { ("└─", "   ") } else { ("├─", "│  ") };
        let kind = if p.kind == spec::PipelineKind::Deploy { "deploy" } else { "test" };
        let _ = writeln!(out, "{branch_mark} {} ({kind}, {} steps)", p.name, p.steps.len());
        let publishes = !p.deliverables.is_empty();
        for (j, s) in p.steps.iter().enumerate() {
            let mark = if j + 1 == p.steps.len() && !publishes { "└─" } else { "├─" };
            let what = match &s.action {
                Action::Run { image, .. } => format!("[{image}]"),
                Action::Gate(g) => {
                    format!("[{} gate]", if g.kind == spec::GateKind::Hold { "hold" } else { "approval" })
                }
            };
            let after = if s.depends_on.is_empty() {
                String::new()
            } else {
                format!("  after {}", depends_text(p, &s.depends_on))
            };
            let skipped = if s.when.admits(&event) { "" } else { "  (skipped by its 'when')" };
            let _ = writeln!(out, "{indent}{mark} {} {what}{after}{skipped}", s.name);
        }
        if publishes {
            let n = p.deliverables.len();
            let _ = writeln!(out, "{indent}└─ publish: {n} deliverable{}", if n == 1 { "" } else { "s" });
            for (j, d) in p.deliverables.iter().enumerate() {
                let mark = if j + 1 == n { "└─" } else { "├─" };
                let _ = writeln!(out, "{indent}   {mark} {}", describe(d));
            }
        }
    }
    ExitCode::SUCCESS
}

/// The steps a step waits for, with every cell of a matrix it waits for shown as the matrix
/// step's name and its count of cells (`unit (all 4 cells)`), so that a wide matrix stays
/// one line.
fn depends_text(p: &spec::Pipeline, depends_on: &[String]) -> String {
    let mut shown: Vec<String> = Vec::new();
    for d in depends_on {
        let matrix = p.step(d).and_then(|s| s.matrix.as_ref()).map(|m| m.step.as_str());
        match matrix {
            Some(m) => {
                let label = format!("{m} (all {} cells)", p.steps_named(m).count());
                if !shown.contains(&label) {
                    shown.push(label);
                }
            }
            None => shown.push(d.clone()),
        }
    }
    shown.join(", ")
}

/// A step's plan with the cell of its matrix (the matrix step's name, the cell's values and
/// `fail_fast`), when it is one.
fn with_matrix(step: &spec::Step, mut planned: serde_json::Value) -> serde_json::Value {
    if let Some(m) = &step.matrix {
        let values: serde_json::Map<String, serde_json::Value> =
            m.values.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))).collect();
        planned["matrix"] = json!({ "step": m.step, "values": values, "fail_fast": m.fail_fast });
    }
    planned
}

/// One deliverable in a line: what, where, from which pipeline when promoted, with which secret.
fn describe(d: &spec::Deliverable) -> String {
    let secret = d.credentials().map(|c| format!(" (secret {c})")).unwrap_or_default();
    match d {
        spec::Deliverable::Pypi { index, files, from: None, .. } => {
            format!("pypi {} to {index}{secret}", files.as_str())
        }
        spec::Deliverable::Pypi { index, from: Some(from), .. } => {
            format!("pypi: the files '{from}' published, to {index}{secret}")
        }
        spec::Deliverable::Docker { image, tags, from: None, context, .. } => {
            format!("docker {image}:{} built from '{context}'{secret}", tags.join(", "))
        }
        spec::Deliverable::Docker { image, tags, from: Some(from), .. } => {
            format!("docker {image}:{}: the image '{from}' pushed, re-tagged{secret}", tags.join(", "))
        }
    }
}
