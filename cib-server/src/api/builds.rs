//! Builds: listing and reading them, starting one by hand, cancelling, retrying, and deciding
//! at gates.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::Response;
use cib_core::event::{BuildId, EventBody};
use cib_core::pipeline::{Actor, BuildContext, Input};
use cib_core::policy::check_trigger;
use cib_core::ports::{BuildFilter, BuildRecord, BuildStatus, BuildSummary, Page, StoredInput};
use cib_core::spec::{EventKind, PipelineKind, TriggerEvent};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::Caller;
use crate::error::{ApiError, json_response};
use crate::extract::{JsonBody, OptionalJson, PathParams, QueryMap};
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// The build statuses a filter may name, for the description's pattern.
const STATUSES: &str = "queued|waiting|running|cancelling|success|neutral|failed|cancelled|timed_out|errored";

fn parse_status(text: &str) -> Option<BuildStatus> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
}

/// One page of builds.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct BuildList {
    pub builds: Vec<BuildSummary>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

/// A page cursor as text: `<queued_at>:<id>`, opaque to clients.
fn cursor_text(b: &BuildSummary) -> String {
    format!("{}:{}", b.queued_at.millis(), b.id.0)
}

fn parse_cursor(text: &str) -> Option<cib_core::ports::BuildCursor> {
    let (at, id) = text.split_once(':')?;
    if at.is_empty() || at.len() > 19 || !at.bytes().all(|b| b.is_ascii_digit()) || id.is_empty() {
        return None;
    }
    Some(cib_core::ports::BuildCursor {
        queued_at: cib_core::time::Timestamp(at.parse().ok()?),
        id: BuildId(id.to_owned()),
    })
}

/// `GET /api/v1/builds`.
pub async fn list(State(state): State<Arc<AppState>>, q: QueryMap) -> Result<Response, ApiError> {
    let mut filter =
        BuildFilter { repo: q.get("repo").cloned(), branch: q.get("branch").cloned(), ..BuildFilter::default() };
    if let Some(statuses) = q.get("status") {
        for s in statuses.split(',').filter(|s| !s.is_empty()) {
            match parse_status(s) {
                Some(status) => filter.statuses.push(status),
                None => return Err(ApiError::BadRequest(format!("unknown status '{s}'"))),
            }
        }
    }
    let millis =
        |key| q.whole::<u64>(key, "milliseconds since the epoch", 19).map(|t| t.map(cib_core::time::Timestamp));
    filter.queued_from = millis("since")?;
    filter.queued_until = millis("until")?;
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=500).contains(&n) && l.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(ApiError::BadRequest("'limit' is a number from 1 to 500".into())),
        },
    };
    let page = match q.get("after") {
        None => Page::first(limit),
        Some(text) => match parse_cursor(text) {
            Some(after) => Page { limit, after: Some(after) },
            None => return Err(ApiError::BadRequest("'after' is the 'next' cursor of a previous page".into())),
        },
    };
    let builds = state.store.builds(&filter, page).await.map_err(ApiError::unavailable)?;
    let next = (builds.len() == limit).then(|| builds.last().map(cursor_text)).flatten();
    Ok(json_response(StatusCode::OK, &BuildList { builds, next }))
}

pub fn list_doc(g: &mut DocGen) -> Op {
    let digits = json!({ "type": "string", "pattern": "^0*[0-9]{1,19}$" });
    Op::new("List builds, newest first.")
        .param(Param::query("repo", "Only this repository (`owner/name`).", json!({ "type": "string" })))
        .param(Param::query("branch", "Only this branch.", json!({ "type": "string" })))
        .param(Param::query(
            "status",
            "Only these statuses, comma-separated.",
            json!({ "type": "string", "pattern": format!("^({STATUSES})?(,({STATUSES})?)*$") }),
        ))
        .param(Param::query("since", "Queued at or after, in milliseconds since the epoch.", digits.clone()))
        .param(Param::query("until", "Queued before, in milliseconds since the epoch.", digits))
        .param(Param::query(
            "limit",
            "At most this many builds (default 50).",
            json!({ "type": "string", "pattern": "^0*([1-9][0-9]?|[1-4][0-9][0-9]|500)$" }),
        ))
        .param(Param::query(
            "after",
            "The `next` cursor of the previous page.",
            json!({ "type": "string", "pattern": "^[0-9]{1,19}:[\\s\\S]+$" }),
        ))
        .json(200, "A page of builds.", g.schema::<BuildList>())
        .error(g, 400, "A filter is malformed.")
}

/// One build with every step attempt, and what its pipeline declares beyond its steps.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct BuildDetail {
    #[serde(flatten)]
    pub record: BuildRecord,
    /// The pipeline's gates, in step order, with who has approved each so far.
    pub gates: Vec<GateInfo>,
    /// What the pipeline publishes once every step has passed.
    pub deliverables: Vec<DeliverableInfo>,
}

/// A gate of a build's pipeline.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct GateInfo {
    pub step: String,
    /// `approval` or `hold`.
    pub kind: String,
    /// Distinct approvals needed (approval gates).
    pub approvals: u32,
    /// Who has approved so far, while the build runs; once it has finished, the gate step's
    /// record says who decided.
    pub approved_by: Vec<String>,
    /// Who may answer; both empty means anyone with write access.
    pub users: Vec<String>,
    pub teams: Vec<String>,
    pub instructions: Option<String>,
}

/// A deliverable of a build's pipeline.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct DeliverableInfo {
    /// `pypi` or `docker`.
    pub kind: String,
    /// The package index, or the image.
    pub target: String,
    /// The files published (`pypi`).
    pub files: Option<String>,
    /// The tags pushed (`docker`), as written in the spec.
    pub tags: Vec<String>,
}

/// The gates and deliverables of a build's pipeline. A live build's come from the engine, with
/// who has approved each gate so far; the engine forgets a finished build, so its pipeline is
/// planned again from the enqueue the store keeps (its gates' approvers are then in the step
/// records' details).
pub(crate) async fn declared(
    state: &AppState,
    id: &BuildId,
) -> Result<(Vec<GateInfo>, Vec<DeliverableInfo>), ApiError> {
    let live = {
        let id = id.clone();
        state
            .engine
            .query(move |m| {
                m.build(&id).map(|build| {
                    let approvals = |step: &str| {
                        build.steps.iter().find(|s| s.name == step).map(|s| s.approvals.clone()).unwrap_or_default()
                    };
                    describe(&build.pipeline, approvals)
                })
            })
            .await
            .map_err(ApiError::unavailable)?
    };
    if let Some(found) = live {
        return Ok(found);
    }
    let enqueued = state.store.enqueued(id).await.map_err(ApiError::unavailable)?;
    let pipeline = match enqueued {
        Some(StoredInput { input: Input::Enqueue { spec, pipeline, .. }, .. }) => {
            cib_core::spec::parse(&spec).ok().and_then(|s| s.pipeline(&pipeline).cloned())
        }
        _ => None,
    };
    Ok(pipeline.map(|p| describe(&p, |_| Vec::new())).unwrap_or_default())
}

fn describe(
    pipeline: &cib_core::spec::Pipeline,
    approvals: impl Fn(&str) -> Vec<String>,
) -> (Vec<GateInfo>, Vec<DeliverableInfo>) {
    let gates = pipeline
        .steps
        .iter()
        .filter_map(|step| match &step.action {
            cib_core::spec::Action::Gate(gate) => Some(GateInfo {
                step: step.name.clone(),
                kind: serde_json::to_value(gate.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                approvals: gate.approvals,
                approved_by: approvals(&step.name),
                users: gate.from.users.clone(),
                teams: gate.from.teams.clone(),
                instructions: gate.instructions.clone(),
            }),
            cib_core::spec::Action::Run { .. } => None,
        })
        .collect();
    let deliverables = pipeline
        .deliverables
        .iter()
        .map(|d| match d {
            cib_core::spec::Deliverable::Pypi { index, files, .. } => DeliverableInfo {
                kind: "pypi".into(),
                target: index.clone(),
                files: Some(files.as_str().to_owned()),
                tags: Vec::new(),
            },
            cib_core::spec::Deliverable::Docker { image, tags, .. } => {
                DeliverableInfo { kind: "docker".into(), target: image.clone(), files: None, tags: tags.clone() }
            }
        })
        .collect();
    (gates, deliverables)
}

/// `GET /api/v1/builds/{build}`.
pub async fn get(State(state): State<Arc<AppState>>, PathParams(id): PathParams<String>) -> Result<Response, ApiError> {
    let id = BuildId(id);
    match state.store.build(&id).await.map_err(ApiError::unavailable)? {
        Some(record) => {
            let (gates, deliverables) = declared(&state, &id).await?;
            Ok(json_response(StatusCode::OK, &BuildDetail { record, gates, deliverables }))
        }
        None => Err(ApiError::NotFound(format!("no build '{}'", id.0))),
    }
}

/// What a build publishes: its pipeline's deliverables as declared, and what it published.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct BuildDeliverables {
    pub build: BuildId,
    /// The deliverables its pipeline declares.
    pub declared: Vec<DeliverableInfo>,
    /// What it published: kind, name, version or tags, digest, where, when, and which build
    /// first produced the bytes (another one when they were promoted).
    pub published: Vec<cib_core::publish::DeliverableRecord>,
}

/// `GET /api/v1/builds/{build}/deliverables`.
pub async fn deliverables(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    let id = BuildId(id);
    let Some(record) = state.store.build(&id).await.map_err(ApiError::unavailable)? else {
        return Err(ApiError::NotFound(format!("no build '{}'", id.0)));
    };
    let (_, declared) = declared(&state, &id).await?;
    let (key, repo) = (id.clone(), record.build.repo.clone());
    // A live build holds its records; a finished one's are among the repository's that the
    // machine keeps (the newest `KEPT_DELIVERABLES`).
    let published = state
        .engine
        .query(move |m| match m.build(&key) {
            Some(b) => b.publish.records.clone(),
            None => m.deliverables(&repo).iter().filter(|r| r.build == key).cloned().collect(),
        })
        .await
        .map_err(ApiError::unavailable)?;
    Ok(json_response(StatusCode::OK, &BuildDeliverables { build: id, declared, published }))
}

pub fn deliverables_doc(g: &mut DocGen) -> Op {
    Op::new(
        "What a build publishes: its pipeline's declared deliverables, and each artifact it published \
         (kind, name, version or tags, sha256 or manifest digest, where, when, and the build that first produced it).",
    )
    .param(Param::path("build", "The build's id."))
    .json(200, "The build's deliverables.", g.schema::<BuildDeliverables>())
    .error(g, 404, "No such build.")
}

pub fn get_doc(g: &mut DocGen) -> Op {
    Op::new("One build with every step attempt, and its pipeline's gates and deliverables.")
        .param(Param::path("build", "The build's id."))
        .json(200, "The build.", g.schema::<BuildDetail>())
        .error(g, 404, "No such build.")
}

/// A request to start a build by hand.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// The repository, `owner/name`.
    pub repo: String,
    /// A branch or tag name, or a commit.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The pipeline to run.
    pub pipeline: String,
    #[serde(default)]
    pub event: Option<EventKind>,
    /// Values for the pipeline's steps.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

/// A build that was created.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Created {
    pub build: BuildId,
}

/// `POST /api/v1/builds`.
pub async fn trigger(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    JsonBody(request): JsonBody<TriggerRequest>,
) -> Result<Response, ApiError> {
    let commit = state
        .vcs
        .resolve(&request.repo, &request.reference)
        .await
        .map_err(|e| ApiError::Unprocessable(format!("cannot resolve {}: {e}", request.reference)))?;
    let source = match state.vcs.read_spec(&request.repo, &commit).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(ApiError::Unprocessable(format!("{} has no spec at {commit}", request.repo))),
        Err(e) => return Err(ApiError::Unprocessable(format!("cannot read the spec: {e}"))),
    };
    let parsed = super::parse_spec(&source, state.config.operator_limits()).await?;
    let Some(pipeline) = parsed.pipeline(&request.pipeline) else {
        return Err(ApiError::Unprocessable(format!("the spec has no pipeline '{}'", request.pipeline)));
    };
    // A ref that is the commit, in full or abbreviated, names no branch: it must not pass for
    // one in trigger filters and secret scopes, nor skip the check that a branch holds it.
    let reference = request.reference.to_ascii_lowercase();
    let names_commit =
        reference.len() >= 7 && reference.bytes().all(|b| b.is_ascii_hexdigit()) && commit.starts_with(&reference);
    let branch = (!names_commit).then(|| request.reference.clone());
    let kind = request.event.unwrap_or(EventKind::Manual);
    // Only `on: manual` pipelines, a manual event, and declared inputs; the inputs reach the
    // steps as `INPUT_<NAME>` and never replace the spec's own variables.
    let inputs = check_trigger(pipeline, kind, branch.as_deref(), &request.variables).map_err(|refusals| {
        let reasons: Vec<String> = refusals.iter().map(ToString::to_string).collect();
        ApiError::Unprocessable(format!("cib cannot start '{}' by hand: {}", request.pipeline, reasons.join("; ")))
    })?;
    check_own_commit(&state, &request.repo, branch.as_deref(), &commit).await?;
    if pipeline.kind == PipelineKind::Deploy {
        // A deploy started by hand answers to the promotion rules like a promotion does.
        if let Some(policy) = crate::workflow::promotion_policy(&state, &request.repo).await? {
            crate::workflow::check_promotable(&state, &request.repo, &policy, &commit).await?;
        }
    }
    let event = TriggerEvent { kind, branch: branch.clone(), tag: None, changed_paths: None };
    crate::workflow::record_commit_author(&state, &request.repo, &commit).await;
    let n = state.counter().fetch_add(1, Ordering::Relaxed) + 1;
    let id = BuildId(format!("api-{}-{n}", state.clock.now().millis()));
    let input = Input::Enqueue {
        build: id.clone(),
        spec: Arc::from(source.as_str()),
        pipeline: request.pipeline.clone(),
        context: BuildContext {
            repo: request.repo,
            commit,
            branch,
            pull_request: None,
            event,
            actor: Some(state.person_of_token(&who.name)),
            trusted: true,
            upstream: None,
        },
        only: None,
        variables: inputs,
    };
    state.engine.submit(input).await.map_err(|e| ApiError::Unavailable(format!("the engine refused: {e}")))?;
    Ok(json_response(StatusCode::CREATED, &Created { build: id }))
}

/// Refuses a commit that no branch of the repository holds, such as a fork's head: it would
/// run a stranger's code as trusted.
async fn check_own_commit(state: &AppState, repo: &str, branch: Option<&str>, commit: &str) -> Result<(), ApiError> {
    match state.vcs.on_branch(repo, commit).await {
        Ok(Some(true)) => Ok(()),
        Ok(Some(false)) => Err(ApiError::Unprocessable(format!(
            "{commit} is on no branch of {repo} (a fork's head, say): only the repository's own commits can be started by hand"
        ))),
        // The backend cannot tell: a branch's name is its own commit by definition; a bare
        // commit or another ref (a pull request's) is refused.
        Ok(None) if branch.is_some_and(|b| !b.starts_with("refs/")) => Ok(()),
        Ok(None) => Err(ApiError::Unprocessable(format!(
            "cib cannot tell whether {commit} is on a branch of {repo}: start it by the branch's name"
        ))),
        Err(e) => Err(ApiError::Unprocessable(format!("cannot tell whether {commit} is on a branch of {repo}: {e}"))),
    }
}

pub fn trigger_doc(g: &mut DocGen) -> Op {
    Op::new("Start a build of a pipeline by hand.")
        .describe(
            "Only pipelines with an `on: manual` trigger, with the `manual` event, on a commit of one of the \
             repository's own branches. `variables` must be inputs the pipeline declares (`inputs:`); they \
             reach the steps as `INPUT_<NAME>`. A deploy pipeline is refused on a commit the promotion rules \
             would refuse.",
        )
        .body(g.schema::<TriggerRequest>())
        .json(201, "The build was queued.", g.schema::<Created>())
        .error(g, 409, "A deploy pipeline on a commit the promotion rules refuse, with every reason.")
        .error(
            g,
            422,
            "The ref, the spec or the pipeline cannot be had, the spec asks more than the server's `[limits]` allow \
             (each value over a maximum is a diagnostic naming its key and the limit), the pipeline is not manual, \
             an input is undeclared or ill-typed (the answer lists the allowed ones), or the commit is on no branch \
             of the repository.",
        )
}

/// A build being cancelled.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Cancelling {
    pub build: String,
    pub cancelling: bool,
}

/// `POST /api/v1/builds/{build}/cancel`.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    let known = state.engine.query({
        let id = BuildId(id.clone());
        move |m| m.build(&id).map(|b| b.finished_at.is_some())
    });
    match known.await.map_err(ApiError::unavailable)? {
        Some(false) => {}
        Some(true) => return Err(ApiError::Conflict(format!("build '{id}' has already finished"))),
        // The engine forgets finished builds; the store still knows them.
        None => {
            let stored = state.store.build(&BuildId(id.clone())).await.map_err(ApiError::unavailable)?;
            return Err(match stored {
                Some(_) => ApiError::Conflict(format!("build '{id}' has already finished")),
                None => ApiError::NotFound(format!("no running build '{id}'")),
            });
        }
    }
    let who = who.name;
    let input = Input::Cancel { build: BuildId(id.clone()), by: who.clone(), reason: format!("cancelled by {who}") };
    state.engine.submit(input).await.map_err(ApiError::unavailable)?;
    Ok(json_response(StatusCode::ACCEPTED, &Cancelling { build: id, cancelling: true }))
}

pub fn cancel_doc(g: &mut DocGen) -> Op {
    Op::new("Cancel a running build: its steps are stopped and its leases released.")
        .param(Param::path("build", "The build's id."))
        .json(202, "The build is being cancelled.", g.schema::<Cancelling>())
        .error(g, 404, "No such running build.")
        .error(g, 409, "The build has already finished.")
}

/// A retry that was queued.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Retried {
    pub build: BuildId,
    pub retry_of: String,
}

/// `POST /api/v1/builds/{build}/retry`.
pub async fn retry(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    // The time keeps retry ids apart across restarts, which start the counter again.
    let n = state.counter().fetch_add(1, Ordering::Relaxed) + 1;
    let new = BuildId(format!("{id}-retry-{}-{n}", state.clock.now().millis()));
    let actor = state.person_of_token(&who.name);
    match crate::workflow::retry_build(&state, &BuildId(id.clone()), new, actor).await? {
        Some((new, _)) => Ok(json_response(StatusCode::CREATED, &Retried { build: new, retry_of: id })),
        None => Err(ApiError::NotFound(format!("no build '{id}' to retry"))),
    }
}

pub fn retry_doc(g: &mut DocGen) -> Op {
    Op::new("Run a build's pipeline again at the same commit, as a new build.")
        .describe(
            "The retry runs the spec text stored with the original build, never the spec read again at the commit.",
        )
        .param(Param::path("build", "The build's id."))
        .json(201, "The new build was queued.", g.schema::<Retried>())
        .error(g, 404, "No such build.")
}

/// A person's word at a gate.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    #[serde(default)]
    pub comment: Option<String>,
}

/// An approval that was counted.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Approved {
    pub approved: bool,
    pub count: u32,
    pub needed: u32,
}

/// A rejection that failed the gate.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Rejected {
    pub rejected: bool,
}

async fn decide(
    state: &AppState,
    who: crate::config::TokenConfig,
    id: String,
    step: String,
    approve: bool,
    decision: Decision,
) -> Result<Response, ApiError> {
    let person = state.person_of_token(&who.name);
    let teams = match state.people.find(&cib_core::policy::Identity::Token(who.name.clone())) {
        Some(p) => p.teams.iter().chain(&who.teams).cloned().collect(),
        None => who.teams.clone(),
    };
    let actor = Actor { login: who.name.clone(), teams, can_write: true };
    let mut events = state.engine.subscribe();
    // Recorded against the person, so that their other tokens cannot approve a second time,
    // and so that the person who started the build cannot approve it with another token.
    let input = Input::DecideAs {
        build: BuildId(id.clone()),
        step: step.clone(),
        actor: actor.clone(),
        person,
        approve,
        comment: decision.comment,
    };
    state.engine.submit(input).await.map_err(ApiError::unavailable)?;
    // The decision's outcome is the event it caused, already sent by the time submit returns.
    while let Ok(event) = events.try_recv() {
        match event.body {
            EventBody::DecisionRefused { by, reason, .. } if by == actor.login => {
                return Err(ApiError::Conflict(reason));
            }
            EventBody::Approved { by, count, needed, .. } if by == actor.login => {
                return Ok(json_response(StatusCode::OK, &Approved { approved: true, count, needed }));
            }
            EventBody::Rejected { by, .. } if by == actor.login => {
                return Ok(json_response(StatusCode::OK, &Rejected { rejected: true }));
            }
            _ => {}
        }
    }
    Err(ApiError::NotFound(format!("no gate '{step}' waiting in build '{id}'")))
}

/// `POST /api/v1/builds/{build}/gates/{step}/approve`.
pub async fn approve(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams((id, step)): PathParams<(String, String)>,
    OptionalJson(decision): OptionalJson<Decision>,
) -> Result<Response, ApiError> {
    decide(&state, who, id, step, true, decision).await
}

/// `POST /api/v1/builds/{build}/gates/{step}/reject`.
pub async fn reject(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams((id, step)): PathParams<(String, String)>,
    OptionalJson(decision): OptionalJson<Decision>,
) -> Result<Response, ApiError> {
    decide(&state, who, id, step, false, decision).await
}

fn gate_doc(g: &mut DocGen, summary: &'static str) -> Op {
    Op::new(summary)
        .param(Param::path("build", "The build's id."))
        .param(Param::path("step", "The gate step's name."))
        .optional_body(g.schema::<Decision>())
        .error(g, 404, "No such gate waiting in that build.")
        .error(g, 409, "The decision was refused: not an allowed approver, approved twice, not waiting.")
}

pub fn approve_doc(g: &mut DocGen) -> Op {
    let schema = g.schema::<Approved>();
    gate_doc(g, "Approve a gate.").json(200, "The approval was counted.", schema)
}

pub fn reject_doc(g: &mut DocGen) -> Op {
    let schema = g.schema::<Rejected>();
    gate_doc(g, "Reject a gate: it fails.").json(200, "The gate failed.", schema)
}
