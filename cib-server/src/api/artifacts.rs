//! A build's kept artifacts: the list, and each archive as it is stored (a gzip-compressed tar),
//! with its SHA-256 in a header so that a client can check what it received.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use cib_core::event::BuildId;
use cib_core::ports::ArtifactRecord;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::error::{ApiError, json_response};
use crate::extract::PathParams;
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// A build's artifacts.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct BuildArtifacts {
    pub build: BuildId,
    /// One per step that kept artifacts, by name (the step's name).
    pub artifacts: Vec<ArtifactRecord>,
}

/// `GET /api/v1/builds/{build}/artifacts`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    let id = BuildId(id);
    if state.store.build(&id).await.map_err(ApiError::unavailable)?.is_none() {
        return Err(ApiError::NotFound(format!("no build '{}'", id.0)));
    }
    let artifacts = state.artifacts.list(&id).await.map_err(ApiError::unavailable)?;
    Ok(json_response(StatusCode::OK, &BuildArtifacts { build: id, artifacts }))
}

pub fn list_doc(g: &mut DocGen) -> Op {
    Op::new("The artifacts a build kept: per step, the archive's SHA-256, size, number of files and expiry.")
        .param(Param::path("build", "The build's id."))
        .json(200, "The build's artifacts.", g.schema::<BuildArtifacts>())
        .error(g, 404, "No such build.")
}

/// `GET /api/v1/builds/{build}/artifacts/{name}`: the archive, streamed from its file.
pub async fn get(
    State(state): State<Arc<AppState>>,
    PathParams((id, name)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    let id = BuildId(id);
    let found = state.artifacts.list(&id).await.map_err(ApiError::unavailable)?;
    let Some(record) = found.into_iter().find(|a| a.name == name) else {
        return Err(ApiError::NotFound(format!("build '{}' has no artifact '{name}'", id.0)));
    };
    let path = state.artifacts.archive_path(&record);
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        // Expired between the index read and the open: gone, as the index now says too.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound(format!("artifact '{name}' of build '{}' is gone", id.0)));
        }
        Err(e) => return Err(ApiError::unavailable(format!("cannot read artifact '{name}': {e}"))),
    };
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 256 * 1024];
        match tokio::io::AsyncReadExt::read(&mut file, &mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let mut response = (StatusCode::OK, axum::body::Body::from_stream(chunks)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
    if let Ok(v) = HeaderValue::from_str(&record.size.to_string()) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&record.sha256) {
        headers.insert("x-cib-sha256", v);
    }
    Ok(response)
}

pub fn get_doc(g: &mut DocGen) -> Op {
    Op::new("One artifact's archive: a gzip-compressed tar of the files the step kept.")
        .param(Param::path("build", "The build's id."))
        .param(Param::path("name", "The artifact's name (the step's name)."))
        .text(200, "The archive.", "application/gzip")
        .header(
            "x-cib-sha256",
            "The archive's SHA-256, in hex, as the list gives it.",
            serde_json::json!({ "type": "string", "pattern": "^[0-9a-f]{64}$" }),
        )
        .error(g, 404, "No such build, or it kept no artifact of that name.")
}
