//! The inbox as an operator sees it: deliveries by state with their attempts and reasons, and
//! redelivery of one that was set aside.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use cib_core::ports::{DeliveryInfo, DeliveryState};
use http::StatusCode;
use serde::Serialize;
use serde_json::json;

use crate::error::{ApiError, json_response};
use crate::extract::{PathParams, QueryMap};
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryInfo>,
}

/// `GET /api/v1/deliveries?state=pending|dead|done`.
pub async fn list(State(state): State<Arc<AppState>>, q: QueryMap) -> Result<Response, ApiError> {
    let wanted = match q.get("state").map(String::as_str) {
        None => None,
        Some("pending") => Some(DeliveryState::Pending),
        Some("dead") => Some(DeliveryState::Dead),
        Some("done") => Some(DeliveryState::Done),
        Some(other) => return Err(ApiError::BadRequest(format!("unknown state '{other}': pending, dead or done"))),
    };
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => {
            let significant = l.trim_start_matches('0');
            match significant.parse::<usize>() {
                Ok(n) if (1..=10_000).contains(&n) && significant.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(ApiError::BadRequest("'limit' is a number from 1 to 10000".into())),
            }
        }
    };
    let deliveries = state.store.deliveries(wanted, limit).await.map_err(ApiError::unavailable)?;
    Ok(json_response(StatusCode::OK, &DeliveryList { deliveries }))
}

pub fn list_doc(g: &mut DocGen) -> Op {
    Op::new("Stored deliveries, newest first, with their attempts and reasons.")
        .param(Param::query("state", "Only this state.", json!({ "enum": ["pending", "dead", "done"] })))
        .param(Param::query(
            "limit",
            "At most this many (default 100).",
            json!({ "type": "string", "pattern": "^0*([1-9][0-9]{0,3}|10000)$" }),
        ))
        .json(200, "The deliveries.", g.schema::<DeliveryList>())
        .error(g, 400, "A parameter is malformed.")
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Redelivered {
    pub delivery: String,
    pub redelivered: bool,
}

/// `POST /api/v1/deliveries/{delivery}/redeliver`.
pub async fn redeliver(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    if !state.store.redeliver(&id).await.map_err(ApiError::unavailable)? {
        return Err(ApiError::NotFound(format!("no delivery '{id}'")));
    }
    state.inbox.notify_one();
    Ok(json_response(StatusCode::OK, &Redelivered { delivery: id, redelivered: true }))
}

pub fn redeliver_doc(g: &mut DocGen) -> Op {
    Op::new("Process a delivery again, from its first attempt.")
        .param(Param::path("delivery", "The delivery's id."))
        .json(200, "The delivery is pending again.", g.schema::<Redelivered>())
        .error(g, 404, "No such delivery.")
}
