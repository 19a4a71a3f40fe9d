//! The server's own resources: liveness. (The API description is served by the route table's
//! module, which it describes.)

use axum::response::Response;
use http::StatusCode;
use serde::Serialize;

use crate::error::json_response;
use crate::openapi::{DocGen, Op};

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Health {
    /// Always `ok` while the process answers.
    pub status: String,
}

/// `GET /healthz`.
pub async fn healthz() -> Response {
    json_response(StatusCode::OK, &Health { status: "ok".into() })
}

pub fn healthz_doc(g: &mut DocGen) -> Op {
    Op::new("Liveness: the process answers.").json(200, "The server is alive.", g.schema::<Health>())
}
