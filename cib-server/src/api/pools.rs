//! Resource pools and leases over HTTP: what each pool holds and who waits, and people taking,
//! extending, returning and (admins) revoking units for manual testing.
//!
//! Every change goes through the engine as an input, so it is journaled like a build's and
//! survives a restart; reads come from the machine's lease table.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use cib_core::event::EventBody;
use cib_core::lease::{Holder, Lease, LeaseId, PoolStatus, Request, Want};
use cib_core::pipeline::{Input, holder_text};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::config::{Role, TokenConfig};
use crate::error::{ApiError, json_response};
use crate::extract::{JsonBody, PathParams};
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// A waiting request as the API shows it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Waiting {
    pub lease: String,
    pub holder: String,
    /// 0 is next.
    pub position: usize,
    pub since: u64,
    pub reason: String,
}

/// Units of one pool held by a lease.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct HeldUnits {
    pub pool: String,
    pub units: Vec<String>,
}

/// A granted lease.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct LeaseView {
    pub lease: String,
    pub holder: String,
    pub units: Vec<HeldUnits>,
    /// The fencing token.
    pub token: u64,
    pub granted_at: u64,
    pub expires_at: u64,
    pub deadline: Option<u64>,
    pub reason: String,
}

/// A pool with its holders and its queue.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PoolView {
    pub pool: PoolStatus,
    pub leases: Vec<LeaseView>,
    pub waiting: Vec<Waiting>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PoolList {
    pub pools: Vec<PoolView>,
}

/// Where a waiting request stands in one pool.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Position {
    pub pool: String,
    pub position: usize,
}

/// A lease, granted or waiting.
#[derive(Debug, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum LeaseState {
    Granted {
        #[serde(flatten)]
        lease: LeaseView,
        /// Always true here.
        granted: bool,
    },
    Waiting {
        lease: String,
        holder: String,
        /// Always false here.
        granted: bool,
        positions: Vec<Position>,
    },
}

fn lease_view(l: &Lease) -> LeaseView {
    LeaseView {
        lease: l.id.0.clone(),
        holder: holder_text(&l.holder),
        units: l.units.iter().map(|(p, u)| HeldUnits { pool: p.clone(), units: u.clone() }).collect(),
        token: l.token,
        granted_at: l.granted_at.millis(),
        expires_at: l.expires_at.millis(),
        deadline: l.deadline.map(|d| d.millis()),
        reason: l.reason.clone(),
    }
}

/// `GET /api/v1/pools`: every pool with its units, holders and queue.
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let pools = views(&state).await?;
    Ok(json_response(StatusCode::OK, &PoolList { pools }))
}

/// Every pool with its units, holders and queue, as the API and the web pages show them.
pub(crate) async fn views(state: &AppState) -> Result<Vec<PoolView>, ApiError> {
    state
        .engine
        .query(|m| {
            let table = m.leases();
            let names: Vec<String> = table.pools().map(str::to_owned).collect();
            names
                .iter()
                .filter_map(|name| {
                    let status = table.pool_status(name)?;
                    let waiting: Vec<Waiting> = status
                        .queue
                        .iter()
                        .enumerate()
                        .filter_map(|(position, id)| {
                            let w = table.waiting().iter().find(|w| &w.request.id == id)?;
                            Some(Waiting {
                                lease: id.0.clone(),
                                holder: holder_text(&w.request.holder),
                                position,
                                since: w.since.millis(),
                                reason: w.request.reason.clone(),
                            })
                        })
                        .collect();
                    let leases: Vec<LeaseView> = table
                        .leases()
                        .filter(|l| l.units.iter().any(|(pool, _)| pool == name))
                        .map(lease_view)
                        .collect();
                    Some(PoolView { pool: status, leases, waiting })
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(ApiError::unavailable)
}

pub fn list_doc(g: &mut DocGen) -> Op {
    Op::new("Every pool: its units and who holds them, its leases, and its queue.").json(
        200,
        "The pools.",
        g.schema::<PoolList>(),
    )
}

/// Where a lease stands, as the API answers.
async fn describe(state: &AppState, id: &LeaseId) -> Option<LeaseState> {
    let id = id.clone();
    state
        .engine
        .query(move |m| {
            let table = m.leases();
            if let Some(l) = table.lease(&id) {
                return Some(LeaseState::Granted { lease: lease_view(l), granted: true });
            }
            let positions = table.position(&id)?;
            let w = table.waiting().iter().find(|w| w.request.id == id)?;
            Some(LeaseState::Waiting {
                lease: id.0.clone(),
                holder: holder_text(&w.request.holder),
                granted: false,
                positions: positions.into_iter().map(|(pool, position)| Position { pool, position }).collect(),
            })
        })
        .await
        .ok()
        .flatten()
}

async fn answer(state: &AppState, id: &LeaseId, status: StatusCode) -> Result<Response, ApiError> {
    match describe(state, id).await {
        Some(v) => Ok(json_response(status, &v)),
        None => Err(ApiError::NotFound(format!("no lease or waiting request '{}'", id.0))),
    }
}

/// `GET /api/v1/leases/{lease}`.
pub async fn get(State(state): State<Arc<AppState>>, PathParams(id): PathParams<String>) -> Result<Response, ApiError> {
    answer(&state, &LeaseId::new(id), StatusCode::OK).await
}

pub fn get_doc(g: &mut DocGen) -> Op {
    Op::new("Where a lease stands.")
        .param(Param::path("lease", "The lease's id."))
        .json(200, "The lease, granted or waiting.", g.schema::<LeaseState>())
        .error(g, 404, "No such lease or waiting request.")
}

/// A person's request for units.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Take {
    pub pool: String,
    #[serde(default = "one")]
    pub count: u32,
    /// How long, like `2h` or `30m`.
    #[serde(rename = "for")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub duration: String,
    #[serde(default)]
    pub reason: String,
}

fn one() -> u32 {
    1
}

/// The pattern of a lease's duration in the description: `1h30m`-style, units from the
/// largest down, each at most once and with at most 9 digits, and not zero.
pub const DURATION_PATTERN: &str = "^(?=.*[1-9])([0-9]{1,9}d)?([0-9]{1,9}h)?([0-9]{1,9}m)?([0-9]{1,9}s)?$";

/// Whether `text` matches [`DURATION_PATTERN`], checked without a regex engine.
fn duration_shape(text: &str) -> bool {
    let mut rest = text;
    let mut any_nonzero = false;
    for unit in ['d', 'h', 'm', 's'] {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest[digits..].starts_with(unit) {
            if digits > 9 {
                return false;
            }
            any_nonzero |= rest[..digits].bytes().any(|b| b != b'0');
            rest = &rest[digits + 1..];
        }
    }
    rest.is_empty() && any_nonzero
}

fn duration(text: &str) -> Result<Duration, ApiError> {
    let refuse = || {
        ApiError::BadRequest(format!("invalid duration '{text}': write it like 90s, 10m, 1h30m or 2d, longer than 0s"))
    };
    if !duration_shape(text) {
        return Err(refuse());
    }
    cib_core::spec::Duration::parse(text).map(|d| d.as_std()).map_err(|_| refuse())
}

/// Sends an input and returns the refusal it caused for this lease, if any.
async fn submit(state: &AppState, input: Input, id: &LeaseId) -> Result<(), ApiError> {
    let mut events = state.engine.subscribe();
    state.engine.submit(input).await.map_err(ApiError::unavailable)?;
    while let Ok(event) = events.try_recv() {
        if let EventBody::LeaseRefused { lease: Some(lease), reason } = event.body
            && lease == id.0
        {
            return Err(ApiError::Unprocessable(reason));
        }
    }
    Ok(())
}

/// `POST /api/v1/leases`: a person takes units, now or when their turn comes.
pub async fn take(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    JsonBody(take): JsonBody<Take>,
) -> Result<Response, ApiError> {
    let length = duration(&take.duration)?;
    let now = state.clock.now();
    let n = state.counter().fetch_add(1, Ordering::Relaxed) + 1;
    let id = LeaseId(format!("lease-{}-{}-{n}", who.name, now.millis()));
    // A person's lease ends at its deadline, with a warning a little before.
    let warn = (length / 4).min(Duration::from_secs(600));
    let request =
        Request::new(id.clone(), Holder::person(who.name.clone()), vec![Want::new(take.pool, take.count)], length)
            .with_deadline(now + length, Some(warn))
            .with_reason(take.reason);
    submit(&state, Input::TakeLease { request }, &id).await?;
    match describe(&state, &id).await {
        Some(v) => Ok(json_response(StatusCode::CREATED, &v)),
        None => Err(ApiError::Conflict("the lease ended as soon as it began".into())),
    }
}

pub fn take_doc(g: &mut DocGen) -> Op {
    Op::new("Take units of a pool for a while, now or when their turn comes.")
        .body(g.schema::<Take>())
        .json(201, "The lease, granted or waiting with its positions.", g.schema::<LeaseState>())
        .error(g, 409, "The lease ended as soon as it began.")
        .error(g, 422, "An unknown pool, or more units than it has.")
}

/// The lease `id` if `who` may act on it: its holder, or an admin.
async fn owned(state: &AppState, id: &LeaseId, who: &TokenConfig) -> Result<Option<u64>, ApiError> {
    let looked = {
        let id = id.clone();
        state.engine.query(move |m| {
            let table = m.leases();
            match table.lease(&id) {
                Some(l) => Some((l.holder.clone(), Some(l.token))),
                None => table.waiting().iter().find(|w| w.request.id == id).map(|w| (w.request.holder.clone(), None)),
            }
        })
    };
    let Some((holder, token)) = looked.await.map_err(ApiError::unavailable)? else {
        return Err(ApiError::NotFound(format!("no lease or waiting request '{}'", id.0)));
    };
    let mine = matches!(&holder, Holder::Person { login } if *login == who.name);
    if !mine && who.role < Role::Admin {
        return Err(ApiError::Forbidden(format!("'{}' is {}'s, not '{}''s", id.0, holder_text(&holder), who.name)));
    }
    Ok(token)
}

/// A new end for a lease.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Extend {
    /// How long from now, like `1h`.
    #[serde(rename = "for")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub duration: String,
}

/// `POST /api/v1/leases/{lease}/extend`: the lease now ends `for` from now.
pub async fn extend(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<Extend>,
) -> Result<Response, ApiError> {
    let id = LeaseId::new(id);
    let token = match owned(&state, &id, &who).await? {
        Some(t) => t,
        None => return Err(ApiError::Conflict("a waiting request has nothing to extend yet".into())),
    };
    let length = duration(&body.duration)?;
    let until = state.clock.now() + length;
    submit(&state, Input::ExtendLease { lease: id.clone(), token, until }, &id).await?;
    answer(&state, &id, StatusCode::OK).await
}

pub fn extend_doc(g: &mut DocGen) -> Op {
    Op::new("Extend a lease: it now ends `for` from now. Its holder or an admin.")
        .param(Param::path("lease", "The lease's id."))
        .body(g.schema::<Extend>())
        .json(200, "The lease.", g.schema::<LeaseState>())
        .error(g, 403, "The lease is someone else's.")
        .error(g, 404, "No such lease or waiting request.")
        .error(g, 409, "A waiting request has nothing to extend yet.")
        .error(g, 422, "The extension was refused.")
}

/// A lease that was given back or revoked.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Ended {
    pub lease: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub returned: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
}

/// `POST /api/v1/leases/{lease}/return`: gives units back (or leaves the queue).
pub async fn give_back(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    let id = LeaseId::new(id);
    let input = match owned(&state, &id, &who).await? {
        Some(token) => Input::ReturnLease { lease: id.clone(), token },
        None => Input::CancelLeaseRequest { lease: id.clone() },
    };
    submit(&state, input, &id).await?;
    Ok(json_response(StatusCode::OK, &Ended { lease: id.0, returned: Some(true), revoked: None }))
}

pub fn give_back_doc(g: &mut DocGen) -> Op {
    Op::new("Give a lease's units back, or leave the queue. Its holder or an admin.")
        .param(Param::path("lease", "The lease's id."))
        .json(200, "The lease ended.", g.schema::<Ended>())
        .error(g, 403, "The lease is someone else's.")
        .error(g, 404, "No such lease or waiting request.")
        .error(g, 422, "The return was refused.")
}

/// `POST /api/v1/leases/{lease}/revoke`: an admin ends anyone's lease.
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    let id = LeaseId::new(id);
    submit(&state, Input::RevokeLease { lease: id.clone() }, &id).await?;
    Ok(json_response(StatusCode::OK, &Ended { lease: id.0, returned: None, revoked: Some(true) }))
}

pub fn revoke_doc(g: &mut DocGen) -> Op {
    Op::new("End anyone's lease (admins).")
        .param(Param::path("lease", "The lease's id."))
        .json(200, "The lease was revoked.", g.schema::<Ended>())
        .error(g, 422, "The revocation was refused (no such lease).")
}

#[cfg(test)]
mod tests {
    use super::duration_shape;

    #[test]
    fn durations_have_the_described_shape() {
        for good in ["1h", "90s", "1h30m", "2d", "01s", "1d2h3m4s", "999999999d"] {
            assert!(duration_shape(good), "{good}");
        }
        for bad in ["", "0s", "00m", "1", "h", "30m1h", "1h1h", " 1h", "1h ", "1000000000s", "1x", "-1s"] {
            assert!(!duration_shape(bad), "{bad}");
        }
    }
}
