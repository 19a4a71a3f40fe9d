//! Turning a verified delivery (`X-GitHub-Event` and body) into a [`ForgeEvent`].
//!
//! The parser reads the `action` first and only then the fields that action needs, so an action
//! cib ignores is never refused because of a field cib would not have used. Malformed input is a
//! [`ParseError`] naming the field at fault, which the server returns in its 400 answer.

use std::collections::BTreeSet;

use cib_core::forge::{Command, ForgeEvent, PullRequest, PullRequestAction, Push, parse_command};
use serde::de::{DeserializeOwned, IgnoredAny};

use super::payload;

/// The events parsed into something other than [`ForgeEvent::Ignored`] (for some actions).
const EVENTS: [&str; 5] = ["ping", "push", "pull_request", "issue_comment", "check_run"];

/// A push payload lists at most this many commits; a list this long may have been cut short, so
/// the paths it names may not be all the paths the push changed.
const TRUNCATED_COMMITS: usize = 20;

/// Why a delivery's body could not be turned into a [`ForgeEvent`].
///
/// The message is meant for the sender (it goes into a 400 answer) and names the field at fault
/// with its path in the payload, such as `pull_request.head.sha`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The body is not JSON (or has bytes after the JSON value).
    #[error("the {event} payload is not valid JSON: {reason}")]
    Json { event: String, reason: String },
    /// A field cib needs is absent.
    #[error("the {event} payload is missing `{field}`")]
    MissingField { event: String, field: String },
    /// A field cib needs is present but of the wrong type (for example `null` or a number where a
    /// string belongs). `field` is `(root)` when the body itself is not a JSON object.
    #[error("the {event} payload has an invalid `{field}`: {reason}")]
    InvalidField { event: String, field: String, reason: String },
}

/// Parses a delivery of `event` (the `X-GitHub-Event` header) into a forge event.
///
/// Events and actions cib does not act on become [`ForgeEvent::Ignored`]; for an event type cib
/// does not know at all, the body is not checked, since nothing will read it.
pub fn parse(event: &str, body: &[u8]) -> Result<ForgeEvent, ParseError> {
    if EVENTS.contains(&event) {
        check_syntax(event, body)?;
    }
    match event {
        "ping" => ping(body),
        "push" => push(body),
        "pull_request" => pull_request(body),
        "issue_comment" => issue_comment(body),
        "check_run" => check_run(body),
        _ => {
            let action = serde_json::from_slice::<payload::MaybeAction>(body).ok().and_then(|a| a.action);
            Ok(ignored(event, action))
        }
    }
}

fn ping(body: &[u8]) -> Result<ForgeEvent, ParseError> {
    let ping: payload::Ping = from_json("ping", body)?;
    Ok(ForgeEvent::Ping { hook_id: ping.hook_id })
}

fn push(body: &[u8]) -> Result<ForgeEvent, ParseError> {
    let push: payload::Push = from_json("push", body)?;
    let (branch, tag) = if let Some(branch) = push.git_ref.strip_prefix("refs/heads/") {
        (Some(branch.to_owned()), None)
    } else if let Some(tag) = push.git_ref.strip_prefix("refs/tags/") {
        (None, Some(tag.to_owned()))
    } else {
        // Other refs (notes, GitHub's own refs/pull/...) are neither a branch nor a tag, and no
        // pipeline can be triggered by them.
        return Ok(ignored("push", None));
    };
    let changed_paths = changed_paths(&push);
    Ok(ForgeEvent::Push(Push {
        repo: push.repository.full_name,
        branch,
        tag,
        before: push.before,
        after: push.after,
        created: push.created,
        deleted: push.deleted,
        forced: push.forced,
        changed_paths,
        sender: push.sender.login,
    }))
}

/// The files the push changed, or `None` when the payload cannot say for sure.
///
/// `None` makes every path filter match, so whenever the list might be incomplete it is better to
/// run too much than to skip a pipeline that the change needed.
fn changed_paths(push: &payload::Push) -> Option<Vec<String>> {
    // The commit list of a new ref is compared against the default branch (or is empty when the
    // ref points at an existing commit), a deleted ref has none, and a forced push lists only the
    // new commits, not the ones it threw away: in none of them do the commits' files describe the
    // change from `before` to `after`.
    if push.created || push.deleted || push.forced {
        return None;
    }
    let commits = push.commits.as_ref()?;
    if commits.len() >= TRUNCATED_COMMITS {
        return None;
    }
    let mut paths = BTreeSet::new();
    for commit in commits {
        let (added, modified, removed) = (commit.added.as_ref()?, commit.modified.as_ref()?, commit.removed.as_ref()?);
        // GitHub leaves all three lists empty for a commit too large to list in time, which looks
        // just like an empty commit; either way the paths are not known.
        if added.is_empty() && modified.is_empty() && removed.is_empty() {
            return None;
        }
        paths.extend(added.iter().chain(modified).chain(removed).cloned());
    }
    Some(paths.into_iter().collect())
}

fn pull_request(body: &[u8]) -> Result<ForgeEvent, ParseError> {
    const EVENT: &str = "pull_request";
    let action = from_json::<payload::Action>(EVENT, body)?.action;
    let simple = match action.as_str() {
        "opened" => Some(PullRequestAction::Opened),
        "synchronize" => Some(PullRequestAction::Synchronize),
        "reopened" => Some(PullRequestAction::Reopened),
        "closed" | "edited" => None,
        _ => return Ok(ignored(EVENT, Some(action))),
    };
    let event: payload::PullRequestEvent = from_json(EVENT, body)?;
    let action = match (simple, action.as_str()) {
        (Some(simple), _) => simple,
        (None, "closed") if event.pull_request.merged == Some(true) => PullRequestAction::Merged,
        (None, "closed") => PullRequestAction::Closed,
        // An edit of the title or the description changes nothing cib builds.
        (None, _) if event.changes.as_ref().is_some_and(|c| c.base.is_some()) => PullRequestAction::BaseChanged,
        (None, _) => return Ok(ignored(EVENT, Some(action))),
    };
    let pr = event.pull_request;
    // A fork is recognised from the repositories GitHub names, never from branch or user names
    // (anyone can call a branch `main`). A head repository GitHub no longer knows cannot be shown
    // to be the base, so it counts as a fork.
    let head_repo = pr.head.repo.map(|repo| repo.full_name);
    let from_fork = head_repo.as_deref() != Some(pr.base.repo.full_name.as_str());
    Ok(ForgeEvent::PullRequest(PullRequest {
        repo: event.repository.full_name,
        action,
        number: pr.number,
        base_branch: pr.base.branch,
        base_commit: pr.base.sha,
        head_branch: pr.head.branch,
        head_commit: pr.head.sha,
        head_repo,
        from_fork,
        author: pr.user.login,
        sender: event.sender.login,
    }))
}

fn issue_comment(body: &[u8]) -> Result<ForgeEvent, ParseError> {
    const EVENT: &str = "issue_comment";
    let action = from_json::<payload::Action>(EVENT, body)?.action;
    // Only new comments are commands: acting on an edit would let anyone re-run an old command by
    // touching the comment, and a deleted comment asks for nothing.
    if action != "created" {
        return Ok(ignored(EVENT, Some(action)));
    }
    let event: payload::IssueCommentEvent = from_json(EVENT, body)?;
    let Some(words) = parse_command(&event.comment.body) else {
        return Ok(ignored(EVENT, Some(action)));
    };
    Ok(ForgeEvent::Command(Command {
        repo: event.repository.full_name,
        number: event.issue.number,
        is_pull_request: event.issue.pull_request.is_some(),
        sender: event.sender.login,
        comment_id: event.comment.id,
        words,
    }))
}

fn check_run(body: &[u8]) -> Result<ForgeEvent, ParseError> {
    const EVENT: &str = "check_run";
    let action = from_json::<payload::Action>(EVENT, body)?.action;
    if action != "rerequested" {
        return Ok(ignored(EVENT, Some(action)));
    }
    let event: payload::CheckRunEvent = from_json(EVENT, body)?;
    Ok(ForgeEvent::Rerun {
        repo: event.repository.full_name,
        sender: event.sender.login,
        commit: event.check_run.head_sha,
        name: event.check_run.name,
        external_id: event.check_run.external_id.filter(|id| !id.is_empty()),
    })
}

fn ignored(event: &str, action: Option<String>) -> ForgeEvent {
    ForgeEvent::Ignored { event: event.to_owned(), action }
}

/// Refuses a body that is not one JSON value, before any field is looked at.
///
/// Typed deserialisation stops at the first field it cannot use, so without this pass `{} x`
/// would be reported as missing its `action` rather than as the broken JSON it is. The pass
/// allocates nothing, and serde_json's depth limit keeps it from recursing without bound.
fn check_syntax(event: &str, body: &[u8]) -> Result<(), ParseError> {
    serde_json::from_slice::<IgnoredAny>(body)
        .map(|_| ())
        .map_err(|error| ParseError::Json { event: event.to_owned(), reason: error.to_string() })
}

/// Deserialises `body` (already known to be JSON) as `T`, keeping the path of the field at fault.
fn from_json<T: DeserializeOwned>(event: &str, body: &[u8]) -> Result<T, ParseError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        to_parse_error(event, &path, error.into_inner())
    })
}

fn to_parse_error(event: &str, path: &str, error: serde_json::Error) -> ParseError {
    let event = event.to_owned();
    if !error.is_data() {
        return ParseError::Json { event, reason: error.to_string() };
    }
    let reason = error.to_string();
    // serde's wording for a missing field is fixed ("missing field `name`"), and the path points
    // at the object that lacks it, so the two together name the field in full.
    if let Some(name) = reason.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()) {
        let field = if path == "." { name.to_owned() } else { format!("{path}.{name}") };
        return ParseError::MissingField { event, field };
    }
    let field = if path == "." { "(root)".to_owned() } else { path.to_owned() };
    ParseError::InvalidField { event, field, reason }
}
