//! The HTTP API, one module per resource. Each module owns its handlers and the description of
//! each (`*_doc`), and the route table (`routes.rs`) lists them with their method, path
//! and role.

pub mod builds;
pub mod deliveries;
pub mod events;
pub mod hooks;
pub mod logs;
pub mod meta;
pub mod pools;
pub mod repos;
pub mod secrets;

use cib_core::spec;

use crate::error::ApiError;

/// Parses a spec that came from outside on the blocking pool: a hostile one costs at most the
/// parser's bounded time, and never stalls the async workers that serve everyone else.
pub async fn parse_blocking(source: std::sync::Arc<str>) -> Result<spec::Spec, Vec<spec::Diagnostic>> {
    match tokio::task::spawn_blocking(move || spec::parse(&source)).await {
        Ok(parsed) => parsed,
        // The parser does not panic on any input (its fuzz and property tests say so); were
        // it to, the spec is refused rather than the server brought down.
        Err(e) => Err(vec![spec::Diagnostic::error(
            spec::Pos { line: 1, col: 1 },
            format!("the spec could not be read: {e}"),
        )]),
    }
}

/// Parses a spec on the blocking pool, or the error that lists every diagnostic.
pub async fn parse_spec(source: &str) -> Result<spec::Spec, ApiError> {
    parse_blocking(std::sync::Arc::from(source))
        .await
        .map_err(|diags| ApiError::InvalidSpec { diagnostics: diags.iter().map(|d| d.line(spec::FILE_NAME)).collect() })
}
