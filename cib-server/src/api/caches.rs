//! A repository's caches (spec.md, caches): the list, and removing a key's caches, for when a
//! cache went bad or takes room it should not.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use cib_core::ports::CacheInfo;
use http::StatusCode;
use serde::Serialize;

use crate::error::{ApiError, json_response};
use crate::extract::PathParams;
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// A repository's caches, newest first.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct RepoCaches {
    pub repo: String,
    pub caches: Vec<CacheInfo>,
}

/// How many caches a removal took away.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct RemovedCaches {
    pub removed: usize,
}

fn executor(state: &AppState) -> Result<&Arc<dyn cib_core::ports::Executor>, ApiError> {
    state.executor.as_ref().ok_or_else(|| ApiError::unavailable("this server runs no executor"))
}

/// `GET /api/v1/caches/{owner}/{name}`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    PathParams(params): PathParams<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let repo =
        format!("{}/{}", params.get("owner").map_or("", String::as_str), params.get("name").map_or("", String::as_str));
    let caches = executor(&state)?.list_caches(&repo).await.map_err(ApiError::unavailable)?;
    Ok(json_response(StatusCode::OK, &RepoCaches { repo, caches }))
}

pub fn list_doc(g: &mut DocGen) -> Op {
    Op::new("A repository's caches, newest first: key, namespace (`trusted`, or the pull request's) and when each was saved.")
        .param(Param::path("owner", "The repository's owner."))
        .param(Param::path("name", "The repository's name."))
        .json(200, "The caches.", g.schema::<RepoCaches>())
}

/// `DELETE /api/v1/caches/{owner}/{name}/{key}`.
pub async fn remove(
    State(state): State<Arc<AppState>>,
    PathParams(params): PathParams<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let get = |k: &str| params.get(k).map_or("", String::as_str);
    let repo = format!("{}/{}", get("owner"), get("name"));
    let removed = executor(&state)?.remove_caches(&repo, get("key")).await.map_err(ApiError::unavailable)?;
    if removed == 0 {
        return Err(ApiError::NotFound(format!("{repo} has no cache '{}'", get("key"))));
    }
    Ok(json_response(StatusCode::OK, &RemovedCaches { removed }))
}

pub fn remove_doc(g: &mut DocGen) -> Op {
    Op::new("Removes a repository's caches of a key, in every namespace; the next build starts without them.")
        .param(Param::path("owner", "The repository's owner."))
        .param(Param::path("name", "The repository's name."))
        .param(Param::path("key", "The cache's key."))
        .json(200, "How many caches were removed.", g.schema::<RemovedCaches>())
        .error(g, 404, "The repository has no cache of that key.")
}
