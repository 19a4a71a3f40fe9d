//! The ports: the traits through which the engine reaches the world. Backends implement them
//! (`cib-docker` the executor, `cib-github` the VCS and notifier, a store crate the store), and
//! `testing` has fakes of each.
//!
//! Every port error says its kind, so that the engine decides what to retry without knowing
//! the backend: a transient error may succeed later, a permanent one will not, and a
//! misconfigured one needs a person.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use crate::pipeline::{Input, StepJob, StopReason};
use crate::spec;
use crate::time::Timestamp;

/// What kind of failure an error is, whatever the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Worth trying again: a timeout, a connection reset, a busy database.
    Transient,
    /// Trying again will not help: a missing image, a malformed request.
    Permanent,
    /// A person must fix the setup: no Docker daemon, a wrong token.
    Misconfigured,
}

macro_rules! port_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[non_exhaustive]
        pub enum $name {
            #[error("{0}")]
            Transient(String),
            #[error("{0}")]
            Permanent(String),
            #[error("{0}")]
            Misconfigured(String),
        }

        impl $name {
            pub fn kind(&self) -> ErrorKind {
                match self {
                    $name::Transient(_) => ErrorKind::Transient,
                    $name::Permanent(_) => ErrorKind::Permanent,
                    $name::Misconfigured(_) => ErrorKind::Misconfigured,
                }
            }

            pub fn message(&self) -> &str {
                match self {
                    $name::Transient(m) | $name::Permanent(m) | $name::Misconfigured(m) => m,
                }
            }
        }
    };
}

port_error!(
    /// The executor could not run a step properly (not: the step failed).
    ExecError
);
port_error!(
    /// The version control system could not answer.
    VcsError
);
port_error!(
    /// A notifier could not deliver an event.
    NotifyError
);
port_error!(
    /// The store could not read or write.
    StoreError
);

/// How a step's process ended. A failing test is `Exited(1)`: a value, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Exited(i32),
    TimedOut,
    NoOutput,
    OutOfMemory,
    Cancelled,
}

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Where an executor sends a step's output, already masked of secrets. Writing must not
/// block: the engine batches output on its own task.
pub trait LogSink: Send + Sync {
    fn write(&self, stream: Stream, bytes: &[u8]);
}

/// One attempt of a step as the executor gets it: the job, the values of its secrets, and
/// the workspace (the repository checked out at the build's commit).
#[derive(Clone)]
pub struct StepRun {
    pub job: StepJob,
    /// Secret values by name, passed as environment variables and masked in the output.
    pub secrets: std::collections::BTreeMap<String, String>,
    /// Values of every other secret the build holds: not given to this step, but masked in its
    /// output too, since a step can print what another one left in the shared workspace.
    pub mask: Vec<String>,
    pub workspace: std::path::PathBuf,
}

impl std::fmt::Debug for StepRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret values never reach a log line, even a debug one.
        f.debug_struct("StepRun")
            .field("job", &self.job)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("mask", &self.mask.len())
            .field("workspace", &self.workspace)
            .finish()
    }
}

/// A request to stop a running step, which the executor watches while it runs one.
#[derive(Debug, Clone)]
pub struct StopSignal {
    rx: tokio::sync::watch::Receiver<Option<StopReason>>,
}

/// The sending side of a [`StopSignal`].
#[derive(Debug)]
pub struct StopHandle {
    tx: tokio::sync::watch::Sender<Option<StopReason>>,
}

impl StopSignal {
    pub fn new() -> (StopHandle, StopSignal) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (StopHandle { tx }, StopSignal { rx })
    }

    /// Whether a stop was asked for, and why.
    pub fn reason(&self) -> Option<StopReason> {
        *self.rx.borrow()
    }

    /// Waits until a stop is asked for. Never returns if the handle is dropped without one.
    pub async fn stopped(&mut self) -> StopReason {
        loop {
            if let Some(reason) = *self.rx.borrow_and_update() {
                return reason;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl StopHandle {
    pub fn stop(&self, reason: StopReason) {
        let _ = self.tx.send(Some(reason));
    }
}

/// Runs steps and services in isolation. Every container, volume and network it makes is
/// released on every path, and `reconcile` removes what a crashed engine left behind.
#[async_trait]
pub trait Executor: Send + Sync {
    /// Whether the executor can run anything at all (the daemon answers, say).
    async fn healthcheck(&self) -> Result<(), ExecError>;

    /// Runs one attempt of a step, streaming output (masked of the values of `secrets` and
    /// `mask`) into `logs`, until it ends or `stop` fires.
    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, stop: StopSignal) -> Result<Outcome, ExecError>;

    /// Starts a build's services and returns once each passed its readiness check; the
    /// error names the service that did not.
    async fn start_services(&self, build: &BuildId, services: &[spec::Service]) -> Result<(), (String, ExecError)>;

    /// Removes everything of the build: services, network, workspace copies.
    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError>;

    /// Copies what the build's steps left in their workspace into `dest` (the build's host
    /// workspace), so that the deliverables are published from the files the steps made.
    /// The default does nothing: for an executor whose steps work in `dest` itself.
    async fn export_workspace(&self, _build: &BuildId, _dest: &Path) -> Result<(), ExecError> {
        Ok(())
    }

    /// Puts the files of a gzip-compressed tar archive (an artifact of another build) into the
    /// workspace `run` works in. The engine has unpacked it over the host workspace already,
    /// so the default does nothing: for an executor whose steps work in that directory.
    async fn import_archive(&self, _run: &StepRun, _archive: &Path) -> Result<(), ExecError> {
        Ok(())
    }

    /// Restores a cache into the workspace `run` works in, before the step: the cache of
    /// `cache.key` in the first of `cache.reads` that has it, else the newest whose key starts
    /// with one of `cache.restore_keys` (in order). Answers the key restored, if any. The
    /// default keeps no caches.
    async fn restore_cache(&self, _run: &StepRun, _cache: &CacheJob) -> Result<Option<String>, ExecError> {
        Ok(None)
    }

    /// Saves the cache's paths of the workspace under `cache.key` in `cache.write`, after the
    /// step succeeded, unless a cache of that key is there already. Two saves of one key at
    /// once leave one whole cache. Answers whether this call saved it.
    async fn save_cache(&self, _run: &StepRun, _cache: &CacheJob) -> Result<bool, ExecError> {
        Ok(false)
    }

    /// The caches kept for `repo`, newest first. The default keeps none.
    async fn list_caches(&self, _repo: &str) -> Result<Vec<CacheInfo>, ExecError> {
        Ok(Vec::new())
    }

    /// Removes the caches of `repo` under `key`, in every namespace; answers how many.
    async fn remove_caches(&self, _repo: &str, _key: &str) -> Result<usize, ExecError> {
        Ok(0)
    }

    /// Removes what belongs to builds not in `live` (left by a crash). Returns how many
    /// resources it removed.
    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError>;

    /// Finds again the attempt `run` names, which an earlier engine process started, and
    /// follows it to its end: the output it printed past `offset` (bytes of masked output the
    /// store already holds) goes into `logs`, and a stop is honoured as in [`Executor::run`].
    /// An attempt still running is re-attached to; one that ended meanwhile gives its exit code
    /// and the rest of its output. [`Attached::Gone`] means nothing of it is left to follow.
    ///
    /// The default finds nothing, so an executor that cannot re-attach has its running steps
    /// reported as interrupted after a restart, as before this existed.
    async fn attach(
        &self,
        _run: &StepRun,
        _offset: u64,
        _logs: Arc<dyn LogSink>,
        _stop: StopSignal,
    ) -> Result<Attached, ExecError> {
        Ok(Attached::Gone)
    }

    /// The engine is going away while steps may still run: from now on, leave them running and
    /// remove nothing on their behalf, so that the next process can re-attach to them. Called
    /// once, as the engine stops.
    fn detach(&self) {}
}

/// One cache of a step, as the executor gets it: the key resolved, and the namespaces the
/// build may write and read ([`crate::policy::cache_namespaces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheJob {
    pub repo: String,
    pub key: String,
    pub restore_keys: Vec<String>,
    /// Workspace-relative paths the cache holds.
    pub paths: Vec<String>,
    pub write: String,
    pub reads: Vec<String>,
}

/// A kept cache, as `cib cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CacheInfo {
    pub key: String,
    /// `trusted`, or the pull request or build that wrote it (see `policy::cache_namespaces`).
    pub namespace: String,
    pub created_at: Timestamp,
}

/// What [`Executor::attach`] found of a step attempt that an earlier process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// The attempt ended, this way. `was_running` tells whether it was still running when it
    /// was found (re-attached) or had ended while no engine watched it.
    Ended { outcome: Outcome, was_running: bool },
    /// Nothing of the attempt is left (its container is gone): whether it ran to its end cannot
    /// be known.
    Gone,
}

/// How two revisions relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    /// Commits in `head` that `base` lacks.
    pub ahead: u32,
    /// Commits in `base` that `head` lacks; zero means `head` is up to date with `base`.
    pub behind: u32,
}

impl Comparison {
    /// `base` can be fast-forwarded to `head`.
    pub fn can_fast_forward(&self) -> bool {
        self.behind == 0
    }
}

/// A user's access to a repository, from the forge's permission API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    None,
    Read,
    Write,
    Admin,
}

/// The version control system: specs, workspaces, comparisons and fast-forwards.
#[async_trait]
pub trait Vcs: Send + Sync {
    /// The spec's text at `rev`, or `None` when the file does not exist there.
    async fn read_spec(&self, repo: &str, rev: &str) -> Result<Option<String>, VcsError>;

    /// Writes the repository's files at `rev` into `dest` (an empty directory).
    async fn prepare_workspace(&self, repo: &str, rev: &str, dest: &Path) -> Result<(), VcsError>;

    /// Compares `head` with `base`.
    async fn compare(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, VcsError>;

    /// Moves `branch` to `to`, only by fast-forward; anything else is refused.
    async fn fast_forward(&self, repo: &str, branch: &str, to: &str) -> Result<(), VcsError>;

    /// The commit a branch points at.
    async fn resolve(&self, repo: &str, rev: &str) -> Result<String, VcsError>;

    /// A user's permission on the repository.
    async fn permission(&self, repo: &str, user: &str) -> Result<Permission, VcsError>;

    /// The people whose latest review of a pull request approves exactly `head`, when the forge
    /// has reviews of its own (`None` when it has not: cib's own records count then).
    async fn approving_reviews(&self, _repo: &str, _pull: u64, _head: &str) -> Result<Option<Vec<String>>, VcsError> {
        Ok(None)
    }

    /// Who wrote a commit, as the forge names people, when it can tell. Used only to refuse
    /// self-approval, never to grant anything.
    async fn author(&self, _repo: &str, _rev: &str) -> Result<Option<String>, VcsError> {
        Ok(None)
    }
    /// Whether `commit` is reachable from a branch of `repo` itself. A fork's head is held
    /// only under a pull request's ref, so it is not: starting it by hand would run a
    /// stranger's code as trusted. `None` when the backend cannot tell.
    async fn on_branch(&self, _repo: &str, _commit: &str) -> Result<Option<bool>, VcsError> {
        Ok(None)
    }

    /// The repository's default branch, when the backend knows it (`None` when it cannot tell).
    /// Its spec is where the workflow looks first for the names of the branches it protects.
    async fn default_branch(&self, _repo: &str) -> Result<Option<String>, VcsError> {
        Ok(None)
    }

    /// Whether `user` belongs to `team` (a slug of the repository owner's teams, or
    /// `org/slug`), from the forge's own record; `None` when the backend has no teams, so that
    /// teams come from the operator's directory only.
    async fn team_member(&self, _repo: &str, _team: &str, _user: &str) -> Result<Option<bool>, VcsError> {
        Ok(None)
    }
}

/// Publishes events somewhere (commit statuses, chat, webhooks). Publishing the same event
/// twice must leave the same result, since events are replayed after a crash.
#[async_trait]
pub trait Notifier: Send + Sync {
    async fn publish(&self, event: &Event) -> Result<(), NotifyError>;

    /// A short name for metrics and logs (`github`, say).
    fn name(&self) -> &str {
        "notifier"
    }

    /// How many updates wait in this notifier's outbox, when it keeps one: a number that only
    /// grows says the receiving end is down.
    fn outbox_depth(&self) -> Option<usize> {
        None
    }
}

// ---- store ---------------------------------------------------------------------------------

/// An input as stored: what it was and when the engine took it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredInput {
    pub at: Timestamp,
    pub input: Input,
}

/// Names one step attempt's log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogKey {
    pub build: BuildId,
    pub step: String,
    pub attempt: u32,
}

/// A range of a log.
///
/// Offsets count the bytes the step printed, whether or not the store kept them all: past the
/// store's per-step limit, the middle of a log is dropped (see [`Store::append_log`]), and a read
/// that reaches the dropped part gets a marker line ([`omitted_marker`]) in `data` while
/// `next_offset` jumps over the gap. Offsets therefore never move, and a reader that follows a
/// live log never sees a byte twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRead {
    pub data: Vec<u8>,
    /// The offset to ask for next.
    pub next_offset: u64,
    /// The log is finished and `next_offset` is its end.
    pub complete: bool,
}

/// The line a log read returns in place of `omitted` bytes that the store did not keep.
pub fn omitted_marker(omitted: u64) -> String {
    format!("\n[cib: {omitted} bytes omitted]\n")
}

/// The default per-step log limit: 64 MiB.
pub const DEFAULT_LOG_LIMIT: u64 = 64 << 20;

/// How a store keeps a log that outgrows its limit: the first `head` bytes and the last `tail`
/// bytes, and nothing between them. Both parts are fixed when the log is created, so that a
/// store whose limit changes keeps reading its older logs the way they were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLimit {
    pub head: u64,
    pub tail: u64,
}

impl LogLimit {
    /// Splits `limit` bytes into a head of the first half and a tail of the rest.
    pub fn new(limit: u64) -> Self {
        LogLimit { head: limit / 2, tail: limit - limit / 2 }
    }

    /// Where the kept tail of a log of `length` bytes starts. Everything in `head..tail_start`
    /// is omitted; when the two are equal nothing is.
    pub fn tail_start(&self, length: u64) -> u64 {
        length.saturating_sub(self.tail).max(self.head.min(length))
    }

    /// The range of a log of `length` bytes that is omitted, if any.
    pub fn omitted(&self, length: u64) -> Option<std::ops::Range<u64>> {
        let tail_start = self.tail_start(length);
        (tail_start > self.head).then_some(self.head..tail_start)
    }

    /// Reads a log of `length` bytes kept under this limit from `offset`, as
    /// [`Store::read_log`] says: at most `max` bytes, with [`omitted_marker`] in place of the
    /// omitted range (a marker is never cut, but is always given when it comes first).
    /// `copy(pos, end, out)` appends kept bytes from `pos` towards `end` (never past it; a
    /// gap or the end of the log is never inside) and returns the offset it reached, which
    /// must be past `pos`. Returns the bytes and the offset to ask for next. Every store
    /// reads through this, so that they agree on where markers go.
    pub fn read<E>(
        &self,
        length: u64,
        offset: u64,
        max: usize,
        mut copy: impl FnMut(u64, u64, &mut Vec<u8>) -> Result<u64, E>,
    ) -> Result<(Vec<u8>, u64), E> {
        let omitted = self.omitted(length);
        let mut pos = offset.min(length);
        let mut data = Vec::new();
        while pos < length && data.len() < max {
            if let Some(gap) = omitted.as_ref().filter(|g| g.contains(&pos)) {
                let marker = omitted_marker(gap.end - pos);
                if !data.is_empty() && data.len() + marker.len() > max {
                    break;
                }
                data.extend_from_slice(marker.as_bytes());
                pos = gap.end;
                continue;
            }
            // Stop at the gap, at the log's end and at the caller's maximum.
            let stop = omitted.as_ref().filter(|g| pos < g.start).map_or(length, |g| g.start);
            let end = stop.min(pos.saturating_add((max - data.len()) as u64));
            pos = copy(pos, end, &mut data)?;
        }
        Ok((data, pos))
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(DEFAULT_LOG_LIMIT)
    }
}

/// A webhook delivery, stored before anything else is done with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The forge's delivery id: the same delivery is stored once.
    pub id: String,
    pub source: String,
    pub event: String,
    pub received_at: Timestamp,
    pub body: Vec<u8>,
}

/// Where a delivery stands in the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting to be processed, or to be tried again.
    Pending,
    /// Processed (or found to need no processing), with the reason when nothing was built.
    Done,
    /// Set aside after its last attempt failed; a person may redeliver it.
    Dead,
}

/// A stored delivery's bookkeeping, as an operator sees it (without its body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeliveryInfo {
    pub id: String,
    pub source: String,
    pub event: String,
    pub received_at: Timestamp,
    pub state: DeliveryState,
    /// How many times processing failed.
    pub attempts: u32,
    /// When a pending delivery is next tried.
    pub next_attempt_at: Timestamp,
    /// Why it is done without builds, why it failed, or why it was set aside.
    pub reason: Option<String>,
}

/// What processing a delivery came to, as the inbox records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Processed; `reason` says why nothing was built, when nothing was.
    Done { reason: Option<String> },
    /// Failed, to be tried again at `at`; counts one attempt.
    Retry { at: Timestamp, reason: String },
    /// Failed for the last time; counts one attempt and sets the delivery aside.
    Dead { reason: String },
}

/// What storing a delivery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    New,
    /// A delivery with this id is stored already.
    DuplicateId,
    /// A delivery with the same body was stored within the window: a replay under a new id.
    DuplicateBody,
}

/// How deep the inbox is, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxDepth {
    pub pending: u64,
    pub dead: u64,
    /// When the oldest pending delivery was received.
    pub oldest_pending: Option<Timestamp>,
}

/// Where a build stands, as the API lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Queued,
    /// Waiting for an earlier deploy of the same pipeline.
    Waiting,
    Running,
    Cancelling,
    Success,
    Failed,
    Cancelled,
    TimedOut,
    Errored,
    /// Passed, but steps needing secrets were skipped for lack of trust.
    Neutral,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 10] = [
        BuildStatus::Queued,
        BuildStatus::Waiting,
        BuildStatus::Running,
        BuildStatus::Cancelling,
        BuildStatus::Success,
        BuildStatus::Failed,
        BuildStatus::Cancelled,
        BuildStatus::TimedOut,
        BuildStatus::Errored,
        BuildStatus::Neutral,
    ];

    /// The build ended; its status will not change again.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            BuildStatus::Success
                | BuildStatus::Failed
                | BuildStatus::Cancelled
                | BuildStatus::TimedOut
                | BuildStatus::Errored
                | BuildStatus::Neutral
        )
    }

    /// The status's stable name, the same as its serde name, for stores to keep in a column.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Waiting => "waiting",
            BuildStatus::Running => "running",
            BuildStatus::Cancelling => "cancelling",
            BuildStatus::Success => "success",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
            BuildStatus::TimedOut => "timed_out",
            BuildStatus::Errored => "errored",
            BuildStatus::Neutral => "neutral",
        }
    }

    /// The status with this stable name.
    pub fn from_name(name: &str) -> Option<Self> {
        BuildStatus::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl BuildStatus {
    /// How a finished build ended; `None` while it is not finished.
    pub fn conclusion(self) -> Option<Conclusion> {
        match self {
            BuildStatus::Queued | BuildStatus::Waiting | BuildStatus::Running | BuildStatus::Cancelling => None,
            BuildStatus::Success => Some(Conclusion::Success),
            BuildStatus::Failed => Some(Conclusion::Failed),
            BuildStatus::Cancelled => Some(Conclusion::Cancelled),
            BuildStatus::TimedOut => Some(Conclusion::TimedOut),
            BuildStatus::Errored => Some(Conclusion::Errored),
            BuildStatus::Neutral => Some(Conclusion::Neutral),
        }
    }
}

/// The latest conclusion of each pipeline among builds of one commit, by when they finished:
/// what the merge and promotion rules look at. Unfinished builds do not count.
pub async fn pipeline_results(
    store: &dyn Store,
    repo: &str,
    commit: &str,
) -> Result<BTreeMap<String, Conclusion>, StoreError> {
    let filter = BuildFilter { repo: Some(repo.to_owned()), commit: Some(commit.to_owned()), ..BuildFilter::default() };
    let mut latest: BTreeMap<String, (Timestamp, Conclusion)> = BTreeMap::new();
    let mut page = Page::first(500);
    loop {
        let builds = store.builds(&filter, page.clone()).await?;
        for b in &builds {
            if let (Some(c), Some(at)) = (b.status.conclusion(), b.finished_at) {
                let entry = latest.entry(b.pipeline.clone()).or_insert((at, c));
                if at >= entry.0 {
                    *entry = (at, c);
                }
            }
        }
        match builds.last() {
            Some(last) if builds.len() == page.limit => page = Page::after(page.limit, last),
            _ => break,
        }
    }
    Ok(latest.into_iter().map(|(p, (_, c))| (p, c)).collect())
}

impl From<Conclusion> for BuildStatus {
    fn from(c: Conclusion) -> Self {
        match c {
            Conclusion::Success => BuildStatus::Success,
            Conclusion::Failed => BuildStatus::Failed,
            Conclusion::Cancelled => BuildStatus::Cancelled,
            Conclusion::TimedOut => BuildStatus::TimedOut,
            Conclusion::Errored => BuildStatus::Errored,
            Conclusion::Neutral => BuildStatus::Neutral,
        }
    }
}

/// Where one step attempt (or a gate, or a skipped step) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepRecordStatus {
    /// A gate waiting for people.
    Waiting,
    Running,
    Success,
    Failed,
    TimedOut,
    Cancelled,
    Errored,
    Skipped,
    Rejected,
    /// The engine stopped while the attempt ran and nothing of it was left to follow.
    Interrupted,
}

impl StepRecordStatus {
    pub const ALL: [StepRecordStatus; 10] = [
        StepRecordStatus::Waiting,
        StepRecordStatus::Running,
        StepRecordStatus::Success,
        StepRecordStatus::Failed,
        StepRecordStatus::TimedOut,
        StepRecordStatus::Cancelled,
        StepRecordStatus::Errored,
        StepRecordStatus::Skipped,
        StepRecordStatus::Rejected,
        StepRecordStatus::Interrupted,
    ];

    /// The status's stable name, the same as its serde name, for stores to keep in a column.
    pub fn as_str(self) -> &'static str {
        match self {
            StepRecordStatus::Waiting => "waiting",
            StepRecordStatus::Running => "running",
            StepRecordStatus::Success => "success",
            StepRecordStatus::Failed => "failed",
            StepRecordStatus::TimedOut => "timed_out",
            StepRecordStatus::Cancelled => "cancelled",
            StepRecordStatus::Errored => "errored",
            StepRecordStatus::Skipped => "skipped",
            StepRecordStatus::Rejected => "rejected",
            StepRecordStatus::Interrupted => "interrupted",
        }
    }

    /// The status with this stable name.
    pub fn from_name(name: &str) -> Option<Self> {
        StepRecordStatus::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl From<StepConclusion> for StepRecordStatus {
    fn from(c: StepConclusion) -> Self {
        match c {
            StepConclusion::Success => StepRecordStatus::Success,
            StepConclusion::Failed => StepRecordStatus::Failed,
            StepConclusion::TimedOut => StepRecordStatus::TimedOut,
            StepConclusion::Cancelled => StepRecordStatus::Cancelled,
            StepConclusion::Errored => StepRecordStatus::Errored,
            StepConclusion::Skipped => StepRecordStatus::Skipped,
            StepConclusion::Rejected => StepRecordStatus::Rejected,
            StepConclusion::Interrupted => StepRecordStatus::Interrupted,
        }
    }
}

/// A build as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BuildSummary {
    pub id: BuildId,
    pub repo: String,
    pub branch: Option<String>,
    pub commit: String,
    pub pipeline: String,
    pub status: BuildStatus,
    pub queued_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

impl BuildSummary {
    /// The cursor that pages on after this build.
    pub fn cursor(&self) -> BuildCursor {
        BuildCursor { queued_at: self.queued_at, id: self.id.clone() }
    }
}

/// One step attempt of a build. Attempt 0 is a step that ran no process: a gate or a skip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepRecord {
    pub name: String,
    pub attempt: u32,
    pub status: StepRecordStatus,
    /// What ended it or what it waits for, in words: `exit code 1`, `1 of 2 approvals`.
    pub detail: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

/// One build with its step attempts, in the order they were first recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BuildRecord {
    pub build: BuildSummary,
    pub steps: Vec<StepRecord>,
}

/// Which builds to list. Every field that is set must match; an empty `statuses` matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildFilter {
    pub repo: Option<String>,
    pub branch: Option<String>,
    /// Only builds of this commit (the full id).
    #[serde(default)]
    pub commit: Option<String>,
    pub statuses: Vec<BuildStatus>,
    /// Queued at or after this time.
    pub queued_from: Option<Timestamp>,
    /// Queued strictly before this time.
    pub queued_until: Option<Timestamp>,
}

/// A position in the list of builds, which is ordered newest first by queue time and then by
/// id. Paging by a position rather than by a count keeps pages stable while builds arrive.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BuildCursor {
    pub queued_at: Timestamp,
    pub id: BuildId,
}

/// One page of a build listing: at most `limit` builds after `after` (from the newest when
/// `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub limit: usize,
    pub after: Option<BuildCursor>,
}

impl Page {
    /// The first page of `limit` builds.
    pub fn first(limit: usize) -> Self {
        Page { limit, after: None }
    }

    /// The page after one that ended with `last`.
    pub fn after(limit: usize, last: &BuildSummary) -> Self {
        Page { limit, after: Some(last.cursor()) }
    }
}

/// What an event changes in the build records. This is the one reading of events that every
/// store applies, so that the stores cannot disagree about what a build's status is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildUpdate {
    /// A new build. A store keeps the first one it sees for an id.
    Queued(BuildSummary),
    /// The build's status changes. A store ignores it for an unknown or finished build, sets
    /// `started_at` the first time the build runs and `finished_at` when it finishes.
    Status { build: BuildId, status: BuildStatus, at: Timestamp },
    /// A step attempt is recorded or changes, keyed by build, name and attempt. A store ignores
    /// it for an unknown build; it keeps the first `started_at`, and a `detail` or
    /// `finished_at` of `None` leaves the stored one. Steps are listed in the order of the
    /// sequence number of the event that first recorded them.
    Step { build: BuildId, step: StepRecord },
}

impl BuildUpdate {
    /// How an event changes the build records, if it does.
    pub fn from_event(event: &Event) -> Option<BuildUpdate> {
        let at = event.at;
        let status = |build: &BuildId, status| Some(BuildUpdate::Status { build: build.clone(), status, at });
        let step = |build: &BuildId, name: &str, attempt, status, detail, started: bool, finished: bool| {
            Some(BuildUpdate::Step {
                build: build.clone(),
                step: StepRecord {
                    name: name.to_owned(),
                    attempt,
                    status,
                    detail,
                    started_at: started.then_some(at),
                    finished_at: finished.then_some(at),
                },
            })
        };
        match &event.body {
            EventBody::BuildQueued { build, pipeline, repo, commit, branch } => {
                Some(BuildUpdate::Queued(BuildSummary {
                    id: build.clone(),
                    repo: repo.clone(),
                    branch: branch.clone(),
                    commit: commit.clone(),
                    pipeline: pipeline.clone(),
                    status: BuildStatus::Queued,
                    queued_at: at,
                    started_at: None,
                    finished_at: None,
                }))
            }
            EventBody::BuildWaitingForTurn { build, .. } => status(build, BuildStatus::Waiting),
            EventBody::BuildStarted { build } => status(build, BuildStatus::Running),
            EventBody::BuildCancelling { build, .. } => status(build, BuildStatus::Cancelling),
            EventBody::BuildFinished { build, conclusion } => status(build, BuildStatus::from(*conclusion)),
            EventBody::StepStarted { build, step: name, attempt } => {
                step(build, name, *attempt, StepRecordStatus::Running, None, true, false)
            }
            EventBody::StepFinished { build, step: name, attempt, conclusion, detail, .. } => {
                step(build, name, *attempt, StepRecordStatus::from(*conclusion), Some(detail.clone()), false, true)
            }
            EventBody::StepSkipped { build, step: name, reason } => {
                step(build, name, 0, StepRecordStatus::Skipped, Some(reason.clone()), false, true)
            }
            EventBody::GateWaiting { build, step: name, kind, .. } => {
                let detail = format!("waiting for {kind}");
                step(build, name, 0, StepRecordStatus::Waiting, Some(detail), true, false)
            }
            EventBody::Approved { build, step: name, by, count, needed, .. } => {
                if count >= needed {
                    step(build, name, 0, StepRecordStatus::Success, Some(format!("approved by {by}")), false, true)
                } else {
                    let detail = format!("{count} of {needed} approvals");
                    step(build, name, 0, StepRecordStatus::Waiting, Some(detail), false, false)
                }
            }
            EventBody::Rejected { build, step: name, by, .. } => {
                step(build, name, 0, StepRecordStatus::Rejected, Some(format!("rejected by {by}")), false, true)
            }
            EventBody::GateExpired { build, step: name } => {
                let detail = "no decision in time".to_owned();
                step(build, name, 0, StepRecordStatus::TimedOut, Some(detail), false, true)
            }
            // A superseded build is finished by the `BuildFinished` that follows; the other
            // events say nothing about a build's or a step's status.
            EventBody::BuildSuperseded { .. }
            | EventBody::ServiceReady { .. }
            | EventBody::DecisionRefused { .. }
            | EventBody::DownstreamReported { .. }
            | EventBody::LeaseWaiting { .. }
            | EventBody::LeaseGranted { .. }
            | EventBody::LeaseRenewed { .. }
            | EventBody::LeaseWarning { .. }
            | EventBody::LeaseExpired { .. }
            | EventBody::LeaseReleased { .. }
            | EventBody::LeaseRevoked { .. }
            | EventBody::LeaseCancelled { .. }
            | EventBody::LeaseRefused { .. }
            | EventBody::Reviewed { .. }
            | EventBody::PromotionApproved { .. }
            | EventBody::BranchMoved { .. }
            | EventBody::UpToDate { .. }
            | EventBody::CommandAnswered { .. }
            | EventBody::SpecInvalid { .. }
            | EventBody::ForkTrusted { .. }
            | EventBody::DeliverablePublished { .. } => None,
        }
    }
}

/// What one round of retention may delete (see [`Store::prune`]). A kind whose age is `None`
/// is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prune {
    /// The logs (chunks and time marks) of builds that finished before this time.
    pub logs_before: Option<Timestamp>,
    /// Events journaled before this time.
    pub events_before: Option<Timestamp>,
    /// No event after this sequence number is deleted: the lowest cursor of the outgoing
    /// webhook receivers, whose undelivered events are their outbox. `u64::MAX` when there
    /// are none.
    pub events_keep_after: u64,
    /// Processed webhook deliveries received before this time.
    pub deliveries_before: Option<Timestamp>,
    /// At most this many builds' logs, events and deliveries per call, so that a round never
    /// holds the writer for long.
    pub batch: usize,
    /// Where the previous call's log pruning stopped (the queue time and id of the last build
    /// it looked at): builds are visited in queue order, each once.
    pub logs_after: Option<(Timestamp, BuildId)>,
}

impl Prune {
    /// These rules with events kept after `seq`.
    pub fn keep(self, seq: u64) -> Self {
        Prune { events_keep_after: seq, ..self }
    }
}

/// What one call of [`Store::prune`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Builds whose logs were deleted.
    pub logs: usize,
    pub events: usize,
    pub deliveries: usize,
    /// Where the next call's log pruning goes on from ([`Prune::logs_after`]).
    pub logs_after: Option<(Timestamp, BuildId)>,
    /// Whether the batch was used up by any kind: more may be left to delete now.
    pub more: bool,
}

/// Durable storage: inputs (the engine's journal), events, the build records kept from them,
/// logs and deliveries.
#[async_trait]
pub trait Store: Send + Sync {
    /// Appends an input durably and returns its sequence number (1, 2, ...).
    async fn append_input(&self, input: &StoredInput) -> Result<u64, StoreError>;

    /// Inputs with a sequence number above `after`, in order, at most `limit`. Inputs up to a
    /// snapshot's sequence number may be gone (see [`Store::save_snapshot`]).
    async fn inputs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, StoredInput)>, StoreError>;

    /// Stores a snapshot of the engine's machine as it was after input `seq`, then deletes the
    /// inputs up to `seq` and every older snapshot, all in one transaction: a crash leaves either
    /// the old snapshot and its inputs or the new one, never a gap. Sequence numbers go on from
    /// where they were.
    async fn save_snapshot(&self, seq: u64, data: &[u8]) -> Result<(), StoreError>;

    /// The newest snapshot and the sequence number of the input it follows.
    async fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;

    /// The input that enqueued a build, kept for as long as the build's record: a retry of a
    /// finished build runs it again, long after its journal entry is gone.
    async fn enqueued(&self, build: &BuildId) -> Result<Option<StoredInput>, StoreError>;

    /// Appends events, all or none; an event whose sequence number is already stored is
    /// skipped, so that replays do not duplicate. Each new event updates the build records as
    /// [`BuildUpdate::from_event`] says.
    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError>;

    /// Appends inputs to the journal, in order, and events, as [`Store::append_input`] and
    /// [`Store::append_events`] do, and returns the last input's sequence number (`None` when
    /// `inputs` is empty). The engine calls it once for each batch of inputs it handled
    /// together. A store that can should write it all in one transaction, one commit for the
    /// batch; the default writes them one by one, which is correct too: inputs journaled
    /// without their events get them again when the engine replays the journal.
    async fn append_journal(&self, inputs: &[StoredInput], events: &[Event]) -> Result<Option<u64>, StoreError> {
        let mut last = None;
        for input in inputs {
            last = Some(self.append_input(input).await?);
        }
        self.append_events(events).await?;
        Ok(last)
    }

    /// Events with a sequence number above `after`, in order, at most `limit`.
    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError>;

    /// Appends to a log and returns its new length in bytes: every byte the step printed,
    /// kept or not. Appending to a finished log is a permanent error.
    ///
    /// A store keeps at most its limit of each log ([`LogLimit`], 64 MiB by default): the
    /// head (the first half) and the tail (the last half, a ring that moves as output
    /// arrives). Bytes between them are dropped, the step's result does not change, and reads
    /// show a marker where they were.
    async fn append_log(&self, key: &LogKey, data: &[u8]) -> Result<u64, StoreError>;

    /// Marks a log finished.
    async fn finish_log(&self, key: &LogKey) -> Result<(), StoreError>;

    /// Records that the output starting at byte `offset` arrived at `at`. The engine marks a
    /// log at most once a second of output, so marks stay few; readers use them to show when
    /// each line was printed. Stores that keep no times may ignore marks.
    async fn mark_log_time(&self, _key: &LogKey, _offset: u64, _at: Timestamp) -> Result<(), StoreError> {
        Ok(())
    }

    /// The time marks of a log with an offset of at least `from`, in order, at most `limit`.
    async fn log_times(&self, _key: &LogKey, _from: u64, _limit: usize) -> Result<Vec<(u64, Timestamp)>, StoreError> {
        Ok(Vec::new())
    }

    /// Reads at most `max` bytes of a log from `offset` (clamped to the log's length). Where
    /// the range crosses omitted bytes, `data` holds an [`omitted_marker`] in their place,
    /// which counts towards `max` unless it is the first thing read, so a read always moves on.
    async fn read_log(&self, key: &LogKey, offset: u64, max: usize) -> Result<LogRead, StoreError>;

    /// Stores a delivery unless one with its id exists; `true` when it is new.
    async fn insert_delivery(&self, delivery: &Delivery) -> Result<bool, StoreError>;

    /// A stored delivery.
    async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError>;

    /// Deliveries not yet marked done, oldest first (by the time they were received, then by
    /// id), at most `limit`: what a receiver that stopped between storing a delivery and acting
    /// on it left to do.
    async fn pending_deliveries(&self, limit: usize) -> Result<Vec<Delivery>, StoreError>;

    /// Marks a delivery processed, so that it is no longer pending; it stays stored, and a copy
    /// of it is still not new. Marking an unknown or already processed delivery does nothing.
    async fn mark_delivery_done(&self, id: &str) -> Result<(), StoreError>;

    /// Stores a delivery unless one with its id exists, or one with the same body digest was
    /// received at or after `since` (a replay of a captured body under a new id). The digest is
    /// stored with the delivery. With `done`, the delivery is stored already done with that
    /// reason: the receiver knew at once that it could never build anything.
    async fn insert_delivery_once(
        &self,
        delivery: &Delivery,
        digest: &[u8],
        since: Timestamp,
        done: Option<&str>,
    ) -> Result<Intake, StoreError>;

    /// Pending deliveries whose next attempt is due at `now`, oldest first, at most `limit`,
    /// each with the number of attempts that failed so far.
    async fn due_deliveries(&self, now: Timestamp, limit: usize) -> Result<Vec<(Delivery, u32)>, StoreError>;

    /// Records what processing a delivery came to. An unknown delivery is ignored.
    async fn finish_delivery(&self, id: &str, outcome: DeliveryOutcome) -> Result<(), StoreError>;

    /// Deliveries in `state` (all when `None`), newest first, at most `limit`.
    async fn deliveries(&self, state: Option<DeliveryState>, limit: usize) -> Result<Vec<DeliveryInfo>, StoreError>;

    /// Makes a delivery pending again, due now, with no attempts counted; `false` when unknown.
    async fn redeliver(&self, id: &str) -> Result<bool, StoreError>;

    /// How deep the inbox is.
    async fn inbox_depth(&self) -> Result<InboxDepth, StoreError>;

    /// Builds that match `filter`, newest first (by queue time, then by id descending).
    async fn builds(&self, filter: &BuildFilter, page: Page) -> Result<Vec<BuildSummary>, StoreError>;

    /// One build with its steps.
    async fn build(&self, id: &BuildId) -> Result<Option<BuildRecord>, StoreError>;

    /// The highest event sequence number stored, 0 when there is none.
    async fn last_event_seq(&self) -> Result<u64, StoreError>;

    /// The sequence number of the last event an outgoing webhook receiver acknowledged, by
    /// the receiver's name; `None` for a receiver this store has never seen.
    async fn webhook_cursor(&self, receiver: &str) -> Result<Option<u64>, StoreError>;

    /// Moves a receiver's cursor forward to `seq`, creating it when absent. A cursor never
    /// moves back: a lower `seq` leaves it where it is, so a late or repeated write cannot
    /// make a receiver get events again that it has acknowledged.
    async fn advance_webhook_cursor(&self, receiver: &str, seq: u64) -> Result<(), StoreError>;

    /// Deletes, in one bounded batch, what `rules` allow, and never what a restart or a
    /// receiver still needs:
    /// - logs only of builds that are finished, and finished before `logs_before`;
    /// - events only before `events_before`, at or before `events_keep_after`, older than every
    ///   input still in the journal (so the snapshot covers them: a replay does not make them
    ///   again), and never the newest event (the engine numbers on from it);
    /// - deliveries only when processed (neither pending nor dead) and received before
    ///   `deliveries_before`.
    ///
    /// Build records, enqueues and the journal's snapshot are kept. A store that keeps
    /// everything may leave the default, which deletes nothing.
    async fn prune(&self, rules: &Prune) -> Result<Pruned, StoreError> {
        let _ = rules;
        Ok(Pruned::default())
    }
}

/// The engine's clock. Tests use a manual one.
#[async_trait]
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// Returns once `now() >= at`.
    async fn sleep_until(&self, at: Timestamp);
}

/// The secrets one step gets, and why each other name it asked for was withheld.
#[derive(Default, Clone)]
pub struct StepSecrets {
    /// Values by name, passed to the step and masked in its output.
    pub values: std::collections::BTreeMap<String, String>,
    /// Names the step asked for and does not get, each with the reason, for its log.
    pub withheld: Vec<(String, String)>,
}

impl StepSecrets {
    /// The asked names found in `all`; the others are withheld as unknown. For fakes and for
    /// `cib run`, where every secret given belongs to the one build.
    pub fn pick(all: &std::collections::BTreeMap<String, String>, asked: &[String]) -> Self {
        let mut out = StepSecrets::default();
        for name in asked {
            match all.get(name) {
                Some(value) => {
                    out.values.insert(name.clone(), value.clone());
                }
                None => out.withheld.push((name.clone(), "no secret of that name is configured".to_owned())),
            }
        }
        out
    }
}

impl std::fmt::Debug for StepSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values never reach a log line, even a debug one.
        f.debug_struct("StepSecrets")
            .field("values", &self.values.keys().collect::<Vec<_>>())
            .field("withheld", &self.withheld)
            .finish()
    }
}

/// Secret values for the engine to hand to steps, decided per build: the implementation
/// answers with [`crate::policy::check_secret`] on the build's facts, so a secret scoped to
/// another repository, branch, pipeline or environment is withheld. Never logged.
#[async_trait]
pub trait Secrets: Send + Sync {
    /// Of the names a step asks for (`asked`), the values this build may have. `Err` means
    /// the secrets could not be read at all (a wrong key, a failing store).
    async fn for_step(&self, build: &crate::policy::BuildFacts<'_>, asked: &[String]) -> Result<StepSecrets, String>;
}

/// The fewest bytes a stored secret may have: shorter values turn up by chance in ordinary
/// output, so masking them would garble logs, and not masking them would leak them.
pub const MIN_SECRET_LEN: usize = 6;

/// The 32-byte key that seals stored secrets, and where it came from (a key file's path, or
/// the environment variable), so that an error can name it. Neither `Debug` nor any other
/// formatting shows the bytes.
#[derive(Clone)]
pub struct SecretKey {
    bytes: [u8; 32],
    origin: String,
}

impl SecretKey {
    /// A key from its bytes; `origin` says where it came from, as in "the key in /etc/cib/key".
    pub fn new(bytes: [u8; 32], origin: impl Into<String>) -> Self {
        SecretKey { bytes, origin: origin.into() }
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Where the key came from, in words.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey").field("origin", &self.origin).field("bytes", &"<redacted>").finish()
    }
}

/// A secret's value. `Debug` never shows it; [`SecretValue::expose`] does, on purpose.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(value.into())
    }

    /// The value itself, for the step's environment and for masking; never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue(<{} bytes redacted>)", self.0.len())
    }
}

/// A secret to store: its name, value and scope (whose repository it belongs to), and who set
/// it when.
#[derive(Debug, Clone)]
pub struct NewSecret {
    pub name: String,
    pub value: SecretValue,
    pub scope: crate::policy::SecretScope,
    pub by: String,
    pub at: Timestamp,
}

/// What is known of a stored secret without its value: enough to list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    pub scope: crate::policy::SecretScope,
    pub set_at: Timestamp,
    pub set_by: String,
}

/// A stored secret, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSecret {
    pub info: SecretInfo,
    pub value: SecretValue,
}

/// Why a secret could not be stored or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    #[error(
        "secret '{name}' is {len} bytes long: values shorter than {MIN_SECRET_LEN} bytes cannot be masked safely in logs"
    )]
    TooShort { name: String, len: usize },
    #[error("{0}")]
    Invalid(String),
    /// The key does not open what is stored: another key sealed it.
    #[error("the secrets cannot be opened with {origin}: {detail}; was the key rotated or lost?")]
    WrongKey { origin: String, detail: String },
    /// The key itself is unusable: a missing or malformed key file, say.
    #[error("{0}")]
    Key(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SecretError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SecretError::TooShort { .. } | SecretError::Invalid(_) => ErrorKind::Permanent,
            SecretError::WrongKey { .. } | SecretError::Key(_) => ErrorKind::Misconfigured,
            SecretError::Store(e) => e.kind(),
        }
    }
}

/// Checks a secret before it is stored: a name like an environment variable's, a repository,
/// and a value long enough to mask.
pub fn check_new_secret(secret: &NewSecret) -> Result<(), SecretError> {
    let name = &secret.name;
    let mut chars = name.chars();
    let env_like = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !env_like {
        return Err(SecretError::Invalid(format!(
            "invalid secret name '{name}': secrets are named like environment variables"
        )));
    }
    if secret.scope.repo.trim().is_empty() {
        return Err(SecretError::Invalid(format!("secret '{name}' needs a repository in its scope")));
    }
    let len = secret.value.expose().len();
    if len < MIN_SECRET_LEN {
        return Err(SecretError::TooShort { name: name.clone(), len });
    }
    Ok(())
}

/// Encrypted secrets with scopes. The key is passed to each call that seals or opens, and
/// never stored: a store holds only nonces and ciphertexts.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// Seals and stores a secret, replacing one of the same repository and name. Refused when
    /// [`check_new_secret`] refuses it, or when `key` does not open the secrets already stored
    /// (mixing keys would leave some secrets unreadable under either).
    async fn set_secret(&self, key: &SecretKey, secret: &NewSecret) -> Result<(), SecretError>;

    /// The secrets of one repository, or of all, by repository then name. Never values.
    async fn list_secrets(&self, repo: Option<&str>) -> Result<Vec<SecretInfo>, SecretError>;

    /// Removes a secret; `true` when there was one.
    async fn remove_secret(&self, repo: &str, name: &str) -> Result<bool, SecretError>;

    /// Every secret of a repository, opened, for a build; the caller picks those the build
    /// may have with [`crate::policy::check_secret`].
    async fn open_secrets(&self, key: &SecretKey, repo: &str) -> Result<Vec<OpenSecret>, SecretError>;

    /// Re-seals every secret under `new`, all or none; returns how many. Refused when `old`
    /// does not open them all.
    async fn rekey(&self, old: &SecretKey, new: &SecretKey) -> Result<usize, SecretError>;
}

/// A signed-in person's session on the web pages, as the store keeps it: the token they signed
/// in with (by name, never its value) and when the session began and was last used. The
/// session's own id is never stored; the store is keyed by its SHA-256, so a copy of the
/// database opens no session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The name of the API token the person signed in with.
    pub token_name: String,
    pub created_at: Timestamp,
    pub last_seen: Timestamp,
}

/// Web sessions, keyed by the SHA-256 (hex) of their random id.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Stores a new session.
    async fn create_session(&self, digest: &str, session: &SessionRecord) -> Result<(), StoreError>;

    /// The session with this digest, if there is one.
    async fn session(&self, digest: &str) -> Result<Option<SessionRecord>, StoreError>;

    /// Records that the session was used at `at`.
    async fn touch_session(&self, digest: &str, at: Timestamp) -> Result<(), StoreError>;

    /// Ends a session (signing out); ending one that is gone is not an error.
    async fn remove_session(&self, digest: &str) -> Result<(), StoreError>;

    /// Removes every session last used before `before`; returns how many.
    async fn expire_sessions(&self, before: Timestamp) -> Result<usize, StoreError>;
}

// ---- artifacts -----------------------------------------------------------------------------

port_error!(
    /// Artifacts could not be packed, stored, found or unpacked.
    ArtifactError
);

impl From<StoreError> for ArtifactError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Permanent(m) => ArtifactError::Permanent(m),
            StoreError::Misconfigured(m) => ArtifactError::Misconfigured(m),
            other => ArtifactError::Transient(other.message().to_owned()),
        }
    }
}

/// One step's kept files: a gzip-compressed tar archive, indexed by the build and the step's
/// name, and found again by later pipelines of the same commit through its repository,
/// commit, pipeline and step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ArtifactRecord {
    pub build: BuildId,
    /// The step's name, which is also the artifact's name in the API.
    pub name: String,
    pub repo: String,
    pub commit: String,
    pub pipeline: String,
    /// Whether a trusted build made it: an untrusted build's artifacts never reach a trusted one.
    pub trusted: bool,
    /// SHA-256 of the archive, in lower-case hex.
    pub sha256: String,
    /// Bytes of the archive.
    pub size: u64,
    /// Files in the archive (directories not counted).
    pub files: u64,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

/// What the engine knows of artifacts it asks to keep; the store adds the digest and sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewArtifact {
    pub build: BuildId,
    pub name: String,
    pub repo: String,
    pub commit: String,
    pub pipeline: String,
    pub trusted: bool,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Where a step's artifacts are looked for: the newest of this step of this pipeline, built
/// on this commit of this repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactQuery<'a> {
    pub repo: &'a str,
    pub commit: &'a str,
    pub pipeline: &'a str,
    pub step: &'a str,
    /// Only artifacts that trusted builds made.
    pub trusted_only: bool,
}

/// The index of kept artifacts, which a store keeps beside its builds.
#[async_trait]
pub trait ArtifactIndex: Send + Sync {
    /// Records an artifact, replacing the one of the same build and name (a retried step).
    async fn put_artifact(&self, record: &ArtifactRecord) -> Result<(), StoreError>;

    /// A build's artifacts, by name.
    async fn artifacts(&self, build: &BuildId) -> Result<Vec<ArtifactRecord>, StoreError>;

    /// The newest artifact matching the query that has not expired at `now`.
    async fn find_artifact(
        &self,
        query: &ArtifactQuery<'_>,
        now: Timestamp,
    ) -> Result<Option<ArtifactRecord>, StoreError>;

    /// Removes the records that expired at `now` and answers them, so that their files go too.
    async fn expire_artifacts(&self, now: Timestamp) -> Result<Vec<ArtifactRecord>, StoreError>;
}

/// Keeps artifacts: packs files of a workspace, finds them again, unpacks them. The engine
/// hands it host directories only (the executor copies files between its workspace and them).
#[async_trait]
pub trait Artifacts: Send + Sync {
    /// Packs the files under `dir` whose path relative to it matches one of `paths`, stores the
    /// archive and indexes it. Matching no file at all is a permanent error naming the globs.
    async fn save(&self, new: NewArtifact, dir: &Path, paths: &[spec::Glob]) -> Result<ArtifactRecord, ArtifactError>;

    /// A build's artifacts.
    async fn list(&self, build: &BuildId) -> Result<Vec<ArtifactRecord>, ArtifactError>;

    /// The newest unexpired artifact matching the query.
    async fn find(&self, query: &ArtifactQuery<'_>, now: Timestamp) -> Result<Option<ArtifactRecord>, ArtifactError>;

    /// The archive's file, to send or upload as it is.
    fn archive_path(&self, record: &ArtifactRecord) -> std::path::PathBuf;

    /// Unpacks an artifact over `dest`; answers how many files it wrote.
    async fn unpack(&self, record: &ArtifactRecord, dest: &Path) -> Result<u64, ArtifactError>;

    /// Removes the artifacts expired at `now`, records and files; answers how many.
    async fn remove_expired(&self, now: Timestamp) -> Result<usize, ArtifactError>;
}

/// For engines that keep no artifacts: a step that asks to keep or restore some fails, saying so.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoArtifacts;

const NO_ARTIFACTS: &str = "this engine keeps no artifacts (it was started without an artifact store)";

#[async_trait]
impl Artifacts for NoArtifacts {
    async fn save(&self, _: NewArtifact, _: &Path, _: &[spec::Glob]) -> Result<ArtifactRecord, ArtifactError> {
        Err(ArtifactError::Misconfigured(NO_ARTIFACTS.into()))
    }
    async fn list(&self, _: &BuildId) -> Result<Vec<ArtifactRecord>, ArtifactError> {
        Ok(Vec::new())
    }
    async fn find(&self, _: &ArtifactQuery<'_>, _: Timestamp) -> Result<Option<ArtifactRecord>, ArtifactError> {
        Err(ArtifactError::Misconfigured(NO_ARTIFACTS.into()))
    }
    fn archive_path(&self, _: &ArtifactRecord) -> std::path::PathBuf {
        std::path::PathBuf::new()
    }
    async fn unpack(&self, _: &ArtifactRecord, _: &Path) -> Result<u64, ArtifactError> {
        Err(ArtifactError::Misconfigured(NO_ARTIFACTS.into()))
    }
    async fn remove_expired(&self, _: Timestamp) -> Result<usize, ArtifactError> {
        Ok(0)
    }
}
