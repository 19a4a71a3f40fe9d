//! The OpenAPI description the server serves, kept in `docs/openapi.json` beside the prose.

/// The document, as served at `/api/v1/openapi.json`.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");
