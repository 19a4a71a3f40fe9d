//! The pipeline machine: given an input and the time, what changes and what must be done.
//!
//! `Machine::handle(input, now) -> Vec<Effect>` is synchronous and deterministic: it does no
//! I/O, reads no clock and spawns nothing. The engine stores every input before handing it
//! here, carries out the effects through the ports, and feeds completions back as inputs, so
//! replaying the stored inputs rebuilds exactly the same machine. The machine owns the lease
//! table too, so that a build's leases move in the same step as the build.

// Pure code: no clock, environment, files or threads (see clippy.toml).
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use crate::lease::{self, Holder, LeaseEvent, LeaseId, LeaseTable, PoolConfig, PoolKind, Want};
use crate::policy;
use crate::publish::{self, DeliverableRecord, PublishJob, PublishOutcome};
use crate::spec::{self, Action, GateKind, PipelineKind, RetryOn, RunStatus};
use crate::time::Timestamp;
pub use crate::workflow::Approval;
use crate::workflow::{DownstreamResult, DownstreamState};

/// An open pull request as the workflow needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenPullRequest {
    pub base: String,
    pub head_branch: String,
    pub head_commit: String,
    pub author: String,
    pub from_fork: bool,
}

/// An environment on record: which commit is there, since when, moved by whom, approved by whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Environment {
    pub commit: String,
    pub since: Timestamp,
    pub by: String,
    pub approved_by: Vec<String>,
    /// The deploy build that put it there, when one did.
    pub build: Option<BuildId>,
    /// Whether a promotion put the commit there (rather than a merge), so that the push the
    /// forge reports for the move starts the branch's pipelines as a promotion.
    #[serde(default)]
    pub promoted: bool,
}

/// Settings of the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Steps running at once across all builds; more wait in a FIFO queue.
    pub max_running_steps: usize,
    /// Time to live of a build's leases; the machine renews them on every tick while the build lives.
    pub build_lease_ttl: Duration,
    /// Resource pools.
    pub pools: Vec<PoolConfig>,
    /// The operator's defaults and maximums, applied to every build's pipeline when it is
    /// enqueued. None by default; the server and `cib run` pass their own.
    #[serde(default)]
    pub limits: spec::OperatorLimits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_running_steps: 8,
            build_lease_ttl: Duration::from_secs(600),
            pools: Vec::new(),
            limits: spec::OperatorLimits::default(),
        }
    }
}

/// Where a build's code comes from and why it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildContext {
    pub repo: String,
    pub commit: String,
    /// The branch built (for a pull request, its head branch).
    pub branch: Option<String>,
    pub pull_request: Option<u64>,
    /// The event as trigger matching and `when` conditions see it.
    pub event: spec::TriggerEvent,
    /// Who caused the build, from an authenticated source. Frontends that know the people
    /// directory give the person's name, so that an approval gate refuses them whichever of
    /// their identities they approve with.
    pub actor: Option<String>,
    /// False for a fork's pull request that no maintainer approved at this head: it gets no
    /// secrets, and its steps that ask for secrets do not run.
    #[serde(default = "trusted_by_default")]
    pub trusted: bool,
    /// For a downstream build (`on: upstream`), the upstream repository and commit it runs
    /// against; its steps see them as `UPSTREAM_REPO` and `UPSTREAM_COMMIT`, and its outcome
    /// is recorded against that commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
}

/// The upstream commit a downstream build runs against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub repo: String,
    pub commit: String,
}

fn trusted_by_default() -> bool {
    true
}

/// A person deciding at a gate, as the frontend authenticated them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub login: String,
    pub teams: Vec<String>,
    /// Write access to the repository, from the forge's permission API.
    pub can_write: bool,
}

/// How an attempt of a step ended, as the executor saw it. A failing test is a value here;
/// `Infrastructure` means the executor could not run the step properly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepResult {
    Exited(i32),
    TimedOut,
    NoOutput,
    OutOfMemory,
    Cancelled,
    Infrastructure(String),
    /// The engine stopped while the attempt ran, and after the restart nothing of it was left
    /// to follow (its container was gone): whether it ran to its end is unknown. The machine
    /// re-runs such a step once, unless its pipeline deploys.
    Interrupted(String),
}

/// Everything that can happen to the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// Start a build of one pipeline of a spec. The spec travels as text so that stored inputs
    /// stay plain data; the machine reads it again.
    Enqueue {
        build: BuildId,
        spec: Arc<str>,
        pipeline: String,
        context: BuildContext,
        /// Run only these steps and what they depend on (`cib run --step`); all when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        only: Option<Vec<String>>,
        /// Variables given when the build was started (`cib run --env`, the trigger API); they
        /// win over the spec's.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        variables: BTreeMap<String, String>,
    },
    StepFinished {
        build: BuildId,
        step: String,
        attempt: u32,
        result: StepResult,
    },
    /// The step printed something, last at `at`; the engine coalesces these.
    StepOutput {
        build: BuildId,
        step: String,
        attempt: u32,
        at: Timestamp,
    },
    ServiceReady {
        build: BuildId,
        service: String,
    },
    ServiceFailed {
        build: BuildId,
        service: String,
        message: String,
    },
    TimerFired {
        timer: TimerId,
    },
    Cancel {
        build: BuildId,
        by: String,
        reason: String,
    },
    Decide {
        build: BuildId,
        step: String,
        actor: Actor,
        approve: bool,
        comment: Option<String>,
    },
    /// A decision at a gate by a person the people directory knows: `person` is their name
    /// there, whichever identity (`actor.login`) they used, so that two identities of one
    /// person count once. [`Input::Decide`] counts each login as a person of its own.
    DecideAs {
        build: BuildId,
        step: String,
        actor: Actor,
        person: String,
        approve: bool,
        comment: Option<String>,
    },
    /// Who wrote a commit, as a person, from the forge's record of the commit (never from
    /// `git` metadata, which anyone can write). Gates do not take this person's approval.
    CommitAuthor {
        repo: String,
        commit: String,
        person: String,
    },
    /// A person (or a tool) asks for units; builds ask through their spec.
    TakeLease {
        request: lease::Request,
    },
    RenewLease {
        lease: LeaseId,
        token: u64,
    },
    /// A person keeps a lease until another time.
    ExtendLease {
        lease: LeaseId,
        token: u64,
        until: Timestamp,
    },
    ReturnLease {
        lease: LeaseId,
        token: u64,
    },
    RevokeLease {
        lease: LeaseId,
    },
    CancelLeaseRequest {
        lease: LeaseId,
    },
    /// Time passes: leases expire or are renewed for live builds.
    Tick,
    /// The engine is stopping: start no more steps (those ready wait), so that the steps running
    /// can finish without new ones taking their place. Journaled, so that a process killed while
    /// draining comes back knowing it.
    Drain,
    /// The engine started again after a drain: steps start as before.
    Resume,
    /// The machine's settings changed (the server restarted with another configuration): run
    /// slots and lease times apply from now on, and the pools are configured again, held units
    /// staying held until freed.
    Configure {
        config: Config,
    },
    /// An approving review of a commit, for the merge policy (forges without reviews of their own).
    Review {
        repo: String,
        commit: String,
        actor: Actor,
    },
    /// An approval to promote a commit; it is bound to that commit.
    ApprovePromotion {
        repo: String,
        commit: String,
        actor: Actor,
    },
    /// A pull request is open at this head, or (`open: false`) closed.
    PullRequest {
        repo: String,
        number: u64,
        base: String,
        head_branch: String,
        head_commit: String,
        open: bool,
        #[serde(default)]
        author: String,
        #[serde(default)]
        from_fork: bool,
    },
    /// Whether a pull request's head contains its base's tip, evaluated when either moved.
    UpToDate {
        repo: String,
        number: u64,
        head_commit: String,
        base: String,
        behind: u32,
    },
    /// The spec at a commit that was pushed, or at a pull request's head, is invalid.
    SpecInvalid {
        repo: String,
        commit: String,
        pull_request: Option<u64>,
        diagnostics: Vec<String>,
    },
    /// cib's answer to a command given in a comment.
    Answer {
        repo: String,
        number: u64,
        text: String,
    },
    /// A maintainer approved a fork's pull request at this head: its builds may have secrets.
    TrustFork {
        repo: String,
        number: u64,
        head_commit: String,
        by: String,
    },
    /// How publishing a build's deliverables went (attempt `attempt` of its `publish` step).
    Published {
        build: BuildId,
        attempt: u32,
        outcome: PublishOutcome,
    },
    /// A branch was fast-forwarded by a merge or a promotion.
    Moved {
        repo: String,
        branch: String,
        commit: String,
        by: String,
        promotion: bool,
        approved_by: Vec<String>,
    },
}

/// A timer the machine armed; the engine fires it back as [`Input::TimerFired`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "timer", rename_all = "snake_case")]
pub enum TimerId {
    BuildTimeout {
        build: BuildId,
    },
    StepTimeout {
        build: BuildId,
        step: String,
        attempt: u32,
    },
    NoOutput {
        build: BuildId,
        step: String,
        attempt: u32,
    },
    Gate {
        build: BuildId,
        step: String,
    },
    /// The lease table's next expiry or warning.
    Leases,
    /// The next attempt at publishing a build's deliverables, after a transient failure.
    PublishRetry {
        build: BuildId,
        attempt: u32,
    },
}

/// A unit of a resource pool granted to a step, with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedUnit {
    pub pool: String,
    pub unit: String,
    pub metadata: BTreeMap<String, String>,
}

/// Everything an executor needs to run one attempt of a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepJob {
    pub build: BuildId,
    pub pipeline: String,
    pub step: spec::Step,
    pub attempt: u32,
    pub context: BuildContext,
    /// Pipeline and step variables, `CIB_*` variables and resource variables, merged.
    pub env: BTreeMap<String, String>,
    pub resources: Vec<GrantedUnit>,
    /// The build's steps that run commands and have not started yet, as the attempt starts: a
    /// hint, which changes nothing of what runs. An executor may prepare the container of a
    /// step that depends only on this one while this one runs (pipelining), and need not keep
    /// this step's container for reuse when none of these could use it. Not serialized: it is
    /// the machine's state at the start, which the job's other fields already describe.
    #[serde(skip)]
    pub upcoming: Vec<spec::Step>,
}

/// Why the machine stops a running step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Cancelled,
    TimedOut,
    NoOutput,
}

/// What the machine asks the world to do.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    StartServices {
        build: BuildId,
        services: Vec<spec::Service>,
    },
    StartStep(Box<StepJob>),
    StopStep {
        build: BuildId,
        step: String,
        attempt: u32,
        reason: StopReason,
    },
    /// Remove everything the build left: containers, services, network, workspace.
    Cleanup {
        build: BuildId,
    },
    ArmTimer {
        timer: TimerId,
        at: Timestamp,
    },
    CancelTimer {
        timer: TimerId,
    },
    Publish(Event),
    /// Publish a build's deliverables; the outcome comes back as [`Input::Published`].
    PublishDeliverables(Box<PublishJob>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    Queued,
    WaitingForTurn,
    WaitingForResources,
    Running,
    Finished(Conclusion),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    WaitingForLease {
        attempt: u32,
    },
    /// Ready, waiting for a free run slot.
    Ready {
        attempt: u32,
    },
    Running {
        attempt: u32,
    },
    AtGate,
    Done(StepConclusion),
}

/// One try of a step; every attempt is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub conclusion: Option<StepConclusion>,
    pub detail: String,
}

/// Where a build's publish phase is. It runs as a synthetic step (`publish`) after every
/// ordinary step has passed and before the finalizers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishStatus {
    #[default]
    Pending,
    Running {
        attempt: u32,
    },
    /// Attempt `attempt` failed transiently; the next waits for its timer.
    Waiting {
        attempt: u32,
    },
    Done(StepConclusion),
}

/// The publish phase of a build: its status, its attempts, and what it published.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishState {
    pub status: PublishStatus,
    pub attempts: Vec<Attempt>,
    pub records: Vec<DeliverableRecord>,
}

/// How many downstream results the machine keeps per upstream repository (the newest): a
/// promotion asks about a recent commit, and older results only fill snapshots.
pub const KEPT_DOWNSTREAM: usize = 500;

/// How many records of published deliverables the machine keeps per repository (the newest),
/// for promotions (`from:`) and the environments' listing. Older ones are dropped.
pub const KEPT_DELIVERABLES: usize = 500;

// Every field is serialized: the engine's snapshots are this machine's state, written out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub status: StepStatus,
    pub attempts: Vec<Attempt>,
    /// Approvers so far, for an approval gate.
    pub approvals: Vec<String>,
    last_output: Timestamp,
    stopping: Option<StopReason>,
    units: Vec<GrantedUnit>,
}

/// One build of one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub id: BuildId,
    /// Not written into snapshots: it is read again from `spec` (with `only`) on restore, the
    /// way the build was planned, so the checked spec model needs no serialized form of its own.
    #[serde(with = "pipeline_name")]
    pub pipeline: spec::Pipeline,
    pub context: BuildContext,
    pub state: BuildState,
    pub steps: Vec<StepState>,
    pub queued_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// Set once the build is being cancelled: by whom and what the conclusion will be.
    ending: Option<(String, Conclusion)>,
    services_ready: BTreeSet<String>,
    pipeline_units: Vec<GrantedUnit>,
    /// Variables given when the build was started.
    pub variables: BTreeMap<String, String>,
    /// The spec text the build was enqueued with: a retry runs it again, never the spec at
    /// the commit (which, for a fork's pull request, the fork wrote).
    pub spec: std::sync::Arc<str>,
    /// The steps chosen when the build was started (`cib run --step`), all when `None`.
    #[serde(default)]
    pub only: Option<Vec<String>>,
    /// A step was skipped because the build is not trusted with its secrets.
    untrusted_skips: bool,
    /// The publish phase (unused when the pipeline has no deliverables).
    #[serde(default)]
    pub publish: PublishState,
}

/// The last spec text read and what it gave. A repository's pushes mostly carry the same spec,
/// so the enqueues of a busy server, and the replay of a long journal, read it once rather than
/// once per build. It is not part of the machine's state: equal machines may hold different ones.
#[derive(Debug, Clone, Default)]
struct SpecCache(Option<(std::sync::Arc<str>, Option<spec::Spec>)>);

impl SpecCache {
    fn parse(&mut self, source: &str) -> Option<&spec::Spec> {
        if self.0.as_ref().is_none_or(|(text, _)| **text != *source) {
            self.0 = Some((std::sync::Arc::from(source), spec::parse(source).ok()));
        }
        self.0.as_ref().and_then(|(_, parsed)| parsed.as_ref())
    }
}

impl PartialEq for SpecCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A build's pipeline in a snapshot: its name only; restoring plans it again from the spec.
mod pipeline_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::spec;

    pub fn serialize<S: Serializer>(pipeline: &spec::Pipeline, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&pipeline.name)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<spec::Pipeline, D::Error> {
        Ok(super::empty_pipeline(&String::deserialize(d)?))
    }
}

/// The pipeline of a build whose spec or pipeline could not be read: it has no steps, and the
/// build ends errored at once.
fn empty_pipeline(name: &str) -> spec::Pipeline {
    spec::Pipeline {
        name: name.to_owned(),
        kind: PipelineKind::Test,
        triggers: spec::Triggers::default(),
        env: BTreeMap::new(),
        services: Vec::new(),
        resources: Vec::new(),
        steps: Vec::new(),
        deliverables: Vec::new(),
        timeout: None,
        inputs: Vec::new(),
    }
}

/// Plans a build's pipeline from its spec text: the pipeline named, cut down to the steps
/// chosen and what they depend on. `None` when the spec or the pipeline cannot be read, or no
/// step is left. The operator's limits fill in defaults and cut values down to the maximums.
/// Enqueueing and restoring a snapshot both plan through here, so a restored build runs exactly
/// the pipeline it was enqueued with.
fn plan_pipeline(
    cache: &mut SpecCache,
    source: &str,
    pipeline: &str,
    only: Option<&[String]>,
    limits: &spec::OperatorLimits,
) -> Option<spec::Pipeline> {
    let mut found = cache.parse(source)?.pipeline(pipeline).cloned()?;
    limits.apply(&mut found);
    if let Some(only) = only {
        let names: Vec<&str> = only.iter().map(String::as_str).collect();
        let keep: BTreeSet<String> = found.closure(&names).iter().map(|s| s.name.clone()).collect();
        found.steps.retain(|s| keep.contains(&s.name));
        if found.steps.is_empty() {
            return None;
        }
    }
    Some(found)
}

impl Build {
    fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    fn is_finished(&self) -> bool {
        matches!(self.state, BuildState::Finished(_))
    }

    /// Whether the publish phase is over, or there is none.
    fn publish_settled(&self) -> bool {
        self.pipeline.deliverables.is_empty() || matches!(self.publish.status, PublishStatus::Done(_))
    }

    /// How the publish phase ended, when it did.
    fn publish_conclusion(&self) -> Option<StepConclusion> {
        match self.publish.status {
            PublishStatus::Done(c) if !self.pipeline.deliverables.is_empty() => Some(c),
            _ => None,
        }
    }

    /// The services of a running build that have not said they are ready: after a restart the
    /// engine starts them again, since whatever was starting them died with the old process.
    pub fn services_waiting(&self) -> Vec<spec::Service> {
        if self.state != BuildState::Running || self.ending.is_some() {
            return Vec::new();
        }
        self.pipeline.services.iter().filter(|s| !self.services_ready.contains(&s.name)).cloned().collect()
    }

    fn supersede_key(&self) -> (String, String, String) {
        let target = match (self.context.pull_request, &self.context.branch) {
            (Some(pr), _) => format!("pr#{pr}"),
            (None, Some(b)) => format!("branch:{b}"),
            (None, None) => format!("commit:{}", self.context.commit),
        };
        (self.context.repo.clone(), self.pipeline.name.clone(), target)
    }
}

/// Who a lease of the table belongs to, when a build asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum LeaseOwner {
    Pipeline(BuildId),
    Step(BuildId, String, u32),
}

/// The machine: every build, the lease table, and the queue of steps waiting for a slot.
// Serialized whole for the engine's snapshots. Maps keyed by tuples are written as lists of
// pairs, since JSON keys are strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    config: Config,
    builds: BTreeMap<BuildId, Build>,
    leases: LeaseTable,
    lease_owners: BTreeMap<LeaseId, LeaseOwner>,
    /// Unfinished test builds by what a newer push would supersede (repo, pipeline, branch or PR).
    #[serde(with = "pairs")]
    test_builds: BTreeMap<(String, String, String), BTreeSet<BuildId>>,
    /// Unfinished deploy builds of each (repo, pipeline), in arrival order: only the first runs.
    #[serde(with = "pairs")]
    deploy_queues: BTreeMap<(String, String), VecDeque<BuildId>>,
    ready: VecDeque<(BuildId, String)>,
    running: usize,
    next_event: u64,
    lease_timer: Option<Timestamp>,
    /// The lease table changed while handling the current input.
    leases_touched: bool,
    /// No step starts while the engine drains (between [`Input::Drain`] and [`Input::Resume`]).
    draining: bool,
    /// Reviews and promotion approvals by repository; each is bound to a commit.
    reviews: BTreeMap<String, Vec<Approval>>,
    approvals: BTreeMap<String, Vec<Approval>>,
    /// What runs where, by repository and environment (a branch or a deploy pipeline).
    environments: BTreeMap<String, BTreeMap<String, Environment>>,
    /// Forks' pull requests a maintainer approved, and the head commit approved.
    #[serde(with = "pairs")]
    trusted_forks: BTreeMap<(String, u64), String>,
    /// Open pull requests by repository and number, as the forge last said.
    pull_requests: BTreeMap<String, BTreeMap<u64, OpenPullRequest>>,
    /// The person who wrote each commit, by repository and commit, as the forge said.
    #[serde(with = "pairs")]
    commit_authors: BTreeMap<(String, String), String>,
    /// Deliverables published, by repository, oldest first, at most [`KEPT_DELIVERABLES`].
    #[serde(default)]
    published: BTreeMap<String, Vec<DeliverableRecord>>,
    /// Downstream results by upstream repository, oldest first, at most [`KEPT_DOWNSTREAM`]:
    /// one per upstream commit, downstream repository and pipeline (the newest build's).
    #[serde(default)]
    downstream: BTreeMap<String, Vec<DownstreamResult>>,
    /// Effects gathered while handling one input; always empty between inputs.
    #[serde(skip)]
    out: Vec<Effect>,
    /// Builds that finished since [`Machine::forget_finished`] last ran: it forgets these
    /// rather than look through every build after every input, which a backlog of thousands
    /// of queued builds made the engine's main cost.
    /// A restored machine finds them again (`Machine::restore`).
    #[serde(skip)]
    finished: BTreeSet<BuildId>,
    #[serde(skip)]
    spec_cache: SpecCache,
}

/// A map written as a list of `[key, value]` pairs, for keys JSON cannot hold.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Why a snapshot could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("the snapshot cannot be read: {0}")]
pub struct SnapshotError(String);

/// The version of the snapshot format; a snapshot of another version is not read.
const SNAPSHOT_VERSION: u32 = 1;

#[derive(Serialize)]
struct SnapshotOut<'a> {
    version: u32,
    machine: &'a Machine,
}

#[derive(Deserialize)]
struct SnapshotIn {
    version: u32,
    machine: Machine,
}

/// The lease id a build's pipeline-wide request uses.
pub fn pipeline_lease_id(build: &BuildId) -> LeaseId {
    LeaseId(build.0.clone())
}

/// The lease id of one attempt of a step's request.
pub fn step_lease_id(build: &BuildId, step: &str, attempt: u32) -> LeaseId {
    LeaseId(format!("{}/{step}/{attempt}", build.0))
}

impl Machine {
    /// A machine with no builds. Fails when the pools are misconfigured (a duplicate name, say).
    pub fn new(config: Config) -> Result<Self, lease::LeaseError> {
        let leases = LeaseTable::new(config.pools.clone())?;
        Ok(Machine {
            config,
            builds: BTreeMap::new(),
            leases,
            lease_owners: BTreeMap::new(),
            test_builds: BTreeMap::new(),
            deploy_queues: BTreeMap::new(),
            ready: VecDeque::new(),
            running: 0,
            next_event: 1,
            lease_timer: None,
            leases_touched: false,
            draining: false,
            reviews: BTreeMap::new(),
            approvals: BTreeMap::new(),
            environments: BTreeMap::new(),
            pull_requests: BTreeMap::new(),
            trusted_forks: BTreeMap::new(),
            commit_authors: BTreeMap::new(),
            published: BTreeMap::new(),
            downstream: BTreeMap::new(),
            out: Vec::new(),
            finished: BTreeSet::new(),
            spec_cache: SpecCache::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn build(&self, id: &BuildId) -> Option<&Build> {
        self.builds.get(id)
    }

    pub fn builds(&self) -> impl Iterator<Item = &Build> {
        self.builds.values()
    }

    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// The downstream results recorded against commits of `upstream_repo`, oldest first.
    pub fn downstream_results(&self, upstream_repo: &str) -> &[DownstreamResult] {
        self.downstream.get(upstream_repo).map(Vec::as_slice).unwrap_or_default()
    }

    /// The deliverables published in a repository that the machine still keeps, oldest first.
    pub fn deliverables(&self, repo: &str) -> &[DeliverableRecord] {
        self.published.get(repo).map(Vec::as_slice).unwrap_or_default()
    }

    /// The publish job of a build whose publish phase is running: after a restart the engine
    /// publishes again (publishers are idempotent), since it cannot know how far it got.
    pub fn running_publish(&self, id: &BuildId) -> Option<PublishJob> {
        let b = self.builds.get(id)?;
        match b.publish.status {
            PublishStatus::Running { attempt } => Some(self.publish_job(b, attempt)),
            _ => None,
        }
    }

    /// Whether a fork's pull request was approved at exactly this head commit.
    pub fn fork_trusted(&self, repo: &str, number: u64, head_commit: &str) -> bool {
        self.trusted_forks.get(&(repo.to_owned(), number)).is_some_and(|h| h == head_commit)
    }

    /// The person who wrote a commit, when the forge said.
    pub fn commit_author(&self, repo: &str, commit: &str) -> Option<&str> {
        self.commit_authors.get(&(repo.to_owned(), commit.to_owned())).map(String::as_str)
    }

    /// The open pull requests of a repository, by number.
    pub fn pull_requests(&self, repo: &str) -> BTreeMap<u64, OpenPullRequest> {
        self.pull_requests.get(repo).cloned().unwrap_or_default()
    }

    /// Approving reviews given through cib in a repository.
    pub fn reviews(&self, repo: &str) -> &[Approval] {
        self.reviews.get(repo).map(Vec::as_slice).unwrap_or_default()
    }

    /// Promotion approvals given in a repository, for every commit.
    pub fn approvals(&self, repo: &str) -> &[Approval] {
        self.approvals.get(repo).map(Vec::as_slice).unwrap_or_default()
    }

    /// What runs where: by branch moved by cib, and by deploy pipeline that succeeded.
    pub fn environments(&self, repo: &str) -> BTreeMap<String, Environment> {
        self.environments.get(repo).cloned().unwrap_or_default()
    }

    pub fn running_steps(&self) -> usize {
        self.running
    }

    /// Whether the engine drains: no step starts until it resumes.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// The sequence number the next event will get.
    pub fn next_event_seq(&self) -> u64 {
        self.next_event
    }

    /// Drops finished builds from memory (their records live in the store), keeping the
    /// machine small on a long-running server. The engine calls it after every input, once the
    /// input's events are stored.
    pub fn forget_finished(&mut self) {
        for id in std::mem::take(&mut self.finished) {
            if self.builds.get(&id).is_some_and(Build::is_finished) {
                self.builds.remove(&id);
            }
        }
    }

    /// The machine's whole state, written out for the engine's snapshots.
    pub fn snapshot(&self) -> serde_json::Value {
        // Serializing plain data cannot fail: every map key is a string or is written as pairs.
        serde_json::to_value(SnapshotOut { version: SNAPSHOT_VERSION, machine: self }).unwrap_or_default()
    }

    /// A machine read back from [`Machine::snapshot`]. Each build's pipeline is planned again
    /// from the spec text it was enqueued with, as when it was enqueued.
    pub fn restore(value: serde_json::Value) -> Result<Machine, SnapshotError> {
        let read: SnapshotIn = serde_json::from_value(value).map_err(|e| SnapshotError(e.to_string()))?;
        if read.version != SNAPSHOT_VERSION {
            return Err(SnapshotError(format!("version {} is not {SNAPSHOT_VERSION}", read.version)));
        }
        let mut machine = read.machine;
        machine.finished = machine.builds.values().filter(|b| b.is_finished()).map(|b| b.id.clone()).collect();
        for b in machine.builds.values_mut() {
            let (limits, cache) = (&machine.config.limits, &mut machine.spec_cache);
            if let Some(p) = plan_pipeline(cache, &b.spec, &b.pipeline.name, b.only.as_deref(), limits) {
                b.pipeline = p;
            }
            if b.pipeline.steps.len() != b.steps.len() && !b.is_finished() {
                return Err(SnapshotError(format!("build {} does not plan to the same steps again", b.id)));
            }
        }
        Ok(machine)
    }

    /// The job of a step attempt that is running, as it was when the attempt started: after a
    /// restart the engine follows the attempt with it.
    pub fn running_job(&self, id: &BuildId, step: &str, attempt: u32) -> Option<StepJob> {
        let b = self.builds.get(id)?;
        let index = b.step_index(step)?;
        (b.steps[index].status == StepStatus::Running { attempt }).then(|| job_of(b, index, attempt))
    }

    /// Handles one input at time `now` and returns what must be done, in order.
    pub fn handle(&mut self, input: Input, now: Timestamp) -> Vec<Effect> {
        match input {
            Input::Enqueue { build, spec, pipeline, context, only, variables } => {
                let new = NewBuild { id: build, context, only, variables };
                self.enqueue(new, &spec, &pipeline, now)
            }
            Input::StepFinished { build, step, attempt, result } => {
                self.step_finished(&build, &step, attempt, result, now)
            }
            Input::StepOutput { build, step, attempt, at } => {
                if let Some(s) = self.step_mut(&build, &step)
                    && s.status == (StepStatus::Running { attempt })
                {
                    s.last_output = s.last_output.max(at.min(now));
                }
            }
            Input::ServiceReady { build, service } => {
                if let Some(b) = self.builds.get_mut(&build)
                    && b.state == BuildState::Running
                    && b.services_ready.insert(service.clone())
                {
                    self.publish(now, EventBody::ServiceReady { build: build.clone(), service });
                    self.advance(&build, now);
                }
            }
            Input::ServiceFailed { build, service, message } => {
                self.end_build(
                    &build,
                    "cib",
                    Conclusion::Errored,
                    &format!("service '{service}' failed: {message}"),
                    now,
                );
            }
            Input::TimerFired { timer } => self.timer(timer, now),
            Input::Cancel { build, by, reason } => self.end_build(&build, &by, Conclusion::Cancelled, &reason, now),
            Input::Decide { build, step, actor, approve, comment } => {
                let person = actor.login.clone();
                self.decide(&build, &step, actor, person, approve, comment, now)
            }
            Input::DecideAs { build, step, actor, person, approve, comment } => {
                self.decide(&build, &step, actor, person, approve, comment, now)
            }
            Input::CommitAuthor { repo, commit, person } => {
                self.commit_authors.insert((repo, commit), person);
            }
            Input::TakeLease { request } => {
                let id = request.id.clone();
                let result = self.leases.request(request, now);
                self.lease_result(result, Some(id), now);
            }
            Input::RenewLease { lease, token } => {
                let result = self.leases.renew(&lease, token, now);
                self.person_result(result, &lease, now);
            }
            Input::ExtendLease { lease, token, until } => {
                let result = self.leases.extend(&lease, token, until, now);
                self.person_result(result, &lease, now);
            }
            Input::ReturnLease { lease, token } => {
                let result = self.leases.release(&lease, token, now);
                self.person_result(result, &lease, now);
            }
            Input::RevokeLease { lease } => {
                let result = self.leases.revoke(&lease, now);
                self.person_result(result, &lease, now);
            }
            Input::CancelLeaseRequest { lease } => {
                let events = self.leases.cancel(&lease, now);
                self.lease_events(events, now);
            }
            Input::Tick => self.tick(now),
            Input::Drain => self.draining = true,
            Input::Resume => self.draining = false,
            Input::Configure { config } => self.configure(config, now),
            Input::PullRequest { repo, number, base, head_branch, head_commit, open, author, from_fork } => {
                let prs = self.pull_requests.entry(repo).or_default();
                if open {
                    prs.insert(number, OpenPullRequest { base, head_branch, head_commit, author, from_fork });
                } else {
                    prs.remove(&number);
                }
            }
            Input::UpToDate { repo, number, head_commit, base, behind } => {
                self.publish(
                    now,
                    EventBody::UpToDate { repo, number, commit: head_commit, base, up_to_date: behind == 0, behind },
                );
            }
            Input::TrustFork { repo, number, head_commit, by } => {
                self.trusted_forks.insert((repo.clone(), number), head_commit.clone());
                self.publish(now, EventBody::ForkTrusted { repo, number, commit: head_commit, by });
            }
            Input::Answer { repo, number, text } => {
                self.publish(now, EventBody::CommandAnswered { repo, number, text })
            }
            Input::SpecInvalid { repo, commit, pull_request, diagnostics } => {
                self.publish(now, EventBody::SpecInvalid { repo, commit, pull_request, diagnostics })
            }
            Input::Review { repo, commit, actor } => {
                let approval =
                    Approval { commit: commit.clone(), by: actor.login.clone(), teams: actor.teams, at: now };
                self.reviews.entry(repo.clone()).or_default().push(approval);
                self.publish(now, EventBody::Reviewed { repo, commit, by: actor.login });
            }
            Input::ApprovePromotion { repo, commit, actor } => {
                let approval =
                    Approval { commit: commit.clone(), by: actor.login.clone(), teams: actor.teams, at: now };
                self.approvals.entry(repo.clone()).or_default().push(approval);
                self.publish(now, EventBody::PromotionApproved { repo, commit, by: actor.login });
            }
            Input::Published { build, attempt, outcome } => self.published(&build, attempt, outcome, now),
            Input::Moved { repo, branch, commit, by, promotion, approved_by } => {
                let env = Environment {
                    commit: commit.clone(),
                    since: now,
                    by: by.clone(),
                    approved_by,
                    build: None,
                    promoted: promotion,
                };
                self.environments.entry(repo.clone()).or_default().insert(branch.clone(), env);
                self.publish(now, EventBody::BranchMoved { repo, branch, commit, by, promotion });
            }
        }
        self.schedule(now);
        // Finding the table's next wake-up walks every lease, so it is done only when the
        // table was touched.
        if std::mem::take(&mut self.leases_touched) {
            self.arm_lease_timer();
        }
        std::mem::take(&mut self.out)
    }

    fn publish(&mut self, now: Timestamp, body: EventBody) {
        let event = Event { seq: self.next_event, at: now, body };
        self.next_event += 1;
        self.out.push(Effect::Publish(event));
    }

    fn step_mut(&mut self, build: &BuildId, step: &str) -> Option<&mut StepState> {
        let b = self.builds.get_mut(build)?;
        let i = b.step_index(step)?;
        b.steps.get_mut(i)
    }

    // ---- builds ----------------------------------------------------------------------------

    /// Keeps `result` as the one of its upstream commit, downstream repository and pipeline
    /// (replacing an older build's), and says so on the event stream.
    fn record_downstream(&mut self, result: DownstreamResult, now: Timestamp) {
        let kept = self.downstream.entry(result.upstream_repo.clone()).or_default();
        kept.retain(|r| {
            !(r.upstream_commit == result.upstream_commit && r.repo == result.repo && r.pipeline == result.pipeline)
        });
        kept.push(result.clone());
        if kept.len() > KEPT_DOWNSTREAM {
            let extra = kept.len() - KEPT_DOWNSTREAM;
            kept.drain(..extra);
        }
        self.publish(
            now,
            EventBody::DownstreamReported {
                build: BuildId(result.build),
                upstream_repo: result.upstream_repo,
                upstream_commit: result.upstream_commit,
                repo: result.repo,
                pipeline: result.pipeline,
                state: result.state,
            },
        );
    }

    fn enqueue(&mut self, new: NewBuild, source: &str, pipeline: &str, now: Timestamp) {
        let NewBuild { id, context, only, variables } = new;
        if self.builds.contains_key(&id) {
            return; // The same input twice (a replayed delivery) changes nothing.
        }
        // The chosen steps and everything they depend on, within this machine's limits.
        let found = plan_pipeline(&mut self.spec_cache, source, pipeline, only.as_deref(), &self.config.limits);
        let errored = found.is_none();
        let pipeline = found.unwrap_or_else(|| empty_pipeline(pipeline));
        let steps = pipeline
            .steps
            .iter()
            .map(|s| StepState {
                name: s.name.clone(),
                status: StepStatus::Pending,
                attempts: Vec::new(),
                approvals: Vec::new(),
                last_output: now,
                stopping: None,
                units: Vec::new(),
            })
            .collect();
        let build = Build {
            id: id.clone(),
            pipeline,
            context,
            state: BuildState::Queued,
            steps,
            queued_at: now,
            started_at: None,
            finished_at: None,
            ending: None,
            services_ready: BTreeSet::new(),
            pipeline_units: Vec::new(),
            variables,
            spec: std::sync::Arc::from(source),
            only,
            untrusted_skips: false,
            publish: PublishState::default(),
        };
        self.publish(
            now,
            EventBody::BuildQueued {
                build: id.clone(),
                pipeline: build.pipeline.name.clone(),
                repo: build.context.repo.clone(),
                commit: build.context.commit.clone(),
                branch: build.context.branch.clone(),
            },
        );
        let key = build.supersede_key();
        let kind = build.pipeline.kind;
        let supersedes = matches!(build.context.event.kind, spec::EventKind::Push | spec::EventKind::PullRequest);
        let queue = (build.context.repo.clone(), build.pipeline.name.clone());
        if let Some(up) = &build.context.upstream {
            let result = DownstreamResult {
                upstream_repo: up.repo.clone(),
                upstream_commit: up.commit.clone(),
                repo: build.context.repo.clone(),
                pipeline: build.pipeline.name.clone(),
                build: id.0.clone(),
                commit: build.context.commit.clone(),
                state: DownstreamState::Running,
                at: now,
            };
            self.record_downstream(result, now);
        }
        self.builds.insert(id.clone(), build);
        if errored {
            self.finish(&id, Conclusion::Errored, now);
            return;
        }
        match kind {
            // A newer push supersedes older test builds of the same branch or pull request;
            // builds started by hand or on a schedule supersede nothing and are not superseded.
            PipelineKind::Test if supersedes => {
                let older: Vec<BuildId> =
                    self.test_builds.get(&key).map(|s| s.iter().cloned().collect()).unwrap_or_default();
                for old in older {
                    if self.builds.get(&old).is_some_and(|b| b.ending.is_none()) {
                        self.publish(now, EventBody::BuildSuperseded { build: old.clone(), by: id.clone() });
                        self.end_build(&old, "cib", Conclusion::Cancelled, &format!("superseded by {id}"), now);
                    }
                }
                self.test_builds.entry(key).or_default().insert(id.clone());
            }
            PipelineKind::Test => {}
            // Deploy builds are never cancelled by a push: they queue in order.
            PipelineKind::Deploy => self.deploy_queues.entry(queue).or_default().push_back(id.clone()),
        }
        self.admit(&id, now);
    }

    /// The earlier unfinished deploy build this one must wait for, if any.
    fn blocking_deploy(&self, id: &BuildId) -> Option<BuildId> {
        let b = self.builds.get(id)?;
        if b.pipeline.kind != PipelineKind::Deploy {
            return None;
        }
        let front = self.deploy_queues.get(&(b.context.repo.clone(), b.pipeline.name.clone()))?.front()?;
        (front != id).then(|| front.clone())
    }

    fn admit(&mut self, id: &BuildId, now: Timestamp) {
        if let Some(behind) = self.blocking_deploy(id) {
            if let Some(b) = self.builds.get_mut(id)
                && b.state != BuildState::WaitingForTurn
            {
                b.state = BuildState::WaitingForTurn;
                self.publish(now, EventBody::BuildWaitingForTurn { build: id.clone(), behind });
            }
            return;
        }
        let Some(b) = self.builds.get_mut(id) else { return };
        if b.pipeline.resources.is_empty() {
            self.run(id, now);
            return;
        }
        b.state = BuildState::WaitingForResources;
        let wants: Vec<Want> =
            b.pipeline.resources.iter().map(|r| Want { pool: r.pool.clone(), count: r.count }).collect();
        let lease = pipeline_lease_id(id);
        self.lease_owners.insert(lease.clone(), LeaseOwner::Pipeline(id.clone()));
        let request = self.build_request(lease.clone(), id, None, wants);
        let result = self.leases.request(request, now);
        self.lease_result(result, Some(lease), now);
    }

    fn build_request(&self, id: LeaseId, build: &BuildId, step: Option<&str>, wants: Vec<Want>) -> lease::Request {
        lease::Request {
            id,
            holder: Holder::Build { build: build.0.clone(), step: step.map(str::to_owned) },
            wants,
            priority: 0,
            ttl: self.config.build_lease_ttl,
            deadline: None,
            warn_before: None,
            reason: format!("build {build}"),
        }
    }

    fn run(&mut self, id: &BuildId, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        b.state = BuildState::Running;
        b.started_at = Some(now);
        let timeout = b.pipeline.timeout;
        let services = b.pipeline.services.clone();
        self.publish(now, EventBody::BuildStarted { build: id.clone() });
        if let Some(t) = timeout {
            self.out
                .push(Effect::ArmTimer { timer: TimerId::BuildTimeout { build: id.clone() }, at: now + t.as_std() });
        }
        if !services.is_empty() {
            self.out.push(Effect::StartServices { build: id.clone(), services });
        }
        self.advance(id, now);
    }

    /// Moves every step that can move: skips, gates, lease requests, the run queue. Finishes
    /// the build when every step is done.
    fn advance(&mut self, id: &BuildId, now: Timestamp) {
        loop {
            let Some(b) = self.builds.get(id) else { return };
            if b.state != BuildState::Running {
                return;
            }
            let Some((index, decision)) = next_move(b) else { break };
            self.apply_move(id, index, decision, now);
        }
        if self.publish_due(id) {
            self.begin_publish(id, now);
            // Finalizers that were waiting for the publish phase may move now, when it was
            // skipped rather than started.
            if self.builds.get(id).is_some_and(Build::publish_settled) {
                return self.advance(id, now);
            }
        }
        let done = self
            .builds
            .get(id)
            .is_some_and(|b| b.steps.iter().all(|s| matches!(s.status, StepStatus::Done(_))) && b.publish_settled());
        if done {
            let conclusion = self.builds.get(id).map_or(Conclusion::Errored, conclude);
            self.finish(id, conclusion, now);
        }
    }

    fn apply_move(&mut self, id: &BuildId, index: usize, decision: Move, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        let step = b.pipeline.steps[index].clone();
        match decision {
            Move::Skip(reason) => {
                b.steps[index].status = StepStatus::Done(StepConclusion::Skipped);
                self.publish(now, EventBody::StepSkipped { build: id.clone(), step: step.name, reason });
            }
            Move::SkipUntrusted(reason) => {
                b.steps[index].status = StepStatus::Done(StepConclusion::Skipped);
                b.untrusted_skips = true;
                self.publish(now, EventBody::StepSkipped { build: id.clone(), step: step.name, reason });
            }
            Move::Start => match &step.action {
                Action::Gate(gate) => {
                    b.steps[index].status = StepStatus::AtGate;
                    let kind = if gate.kind == GateKind::Hold { "hold" } else { "approval" };
                    let (instructions, approvals, timeout) = (gate.instructions.clone(), gate.approvals, gate.timeout);
                    self.publish(
                        now,
                        EventBody::GateWaiting {
                            build: id.clone(),
                            step: step.name.clone(),
                            kind: kind.into(),
                            instructions,
                            approvals,
                        },
                    );
                    if let Some(t) = timeout {
                        let timer = TimerId::Gate { build: id.clone(), step: step.name };
                        self.out.push(Effect::ArmTimer { timer, at: now + t.as_std() });
                    }
                }
                Action::Run { .. } => {
                    let attempt = b.steps[index].attempts.len() as u32 + 1;
                    self.request_step(id, index, attempt, now);
                }
            },
        }
    }

    /// Asks for a step's own resources, or queues it for a slot when it has none.
    fn request_step(&mut self, id: &BuildId, index: usize, attempt: u32, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        let step = &b.pipeline.steps[index];
        if step.resources.is_empty() {
            b.steps[index].status = StepStatus::Ready { attempt };
            self.ready.push_back((id.clone(), step.name.clone()));
            return;
        }
        b.steps[index].status = StepStatus::WaitingForLease { attempt };
        let name = step.name.clone();
        let wants = step.resources.iter().map(|r| Want { pool: r.pool.clone(), count: r.count }).collect();
        let lease = step_lease_id(id, &name, attempt);
        self.lease_owners.insert(lease.clone(), LeaseOwner::Step(id.clone(), name.clone(), attempt));
        let request = self.build_request(lease.clone(), id, Some(&name), wants);
        let result = self.leases.request(request, now);
        self.lease_result(result, Some(lease), now);
    }

    /// Starts ready steps while run slots are free, oldest first.
    fn schedule(&mut self, now: Timestamp) {
        while !self.draining && self.running < self.config.max_running_steps {
            let Some((id, name)) = self.ready.pop_front() else { break };
            let Some(b) = self.builds.get_mut(&id) else { continue };
            let Some(index) = b.step_index(&name) else { continue };
            let StepStatus::Ready { attempt } = b.steps[index].status else { continue };
            b.steps[index].status = StepStatus::Running { attempt };
            b.steps[index].last_output = now;
            b.steps[index].stopping = None;
            b.steps[index].attempts.push(Attempt {
                number: attempt,
                started_at: now,
                finished_at: None,
                conclusion: None,
                detail: String::new(),
            });
            self.running += 1;
            let job = job_of(b, index, attempt);
            let step = job.step.clone();
            self.publish(now, EventBody::StepStarted { build: id.clone(), step: name.clone(), attempt });
            self.out.push(Effect::StartStep(Box::new(job)));
            if let Some(t) = step.timeout {
                let timer = TimerId::StepTimeout { build: id.clone(), step: name.clone(), attempt };
                self.out.push(Effect::ArmTimer { timer, at: now + t.as_std() });
            }
            if let Some(t) = step.no_output_timeout {
                let timer = TimerId::NoOutput { build: id.clone(), step: name.clone(), attempt };
                self.out.push(Effect::ArmTimer { timer, at: now + t.as_std() });
            }
        }
    }

    fn step_finished(&mut self, id: &BuildId, name: &str, attempt: u32, result: StepResult, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        let Some(index) = b.step_index(name) else { return };
        // A late or repeated report of an attempt that is no longer running changes nothing.
        if b.steps[index].status != (StepStatus::Running { attempt }) {
            return;
        }
        self.running = self.running.saturating_sub(1);
        let step = b.pipeline.steps[index].clone();
        let state = &mut b.steps[index];
        let (conclusion, detail, reason) = classify(&result, state.stopping);
        let cancelling = b.ending.is_some();
        // An interrupted step gets one re-run of its own, which does not count against its
        // retry policy.
        let rerun_spent = state.attempts.iter().any(|a| a.conclusion == Some(StepConclusion::Interrupted));
        let allowed = step.retry.count + u32::from(rerun_spent);
        let by_policy = attempt <= allowed
            && state.stopping != Some(StopReason::Cancelled)
            && should_retry(&step.retry, &result, reason);
        let retry = !cancelling
            && if matches!(result, StepResult::Interrupted(_)) {
                // A deploy step may have done its work before it was lost: running it again
                // unasked could deploy twice, so a person decides, whatever its policy says.
                b.pipeline.kind != PipelineKind::Deploy && (!rerun_spent || by_policy)
            } else {
                by_policy
            };
        let state = &mut b.steps[index];
        if let Some(a) = state.attempts.last_mut() {
            a.finished_at = Some(now);
            a.conclusion = Some(conclusion);
            a.detail = detail.clone();
        }
        state.units.clear();
        state.status = if retry { StepStatus::Pending } else { StepStatus::Done(conclusion) };
        if step.timeout.is_some() {
            let timer = TimerId::StepTimeout { build: id.clone(), step: name.to_owned(), attempt };
            self.out.push(Effect::CancelTimer { timer });
        }
        if step.no_output_timeout.is_some() {
            let timer = TimerId::NoOutput { build: id.clone(), step: name.to_owned(), attempt };
            self.out.push(Effect::CancelTimer { timer });
        }
        self.publish(
            now,
            EventBody::StepFinished {
                build: id.clone(),
                step: name.to_owned(),
                attempt,
                conclusion,
                detail,
                will_retry: retry,
            },
        );
        self.release_owned(&step_lease_id(id, name, attempt), now);
        if retry
            && let Some(b) = self.builds.get(id)
            && let Some(index) = b.step_index(name)
        {
            self.request_step(id, index, attempt + 1, now);
        }
        let counts = matches!(
            conclusion,
            StepConclusion::Failed | StepConclusion::TimedOut | StepConclusion::Errored | StepConclusion::Interrupted
        );
        if !retry
            && !cancelling
            && counts
            && !step.allow_failure
            && let Some(cell) = step.matrix.as_ref().filter(|m| m.fail_fast)
        {
            self.fail_fast(id, &cell.step, name, now);
        }
        self.after_step_change(id, now);
    }

    /// A cell of a `fail_fast` matrix failed: its siblings that run are stopped, and those not
    /// started yet are cancelled without running.
    fn fail_fast(&mut self, id: &BuildId, matrix: &str, failed: &str, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        let detail = format!("cancelled: '{failed}' failed, and the matrix fails fast");
        let mut to_stop = Vec::new();
        let mut to_release = Vec::new();
        let mut cancelled = Vec::new();
        for (state, step) in b.steps.iter_mut().zip(&b.pipeline.steps) {
            if step.name == failed || step.matrix.as_ref().is_none_or(|m| m.step != matrix) {
                continue;
            }
            match state.status {
                StepStatus::Running { attempt } => to_stop.push((state.name.clone(), attempt)),
                StepStatus::WaitingForLease { attempt } => {
                    to_release.push(step_lease_id(id, &state.name, attempt));
                    state.status = StepStatus::Done(StepConclusion::Cancelled);
                    cancelled.push(state.name.clone());
                }
                // A ready cell's place in the run queue is passed over once it is done.
                StepStatus::Pending | StepStatus::Ready { .. } => {
                    state.status = StepStatus::Done(StepConclusion::Cancelled);
                    cancelled.push(state.name.clone());
                }
                StepStatus::AtGate | StepStatus::Done(_) => {}
            }
        }
        for (name, attempt) in to_stop {
            self.stop_step(id, &name, attempt, StopReason::Cancelled);
        }
        for lease in to_release {
            self.release_owned(&lease, now);
        }
        for step in cancelled {
            let body = EventBody::StepFinished {
                build: id.clone(),
                step,
                attempt: 0,
                conclusion: StepConclusion::Cancelled,
                detail: detail.clone(),
                will_retry: false,
            };
            self.publish(now, body);
        }
    }

    /// After a step changes: a cancelled build may now be finished; a running one moves on.
    fn after_step_change(&mut self, id: &BuildId, now: Timestamp) {
        let Some(b) = self.builds.get(id) else { return };
        if let Some((_, conclusion)) = b.ending {
            let still_running = b.steps.iter().any(|s| matches!(s.status, StepStatus::Running { .. }))
                || matches!(b.publish.status, PublishStatus::Running { .. });
            if !still_running {
                self.finish(id, conclusion, now);
            }
        } else {
            self.advance(id, now);
        }
    }

    fn timer(&mut self, timer: TimerId, now: Timestamp) {
        match timer {
            TimerId::BuildTimeout { build } => {
                self.end_build(&build, "cib", Conclusion::TimedOut, "the pipeline's timeout passed", now)
            }
            TimerId::StepTimeout { build, step, attempt } => {
                self.stop_step(&build, &step, attempt, StopReason::TimedOut)
            }
            TimerId::NoOutput { build, step, attempt } => {
                let limit = self
                    .builds
                    .get(&build)
                    .and_then(|b| b.pipeline.step(&step))
                    .and_then(|s| s.no_output_timeout)
                    .map(|d| d.as_std());
                let Some(limit) = limit else { return };
                let Some(state) = self.step_mut(&build, &step) else { return };
                if state.status != (StepStatus::Running { attempt }) {
                    return;
                }
                let deadline = state.last_output + limit;
                if deadline <= now {
                    self.stop_step(&build, &step, attempt, StopReason::NoOutput);
                } else {
                    // Output came since the timer was armed: wait for the rest of the quiet period.
                    self.out.push(Effect::ArmTimer { timer: TimerId::NoOutput { build, step, attempt }, at: deadline });
                }
            }
            TimerId::Gate { build, step } => {
                let Some(state) = self.step_mut(&build, &step) else { return };
                if state.status != StepStatus::AtGate {
                    return;
                }
                state.status = StepStatus::Done(StepConclusion::TimedOut);
                self.publish(now, EventBody::GateExpired { build: build.clone(), step });
                self.after_step_change(&build, now);
            }
            TimerId::Leases => {
                self.lease_timer = None;
                self.tick(now);
            }
            TimerId::PublishRetry { build, attempt } => {
                let waiting = self.builds.get(&build).is_some_and(|b| {
                    b.ending.is_none() && b.publish.status == (PublishStatus::Waiting { attempt: attempt - 1 })
                });
                if waiting {
                    self.start_publish(&build, attempt, now);
                }
            }
        }
    }

    fn stop_step(&mut self, id: &BuildId, name: &str, attempt: u32, reason: StopReason) {
        let Some(state) = self.step_mut(id, name) else { return };
        if state.status != (StepStatus::Running { attempt }) || state.stopping.is_some() {
            return;
        }
        state.stopping = Some(reason);
        self.out.push(Effect::StopStep { build: id.clone(), step: name.to_owned(), attempt, reason });
    }

    /// Ends a build early: cancel, timeout, a lost lease, a failed service. Running steps are
    /// stopped and the build finishes when they report back; everything else ends now.
    fn end_build(&mut self, id: &BuildId, by: &str, conclusion: Conclusion, reason: &str, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        if b.is_finished() || b.ending.is_some() {
            return;
        }
        b.ending = Some((by.to_owned(), conclusion));
        let started = b.state == BuildState::Running;
        self.publish(
            now,
            EventBody::BuildCancelling { build: id.clone(), by: by.to_owned(), reason: reason.to_owned() },
        );
        if !started {
            self.finish(id, conclusion, now);
            return;
        }
        let Some(b) = self.builds.get_mut(id) else { return };
        let mut to_stop = Vec::new();
        let mut to_release = Vec::new();
        let mut gates = Vec::new();
        for s in &mut b.steps {
            match s.status {
                StepStatus::Running { attempt } => to_stop.push((s.name.clone(), attempt)),
                StepStatus::WaitingForLease { attempt } => {
                    to_release.push(step_lease_id(id, &s.name, attempt));
                    s.status = StepStatus::Done(StepConclusion::Cancelled);
                }
                StepStatus::AtGate => {
                    gates.push(s.name.clone());
                    s.status = StepStatus::Done(StepConclusion::Cancelled);
                }
                StepStatus::Pending | StepStatus::Ready { .. } => {
                    s.status = StepStatus::Done(StepConclusion::Cancelled)
                }
                StepStatus::Done(_) => {}
            }
        }
        let stop = match conclusion {
            Conclusion::TimedOut => StopReason::TimedOut,
            _ => StopReason::Cancelled,
        };
        for (name, attempt) in to_stop {
            self.stop_step(id, &name, attempt, stop);
        }
        for lease in to_release {
            self.release_owned(&lease, now);
        }
        for step in gates {
            self.out.push(Effect::CancelTimer { timer: TimerId::Gate { build: id.clone(), step } });
        }
        // A publish in progress is waited for like a running step (it cannot be taken back
        // halfway); one not started, or waiting to try again, ends here.
        if let Some(b) = self.builds.get_mut(id)
            && !b.pipeline.deliverables.is_empty()
        {
            match b.publish.status {
                PublishStatus::Pending => b.publish.status = PublishStatus::Done(StepConclusion::Cancelled),
                PublishStatus::Waiting { attempt } => {
                    b.publish.status = PublishStatus::Done(StepConclusion::Cancelled);
                    let timer = TimerId::PublishRetry { build: id.clone(), attempt: attempt + 1 };
                    self.out.push(Effect::CancelTimer { timer });
                }
                PublishStatus::Running { .. } | PublishStatus::Done(_) => {}
            }
        }
        // Queued entries of this build are skipped when they come up: their steps are done.
        self.after_step_change(id, now);
    }

    fn finish(&mut self, id: &BuildId, conclusion: Conclusion, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        if b.is_finished() {
            return;
        }
        let started = b.started_at.is_some();
        let had_timeout = b.pipeline.timeout.is_some();
        let gates: Vec<String> =
            b.steps.iter().filter(|s| s.status == StepStatus::AtGate).map(|s| s.name.clone()).collect();
        for s in &mut b.steps {
            if !matches!(s.status, StepStatus::Done(_)) {
                s.status = StepStatus::Done(StepConclusion::Cancelled);
            }
        }
        if !b.pipeline.deliverables.is_empty() && !matches!(b.publish.status, PublishStatus::Done(_)) {
            b.publish.status = PublishStatus::Done(StepConclusion::Cancelled);
        }
        b.state = BuildState::Finished(conclusion);
        b.finished_at = Some(now);
        self.finished.insert(id.clone());
        let queue = (b.context.repo.clone(), b.pipeline.name.clone());
        let kind = b.pipeline.kind;
        let key = b.supersede_key();
        let step_leases: Vec<LeaseId> = b
            .steps
            .iter()
            .flat_map(|s| (1..=s.attempts.len() as u32 + 1).map(|a| step_lease_id(id, &s.name, a)))
            .collect();
        for step in gates {
            self.out.push(Effect::CancelTimer { timer: TimerId::Gate { build: id.clone(), step } });
        }
        if had_timeout {
            self.out.push(Effect::CancelTimer { timer: TimerId::BuildTimeout { build: id.clone() } });
        }
        if started {
            self.out.push(Effect::Cleanup { build: id.clone() });
        }
        self.publish(now, EventBody::BuildFinished { build: id.clone(), conclusion });
        // A downstream build's outcome is bound to its upstream commit, unless a newer build
        // of the same pipeline for that commit (a re-run) has replaced it.
        let finished_downstream = self.builds.get(id).and_then(|b| {
            let up = b.context.upstream.as_ref()?;
            let current = self.downstream.get(&up.repo).is_some_and(|rs| {
                rs.iter().any(|r| {
                    r.upstream_commit == up.commit
                        && r.repo == b.context.repo
                        && r.pipeline == b.pipeline.name
                        && r.build == id.0
                })
            });
            current.then(|| DownstreamResult {
                upstream_repo: up.repo.clone(),
                upstream_commit: up.commit.clone(),
                repo: b.context.repo.clone(),
                pipeline: b.pipeline.name.clone(),
                build: id.0.clone(),
                commit: b.context.commit.clone(),
                state: DownstreamState::of(conclusion),
                at: now,
            })
        });
        if let Some(result) = finished_downstream {
            self.record_downstream(result, now);
        }
        // A deploy that succeeded is what now runs in its environment.
        if kind == PipelineKind::Deploy
            && conclusion == Conclusion::Success
            && let Some(b) = self.builds.get(id)
        {
            let (repo, name, commit) = (b.context.repo.clone(), b.pipeline.name.clone(), b.context.commit.clone());
            let by = b.context.actor.clone().unwrap_or_default();
            let approved_by = self
                .environments
                .get(&repo)
                .and_then(|e| e.get(&name))
                .filter(|e| e.commit == commit)
                .map(|e| e.approved_by.clone())
                .unwrap_or_default();
            let promoted = b.context.event.kind == crate::spec::EventKind::Promotion;
            let env = Environment { commit, since: now, by, approved_by, build: Some(id.clone()), promoted };
            self.environments.entry(repo).or_default().insert(name, env);
        }
        // Every lease of the build ends while handling the same input that records its end,
        // so a restart can never find a finished build still holding units.
        for lease in std::iter::once(pipeline_lease_id(id)).chain(step_leases) {
            if self.lease_owners.contains_key(&lease) {
                self.release_owned(&lease, now);
            }
        }
        match kind {
            PipelineKind::Test => {
                if let Some(set) = self.test_builds.get_mut(&key) {
                    set.remove(id);
                    if set.is_empty() {
                        self.test_builds.remove(&key);
                    }
                }
            }
            PipelineKind::Deploy => {
                // The next deploy of the same pipeline may go now.
                let next = self.deploy_queues.get_mut(&queue).and_then(|q| {
                    q.retain(|b| b != id);
                    q.front().cloned()
                });
                if self.deploy_queues.get(&queue).is_some_and(VecDeque::is_empty) {
                    self.deploy_queues.remove(&queue);
                }
                if let Some(next) = next
                    && self.builds.get(&next).is_some_and(|b| b.state == BuildState::WaitingForTurn)
                {
                    self.admit(&next, now);
                }
            }
        }
    }

    // ---- the publish phase -----------------------------------------------------------------

    /// Whether a build's publish phase should begin now: it has deliverables, has not begun,
    /// and every ordinary step has settled.
    fn publish_due(&self, id: &BuildId) -> bool {
        let Some(b) = self.builds.get(id) else { return false };
        b.state == BuildState::Running
            && b.ending.is_none()
            && !b.pipeline.deliverables.is_empty()
            && b.publish.status == PublishStatus::Pending
            && b.pipeline
                .steps
                .iter()
                .zip(&b.steps)
                .filter(|(spec, _)| spec.when.status == RunStatus::OnSuccess)
                .all(|(_, s)| matches!(s.status, StepStatus::Done(_)))
    }

    /// Starts the publish phase, or skips it with the reason: after a failure there is nothing
    /// worth publishing, and an untrusted build publishes nothing at all.
    fn begin_publish(&mut self, id: &BuildId, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        let skip = if (0..b.steps.len()).any(|j| failed(b, j)) {
            Some(("a step did not succeed, so nothing is published".to_owned(), false))
        } else if b.steps.iter().zip(&b.pipeline.steps).any(|(s, spec)| {
            spec.when.status == RunStatus::OnSuccess && s.status == StepStatus::Done(StepConclusion::Cancelled)
        }) {
            Some(("a step was cancelled, so nothing is published".to_owned(), false))
        } else if !b.context.trusted {
            let reason = "an untrusted build (a fork's pull request no maintainer approved) publishes nothing";
            Some((reason.to_owned(), true))
        } else {
            None
        };
        match skip {
            Some((reason, untrusted)) => {
                b.publish.status = PublishStatus::Done(StepConclusion::Skipped);
                b.untrusted_skips |= untrusted;
                let step = spec::PUBLISH_STEP.to_owned();
                self.publish(now, EventBody::StepSkipped { build: id.clone(), step, reason });
            }
            None => self.start_publish(id, 1, now),
        }
    }

    /// The job of one attempt of a build's publish phase. A promoted deliverable carries what
    /// its source pipeline published for the same commit (the newest record of each artifact).
    fn publish_job(&self, b: &Build, attempt: u32) -> PublishJob {
        let sources: BTreeSet<&str> = b.pipeline.deliverables.iter().filter_map(spec::Deliverable::from).collect();
        let mut promoted: Vec<DeliverableRecord> = Vec::new();
        for r in self.deliverables(&b.context.repo) {
            if r.commit == b.context.commit && sources.contains(r.pipeline.as_str()) {
                let same = |o: &DeliverableRecord| {
                    o.artifact.kind == r.artifact.kind
                        && o.artifact.name == r.artifact.name
                        && o.artifact.file == r.artifact.file
                        && o.pipeline == r.pipeline
                };
                promoted.retain(|o| !same(o));
                promoted.push(r.clone());
            }
        }
        PublishJob {
            build: b.id.clone(),
            pipeline: b.pipeline.name.clone(),
            attempt,
            context: b.context.clone(),
            deliverables: b.pipeline.deliverables.clone(),
            promoted,
        }
    }

    fn start_publish(&mut self, id: &BuildId, attempt: u32, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        b.publish.status = PublishStatus::Running { attempt };
        b.publish.attempts.push(Attempt {
            number: attempt,
            started_at: now,
            finished_at: None,
            conclusion: None,
            detail: String::new(),
        });
        let Some(b) = self.builds.get(id) else { return };
        let job = self.publish_job(b, attempt);
        let step = spec::PUBLISH_STEP.to_owned();
        self.publish(now, EventBody::StepStarted { build: id.clone(), step, attempt });
        self.out.push(Effect::PublishDeliverables(Box::new(job)));
    }

    /// A publisher's report: its artifacts are recorded (whatever the outcome, since they are
    /// out there), and a transient failure is tried again after a backoff.
    fn published(&mut self, id: &BuildId, attempt: u32, outcome: PublishOutcome, now: Timestamp) {
        let Some(b) = self.builds.get_mut(id) else { return };
        // A late or repeated report of an attempt that is no longer running changes nothing.
        if b.publish.status != (PublishStatus::Running { attempt }) {
            return;
        }
        let artifacts = match &outcome {
            PublishOutcome::Published { artifacts } | PublishOutcome::Failed { artifacts, .. } => artifacts.clone(),
        };
        let mut new_records = Vec::new();
        for mut artifact in artifacts {
            // The record says which build first produced the bytes; the artifact's own field
            // only carries that from the publisher, so it is taken out of it here.
            let first_build = artifact.first_build.take().unwrap_or_else(|| id.clone());
            let record = DeliverableRecord {
                first_build,
                artifact,
                build: id.clone(),
                repo: b.context.repo.clone(),
                pipeline: b.pipeline.name.clone(),
                commit: b.context.commit.clone(),
                at: now,
            };
            // Publishing again after a retry reports the same artifacts: recorded once.
            if !b.publish.records.iter().any(|r| r.artifact == record.artifact) {
                b.publish.records.push(record.clone());
                new_records.push(record);
            }
        }
        let cancelling = b.ending.is_some();
        let (conclusion, detail, retry) = match &outcome {
            PublishOutcome::Published { .. } => {
                let n = b.publish.records.len();
                (StepConclusion::Success, format!("published {n} artifact{}", if n == 1 { "" } else { "s" }), false)
            }
            PublishOutcome::Failed { deliverable, message, transient, .. } => {
                let retry = *transient && attempt < publish::MAX_PUBLISH_ATTEMPTS && !cancelling;
                let conclusion = if *transient { StepConclusion::Errored } else { StepConclusion::Failed };
                (conclusion, format!("{deliverable}: {message}"), retry)
            }
        };
        if let Some(a) = b.publish.attempts.last_mut() {
            a.finished_at = Some(now);
            a.conclusion = Some(conclusion);
            a.detail = detail.clone();
        }
        b.publish.status = if retry {
            PublishStatus::Waiting { attempt }
        } else if cancelling && conclusion == StepConclusion::Errored {
            PublishStatus::Done(StepConclusion::Cancelled)
        } else {
            PublishStatus::Done(conclusion)
        };
        let repo = b.context.repo.clone();
        let kept = self.published.entry(repo).or_default();
        kept.extend(new_records.iter().cloned());
        let excess = kept.len().saturating_sub(KEPT_DELIVERABLES);
        kept.drain(..excess);
        for record in new_records {
            self.publish(now, EventBody::DeliverablePublished { build: id.clone(), deliverable: Box::new(record) });
        }
        let step = spec::PUBLISH_STEP.to_owned();
        self.publish(
            now,
            EventBody::StepFinished { build: id.clone(), step, attempt, conclusion, detail, will_retry: retry },
        );
        if retry {
            let timer = TimerId::PublishRetry { build: id.clone(), attempt: attempt + 1 };
            self.out.push(Effect::ArmTimer { timer, at: now + publish::publish_backoff(attempt + 1) });
        }
        self.after_step_change(id, now);
    }

    // ---- gates -----------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        id: &BuildId,
        name: &str,
        actor: Actor,
        person: String,
        approve: bool,
        comment: Option<String>,
        now: Timestamp,
    ) {
        let author =
            self.builds.get(id).and_then(|b| self.commit_author(&b.context.repo, &b.context.commit)).map(str::to_owned);
        let Some(b) = self.builds.get_mut(id) else { return };
        let Some(index) = b.step_index(name) else { return };
        let refuse = |reason: &str| EventBody::DecisionRefused {
            build: id.clone(),
            step: name.to_owned(),
            by: actor.login.clone(),
            reason: reason.to_owned(),
        };
        let Action::Gate(gate) = &b.pipeline.steps[index].action else {
            let body = refuse("this step is not a gate");
            self.publish(now, body);
            return;
        };
        if b.steps[index].status != StepStatus::AtGate {
            let body = refuse("the gate is not waiting for a decision");
            self.publish(now, body);
            return;
        }
        let facts = policy::GateFacts {
            gate,
            person: &person,
            login: &actor.login,
            teams: &actor.teams,
            can_write: actor.can_write,
            approve,
            build_actor: b.context.actor.as_deref(),
            commit_author: author.as_deref(),
            approved_by: &b.steps[index].approvals,
        };
        if let Err(refusals) = policy::check_gate_approval(&facts) {
            let reasons: Vec<String> = refusals.iter().map(ToString::to_string).collect();
            let body = refuse(&reasons.join("; "));
            self.publish(now, body);
            return;
        }
        let needed = if gate.kind == GateKind::Hold { 1 } else { gate.approvals };
        let state = &mut b.steps[index];
        if !approve {
            state.status = StepStatus::Done(StepConclusion::Rejected);
            self.publish(
                now,
                EventBody::Rejected { build: id.clone(), step: name.to_owned(), by: actor.login, comment },
            );
        } else {
            // Approvals are counted per person, so two identities of one person count once.
            state.approvals.push(person);
            let count = state.approvals.len() as u32;
            if count >= needed {
                state.status = StepStatus::Done(StepConclusion::Success);
            }
            self.publish(
                now,
                EventBody::Approved {
                    build: id.clone(),
                    step: name.to_owned(),
                    by: actor.login,
                    comment,
                    count,
                    needed,
                },
            );
        }
        if matches!(self.step_mut(id, name).map(|s| &s.status), Some(StepStatus::Done(_))) {
            self.out.push(Effect::CancelTimer { timer: TimerId::Gate { build: id.clone(), step: name.to_owned() } });
        }
        self.after_step_change(id, now);
    }

    // ---- leases ----------------------------------------------------------------------------

    fn configure(&mut self, config: Config, now: Timestamp) {
        if config.pools != self.config.pools {
            match self.leases.configure(config.pools.clone(), now) {
                Ok(events) => {
                    self.leases_touched = true;
                    self.lease_events(events, now);
                }
                Err(error) => {
                    // The pools were checked when the configuration was read; if they are
                    // still refused, the old pools stay, and the event stream says why.
                    let reason = format!("the new pools were refused: {error}");
                    self.publish(now, EventBody::LeaseRefused { lease: None, reason });
                    self.config = Config { pools: self.config.pools.clone(), ..config };
                    return;
                }
            }
        }
        // More run slots start waiting steps at once: `handle` schedules after every input.
        self.config = config;
    }

    fn tick(&mut self, now: Timestamp) {
        // Live builds renew their leases: their holder is this machine, and it is alive.
        let renewals: Vec<(LeaseId, u64)> = self
            .lease_owners
            .keys()
            .filter_map(|l| self.leases.lease(l).map(|lease| (l.clone(), lease.token)))
            .collect();
        for (lease, token) in renewals {
            let result = self.leases.renew(&lease, token, now);
            self.lease_result(result, None, now);
        }
        let events = self.leases.tick(now);
        self.lease_events(events, now);
    }

    fn release_owned(&mut self, lease: &LeaseId, now: Timestamp) {
        if self.lease_owners.remove(lease).is_none() {
            return;
        }
        if let Some(token) = self.leases.lease(lease).map(|l| l.token) {
            let result = self.leases.release(lease, token, now);
            self.lease_result(result, None, now);
        } else {
            let events = self.leases.cancel(lease, now);
            self.lease_events(events, now);
        }
    }

    fn lease_result(
        &mut self,
        result: Result<Vec<LeaseEvent>, lease::LeaseError>,
        requested: Option<LeaseId>,
        now: Timestamp,
    ) {
        self.leases_touched = true;
        match result {
            Ok(events) => self.lease_events(events, now),
            Err(error) => {
                // Whoever asked (a person, through the API) learns why from the event stream.
                let lease = requested.as_ref().map(|l| l.0.clone());
                self.publish(now, EventBody::LeaseRefused { lease, reason: error.to_string() });
                // A build asked for something the pools cannot give: the build cannot run.
                if let Some(lease) = requested
                    && let Some(owner) = self.lease_owners.remove(&lease)
                {
                    let build = match owner {
                        LeaseOwner::Pipeline(b) | LeaseOwner::Step(b, _, _) => b,
                    };
                    self.end_build(
                        &build,
                        "cib",
                        Conclusion::Errored,
                        &format!("resources cannot be granted: {error}"),
                        now,
                    );
                }
            }
        }
    }

    /// The answer to a person's operation on their lease; a refusal names the lease.
    fn person_result(&mut self, result: Result<Vec<LeaseEvent>, lease::LeaseError>, lease: &LeaseId, now: Timestamp) {
        match result {
            Ok(events) => self.lease_events(events, now),
            Err(error) => {
                self.leases_touched = true;
                self.publish(now, EventBody::LeaseRefused { lease: Some(lease.0.clone()), reason: error.to_string() });
            }
        }
    }

    fn lease_events(&mut self, events: Vec<LeaseEvent>, now: Timestamp) {
        self.leases_touched = true;
        for event in events {
            match event {
                LeaseEvent::Waiting { id, positions } => {
                    let holder = self
                        .leases
                        .waiting()
                        .iter()
                        .find(|w| w.request.id == id)
                        .map(|w| holder_text(&w.request.holder))
                        .unwrap_or_default();
                    let positions = positions.into_iter().collect();
                    self.publish(now, EventBody::LeaseWaiting { lease: id.0, holder, positions });
                }
                LeaseEvent::Granted { lease } => {
                    let units: BTreeMap<String, Vec<String>> = lease.units.clone().into_iter().collect();
                    self.publish(
                        now,
                        EventBody::LeaseGranted {
                            lease: lease.id.0.clone(),
                            holder: holder_text(&lease.holder),
                            units,
                            token: lease.token,
                            expires_at: lease.expires_at,
                        },
                    );
                    self.granted(&lease.id, now);
                }
                LeaseEvent::Renewed { id, token, expires_at } => {
                    // Renewals of build leases happen on every tick; they are not news.
                    if !self.lease_owners.contains_key(&id) {
                        self.publish(now, EventBody::LeaseRenewed { lease: id.0, token, expires_at });
                    }
                }
                LeaseEvent::Warning { id, deadline, .. } => {
                    let holder = self.leases.lease(&id).map(|l| holder_text(&l.holder)).unwrap_or_default();
                    self.publish(now, EventBody::LeaseWarning { lease: id.0, holder, deadline });
                }
                LeaseEvent::Expired { id, token } => {
                    self.publish(now, EventBody::LeaseExpired { lease: id.0.clone(), token });
                    self.lost(&id, now);
                }
                LeaseEvent::Released { id, token } => {
                    self.publish(now, EventBody::LeaseReleased { lease: id.0, token })
                }
                LeaseEvent::Revoked { id, token } => {
                    self.publish(now, EventBody::LeaseRevoked { lease: id.0.clone(), token });
                    self.lost(&id, now);
                }
                LeaseEvent::Cancelled { id } => self.publish(now, EventBody::LeaseCancelled { lease: id.0 }),
                LeaseEvent::Refused { id, error } => {
                    self.publish(now, EventBody::LeaseCancelled { lease: id.0.clone() });
                    self.lease_result(Err(error), Some(id), now);
                }
            }
        }
    }

    /// A build's lease was granted: the build or the step goes on.
    fn granted(&mut self, lease: &LeaseId, now: Timestamp) {
        let Some(owner) = self.lease_owners.get(lease).cloned() else { return };
        let units = self.units_of(lease);
        match owner {
            LeaseOwner::Pipeline(build) => {
                let Some(b) = self.builds.get_mut(&build) else { return };
                if b.state != BuildState::WaitingForResources {
                    return;
                }
                b.pipeline_units = units;
                self.run(&build, now);
            }
            LeaseOwner::Step(build, step, attempt) => {
                let Some(b) = self.builds.get_mut(&build) else { return };
                let Some(index) = b.step_index(&step) else { return };
                if b.steps[index].status != (StepStatus::WaitingForLease { attempt }) {
                    return;
                }
                b.steps[index].units = units;
                b.steps[index].status = StepStatus::Ready { attempt };
                self.ready.push_back((build, step));
            }
        }
    }

    /// A build lost a lease it held (expired or revoked): it cannot trust its resources.
    fn lost(&mut self, lease: &LeaseId, now: Timestamp) {
        if let Some(owner) = self.lease_owners.remove(lease) {
            let build = match owner {
                LeaseOwner::Pipeline(b) | LeaseOwner::Step(b, _, _) => b,
            };
            self.end_build(&build, "cib", Conclusion::Errored, &format!("lease {} was lost", lease.0), now);
        }
    }

    fn units_of(&self, lease: &LeaseId) -> Vec<GrantedUnit> {
        let Some(l) = self.leases.lease(lease) else { return Vec::new() };
        let mut out = Vec::new();
        for (pool, units) in &l.units {
            for unit in units {
                out.push(GrantedUnit {
                    pool: pool.clone(),
                    unit: unit.clone(),
                    metadata: self.unit_metadata(pool, unit),
                });
            }
        }
        out
    }

    fn unit_metadata(&self, pool: &str, unit: &str) -> BTreeMap<String, String> {
        self.config
            .pools
            .iter()
            .filter(|p| p.name == pool)
            .find_map(|p| match &p.kind {
                PoolKind::Units(units) => units.iter().find(|u| u.name == unit).map(|u| u.metadata.clone()),
                PoolKind::Counting { .. } => None,
            })
            .unwrap_or_default()
    }

    fn arm_lease_timer(&mut self) {
        let next = self.leases.next_wakeup();
        if next != self.lease_timer {
            if self.lease_timer.is_some() {
                self.out.push(Effect::CancelTimer { timer: TimerId::Leases });
            }
            if let Some(at) = next {
                self.out.push(Effect::ArmTimer { timer: TimerId::Leases, at });
            }
            self.lease_timer = next;
        }
    }
}

/// A holder in words, for events: `build 42`, `build 42 step e2e`, `alice`.
pub fn holder_text(holder: &Holder) -> String {
    match holder {
        Holder::Build { build, step: None } => format!("build {build}"),
        Holder::Build { build, step: Some(step) } => format!("build {build} step {step}"),
        Holder::Person { login } => login.clone(),
    }
}

/// A build being enqueued, apart from its spec.
struct NewBuild {
    id: BuildId,
    context: BuildContext,
    only: Option<Vec<String>>,
    variables: BTreeMap<String, String>,
}

/// What to do with the next step that can move.
enum Move {
    Skip(String),
    /// Skipped because the build is not trusted with the step's secrets: the build then
    /// concludes `neutral` at best, never `success`.
    SkipUntrusted(String),
    Start,
}

fn is_ok(b: &Build, name: &str) -> bool {
    let Some(i) = b.step_index(name) else { return false };
    match b.steps[i].status {
        StepStatus::Done(StepConclusion::Success) => true,
        StepStatus::Done(StepConclusion::Skipped) => false,
        StepStatus::Done(_) => b.pipeline.steps[i].allow_failure,
        _ => false,
    }
}

fn is_done(b: &Build, name: &str) -> bool {
    b.step_index(name).is_some_and(|i| matches!(b.steps[i].status, StepStatus::Done(_)))
}

/// A failure that counts against the build (allowed failures do not).
fn failed(b: &Build, i: usize) -> bool {
    matches!(
        b.steps[i].status,
        StepStatus::Done(
            StepConclusion::Failed
                | StepConclusion::TimedOut
                | StepConclusion::Errored
                | StepConclusion::Interrupted
                | StepConclusion::Rejected
        )
    ) && !b.pipeline.steps[i].allow_failure
}

/// Whether the publish phase failed (a failed deliverable fails the build).
fn publish_failed(b: &Build) -> bool {
    matches!(b.publish_conclusion(), Some(StepConclusion::Failed | StepConclusion::Errored))
}

/// The first pending step, in spec order, that can be skipped or started now.
fn next_move(b: &Build) -> Option<(usize, Move)> {
    for (i, step) in b.pipeline.steps.iter().enumerate() {
        if b.steps[i].status != StepStatus::Pending {
            continue;
        }
        if !step.depends_on.iter().all(|d| is_done(b, d)) {
            continue;
        }
        let status = step.when.status;
        if status != RunStatus::OnSuccess {
            // Steps that run on failure or always are the pipeline's finalizers: they wait
            // until every ordinary step has settled, so that "did anything fail" is known.
            let ordinary_settled = b
                .pipeline
                .steps
                .iter()
                .enumerate()
                .filter(|(j, s)| *j != i && s.when.status == RunStatus::OnSuccess)
                .all(|(j, _)| matches!(b.steps[j].status, StepStatus::Done(_)));
            // The publish phase counts as an ordinary step: finalizers run after it.
            if !ordinary_settled || !b.publish_settled() {
                continue;
            }
            let any_failed = (0..b.steps.len()).any(|j| failed(b, j)) || publish_failed(b);
            if status == RunStatus::OnFailure && !any_failed {
                return Some((i, Move::Skip("nothing failed".into())));
            }
        } else if let Some(d) = step.depends_on.iter().find(|d| !is_ok(b, d)) {
            return Some((i, Move::Skip(format!("'{d}' did not succeed"))));
        }
        if !step.when.admits(&b.context.event) {
            return Some((i, Move::Skip("its 'when' does not match this event".into())));
        }
        if !b.context.trusted && !step.secrets.is_empty() {
            return Some((
                i,
                Move::SkipUntrusted(
                    "a fork's pull request runs no step with secrets until a maintainer approves its head".into(),
                ),
            ));
        }
        if !step.services.iter().all(|s| b.services_ready.contains(s)) {
            continue;
        }
        return Some((i, Move::Start));
    }
    None
}

/// The conclusion of a build whose steps are all done.
fn conclude(b: &Build) -> Conclusion {
    let counted = |c: StepConclusion| {
        b.steps.iter().zip(&b.pipeline.steps).any(|(s, spec)| s.status == StepStatus::Done(c) && !spec.allow_failure)
            || b.publish_conclusion() == Some(c)
    };
    // An interrupted step says nothing about the code either: the build errored.
    if counted(StepConclusion::Errored) || counted(StepConclusion::Interrupted) {
        Conclusion::Errored
    } else if counted(StepConclusion::TimedOut) {
        Conclusion::TimedOut
    } else if counted(StepConclusion::Failed) || counted(StepConclusion::Rejected) {
        Conclusion::Failed
    } else if counted(StepConclusion::Cancelled) {
        Conclusion::Cancelled
    } else if b.untrusted_skips {
        Conclusion::Neutral
    } else {
        Conclusion::Success
    }
}

/// The conclusion of an attempt, a description, and what kind of reason it is for retries.
fn classify(result: &StepResult, stopping: Option<StopReason>) -> (StepConclusion, String, Option<RetryOn>) {
    // When the machine stopped the step, its reason wins over what the container said.
    match stopping {
        Some(StopReason::TimedOut) => {
            return (StepConclusion::TimedOut, "ran past its timeout".into(), Some(RetryOn::Timeout));
        }
        Some(StopReason::NoOutput) => {
            return (StepConclusion::TimedOut, "printed nothing for too long".into(), Some(RetryOn::Timeout));
        }
        Some(StopReason::Cancelled) => return (StepConclusion::Cancelled, "cancelled".into(), None),
        None => {}
    }
    match result {
        StepResult::Exited(0) => (StepConclusion::Success, "exit code 0".into(), None),
        StepResult::Exited(code) => (StepConclusion::Failed, format!("exit code {code}"), Some(RetryOn::Failure)),
        StepResult::TimedOut => (StepConclusion::TimedOut, "ran past its timeout".into(), Some(RetryOn::Timeout)),
        StepResult::NoOutput => {
            (StepConclusion::TimedOut, "printed nothing for too long".into(), Some(RetryOn::Timeout))
        }
        StepResult::OutOfMemory => (StepConclusion::Failed, "out of memory".into(), Some(RetryOn::Failure)),
        StepResult::Cancelled => (StepConclusion::Cancelled, "cancelled".into(), None),
        StepResult::Infrastructure(message) => {
            (StepConclusion::Errored, format!("infrastructure error: {message}"), Some(RetryOn::Infrastructure))
        }
        StepResult::Interrupted(message) => {
            (StepConclusion::Interrupted, format!("interrupted: {message}"), Some(RetryOn::Infrastructure))
        }
    }
}

fn should_retry(policy: &spec::RetryPolicy, result: &StepResult, reason: Option<RetryOn>) -> bool {
    if let StepResult::Exited(code) = result
        && *code != 0
        && policy.exit_codes.contains(code)
    {
        return true;
    }
    reason.is_some_and(|r| policy.on.contains(&r))
}

/// Environment of one attempt: the pipeline's variables, the step's, those given when the build
/// started, then cib's own, each winning over the ones before.
/// The job of one attempt of a build's step, from what the build holds: the same whenever it is
/// asked, so a restarted engine gets the job the attempt started with.
fn job_of(b: &Build, index: usize, attempt: u32) -> StepJob {
    let step = b.pipeline.steps[index].clone();
    let mut resources = b.pipeline_units.clone();
    resources.extend(b.steps[index].units.iter().cloned());
    let env = step_env(b, &step, attempt, &resources);
    let upcoming = b
        .pipeline
        .steps
        .iter()
        .zip(&b.steps)
        .enumerate()
        .filter(|(i, (s, state))| {
            *i != index
                && matches!(s.action, Action::Run { .. })
                && matches!(
                    state.status,
                    StepStatus::Pending | StepStatus::WaitingForLease { .. } | StepStatus::Ready { .. }
                )
        })
        .map(|(_, (s, _))| s.clone())
        .collect();
    StepJob {
        build: b.id.clone(),
        pipeline: b.pipeline.name.clone(),
        step,
        attempt,
        context: b.context.clone(),
        env,
        resources,
        upcoming,
    }
}

fn step_env(b: &Build, step: &spec::Step, attempt: u32, resources: &[GrantedUnit]) -> BTreeMap<String, String> {
    let mut env = b.pipeline.env.clone();
    env.extend(step.env.clone());
    env.extend(b.variables.clone());
    let ctx = &b.context;
    env.insert("CI".into(), "true".into());
    env.insert("CIB".into(), "true".into());
    env.insert("CIB_BUILD".into(), b.id.0.clone());
    env.insert("CIB_PIPELINE".into(), b.pipeline.name.clone());
    env.insert("CIB_STEP".into(), step.name.clone());
    env.insert("CIB_ATTEMPT".into(), attempt.to_string());
    env.insert("CIB_REPO".into(), ctx.repo.clone());
    env.insert("CIB_COMMIT".into(), ctx.commit.clone());
    env.insert("CIB_EVENT".into(), ctx.event.kind.as_str().to_owned());
    if let Some(up) = &ctx.upstream {
        env.insert("UPSTREAM_REPO".into(), up.repo.clone());
        env.insert("UPSTREAM_COMMIT".into(), up.commit.clone());
    }
    if let Some(branch) = &ctx.branch {
        env.insert("CIB_BRANCH".into(), branch.clone());
    }
    if let Some(pr) = ctx.pull_request {
        env.insert("CIB_PULL_REQUEST".into(), pr.to_string());
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for unit in resources {
        let n = index.entry(unit.pool.as_str()).or_insert(0);
        let prefix = format!("CIB_RESOURCE_{}_{n}", env_key(&unit.pool));
        env.insert(format!("{prefix}_NAME"), unit.unit.clone());
        for (k, v) in &unit.metadata {
            env.insert(format!("{prefix}_{}", env_key(k)), v.clone());
        }
        *n += 1;
    }
    env
}

/// `staging-env` becomes `STAGING_ENV`.
fn env_key(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}
