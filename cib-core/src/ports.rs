//! The ports: the traits through which the engine reaches the world. Backends implement them
//! (`cib-docker` the executor, `cib-github` the VCS and notifier, a store crate the store), and
//! `testing` has fakes of each.
//!
//! Every port error says its kind, so that the engine decides what to retry without knowing
//! the backend: a transient error may succeed later, a permanent one will not, and a
//! misconfigured one needs a person.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::event::{BuildId, Event};
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
    pub workspace: std::path::PathBuf,
}

impl std::fmt::Debug for StepRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret values never reach a log line, even a debug one.
        f.debug_struct("StepRun")
            .field("job", &self.job)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
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

    /// Runs one attempt of a step, streaming output (masked of the secrets' values) into
    /// `logs`, until it ends or `stop` fires.
    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, stop: StopSignal) -> Result<Outcome, ExecError>;

    /// Starts a build's services and returns once each passed its readiness check; the
    /// error names the service that did not.
    async fn start_services(&self, build: &BuildId, services: &[spec::Service]) -> Result<(), (String, ExecError)>;

    /// Removes everything of the build: services, network, workspace copies.
    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError>;

    /// Removes what belongs to builds not in `live` (left by a crash). Returns how many
    /// resources it removed.
    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError>;
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
}

/// Publishes events somewhere (commit statuses, chat, webhooks). Publishing the same event
/// twice must leave the same result, since events are replayed after a crash.
#[async_trait]
pub trait Notifier: Send + Sync {
    async fn publish(&self, event: &Event) -> Result<(), NotifyError>;
}

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRead {
    pub data: Vec<u8>,
    /// The offset to ask for next.
    pub next_offset: u64,
    /// The log is finished and `next_offset` is its end.
    pub complete: bool,
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

/// Durable storage: inputs (the engine's journal), events, logs and deliveries.
#[async_trait]
pub trait Store: Send + Sync {
    /// Appends an input durably and returns its sequence number (1, 2, ...).
    async fn append_input(&self, input: &StoredInput) -> Result<u64, StoreError>;

    /// Inputs with a sequence number above `after`, in order, at most `limit`.
    async fn inputs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, StoredInput)>, StoreError>;

    /// Appends events; an event whose sequence number is already stored is skipped, so that
    /// replays do not duplicate.
    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError>;

    /// Events with a sequence number above `after`, in order, at most `limit`.
    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError>;

    /// Appends to a log and returns its new length in bytes.
    async fn append_log(&self, key: &LogKey, data: &[u8]) -> Result<u64, StoreError>;

    /// Marks a log finished.
    async fn finish_log(&self, key: &LogKey) -> Result<(), StoreError>;

    /// Reads at most `max` bytes of a log from `offset`.
    async fn read_log(&self, key: &LogKey, offset: u64, max: usize) -> Result<LogRead, StoreError>;

    /// Stores a delivery unless one with its id exists; `true` when it is new.
    async fn insert_delivery(&self, delivery: &Delivery) -> Result<bool, StoreError>;

    /// A stored delivery.
    async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError>;
}

/// The engine's clock. Tests use a manual one.
#[async_trait]
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// Returns once `now() >= at`.
    async fn sleep_until(&self, at: Timestamp);
}

/// Secret values by name, for the engine to hand to steps. Never logged.
pub trait Secrets: Send + Sync {
    fn get(&self, repo: &str, name: &str) -> Option<String>;
}
