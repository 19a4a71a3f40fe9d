//! The few fields of GitHub's webhook payloads that cib reads, as serde types.
//!
//! Payloads carry hundreds of fields and GitHub adds more without notice, so these types name only
//! what the parser needs and let serde skip the rest (no `deny_unknown_fields`). A field GitHub
//! documents as always present is a plain field, so its absence is a `missing field` error naming
//! it; a field GitHub documents as present but possibly `null` uses [`nullable`], so it must be
//! there but may be `null`; a field that only some payloads carry is an `Option` with a default.

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

/// Reads a field that must be present but may be `null`. Without `deserialize_with`, serde would
/// quietly treat a missing `Option` field as `None` and hide a payload that lost the field.
fn nullable<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer)
}

/// The `action` of an event that has actions; read first, so ignored actions need nothing else.
#[derive(Debug, Deserialize)]
pub(super) struct Action {
    pub action: String,
}

/// The `action` of an event cib ignores: read on a best-effort basis for the inbox record.
#[derive(Debug, Deserialize)]
pub(super) struct MaybeAction {
    #[serde(default)]
    pub action: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Repository {
    pub full_name: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct User {
    pub login: String,
}

/// `ping`: sent when a hook is created. An organisation's hook has no repository, so only the
/// hook id is read, and it is optional because cib needs nothing from a ping.
#[derive(Debug, Deserialize)]
pub(super) struct Ping {
    #[serde(default)]
    pub hook_id: Option<u64>,
}

/// `push`: one ref moved, was created or was deleted.
#[derive(Debug, Deserialize)]
pub(super) struct Push {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub before: String,
    pub after: String,
    pub created: bool,
    pub deleted: bool,
    pub forced: bool,
    /// Optional: a payload without a commit list only means the changed paths are unknown.
    #[serde(default)]
    pub commits: Option<Vec<PushCommit>>,
    pub repository: Repository,
    pub sender: User,
}

/// A pushed commit's file lists; a list that is absent leaves the push's changed paths unknown.
#[derive(Debug, Deserialize)]
pub(super) struct PushCommit {
    #[serde(default)]
    pub added: Option<Vec<String>>,
    #[serde(default)]
    pub modified: Option<Vec<String>>,
    #[serde(default)]
    pub removed: Option<Vec<String>>,
}

/// `pull_request`, for the actions cib acts on.
#[derive(Debug, Deserialize)]
pub(super) struct PullRequestEvent {
    /// Present on `edited`: which of title, body and base changed.
    #[serde(default)]
    pub changes: Option<PullRequestChanges>,
    pub pull_request: PullRequest,
    pub repository: Repository,
    pub sender: User,
}

#[derive(Debug, Deserialize)]
pub(super) struct PullRequestChanges {
    /// Only its presence matters: it says the base branch was changed.
    #[serde(default)]
    pub base: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub(super) struct PullRequest {
    pub number: u64,
    /// `true` once merged; GitHub documents it as nullable, and `null` means not merged.
    #[serde(deserialize_with = "nullable")]
    pub merged: Option<bool>,
    pub user: User,
    pub base: PullRequestBase,
    pub head: PullRequestHead,
}

#[derive(Debug, Deserialize)]
pub(super) struct PullRequestBase {
    #[serde(rename = "ref")]
    pub branch: String,
    pub sha: String,
    pub repo: Repository,
}

#[derive(Debug, Deserialize)]
pub(super) struct PullRequestHead {
    #[serde(rename = "ref")]
    pub branch: String,
    pub sha: String,
    /// `null` when the head repository is gone (a deleted fork).
    #[serde(deserialize_with = "nullable")]
    pub repo: Option<Repository>,
}

/// `issue_comment` with action `created`.
#[derive(Debug, Deserialize)]
pub(super) struct IssueCommentEvent {
    pub issue: Issue,
    pub comment: Comment,
    pub repository: Repository,
    pub sender: User,
}

#[derive(Debug, Deserialize)]
pub(super) struct Issue {
    pub number: u64,
    /// Present (an object of links) when the issue is a pull request; absent or `null` otherwise.
    #[serde(default)]
    pub pull_request: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Comment {
    pub id: u64,
    pub body: String,
}

/// `check_run` with action `rerequested`.
#[derive(Debug, Deserialize)]
pub(super) struct CheckRunEvent {
    pub check_run: CheckRun,
    pub repository: Repository,
    pub sender: User,
}

#[derive(Debug, Deserialize)]
pub(super) struct CheckRun {
    pub name: String,
    pub head_sha: String,
    /// The id the check run's creator gave it; GitHub sends `""` or `null` when there is none.
    #[serde(default)]
    pub external_id: Option<String>,
}
