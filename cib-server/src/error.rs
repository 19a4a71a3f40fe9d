//! Typed errors of the HTTP API: every answer that is not a success is one of these, with a
//! status code and a stable machine-readable `code`, so that clients branch on the code and
//! people read the message.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// Why a request was not done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// No token, or one the server does not know.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// A valid request signature was expected and not found (webhooks).
    #[error("{0}")]
    BadSignature(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The request itself is malformed: its body, a parameter, a header.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    /// The request is well formed but the state forbids it (already finished, say).
    #[error("{0}")]
    Conflict(String),
    /// A policy said no, for every reason in `refusals`.
    #[error("{message}")]
    Refused { message: String, refusals: serde_json::Value },
    /// The spec the request needs is invalid.
    #[error("the spec is invalid")]
    InvalidSpec { diagnostics: Vec<String> },
    /// The request is well formed but names something that cannot be had.
    #[error("{0}")]
    Unprocessable(String),
    /// A backend (the store, the engine) failed; trying again later may work.
    #[error("{0}")]
    Unavailable(String),
}

/// The JSON shape of every error answer.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// What went wrong, for a program: one of the codes listed in `docs/api.md`.
    pub code: ErrorCode,
    /// Every reason a policy refused, as data (with `code` `refused`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusals: Option<Vec<serde_json::Value>>,
    /// Every problem of an invalid spec, as `PATH:LINE:COL: message` (with `code` `invalid_spec`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Vec<String>>,
}

/// The stable codes of [`ErrorBody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    BadSignature,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    TooLarge,
    Conflict,
    Refused,
    InvalidSpec,
    Unprocessable,
    Unavailable,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized | ApiError::BadSignature(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) | ApiError::Refused { .. } => StatusCode::CONFLICT,
            ApiError::InvalidSpec { .. } | ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::BadSignature(_) => ErrorCode::BadSignature,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::BadRequest(_) => ErrorCode::BadRequest,
            ApiError::TooLarge(_) => ErrorCode::TooLarge,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::Refused { .. } => ErrorCode::Refused,
            ApiError::InvalidSpec { .. } => ErrorCode::InvalidSpec,
            ApiError::Unprocessable(_) => ErrorCode::Unprocessable,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// A backend failure, kept apart from the caller's mistakes.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        ApiError::Unavailable(e.to_string())
    }

    /// The body this error is answered with.
    pub fn body(&self) -> ErrorBody {
        let (refusals, diagnostics) = match self {
            ApiError::Refused { refusals, .. } => {
                (Some(refusals.as_array().cloned().unwrap_or_else(|| vec![refusals.clone()])), None)
            }
            ApiError::InvalidSpec { diagnostics } => (None, Some(diagnostics.clone())),
            _ => (None, None),
        };
        ErrorBody { error: self.to_string(), code: self.code(), refusals, diagnostics }
    }
}

/// A JSON answer with a status.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let bytes = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An error answer that is not one of [`ApiError`]'s, built by the router itself (405).
pub fn plain_error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    json_response(status, &ErrorBody { error: message.to_owned(), code, refusals: None, diagnostics: None })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status(), &self.body());
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
