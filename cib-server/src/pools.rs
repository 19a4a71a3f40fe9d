//! Resource pools and leases over HTTP: what each pool holds and who waits, and people taking,
//! extending, returning and (admins) revoking units for manual testing.
//!
//! Every change goes through the engine as an input, so it is journaled like a build's and
//! survives a restart; reads come from the machine's lease table.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use cib_core::event::EventBody;
use cib_core::lease::{Holder, Lease, LeaseId, Request, Want};
use cib_core::pipeline::{Input, holder_text};
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::config::{Role, TokenConfig};
use crate::http::{Body, error, json};
use crate::server::{AppState, read_json_body};

/// A waiting request as the API shows it.
#[derive(Debug, Serialize)]
struct Waiting {
    lease: String,
    holder: String,
    position: usize,
    since: u64,
    reason: String,
}

/// `GET /api/v1/pools`: every pool with its units, holders and queue.
pub async fn list(state: &AppState) -> Response<Body> {
    let pools = state
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
                    let holders: Vec<serde_json::Value> = table
                        .leases()
                        .filter(|l| l.units.iter().any(|(pool, _)| pool == name))
                        .map(lease_json)
                        .collect();
                    Some(serde_json::json!({ "pool": status, "leases": holders, "waiting": waiting }))
                })
                .collect::<Vec<_>>()
        })
        .await;
    match pools {
        Ok(pools) => json(StatusCode::OK, &serde_json::json!({ "pools": pools })),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn lease_json(l: &Lease) -> serde_json::Value {
    serde_json::json!({
        "lease": l.id.0,
        "holder": holder_text(&l.holder),
        "units": l.units.iter().map(|(p, u)| serde_json::json!({ "pool": p, "units": u })).collect::<Vec<_>>(),
        "token": l.token,
        "granted_at": l.granted_at.millis(),
        "expires_at": l.expires_at.millis(),
        "deadline": l.deadline.map(|d| d.millis()),
        "reason": l.reason,
    })
}

/// Where a lease stands, as the API answers.
async fn describe(state: &AppState, id: &LeaseId) -> Option<serde_json::Value> {
    let id = id.clone();
    state
        .engine
        .query(move |m| {
            let table = m.leases();
            if let Some(l) = table.lease(&id) {
                let mut v = lease_json(l);
                v["granted"] = true.into();
                return Some(v);
            }
            let positions = table.position(&id)?;
            let w = table.waiting().iter().find(|w| w.request.id == id)?;
            Some(serde_json::json!({
                "lease": id.0,
                "holder": holder_text(&w.request.holder),
                "granted": false,
                "positions": positions.into_iter().map(|(pool, position)| serde_json::json!({ "pool": pool, "position": position })).collect::<Vec<_>>(),
            }))
        })
        .await
        .ok()
        .flatten()
}

/// `GET /api/v1/leases/{id}`.
pub async fn get(state: &AppState, id: &str) -> Response<Body> {
    match describe(state, &LeaseId::new(id)).await {
        Some(v) => json(StatusCode::OK, &v),
        None => error(StatusCode::NOT_FOUND, format!("no lease or waiting request '{id}'")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Take {
    pool: String,
    #[serde(default = "one")]
    count: u32,
    /// How long, like `2h` or `30m`.
    #[serde(rename = "for")]
    duration: String,
    #[serde(default)]
    reason: String,
}

fn one() -> u32 {
    1
}

fn duration(text: &str) -> Result<Duration, Response<Body>> {
    cib_core::spec::Duration::parse(text).map(|d| d.as_std()).map_err(|e| error(StatusCode::BAD_REQUEST, e)).and_then(
        |d| if d.is_zero() { Err(error(StatusCode::BAD_REQUEST, "'for' must be longer than 0s")) } else { Ok(d) },
    )
}

/// Sends an input and returns the refusal it caused for this lease, if any.
async fn submit(state: &AppState, input: Input, id: &LeaseId) -> Result<(), Response<Body>> {
    let mut events = state.engine.subscribe();
    state.engine.submit(input).await.map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    while let Ok(event) = events.try_recv() {
        if let EventBody::LeaseRefused { lease: Some(lease), reason } = event.body
            && lease == id.0
        {
            return Err(error(StatusCode::UNPROCESSABLE_ENTITY, reason));
        }
    }
    Ok(())
}

/// `POST /api/v1/leases`: a person takes units, now or when their turn comes.
pub async fn take<B>(state: &Arc<AppState>, req: http::Request<B>, who: &TokenConfig) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let take: Take = match read_json_body(state, req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let length = match duration(&take.duration) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let now = state.clock.now();
    let n = state.counter().fetch_add(1, Ordering::Relaxed) + 1;
    let id = LeaseId(format!("lease-{}-{}-{n}", who.name, now.millis()));
    // A person's lease ends at its deadline, with a warning a little before.
    let warn = (length / 4).min(Duration::from_secs(600));
    let request =
        Request::new(id.clone(), Holder::person(who.name.clone()), vec![Want::new(take.pool, take.count)], length)
            .with_deadline(now + length, Some(warn))
            .with_reason(take.reason);
    if let Err(r) = submit(state, Input::TakeLease { request }, &id).await {
        return r;
    }
    match describe(state, &id).await {
        Some(v) => json(StatusCode::CREATED, &v),
        None => error(StatusCode::CONFLICT, "the lease ended as soon as it began"),
    }
}

/// The lease `id` if `who` may act on it: its holder, or an admin.
async fn owned(state: &AppState, id: &LeaseId, who: &TokenConfig) -> Result<Option<u64>, Response<Body>> {
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
    let Some((holder, token)) = looked.await.map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))? else {
        return Err(error(StatusCode::NOT_FOUND, format!("no lease or waiting request '{}'", id.0)));
    };
    let mine = matches!(&holder, Holder::Person { login } if *login == who.name);
    if !mine && who.role < Role::Admin {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!("'{}' is {}'s, not '{}''s", id.0, holder_text(&holder), who.name),
        ));
    }
    Ok(token)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Extend {
    #[serde(rename = "for")]
    duration: String,
}

/// `POST /api/v1/leases/{id}/extend`: the lease now ends `for` from now.
pub async fn extend<B>(state: &Arc<AppState>, req: http::Request<B>, id: &str, who: &TokenConfig) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let id = LeaseId::new(id);
    let token = match owned(state, &id, who).await {
        Ok(Some(t)) => t,
        Ok(None) => return error(StatusCode::CONFLICT, "a waiting request has nothing to extend yet"),
        Err(r) => return r,
    };
    let body: Extend = match read_json_body(state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let length = match duration(&body.duration) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let until = state.clock.now() + length;
    if let Err(r) = submit(state, Input::ExtendLease { lease: id.clone(), token, until }, &id).await {
        return r;
    }
    get(state, &id.0).await
}

/// `POST /api/v1/leases/{id}/return`: gives units back (or leaves the queue).
pub async fn give_back(state: &Arc<AppState>, id: &str, who: &TokenConfig) -> Response<Body> {
    let id = LeaseId::new(id);
    let input = match owned(state, &id, who).await {
        Ok(Some(token)) => Input::ReturnLease { lease: id.clone(), token },
        Ok(None) => Input::CancelLeaseRequest { lease: id.clone() },
        Err(r) => return r,
    };
    match submit(state, input, &id).await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({ "lease": id.0, "returned": true })),
        Err(r) => r,
    }
}

/// `POST /api/v1/leases/{id}/revoke`: an admin ends anyone's lease.
pub async fn revoke(state: &Arc<AppState>, id: &str) -> Response<Body> {
    let id = LeaseId::new(id);
    match submit(state, Input::RevokeLease { lease: id.clone() }, &id).await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({ "lease": id.0, "revoked": true })),
        Err(r) => r,
    }
}
