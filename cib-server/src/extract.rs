//! Extractors that answer bad input in the API's own error shape (`ApiError`), where axum's
//! would answer plain text: bounded JSON bodies, path parameters and query strings.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use bytes::Bytes;
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// How long a request's body may take to arrive.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest body an API route reads; the webhook route has its own, larger limit.
pub fn api_body_limit(state: &AppState) -> usize {
    state.config.max_body_bytes.min(1024 * 1024)
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    // A body sent too slowly is refused rather than waited for: a slow client must not hold a
    // handler for long.
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, crate::http::read_body(body, limit)).await;
    let Ok(read) = read else {
        return Err(ApiError::BadRequest(format!("the body was not sent within {} s", BODY_READ_TIMEOUT.as_secs())));
    };
    match read {
        Ok(b) => Ok(b),
        Err(crate::http::BodyError::TooLarge) => {
            Err(ApiError::TooLarge(format!("the body is larger than {limit} bytes")))
        }
        Err(crate::http::BodyError::Broken(e)) => Err(ApiError::BadRequest(format!("the body could not be read: {e}"))),
    }
}

/// A JSON body, read up to the API's limit and parsed strictly.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let body = read_body(req.into_body(), api_body_limit(state)).await?;
        serde_json::from_slice(&body).map(JsonBody).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
    }
}

/// A JSON body that may also be empty, which reads as the default.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<Arc<AppState>> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let body = read_body(req.into_body(), api_body_limit(state)).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        serde_json::from_slice(&body).map(OptionalJson).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
    }
}

/// Path parameters, percent-decoded.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParams(p.0))
            .map_err(|e| ApiError::BadRequest(format!("a path parameter is malformed: {e}")))
    }
}

/// The query string as a map (the last value of a repeated key wins), decoded leniently; the
/// handler checks each value and names the parameter it refuses.
#[derive(Debug, Default)]
pub struct QueryMap(pub BTreeMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(QueryMap(crate::http::query(&parts.uri)))
    }
}

impl QueryMap {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.get(key)
    }

    /// A whole number, checked the way the description declares it (`^0*[0-9]{1,digits}$`):
    /// leading zeros are allowed, and at most `digits` significant digits, so that every value
    /// the description allows fits the type. `what` names it in the refusal.
    pub fn whole<T: std::str::FromStr>(&self, key: &str, what: &str, digits: usize) -> Result<Option<T>, ApiError> {
        let refuse = || ApiError::BadRequest(format!("'{key}' is {what}"));
        match self.get(key) {
            None => Ok(None),
            Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                if v.trim_start_matches('0').len() > digits {
                    return Err(refuse());
                }
                v.parse::<T>().map(Some).map_err(|_| refuse())
            }
            Some(_) => Err(refuse()),
        }
    }
}
