//! From the spec as written to the checked model: names, references, the step graph, gates
//! and defaults. Every problem is collected; none stops the others from being found.

use std::collections::{BTreeMap, HashMap};

use indexmap::IndexMap;

use super::diag::{Diagnostic, Pos, suggestion};
use super::model::*;
use super::raw::*;
use super::types::{Duration, EnvValue, Glob, Spanned};

/// Pipelines that have default triggers and kinds: the master/production strategy.
pub const DEFAULT_LAYOUT: &[&str] = &["test", "staging", "production"];

const MAX_RETRIES: u32 = 10;

struct Checker {
    diags: Vec<Diagnostic>,
    /// Some values were malformed and left out, so a reference may point at one of them.
    partial: bool,
    /// The most cells one matrix may make.
    max_cells: u32,
}

impl Checker {
    fn err(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic::error(pos, message));
    }
}

pub(crate) fn validate(raw: RawSpec, partial: bool, max_cells: u32) -> Result<Spec, Vec<Diagnostic>> {
    let mut c = Checker { diags: Vec::new(), partial, max_cells };
    let version = match &raw.version {
        Some(v) if v.value != 1 => {
            c.err(v.pos, format!("unsupported spec version {}: this cib reads version 1", v.value));
            v.value
        }
        _ => 1,
    };
    let names: Vec<&str> = raw.pipelines.keys().map(|k| k.value.as_str()).collect();
    if raw.pipelines.is_empty() && !partial {
        c.err(Pos { line: 1, col: 1 }, "the spec defines no pipelines");
    }
    let branches = Branches::of(&raw);
    let mut pipelines = Vec::new();
    for (name, pipeline) in &raw.pipelines {
        pipelines.push(pipeline_model(&mut c, &branches, name, pipeline, &names));
    }
    check_needs_artifacts(&mut c, &raw, &pipelines);
    let promotion = raw.promotion.as_ref().map(|p| promotion_model(&mut c, &branches, p, &names));
    let merge = raw.merge.as_ref().map(|m| merge_model(&mut c, &branches, m, &names));
    if c.diags.is_empty() {
        Ok(Spec { version, pipelines, promotion, merge })
    } else {
        c.diags.sort();
        c.diags.dedup();
        Err(c.diags)
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_name(c: &mut Checker, what: &str, name: &Spanned<String>) {
    if !is_name(&name.value) {
        c.err(name.pos, format!("invalid {what} name '{}': use letters, digits, '-', '_' and '.'", name.value));
    }
}

fn env_map(c: &mut Checker, at: Pos, env: &IndexMap<String, EnvValue>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in env {
        if !is_env_name(k) {
            c.err(
                at,
                format!(
                    "invalid environment variable name '{k}': use letters, digits and '_', not starting with a digit"
                ),
            );
        }
        out.insert(k.clone(), v.0.clone());
    }
    out
}

fn positive(c: &mut Checker, at: Pos, what: &str, d: Option<Duration>) -> Option<Duration> {
    if let Some(d) = d
        && d.as_secs() == 0
    {
        c.err(at, format!("{what} must be longer than 0s"));
    }
    d
}

/// The branch pull requests merge into when the spec names none.
pub const DEFAULT_INTEGRATION_BRANCH: &str = "master";
/// The branch commits are promoted to when the spec names none.
pub const DEFAULT_RELEASE_BRANCH: &str = "production";

/// The two branches of the master/production strategy, as this spec names them. Every default
/// that involves a branch (the default pipelines' triggers, a schedule's branch, the merge
/// target, where promotions come from and go) comes from here, so a spec that says
/// `promotion: {from: main, to: release}` gets `main` and `release` throughout.
struct Branches {
    /// Where pull requests merge and promotions come from: `merge.into`, else `promotion.from`,
    /// else `master`.
    integration: String,
    /// Where promotions go: `promotion.to`, else `production`.
    release: String,
}

impl Branches {
    fn of(raw: &RawSpec) -> Branches {
        let into = raw.merge.as_ref().and_then(|m| m.into.as_ref()).map(|b| b.value.clone());
        let from = raw.promotion.as_ref().and_then(|p| p.from.as_ref()).map(|b| b.value.clone());
        let to = raw.promotion.as_ref().and_then(|p| p.to.as_ref()).map(|b| b.value.clone());
        Branches {
            integration: into.or(from).unwrap_or_else(|| DEFAULT_INTEGRATION_BRANCH.to_owned()),
            release: to.unwrap_or_else(|| DEFAULT_RELEASE_BRANCH.to_owned()),
        }
    }
}

fn default_triggers(branches: &Branches, name: &str) -> Option<Triggers> {
    let glob = |s: &str| Glob::parse(s).ok();
    match name {
        "test" => Some(Triggers {
            push: Some(PushTrigger {
                branches: BranchFilter {
                    include: None,
                    exclude: [&branches.integration, &branches.release].iter().filter_map(|b| glob(b)).collect(),
                },
                tags: Vec::new(),
                paths: PathFilter::default(),
            }),
            pull_request: Some(PullRequestTrigger { branches: BranchFilter::default(), paths: PathFilter::default() }),
            ..Triggers::default()
        }),
        "staging" => Some(Triggers {
            push: Some(PushTrigger {
                branches: BranchFilter {
                    include: Some(glob(&branches.integration).into_iter().collect()),
                    exclude: Vec::new(),
                },
                tags: Vec::new(),
                paths: PathFilter::default(),
            }),
            ..Triggers::default()
        }),
        // Production deploys what a promotion moved to the release branch; a push there from
        // outside cib (an emergency fix) deploys too.
        "production" => {
            let release =
                BranchFilter { include: Some(glob(&branches.release).into_iter().collect()), exclude: Vec::new() };
            Some(Triggers {
                push: Some(PushTrigger { branches: release.clone(), tags: Vec::new(), paths: PathFilter::default() }),
                promotion: Some(release),
                ..Triggers::default()
            })
        }
        _ => None,
    }
}

fn triggers_model(
    c: &mut Checker,
    branches: &Branches,
    name: &Spanned<String>,
    on: Option<&Spanned<RawTriggers>>,
) -> Triggers {
    let Some(on) = on else {
        return default_triggers(branches, &name.value).unwrap_or_else(|| {
            c.err(
                name.pos,
                format!("pipeline '{}' has no 'on': say which events start it (only test, staging and production have defaults)", name.value),
            );
            Triggers::default()
        });
    };
    let raw = &on.value;
    let t = Triggers {
        push: raw.push.as_ref().map(|p| PushTrigger {
            // A push trigger that names only tags does not fire on branch pushes.
            branches: BranchFilter {
                include: match (&p.branches, p.tags.is_empty()) {
                    (None, false) => Some(Vec::new()),
                    (b, _) => b.clone(),
                },
                exclude: p.branches_ignore.clone(),
            },
            tags: p.tags.clone(),
            paths: PathFilter { include: p.paths.clone(), exclude: p.paths_ignore.clone() },
        }),
        pull_request: raw.pull_request.as_ref().map(|p| PullRequestTrigger {
            branches: BranchFilter { include: p.branches.clone(), exclude: Vec::new() },
            paths: PathFilter { include: p.paths.clone(), exclude: p.paths_ignore.clone() },
        }),
        promotion: raw.promotion.as_ref().map(|p| BranchFilter { include: p.branches.clone(), exclude: Vec::new() }),
        manual: raw.manual.as_ref().map(|p| BranchFilter { include: p.branches.clone(), exclude: Vec::new() }),
        schedule: raw
            .schedule
            .iter()
            .map(|s| Schedule {
                cron: s.cron.clone(),
                branch: s.branch.clone().unwrap_or_else(|| branches.integration.clone()),
                catch_up: s.catch_up,
            })
            .collect(),
        upstream: raw.upstream.as_ref().map(|u| {
            check_repo_name(c, "on.upstream.repo", &u.repo);
            if u.branch.value.trim().is_empty() {
                c.err(
                    u.branch.pos,
                    "on.upstream.branch is empty: name the upstream branch whose moves start this pipeline",
                );
            }
            UpstreamTrigger { repo: u.repo.value.clone(), branch: u.branch.value.clone() }
        }),
    };
    if t == Triggers::default() && !c.partial {
        c.err(on.pos, "'on' names no event: use push, pull_request, promotion, manual, schedule or upstream");
    }
    t
}

fn resources_model(c: &mut Checker, raw: &[RawResource]) -> Vec<ResourceRequest> {
    let mut out: Vec<ResourceRequest> = Vec::new();
    for r in raw {
        check_name(c, "pool", &r.pool);
        let count = r.count.as_ref().map_or(1, |n| n.value);
        if let Some(n) = &r.count
            && n.value == 0
        {
            c.err(n.pos, "a resource request needs a count of at least 1");
        }
        if out.iter().any(|o| o.pool == r.pool.value) {
            c.err(r.pool.pos, format!("pool '{}' is requested twice: ask once with the total count", r.pool.value));
        }
        out.push(ResourceRequest { pool: r.pool.value.clone(), count });
    }
    out
}

fn approvers(c: &mut Checker, from: Option<&RawApprovers>) -> Approvers {
    let Some(from) = from else { return Approvers::default() };
    for list in [&from.users, &from.teams] {
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        for u in list {
            if let Some(first) = seen.insert(&u.value, u.pos) {
                c.err(u.pos, format!("'{}' is listed twice (first at {first})", u.value));
            }
        }
    }
    Approvers {
        users: from.users.iter().map(|u| u.value.clone()).collect(),
        teams: from.teams.iter().map(|u| u.value.clone()).collect(),
    }
}

/// Approval counts no list of people can meet.
fn check_count(c: &mut Checker, count: &Spanned<u32>, who: &Approvers, what: &str) {
    if count.value == 0 {
        c.err(count.pos, format!("{what} needs at least 1 approval"));
    } else if who.teams.is_empty() && !who.users.is_empty() && count.value as usize > who.users.len() {
        c.err(
            count.pos,
            format!(
                "{what} asks for {} distinct approvals but only {} user{} may approve",
                count.value,
                who.users.len(),
                if who.users.len() == 1 { "" } else { "s" }
            ),
        );
    }
}

fn gate_model(c: &mut Checker, gate: &Spanned<RawGate>) -> Gate {
    let g = &gate.value;
    let from = approvers(c, g.from.as_ref());
    let approvals = match (&g.approvals, g.kind) {
        (Some(n), GateKind::Hold) => {
            c.err(n.pos, "'approvals' applies to approval gates; a hold is passed or failed by one person");
            1
        }
        (Some(n), GateKind::Approval) => {
            check_count(c, n, &from, "this gate");
            n.value
        }
        (None, _) => 1,
    };
    Gate {
        kind: g.kind,
        instructions: g.instructions.clone(),
        approvals,
        from,
        timeout: positive(c, gate.pos, "a gate's timeout", g.timeout),
        self_approval: g.self_approval,
    }
}

fn step_model(c: &mut Checker, s: &RawStep, service_names: &[&str]) -> Step {
    check_name(c, "step", &s.name);
    let action = match &s.gate {
        Some(gate) => {
            if let Some(image) = &s.image {
                c.err(image.pos, "a gate step runs no container: remove 'image'");
            }
            if let Some(commands) = &s.commands {
                c.err(commands.pos, "a gate step runs no container: remove 'commands'");
            }
            Action::Gate(gate_model(c, gate))
        }
        None => {
            let image = match &s.image {
                Some(i) if i.value.trim().is_empty() => {
                    c.err(i.pos, "'image' cannot be empty");
                    String::new()
                }
                Some(i) => i.value.clone(),
                None => {
                    // When values were left out as malformed, the image may have been one of them.
                    if !c.partial {
                        c.err(s.name.pos, format!("step '{}' needs an 'image' (or a 'gate')", s.name.value));
                    }
                    String::new()
                }
            };
            let commands = match &s.commands {
                Some(cmds) if cmds.value.0.iter().all(|l| l.trim().is_empty()) => {
                    c.err(cmds.pos, format!("step '{}' has no commands", s.name.value));
                    Vec::new()
                }
                Some(cmds) => cmds.value.0.clone(),
                None => {
                    if !c.partial {
                        c.err(s.name.pos, format!("step '{}' needs 'commands' (or a 'gate')", s.name.value));
                    }
                    Vec::new()
                }
            };
            Action::Run { image, commands }
        }
    };
    for secret in &s.secrets {
        if !is_env_name(&secret.value) {
            c.err(
                secret.pos,
                format!("invalid secret name '{}': secrets are named like environment variables", secret.value),
            );
        }
    }
    if let Some(w) = &s.workdir
        && (w.value.starts_with('/') || w.value.split('/').any(|part| part == ".."))
    {
        c.err(w.pos, "'workdir' is relative to the workspace and stays inside it");
    }
    let retry = match &s.retry {
        None => RetryPolicy::default(),
        Some(r) => {
            if r.count.value > MAX_RETRIES {
                c.err(r.count.pos, format!("at most {MAX_RETRIES} retries"));
            }
            let mut on = r.on.clone();
            on.sort();
            on.dedup();
            if on.is_empty() && r.exit_codes.is_empty() {
                on.push(RetryOn::Infrastructure);
            }
            RetryPolicy { count: r.count.value, on, exit_codes: r.exit_codes.clone() }
        }
    };
    let limits = match &s.limits {
        None => Limits::default(),
        Some(l) => {
            if let Some(cpus) = &l.cpus
                && !(cpus.value > 0.0 && cpus.value <= 1024.0)
            {
                c.err(cpus.pos, "'cpus' must be more than 0");
            }
            if let Some(pids) = &l.pids
                && pids.value < 8
            {
                c.err(pids.pos, "'pids' must be at least 8: a shell and its commands need a few processes");
            }
            Limits {
                memory: l.memory.as_ref().map(|m| m.value),
                cpus: l.cpus.as_ref().map(|x| x.value),
                pids: l.pids.as_ref().map(|x| x.value),
            }
        }
    };
    let services = match &s.services {
        None => service_names.iter().map(|s| (*s).to_owned()).collect(),
        Some(list) => {
            for svc in list.iter().take(if c.partial { 0 } else { usize::MAX }) {
                if !service_names.contains(&svc.value.as_str()) {
                    c.err(
                        svc.pos,
                        format!(
                            "unknown service '{}'{}",
                            svc.value,
                            suggestion(&svc.value, service_names.iter().copied())
                        ),
                    );
                }
            }
            list.iter().map(|s| s.value.clone()).collect()
        }
    };
    let when = s.when.as_ref().map_or_else(Condition::default, |w| Condition {
        branches: w.branches.clone(),
        paths: w.paths.clone(),
        events: w.events.clone(),
        status: w.status.unwrap_or(RunStatus::OnSuccess),
    });
    Step {
        name: s.name.value.clone(),
        action,
        env: env_map(c, s.name.pos, &s.env),
        secrets: s.secrets.iter().map(|x| x.value.clone()).collect(),
        workdir: s.workdir.as_ref().map(|w| w.value.clone()),
        timeout: positive(c, s.name.pos, "'timeout'", s.timeout.as_ref().map(|t| t.value)),
        no_output_timeout: positive(c, s.name.pos, "'no_output_timeout'", s.no_output_timeout),
        retry,
        network: s.network.unwrap_or(Network::Bridge),
        limits,
        depends_on: s.depends_on.iter().map(|d| d.value.clone()).collect(),
        when,
        services: if s.gate.is_some() { Vec::new() } else { services },
        resources: resources_model(c, &s.resources),
        allow_failure: s.allow_failure,
        isolated: s.isolated,
        matrix: None,
        artifacts: artifacts_model(c, s),
        needs_artifacts: s
            .needs_artifacts
            .iter()
            .map(|n| NeedArtifacts { pipeline: n.value.pipeline.value.clone(), step: n.value.step.value.clone() })
            .collect(),
        cache: caches_model(c, s),
        runs_on: runs_on_model(c, s),
    }
}

/// A word an executor can put in a placement constraint or a queue name as it is: letters,
/// digits, `.`, `-` and `_`, starting with a letter or a digit, at most 128 characters.
fn is_placement_word(s: &str) -> bool {
    s.len() <= 128
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// A step's `runs_on`: an operating system and labels that executors can route by.
fn runs_on_model(c: &mut Checker, s: &RawStep) -> Option<RunsOn> {
    let keyed = s.runs_on.as_ref()?;
    let raw = &keyed.0.value;
    if s.gate.is_some() {
        c.err(keyed.0.pos, "a gate step runs nowhere: remove 'runs_on'");
    }
    // A malformed `labels` was left out and reported already: do not call the block empty too.
    if raw.os.is_none() && raw.labels.is_empty() && !c.partial {
        c.err(keyed.0.pos, "'runs_on' needs an 'os' or 'labels' (or remove it)");
    }
    if let Some(os) = &raw.os
        && (!is_placement_word(&os.value) || os.value.chars().any(|ch| ch.is_ascii_uppercase()))
    {
        c.err(os.pos, format!("invalid os '{}': write it in lower case, like linux, macos or windows", os.value));
    }
    for (key, value) in &raw.labels {
        if !is_placement_word(&key.value) {
            c.err(key.pos, format!("invalid label name '{}': use letters, digits, '.', '-' and '_'", key.value));
        }
        let bad_value = value.value.is_empty()
            || value.value.len() > 128
            || value.value.chars().any(|ch| ch.is_whitespace() || ch.is_control() || matches!(ch, '=' | '!' | ','));
        if bad_value {
            c.err(
                value.pos,
                format!(
                    "invalid value '{}' of label '{}': it cannot be empty or hold spaces, '=', '!' or ','",
                    value.value, key.value
                ),
            );
        }
    }
    Some(RunsOn {
        os: raw.os.as_ref().map(|o| o.value.clone()),
        labels: raw.labels.iter().map(|(k, v)| (k.value.clone(), v.value.clone())).collect(),
    })
}

/// A step's caches: keys that parse, relative paths, and a container step to fill them.
fn caches_model(c: &mut Checker, s: &RawStep) -> Vec<Cache> {
    let mut out = Vec::new();
    for raw in &s.cache {
        let r = &raw.value;
        if s.gate.is_some() {
            c.err(raw.pos, "a gate step runs no container, so it fills no cache: remove 'cache'");
        }
        let key = match parse_cache_key(&r.key.value) {
            Ok(key) => key,
            Err(message) => {
                c.err(r.key.pos, message);
                Vec::new()
            }
        };
        if r.paths.value.is_empty() {
            c.err(r.paths.pos, "'paths' names nothing to cache: list directories of the workspace, such as .cache/pip");
        }
        for p in r.paths.value.iter().chain(&r.restore_keys) {
            if p.value.trim().is_empty() {
                c.err(p.pos, "an empty value caches nothing");
            }
        }
        for p in &r.paths.value {
            if p.value.starts_with('/') || p.value.split('/').any(|part| part == "..") {
                c.err(p.pos, format!("'{}' leaves the workspace: cache paths are relative to it", p.value));
            }
        }
        out.push(Cache {
            key,
            paths: r.paths.value.iter().map(|p| p.value.trim_end_matches('/').to_owned()).collect(),
            restore_keys: r.restore_keys.iter().map(|k| k.value.clone()).collect(),
        });
    }
    out
}

/// A step's `artifacts`: relative paths, a positive expiry, and a container step to make them.
fn artifacts_model(c: &mut Checker, s: &RawStep) -> Option<ArtifactPaths> {
    let keyed = &s.artifacts.as_ref()?.0;
    let a = &keyed.value;
    if s.gate.is_some() {
        c.err(keyed.pos, "a gate step runs no container, so it makes no artifacts: remove 'artifacts'");
    }
    if a.paths.value.is_empty() {
        c.err(a.paths.pos, "'paths' names no file: list globs relative to the workspace, such as dist/**");
    }
    for p in &a.paths.value {
        let text = p.value.as_str();
        if text.starts_with('/') || text.split('/').any(|part| part == "..") {
            c.err(p.pos, format!("'{text}' leaves the workspace: artifact paths are relative to it"));
        }
    }
    let expire = match &a.expire {
        Some(e) => positive(c, e.pos, "'expire'", Some(e.value)).unwrap_or(DEFAULT_ARTIFACT_EXPIRY),
        None => DEFAULT_ARTIFACT_EXPIRY,
    };
    Some(ArtifactPaths { paths: a.paths.value.iter().map(|p| p.value.clone()).collect(), expire })
}

/// Every `needs_artifacts` names another pipeline of the spec and a step of it that keeps
/// artifacts. Steps of the same build share their workspace, so a pipeline never asks itself.
fn check_needs_artifacts(c: &mut Checker, raw: &RawSpec, pipelines: &[Pipeline]) {
    let names: Vec<&str> = pipelines.iter().map(|p| p.name.as_str()).collect();
    for (name, pipeline) in &raw.pipelines {
        for step in &pipeline.steps.value {
            for need in &step.needs_artifacts {
                let (p, s) = (&need.value.pipeline, &need.value.step);
                if p.value == name.value {
                    c.err(
                        p.pos,
                        format!(
                            "'{}' is this step's own pipeline: its steps share the workspace, so use depends_on",
                            p.value
                        ),
                    );
                    continue;
                }
                let Some(source) = pipelines.iter().find(|x| x.name == p.value) else {
                    if !c.partial {
                        c.err(
                            p.pos,
                            format!("unknown pipeline '{}'{}", p.value, suggestion(&p.value, names.iter().copied())),
                        );
                    }
                    continue;
                };
                match source.steps.iter().find(|x| x.name == s.value) {
                    Some(found) if found.artifacts.is_none() => c.err(
                        s.pos,
                        format!("step '{}' of pipeline '{}' keeps no artifacts: give it 'artifacts'", s.value, p.value),
                    ),
                    Some(_) => {}
                    None if c.partial => {}
                    None => c.err(
                        s.pos,
                        format!(
                            "pipeline '{}' has no step '{}'{}",
                            p.value,
                            s.value,
                            suggestion(&s.value, source.steps.iter().map(|x| x.name.as_str()))
                        ),
                    ),
                }
            }
        }
    }
}

/// A checked step as the cells of its matrix (itself when it has none).
fn expand_step(c: &mut Checker, s: &RawStep, step: Step) -> Vec<Step> {
    let matrix = s.matrix.as_ref().map(|m| &m.0);
    if let Some(ff) = &s.fail_fast
        && matrix.is_none()
    {
        c.err(ff.pos, "'fail_fast' applies to a step with a 'matrix'");
    }
    if let (Some(m), Some(_)) = (matrix, &s.gate) {
        c.err(m.pos, "a gate cannot have a matrix: people answer it once");
        return vec![step];
    }
    let image_pos = s.image.as_ref().map_or(s.name.pos, |i| i.pos);
    let fail_fast = s.fail_fast.as_ref().is_some_and(|f| f.value);
    let name = step.name.clone();
    match super::matrix::expand(step, matrix, fail_fast, image_pos, c.max_cells) {
        Ok(cells) => cells,
        Err(diags) => {
            c.diags.extend(diags);
            // One step stands for the matrix, so that references to it still resolve.
            vec![Step { name, ..step_placeholder() }]
        }
    }
}

fn step_placeholder() -> Step {
    Step {
        name: String::new(),
        action: Action::Run { image: String::new(), commands: Vec::new() },
        env: BTreeMap::new(),
        secrets: Vec::new(),
        workdir: None,
        timeout: None,
        no_output_timeout: None,
        retry: RetryPolicy::default(),
        network: Network::Bridge,
        limits: Limits::default(),
        depends_on: Vec::new(),
        when: Condition::default(),
        services: Vec::new(),
        resources: Vec::new(),
        allow_failure: false,
        isolated: false,
        matrix: None,
        artifacts: None,
        needs_artifacts: Vec::new(),
        cache: Vec::new(),
        runs_on: None,
    }
}

/// `depends_on` naming a matrix step stands for every one of its cells.
fn depend_on_cells(steps: &mut [Step]) {
    let mut cells: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in steps.iter() {
        if let Some(m) = &s.matrix {
            cells.entry(m.step.clone()).or_default().push(s.name.clone());
        }
    }
    if cells.is_empty() {
        return;
    }
    for s in steps.iter_mut() {
        s.depends_on =
            s.depends_on.iter().flat_map(|d| cells.get(d).cloned().unwrap_or_else(|| vec![d.clone()])).collect();
    }
}

/// Unknown names in `depends_on`, and cycles, each reported once.
fn check_graph(c: &mut Checker, steps: &[RawStep]) {
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.name.value.as_str(), i)).collect();
    let names: Vec<&str> = steps.iter().map(|s| s.name.value.as_str()).collect();
    for s in steps {
        for d in s.depends_on.iter().take(if c.partial { 0 } else { usize::MAX }) {
            if !index.contains_key(d.value.as_str()) {
                c.err(
                    d.pos,
                    format!("unknown step '{}' in depends_on{}", d.value, suggestion(&d.value, names.iter().copied())),
                );
            }
        }
    }
    // Depth-first search with colours; a grey node reached again closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour = vec![Colour::White; steps.len()];
    for start in 0..steps.len() {
        if colour[start] != Colour::White {
            continue;
        }
        let mut path: Vec<usize> = vec![start];
        let mut edges: Vec<usize> = vec![0];
        colour[start] = Colour::Grey;
        while let Some(&node) = path.last() {
            let depth = path.len() - 1;
            let deps = &steps[node].depends_on;
            if edges[depth] < deps.len() {
                let dep = &deps[edges[depth]];
                edges[depth] += 1;
                let Some(&next) = index.get(dep.value.as_str()) else { continue };
                match colour[next] {
                    Colour::White => {
                        colour[next] = Colour::Grey;
                        path.push(next);
                        edges.push(0);
                    }
                    Colour::Grey => {
                        let from = path.iter().position(|&n| n == next).unwrap_or(0);
                        let mut cycle: Vec<&str> = path[from..].iter().map(|&n| names[n]).collect();
                        cycle.push(names[next]);
                        c.err(dep.pos, format!("steps depend on each other in a cycle: {}", cycle.join(" -> ")));
                    }
                    Colour::Black => {}
                }
            } else {
                colour[node] = Colour::Black;
                path.pop();
                edges.pop();
            }
        }
    }
}

fn pipeline_model(
    c: &mut Checker,
    branches: &Branches,
    name: &Spanned<String>,
    p: &RawPipeline,
    names: &[&str],
) -> Pipeline {
    check_name(c, "pipeline", name);
    let triggers = triggers_model(c, branches, name, p.on.as_ref());
    let kind = p.kind.unwrap_or(if matches!(name.value.as_str(), "staging" | "production") {
        PipelineKind::Deploy
    } else {
        PipelineKind::Test
    });
    let service_names: Vec<&str> = p.services.keys().map(|k| k.value.as_str()).collect();
    let mut services = Vec::new();
    for (svc_name, svc) in &p.services {
        let dns_ok = !svc_name.value.is_empty()
            && svc_name.value.len() <= 63
            && svc_name.value.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
            && !svc_name.value.starts_with('-');
        if !dns_ok {
            c.err(svc_name.pos, format!("invalid service name '{}': steps reach it as a host name, so use lower-case letters, digits and '-'", svc_name.value));
        }
        if svc.image.value.trim().is_empty() {
            c.err(svc.image.pos, "'image' cannot be empty");
        }
        let ready = svc.ready.as_ref().map(|r| match r {
            RawReadiness::Command(cmd) => {
                Readiness { command: cmd.clone(), interval: Duration::from_secs(1), timeout: Duration::from_secs(60) }
            }
            RawReadiness::Full(f) => Readiness {
                command: f.command.clone(),
                interval: positive(c, svc_name.pos, "a readiness interval", f.interval)
                    .unwrap_or(Duration::from_secs(1)),
                timeout: positive(c, svc_name.pos, "a readiness timeout", f.timeout).unwrap_or(Duration::from_secs(60)),
            },
        });
        services.push(Service {
            name: svc_name.value.clone(),
            image: svc.image.value.clone(),
            env: env_map(c, svc_name.pos, &svc.env),
            command: svc.command.as_ref().map(|x| x.0.clone()),
            ready,
        });
    }
    let raw_steps = &p.steps.value;
    if raw_steps.is_empty() && !c.partial {
        c.err(p.steps.pos, format!("pipeline '{}' has no steps", name.value));
    }
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    for s in raw_steps {
        if let Some(first) = seen.insert(&s.name.value, s.name.pos) {
            c.err(s.name.pos, format!("duplicate step name '{}' (first at line {})", s.name.value, first.line));
        }
    }
    check_graph(c, raw_steps);
    let mut steps: Vec<Step> = Vec::with_capacity(raw_steps.len());
    for s in raw_steps {
        let step = step_model(c, s, &service_names);
        steps.extend(expand_step(c, s, step));
    }
    depend_on_cells(&mut steps);
    let inputs = inputs_model(c, p);
    let deliverables = deliverables_model(c, name, p, names);
    Pipeline {
        name: name.value.clone(),
        kind,
        triggers,
        env: env_map(c, name.pos, &p.env),
        services,
        resources: resources_model(c, &p.resources),
        steps,
        deliverables,
        timeout: positive(c, name.pos, "a pipeline's timeout", p.timeout.as_ref().map(|t| t.value)),
        inputs,
    }
}

/// The deliverables of a pipeline. `from` names another pipeline of the spec; a promoted
/// deliverable is not built, so the keys that say how to build it are refused beside it.
fn deliverables_model(c: &mut Checker, name: &Spanned<String>, p: &RawPipeline, names: &[&str]) -> Vec<Deliverable> {
    if !p.deliverables.is_empty()
        && let Some(step) = p.steps.value.iter().find(|s| s.name.value == PUBLISH_STEP)
    {
        c.err(
            step.name.pos,
            format!("the step name '{PUBLISH_STEP}' is taken: a pipeline with deliverables publishes them in a step of that name"),
        );
    }
    let from_model = |c: &mut Checker, from: &Option<Spanned<String>>| -> Option<String> {
        let f = from.as_ref()?;
        if f.value == name.value {
            c.err(f.pos, format!("a deliverable cannot be promoted from its own pipeline '{}'", f.value));
        } else if !c.partial && !names.contains(&f.value.as_str()) {
            c.err(f.pos, format!("unknown pipeline '{}'{}", f.value, suggestion(&f.value, names.iter().copied())));
        }
        Some(f.value.clone())
    };
    p.deliverables
        .iter()
        .map(|d| match d {
            RawDeliverable::Pypi(x) => {
                secret_name(c, &x.credentials);
                if !(x.index.value.starts_with("https://") || x.index.value.starts_with("http://")) {
                    c.err(x.index.pos, "'index' must be an http(s) URL");
                }
                let from = from_model(c, &x.from);
                if let (Some(f), Some(_)) = (&x.from, &x.files) {
                    c.err(f.pos, "'files' and 'from' exclude each other: a promotion uploads the files the other pipeline published");
                }
                Deliverable::Pypi {
                    index: x.index.value.clone(),
                    credentials: x.credentials.value.clone(),
                    files: x.files.clone().unwrap_or_else(|| Glob::parse("dist/*").expect("dist/* is a valid glob")),
                    from,
                }
            }
            RawDeliverable::Docker(x) => {
                if let Some(cred) = &x.credentials {
                    secret_name(c, cred);
                }
                if x.image.value.trim().is_empty() || x.image.value.contains(char::is_whitespace) {
                    c.err(x.image.pos, format!("invalid image name '{}'", x.image.value));
                }
                for t in &x.tags {
                    if t.value.trim().is_empty() {
                        c.err(t.pos, "an image tag cannot be empty");
                    }
                }
                let from = from_model(c, &x.from);
                if let Some(f) = &x.from
                    && (x.context.is_some() || x.dockerfile.is_some())
                {
                    c.err(f.pos, "'context' and 'dockerfile' exclude 'from': a promotion tags the image the other pipeline pushed");
                }
                Deliverable::Docker {
                    image: x.image.value.clone(),
                    context: x.context.clone().unwrap_or_else(|| ".".into()),
                    dockerfile: x.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into()),
                    tags: if x.tags.is_empty() {
                        vec!["{{commit}}".into()]
                    } else {
                        x.tags.iter().map(|t| t.value.clone()).collect()
                    },
                    credentials: x.credentials.as_ref().map(|c| c.value.clone()),
                    from,
                }
            }
        })
        .collect()
}

fn inputs_model(c: &mut Checker, p: &RawPipeline) -> Vec<InputDecl> {
    let mut out: Vec<InputDecl> = Vec::new();
    if !p.inputs.is_empty() && p.on.as_ref().is_some_and(|on| on.value.manual.is_none()) {
        let first = p.inputs.keys().next().map(|k| k.pos).unwrap_or_default();
        c.err(first, "inputs are given when a pipeline is started by hand: add 'manual' to its 'on'");
    }
    for (name, input) in &p.inputs {
        if !is_env_name(&name.value) {
            c.err(
                name.pos,
                format!(
                    "invalid input name '{}': steps read it as INPUT_<NAME>, so use letters, digits and '_'",
                    name.value
                ),
            );
        }
        if let Some(other) = out.iter().find(|o| o.name.eq_ignore_ascii_case(&name.value)) {
            c.err(
                name.pos,
                format!("input '{}' and input '{}' would both be {}", other.name, name.value, other.env_name()),
            );
        }
        let options: Vec<String> = input.options.iter().map(|o| o.value.clone()).collect();
        match input.kind.value {
            InputType::Choice if options.is_empty() => {
                c.err(input.kind.pos, format!("input '{}' is a choice: list its 'options'", name.value));
            }
            InputType::Choice => {
                let mut seen: HashMap<&str, Pos> = HashMap::new();
                for o in &input.options {
                    if let Some(first) = seen.insert(&o.value, o.pos) {
                        c.err(o.pos, format!("option '{}' is listed twice (first at {first})", o.value));
                    }
                }
            }
            _ if !options.is_empty() => {
                let pos = input.options.first().map_or(input.kind.pos, |o| o.pos);
                c.err(pos, format!("'options' belong to a choice; input '{}' is not one", name.value));
            }
            _ => {}
        }
        let decl = InputDecl {
            name: name.value.clone(),
            kind: input.kind.value,
            description: input.description.clone(),
            default: input.default.as_ref().map(|d| d.value.0.clone()),
            required: input.required,
            options,
        };
        if let Some(default) = &input.default {
            if input.required {
                c.err(default.pos, format!("input '{}' is required, so its default would never be used", name.value));
            }
            if let Err(why) = decl.check(&default.value.0) {
                c.err(default.pos, format!("the default of input '{}' is invalid: {why}", name.value));
            }
        }
        out.push(decl);
    }
    // Inputs reach steps only under their own names, so the spec's variables keep their values.
    let names: Vec<String> = out.iter().map(InputDecl::env_name).collect();
    let clash = |env: &IndexMap<String, EnvValue>, at: Pos, c: &mut Checker| {
        for k in env.keys().filter(|k| names.contains(k)) {
            c.err(at, format!("'{k}' is where an input's value goes: rename the variable"));
        }
    };
    if let Some(first) = p.inputs.keys().next() {
        clash(&p.env, first.pos, c);
    }
    for s in &p.steps.value {
        clash(&s.env, s.name.pos, c);
    }
    out
}

fn secret_name(c: &mut Checker, s: &Spanned<String>) {
    if !is_env_name(&s.value) {
        c.err(s.pos, format!("invalid secret name '{}': secrets are named like environment variables", s.value));
    }
}

fn pipeline_refs(c: &mut Checker, refs: &[Spanned<String>], names: &[&str]) -> Vec<String> {
    for r in refs.iter().take(if c.partial { 0 } else { usize::MAX }) {
        if !names.contains(&r.value.as_str()) {
            c.err(r.pos, format!("unknown pipeline '{}'{}", r.value, suggestion(&r.value, names.iter().copied())));
        }
    }
    refs.iter().map(|r| r.value.clone()).collect()
}

fn promotion_model(c: &mut Checker, branches: &Branches, p: &RawPromotion, names: &[&str]) -> PromotionPolicy {
    let from = p.from.as_ref().map_or(branches.integration.clone(), |f| f.value.clone());
    let to = branches.release.clone();
    if from == to {
        let pos = p.to.as_ref().or(p.from.as_ref()).map(|s| s.pos).unwrap_or_default();
        c.err(pos, format!("promotion goes from '{from}' to itself"));
    }
    let requires = p.requires.as_ref();
    let pipelines = requires.map(|r| pipeline_refs(c, &r.pipelines, names)).unwrap_or_default();
    let (approvals, approvers, self_approval, expires) = match requires.and_then(|r| r.approvals.as_ref()) {
        None => (0, Approvers::default(), false, None),
        Some(a) => {
            let who = approvers(c, a.from.as_ref());
            check_count(c, &a.count, &who, "promotion");
            let expires = positive(c, a.count.pos, "an approval's expiry", a.expires);
            (a.count.value, who, a.self_approval, expires)
        }
    };
    let mut downstream: Vec<String> = Vec::new();
    for repo in requires.map(|r| r.downstream.as_slice()).unwrap_or_default() {
        check_repo_name(c, "promotion.requires.downstream", repo);
        if downstream.contains(&repo.value) {
            c.err(repo.pos, format!("'{}' is listed twice in promotion.requires.downstream", repo.value));
        } else {
            downstream.push(repo.value.clone());
        }
    }
    PromotionPolicy { from, to, pipelines, approvals, approvers, self_approval, expires, downstream }
}

/// A repository named as the forge names it: `owner/name`, two non-empty parts of letters,
/// digits, `-`, `_` and `.`, which is also what build ids and status names can carry.
fn check_repo_name(c: &mut Checker, key: &str, repo: &Spanned<String>) {
    let ok_part = |p: &str| {
        !p.is_empty() && p != "." && p != ".." && p.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    };
    let valid = match repo.value.split_once('/') {
        Some((owner, name)) => ok_part(owner) && ok_part(name),
        None => false,
    };
    if !valid {
        c.err(repo.pos, format!("{key}: '{}' is not a repository: write it as owner/name (acme/api)", repo.value));
    }
}

fn merge_model(c: &mut Checker, branches: &Branches, m: &RawMerge, names: &[&str]) -> MergePolicy {
    if let Some(ff) = &m.fast_forward_only
        && !ff.value
    {
        c.err(ff.pos, "cib merges by fast-forward only; 'fast_forward_only: false' is not supported");
    }
    let requires = m.requires.as_ref();
    MergePolicy {
        into: branches.integration.clone(),
        fast_forward_only: true,
        pipelines: requires.map(|r| pipeline_refs(c, &r.pipelines, names)).unwrap_or_default(),
        reviews: requires.map_or(0, |r| r.reviews),
        up_to_date: requires.and_then(|r| r.up_to_date).unwrap_or(true),
    }
}
