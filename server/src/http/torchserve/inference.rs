//! The inference API: `GET /ping` and `POST /predictions/{model}[/{version}]`.
//!
//! A prediction's body becomes the handler's request ([`predictions`]), is queued on the
//! model, and is awaited within the model's response timeout. If the client goes away first, this future is dropped,
//! which closes the job's reply channel, and the batcher drops the job unrun.

use std::time::Instant;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use spillway_handlers::Output;

use crate::app::{AppState, Health};
use crate::devices::effects;
use crate::error::{Error, Result};
use crate::http::Body;
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
    let started = Instant::now();
    let model = match state.registry().get(name, version) {
        Ok(model) => model,
        Err(e) => return e.into_response(),
    };
    let _in_flight = model.begin_request();
    state.devices().touch(&model.key());
    let answer = async {
        let request = predictions::request(model.spec.handler, body)?;
        let timeout = model.spec.config.response_timeout;
        effects::ensure_serving(&state, &model, timeout).await?;
        let receiver = model.submit(request, None).await?;
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(output)) => output,
            // The job was dropped unanswered: its model was unloaded under it.
            Ok(Err(_)) => Err(Error::NotReady {
                model: model.spec.name.clone(),
                state: "it was unloaded before answering".into(),
            }),
            Err(_) => {
                model.labels().timed_out();
                Err(Error::Timeout {
                    model: model.spec.name.clone(),
                    timeout,
                })
            }
        }
    }
    .await;
    let response = answer
        .and_then(|output| render(output, state.config().max_response_size))
        .unwrap_or_else(IntoResponse::into_response);
    model
        .labels()
        .prediction(response.status().as_u16(), started.elapsed());
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
