//! The master/production workflow over HTTP: reviews, merges by fast-forward, promotion
//! approvals, promotions, and the environments on record.
//!
//! Policy is read from the spec on the protected branch (the merge target, or the branch a
//! promotion comes from), never from the commit being merged or promoted. Identities are the
//! API tokens'. Every refusal lists every reason, in words (`workflow::explain`).

use std::sync::Arc;

use cib_core::event::BuildId;
use cib_core::pipeline::{Actor, BuildContext, Input};
use cib_core::ports::{Comparison, Permission, pipeline_results};
use cib_core::spec::{self, TriggerEvent};
use cib_core::workflow::{MergeFacts, PromotionFacts, Refusal, check_merge, check_promotion, explain};
use serde::Serialize;

use crate::error::ApiError;
use crate::state::AppState;

/// The teams the governing spec's promotion approvals name, so that a person's membership of
/// them can be asked of the forge; empty when the spec cannot be read or names none.
pub async fn promotion_teams(state: &AppState, repo: &str) -> Vec<String> {
    match governing_spec(state, repo, None).await {
        Ok((spec, _)) => spec.promotion.map(|p| p.approvers.teams).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Enqueues `id`'s pipeline again at the same commit as the build `new`, run by `actor`; the
/// API's retry and a check run's re-run both come here. The spec is the one stored with the
/// original build, never the one at its commit: for a fork's pull request the commit's spec is
/// the fork's, and it would choose its own steps and secrets. A finished build is no longer in
/// the engine; the store keeps the input that enqueued it. `None` when there is no such build.
pub async fn retry_build(
    state: &Arc<AppState>,
    id: &BuildId,
    new: BuildId,
    actor: String,
) -> Result<Option<(BuildId, BuildContext)>, ApiError> {
    let found = state
        .engine
        .query({
            let id = id.clone();
            move |m| {
                m.build(&id).map(|b| (b.pipeline.name.clone(), b.context.clone(), b.variables.clone(), b.spec.clone()))
            }
        })
        .await
        .map_err(ApiError::unavailable)?;
    let found = match found {
        Some(found) => Some(found),
        None => match state.store.enqueued(id).await.map_err(ApiError::unavailable)? {
            Some(cib_core::ports::StoredInput {
                input: Input::Enqueue { pipeline, context, variables, spec, .. },
                ..
            }) => Some((pipeline, context, variables, spec)),
            _ => None,
        },
    };
    let Some((pipeline, context, variables, source)) = found else { return Ok(None) };
    // A downstream build runs again at its repository's tip as it is now (a fix there is why
    // it is re-run), still against the same upstream commit.
    if context.upstream.is_some() {
        let Some((input, context)) = crate::downstream::rerun_input(state, &context, &pipeline, &new, actor).await
        else {
            return Err(ApiError::Unprocessable(format!(
                "{}'s default branch, its spec or its pipeline '{pipeline}' cannot be read now",
                context.repo
            )));
        };
        state.engine.submit(input).await.map_err(ApiError::unavailable)?;
        return Ok(Some((new, context)));
    }
    let context = BuildContext { actor: Some(actor), ..context };
    let input =
        Input::Enqueue { build: new.clone(), spec: source, pipeline, context: context.clone(), only: None, variables };
    state.engine.submit(input).await.map_err(ApiError::unavailable)?;
    Ok(Some((new, context)))
}

/// A review or a promotion approval on record.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Recorded {
    Review { reviewed: String, by: String },
    Approval { approved: String, by: String },
}

/// A merge that was done.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Merged {
    pub merged: String,
    pub into: String,
    pub builds: Vec<BuildId>,
}

/// A promotion that was done.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Promoted {
    pub promoted: String,
    pub to: String,
    pub builds: Vec<BuildId>,
}

fn refused(what: &str, refusals: &[Refusal]) -> ApiError {
    ApiError::Refused { message: explain(what, refusals), refusals: serde_json::to_value(refusals).unwrap_or_default() }
}

/// Parses a spec that came from outside on the blocking pool: a hostile one costs at most the
/// parser's bounded time, and never stalls the async workers that serve everyone else.
///
/// Under `limits`, a value over one of the operator's maximums is a diagnostic like any other,
/// so a spec asking too much is refused wherever an invalid one is (the `spec_invalid` event
/// and the `cib/spec` status for a push, 422 for the API), and the spec returned has the
/// operator's defaults filled in. Reading policy (merges, promotions) plans no build and
/// passes no limits.
pub async fn parse_blocking(
    source: std::sync::Arc<str>,
    limits: spec::OperatorLimits,
) -> Result<spec::Spec, Vec<spec::Diagnostic>> {
    match tokio::task::spawn_blocking(move || spec::parse_limited(&source, &limits)).await {
        Ok(parsed) => parsed,
        // The parser does not panic on any input (its fuzz and property tests say so); were
        // it to, the spec is refused rather than the server brought down.
        Err(e) => Err(vec![spec::Diagnostic::error(
            spec::Pos { line: 1, col: 1 },
            format!("the spec could not be read: {e}"),
        )]),
    }
}

/// The base branch of an open pull request the machine knows of.
async fn pull_base(state: &AppState, repo: &str, number: u64) -> Option<String> {
    let repo = repo.to_owned();
    state.engine.query(move |m| m.pull_requests(&repo).get(&number).map(|p| p.base.clone())).await.ok().flatten()
}

/// The branch whose spec is read first: a pull request's base when there is one, else the
/// repository's default branch, else the spec's default integration branch.
async fn home_branch(state: &AppState, repo: &str, pull: Option<u64>) -> String {
    if let Some(number) = pull
        && let Some(base) = pull_base(state, repo, number).await
    {
        return base;
    }
    match state.vcs.default_branch(repo).await {
        Ok(Some(branch)) => branch,
        _ => spec::DEFAULT_INTEGRATION_BRANCH.to_owned(),
    }
}

/// The spec that governs merges and promotions: the one on the integration branch, which the
/// code being merged or promoted cannot change. The home branch's spec names that branch; when
/// it names another, that branch's own spec is the one that counts.
async fn governing_spec(state: &AppState, repo: &str, pull: Option<u64>) -> Result<(spec::Spec, String), ApiError> {
    let mut home = home_branch(state, repo, pull).await;
    let spec = match policy_spec(state, repo, &home).await {
        Ok(spec) => spec,
        // A default branch without a spec (a checked-out working branch of a local
        // repository, say) says nothing; the spec's default integration branch may.
        Err(first) if home != spec::DEFAULT_INTEGRATION_BRANCH => {
            home = spec::DEFAULT_INTEGRATION_BRANCH.to_owned();
            policy_spec(state, repo, &home).await.map_err(|_| first)?
        }
        Err(e) => return Err(e),
    };
    let integration = spec.integration_branch().to_owned();
    if integration == home {
        return Ok((spec, home));
    }
    Ok((policy_spec(state, repo, &integration).await?, integration))
}

/// The spec on a protected branch.
async fn policy_spec(state: &AppState, repo: &str, branch: &str) -> Result<spec::Spec, ApiError> {
    let source = match state.vcs.read_spec(repo, branch).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(ApiError::Unprocessable(format!("{repo} has no spec on {branch}"))),
        Err(e) => return Err(ApiError::Unprocessable(format!("cannot read the spec on {branch}: {e}"))),
    };
    parse_blocking(Arc::from(source.as_str()), spec::OperatorLimits::default()).await.map_err(|d| {
        let first = d.first().map(|d| d.line(spec::FILE_NAME)).unwrap_or_default();
        ApiError::Unprocessable(format!("the spec on {branch} is invalid: {first}"))
    })
}

async fn resolve(state: &AppState, repo: &str, rev: &str) -> Result<String, ApiError> {
    state.vcs.resolve(repo, rev).await.map_err(|e| ApiError::Unprocessable(format!("cannot resolve {rev}: {e}")))
}

/// Compares `head` with the tip of `target`; a target that does not exist yet is behind nothing.
async fn compare(state: &AppState, repo: &str, target: &str, head: &str) -> Result<Comparison, ApiError> {
    if state.vcs.resolve(repo, target).await.is_err() {
        return Ok(Comparison { ahead: 0, behind: 0 });
    }
    state.vcs.compare(repo, target, head).await.map_err(|e| ApiError::Unprocessable(format!("cannot compare: {e}")))
}

/// Starts the pipelines a push of `branch` at `commit` starts (the forge's webhook does not
/// come for a local repository). Build ids are derived from the move, so doing it twice makes
/// nothing new.
async fn build_branch(
    state: &AppState,
    repo: &str,
    branch: &str,
    commit: &str,
    by: &str,
    promotion: bool,
) -> Vec<BuildId> {
    if !state.builds_on_move(repo) {
        return Vec::new();
    }
    let Ok(Some(source)) = state.vcs.read_spec(repo, commit).await else { return Vec::new() };
    let text: Arc<str> = Arc::from(source.as_str());
    let Ok(parsed) = parse_blocking(text.clone(), state.config.operator_limits()).await else { return Vec::new() };
    let (event, tag) = if promotion {
        (TriggerEvent::of(spec::EventKind::Promotion, branch), "promote")
    } else {
        (TriggerEvent::push(branch), "merge")
    };
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
                upstream: None,
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
) -> Result<Vec<BuildId>, ApiError> {
    if let Err(e) = state.vcs.fast_forward(repo, branch, commit).await {
        return Err(ApiError::Conflict(format!("{branch} could not be fast-forwarded: {e}")));
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
    let mut builds = build_branch(state, repo, branch, commit, user, promotion).await;
    // Repositories downstream of this branch test the new commit (for GitHub the push webhook
    // asks again; the ids are the same, so nothing runs twice).
    builds.extend(crate::downstream::start(state, repo, branch, commit, user).await);
    Ok(builds)
}

async fn record(state: &AppState, input: Input) -> Result<(), ApiError> {
    state.engine.submit(input).await.map_err(ApiError::unavailable)
}

/// Records a review or a promotion approval of `commit` by `actor`.
pub async fn try_approve(
    state: &Arc<AppState>,
    repo: &str,
    commit: &str,
    actor: Actor,
    promotion: bool,
) -> Result<Recorded, ApiError> {
    let commit = resolve(state, repo, commit).await?;
    let who = actor.login.clone();
    let repo = repo.to_owned();
    let input = if promotion {
        Input::ApprovePromotion { repo, commit: commit.clone(), actor }
    } else {
        Input::Review { repo, commit: commit.clone(), actor }
    };
    record(state, input).await?;
    Ok(if promotion {
        Recorded::Approval { approved: commit, by: who }
    } else {
        Recorded::Review { reviewed: commit, by: who }
    })
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
) -> Result<Merged, ApiError> {
    // The policy of the branch merged into, which the merged code cannot change.
    let (spec, into) = governing_spec(state, repo, pull).await?;
    if let Some(number) = pull
        && let Some(base) = pull_base(state, repo, number).await.filter(|b| *b != into)
    {
        return Err(ApiError::Unprocessable(format!(
            "pull request #{number} is into {base}, but the spec merges into {into}: cib merges only into {into}"
        )));
    }
    let policy = spec.merge.clone().unwrap_or(spec::MergePolicy {
        into,
        fast_forward_only: true,
        pipelines: Vec::new(),
        reviews: 0,
        up_to_date: true,
    });
    let head = resolve(state, repo, head).await?;
    let comparison = compare(state, repo, &policy.into, &head).await?;
    // Reviews: the forge's own (for a pull request), and those recorded through cib.
    let mut reviewers: Vec<String> = match pull {
        Some(number) => state.vcs.approving_reviews(repo, number, &head).await.ok().flatten().unwrap_or_default(),
        None => Vec::new(),
    };
    // Forge logins become people, so one person's two identities give one review.
    for r in &mut reviewers {
        if let Some(p) = state.people.find(&cib_core::policy::Identity::Github(r.clone())) {
            *r = p.name.clone();
        }
    }
    let recorded = {
        let (repo_q, head_q) = (repo.to_owned(), head.clone());
        state
            .engine
            .query(move |m| {
                m.reviews(&repo_q).iter().filter(|r| r.commit == head_q).map(|r| r.by.clone()).collect::<Vec<_>>()
            })
            .await
            .map_err(ApiError::unavailable)?
    };
    // Finished builds live in the store, not in the engine's memory.
    let results = pipeline_results(state.store.as_ref(), repo, &head).await.map_err(ApiError::unavailable)?;
    reviewers.extend(recorded);
    reviewers.retain(|r| r != user);
    // The commit's author reviewing their own commit is no review. The author is the one on
    // record, else the forge's account for the commit (local repositories have none).
    let recorded_author = {
        let (repo_q, head_q) = (repo.to_owned(), head.clone());
        state.engine.query(move |m| m.commit_author(&repo_q, &head_q).map(str::to_owned)).await.ok().flatten()
    };
    let author = match recorded_author {
        Some(a) => Some(a),
        None if !state.is_local(repo) => {
            state.vcs.author(repo, &head).await.ok().flatten().map(|login| state.person_of_login(&login))
        }
        None => None,
    };
    if let Some(author) = author {
        reviewers.retain(|r| *r != author);
    }
    reviewers.sort_unstable();
    reviewers.dedup();
    let reviews = reviewers.len() as u32;
    let facts = MergeFacts { user, permission, comparison, results: &results, reviews };
    check_merge(&policy, &facts).map_err(|refusals| refused("merge this branch", &refusals))?;
    let builds = move_branch(state, repo, &policy.into, &head, user, false, Vec::new()).await?;
    reevaluate(state, repo, &policy.into).await;
    Ok(Merged { merged: head, into: policy.into, builds })
}

/// Promotes `commit` for `user`, who the caller established may ask.
pub async fn try_promote(
    state: &Arc<AppState>,
    repo: &str,
    commit: &str,
    user: &str,
    pull: Option<u64>,
) -> Result<Promoted, ApiError> {
    let (spec, branch) = governing_spec(state, repo, pull).await?;
    let Some(policy) = spec.promotion.clone() else {
        return Err(ApiError::Unprocessable(format!("the spec on {branch} has no promotion policy")));
    };
    let (commit, approved_by) = check_promotable(state, repo, &policy, commit).await?;
    let builds = move_branch(state, repo, &policy.to, &commit, user, true, approved_by).await?;
    Ok(Promoted { promoted: commit, to: policy.to, builds })
}

/// The promotion policy on the integration branch, when the spec there has one.
pub async fn promotion_policy(state: &AppState, repo: &str) -> Result<Option<spec::PromotionPolicy>, ApiError> {
    Ok(governing_spec(state, repo, None).await?.0.promotion)
}

/// Whether `commit` may be promoted under `policy`: the commit and the people whose
/// approvals count, or every reason it may not. Promotions and deploys started by hand both
/// ask this, so a deploy cannot go around the promotion rules.
pub async fn check_promotable(
    state: &AppState,
    repo: &str,
    policy: &spec::PromotionPolicy,
    commit: &str,
) -> Result<(String, Vec<String>), ApiError> {
    let commit = resolve(state, repo, commit).await?;
    // The commit must be on the branch it is promoted from.
    if compare(state, repo, &policy.from, &commit).await?.ahead > 0 {
        return Err(ApiError::Conflict(format!("cib cannot promote this commit:\n- it is not on {}", policy.from)));
    }
    let comparison = compare(state, repo, &policy.to, &commit).await?;
    let author = state.vcs.author(repo, &commit).await.ok().flatten();
    let (approvals, downstream) = {
        let repo_q = repo.to_owned();
        state
            .engine
            .query(move |m| (m.approvals(&repo_q).to_vec(), m.downstream_results(&repo_q).to_vec()))
            .await
            .map_err(ApiError::unavailable)?
    };
    let results = pipeline_results(state.store.as_ref(), repo, &commit).await.map_err(ApiError::unavailable)?;
    let facts = PromotionFacts {
        commit: &commit,
        author: author.as_deref(),
        comparison,
        results: &results,
        approvals: &approvals,
        downstream: &downstream,
        now: state.clock.now(),
    };
    let approved_by = check_promotion(policy, &facts).map_err(|refusals| refused("promote this commit", &refusals))?;
    Ok((commit, approved_by))
}

/// Records who wrote `commit`, as a person, so that its gates refuse that person's approval.
/// Only a forge's account counts (GitHub links it by the author's verified email): local
/// repositories have no accounts, and the name written in a commit is anyone's to choose, so
/// nothing is recorded for them. The inbox should call this too for the builds it starts.
pub async fn record_commit_author(state: &AppState, repo: &str, commit: &str) {
    if state.is_local(repo) {
        return;
    }
    let Ok(Some(login)) = state.vcs.author(repo, commit).await else { return };
    let input =
        Input::CommitAuthor { repo: repo.to_owned(), commit: commit.to_owned(), person: state.person_of_login(&login) };
    if let Err(e) = state.engine.submit(input).await {
        tracing::warn!(%repo, %commit, error = %e, "the commit's author could not be recorded");
    }
}

/// Re-evaluates whether each open pull request into `base` contains its tip: the second
/// status of a pull request, which changes when the base moves as much as when the head does.
pub async fn reevaluate(state: &Arc<AppState>, repo: &str, base: &str) {
    let repo_q = repo.to_owned();
    let Ok(prs) = state.engine.query(move |m| m.pull_requests(&repo_q)).await else { return };
    for (number, pr) in prs.into_iter().filter(|(_, pr)| pr.base == base) {
        if let Ok(c) = state.vcs.compare(repo, &pr.base, &pr.head_commit).await {
            let input = Input::UpToDate {
                repo: repo.to_owned(),
                number,
                head_commit: pr.head_commit,
                base: pr.base,
                behind: c.behind,
            };
            let _ = state.engine.submit(input).await;
        }
    }
}
