//! The inference API: `GET /ping` and `POST /predictions/{model}[/{version}]`.
//!
//! A prediction's body becomes the handler's request ([`predictions`]), is queued on the
//! model, and is awaited within the model's response timeout. If the client goes away first, this future is dropped,
//! which closes the job's reply channel, and the batcher drops the job unrun.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use spillway_handlers::Output;

use crate::app::{AppState, Health};
use crate::error::{Error, Result};
use crate::http::Body;
use crate::http::dispatch::Dispatch;
use crate::http::torchserve::predictions;

/// The predictions routes (guarded by the inference token when one is set).
pub fn predictions(state: AppState) -> Router {
    Router::new()
        .route("/predictions/{model}", post(predict_default))
        .route("/predictions/{model}/{version}", post(predict_version))
        .with_state(state)
}

/// `/ping`, never guarded: health probes carry no credentials.
pub fn health(state: AppState) -> Router {
    Router::new().route("/ping", get(ping)).with_state(state)
}

async fn ping(State(state): State<AppState>) -> Response {
    let (status, text) = match state.startup().health() {
        Health::Healthy => (StatusCode::OK, "Healthy"),
        Health::Loading => (StatusCode::SERVICE_UNAVAILABLE, "Loading"),
        Health::Unhealthy => (StatusCode::SERVICE_UNAVAILABLE, "Unhealthy"),
    };
    (status, axum::Json(json!({ "status": text }))).into_response()
}

async fn predict_default(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: Body,
) -> Response {
    predict(state, &model, None, body).await
}

async fn predict_version(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    body: Body,
) -> Response {
    predict(state, &model, Some(&version), body).await
}

async fn predict(state: AppState, name: &str, version: Option<&str>, Body(body): Body) -> Response {
    let dispatch = match Dispatch::to(&state, name, version) {
        Ok(dispatch) => dispatch,
        Err(e) => return e.into_response(),
    };
    let answer = async {
        let request = predictions::request(dispatch.model.spec.handler, body)?;
        dispatch.run(&state, request).await
    }
    .await;
    let response = answer
        .and_then(|answered| render(answered.output, state.config().max_response_size))
        .unwrap_or_else(IntoResponse::into_response);
    dispatch.record(response.status().as_u16());
    response
}

/// Serializes a handler output, within `max_response_size`.
fn render(output: Output, limit: usize) -> Result<Response> {
    let (content_type, bytes) = predictions::answer(output)?;
    if bytes.len() > limit {
        return Err(Error::Internal(format!(
            "response of {} bytes is larger than max_response_size ({limit} bytes)",
            bytes.len()
        )));
    }
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}
