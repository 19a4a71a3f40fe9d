//! The master/production workflow over HTTP: reviews, merges by fast-forward, promotion
//! approvals, promotions, and the environments on record.
//!
//! Policy is read from the spec on the protected branch (the merge target, or the branch a
//! promotion comes from), never from the commit being merged or promoted. Identities are the
//! API tokens'. Every refusal lists every reason, in words (`workflow::explain`).

use std::sync::Arc;

use bytes::Bytes;
use cib_core::event::BuildId;
use cib_core::pipeline::{Actor, BuildContext, Input};
use cib_core::ports::{Comparison, Permission};
use cib_core::spec::{self, TriggerEvent};
use cib_core::workflow::{MergeFacts, PromotionFacts, check_merge, check_promotion, explain};
use http::{Response, StatusCode};
use serde::Deserialize;

use crate::config::{Role, TokenConfig};
use crate::http::{Body, error, json};
use crate::server::{AppState, read_json_body};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    commit: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeBody {
    /// The branch (or commit) to merge.
    head: String,
    /// The pull request it belongs to, whose reviews on the forge then count.
    #[serde(default)]
    pull: Option<u64>,
}

fn actor(who: &TokenConfig) -> Actor {
    Actor { login: who.name.clone(), teams: who.teams.clone(), can_write: who.role >= Role::Trigger }
}

fn permission(who: &TokenConfig) -> Permission {
    match who.role {
        Role::Read => Permission::Read,
        Role::Trigger | Role::Approve => Permission::Write,
        Role::Admin => Permission::Admin,
    }
}

/// The spec on a protected branch.
async fn policy_spec(state: &AppState, repo: &str, branch: &str) -> Result<spec::Spec, Response<Body>> {
    let source = match state.vcs.read_spec(repo, branch).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(error(StatusCode::UNPROCESSABLE_ENTITY, format!("{repo} has no spec on {branch}"))),
        Err(e) => {
            return Err(error(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot read the spec on {branch}: {e}")));
        }
    };
    spec::parse(&source).map_err(|d| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the spec on {branch} is invalid: {}", d[0].line(spec::FILE_NAME)),
        )
    })
}

async fn resolve(state: &AppState, repo: &str, rev: &str) -> Result<String, Response<Body>> {
    state
        .vcs
        .resolve(repo, rev)
        .await
        .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot resolve {rev}: {e}")))
}

/// Compares `head` with the tip of `target`; a target that does not exist yet is behind nothing.
async fn compare(state: &AppState, repo: &str, target: &str, head: &str) -> Result<Comparison, Response<Body>> {
    if state.vcs.resolve(repo, target).await.is_err() {
        return Ok(Comparison { ahead: 0, behind: 0 });
    }
    state
        .vcs
        .compare(repo, target, head)
        .await
        .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot compare: {e}")))
}

/// Starts the pipelines a push of `branch` at `commit` starts (the forge's webhook does not
/// come for a local repository). Build ids are derived from the move, so doing it twice makes
/// nothing new.
async fn build_branch(state: &AppState, repo: &str, branch: &str, commit: &str, by: &str, tag: &str) -> Vec<BuildId> {
    if !state.builds_on_move(repo) {
        return Vec::new();
    }
    let Ok(Some(source)) = state.vcs.read_spec(repo, commit).await else { return Vec::new() };
    let Ok(parsed) = spec::parse(&source) else { return Vec::new() };
    let event = TriggerEvent::push(branch);
    let text: Arc<str> = Arc::from(source.as_str());
    let mut ids = Vec::new();
    for p in parsed.plan(&event) {
        let id = BuildId(format!("{tag}-{}-{}", commit.get(..12).unwrap_or(commit), p.name));
        let input = Input::Enqueue {
            build: id.clone(),
            spec: text.clone(),
            pipeline: p.name.clone(),
            context: BuildContext {
                repo: repo.to_owned(),
                commit: commit.to_owned(),
                branch: Some(branch.to_owned()),
                pull_request: None,
                event: event.clone(),
                actor: Some(by.to_owned()),
                trusted: true,
            },
            only: None,
            variables: Default::default(),
        };
        if state.engine.submit(input).await.is_ok() {
            ids.push(id);
        }
    }
    ids
}

/// Fast-forwards `branch` to `commit`, records the move (with the approvals that allowed a
/// promotion), and starts the branch's pipelines when no webhook will.
async fn move_branch(
    state: &Arc<AppState>,
    repo: &str,
    branch: &str,
    commit: &str,
    user: &str,
    promotion: bool,
    approved_by: Vec<String>,
) -> Result<Vec<BuildId>, Response<Body>> {
    if let Err(e) = state.vcs.fast_forward(repo, branch, commit).await {
        return Err(error(StatusCode::CONFLICT, format!("{branch} could not be fast-forwarded: {e}")));
    }
    let moved = Input::Moved {
        repo: repo.to_owned(),
        branch: branch.to_owned(),
        commit: commit.to_owned(),
        by: user.to_owned(),
        promotion,
        approved_by,
    };
    record(state, moved).await?;
    let tag = if promotion { "promote" } else { "merge" };
    Ok(build_branch(state, repo, branch, commit, user, tag).await)
}

async fn record(state: &AppState, input: Input) -> Result<(), Response<Body>> {
    state.engine.submit(input).await.map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

/// `POST /api/v1/repos/{repo}/reviews {"commit"}`: an approving review, bound to the commit;
/// `.../approvals {"commit"}`: approves promoting that exact commit.
pub async fn approve<B>(
    state: &Arc<AppState>,
    req: http::Request<B>,
    repo: &str,
    who: &TokenConfig,
    promotion: bool,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let body: CommitBody = match read_json_body(state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    try_approve(state, repo, &body.commit, actor(who), promotion).await
}

/// Records a review or a promotion approval of `commit` by `actor`.
pub async fn try_approve(
    state: &Arc<AppState>,
    repo: &str,
    commit: &str,
    actor: Actor,
    promotion: bool,
) -> Response<Body> {
    let commit = match resolve(state, repo, commit).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let who = actor.login.clone();
    let repo = repo.to_owned();
    let input = if promotion {
        Input::ApprovePromotion { repo, commit: commit.clone(), actor }
    } else {
        Input::Review { repo, commit: commit.clone(), actor }
    };
    let what = if promotion { "approved" } else { "reviewed" };
    match record(state, input).await {
        Ok(()) => json(StatusCode::CREATED, &serde_json::json!({ what: commit, "by": who })),
        Err(r) => r,
    }
}

/// `POST /api/v1/repos/{repo}/merge {"head"}`: fast-forwards the target to the branch's head
/// when the policy allows, or answers every reason it does not.
pub async fn merge<B>(state: &Arc<AppState>, req: http::Request<B>, repo: &str, who: &TokenConfig) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let body: MergeBody = match read_json_body(state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    try_merge(state, repo, &body.head, body.pull, &who.name, permission(who)).await
}

/// Merges `head` into the target by fast-forward for `user`, whose permission the caller
/// established (a token's role, or the forge's permission API for a comment's author).
pub async fn try_merge(
    state: &Arc<AppState>,
    repo: &str,
    head: &str,
    pull: Option<u64>,
    user: &str,
    permission: Permission,
) -> Response<Body> {
    // The policy of the branch merged into, which the merged code cannot change.
    let into = "master";
    let spec = match policy_spec(state, repo, into).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let policy = spec.merge.clone().unwrap_or(spec::MergePolicy {
        into: into.to_owned(),
        fast_forward_only: true,
        pipelines: Vec::new(),
        reviews: 0,
        up_to_date: true,
    });
    let head = match resolve(state, repo, head).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let comparison = match compare(state, repo, &policy.into, &head).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    // Reviews: the forge's own (for a pull request), and those recorded through cib.
    let mut reviewers: Vec<String> = match pull {
        Some(number) => state.vcs.approving_reviews(repo, number, &head).await.ok().flatten().unwrap_or_default(),
        None => Vec::new(),
    };
    let (results, recorded) = {
        let (repo_q, head_q) = (repo.to_owned(), head.clone());
        match state
            .engine
            .query(move |m| {
                let by: Vec<String> =
                    m.reviews(&repo_q).iter().filter(|r| r.commit == head_q).map(|r| r.by.clone()).collect();
                (m.results(&repo_q, &head_q), by)
            })
            .await
        {
            Ok(found) => found,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    };
    reviewers.extend(recorded);
    reviewers.retain(|r| r != user);
    reviewers.sort_unstable();
    reviewers.dedup();
    let reviews = reviewers.len() as u32;
    let facts = MergeFacts { user, permission, comparison, results: &results, reviews };
    if let Err(refusals) = check_merge(&policy, &facts) {
        let message = explain("merge this branch", &refusals);
        return json(StatusCode::CONFLICT, &serde_json::json!({ "error": message, "refusals": refusals }));
    }
    let builds = match move_branch(state, repo, &policy.into, &head, user, false, Vec::new()).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    crate::inbox::reevaluate(state, repo, &policy.into).await;
    json(StatusCode::OK, &serde_json::json!({ "merged": head, "into": policy.into, "builds": builds }))
}

/// `POST /api/v1/repos/{repo}/promote {"commit"}`: fast-forwards production to the commit when
/// it passed staging and has its approvals, or answers every reason it may not.
pub async fn promote<B>(state: &Arc<AppState>, req: http::Request<B>, repo: &str, who: &TokenConfig) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let body: CommitBody = match read_json_body(state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    try_promote(state, repo, &body.commit, &who.name).await
}

/// Promotes `commit` for `user`, who the caller established may ask.
pub async fn try_promote(state: &Arc<AppState>, repo: &str, commit: &str, user: &str) -> Response<Body> {
    let spec = match policy_spec(state, repo, "master").await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(policy) = spec.promotion.clone() else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "the spec on master has no promotion policy");
    };
    let commit = match resolve(state, repo, commit).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    // The commit must be on the branch it is promoted from.
    match compare(state, repo, &policy.from, &commit).await {
        Ok(c) if c.ahead > 0 => {
            return error(
                StatusCode::CONFLICT,
                format!("cib cannot promote this commit:\n- it is not on {}", policy.from),
            );
        }
        Ok(_) => {}
        Err(r) => return r,
    }
    let comparison = match compare(state, repo, &policy.to, &commit).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let author = state.vcs.author(repo, &commit).await.ok().flatten();
    let (results, approvals) = {
        let (repo_q, commit_q) = (repo.to_owned(), commit.clone());
        match state.engine.query(move |m| (m.results(&repo_q, &commit_q), m.approvals(&repo_q).to_vec())).await {
            Ok(found) => found,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    };
    let facts = PromotionFacts {
        commit: &commit,
        author: author.as_deref(),
        comparison,
        results: &results,
        approvals: &approvals,
        now: state.clock.now(),
    };
    let approved_by = match check_promotion(&policy, &facts) {
        Ok(who) => who,
        Err(refusals) => {
            let message = explain("promote this commit", &refusals);
            return json(StatusCode::CONFLICT, &serde_json::json!({ "error": message, "refusals": refusals }));
        }
    };
    let builds = match move_branch(state, repo, &policy.to, &commit, user, true, approved_by).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    json(StatusCode::OK, &serde_json::json!({ "promoted": commit, "to": policy.to, "builds": builds }))
}

/// `GET /api/v1/repos/{repo}/environments`: which commit is where, since when, approved by whom.
pub async fn environments(state: &AppState, repo: &str) -> Response<Body> {
    let repo = repo.to_owned();
    match state.engine.query(move |m| m.environments(&repo)).await {
        Ok(envs) => json(StatusCode::OK, &serde_json::json!({ "environments": envs })),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
