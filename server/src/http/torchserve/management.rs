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
use crate::error::{Error, Result};
use crate::loader::{self, LoadRequest};
use crate::model_config::ModelConfigOverrides;

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

fn number<T: std::str::FromStr>(params: &BTreeMap<String, String>, key: &str) -> Result<Option<T>> {
    params
        .get(key)
        .map(|v| {
            v.parse().map_err(|_| {
                Error::BadRequest(format!("parameter {key}=`{v}` is not a valid number"))
            })
        })
        .transpose()
}

fn flag(params: &BTreeMap<String, String>, key: &str, default: bool) -> Result<bool> {
    match params.get(key).map(|v| v.to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v == "true" => Ok(true),
        Some(v) if v == "false" => Ok(false),
        Some(v) => Err(Error::BadRequest(format!(
            "parameter {key}=`{v}` must be true or false"
        ))),
    }
}

fn status(code: StatusCode, message: String) -> Response {
    (code, axum::Json(json!({ "status": message }))).into_response()
}

async fn list(State(state): State<AppState>, Query(params): Params) -> Result<Response> {
    let limit = number::<usize>(&params, "limit")?.unwrap_or(100).max(1);
    let start = number::<usize>(&params, "next_page_token")?.unwrap_or(0);
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
fn describe(state: &AppState, model: &crate::model::ModelHandle) -> crate::model::ModelDescription {
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
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            Error::BadRequest(
                "parameter url is required: the archive's name in the model store".into(),
            )
        })?
        .clone();
    let request = LoadRequest {
        url,
        name: params.get("model_name").filter(|n| !n.is_empty()).cloned(),
        overrides: ModelConfigOverrides {
            initial_workers: number(&params, "initial_workers")?,
            batch_size: number(&params, "batch_size")?,
            max_batch_delay_ms: number(&params, "max_batch_delay")?,
            response_timeout_s: number(&params, "response_timeout")?,
        },
        loaded_at_startup: false,
    };
    let synchronous = flag(&params, "synchronous", false)?;
    let model = loader::register(&state, request, synchronous).await?;
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

fn scale(
    state: AppState,
    name: &str,
    version: Option<&str>,
    Query(params): Params,
) -> Result<Response> {
    let model = state.registry().get(name, version)?;
    let min = number::<usize>(&params, "min_worker")?.unwrap_or(model.spec.config.min_workers);
    let max = number::<usize>(&params, "max_worker")?
        .unwrap_or(min)
        .max(min);
    model.scale(min, max)?;
    Ok(status(
        StatusCode::OK,
        format!(
            "Workers scaled to {min} (max {max}) for model: {}",
            model.spec.name
        ),
    ))
}

async fn unregister_all(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response> {
    for model in state.registry().remove(&name, None)? {
        model.unload().await;
    }
    Ok(status(
        StatusCode::OK,
        format!("Model \"{name}\" unregistered"),
    ))
}

async fn unregister_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response> {
    for model in state.registry().remove(&name, Some(&version))? {
        model.unload().await;
    }
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
