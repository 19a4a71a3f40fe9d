//! Repositories and the master/production workflow: reviews, merges by fast-forward,
//! promotion approvals, promotions, and the environments on record. The rules live in
//! [`crate::workflow`] (and, purely, in `cib_core::workflow`); this module is their HTTP face.
//!
//! A repository is `owner/name`: two path segments, or one with the slash encoded as `%2F`.
//! Both forms are routes of their own in the table, answered by the same handlers.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use cib_core::pipeline::{Actor, Environment};
use cib_core::ports::Permission;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::config::{Role, TokenConfig};
use crate::error::{ApiError, json_response};
use crate::extract::{JsonBody, PathParams};
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;
use crate::workflow::{self, Merged, Promoted, Recorded};

/// The repository a path names, in either form.
fn repo_of(params: &BTreeMap<String, String>) -> String {
    match (params.get("owner"), params.get("name")) {
        (Some(owner), Some(name)) => format!("{owner}/{name}"),
        (Some(repo), None) => repo.clone(),
        _ => String::new(),
    }
}

/// The path parameters of a route in the two-segment form, or the one-segment form.
pub fn repo_params(two_segments: bool) -> Vec<Param> {
    if two_segments {
        vec![Param::path("owner", "The repository's owner."), Param::path("name", "The repository's name.")]
    } else {
        vec![Param::path("owner", "The whole repository, `owner%2Fname`, its slash encoded.")]
    }
}

fn with_repo(mut op: Op, two_segments: bool) -> Op {
    let mut params = repo_params(two_segments);
    params.append(&mut op.params);
    op.params = params;
    op
}

/// The caller as the workflow records them: the person behind the token, so that two
/// tokens of one person give one review or one approval.
fn actor(state: &AppState, who: &TokenConfig) -> Actor {
    Actor { login: state.person_of_token(&who.name), teams: who.teams.clone(), can_write: who.role >= Role::Trigger }
}

fn permission(who: &TokenConfig) -> Permission {
    match who.role {
        Role::Read => Permission::Read,
        Role::Trigger | Role::Approve => Permission::Write,
        Role::Admin => Permission::Admin,
    }
}

/// A commit named by a request.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    /// A commit, or a branch naming one.
    pub commit: String,
}

/// A merge request.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeBody {
    /// The branch (or commit) to merge.
    pub head: String,
    /// The pull request it belongs to, whose reviews on the forge then count.
    #[serde(default)]
    pub pull: Option<u64>,
}

/// `POST /api/v1/repos/{repo}/reviews`.
pub async fn review(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(params): PathParams<BTreeMap<String, String>>,
    JsonBody(body): JsonBody<CommitBody>,
) -> Result<Response, ApiError> {
    let recorded = workflow::try_approve(&state, &repo_of(&params), &body.commit, actor(&state, &who), false).await?;
    Ok(json_response(StatusCode::CREATED, &recorded))
}

/// `POST /api/v1/repos/{repo}/approvals`.
pub async fn approval(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(params): PathParams<BTreeMap<String, String>>,
    JsonBody(body): JsonBody<CommitBody>,
) -> Result<Response, ApiError> {
    let recorded = workflow::try_approve(&state, &repo_of(&params), &body.commit, actor(&state, &who), true).await?;
    Ok(json_response(StatusCode::CREATED, &recorded))
}

fn record_doc(g: &mut DocGen, two: bool, summary: &'static str) -> Op {
    let op = Op::new(summary).body(g.schema::<CommitBody>()).json(201, "Recorded.", g.schema::<Recorded>()).error(
        g,
        422,
        "The commit cannot be resolved.",
    );
    with_repo(op, two)
}

pub fn review_doc(g: &mut DocGen) -> Op {
    record_doc(g, true, "An approving review of an exact commit.")
}

pub fn review_doc_encoded(g: &mut DocGen) -> Op {
    record_doc(g, false, "An approving review of an exact commit.")
}

pub fn approval_doc(g: &mut DocGen) -> Op {
    record_doc(g, true, "Approve promoting an exact commit.")
}

pub fn approval_doc_encoded(g: &mut DocGen) -> Op {
    record_doc(g, false, "Approve promoting an exact commit.")
}

/// `POST /api/v1/repos/{repo}/merge`.
pub async fn merge(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(params): PathParams<BTreeMap<String, String>>,
    JsonBody(body): JsonBody<MergeBody>,
) -> Result<Response, ApiError> {
    let merged =
        workflow::try_merge(&state, &repo_of(&params), &body.head, body.pull, &who.name, permission(&who)).await?;
    Ok(json_response(StatusCode::OK, &merged))
}

fn merge_op(g: &mut DocGen, two: bool) -> Op {
    let op = Op::new("Fast-forward the merge target to a branch, when the policy allows.")
        .body(g.schema::<MergeBody>())
        .json(200, "Merged.", g.schema::<Merged>())
        .error(g, 409, "Refused, with every reason (`refusals`), or the branch could not be fast-forwarded.")
        .error(g, 422, "The spec or the head cannot be had.");
    with_repo(op, two)
}

pub fn merge_doc(g: &mut DocGen) -> Op {
    merge_op(g, true)
}

pub fn merge_doc_encoded(g: &mut DocGen) -> Op {
    merge_op(g, false)
}

/// `POST /api/v1/repos/{repo}/promote`.
pub async fn promote(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(params): PathParams<BTreeMap<String, String>>,
    JsonBody(body): JsonBody<CommitBody>,
) -> Result<Response, ApiError> {
    let promoted = workflow::try_promote(&state, &repo_of(&params), &body.commit, &who.name, None).await?;
    Ok(json_response(StatusCode::OK, &promoted))
}

fn promote_op(g: &mut DocGen, two: bool) -> Op {
    let op = Op::new("Promote a commit to the release branch (`promotion.to`, `production` by default), when it passed staging and has its approvals.")
        .body(g.schema::<CommitBody>())
        .json(200, "Promoted.", g.schema::<Promoted>())
        .error(g, 409, "Refused, with every reason (`refusals`), or the release branch could not be fast-forwarded.")
        .error(g, 422, "The spec, its promotion policy or the commit cannot be had.");
    with_repo(op, two)
}

pub fn promote_doc(g: &mut DocGen) -> Op {
    promote_op(g, true)
}

pub fn promote_doc_encoded(g: &mut DocGen) -> Op {
    promote_op(g, false)
}

/// Every environment on record.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Environments {
    pub environments: BTreeMap<String, Environment>,
    /// What each environment runs: the newest record of each artifact its pipeline published
    /// for the commit that is there.
    pub deliverables: BTreeMap<String, Vec<cib_core::publish::DeliverableRecord>>,
}

/// `GET /api/v1/repos/{repo}/environments`: which commit is where, since when, approved by whom.
pub async fn environments(
    State(state): State<Arc<AppState>>,
    PathParams(params): PathParams<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let repo = repo_of(&params);
    let (environments, deliverables) = state
        .engine
        .query(move |m| {
            let environments = m.environments(&repo);
            let mut deliverables = BTreeMap::new();
            for (name, env) in &environments {
                let mut here: Vec<cib_core::publish::DeliverableRecord> = Vec::new();
                for r in m.deliverables(&repo) {
                    if r.commit == env.commit && (&r.pipeline == name || env.build.as_ref() == Some(&r.build)) {
                        here.retain(|o| {
                            (&o.artifact.kind, &o.artifact.name, &o.artifact.file)
                                != (&r.artifact.kind, &r.artifact.name, &r.artifact.file)
                        });
                        here.push(r.clone());
                    }
                }
                deliverables.insert(name.clone(), here);
            }
            (environments, deliverables)
        })
        .await
        .map_err(ApiError::unavailable)?;
    Ok(json_response(StatusCode::OK, &Environments { environments, deliverables }))
}

fn environments_op(g: &mut DocGen, two: bool) -> Op {
    let op = Op::new("Which commit is where, since when, moved by whom, approved by whom, and the deliverables each environment runs.").json(
        200,
        "The environments.",
        g.schema::<Environments>(),
    );
    with_repo(op, two)
}

pub fn environments_doc(g: &mut DocGen) -> Op {
    environments_op(g, true)
}

pub fn environments_doc_encoded(g: &mut DocGen) -> Op {
    environments_op(g, false)
}

/// A repository this server builds, or a pattern of GitHub repositories it builds.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Served {
    /// `owner/name`, or a glob such as `acme/*`.
    pub repo: String,
    /// `local` (a `[[repos]]` entry) or `github`.
    pub forge: String,
    /// Whether `POST /hooks/git` takes pushes for it.
    pub git_hook: bool,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ServedList {
    pub repos: Vec<Served>,
}

/// `GET /api/v1/repos`: what this server builds; deliveries for anything else are set aside.
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut repos: Vec<Served> = state
        .config
        .repos
        .iter()
        .map(|r| Served { repo: r.name.clone(), forge: "local".into(), git_hook: r.webhook_secret.is_some() })
        .collect();
    repos.extend(state.config.github.repos.iter().map(|g| Served {
        repo: g.clone(),
        forge: "github".into(),
        git_hook: false,
    }));
    Ok(json_response(StatusCode::OK, &ServedList { repos }))
}

pub fn list_doc(g: &mut DocGen) -> Op {
    Op::new("The repositories this server builds.").json(200, "The repositories.", g.schema::<ServedList>())
}

/// One downstream result on the upstream commit, with the status name it is reported under.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct DownstreamStatus {
    /// `cib/downstream/<repo>/<pipeline>`.
    pub context: String,
    #[serde(flatten)]
    pub result: cib_core::workflow::DownstreamResult,
}

/// The downstream results on one commit of a repository.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct DownstreamStatuses {
    pub repo: String,
    /// The commit, resolved when the path named a branch or an abbreviation the repository knows.
    pub commit: String,
    pub downstream: Vec<DownstreamStatus>,
}

/// `GET /api/v1/repos/{repo}/commits/{commit}/downstream`: how the downstream repositories'
/// pipelines fared against this exact commit (the newest build of each).
pub async fn downstream(
    State(state): State<Arc<AppState>>,
    PathParams(params): PathParams<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let repo = repo_of(&params);
    let asked = params.get("commit").cloned().unwrap_or_default();
    // A name the repository resolves is read as its commit; anything else is taken as written,
    // and simply has no results.
    let commit = state.vcs.resolve(&repo, &asked).await.unwrap_or(asked);
    let (repo_q, commit_q) = (repo.clone(), commit.clone());
    let downstream = state
        .engine
        .query(move |m| {
            m.downstream_results(&repo_q)
                .iter()
                .filter(|r| r.upstream_commit == commit_q)
                .map(|r| DownstreamStatus {
                    context: crate::downstream::context(&r.repo, &r.pipeline),
                    result: r.clone(),
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(ApiError::unavailable)?;
    Ok(json_response(StatusCode::OK, &DownstreamStatuses { repo, commit, downstream }))
}

fn downstream_op(g: &mut DocGen, two: bool) -> Op {
    let mut op = Op::new(
        "The results of downstream repositories' `on: upstream` pipelines against this commit, each under its status name `cib/downstream/<repo>/<pipeline>`.",
    )
    .json(200, "The downstream results.", g.schema::<DownstreamStatuses>());
    op.params.push(Param::path("commit", "The upstream commit (or a name the repository resolves)."));
    with_repo(op, two)
}

pub fn downstream_doc(g: &mut DocGen) -> Op {
    downstream_op(g, true)
}

pub fn downstream_doc_encoded(g: &mut DocGen) -> Op {
    downstream_op(g, false)
}
