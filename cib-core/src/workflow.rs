//! The master/production workflow's rules: when a branch may be merged into `master` by
//! fast-forward, and when a commit may be promoted to `production`. Pure: callers gather the
//! facts (comparisons, build results, reviews, approvals, the time) and get back either a yes
//! or every reason for a no, in words a person can act on.

// Pure code: no clock, environment, files or threads (see clippy.toml).
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::Conclusion;
use crate::ports::{Comparison, Permission};
use crate::spec::{Approvers, MergePolicy, PromotionPolicy};
use crate::time::Timestamp;

/// One reason a merge or a promotion was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// The person asking may not write to the repository.
    NoPermission { user: String },
    /// The branch lacks commits of the target: it must be rebased first.
    Stale { target: String, behind: u32 },
    /// A required pipeline has not passed on this exact commit.
    NotGreen { pipeline: String, state: String },
    /// Fewer approving reviews than the policy asks.
    MissingReviews { have: u32, need: u32 },
    /// The target cannot be fast-forwarded to the commit (it has commits the commit lacks).
    NotFastForward { target: String },
    /// Fewer valid approvals than the policy asks.
    TooFewApprovals { have: u32, need: u32 },
    /// An approval that does not count, and why.
    ApprovalIgnored { by: String, why: String },
    /// The person is not one of those the gate asks.
    NotAnApprover { by: String },
    /// The person started the build, and the gate does not allow self-approval.
    OwnBuild { by: String },
    /// The person wrote the commit, and the gate does not allow self-approval.
    OwnCommit { by: String },
    /// The person already approved, perhaps under another identity.
    AlreadyApproved { by: String },
    /// The pipeline has no `on: manual` trigger, so nobody may start it by hand.
    NotManual { pipeline: String },
    /// A trigger asked for an event other than `manual`.
    NotManualEvent { event: String },
    /// The manual trigger does not allow this branch.
    BranchNotAllowed { pipeline: String, branch: String },
    /// A variable the pipeline does not declare under `inputs`.
    UnknownInput { name: String, allowed: Vec<String> },
    /// A value that is not of its input's type.
    InvalidInput { name: String, why: String },
    /// A required input that was not given.
    MissingInput { name: String },
    /// A downstream repository the promotion requires has no passing result on this commit:
    /// none at all (`pipeline` and `build` absent), one still running, or one that did not pass.
    Downstream { repo: String, pipeline: Option<String>, state: String, build: Option<String> },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoPermission { user } => write!(f, "{user} has no write permission on the repository"),
            Refusal::Stale { target, behind } => {
                write!(f, "the branch is {behind} commit(s) behind {target}: rebase it on {target} first")
            }
            Refusal::NotGreen { pipeline, state } => write!(f, "pipeline '{pipeline}' has {state} on this commit"),
            Refusal::MissingReviews { have, need } => write!(f, "{have} approving review(s), {need} needed"),
            Refusal::NotFastForward { target } => {
                write!(f, "{target} has commits this commit does not contain: it cannot move by fast-forward")
            }
            Refusal::TooFewApprovals { have, need } => write!(f, "{have} valid approval(s), {need} needed"),
            Refusal::ApprovalIgnored { by, why } => write!(f, "the approval by {by} does not count: {why}"),
            // The four gate refusals leave the name out: the event that carries them names
            // the person already, and the API answers the person themselves.
            Refusal::NotAnApprover { .. } => f.write_str("not one of the people this gate asks"),
            Refusal::OwnBuild { .. } => {
                f.write_str("the person who started the build may not approve it (the gate has no self_approval)")
            }
            Refusal::OwnCommit { .. } => {
                f.write_str("the commit's author may not approve it (the gate has no self_approval)")
            }
            Refusal::AlreadyApproved { .. } => {
                f.write_str("already approved by this person; approvals come from distinct people")
            }
            Refusal::NotManual { pipeline } => {
                write!(f, "pipeline '{pipeline}' has no 'manual' trigger, so it cannot be started by hand")
            }
            Refusal::NotManualEvent { event } => {
                write!(f, "a build started by hand is a 'manual' event, not '{event}'")
            }
            Refusal::BranchNotAllowed { pipeline, branch } => {
                write!(f, "pipeline '{pipeline}' may not be started by hand on branch '{branch}'")
            }
            Refusal::UnknownInput { name, allowed } if allowed.is_empty() => {
                write!(f, "'{name}' is not an input of this pipeline, which declares none")
            }
            Refusal::UnknownInput { name, allowed } => {
                write!(f, "'{name}' is not an input of this pipeline; its inputs are {}", allowed.join(", "))
            }
            Refusal::InvalidInput { name, why } => write!(f, "input '{name}': {why}"),
            Refusal::MissingInput { name } => write!(f, "input '{name}' is required"),
            Refusal::Downstream { repo, pipeline: Some(pipeline), state, build: Some(build) } => {
                write!(f, "{repo}'s {pipeline} pipeline {state} on this commit: build {build}")
            }
            Refusal::Downstream { repo, state, .. } => write!(f, "{repo} {state} on this commit"),
        }
    }
}

/// The latest result of each pipeline on one commit, as the build records say.
pub type PipelineResults = BTreeMap<String, Conclusion>;

fn green(required: &[String], results: &PipelineResults, out: &mut Vec<Refusal>) {
    for pipeline in required {
        let state = match results.get(pipeline) {
            Some(Conclusion::Success) => continue,
            // A neutral build skipped steps it was not trusted with: it proves nothing.
            Some(Conclusion::Neutral) => "a neutral build (steps needing secrets were skipped)".into(),
            Some(other) => serde_json::to_value(other)
                .ok()
                .and_then(|v| v.as_str().map(|s| format!("a {} build", s.replace('_', " "))))
                .unwrap_or_else(|| "no green build".into()),
            None => "never run".into(),
        };
        out.push(Refusal::NotGreen { pipeline: pipeline.clone(), state });
    }
}

/// The facts of a merge request.
#[derive(Debug, Clone)]
pub struct MergeFacts<'a> {
    pub user: &'a str,
    pub permission: Permission,
    /// The branch's head compared with the target's tip (`base` = target, `head` = branch).
    pub comparison: Comparison,
    /// Results on the branch's head commit.
    pub results: &'a PipelineResults,
    /// Approving reviews at the head commit, from distinct people other than the author.
    pub reviews: u32,
}

/// Whether a branch may be fast-forwarded into the policy's target. Every reason is listed.
pub fn check_merge(policy: &MergePolicy, facts: &MergeFacts<'_>) -> Result<(), Vec<Refusal>> {
    let mut out = Vec::new();
    if facts.permission < Permission::Write {
        out.push(Refusal::NoPermission { user: facts.user.to_owned() });
    }
    if (policy.up_to_date || policy.fast_forward_only) && facts.comparison.behind > 0 {
        out.push(Refusal::Stale { target: policy.into.clone(), behind: facts.comparison.behind });
    }
    green(&policy.pipelines, facts.results, &mut out);
    if facts.reviews < policy.reviews {
        out.push(Refusal::MissingReviews { have: facts.reviews, need: policy.reviews });
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

/// An approval of a promotion, bound to one commit, as recorded when it was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub commit: String,
    pub by: String,
    /// The approver's teams, from the authenticated source, when the approval was given.
    pub teams: Vec<String>,
    pub at: Timestamp,
}

/// Where a downstream pipeline stands against one upstream commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DownstreamState {
    Running,
    Success,
    Failed,
    Cancelled,
    TimedOut,
    Errored,
    Neutral,
}

impl DownstreamState {
    /// The state a finished build's conclusion gives.
    pub fn of(conclusion: Conclusion) -> Self {
        match conclusion {
            Conclusion::Success => DownstreamState::Success,
            Conclusion::Failed => DownstreamState::Failed,
            Conclusion::Cancelled => DownstreamState::Cancelled,
            Conclusion::TimedOut => DownstreamState::TimedOut,
            Conclusion::Errored => DownstreamState::Errored,
            Conclusion::Neutral => DownstreamState::Neutral,
        }
    }

    /// How a refusal says it: `acme/client's test pipeline failed on this commit`.
    fn words(self) -> &'static str {
        match self {
            DownstreamState::Running => "is still running",
            DownstreamState::Success => "passed",
            DownstreamState::Failed => "failed",
            DownstreamState::Cancelled => "was cancelled",
            DownstreamState::TimedOut => "timed out",
            DownstreamState::Errored => "errored (the infrastructure failed)",
            // A neutral build skipped steps: it proves nothing, as for the repository's own.
            DownstreamState::Neutral => "skipped steps (a neutral build)",
        }
    }
}

/// The result of a downstream repository's pipeline against one upstream commit, bound to
/// that exact commit. The newest build of a pipeline for the commit is the one that counts, so
/// a re-run after a fix replaces a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DownstreamResult {
    /// The upstream repository and the commit the pipeline ran against.
    pub upstream_repo: String,
    pub upstream_commit: String,
    /// The downstream repository, its pipeline, and the build that ran it.
    pub repo: String,
    pub pipeline: String,
    pub build: String,
    /// The downstream commit the build ran (its default branch's tip when it started).
    pub commit: String,
    pub state: DownstreamState,
    /// When the state was last changed.
    pub at: Timestamp,
}

fn downstream(required: &[String], commit: &str, results: &[DownstreamResult], out: &mut Vec<Refusal>) {
    for repo in required {
        let mine: Vec<&DownstreamResult> =
            results.iter().filter(|r| r.upstream_commit == commit && &r.repo == repo).collect();
        if mine.is_empty() {
            out.push(Refusal::Downstream {
                repo: repo.clone(),
                pipeline: None,
                state: "has no downstream result (none of its 'on: upstream' pipelines ran)".into(),
                build: None,
            });
        }
        for r in mine.into_iter().filter(|r| r.state != DownstreamState::Success) {
            out.push(Refusal::Downstream {
                repo: repo.clone(),
                pipeline: Some(r.pipeline.clone()),
                state: r.state.words().into(),
                build: Some(r.build.clone()),
            });
        }
    }
}

/// The facts of a promotion request.
#[derive(Debug, Clone)]
pub struct PromotionFacts<'a> {
    pub commit: &'a str,
    /// Who wrote the commit, when known; they may not approve it unless the policy allows.
    pub author: Option<&'a str>,
    /// The target branch's tip compared with the commit (`base` = target, `head` = commit).
    pub comparison: Comparison,
    /// Results on this exact commit.
    pub results: &'a PipelineResults,
    /// Every approval given in the repository (for any commit).
    pub approvals: &'a [Approval],
    /// Downstream results on record for the repository (any commit; those of other commits
    /// do not count).
    pub downstream: &'a [DownstreamResult],
    pub now: Timestamp,
}

fn allowed(approvers: &Approvers, a: &Approval) -> bool {
    (approvers.users.is_empty() && approvers.teams.is_empty())
        || approvers.users.contains(&a.by)
        || a.teams.iter().any(|t| approvers.teams.contains(t))
}

/// Whether a commit may be promoted: the people whose approvals count, or every reason it may
/// not, including each approval that does not count and why.
pub fn check_promotion(policy: &PromotionPolicy, facts: &PromotionFacts<'_>) -> Result<Vec<String>, Vec<Refusal>> {
    let mut out = Vec::new();
    if facts.comparison.behind > 0 {
        out.push(Refusal::NotFastForward { target: policy.to.clone() });
    }
    green(&policy.pipelines, facts.results, &mut out);
    downstream(&policy.downstream, facts.commit, facts.downstream, &mut out);
    let mut counted: Vec<&str> = Vec::new();
    let mut ignored = Vec::new();
    for a in facts.approvals {
        let why = if a.commit != facts.commit {
            // Approvals of other commits are not listed one by one: only those that could
            // have been meant for this one are worth a word.
            continue;
        } else if !policy.self_approval && facts.author == Some(a.by.as_str()) {
            Some("the commit's author may not approve it".to_owned())
        } else if !allowed(&policy.approvers, a) {
            Some("not one of the allowed approvers".to_owned())
        } else if policy.expires.is_some_and(|e| a.at + e.as_std() <= facts.now) {
            Some("it has expired; approve again".to_owned())
        } else if counted.contains(&a.by.as_str()) {
            None
        } else {
            counted.push(&a.by);
            None
        };
        if let Some(why) = why {
            ignored.push(Refusal::ApprovalIgnored { by: a.by.clone(), why });
        }
    }
    let have = counted.len() as u32;
    // Approvals that do not count matter only when too few do: then each says why.
    if have < policy.approvals {
        out.extend(ignored);
        out.push(Refusal::TooFewApprovals { have, need: policy.approvals });
        // Approvals given for other commits explain a shortfall: name them.
        let mut others: Vec<&Approval> = facts.approvals.iter().filter(|a| a.commit != facts.commit).collect();
        others.sort_by(|a, b| a.by.cmp(&b.by));
        others.dedup_by(|a, b| a.by == b.by);
        for a in others {
            if !counted.contains(&a.by.as_str()) {
                out.push(Refusal::ApprovalIgnored {
                    by: a.by.clone(),
                    why: format!("it approves another commit ({})", short(&a.commit)),
                });
            }
        }
    }
    if out.is_empty() { Ok(counted.into_iter().map(str::to_owned).collect()) } else { Err(out) }
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// Renders refusals as a comment or an API answer: one reason a line.
pub fn explain(what: &str, refusals: &[Refusal]) -> String {
    let mut text = format!("cib cannot {what}:");
    for r in refusals {
        text.push_str(&format!("\n- {r}"));
    }
    text
}
