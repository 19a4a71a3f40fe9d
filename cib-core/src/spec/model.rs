//! The validated spec: what the engine runs. Every reference in it resolves, every name is
//! unique, the step graph has no cycle, and every default is filled in.

use std::collections::BTreeMap;

use serde::Serialize;

pub use super::matrix::MatrixCell;
pub use super::raw::{EventKind, GateKind, InputType, Network, PipelineKind, RetryOn, RunStatus};
use super::types::{Cron, Duration, Glob, Memory};

/// A checked build spec.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spec {
    pub version: u32,
    pub pipelines: Vec<Pipeline>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergePolicy>,
}

impl Spec {
    /// The branch pull requests merge into and promotions come from: `merge.into`, else
    /// `promotion.from`, else `master`.
    pub fn integration_branch(&self) -> &str {
        self.merge
            .as_ref()
            .map(|m| m.into.as_str())
            .or_else(|| self.promotion.as_ref().map(|p| p.from.as_str()))
            .unwrap_or(super::DEFAULT_INTEGRATION_BRANCH)
    }

    pub fn pipeline(&self, name: &str) -> Option<&Pipeline> {
        self.pipelines.iter().find(|p| p.name == name)
    }

    /// The pipelines an event starts, in the order the spec lists them.
    pub fn plan<'s>(&'s self, event: &TriggerEvent) -> Vec<&'s Pipeline> {
        self.pipelines.iter().filter(|p| p.triggers.matches(event)).collect()
    }

    /// The pipelines that a move of `branch` in the repository `repo` starts here (`on:
    /// upstream` naming exactly that repository and branch), in the order the spec lists them.
    pub fn downstream_of<'s>(&'s self, repo: &str, branch: &str) -> Vec<&'s Pipeline> {
        self.pipelines
            .iter()
            .filter(|p| p.triggers.upstream.as_ref().is_some_and(|u| u.repo == repo && u.branch == branch))
            .collect()
    }
}

/// A checked pipeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pipeline {
    pub name: String,
    pub kind: PipelineKind,
    pub triggers: Triggers,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceRequest>,
    /// Steps in the order written; `depends_on` gives the graph.
    pub steps: Vec<Step>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deliverables: Vec<Deliverable>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Values a person may give when starting the pipeline by hand, in the order written.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputDecl>,
}

/// A declared input of a manually started pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputDecl {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: InputType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    /// The allowed values of a `choice`; empty for other types.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl InputDecl {
    /// The environment variable a step reads the input from: `INPUT_` and the name upper-cased.
    pub fn env_name(&self) -> String {
        input_env_name(&self.name)
    }

    /// Why `value` is not a valid value of this input, if it is not.
    pub fn check(&self, value: &str) -> Result<(), String> {
        match self.kind {
            InputType::String => Ok(()),
            InputType::Bool if matches!(value, "true" | "false") => Ok(()),
            InputType::Bool => Err(format!("'{value}' is not a bool: use true or false")),
            InputType::Choice if self.options.iter().any(|o| o == value) => Ok(()),
            InputType::Choice => Err(format!("'{value}' is not one of {}", self.options.join(", "))),
        }
    }
}

/// `INPUT_` and the input's name upper-cased.
pub fn input_env_name(name: &str) -> String {
    format!("INPUT_{}", name.to_ascii_uppercase())
}

impl Pipeline {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The steps a name stands for: the step of that name, or every cell of the matrix step
    /// written with that name.
    pub fn steps_named<'p>(&'p self, name: &'p str) -> impl Iterator<Item = &'p Step> + 'p {
        self.steps.iter().filter(move |s| s.name == name || s.matrix.as_ref().is_some_and(|m| m.step == name))
    }

    /// `names` and every step they depend on, directly or not, in spec order. A matrix step's
    /// name as written stands for all of its cells.
    pub fn closure(&self, names: &[&str]) -> Vec<&Step> {
        let mut wanted: Vec<&str> = names.to_vec();
        let mut keep = std::collections::BTreeSet::new();
        while let Some(n) = wanted.pop() {
            for step in self.steps_named(n) {
                if keep.insert(step.name.clone()) {
                    wanted.extend(step.depends_on.iter().map(String::as_str));
                }
            }
        }
        self.steps.iter().filter(|s| keep.contains(&s.name)).collect()
    }
}

/// What starts a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Triggers {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<PushTrigger>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<PullRequestTrigger>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotion: Option<BranchFilter>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manual: Option<BranchFilter>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<Schedule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamTrigger>,
}

/// Another repository's branch whose moves start a pipeline (`on: upstream`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTrigger {
    pub repo: String,
    pub branch: String,
}

/// An event as trigger matching sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TriggerEvent {
    pub kind: EventKind,
    /// The branch pushed, promoted or built; for a pull request, its base branch.
    pub branch: Option<String>,
    /// The tag pushed, for a tag push.
    pub tag: Option<String>,
    /// Files changed, when known. `None` means unknown, and path filters then let the event through.
    pub changed_paths: Option<Vec<String>>,
}

impl TriggerEvent {
    pub fn push(branch: &str) -> Self {
        TriggerEvent { kind: EventKind::Push, branch: Some(branch.to_owned()), tag: None, changed_paths: None }
    }

    pub fn pull_request(base: &str) -> Self {
        TriggerEvent { kind: EventKind::PullRequest, branch: Some(base.to_owned()), tag: None, changed_paths: None }
    }

    pub fn of(kind: EventKind, branch: &str) -> Self {
        TriggerEvent { kind, branch: Some(branch.to_owned()), tag: None, changed_paths: None }
    }
}

impl Triggers {
    pub fn matches(&self, event: &TriggerEvent) -> bool {
        let branch = event.branch.as_deref();
        match event.kind {
            EventKind::Push => self.push.as_ref().is_some_and(|p| p.matches(event)),
            EventKind::PullRequest => self.pull_request.as_ref().is_some_and(|p| {
                branch.is_some_and(|b| p.branches.matches(b)) && p.paths.matches(event.changed_paths.as_deref())
            }),
            // A promotion moves its branch by fast-forward, which is a push to it: pipelines that
            // build pushes to that branch run, and `on: promotion` runs for promotions only.
            EventKind::Promotion => {
                self.promotion.as_ref().is_some_and(|f| branch.is_some_and(|b| f.matches(b)))
                    || self.push.as_ref().is_some_and(|p| p.matches(event))
            }
            EventKind::Manual => self.manual.as_ref().is_some_and(|f| branch.is_none_or(|b| f.matches(b))),
            EventKind::Schedule => !self.schedule.is_empty(),
            // Which upstream moved is not part of the event: the server picks the pipelines
            // with `Spec::downstream_of`, and this says only that the pipeline has one.
            EventKind::Upstream => self.upstream.is_some(),
        }
    }
}

/// Branch globs with exclusions; no `include` list means every branch.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct BranchFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include: Option<Vec<Glob>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<Glob>,
}

impl BranchFilter {
    pub fn matches(&self, branch: &str) -> bool {
        let included = self.include.as_ref().is_none_or(|globs| globs.iter().any(|g| g.is_match(branch)));
        included && !self.exclude.iter().any(|g| g.is_match(branch))
    }
}

/// Path globs: at least one changed file must match `include` (when given), and not every
/// changed file may match `exclude`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct PathFilter {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<Glob>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<Glob>,
}

impl PathFilter {
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Unknown changes (`None`) pass: building too much is better than missing a build.
    pub fn matches(&self, changed: Option<&[String]>) -> bool {
        let Some(changed) = changed else { return true };
        let included = self.include.is_empty() || changed.iter().any(|p| self.include.iter().any(|g| g.is_match(p)));
        let all_ignored =
            !self.exclude.is_empty() && changed.iter().all(|p| self.exclude.iter().any(|g| g.is_match(p)));
        included && !all_ignored
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PushTrigger {
    pub branches: BranchFilter,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Glob>,
    #[serde(skip_serializing_if = "PathFilter::is_empty")]
    pub paths: PathFilter,
}

impl PushTrigger {
    fn matches(&self, event: &TriggerEvent) -> bool {
        let target = match (&event.tag, &event.branch) {
            (Some(tag), _) => self.tags.iter().any(|g| g.is_match(tag)),
            (None, Some(branch)) => self.branches.matches(branch),
            (None, None) => false,
        };
        target && self.paths.matches(event.changed_paths.as_deref())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PullRequestTrigger {
    /// Filter over the pull request's base branch.
    pub branches: BranchFilter,
    #[serde(skip_serializing_if = "PathFilter::is_empty")]
    pub paths: PathFilter,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub cron: Cron,
    pub branch: String,
    /// Missed slots run once when the server is back, rather than never.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub catch_up: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    pub name: String,
    pub image: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<Readiness>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Readiness {
    pub command: String,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceRequest {
    pub pool: String,
    pub count: u32,
}

/// A checked step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub name: String,
    pub action: Action,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_output_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub network: Network,
    pub limits: Limits,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(skip_serializing_if = "Condition::is_always")]
    pub when: Condition,
    /// The services this step waits for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceRequest>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_failure: bool,
    /// A container of its own: never run in a warm container shared with other steps.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
    /// The matrix this step is a cell of, when its spec gave it a `matrix`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matrix: Option<MatrixCell>,
    /// What of the workspace is kept after the step succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<ArtifactPaths>,
    /// Other pipelines' artifacts of the same commit, unpacked before the step runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub needs_artifacts: Vec<NeedArtifacts>,
    /// Directories kept between builds under a key.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cache: Vec<Cache>,
    /// Where the step runs, when its spec says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_on: Option<RunsOn>,
}

/// Where a step runs: `runs_on: {os: macos}` or `runs_on: {labels: {gpu: "yes"}}`.
///
/// Checked when the spec is read: an `os` is a lower-case word, label keys are words of
/// letters, digits, `.`, `-` and `_`, and values have no spaces, `=`, `!` or `,`, so that an
/// executor can turn each into a placement constraint (`node.labels.gpu==yes`) or a queue name
/// without quoting. At least one of the two is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunsOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A step's cache: the key as parts (resolved against the workspace before the step), the
/// workspace paths it holds, and the prefixes to fall back on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cache {
    pub key: Vec<CacheKeyPart>,
    pub paths: Vec<String>,
    pub restore_keys: Vec<String>,
}

/// A piece of a cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKeyPart {
    Text(String),
    /// `{{ checksum 'path' }}`: the SHA-256 of a workspace file, in hex.
    Checksum(String),
}

/// Reads a cache key template: text with `{{ checksum 'path' }}` (single or double quotes)
/// for the SHA-256 of a workspace file. Anything else between braces is an error that says
/// what is allowed.
pub fn parse_cache_key(template: &str) -> Result<Vec<CacheKeyPart>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(CacheKeyPart::Text(rest[..open].to_owned()));
        }
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or("a '{{' in the key is never closed with '}}'")?;
        let inner = after[..close].trim();
        let arg = inner
            .strip_prefix("checksum")
            .map(str::trim)
            .and_then(|a| {
                a.strip_prefix('\'')
                    .and_then(|a| a.strip_suffix('\''))
                    .or_else(|| a.strip_prefix('"').and_then(|a| a.strip_suffix('"')))
            })
            .ok_or_else(|| format!("'{{{{ {inner} }}}}' is not a key function: write {{{{ checksum 'path' }}}}"))?;
        if arg.is_empty() || arg.starts_with('/') || arg.split('/').any(|p| p == "..") {
            return Err(format!("checksum '{arg}' must name a file inside the workspace"));
        }
        parts.push(CacheKeyPart::Checksum(arg.to_owned()));
        rest = &after[close + 2..];
    }
    if rest.contains("}}") {
        return Err("a '}}' in the key has no '{{' before it".into());
    }
    if !rest.is_empty() {
        parts.push(CacheKeyPart::Text(rest.to_owned()));
    }
    if parts.is_empty() {
        return Err("a cache key cannot be empty".into());
    }
    Ok(parts)
}

/// How long artifacts are kept when the spec does not say.
pub const DEFAULT_ARTIFACT_EXPIRY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The files a step keeps, matched against paths relative to the workspace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArtifactPaths {
    pub paths: Vec<Glob>,
    pub expire: Duration,
}

/// The artifacts of `step` of `pipeline`, from a build of the same commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NeedArtifacts {
    pub pipeline: String,
    pub step: String,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Run { image: String, commands: Vec<String> },
    Gate(Gate),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gate {
    pub kind: GateKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    pub approvals: u32,
    pub from: Approvers,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// The person who started the build and the commit's author may approve.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub self_approval: bool,
}

/// Who may approve. Both lists empty means anyone with write access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Approvers {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub teams: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct RetryPolicy {
    /// Extra attempts after the first.
    pub count: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exit_codes: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// When a step runs at all.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Condition {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branches: Option<Vec<Glob>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<Glob>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventKind>,
    pub status: RunStatus,
}

impl Default for Condition {
    fn default() -> Self {
        Condition { branches: None, paths: Vec::new(), events: Vec::new(), status: RunStatus::OnSuccess }
    }
}

impl Condition {
    pub fn is_always(&self) -> bool {
        *self == Condition::default()
    }

    /// Whether the event's branch, paths and kind let the step run (status is the engine's part).
    pub fn admits(&self, event: &TriggerEvent) -> bool {
        let branch_ok = match (&self.branches, &event.branch) {
            (None, _) => true,
            (Some(globs), Some(b)) => globs.iter().any(|g| g.is_match(b)),
            (Some(_), None) => false,
        };
        let events_ok = self.events.is_empty() || self.events.contains(&event.kind);
        let paths_ok =
            PathFilter { include: self.paths.clone(), exclude: Vec::new() }.matches(event.changed_paths.as_deref());
        branch_ok && events_ok && paths_ok
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Deliverable {
    Pypi {
        index: String,
        credentials: String,
        files: Glob,
        /// The pipeline whose files for the same commit are uploaded instead of the workspace's.
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    Docker {
        image: String,
        context: String,
        dockerfile: String,
        tags: Vec<String>,
        credentials: Option<String>,
        /// The pipeline whose image for the same commit is tagged instead of building one.
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
}

impl Deliverable {
    /// `pypi` or `docker`.
    pub fn kind(&self) -> &'static str {
        match self {
            Deliverable::Pypi { .. } => "pypi",
            Deliverable::Docker { .. } => "docker",
        }
    }

    /// A short name for messages: the index or the image.
    pub fn target(&self) -> &str {
        match self {
            Deliverable::Pypi { index, .. } => index,
            Deliverable::Docker { image, .. } => image,
        }
    }

    /// The pipeline this deliverable is promoted from, if it is promoted rather than built.
    pub fn from(&self) -> Option<&str> {
        match self {
            Deliverable::Pypi { from, .. } | Deliverable::Docker { from, .. } => from.as_deref(),
        }
    }

    /// The name of the secret holding its credentials, if any.
    pub fn credentials(&self) -> Option<&str> {
        match self {
            Deliverable::Pypi { credentials, .. } => Some(credentials),
            Deliverable::Docker { credentials, .. } => credentials.as_deref(),
        }
    }
}

/// The name of the synthetic step in which a pipeline's deliverables are published: its log
/// holds the build and upload output, and a step of that name is refused in a pipeline that
/// has deliverables.
pub const PUBLISH_STEP: &str = "publish";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromotionPolicy {
    pub from: String,
    pub to: String,
    pub pipelines: Vec<String>,
    pub approvals: u32,
    pub approvers: Approvers,
    pub self_approval: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<Duration>,
    /// Downstream repositories whose `on: upstream` pipelines must have passed on the commit.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub downstream: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergePolicy {
    pub into: String,
    pub fast_forward_only: bool,
    pub pipelines: Vec<String>,
    pub reviews: u32,
    pub up_to_date: bool,
}
