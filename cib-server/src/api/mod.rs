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

/// Parses a spec, or the error that lists every diagnostic.
pub fn parse_spec(source: &str) -> Result<spec::Spec, ApiError> {
    spec::parse(source)
        .map_err(|diags| ApiError::InvalidSpec { diagnostics: diags.iter().map(|d| d.line(spec::FILE_NAME)).collect() })
}
