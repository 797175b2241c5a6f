//! The management API, with TorchServe's paths and answers:
//! `GET /models` (paged), `GET /models/{name}[/{version}|/all]`, `POST /models?url=...`,
//! `PUT /models/{name}[/{version}]?min_worker=&max_worker=`,
//! `DELETE /models/{name}[/{version}]`, `PUT /models/{name}/{version}/set-default`.
//!
//! An unregistration answers once the model's queued jobs are answered, its workers
//! joined and its memory freed.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde_json::json;

use crate::app::AppState;
use crate::config::model_config::ModelConfigOverrides;
use crate::error::{Error, Result};
use crate::lifecycle::Origin;
use crate::lifecycle::loader::LoadRequest;

type Params = Query<BTreeMap<String, String>>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/models", get(list).post(register))
        .route(
            "/models/{name}",
            get(describe_default)
                .put(scale_default)
                .delete(unregister_all),
        )
        .route(
            "/models/{name}/{version}",
            get(describe_version)
                .put(scale_version)
                .delete(unregister_version),
        )
        .route("/models/{name}/{version}/set-default", put(set_default))
        .with_state(state)
}

/// A whole-number parameter as TorchServe's `NettyUtils.getIntParameter` reads it: a Java
/// `int`, signed; absent, empty or unparsable (`nan`, `1.5`, ` 1`, past 2³¹) is None,
/// the default.
fn int(params: &BTreeMap<String, String>, key: &str) -> Option<i32> {
    params.get(key).and_then(|v| v.parse().ok())
}

/// A parameter that only a positive (or, with `zero`, non-negative) value sets: a
/// negative one is TorchServe's "not set", the default.
fn count<T: TryFrom<i32>>(params: &BTreeMap<String, String>, key: &str, zero: bool) -> Option<T> {
    int(params, key)
        .filter(|&v| v > 0 || (zero && v == 0))
        .and_then(|v| T::try_from(v).ok())
}

/// A boolean parameter as Java's `Boolean.parseBoolean` reads it: "true" in any case is
/// true, anything else given is false.
fn flag(params: &BTreeMap<String, String>, key: &str, default: bool) -> bool {
    params
        .get(key)
        .map_or(default, |v| v.eq_ignore_ascii_case("true"))
}

fn status(code: StatusCode, message: String) -> Response {
    (code, axum::Json(json!({ "status": message }))).into_response()
}

/// An error answered in TorchServe's words, where its status or wording is not one of
/// [`Error`]'s: TorchServe's exception class as the type.
fn torchserve_error(code: StatusCode, kind: &str, message: String) -> Response {
    let body = json!({ "code": code.as_u16(), "type": kind, "message": message });
    (code, axum::Json(body)).into_response()
}

async fn list(State(state): State<AppState>, Query(params): Params) -> Result<Response> {
    // As TorchServe's ListModels: a limit above 100 or negative is 100; a negative
    // page token is 0.
    let limit = int(&params, "limit")
        .filter(|l| (0..=100).contains(l))
        .unwrap_or(100) as usize;
    let start = int(&params, "next_page_token").unwrap_or(0).max(0) as usize;
    let models = state.registry().defaults();
    let page: Vec<_> = models
        .iter()
        .skip(start)
        .take(limit)
        .map(|m| json!({"modelName": m.spec.name, "modelUrl": m.spec.url}))
        .collect();
    let mut body = json!({ "models": page });
    if start + limit < models.len() {
        body["nextPageToken"] = json!((start + limit).to_string());
    }
    Ok(axum::Json(body).into_response())
}

async fn describe_default(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response> {
    let model = state.registry().get(&name, None)?;
    Ok(axum::Json(vec![describe(&state, &model)]).into_response())
}

async fn describe_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response> {
    let models = if version == "all" {
        state.registry().versions(&name)?
    } else {
        vec![state.registry().get(&name, Some(&version))?]
    };
    let described: Vec<_> = models.iter().map(|m| describe(&state, m)).collect();
    Ok(axum::Json(described).into_response())
}

/// A model's description with what the device manager knows of it.
fn describe(
    state: &AppState,
    model: &crate::lifecycle::model::ModelHandle,
) -> crate::lifecycle::model::ModelDescription {
    let mut description = model.describe();
    description.last_used = state
        .devices()
        .last_used(&model.key())
        .map(crate::timestamp::rfc3339);
    description
}

async fn register(State(state): State<AppState>, Query(params): Params) -> Result<Response> {
    let Some(url) = params.get("url").cloned() else {
        return Err(Error::BadRequest("Parameter url is required.".into()));
    };
    if let Some(refused) = check_url(&state, &url) {
        return Ok(refused);
    }
    check_builtin(params.get("handler"), params.get("runtime"))?;
    let request = LoadRequest {
        url,
        name: params.get("model_name").filter(|n| !n.is_empty()).cloned(),
        handler: params
            .get("handler")
            .filter(|h| !h.is_empty())
            .and_then(|h| h.parse().ok()),
        overrides: ModelConfigOverrides {
            initial_workers: count(&params, "initial_workers", true),
            batch_size: count(&params, "batch_size", false),
            max_batch_delay_ms: count(&params, "max_batch_delay", true),
            response_timeout_s: count(&params, "response_timeout", false),
            startup_timeout_s: count(&params, "startup_timeout", false),
        },
        loaded_at_startup: false,
    };
    let synchronous = flag(&params, "synchronous", true);
    // `startup_timeout=0`: in TorchServe no worker answers within it.
    let no_time_to_start = int(&params, "startup_timeout") == Some(0);
    let model = state
        .lifecycle()
        .register(request, Origin::Http { synchronous })
        .await?;
    let (name, version) = (model.spec.name.clone(), model.spec.version.clone());
    let workers = model.spec.config.min_workers;
    Ok(if workers == 0 {
        // Sync or not, as TorchServe's `handleRegister` answers it.
        status(
            StatusCode::OK,
            format!(
                "Model \"{name}\" Version: {version} registered with 0 initial workers. Use scale \
                 workers API to add workers for the model."
            ),
        )
    } else if !synchronous {
        status(StatusCode::ACCEPTED, "Processing worker updates...".into())
    } else if no_time_to_start {
        // TorchServe's workers fail, and its `onError` unregisters the model.
        state.lifecycle().unregister(&name, Some(&version)).await?;
        torchserve_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            format!("Failed to start workers for model {name} version: {version}"),
        )
    } else {
        status(
            StatusCode::OK,
            format!(
                "Model \"{name}\" Version: {version} registered with {workers} initial workers"
            ),
        )
    })
}

/// TorchServe's answers to a `url` it does not register (`ModelArchive.downloadModel`),
/// where they are not Spillway's: an empty one (404), and a remote one whose file name is
/// already in the model store (500, before any download). Other remote URLs are refused
/// later (400), as Spillway downloads nothing.
fn check_url(state: &AppState, url: &str) -> Option<Response> {
    if url.is_empty() {
        return Some(torchserve_error(
            StatusCode::NOT_FOUND,
            "ModelNotFoundException",
            "empty url".into(),
        ));
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let path = url.split(['?', '#']).next().unwrap_or(url);
        let file = path.rsplit('/').next().unwrap_or("");
        if !file.is_empty() && state.config().model_store.join(file).exists() {
            return Some(torchserve_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerException",
                format!("Model file already exists {file}"),
            ));
        }
    }
    None
}

async fn scale_default(
    State(state): State<AppState>,
    Path(name): Path<String>,
    params: Params,
) -> Result<Response> {
    scale(state, &name, None, params)
}

async fn scale_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    params: Params,
) -> Result<Response> {
    scale(state, &name, Some(&version), params)
}

/// As TorchServe's `updateModelWorkers`: `min_worker` defaults to 1, `max_worker` to
/// `min_worker`, both signed; answered 202 unless `synchronous=true` (the workers start in
/// the background either way; a synchronous answer waits for them).
fn scale(
    state: AppState,
    name: &str,
    version: Option<&str>,
    Query(params): Params,
) -> Result<Response> {
    let min = int(&params, "min_worker").unwrap_or(1);
    let max = int(&params, "max_worker").unwrap_or(min);
    if max < min {
        return Err(Error::BadRequest(
            "max_worker cannot be less than min_worker.".into(),
        ));
    }
    let model = state.registry().get(name, version)?;
    let Ok(max) = usize::try_from(max) else {
        // TorchServe fails here too (500), removing workers down to index -1; this
        // changes nothing.
        return Ok(torchserve_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            format!("Failed to scale workers for model {name}: max_worker {max} is negative"),
        ));
    };
    model.scale(usize::try_from(min).unwrap_or(0), max)?;
    Ok(if flag(&params, "synchronous", false) {
        let mut message = format!("Workers scaled to {min} for model: {}", model.spec.name);
        if let Some(version) = version {
            message.push_str(&format!(", version: {version}"));
        }
        status(StatusCode::OK, message)
    } else {
        status(StatusCode::ACCEPTED, "Processing worker updates...".into())
    })
}

/// The runtimes a registration may name: TorchServe's archives say `python`, and
/// Spillway runs them with its own built-in handlers.
const RUNTIMES: [&str; 3] = ["python", "python3", "spillway"];

/// Spillway's handlers and runtime are built in: a registration naming another is
/// refused, rather than served by something the client did not ask for.
fn check_builtin(handler: Option<&String>, runtime: Option<&String>) -> Result<()> {
    if let Some(handler) = handler.filter(|h| !h.is_empty()) {
        handler
            .parse::<spillway_handlers::HandlerKind>()
            .map_err(|e| Error::BadRequest(format!("{e} (an archive's code is never run)")))?;
    }
    match runtime {
        Some(runtime) if !runtime.is_empty() && !RUNTIMES.contains(&runtime.as_str()) => {
            Err(Error::BadRequest(format!(
                "unknown runtime `{runtime}`; Spillway runs: {}",
                RUNTIMES.join(", ")
            )))
        }
        _ => Ok(()),
    }
}

async fn unregister_all(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response> {
    state.lifecycle().unregister(&name, None).await?;
    Ok(status(
        StatusCode::OK,
        format!("Model \"{name}\" unregistered"),
    ))
}

async fn unregister_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response> {
    // The default version cannot go while others stay: TorchServe's 403.
    let default = state.registry().get(&name, None)?;
    if default.spec.version == version && state.registry().versions(&name)?.len() > 1 {
        return Ok(torchserve_error(
            StatusCode::FORBIDDEN,
            "InvalidModelVersionException",
            format!("Cannot remove default version for model {name}"),
        ));
    }
    state.lifecycle().unregister(&name, Some(&version)).await?;
    Ok(status(
        StatusCode::OK,
        format!("Model \"{name}\" unregistered"),
    ))
}

async fn set_default(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response> {
    state.registry().set_default(&name, &version)?;
    Ok(status(
        StatusCode::OK,
        format!("Default version successfully updated for model \"{name}\" to \"{version}\""),
    ))
}
