//! What the pages' buttons do. Each action is the API's own handler, called with the person
//! the session layer found (which already checked the role and the CSRF token), so a page can
//! do nothing the API would not, and refuses in the API's words. On success the browser is
//! sent back to the page (303, so a reload does not post again).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use http_body_util::BodyExt;

use crate::api::builds::{self, Decision};
use crate::api::pools::{self, Extend, Take};
use crate::api::repos;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{JsonBody, OptionalJson, PathParams};
use crate::state::AppState;

use super::layout;
use super::session::{Form, WebUser, encode, redirect};

/// The API's answer as a page: back to `to` when it was done, else the error in words.
async fn answer(
    result: Result<Response, ApiError>,
    user: &WebUser,
    to: impl FnOnce(&serde_json::Value) -> String,
) -> Response {
    match result {
        Ok(response) => {
            let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            redirect(&to(&value))
        }
        Err(e) => layout::error_page(&e, Some(user)),
    }
}

fn build_page(id: &str) -> String {
    format!("/builds/{}", encode(id))
}

/// `POST /builds/{build}/cancel`.
pub async fn cancel(State(state): State<Arc<AppState>>, user: WebUser, PathParams(id): PathParams<String>) -> Response {
    let result = builds::cancel(State(state), Caller(user.token.clone()), PathParams(id.clone())).await;
    answer(result, &user, |_| build_page(&id)).await
}

/// `POST /builds/{build}/retry`: to the new build's page.
pub async fn retry(State(state): State<Arc<AppState>>, user: WebUser, PathParams(id): PathParams<String>) -> Response {
    let result = builds::retry(State(state), Caller(user.token.clone()), PathParams(id.clone())).await;
    answer(result, &user, |v| build_page(v["build"].as_str().unwrap_or(&id))).await
}

fn decision(form: &Form) -> Decision {
    Decision { comment: form.get("comment").map(str::to_owned) }
}

/// `POST /builds/{build}/gates/{step}/approve`.
pub async fn approve(
    State(state): State<Arc<AppState>>,
    user: WebUser,
    form: Form,
    PathParams((id, step)): PathParams<(String, String)>,
) -> Response {
    let result = builds::approve(
        State(state),
        Caller(user.token.clone()),
        PathParams((id.clone(), step)),
        OptionalJson(decision(&form)),
    )
    .await;
    answer(result, &user, |_| build_page(&id)).await
}

/// `POST /builds/{build}/gates/{step}/reject`.
pub async fn reject(
    State(state): State<Arc<AppState>>,
    user: WebUser,
    form: Form,
    PathParams((id, step)): PathParams<(String, String)>,
) -> Response {
    let result = builds::reject(
        State(state),
        Caller(user.token.clone()),
        PathParams((id.clone(), step)),
        OptionalJson(decision(&form)),
    )
    .await;
    answer(result, &user, |_| build_page(&id)).await
}

/// `POST /pools/take`: fields `pool`, `count`, `for` and `reason`.
pub async fn take(State(state): State<Arc<AppState>>, user: WebUser, form: Form) -> Response {
    let count = match form.get("count").unwrap_or("1").parse::<u32>() {
        Ok(n) if n >= 1 => n,
        _ => return layout::error_page(&ApiError::BadRequest("'count' is a whole number from 1".into()), Some(&user)),
    };
    let take = Take {
        pool: form.get("pool").unwrap_or_default().to_owned(),
        count,
        duration: form.get("for").unwrap_or("1h").to_owned(),
        reason: form.get("reason").unwrap_or_default().to_owned(),
    };
    let result = pools::take(State(state), Caller(user.token.clone()), JsonBody(take)).await;
    answer(result, &user, |_| "/pools".to_owned()).await
}

/// `POST /leases/{lease}/extend`: field `for`.
pub async fn extend(
    State(state): State<Arc<AppState>>,
    user: WebUser,
    form: Form,
    PathParams(id): PathParams<String>,
) -> Response {
    let body = Extend { duration: form.get("for").unwrap_or("1h").to_owned() };
    let result = pools::extend(State(state), Caller(user.token.clone()), PathParams(id), JsonBody(body)).await;
    answer(result, &user, |_| "/pools".to_owned()).await
}

/// `POST /leases/{lease}/return`.
pub async fn give_back(
    State(state): State<Arc<AppState>>,
    user: WebUser,
    PathParams(id): PathParams<String>,
) -> Response {
    let result = pools::give_back(State(state), Caller(user.token.clone()), PathParams(id)).await;
    answer(result, &user, |_| "/pools".to_owned()).await
}

fn repo_params(owner: &str, name: &str) -> std::collections::BTreeMap<String, String> {
    [("owner".to_owned(), owner.to_owned()), ("name".to_owned(), name.to_owned())].into_iter().collect()
}

/// `POST /repos/{owner}/{name}/approve`: approves the promotion of field `commit`.
pub async fn approve_promotion(
    State(state): State<Arc<AppState>>,
    user: WebUser,
    form: Form,
    PathParams((owner, name)): PathParams<(String, String)>,
) -> Response {
    let body = repos::CommitBody { commit: form.get("commit").unwrap_or_default().to_owned() };
    let result = repos::approval(
        State(state),
        Caller(user.token.clone()),
        PathParams(repo_params(&owner, &name)),
        JsonBody(body),
    )
    .await;
    answer(result, &user, |_| format!("/repos/{owner}/{name}")).await
}

/// `POST /repos/{owner}/{name}/promote`: promotes field `commit`.
pub async fn promote(
    State(state): State<Arc<AppState>>,
    user: WebUser,
    form: Form,
    PathParams((owner, name)): PathParams<(String, String)>,
) -> Response {
    let body = repos::CommitBody { commit: form.get("commit").unwrap_or_default().to_owned() };
    let result = repos::promote(
        State(state),
        Caller(user.token.clone()),
        PathParams(repo_params(&owner, &name)),
        JsonBody(body),
    )
    .await;
    answer(result, &user, |_| format!("/repos/{owner}/{name}")).await
}
