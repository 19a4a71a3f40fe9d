//! `cib serve`: the webhook receiver, the REST API and the event and log streams, on hyper.
//!
//! The router is a plain function from a request to a response, so tests call it without a
//! socket; `serve` puts it behind a listener with graceful shutdown. Every handler answers:
//! bad input gets a 4xx with a reason, never a 500, and nothing stored is touched by a request
//! that fails.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cib_core::engine::{Engine, EngineConfig, EngineHandle, Ports, SystemClock};
use cib_core::event::BuildId;
use cib_core::pipeline::{Actor, BuildContext, Config, Input};
use cib_core::ports::{BuildFilter, BuildStatus, Clock, Delivery, LogKey, Notifier, Page, Secrets, Store, Vcs};
use cib_core::spec::{self, EventKind, TriggerEvent};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::Notify;

use crate::config::{Role, ServerConfig, TokenConfig};
use crate::http::{Body, BodyError, error, json, query, read_body, segments, text};
use crate::{inbox, outgoing, pools, sse, workflow};

/// Everything a request handler may touch.
pub struct AppState {
    pub config: ServerConfig,
    pub engine: EngineHandle,
    pub store: Arc<dyn Store>,
    pub vcs: Arc<dyn Vcs>,
    pub clock: Arc<dyn Clock>,
    /// Wakes the inbox processor when a delivery is stored.
    pub inbox: Arc<Notify>,
    counter: AtomicU64,
}

impl AppState {
    /// Whether cib starts a branch's pipelines itself when it moves the branch: yes for local
    /// repositories, no for a forge that sends its own push webhook (a second build would
    /// deploy twice).
    pub fn builds_on_move(&self, repo: &str) -> bool {
        self.config.github.api_url.is_none() || self.config.repos.iter().any(|r| r.name == repo)
    }

    /// A counter for ids made by this process (API builds, people's leases).
    pub fn counter(&self) -> &AtomicU64 {
        &self.counter
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("listen", &self.config.listen).finish_non_exhaustive()
    }
}

struct ConfigSecrets(BTreeMap<String, String>);

impl Secrets for ConfigSecrets {
    fn get(&self, _repo: &str, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// The running parts of a server: its state and the engine's task.
#[derive(Debug)]
pub struct Running {
    pub state: Arc<AppState>,
    pub engine_task: tokio::task::JoinHandle<Result<(), cib_core::engine::EngineError>>,
    pub inbox_task: tokio::task::JoinHandle<()>,
}

/// Starts the engine and the inbox processor with these backends.
pub fn start(
    config: ServerConfig,
    executor: Arc<dyn cib_core::ports::Executor>,
    store: Arc<dyn Store>,
    vcs: Arc<dyn Vcs>,
) -> Running {
    start_with(config, executor, store, vcs, Vec::new())
}

/// [`start`], with more notifiers (the forge's, say) besides the configured webhooks.
pub fn start_with(
    config: ServerConfig,
    executor: Arc<dyn cib_core::ports::Executor>,
    store: Arc<dyn Store>,
    vcs: Arc<dyn Vcs>,
    mut notifiers: Vec<Arc<dyn Notifier>>,
) -> Running {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    for hook in &config.webhooks {
        notifiers.push(Arc::new(outgoing::WebhookNotifier::new(hook.url.clone(), hook.secret.clone())));
    }
    let ports = Ports {
        executor,
        vcs: vcs.clone(),
        store: store.clone(),
        notifiers,
        clock: clock.clone(),
        secrets: Arc::new(ConfigSecrets(config.secrets.clone())),
    };
    let engine_config = EngineConfig {
        machine: Config {
            max_running_steps: config.max_running_steps,
            pools: config.lease_pools(),
            ..Config::default()
        },
        workspace_root: config.data_dir.join("workspaces"),
        tick_every: Duration::from_secs(15),
    };
    let (engine, future) = Engine::start(ports, engine_config);
    let engine_task = tokio::spawn(future);
    let state = Arc::new(AppState {
        config,
        engine,
        store,
        vcs,
        clock,
        inbox: Arc::new(Notify::new()),
        counter: AtomicU64::new(0),
    });
    let inbox_task = tokio::spawn(process_inbox(state.clone()));
    Running { state, engine_task, inbox_task }
}

/// Works through stored deliveries: all pending ones at start (a crash may have left some),
/// then each new one as the receiver stores it.
async fn process_inbox(state: Arc<AppState>) {
    loop {
        let notified = state.inbox.notified();
        match state.store.pending_deliveries(100).await {
            Ok(pending) if !pending.is_empty() => {
                for delivery in pending {
                    let outcome = match inbox::parse_github(&delivery) {
                        Ok(event) => inbox::process(&state, &delivery.id, event).await,
                        Err(reason) => Ok(inbox::Processed::Nothing(format!("unreadable: {reason}"))),
                    };
                    match outcome {
                        Ok(result) => {
                            tracing::info!(delivery = %delivery.id, ?result, "delivery processed");
                            if let Err(e) = state.store.mark_delivery_done(&delivery.id).await {
                                tracing::warn!(error = %e, "cannot mark a delivery done");
                            }
                        }
                        Err(reason) => {
                            // Left pending: a transient failure (the repository was busy) gets
                            // another try at the next wake-up.
                            tracing::warn!(delivery = %delivery.id, %reason, "delivery not processed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the inbox"),
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets requests in flight finish
/// (server-sent streams are ended), and returns.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stopping = Arc::new(Notify::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let state = state.clone();
                let stopping = stopping.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    let stopping = stopping.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req, stopping).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    stopping.notify_waiters();
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(20), graceful.shutdown()).await;
    Ok(())
}

/// Who is asking, from the `Authorization: Bearer` header.
fn authenticate<'a, B>(state: &'a AppState, req: &Request<B>) -> Option<&'a TokenConfig> {
    let header = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let given = header.strip_prefix("Bearer ")?.trim();
    // Compare every token in constant time, so timing does not reveal a prefix.
    state.config.tokens.iter().find(|t| constant_time_eq(t.token.as_bytes(), given.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token when it holds at least `role`; otherwise the answer to give.
fn require<'a, B>(state: &'a AppState, req: &Request<B>, role: Role) -> Result<&'a TokenConfig, Response<Body>> {
    match authenticate(state, req) {
        None => {
            let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            Err(r)
        }
        Some(t) if t.role < role => {
            Err(error(StatusCode::FORBIDDEN, format!("'{}' may not do this: it needs the {role:?} role", t.name)))
        }
        Some(t) => Ok(t),
    }
}

/// Answers one request.
pub async fn handle<B>(state: &Arc<AppState>, req: Request<B>, stopping: Arc<Notify>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let path = segments(req.uri().path());
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let method = req.method().clone();
    match (method, path.as_slice()) {
        (Method::GET, ["healthz"]) => json(StatusCode::OK, &serde_json::json!({ "status": "ok" })),
        (Method::POST, ["hooks", "github"]) => github_hook(state, req).await,
        (Method::GET, ["api", "v1", "openapi.json"]) => {
            text(StatusCode::OK, "application/json", crate::openapi::DOCUMENT)
        }
        (Method::GET, ["api", "v1", "builds"]) => match require(state, &req, Role::Read) {
            Ok(_) => list_builds(state, &req).await,
            Err(r) => r,
        },
        (Method::POST, ["api", "v1", "builds"]) => match require(state, &req, Role::Trigger) {
            Ok(token) => {
                let who = token.name.clone();
                trigger(state, req, &who).await
            }
            Err(r) => r,
        },
        (Method::GET, ["api", "v1", "builds", id]) => match require(state, &req, Role::Read) {
            Ok(_) => get_build(state, id).await,
            Err(r) => r,
        },
        (Method::POST, ["api", "v1", "builds", id, "cancel"]) => match require(state, &req, Role::Trigger) {
            Ok(token) => cancel(state, id, &token.name.clone()).await,
            Err(r) => r,
        },
        (Method::POST, ["api", "v1", "builds", id, "retry"]) => match require(state, &req, Role::Trigger) {
            Ok(token) => {
                let who = token.name.clone();
                retry(state, id, &who).await
            }
            Err(r) => r,
        },
        (Method::POST, ["api", "v1", "builds", id, "gates", step, decision @ ("approve" | "reject")]) => {
            match require(state, &req, Role::Approve) {
                Ok(token) => {
                    let actor = Actor { login: token.name.clone(), teams: token.teams.clone(), can_write: true };
                    let approve = *decision == "approve";
                    let (id, step) = (id.to_string(), step.to_string());
                    decide(state, req, &id, &step, actor, approve).await
                }
                Err(r) => r,
            }
        }
        (Method::GET, ["api", "v1", "builds", id, "steps", step, "log"]) => match require(state, &req, Role::Read) {
            Ok(_) => read_log(state, &req, id, step).await,
            Err(r) => r,
        },
        (Method::GET, ["api", "v1", "builds", id, "steps", step, "log", "stream"]) => {
            match require(state, &req, Role::Read) {
                Ok(_) => match log_key(state, &req, id, step).await {
                    Ok(key) => sse::log_stream(state.clone(), key, &req, stopping),
                    Err(r) => r,
                },
                Err(r) => r,
            }
        }
        (Method::GET, ["api", "v1", "pools"]) => match require(state, &req, Role::Read) {
            Ok(_) => pools::list(state).await,
            Err(r) => r,
        },
        (Method::POST, ["api", "v1", "leases"]) => match require(state, &req, Role::Trigger) {
            Ok(token) => {
                let who = token.clone();
                pools::take(state, req, &who).await
            }
            Err(r) => r,
        },
        (Method::GET, ["api", "v1", "leases", id]) => match require(state, &req, Role::Read) {
            Ok(_) => pools::get(state, id).await,
            Err(r) => r,
        },
        (Method::POST, ["api", "v1", "leases", id, "extend"]) => match require(state, &req, Role::Trigger) {
            Ok(token) => {
                let (who, id) = (token.clone(), id.to_string());
                pools::extend(state, req, &id, &who).await
            }
            Err(r) => r,
        },
        (Method::POST, ["api", "v1", "leases", id, "return"]) => match require(state, &req, Role::Trigger) {
            Ok(token) => pools::give_back(state, id, &token.clone()).await,
            Err(r) => r,
        },
        (Method::POST, ["api", "v1", "leases", id, "revoke"]) => match require(state, &req, Role::Admin) {
            Ok(_) => pools::revoke(state, id).await,
            Err(r) => r,
        },
        (method, ["api", "v1", "repos", rest @ ..]) if rest.len() >= 2 => {
            // `owner/name` arrives as two segments, or as one when its slash is encoded.
            let (repo, action) = match rest {
                [owner, name, action] => (format!("{owner}/{name}"), *action),
                [repo, action] => ((*repo).to_owned(), *action),
                _ => return error(StatusCode::NOT_FOUND, "no such resource"),
            };
            let need = match (&method, action) {
                (&Method::GET, "environments") => Role::Read,
                (&Method::POST, "reviews" | "approvals") => Role::Approve,
                (&Method::POST, "merge" | "promote") => Role::Trigger,
                _ => return error(StatusCode::NOT_FOUND, "no such resource"),
            };
            let who = match require(state, &req, need) {
                Ok(t) => t.clone(),
                Err(r) => return r,
            };
            match action {
                "environments" => workflow::environments(state, &repo).await,
                "reviews" => workflow::approve(state, req, &repo, &who, false).await,
                "approvals" => workflow::approve(state, req, &repo, &who, true).await,
                "merge" => workflow::merge(state, req, &repo, &who).await,
                _ => workflow::promote(state, req, &repo, &who).await,
            }
        }
        (Method::GET, ["api", "v1", "events"]) => match require(state, &req, Role::Read) {
            Ok(_) => sse::event_stream(state.clone(), &req, stopping),
            Err(r) => r,
        },
        (_, path) if known_path(path) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
        _ => error(StatusCode::NOT_FOUND, "no such resource"),
    }
}

/// Paths that exist with some method, so that a wrong method gets 405 rather than 404.
fn known_path(path: &[&str]) -> bool {
    matches!(
        path,
        ["healthz"]
            | ["hooks", "github"]
            | ["api", "v1", "openapi.json" | "builds" | "events" | "pools" | "leases"]
            | ["api", "v1", "leases", _]
            | ["api", "v1", "leases", _, "extend" | "return" | "revoke"]
            | ["api", "v1", "builds", _]
            | ["api", "v1", "builds", _, "cancel" | "retry"]
            | ["api", "v1", "builds", _, "gates", _, "approve" | "reject"]
            | ["api", "v1", "builds", _, "steps", _, "log"]
            | ["api", "v1", "builds", _, "steps", _, "log", "stream"]
    )
}

async fn github_hook<B>(state: &Arc<AppState>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let Some(secret) = state.config.github.webhook_secret.clone() else {
        return error(StatusCode::NOT_FOUND, "GitHub webhooks are not configured on this server");
    };
    let headers = req.headers().clone();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = match read_body(req.into_body(), state.config.max_body_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return error(StatusCode::PAYLOAD_TOO_LARGE, "the body is larger than 25 MB"),
        Err(BodyError::Broken(e)) => return error(StatusCode::BAD_REQUEST, format!("the body could not be read: {e}")),
    };
    // The signature covers the raw bytes; nothing is parsed before it is checked.
    if let Err(e) = cib_github::webhook::verify(secret.as_bytes(), &body, header("x-hub-signature-256").as_deref()) {
        return error(StatusCode::UNAUTHORIZED, format!("signature check failed: {e}"));
    }
    let Some(event) = header("x-github-event") else {
        return error(StatusCode::BAD_REQUEST, "the X-GitHub-Event header is missing");
    };
    let Some(id) = header("x-github-delivery") else {
        return error(StatusCode::BAD_REQUEST, "the X-GitHub-Delivery header is missing");
    };
    if event == "ping" {
        return json(StatusCode::OK, &serde_json::json!({ "pong": true }));
    }
    // Malformed payloads are refused now, with the reason, rather than stored and dropped later.
    if let Err(e) = cib_github::webhook::parse(&event, &body) {
        return error(StatusCode::BAD_REQUEST, format!("the {event} payload is malformed: {e}"));
    }
    let delivery = Delivery {
        id: id.clone(),
        source: "github".into(),
        event,
        received_at: state.clock.now(),
        body: body.to_vec(),
    };
    match state.store.insert_delivery(&delivery).await {
        Ok(new) => {
            if new {
                state.inbox.notify_one();
            }
            json(StatusCode::ACCEPTED, &serde_json::json!({ "delivery": id, "duplicate": !new }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the delivery could not be stored: {e}")),
    }
}

fn parse_status(text: &str) -> Option<BuildStatus> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
}

async fn list_builds<B>(state: &AppState, req: &Request<B>) -> Response<Body> {
    let q = query(req.uri());
    let mut filter =
        BuildFilter { repo: q.get("repo").cloned(), branch: q.get("branch").cloned(), ..BuildFilter::default() };
    if let Some(statuses) = q.get("status") {
        for s in statuses.split(',').filter(|s| !s.is_empty()) {
            match parse_status(s) {
                Some(status) => filter.statuses.push(status),
                None => return error(StatusCode::BAD_REQUEST, format!("unknown status '{s}'")),
            }
        }
    }
    for (key, slot) in [("since", &mut filter.queued_from), ("until", &mut filter.queued_until)] {
        if let Some(v) = q.get(key) {
            match v.parse::<u64>() {
                Ok(ms) => *slot = Some(cib_core::time::Timestamp(ms)),
                Err(_) => return error(StatusCode::BAD_REQUEST, format!("'{key}' is milliseconds since the epoch")),
            }
        }
    }
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 50,
        Some(Ok(n)) if (1..=500).contains(&n) => n,
        Some(_) => return error(StatusCode::BAD_REQUEST, "'limit' is a number from 1 to 500"),
    };
    let page = match q.get("after") {
        None => Page::first(limit),
        Some(cursor) => match serde_json::from_str(cursor) {
            Ok(after) => Page { limit, after: Some(after) },
            Err(_) => return error(StatusCode::BAD_REQUEST, "'after' is the 'next' cursor of a previous page"),
        },
    };
    match state.store.builds(&filter, page).await {
        Ok(builds) => {
            let next = (builds.len() == limit)
                .then(|| builds.last().map(|b| serde_json::to_string(&b.cursor()).unwrap_or_default()))
                .flatten();
            json(StatusCode::OK, &serde_json::json!({ "builds": builds, "next": next }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the store failed: {e}")),
    }
}

async fn get_build(state: &AppState, id: &str) -> Response<Body> {
    match state.store.build(&BuildId(id.to_owned())).await {
        Ok(Some(record)) => json(StatusCode::OK, &record),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no build '{id}'")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the store failed: {e}")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerRequest {
    repo: String,
    /// A branch or tag name, or a commit.
    #[serde(rename = "ref")]
    reference: String,
    pipeline: String,
    #[serde(default)]
    event: Option<EventKind>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
}

/// Reads a JSON body of at most the configured size, or the answer to give.
pub async fn read_json_body<T: serde::de::DeserializeOwned, B>(
    state: &AppState,
    req: Request<B>,
) -> Result<T, Response<Body>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let body = match read_body(req.into_body(), state.config.max_body_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large")),
        Err(BodyError::Broken(e)) => {
            return Err(error(StatusCode::BAD_REQUEST, format!("the body could not be read: {e}")));
        }
    };
    serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
}

async fn trigger<B>(state: &Arc<AppState>, req: Request<B>, who: &str) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let request: TriggerRequest = match read_json_body(state, req).await {
        Ok(r) => r,
        Err(response) => return response,
    };
    let commit = match state.vcs.resolve(&request.repo, &request.reference).await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot resolve {}: {e}", request.reference)),
    };
    let source = match state.vcs.read_spec(&request.repo, &commit).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, format!("{} has no spec at {commit}", request.repo));
        }
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot read the spec: {e}")),
    };
    let parsed = match spec::parse(&source) {
        Ok(s) => s,
        Err(diags) => {
            let lines: Vec<String> = diags.iter().map(|d| d.line(spec::FILE_NAME)).collect();
            return json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({ "error": "the spec is invalid", "diagnostics": lines }),
            );
        }
    };
    if parsed.pipeline(&request.pipeline).is_none() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, format!("the spec has no pipeline '{}'", request.pipeline));
    }
    let branch = (request.reference != commit).then(|| request.reference.clone());
    let kind = request.event.unwrap_or(EventKind::Manual);
    let event = TriggerEvent { kind, branch: branch.clone(), tag: None, changed_paths: None };
    let n = state.counter.fetch_add(1, Ordering::Relaxed) + 1;
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
            actor: Some(who.to_owned()),
            trusted: true,
        },
        only: None,
        variables: request.variables,
    };
    match state.engine.submit(input).await {
        Ok(()) => json(StatusCode::CREATED, &serde_json::json!({ "build": id })),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the engine refused: {e}")),
    }
}

async fn cancel(state: &AppState, id: &str, who: &str) -> Response<Body> {
    let known = state.engine.query({
        let id = BuildId(id.to_owned());
        move |m| m.build(&id).map(|b| b.finished_at.is_some())
    });
    match known.await {
        Ok(Some(false)) => {}
        Ok(Some(true)) => return error(StatusCode::CONFLICT, format!("build '{id}' has already finished")),
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no running build '{id}'")),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    let input =
        Input::Cancel { build: BuildId(id.to_owned()), by: who.to_owned(), reason: format!("cancelled by {who}") };
    match state.engine.submit(input).await {
        Ok(()) => json(StatusCode::ACCEPTED, &serde_json::json!({ "build": id, "cancelling": true })),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn retry(state: &Arc<AppState>, id: &str, who: &str) -> Response<Body> {
    let found = state
        .engine
        .query({
            let id = BuildId(id.to_owned());
            move |m| m.build(&id).map(|b| (b.pipeline.name.clone(), b.context.clone(), b.variables.clone()))
        })
        .await;
    let (pipeline, context, variables) = match found {
        Ok(Some(found)) => found,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no build '{id}' to retry")),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let source = match state.vcs.read_spec(&context.repo, &context.commit).await {
        Ok(Some(s)) => s,
        Ok(None) => return error(StatusCode::UNPROCESSABLE_ENTITY, "the spec is gone from that commit"),
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot read the spec: {e}")),
    };
    let n = state.counter.fetch_add(1, Ordering::Relaxed) + 1;
    let new = BuildId(format!("{id}-retry-{n}"));
    let context = BuildContext { actor: Some(who.to_owned()), ..context };
    let input = Input::Enqueue {
        build: new.clone(),
        spec: Arc::from(source.as_str()),
        pipeline,
        context,
        only: None,
        variables,
    };
    match state.engine.submit(input).await {
        Ok(()) => json(StatusCode::CREATED, &serde_json::json!({ "build": new, "retry_of": id })),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    #[serde(default)]
    comment: Option<String>,
}

async fn decide<B>(
    state: &AppState,
    req: Request<B>,
    id: &str,
    step: &str,
    actor: Actor,
    approve: bool,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let body = match read_body(req.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(_) => return error(StatusCode::BAD_REQUEST, "the body could not be read"),
    };
    let decision: Decision = if body.is_empty() {
        Decision::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(d) => d,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        }
    };
    let mut events = state.engine.subscribe();
    let input = Input::Decide {
        build: BuildId(id.to_owned()),
        step: step.to_owned(),
        actor: actor.clone(),
        approve,
        comment: decision.comment,
    };
    if let Err(e) = state.engine.submit(input).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    // The decision's outcome is the event it caused, already sent by the time submit returns.
    use cib_core::event::EventBody;
    while let Ok(event) = events.try_recv() {
        match event.body {
            EventBody::DecisionRefused { by, reason, .. } if by == actor.login => {
                return error(StatusCode::CONFLICT, reason);
            }
            EventBody::Approved { by, count, needed, .. } if by == actor.login => {
                return json(
                    StatusCode::OK,
                    &serde_json::json!({ "approved": true, "count": count, "needed": needed }),
                );
            }
            EventBody::Rejected { by, .. } if by == actor.login => {
                return json(StatusCode::OK, &serde_json::json!({ "rejected": true }));
            }
            _ => {}
        }
    }
    error(StatusCode::NOT_FOUND, format!("no gate '{step}' waiting in build '{id}'"))
}

/// The log a request names: `?attempt=N`, or the step's latest attempt.
async fn log_key<B>(state: &AppState, req: &Request<B>, id: &str, step: &str) -> Result<LogKey, Response<Body>> {
    let q = query(req.uri());
    let attempt =
        match q.get("attempt") {
            Some(a) => a.parse::<u32>().map_err(|_| error(StatusCode::BAD_REQUEST, "'attempt' is a number"))?,
            None => {
                let record = state
                    .store
                    .build(&BuildId(id.to_owned()))
                    .await
                    .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
                    .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no build '{id}'")))?;
                record.steps.iter().filter(|s| s.name == step).map(|s| s.attempt).max().ok_or_else(|| {
                    error(StatusCode::NOT_FOUND, format!("step '{step}' of build '{id}' has not started"))
                })?
            }
        };
    Ok(LogKey { build: BuildId(id.to_owned()), step: step.to_owned(), attempt })
}

async fn read_log<B>(state: &AppState, req: &Request<B>, id: &str, step: &str) -> Response<Body> {
    let key = match log_key(state, req, id, step).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    let q = query(req.uri());
    let offset = match q.get("offset").map(|o| o.parse::<u64>()) {
        None => 0,
        Some(Ok(o)) => o,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "'offset' is a byte offset"),
    };
    let stamped = q.get("timestamps").is_some_and(|v| v == "true" || v.is_empty());
    match state.store.read_log(&key, offset, 4 * 1024 * 1024).await {
        Ok(read) => {
            let body = if stamped {
                let marks = state.store.log_times(&key, 0, 1_000_000).await.unwrap_or_default();
                stamp_lines(&read.data, offset, &marks)
            } else {
                read.data
            };
            let mut response = text(StatusCode::OK, "text/plain; charset=utf-8", body);
            let headers = response.headers_mut();
            if let Ok(v) = http::HeaderValue::from_str(&read.next_offset.to_string()) {
                headers.insert("x-cib-next-offset", v);
            }
            headers
                .insert("x-cib-complete", http::HeaderValue::from_static(if read.complete { "true" } else { "false" }));
            response
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Prefixes each line of `data` (which starts at byte `offset` of its log) with the time of
/// the last mark at or before the line's start: `[2026-11-29T05:59:13.123Z] text`.
fn stamp_lines(data: &[u8], offset: u64, marks: &[(u64, cib_core::time::Timestamp)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 8);
    let mut start = 0usize;
    while start < data.len() {
        let end = data[start..].iter().position(|b| *b == b'\n').map_or(data.len(), |i| start + i + 1);
        let at = offset + start as u64;
        // Marks come in offset order, so the last one at or before the line is found by halving.
        match marks.partition_point(|(o, _)| *o <= at).checked_sub(1).map(|i| &marks[i]) {
            Some((_, t)) => out.extend_from_slice(format!("[{}] ", t.rfc3339()).as_bytes()),
            None => out.extend_from_slice(b"[unknown time] "),
        }
        out.extend_from_slice(&data[start..end]);
        start = end;
    }
    out
}

/// A full body as bytes, for tests that call the router directly.
pub async fn body_bytes(response: Response<Body>) -> Bytes {
    response.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default()
}
