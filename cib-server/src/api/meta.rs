//! The server's own resources: liveness. (The API description is served by the route table's
//! module, which it describes.)

use axum::response::Response;
use http::StatusCode;
use serde::Serialize;

use crate::error::json_response;
use crate::openapi::{DocGen, Op};

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Health {
    /// Always `ok` while the process answers.
    pub status: String,
}

/// `GET /healthz`.
pub async fn healthz() -> Response {
    json_response(StatusCode::OK, &Health { status: "ok".into() })
}

pub fn healthz_doc(g: &mut DocGen) -> Op {
    Op::new("Liveness: the process answers.").json(200, "The server is alive.", g.schema::<Health>())
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<crate::state::AppState>>,
) -> Response {
    let now = state.clock.now();
    if let Ok(depth) = state.store.inbox_depth().await {
        state.metrics.inbox(depth, now);
    }
    let queues = state
        .engine
        .query(|m| {
            let table = m.leases();
            table
                .pools()
                .map(str::to_owned)
                .collect::<Vec<_>>()
                .into_iter()
                .map(|p| {
                    let waiting = table.pool_status(&p).map_or(0, |s| s.queue.len());
                    (p, waiting)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
    for (pool, waiting) in queues {
        state.metrics.lease_queue(&pool, waiting);
    }
    for notifier in &state.notifiers {
        if let Some(depth) = notifier.outbox_depth() {
            state.metrics.notifier_outbox(notifier.name(), depth);
        }
    }
    state.metrics.journal_length(state.engine.journal_length());
    if !state.config.webhooks.is_empty()
        && let Ok(last) = state.store.last_event_seq().await
    {
        for hook in &state.config.webhooks {
            let receiver = hook.receiver();
            // A receiver without a cursor yet starts at the last event: it has nothing waiting.
            if let Ok(cursor) = state.store.webhook_cursor(&receiver).await {
                state.metrics.outbox_depth(&receiver, last.saturating_sub(cursor.unwrap_or(last)));
            }
        }
    }
    let mut response = axum::response::IntoResponse::into_response((StatusCode::OK, state.metrics.encode()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

pub fn metrics_doc(_g: &mut DocGen) -> Op {
    Op::new("Metrics in the Prometheus (OpenMetrics) text format.").text(
        200,
        "The metrics.",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
}

/// What `/readyz` found.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Readiness {
    pub ready: bool,
    pub engine: bool,
    pub inbox: bool,
    pub store: bool,
    /// `single` (the only server of its store), `active` (it holds the leadership lease and
    /// runs the engine) or `standby` (it takes webhooks and serves reads; its engine waits).
    pub role: String,
    /// The leadership epoch an active server holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
    /// The address of the active server, as a standby knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
}

/// `GET /readyz`: 200 when the engine, the inbox and the store answer; 503 otherwise.
pub async fn readyz(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<crate::state::AppState>>,
) -> Response {
    let role = state.role.borrow().clone();
    let standby = matches!(role, crate::state::Role::Standby { .. });
    // A standby's engine has not started, so asking it would wait forever; a standby is
    // ready when it can take webhooks and serve reads.
    let engine = !standby && state.engine.query(|_| ()).await.is_ok();
    let inbox = state.inbox_alive.load(std::sync::atomic::Ordering::SeqCst);
    let store = state.store.inbox_depth().await.is_ok();
    let ready = (engine || standby) && inbox && store;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let (epoch, active) = match &role {
        crate::state::Role::Active { epoch } => (Some(*epoch), None),
        crate::state::Role::Standby { active } => (None, active.clone()),
        crate::state::Role::Single => (None, None),
    };
    json_response(status, &Readiness { ready, engine, inbox, store, role: role.name().to_owned(), epoch, active })
}

pub fn readyz_doc(g: &mut DocGen) -> Op {
    let schema = g.schema::<Readiness>();
    Op::new("Readiness: the engine (not at a standby), the inbox and the store answer; and the server's role.")
        .json(200, "Ready.", schema.clone())
        .json(503, "Something has stopped; the body says what.", schema)
}

/// The caller, as the server knows them.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct WhoAmI {
    /// The token's name: the identity recorded in events and decisions.
    pub name: String,
    /// The person behind the token (`[[people]]`), whose decisions count once.
    pub person: String,
    /// `read`, `trigger`, `approve` or `admin`.
    pub role: String,
    /// The token's teams, and the person's.
    pub teams: Vec<String>,
}

/// `GET /api/v1/whoami`: who the token is, so that a person can check a token or a profile
/// before acting with it.
pub async fn whoami(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<crate::state::AppState>>,
    crate::auth::Caller(who): crate::auth::Caller,
) -> Response {
    let mut teams = who.teams.clone();
    if let Some(person) = state.people.find(&cib_core::policy::Identity::Token(who.name.clone())) {
        teams.extend(person.teams.iter().cloned());
    }
    teams.sort();
    teams.dedup();
    // The role's name as configured (`role = "trigger"`), which is its Debug name lower-cased.
    let role = format!("{:?}", who.role).to_lowercase();
    json_response(StatusCode::OK, &WhoAmI { person: state.person_of_token(&who.name), name: who.name, role, teams })
}

pub fn whoami_doc(g: &mut DocGen) -> Op {
    Op::new("Who the bearer token is: its name, person, role and teams.").json(200, "The caller.", g.schema::<WhoAmI>())
}
