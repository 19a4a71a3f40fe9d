//! The route table: every route of the server, with its method, path, who may call it, its
//! handler and its description. The axum router, the OpenAPI description and the authorization
//! test are all built from this one list, so a route cannot exist without its role and its
//! documentation.

use std::sync::Arc;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use http::{Method, StatusCode};

use crate::api::{
    artifacts, builds, caches, chat, deliveries, events, hooks, logs, meta, pools, repos, schedules, secrets, workers,
};
use crate::auth::Access;
use crate::config::Role;
use crate::error::{ApiError, ErrorCode, plain_error};
use crate::openapi::{DocGen, Op};
use crate::state::AppState;
use crate::web;

/// One route.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    /// In axum's syntax, which is also OpenAPI's: `/api/v1/builds/{build}`.
    pub path: &'static str,
    pub access: Access,
    /// The handler, as a method router for this one method.
    pub handler: fn() -> MethodRouter<Arc<AppState>>,
    /// The operation's description.
    pub doc: fn(&mut DocGen) -> Op,
}

macro_rules! route {
    (GET $path:literal, $access:expr, $handler:path, $doc:path) => {
        Route { method: Method::GET, path: $path, access: $access, handler: || axum::routing::get($handler), doc: $doc }
    };
    (POST $path:literal, $access:expr, $handler:path, $doc:path) => {
        Route {
            method: Method::POST,
            path: $path,
            access: $access,
            handler: || axum::routing::post($handler),
            doc: $doc,
        }
    };
    (PUT $path:literal, $access:expr, $handler:path, $doc:path) => {
        Route { method: Method::PUT, path: $path, access: $access, handler: || axum::routing::put($handler), doc: $doc }
    };
    (DELETE $path:literal, $access:expr, $handler:path, $doc:path) => {
        Route {
            method: Method::DELETE,
            path: $path,
            access: $access,
            handler: || axum::routing::delete($handler),
            doc: $doc,
        }
    };
}

use Access::{Page, Public, Signed};
const READ: Access = Access::Role(Role::Read);
const TRIGGER: Access = Access::Role(Role::Trigger);
const APPROVE: Access = Access::Role(Role::Approve);
const ADMIN: Access = Access::Role(Role::Admin);
// The web pages: a session cookie with at least this role (and a CSRF token on every POST).
const WEB_READ: Access = Access::Session(Role::Read);
const WEB_TRIGGER: Access = Access::Session(Role::Trigger);
const WEB_APPROVE: Access = Access::Session(Role::Approve);

/// Every route the server answers.
pub fn table() -> Vec<Route> {
    vec![
        route!(GET "/healthz", Public, meta::healthz, meta::healthz_doc),
        route!(GET "/readyz", Public, meta::readyz, meta::readyz_doc),
        route!(GET "/metrics", Public, meta::metrics, meta::metrics_doc),
        route!(GET "/api/v1/openapi.json", Public, openapi, openapi_doc),
        route!(POST "/hooks/github", Signed, hooks::github, hooks::github_doc),
        route!(POST "/hooks/git", Signed, hooks::git, hooks::git_doc),
        // Chat commands, signed by Slack or carrying Zulip's token, run as the mapped person.
        route!(POST "/chat/slack/commands", Signed, chat::slack_command, chat::slack_command_doc),
        route!(POST "/chat/slack/actions", Signed, chat::slack_action, chat::slack_action_doc),
        route!(POST "/chat/zulip", Signed, chat::zulip, chat::zulip_doc),
        route!(GET "/api/v1/whoami", READ, meta::whoami, meta::whoami_doc),
        // The inbox.
        route!(GET "/api/v1/deliveries", ADMIN, deliveries::list, deliveries::list_doc),
        route!(POST "/api/v1/deliveries/{delivery}/redeliver", ADMIN, deliveries::redeliver, deliveries::redeliver_doc),
        // Builds.
        route!(GET "/api/v1/builds", READ, builds::list, builds::list_doc),
        route!(POST "/api/v1/builds", TRIGGER, builds::trigger, builds::trigger_doc),
        route!(GET "/api/v1/builds/{build}", READ, builds::get, builds::get_doc),
        route!(GET "/api/v1/builds/{build}/deliverables", READ, builds::deliverables, builds::deliverables_doc),
        route!(GET "/api/v1/builds/{build}/artifacts", READ, artifacts::list, artifacts::list_doc),
        route!(GET "/api/v1/builds/{build}/artifacts/{name}", READ, artifacts::get, artifacts::get_doc),
        route!(POST "/api/v1/builds/{build}/cancel", TRIGGER, builds::cancel, builds::cancel_doc),
        route!(POST "/api/v1/builds/{build}/retry", TRIGGER, builds::retry, builds::retry_doc),
        route!(POST "/api/v1/builds/{build}/gates/{step}/approve", APPROVE, builds::approve, builds::approve_doc),
        route!(POST "/api/v1/builds/{build}/gates/{step}/reject", APPROVE, builds::reject, builds::reject_doc),
        // Logs and events.
        route!(GET "/api/v1/builds/{build}/steps/{step}/log", READ, logs::read, logs::read_doc),
        route!(GET "/api/v1/builds/{build}/steps/{step}/log/stream", READ, logs::stream, logs::stream_doc),
        route!(GET "/api/v1/events", READ, events::stream, events::stream_doc),
        // Pools and leases.
        route!(GET "/api/v1/pools", READ, pools::list, pools::list_doc),
        // Schedules.
        route!(GET "/api/v1/schedules", READ, schedules::list, schedules::list_doc),
        route!(POST "/api/v1/leases", TRIGGER, pools::take, pools::take_doc),
        route!(GET "/api/v1/leases/{lease}", READ, pools::get, pools::get_doc),
        route!(POST "/api/v1/leases/{lease}/extend", TRIGGER, pools::extend, pools::extend_doc),
        route!(POST "/api/v1/leases/{lease}/return", TRIGGER, pools::give_back, pools::give_back_doc),
        route!(POST "/api/v1/leases/{lease}/revoke", ADMIN, pools::revoke, pools::revoke_doc),
        // Repositories and the workflow, `owner/name` as two segments.
        route!(GET "/api/v1/repos", READ, repos::list, repos::list_doc),
        route!(POST "/api/v1/repos/{owner}/{name}/reviews", APPROVE, repos::review, repos::review_doc),
        route!(POST "/api/v1/repos/{owner}/{name}/approvals", APPROVE, repos::approval, repos::approval_doc),
        route!(POST "/api/v1/repos/{owner}/{name}/merge", TRIGGER, repos::merge, repos::merge_doc),
        route!(POST "/api/v1/repos/{owner}/{name}/promote", TRIGGER, repos::promote, repos::promote_doc),
        route!(GET "/api/v1/repos/{owner}/{name}/environments", READ, repos::environments, repos::environments_doc),
        route!(GET "/api/v1/repos/{owner}/{name}/commits/{commit}/downstream", READ, repos::downstream, repos::downstream_doc),
        // The same with the slash encoded (`owner%2Fname`), for clients that keep a name whole.
        route!(POST "/api/v1/repos/{owner}/reviews", APPROVE, repos::review, repos::review_doc_encoded),
        route!(POST "/api/v1/repos/{owner}/approvals", APPROVE, repos::approval, repos::approval_doc_encoded),
        route!(POST "/api/v1/repos/{owner}/merge", TRIGGER, repos::merge, repos::merge_doc_encoded),
        route!(POST "/api/v1/repos/{owner}/promote", TRIGGER, repos::promote, repos::promote_doc_encoded),
        route!(GET "/api/v1/repos/{owner}/environments", READ, repos::environments, repos::environments_doc_encoded),
        route!(GET "/api/v1/repos/{owner}/commits/{commit}/downstream", READ, repos::downstream, repos::downstream_doc_encoded),
        // Caches: anyone may see them; removing them is an admin's.
        route!(GET "/api/v1/caches/{owner}/{name}", READ, caches::list, caches::list_doc),
        route!(DELETE "/api/v1/caches/{owner}/{name}/{key}", ADMIN, caches::remove, caches::remove_doc),
        // Secrets, admins only: values go in and never come out.
        route!(GET "/api/v1/secrets", ADMIN, secrets::list, secrets::list_doc),
        route!(POST "/api/v1/secrets/rekey", ADMIN, secrets::rekey, secrets::rekey_doc),
        route!(PUT "/api/v1/secrets/{owner}/{name}/{secret}", ADMIN, secrets::set, secrets::set_doc),
        route!(DELETE "/api/v1/secrets/{owner}/{name}/{secret}", ADMIN, secrets::remove, secrets::remove_doc),
        // The worker API: `cib worker` processes, with job-scoped tokens the handlers check
        // (API tokens open nothing here).
        route!(POST "/api/v1/worker/jobs/{job}/claim", Signed, workers::claim, workers::claim_doc),
        route!(GET "/api/v1/worker/jobs/{job}/workspace", Signed, workers::workspace, workers::workspace_doc),
        route!(POST "/api/v1/worker/jobs/{job}/output", Signed, workers::output, workers::output_doc),
        route!(POST "/api/v1/worker/jobs/{job}/heartbeat", Signed, workers::heartbeat, workers::heartbeat_doc),
        route!(POST "/api/v1/worker/jobs/{job}/result", Signed, workers::result, workers::result_doc),
        // The web pages (HTML, `web/`), left out of the API's description. The streams and the
        // raw log are the API's own handlers, reached with the session's cookie, since a
        // browser's `EventSource` cannot send a bearer token.
        route!(GET "/login", Page, web::session::login_form, web::page_doc),
        route!(POST "/login", Page, web::session::login, web::page_doc),
        route!(POST "/logout", WEB_READ, web::session::logout, web::page_doc),
        route!(GET "/assets/{file}", Page, web::assets::serve, web::page_doc),
        route!(GET "/", WEB_READ, web::pages::dashboard, web::page_doc),
        route!(GET "/builds", WEB_READ, web::pages::builds, web::page_doc),
        route!(GET "/builds/{build}", WEB_READ, web::pages::build, web::page_doc),
        route!(GET "/builds/{build}/steps/{step}", WEB_READ, web::logpage::log_page, web::page_doc),
        // An artifact's archive for a signed-in person: the API's own handler.
        route!(GET "/builds/{build}/artifacts/{name}", WEB_READ, artifacts::get, web::page_doc),
        route!(GET "/builds/{build}/steps/{step}/lines", WEB_READ, web::logpage::log_lines, web::page_doc),
        route!(GET "/builds/{build}/steps/{step}/count", WEB_READ, web::logpage::count, web::page_doc),
        route!(GET "/builds/{build}/steps/{step}/raw", WEB_READ, web::logpage::raw, web::page_doc),
        route!(GET "/builds/{build}/steps/{step}/stream", WEB_READ, logs::stream, web::page_doc),
        route!(GET "/live/events", WEB_READ, events::stream, web::page_doc),
        route!(POST "/builds/{build}/cancel", WEB_TRIGGER, web::actions::cancel, web::page_doc),
        route!(POST "/builds/{build}/retry", WEB_TRIGGER, web::actions::retry, web::page_doc),
        route!(POST "/builds/{build}/gates/{step}/approve", WEB_APPROVE, web::actions::approve, web::page_doc),
        route!(POST "/builds/{build}/gates/{step}/reject", WEB_APPROVE, web::actions::reject, web::page_doc),
        route!(GET "/pools", WEB_READ, web::pages::pools, web::page_doc),
        route!(POST "/pools/take", WEB_TRIGGER, web::actions::take, web::page_doc),
        route!(POST "/leases/{lease}/extend", WEB_TRIGGER, web::actions::extend, web::page_doc),
        route!(POST "/leases/{lease}/return", WEB_TRIGGER, web::actions::give_back, web::page_doc),
        route!(GET "/repos/{owner}/{name}", WEB_READ, web::pages::repo, web::page_doc),
        route!(POST "/repos/{owner}/{name}/approve", WEB_APPROVE, web::actions::approve_promotion, web::page_doc),
        route!(POST "/repos/{owner}/{name}/promote", WEB_TRIGGER, web::actions::promote, web::page_doc),
    ]
}

/// The router: each route of the table behind its role's layer, a JSON 404 for unknown paths,
/// and a JSON 405 (with the router's `Allow` header) for a known path with another method.
pub fn router(state: Arc<AppState>) -> Router {
    let mut router: Router<Arc<AppState>> = Router::new();
    for route in table() {
        let mut method_router = (route.handler)();
        match route.access {
            Access::Role(role) => {
                method_router = method_router
                    .route_layer(axum::middleware::from_fn_with_state((state.clone(), role), crate::auth::layer));
            }
            Access::Session(role) => {
                method_router = method_router.route_layer(axum::middleware::from_fn_with_state(
                    (state.clone(), role),
                    crate::web::session::layer,
                ));
            }
            Access::Public | Access::Signed | Access::Page => {}
        }
        router = router.route(route.path, method_router);
    }
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), standby_gate))
        .layer(axum::middleware::map_response(explain_405))
        // Bodies are read with each route's own limit (the webhook's is larger), not axum's.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// The header naming the active server in a standby's `503`.
pub const ACTIVE_HEADER: &str = "x-cib-active";

/// Whether a standby serves this request itself: reads of what the store holds, webhook
/// intake (an insert, which the active server's inbox picks up) and signing in and out.
/// What needs the engine (every write, and reads of its memory: pools, leases, environments,
/// downstream builds, live streams) is the active server's.
pub fn served_by_standby(method: &Method, path: &str) -> bool {
    if method == Method::GET || method == Method::HEAD {
        let engine_read = path.starts_with("/api/v1/pools")
            || path.starts_with("/api/v1/leases")
            || path == "/pools"
            || path.starts_with("/repos/")
            || path.ends_with("/environments")
            || path.contains("/downstream")
            || path.ends_with("/stream")
            || path.ends_with("/events");
        return !engine_read;
    }
    method == Method::POST && matches!(path, "/hooks/github" | "/hooks/git" | "/login" | "/logout")
}

/// At a standby, answers what only the active server can do with `503`, `Retry-After: 1` and
/// the active server's address (in [`ACTIVE_HEADER`] and the message) rather than forwarding
/// it: a client that retries there reaches the engine that will act, and a standby never
/// carries a write whose outcome it cannot know.
async fn standby_gate(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // Cloned out, so that the role's lock is not held across the handler's await.
    let role = state.role.borrow().clone();
    let crate::state::Role::Standby { active } = role else { return next.run(request).await };
    if served_by_standby(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let message = match &active {
        Some(address) => format!("this server is a standby; the active server is {address}"),
        None => "this server is a standby, and no server holds the lease at the moment".to_owned(),
    };
    let mut response = plain_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, &message);
    response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    if let Some(value) = active.and_then(|a| http::HeaderValue::from_str(&a).ok()) {
        response.headers_mut().insert(ACTIVE_HEADER, value);
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such resource".into())
}

/// Gives the router's bare 405 the API's error body, keeping its `Allow` header.
async fn explain_405(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(http::header::ALLOW).cloned();
    let mut answer =
        plain_error(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed, "method not allowed here")
            .into_response();
    if let Some(allow) = allow {
        answer.headers_mut().insert(http::header::ALLOW, allow);
    }
    answer
}

/// The OpenAPI description of every API route in the table (the web pages are not the API).
pub fn document() -> serde_json::Value {
    let table = table();
    crate::openapi::document(table.iter().filter(|r| r.access.in_api()).map(|r| (&r.method, r.path, r.access, r.doc)))
}

/// The description as served and committed: pretty JSON with a final newline.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

/// `GET /api/v1/openapi.json`: the description, generated once. It lives beside the table it
/// describes, since a handler in `api/` would make the modules a circle.
async fn openapi() -> Response {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = TEXT.get_or_init(document_text).clone();
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn openapi_doc(_g: &mut DocGen) -> Op {
    Op::new("This description (OpenAPI 3.1).").json(
        200,
        "The OpenAPI document.",
        serde_json::json!({ "type": "object" }),
    )
}
