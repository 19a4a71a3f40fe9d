//! `GET /api/v1/schedules`: each served repository's `on: schedule` entries and their next run
//! times, as the scheduler (`crate::scheduler`) reads them.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use http::StatusCode;
use serde::Serialize;

use crate::error::{ApiError, json_response};
use crate::openapi::{DocGen, Op};
use crate::scheduler::{ScheduleInfo, schedules};
use crate::state::AppState;

/// How many next run times each schedule shows.
const NEXT: usize = 5;

#[derive(Serialize, schemars::JsonSchema)]
struct ScheduleList {
    schedules: Vec<ScheduleInfo>,
}

pub async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let list = schedules(&state, now, NEXT).await;
    Ok(json_response(StatusCode::OK, &ScheduleList { schedules: list }))
}

pub fn list_doc(g: &mut DocGen) -> Op {
    Op::new(
        "Every scheduled pipeline of the served repositories (from the spec on each one's integration branch), with its next five run times in the server's time zone.",
    )
    .json(200, "The schedules.", g.schema::<ScheduleList>())
}
