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

/// A whole-number parameter, read leniently as TorchServe's request classes read them
/// (`NettyUtils.getIntParameter`): absent, empty or unparsable is None (the default);
/// so is a negative value, which TorchServe takes as "not set".
fn number<T: std::str::FromStr>(params: &BTreeMap<String, String>, key: &str) -> Option<T> {
    params.get(key).and_then(|v| v.trim().parse().ok())
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

async fn list(State(state): State<AppState>, Query(params): Params) -> Result<Response> {
    // As TorchServe's ListModels: a limit above 100 or negative is 100; a negative
    // page token is 0.
    let limit = number::<i64>(&params, "limit")
        .filter(|l| (0..=100).contains(l))
        .unwrap_or(100) as usize;
    let start = number::<i64>(&params, "next_page_token")
        .unwrap_or(0)
        .max(0) as usize;
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
    let url = params
        .get("url")
        .ok_or_else(|| {
            Error::BadRequest(
                "Parameter url is required: the archive's name in the model store".into(),
            )
        })?
        .clone();
    if url.is_empty() {
        // TorchServe looks the empty name up in the store, and finds nothing.
        return Err(Error::ModelNotFound(
            "Model not found in model store: ".into(),
        ));
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
            initial_workers: number(&params, "initial_workers"),
            batch_size: number(&params, "batch_size").filter(|&b| b > 0),
            max_batch_delay_ms: number(&params, "max_batch_delay"),
            response_timeout_s: number(&params, "response_timeout").filter(|&t| t > 0),
            startup_timeout_s: number(&params, "startup_timeout").filter(|&t| t > 0),
        },
        loaded_at_startup: false,
    };
    let synchronous = flag(&params, "synchronous", true);
    let model = state
        .lifecycle()
        .register(request, Origin::Http { synchronous })
        .await?;
    let spec = &model.spec;
    let workers = spec.config.min_workers;
    Ok(if synchronous {
        status(
            StatusCode::OK,
            format!(
                "Model \"{}\" Version: {} registered with {workers} initial workers",
                spec.name, spec.version
            ),
        )
    } else {
        status(
            StatusCode::ACCEPTED,
            format!(
                "Model \"{}\" Version: {} registered with {workers} initial workers; loading in the \
                 background (GET /models/{} shows its status)",
                spec.name, spec.version, spec.name
            ),
        )
    })
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
/// `min_worker`; answered 202 unless `synchronous=true` (the workers start in the
/// background either way; a synchronous answer waits for them).
fn scale(
    state: AppState,
    name: &str,
    version: Option<&str>,
    Query(params): Params,
) -> Result<Response> {
    let model = state.registry().get(name, version)?;
    let min = number::<usize>(&params, "min_worker").unwrap_or(1);
    let max = number::<usize>(&params, "max_worker").unwrap_or(min);
    if max < min {
        return Err(Error::BadRequest(
            "max_worker cannot be less than min_worker.".into(),
        ));
    }
    model.scale(min, max)?;
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
    state.lifecycle().unregister(&name, Some(&version)).await?;
    Ok(status(
        StatusCode::OK,
        format!("Model \"{name}\" version {version} unregistered"),
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
