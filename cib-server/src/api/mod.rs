//! The HTTP API, one module per resource. Each module owns its handlers and the description of
//! each (`*_doc`), and the route table (`routes.rs`) lists them with their method, path
//! and role.

pub mod artifacts;
pub mod builds;
pub mod caches;
pub mod chat;
pub mod deliveries;
pub mod events;
pub mod hooks;
pub mod logs;
pub mod meta;
pub mod pools;
pub mod repos;
pub mod schedules;
pub mod secrets;
pub mod workers;

use cib_core::spec;

use crate::error::ApiError;

/// Parses a spec on the blocking pool under the operator's limits, or the error that lists
/// every diagnostic (a value over a maximum among them).
pub async fn parse_spec(source: &str, limits: spec::OperatorLimits) -> Result<spec::Spec, ApiError> {
    crate::workflow::parse_blocking(std::sync::Arc::from(source), limits)
        .await
        .map_err(|diags| ApiError::InvalidSpec { diagnostics: diags.iter().map(|d| d.line(spec::FILE_NAME)).collect() })
}
