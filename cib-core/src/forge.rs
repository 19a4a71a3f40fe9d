//! Events from a forge (GitHub, a plain Git server), turned into domain terms at the edge.
//!
//! A backend parses its webhooks into these; nothing past the edge sees a payload. Identities
//! here come from the forge's authenticated delivery (the sender), never from commit data.

use serde::{Deserialize, Serialize};

/// A repository as the forge names it (`owner/name`).
pub type RepoName = String;

/// Something that happened on the forge that cib may act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ForgeEvent {
    /// The forge checks the hook works.
    Ping { hook_id: Option<u64> },
    /// A branch or tag moved, was created or was deleted.
    Push(Push),
    /// A pull request changed.
    PullRequest(PullRequest),
    /// A comment addressed to cib (`/cib ...`) on a pull request or issue.
    Command(Command),
    /// Someone asked for a check to run again.
    Rerun {
        repo: RepoName,
        sender: String,
        commit: String,
        name: String,
        /// What the check reports on, as the backend that made it named it (cib names a
        /// pipeline's check run after its build).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        external_id: Option<String>,
    },
    /// An event cib does not act on; kept in the inbox, ignored.
    Ignored { event: String, action: Option<String> },
}

/// What a push did to one ref.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub repo: RepoName,
    /// The branch pushed, or `None` for a tag.
    pub branch: Option<String>,
    /// The tag pushed, or `None` for a branch.
    pub tag: Option<String>,
    /// The commit before the push (all zeros for a new ref).
    pub before: String,
    /// The commit after the push (all zeros for a deleted ref).
    pub after: String,
    pub created: bool,
    pub deleted: bool,
    pub forced: bool,
    /// Files added, modified or removed by the pushed commits, when the forge says.
    pub changed_paths: Option<Vec<String>>,
    /// The authenticated user who pushed.
    pub sender: String,
}

/// What happened to a pull request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullRequestAction {
    Opened,
    /// New commits were pushed to the head branch.
    Synchronize,
    Reopened,
    /// Closed without merging.
    Closed,
    /// Closed by merging.
    Merged,
    /// The base branch changed.
    BaseChanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    pub repo: RepoName,
    pub action: PullRequestAction,
    pub number: u64,
    /// The branch it would merge into.
    pub base_branch: String,
    pub base_commit: String,
    pub head_branch: String,
    pub head_commit: String,
    /// The repository the head branch lives in, or `None` when the forge no longer knows it (a
    /// fork deleted after the pull request was opened); such a pull request counts as a fork.
    pub head_repo: Option<RepoName>,
    /// The head lives in a fork: no secrets and no privileged steps until a maintainer approves.
    pub from_fork: bool,
    pub author: String,
    pub sender: String,
}

/// A command given in a comment, with who gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub repo: RepoName,
    /// The pull request or issue number the comment is on.
    pub number: u64,
    pub is_pull_request: bool,
    pub sender: String,
    pub comment_id: u64,
    /// The words after `/cib`, e.g. `["merge"]` or `["promote", "abc123"]`.
    pub words: Vec<String>,
}

/// The words of the first line starting with `/cib` in a comment, if any.
pub fn parse_command(body: &str) -> Option<Vec<String>> {
    body.lines().map(str::trim).find_map(|line| {
        let rest = line.strip_prefix("/cib")?;
        if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
            return None;
        }
        Some(rest.split_whitespace().map(str::to_owned).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_command;

    #[test]
    fn commands_are_found_on_their_own_line() {
        assert_eq!(parse_command("/cib merge"), Some(vec!["merge".to_owned()]));
        assert_eq!(
            parse_command("Looks good.\n  /cib promote abc123  \nthanks"),
            Some(vec!["promote".into(), "abc123".into()])
        );
        assert_eq!(parse_command("/cib"), Some(vec![]));
        assert_eq!(parse_command("/cibmerge"), None);
        assert_eq!(parse_command("please /cib merge"), None);
    }
}
