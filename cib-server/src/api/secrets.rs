//! The encrypted secret store over HTTP, for admins: list (names, scopes, when and by whom
//! set; never values), set, remove, and rekey. `cib secret` is a client of these routes.
//!
//! Values are sealed by the store under the server's key (`secret_key_file` or
//! `CIB_SECRET_KEY`); no answer ever carries a value or the key.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use cib_core::policy::SecretScope;
use cib_core::ports::{NewSecret, SecretError, SecretKey, SecretValue};
use cib_core::spec::Glob;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::error::{ApiError, json_response};
use crate::extract::{JsonBody, OptionalJson, PathParams, QueryMap};
use crate::openapi::{DocGen, Op, Param};
use crate::secrets::KeySource;
use crate::state::AppState;

/// A stored secret as listed: never its value.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SecretView {
    pub repo: String,
    pub name: String,
    /// Branch globs it is limited to; empty: any branch.
    pub branches: Vec<String>,
    /// Pipelines it is limited to; empty: any.
    pub pipelines: Vec<String>,
    /// Environments (deploy pipelines) it is limited to; empty: any.
    pub environments: Vec<String>,
    /// When it was set, in milliseconds since the epoch.
    pub set_at: u64,
    /// Who set it: the person, or the token's name.
    pub set_by: String,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretView>,
}

/// A secret to set.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecretBody {
    /// The value: at least 6 bytes, since shorter ones cannot be masked safely in logs.
    pub value: String,
    /// Branch globs (`production` for a deploy key). Pull requests never match a branch scope.
    #[serde(default)]
    pub branches: Vec<Glob>,
    #[serde(default)]
    pub pipelines: Vec<String>,
    #[serde(default)]
    pub environments: Vec<String>,
}

/// A rekey: the new key, or nothing for the server to make one.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RekeyBody {
    /// 32 bytes in hex (64 digits) or base64. Required when the key comes from
    /// `CIB_SECRET_KEY`; otherwise the server makes one and writes it to the key file.
    #[serde(default)]
    pub key: Option<String>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Rekeyed {
    /// How many secrets were sealed again.
    pub resealed: usize,
    /// The key file now holding the new key; absent when the key comes from `CIB_SECRET_KEY`,
    /// which must then be set to the new key before the next start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Removed {
    pub removed: bool,
}

fn secret_error(e: SecretError) -> ApiError {
    match e {
        SecretError::TooShort { .. } | SecretError::Invalid(_) => ApiError::Unprocessable(e.to_string()),
        other => ApiError::unavailable(other),
    }
}

fn key(state: &AppState) -> Result<SecretKey, ApiError> {
    state.keys.current().map_err(ApiError::Unavailable)
}

fn person(state: &AppState, token_name: &str) -> String {
    state.person_of_token(token_name)
}

fn repo_and_name(params: &BTreeMap<String, String>) -> (String, String) {
    let get = |k: &str| params.get(k).cloned().unwrap_or_default();
    (format!("{}/{}", get("owner"), get("name")), get("secret"))
}

fn secret_params(op: Op) -> Op {
    op.param(Param::path("owner", "The repository's owner."))
        .param(Param::path("name", "The repository's name."))
        .param(Param::path("secret", "The secret's name, like an environment variable's."))
}

/// `GET /api/v1/secrets[?repo=owner/name]`.
pub async fn list(State(state): State<Arc<AppState>>, query: QueryMap) -> Result<Response, ApiError> {
    let repo = query.get("repo").filter(|r| !r.is_empty());
    let infos = state.secrets.list_secrets(repo.map(String::as_str)).await.map_err(secret_error)?;
    let secrets = infos
        .into_iter()
        .map(|i| SecretView {
            repo: i.scope.repo,
            name: i.name,
            branches: i.scope.branches.iter().map(|g| g.as_str().to_owned()).collect(),
            pipelines: i.scope.pipelines,
            environments: i.scope.environments,
            set_at: i.set_at.millis(),
            set_by: i.set_by,
        })
        .collect();
    Ok(json_response(StatusCode::OK, &SecretList { secrets }))
}

pub fn list_doc(g: &mut DocGen) -> Op {
    Op::new("The stored secrets: names, scopes, when and by whom set. Never values.")
        .param(Param::query("repo", "Only this repository's (`owner/name`).", serde_json::json!({ "type": "string" })))
        .json(200, "The secrets, by repository then name.", g.schema::<SecretList>())
        .error(g, 503, "The store cannot be read.")
}

/// `PUT /api/v1/secrets/{owner}/{name}/{secret}`.
pub async fn set(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(params): PathParams<BTreeMap<String, String>>,
    JsonBody(body): JsonBody<SetSecretBody>,
) -> Result<Response, ApiError> {
    let (repo, name) = repo_and_name(&params);
    let key = key(&state)?;
    let secret = NewSecret {
        name,
        value: SecretValue::new(body.value),
        scope: SecretScope {
            repo,
            branches: body.branches,
            pipelines: body.pipelines,
            environments: body.environments,
        },
        by: person(&state, &who.name),
        at: state.clock.now(),
    };
    state.secrets.set_secret(&key, &secret).await.map_err(secret_error)?;
    tracing::info!(repo = %secret.scope.repo, name = %secret.name, by = %secret.by, "secret set");
    Ok(json_response(
        StatusCode::OK,
        &SecretView {
            repo: secret.scope.repo,
            name: secret.name,
            branches: secret.scope.branches.iter().map(|g| g.as_str().to_owned()).collect(),
            pipelines: secret.scope.pipelines,
            environments: secret.scope.environments,
            set_at: secret.at.millis(),
            set_by: secret.by,
        },
    ))
}

pub fn set_doc(g: &mut DocGen) -> Op {
    secret_params(
        Op::new("Set a secret of a repository, replacing one of the same name.")
            .describe(
                "The value is sealed with the server's key and never shown again. Values shorter than 6 \
                 bytes are refused (422): they cannot be masked safely in logs.",
            )
            .body(g.schema::<SetSecretBody>())
            .json(200, "Stored; the answer holds no value.", g.schema::<SecretView>())
            .error(g, 422, "The name or the value is refused, with the reason.")
            .error(g, 503, "The key does not open the stored secrets, or the store failed."),
    )
}

/// `DELETE /api/v1/secrets/{owner}/{name}/{secret}`.
pub async fn remove(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(params): PathParams<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let (repo, name) = repo_and_name(&params);
    if !state.secrets.remove_secret(&repo, &name).await.map_err(secret_error)? {
        return Err(ApiError::NotFound(format!("{repo} has no secret named '{name}'")));
    }
    tracing::info!(%repo, %name, by = %person(&state, &who.name), "secret removed");
    Ok(json_response(StatusCode::OK, &Removed { removed: true }))
}

pub fn remove_doc(g: &mut DocGen) -> Op {
    secret_params(
        Op::new("Remove a secret.")
            .json(200, "Removed.", g.schema::<Removed>())
            .error(g, 404, "There is no such secret.")
            .error(g, 503, "The store failed."),
    )
}

/// `POST /api/v1/secrets/rekey`.
pub async fn rekey(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    OptionalJson(body): OptionalJson<RekeyBody>,
) -> Result<Response, ApiError> {
    let _one_at_a_time = state.keys.rekeying.lock().await;
    let old = key(&state)?;
    let (new, key_file) = match (&state.keys.source, body.key) {
        (KeySource::Environment, None) => {
            return Err(ApiError::Unprocessable(
                "the key comes from CIB_SECRET_KEY, which the server cannot change: send the new key as `key`, \
                 then set CIB_SECRET_KEY to it before the next start"
                    .into(),
            ));
        }
        (KeySource::Environment, Some(text)) => {
            (cib_store::parse_key(&text, "CIB_SECRET_KEY").map_err(|e| ApiError::Unprocessable(e.to_string()))?, None)
        }
        (KeySource::File(path), given) => {
            let origin = format!("the key in {}", path.display());
            let new = match given {
                Some(text) => {
                    cib_store::parse_key(&text, &origin).map_err(|e| ApiError::Unprocessable(e.to_string()))?
                }
                None => cib_store::generate_key(&origin),
            };
            (new, Some(path.clone()))
        }
    };
    // The new key is on disk before any secret is sealed with it: a crash in between leaves
    // `<file>.new` beside the old key, and never secrets that no file opens.
    let pending = key_file.as_ref().map(|p| p.with_extension("key.new"));
    if let Some(pending) = &pending {
        write_key_file(pending, &new).map_err(ApiError::unavailable)?;
    }
    let resealed = match state.secrets.rekey(&old, &new).await {
        Ok(n) => n,
        Err(e) => {
            if let Some(pending) = &pending {
                let _ = std::fs::remove_file(pending);
            }
            return Err(secret_error(e));
        }
    };
    if let (Some(pending), Some(path)) = (&pending, &key_file) {
        std::fs::rename(pending, path).map_err(|e| {
            ApiError::Unavailable(format!(
                "the secrets are sealed with the key in {}, which could not replace {}: {e}; move it there by hand",
                pending.display(),
                path.display()
            ))
        })?;
    }
    state.keys.replace(new);
    tracing::info!(resealed, by = %person(&state, &who.name), "secrets sealed under a new key");
    Ok(json_response(StatusCode::OK, &Rekeyed { resealed, key_file: key_file.map(|p| p.display().to_string()) }))
}

/// Writes a key file readable by its owner only, and syncs it.
fn write_key_file(path: &std::path::Path, key: &SecretKey) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| {
            f.write_all(format!("{}\n", hex::encode(key.bytes())).as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| format!("cannot write the new key to {}: {e}", path.display()))
}

pub fn rekey_doc(g: &mut DocGen) -> Op {
    Op::new("Seal every secret again under a new key.")
        .describe(
            "With a key file, the server makes the new key (or takes `key`), writes it beside the old one, \
             re-seals every secret in one transaction, then replaces the file. With `CIB_SECRET_KEY`, \
             `key` is required, and the variable must be set to it before the next start.",
        )
        .optional_body(g.schema::<RekeyBody>())
        .json(200, "Every secret is sealed under the new key.", g.schema::<Rekeyed>())
        .error(g, 422, "The new key is missing or malformed.")
        .error(g, 503, "The current key does not open the secrets, or the store failed.")
}
