//! Typed events: one for every change of state, numbered in the order they happened.
//!
//! Everything that reports status (GitHub checks, chat, the server-sent event stream, outgoing
//! webhooks) reads this one stream. Events carry a sequence number so that a subscriber can
//! resume where it stopped, and enough data that a subscriber never has to ask the engine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// A build's identifier, chosen by whoever creates the build (the engine, a test).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct BuildId(pub String);

impl std::fmt::Display for BuildId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for BuildId {
    fn from(s: &str) -> Self {
        BuildId(s.to_owned())
    }
}

/// How a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conclusion {
    Success,
    Failed,
    Cancelled,
    TimedOut,
    /// The infrastructure failed; the code under test may be fine.
    Errored,
    /// Every step that ran passed, but steps that need secrets were skipped because the build
    /// was not trusted: it proves nothing about them, so it never counts as a pass.
    Neutral,
}

/// How one step (or one attempt of it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepConclusion {
    Success,
    Failed,
    TimedOut,
    Cancelled,
    Errored,
    Skipped,
    /// A gate that people rejected.
    Rejected,
    /// The engine stopped while the attempt ran, and nothing of it was left to follow after
    /// the restart: whether it ran to its end is unknown. A deploy step ends here for a person
    /// to retry; other steps are re-run once.
    Interrupted,
}

/// One numbered event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at: Timestamp,
    #[serde(flatten)]
    pub body: EventBody,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    BuildQueued {
        build: BuildId,
        pipeline: String,
        repo: String,
        commit: String,
        branch: Option<String>,
    },
    /// The build waits for an earlier deploy of the same pipeline to finish.
    BuildWaitingForTurn {
        build: BuildId,
        behind: BuildId,
    },
    BuildStarted {
        build: BuildId,
    },
    /// A newer push replaced this test build.
    BuildSuperseded {
        build: BuildId,
        by: BuildId,
    },
    BuildCancelling {
        build: BuildId,
        by: String,
        reason: String,
    },
    StepStarted {
        build: BuildId,
        step: String,
        attempt: u32,
    },
    StepFinished {
        build: BuildId,
        step: String,
        attempt: u32,
        conclusion: StepConclusion,
        /// What ended it, in words: `exit code 1`, `no output for 5m`, `out of memory`.
        detail: String,
        /// Another attempt follows.
        will_retry: bool,
    },
    StepSkipped {
        build: BuildId,
        step: String,
        reason: String,
    },
    ServiceReady {
        build: BuildId,
        service: String,
    },
    GateWaiting {
        build: BuildId,
        step: String,
        kind: String,
        instructions: Option<String>,
        approvals: u32,
    },
    Approved {
        build: BuildId,
        step: String,
        by: String,
        comment: Option<String>,
        count: u32,
        needed: u32,
    },
    Rejected {
        build: BuildId,
        step: String,
        by: String,
        comment: Option<String>,
    },
    /// A decision the gate could not take (not an allowed approver, approved twice).
    DecisionRefused {
        build: BuildId,
        step: String,
        by: String,
        reason: String,
    },
    GateExpired {
        build: BuildId,
        step: String,
    },
    LeaseWaiting {
        lease: String,
        holder: String,
        positions: BTreeMap<String, usize>,
    },
    LeaseGranted {
        lease: String,
        holder: String,
        units: BTreeMap<String, Vec<String>>,
        token: u64,
        expires_at: Timestamp,
    },
    LeaseRenewed {
        lease: String,
        token: u64,
        expires_at: Timestamp,
    },
    /// A person's lease ends soon.
    LeaseWarning {
        lease: String,
        holder: String,
        deadline: Timestamp,
    },
    LeaseExpired {
        lease: String,
        token: u64,
    },
    LeaseReleased {
        lease: String,
        token: u64,
    },
    LeaseRevoked {
        lease: String,
        token: u64,
    },
    LeaseCancelled {
        lease: String,
    },
    /// A lease operation was refused: a stale fencing token, an unknown pool, too many units.
    LeaseRefused {
        lease: Option<String>,
        reason: String,
    },
    BuildFinished {
        build: BuildId,
        conclusion: Conclusion,
    },
    Reviewed {
        repo: String,
        commit: String,
        by: String,
    },
    PromotionApproved {
        repo: String,
        commit: String,
        by: String,
    },
    /// Whether a pull request's head contains its base's tip (the second status of a PR).
    UpToDate {
        repo: String,
        number: u64,
        commit: String,
        base: String,
        up_to_date: bool,
        behind: u32,
    },
    /// A maintainer approved a fork's pull request at this commit.
    ForkTrusted {
        repo: String,
        number: u64,
        commit: String,
        by: String,
    },
    /// cib's answer to a `/cib` command, for the notifier to post as a comment.
    CommandAnswered {
        repo: String,
        number: u64,
        text: String,
    },
    /// The spec at a pushed commit or a pull request's head is invalid, so nothing was built:
    /// said to the people who pushed (a failed `cib/spec` status; a comment on a pull request)
    /// rather than silently dropped. Each diagnostic reads `PATH:LINE:COL: message`.
    SpecInvalid {
        repo: String,
        commit: String,
        pull_request: Option<u64>,
        diagnostics: Vec<String>,
    },
    /// A deliverable was published (built here, or promoted from another pipeline's build).
    DeliverablePublished {
        build: BuildId,
        /// Boxed: a record is far larger than the other events.
        deliverable: Box<crate::publish::DeliverableRecord>,
    },
    /// A downstream repository's pipeline started or finished against an upstream commit:
    /// reported on that commit as `cib/downstream/<repo>/<pipeline>`.
    DownstreamReported {
        build: BuildId,
        upstream_repo: String,
        upstream_commit: String,
        repo: String,
        pipeline: String,
        state: crate::workflow::DownstreamState,
    },
    /// cib fast-forwarded a branch: a merge into `master`, or a promotion to `production`.
    BranchMoved {
        repo: String,
        branch: String,
        commit: String,
        by: String,
        promotion: bool,
    },
}

impl EventBody {
    /// The build the event is about, if any.
    pub fn build(&self) -> Option<&BuildId> {
        use EventBody::*;
        match self {
            BuildQueued { build, .. }
            | BuildWaitingForTurn { build, .. }
            | BuildStarted { build }
            | BuildSuperseded { build, .. }
            | BuildCancelling { build, .. }
            | StepStarted { build, .. }
            | StepFinished { build, .. }
            | StepSkipped { build, .. }
            | ServiceReady { build, .. }
            | GateWaiting { build, .. }
            | Approved { build, .. }
            | Rejected { build, .. }
            | DecisionRefused { build, .. }
            | GateExpired { build, .. }
            | DeliverablePublished { build, .. }
            | DownstreamReported { build, .. }
            | BuildFinished { build, .. } => Some(build),
            LeaseWaiting { .. }
            | LeaseGranted { .. }
            | LeaseRenewed { .. }
            | LeaseWarning { .. }
            | LeaseExpired { .. }
            | LeaseReleased { .. }
            | LeaseRevoked { .. }
            | LeaseCancelled { .. }
            | LeaseRefused { .. }
            | Reviewed { .. }
            | PromotionApproved { .. }
            | BranchMoved { .. }
            | UpToDate { .. }
            | CommandAnswered { .. }
            | SpecInvalid { .. }
            | ForkTrusted { .. } => None,
        }
    }
}
