//! The spec as written: serde types read from `.cib.yml`, and the source of its JSON Schema.
//!
//! These types say what may be written; `validate` turns them into the checked model in
//! `model`. Every struct refuses unknown keys (the schema says `additionalProperties: false`)
//! but accepts keys starting with `x-`, which are ignored so that YAML anchors have a home.
//! Enums are externally tagged, since positions survive only through those.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};

pub use super::matrix::RawMatrix;
use super::types::{Commands, Cron, Duration, EnvValue, Glob, Keyed, Memory, Spanned};

/// Treats a key written with no value (`push:`) like an empty mapping (`push: {}`).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(Option::<T>::deserialize(d)?.unwrap_or_default()))
}

/// A cib build spec: the `.cib.yml` file at the root of a repository.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "cib build spec", extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Spec")]
pub struct RawSpec {
    /// The version of the spec format. Only `1` exists; it is the default.
    #[serde(default)]
    pub version: Option<Spanned<u32>>,
    /// The pipelines, by name. `test`, `staging` and `production` get default triggers for the
    /// master/production strategy when they have no `on`.
    pub pipelines: IndexMap<Spanned<String>, RawPipeline>,
    /// What a promotion from one branch to another requires (master to production).
    #[serde(default)]
    pub promotion: Option<RawPromotion>,
    /// What merging a pull request requires.
    #[serde(default)]
    pub merge: Option<RawMerge>,
}

/// A named pipeline: when it runs, and the steps it runs.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Pipeline")]
pub struct RawPipeline {
    /// The events that start this pipeline. Defaults exist for `test`, `staging` and `production`.
    #[serde(default, rename = "on")]
    pub on: Option<Spanned<RawTriggers>>,
    /// `test` pipelines are superseded by a newer push to the same branch or pull request;
    /// `deploy` pipelines are never cancelled by a push: they queue in order. Defaults to
    /// `deploy` for `staging` and `production`, `test` otherwise.
    #[serde(default)]
    pub kind: Option<PipelineKind>,
    /// Environment variables for every step.
    #[serde(default)]
    pub env: IndexMap<String, EnvValue>,
    /// Sidecar containers reachable from steps by their name.
    #[serde(default)]
    pub services: IndexMap<Spanned<String>, RawService>,
    /// Units requested from resource pools, held for the whole pipeline.
    #[serde(default)]
    pub resources: Vec<RawResource>,
    /// The steps. They run in parallel unless `depends_on` orders them.
    pub steps: Spanned<Vec<RawStep>>,
    /// What the pipeline publishes once every step has passed.
    #[serde(default)]
    pub deliverables: Vec<RawDeliverable>,
    /// Time limit for the whole pipeline. The server may set a default and a maximum.
    #[serde(default)]
    pub timeout: Option<Spanned<Duration>>,
    /// Values a person may give when starting the pipeline by hand (`on: manual`), by name.
    /// Steps see each as `INPUT_<NAME>`; nothing else given at a trigger reaches them.
    #[serde(default)]
    pub inputs: IndexMap<Spanned<String>, RawInput>,
}

/// A value given when the pipeline is started by hand.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Input")]
pub struct RawInput {
    /// `string`, `bool` (`true` or `false`) or `choice` (one of `options`).
    #[serde(rename = "type")]
    pub kind: Spanned<InputType>,
    /// Shown to the person starting the pipeline.
    #[serde(default)]
    pub description: Option<String>,
    /// The value when none is given.
    #[serde(default)]
    pub default: Option<Spanned<EnvValue>>,
    /// The pipeline cannot start without it. Default false.
    #[serde(default)]
    pub required: bool,
    /// The allowed values of a `choice`.
    #[serde(default)]
    pub options: Vec<Spanned<String>>,
}

/// The type of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputType {
    String,
    Bool,
    Choice,
}

/// `test` or `deploy`: see `kind` on a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PipelineKind {
    Test,
    Deploy,
}

/// The events that start a pipeline. Several may be given.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Triggers")]
pub struct RawTriggers {
    /// A push to a branch (or a tag).
    #[serde(default, deserialize_with = "present")]
    pub push: Option<RawPushTrigger>,
    /// A pull request opened or updated against a base branch.
    #[serde(default, deserialize_with = "present")]
    pub pull_request: Option<RawPullRequestTrigger>,
    /// A promotion moved a branch (for example `production`) to a new commit.
    #[serde(default, deserialize_with = "present")]
    pub promotion: Option<RawBranchesTrigger>,
    /// Started by hand, from the API or a chat command.
    #[serde(default, deserialize_with = "present")]
    pub manual: Option<RawBranchesTrigger>,
    /// Started on a schedule.
    #[serde(default)]
    pub schedule: Vec<RawSchedule>,
    /// Started when a branch of another repository this server builds moves (a push, or
    /// cib's own merge or promotion), at this repository's default branch tip, with
    /// `UPSTREAM_REPO` and `UPSTREAM_COMMIT` set. Its outcome is reported on the upstream
    /// commit as `cib/downstream/<this repository>/<pipeline>`.
    #[serde(default)]
    pub upstream: Option<RawUpstream>,
}

/// The repository and branch a downstream pipeline watches.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "UpstreamTrigger")]
pub struct RawUpstream {
    /// The upstream repository, `owner/name`, as the forge names it.
    pub repo: Spanned<String>,
    /// The upstream branch whose moves start the pipeline (for example `master`).
    pub branch: Spanned<String>,
}

/// Which pushes start the pipeline. With no filter, every branch push does.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "PushTrigger")]
pub struct RawPushTrigger {
    /// Branch globs; a push to a matching branch starts the pipeline.
    #[serde(default)]
    pub branches: Option<Vec<Glob>>,
    /// Branch globs excluded even when `branches` matches.
    #[serde(default)]
    pub branches_ignore: Vec<Glob>,
    /// Tag globs; a push of a matching tag starts the pipeline.
    #[serde(default)]
    pub tags: Vec<Glob>,
    /// Only when a changed file matches one of these globs.
    #[serde(default)]
    pub paths: Vec<Glob>,
    /// Not when every changed file matches one of these globs.
    #[serde(default)]
    pub paths_ignore: Vec<Glob>,
}

/// Which pull requests start the pipeline, by their base branch.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "PullRequestTrigger")]
pub struct RawPullRequestTrigger {
    /// Globs over the base branch (the branch the pull request merges into).
    #[serde(default)]
    pub branches: Option<Vec<Glob>>,
    /// Only when a changed file matches one of these globs.
    #[serde(default)]
    pub paths: Vec<Glob>,
    /// Not when every changed file matches one of these globs.
    #[serde(default)]
    pub paths_ignore: Vec<Glob>,
}

/// A trigger filtered by branch only.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "BranchesTrigger")]
pub struct RawBranchesTrigger {
    /// Branch globs; any branch when absent.
    #[serde(default)]
    pub branches: Option<Vec<Glob>>,
}

/// A scheduled run.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Schedule")]
pub struct RawSchedule {
    /// Five-field cron expression, in the server's time zone (UTC by default).
    pub cron: Cron,
    /// The branch to build; when absent, the branch pull requests merge into (`merge.into`,
    /// else `promotion.from`, else `master`).
    #[serde(default)]
    pub branch: Option<String>,
    /// When the server was down at some of its times, run once for them when it is back.
    /// Default false: missed times are skipped.
    #[serde(default)]
    pub catch_up: bool,
}

/// A sidecar container for the pipeline's steps.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Service")]
pub struct RawService {
    /// The container image.
    pub image: Spanned<String>,
    /// Environment variables for the service.
    #[serde(default)]
    pub env: IndexMap<String, EnvValue>,
    /// Replaces the image's command.
    #[serde(default)]
    pub command: Option<Commands>,
    /// How to tell the service is ready; steps wait for it. Without it, a started container counts as ready.
    #[serde(default)]
    pub ready: Option<RawReadiness>,
}

/// A readiness check: a command run inside the service until it succeeds. A string is the command.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "ReadinessFull")]
pub struct RawReadinessFull {
    /// The check, run with `sh -c` in the service's container.
    pub command: String,
    /// Time between checks (default 1s).
    #[serde(default)]
    pub interval: Option<Duration>,
    /// Give up after this long (default 60s).
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// `ready: pg_isready` or `ready: { command: ..., interval: ..., timeout: ... }`.
#[derive(Debug, JsonSchema)]
#[schemars(untagged)]
#[schemars(rename = "Readiness")]
pub enum RawReadiness {
    Command(String),
    Full(RawReadinessFull),
}

impl<'de> Deserialize<'de> for RawReadiness {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawReadiness;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a command, or a mapping with `command`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawReadiness, E> {
                Ok(RawReadiness::Command(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawReadiness, A::Error> {
                RawReadinessFull::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(RawReadiness::Full)
            }
        }
        // Asking for a struct lets the deserializer check the mapping's keys against these fields.
        d.deserialize_struct("RawReadinessFull", &["command", "interval", "timeout"], V)
    }
}

/// Units requested from a resource pool.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Resource")]
pub struct RawResource {
    /// The pool's name, as configured on the server.
    pub pool: Spanned<String>,
    /// How many units (default 1). All are granted together or none.
    #[serde(default)]
    pub count: Option<Spanned<u32>>,
}

/// One step: commands run in a container, or a gate a person passes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Step")]
pub struct RawStep {
    /// The step's name, unique in its pipeline.
    pub name: Spanned<String>,
    /// The container image the commands run in.
    #[serde(default)]
    pub image: Option<Spanned<String>>,
    /// Shell commands, run in order with `sh -e`.
    #[serde(default)]
    pub commands: Option<Spanned<Commands>>,
    /// Environment variables (added to the pipeline's).
    #[serde(default)]
    pub env: IndexMap<String, EnvValue>,
    /// Names of secrets passed as environment variables. Values never appear in the spec.
    #[serde(default)]
    pub secrets: Vec<Spanned<String>>,
    /// Working directory, relative to the workspace.
    #[serde(default)]
    pub workdir: Option<Spanned<String>>,
    /// Time limit for one attempt of this step. The server gives a step without one its
    /// default, and refuses one over its maximum.
    #[serde(default)]
    pub timeout: Option<Spanned<Duration>>,
    /// Fail the step when it prints nothing for this long.
    #[serde(default)]
    pub no_output_timeout: Option<Duration>,
    /// When and how often to try again.
    #[serde(default)]
    pub retry: Option<RawRetry>,
    /// `bridge` (default) or `none` for no network at all.
    #[serde(default)]
    pub network: Option<Network>,
    /// Resource limits for the step's container.
    #[serde(default)]
    pub limits: Option<RawLimits>,
    /// Steps that must succeed before this one starts.
    #[serde(default)]
    pub depends_on: Vec<Spanned<String>>,
    /// Conditions under which the step runs at all.
    #[serde(default)]
    pub when: Option<RawWhen>,
    /// The pipeline's services this step needs (default: all of them).
    #[serde(default)]
    pub services: Option<Vec<Spanned<String>>>,
    /// Units requested from resource pools, held for this step only.
    #[serde(default)]
    pub resources: Vec<RawResource>,
    /// Makes this step a gate: an approval or a hold for manual testing, with no container.
    #[serde(default)]
    pub gate: Option<Spanned<RawGate>>,
    /// A failure of this step does not fail the pipeline.
    #[serde(default)]
    pub allow_failure: bool,
    /// Run this step in a container of its own, never as an `exec` in a container that
    /// earlier steps of the build used.
    #[serde(default)]
    pub isolated: bool,
    /// Run the step once per combination of these values (a cell), each with its own log,
    /// status and retries, named `unit (python=3.12, db=postgres)`.
    #[serde(default)]
    pub matrix: Option<Keyed<RawMatrix>>,
    /// With a `matrix`: when one cell fails, cancel the others. Default false.
    #[serde(default)]
    pub fail_fast: Option<Spanned<bool>>,
    /// Files of the workspace kept after the step succeeds, as a compressed archive that later
    /// pipelines of the same commit can ask for and people can download.
    #[serde(default)]
    pub artifacts: Option<Keyed<RawArtifacts>>,
    /// Artifacts of other pipelines' steps on the same commit, unpacked into the workspace
    /// before this step runs.
    #[serde(default)]
    pub needs_artifacts: Vec<Spanned<RawNeedArtifacts>>,
    /// Directories kept between builds of the repository under a key, restored before the step
    /// and saved after it succeeds when the key was new.
    #[serde(default)]
    pub cache: Vec<Spanned<RawCache>>,
    /// Where the step runs: an operating system (`os: linux`) and labels the machine must
    /// carry (`labels: {gpu: "yes"}`). Without it, the step runs wherever the executor runs
    /// steps.
    #[serde(default)]
    pub runs_on: Option<Keyed<RawRunsOn>>,
}

/// Where a step runs: `runs_on: {os: macos}` or `runs_on: {labels: {gpu: "yes"}}`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "RunsOn")]
pub struct RawRunsOn {
    /// The operating system the step needs, e.g. `linux`, `macos`, `windows` (lower case).
    #[serde(default)]
    pub os: Option<Spanned<String>>,
    /// Labels the machine running the step must carry, each with this exact value (on Docker
    /// Swarm, node labels: `node.labels.gpu == yes`). Values are text: quote `"true"` and numbers.
    #[serde(default)]
    pub labels: IndexMap<Spanned<String>, Spanned<String>>,
}

/// One cache of a step.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Cache")]
pub struct RawCache {
    /// The cache's key, e.g. `pip-{{ checksum 'requirements.txt' }}`: text, and the SHA-256 of
    /// workspace files.
    pub key: Spanned<String>,
    /// Paths relative to the workspace that the cache holds, e.g. `.cache/pip`.
    pub paths: Spanned<Vec<Spanned<String>>>,
    /// Prefixes of other keys to restore from, newest first, when the key itself has no cache.
    #[serde(default)]
    pub restore_keys: Vec<Spanned<String>>,
}

/// What a step keeps of its workspace.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Artifacts")]
pub struct RawArtifacts {
    /// Globs of files relative to the workspace, e.g. `dist/**` or `report.xml`.
    pub paths: Spanned<Vec<Spanned<Glob>>>,
    /// How long the artifacts are kept (default `30d`).
    #[serde(default)]
    pub expire: Option<Spanned<Duration>>,
}

/// The artifacts of one step of another pipeline, built on the same commit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "NeedArtifacts")]
pub struct RawNeedArtifacts {
    /// The pipeline that made them.
    pub pipeline: Spanned<String>,
    /// Its step that lists `artifacts`.
    pub step: Spanned<String>,
}

/// `bridge` or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// The pipeline's private network, with the services and outside access.
    Bridge,
    /// No network at all.
    None,
}

/// Retry policy for a step.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Retry")]
pub struct RawRetry {
    /// Extra attempts after the first one (at most 10).
    #[schemars(range(max = 10))]
    pub count: Spanned<u32>,
    /// What is worth retrying. Default: `infrastructure` only, never a plain test failure.
    #[serde(default)]
    pub on: Vec<RetryOn>,
    /// Also retry when the step exits with one of these codes.
    #[serde(default)]
    pub exit_codes: Vec<i32>,
}

/// A reason to retry a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The infrastructure failed (the container could not start, the daemon went away).
    Infrastructure,
    /// The step ran past its `timeout` or `no_output_timeout`.
    Timeout,
    /// The step exited with any non-zero code.
    Failure,
}

/// Resource limits for a container.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Limits")]
pub struct RawLimits {
    /// Memory limit, e.g. `512m`, `2g`.
    #[serde(default)]
    pub memory: Option<Spanned<Memory>>,
    /// CPUs, e.g. `2` or `0.5`.
    #[serde(default)]
    pub cpus: Option<Spanned<f64>>,
    /// Maximum number of processes.
    #[serde(default)]
    pub pids: Option<Spanned<u32>>,
}

/// Conditions for running a step. All given conditions must hold.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "When")]
pub struct RawWhen {
    /// Only on these branches.
    #[serde(default)]
    pub branches: Option<Vec<Glob>>,
    /// Only when a changed file matches one of these globs.
    #[serde(default)]
    pub paths: Vec<Glob>,
    /// Only for these events.
    #[serde(default)]
    pub events: Vec<EventKind>,
    /// Run depending on how the steps before it went (default `on_success`).
    #[serde(default)]
    pub status: Option<RunStatus>,
}

/// The kinds of event that start pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Push,
    PullRequest,
    Promotion,
    Manual,
    Schedule,
    /// Another repository's branch moved (`on: upstream`).
    Upstream,
}

impl EventKind {
    /// The event's name as the spec writes it, which steps also see as `CIB_EVENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Push => "push",
            EventKind::PullRequest => "pull_request",
            EventKind::Promotion => "promotion",
            EventKind::Manual => "manual",
            EventKind::Schedule => "schedule",
            EventKind::Upstream => "upstream",
        }
    }
}

/// When a step runs relative to the steps it depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Only when everything it depends on succeeded (the default).
    OnSuccess,
    /// Only when something in the pipeline failed (for clean-up or reports).
    OnFailure,
    /// Whatever happened before it.
    Always,
}

/// A gate: the pipeline waits for people.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Gate")]
pub struct RawGate {
    /// `approval`: people approve or reject. `hold`: a person tests by hand, then passes or fails it.
    pub kind: GateKind,
    /// Shown to the people asked.
    #[serde(default)]
    pub instructions: Option<String>,
    /// How many distinct people must approve (default 1).
    #[serde(default)]
    pub approvals: Option<Spanned<u32>>,
    /// Who may answer. Anyone with write access when absent.
    #[serde(default)]
    pub from: Option<RawApprovers>,
    /// The gate fails when nobody answers in time.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// May the person who started the build, or the commit's author, approve it? Default false.
    #[serde(default)]
    pub self_approval: bool,
}

/// `approval` or `hold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GateKind {
    Approval,
    Hold,
}

/// People allowed to approve: users by login, teams by slug.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Approvers")]
pub struct RawApprovers {
    #[serde(default)]
    pub users: Vec<Spanned<String>>,
    #[serde(default)]
    pub teams: Vec<Spanned<String>>,
}

/// Something the pipeline publishes once its steps pass.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(rename = "Deliverable")]
pub enum RawDeliverable {
    /// Python distributions uploaded to a package index.
    Pypi(RawPypi),
    /// A Docker image built and pushed to a registry.
    Docker(RawDockerImage),
}

/// A Python package upload.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Pypi")]
pub struct RawPypi {
    /// The index's upload URL, e.g. `https://index.example/legacy/`.
    pub index: Spanned<String>,
    /// Name of the secret holding the index token or `user:password`.
    pub credentials: Spanned<String>,
    /// The files to upload (default `dist/*`). Not with `from`.
    #[serde(default)]
    pub files: Option<Glob>,
    /// Promote rather than build: upload, byte for byte, the files that this pipeline
    /// published for the same commit (its name, e.g. `staging`).
    #[serde(default)]
    pub from: Option<Spanned<String>>,
}

/// A Docker image build and push.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "DockerImage")]
pub struct RawDockerImage {
    /// The image's repository, with its registry host: `registry.example.com/team/app`.
    pub image: Spanned<String>,
    /// Build context, relative to the workspace (default `.`).
    #[serde(default)]
    pub context: Option<String>,
    /// Dockerfile, relative to the context (default `Dockerfile`).
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// Tags to push. `{{commit}}`, `{{short_commit}}` and `{{branch}}` are replaced. Default: `{{commit}}`.
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
    /// Name of the secret holding `user:password` for the registry.
    #[serde(default)]
    pub credentials: Option<Spanned<String>>,
    /// Promote rather than build: tag, under `tags`, the manifest that this pipeline pushed
    /// for the same commit (its name, e.g. `staging`). No `context` or `dockerfile` then.
    #[serde(default)]
    pub from: Option<Spanned<String>>,
}

/// The promotion policy: how a commit moves from one branch to the next.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Promotion")]
pub struct RawPromotion {
    /// The branch commits are promoted from (default: `merge.into`, else `master`). The
    /// default `staging` pipeline runs on pushes to it.
    #[serde(default)]
    pub from: Option<Spanned<String>>,
    /// The branch moved by fast-forward (default `production`). The default `production`
    /// pipeline runs when a commit is promoted or pushed to it.
    #[serde(default)]
    pub to: Option<Spanned<String>>,
    /// What the commit needs before it may be promoted.
    #[serde(default)]
    pub requires: Option<RawPromotionRequires>,
}

/// Requirements for a promotion.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "PromotionRequires")]
pub struct RawPromotionRequires {
    /// Pipelines that must be green on this exact commit.
    #[serde(default)]
    pub pipelines: Vec<Spanned<String>>,
    /// Approvals from people.
    #[serde(default)]
    pub approvals: Option<RawApprovalPolicy>,
    /// Downstream repositories (`owner/name`) whose `on: upstream` pipelines must have passed
    /// against this exact commit.
    #[serde(default)]
    pub downstream: Vec<Spanned<String>>,
}

/// How many approvals, from whom, valid how long.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "ApprovalPolicy")]
pub struct RawApprovalPolicy {
    /// Distinct approvers needed.
    pub count: Spanned<u32>,
    /// Who may approve.
    #[serde(default)]
    pub from: Option<RawApprovers>,
    /// May the commit's author approve it? Default false.
    #[serde(default)]
    pub self_approval: bool,
    /// An approval lapses after this long (default: never).
    #[serde(default)]
    pub expires: Option<Duration>,
}

/// The merge policy for pull requests.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "Merge")]
pub struct RawMerge {
    /// The branch pull requests merge into (default: `promotion.from`, else `master`).
    #[serde(default)]
    pub into: Option<Spanned<String>>,
    /// Only fast-forward merges (default true; cib never writes merge commits).
    #[serde(default)]
    pub fast_forward_only: Option<Spanned<bool>>,
    /// What a pull request needs before it may be merged.
    #[serde(default)]
    pub requires: Option<RawMergeRequires>,
}

/// Requirements for a merge.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("patternProperties" = { "^x-": {} }))]
#[schemars(rename = "MergeRequires")]
pub struct RawMergeRequires {
    /// Pipelines that must be green on the pull request's head.
    #[serde(default)]
    pub pipelines: Vec<Spanned<String>>,
    /// Approving reviews needed.
    #[serde(default)]
    pub reviews: u32,
    /// The branch must contain the tip of the target branch (default true).
    #[serde(default)]
    pub up_to_date: Option<bool>,
}
