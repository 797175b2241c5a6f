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
use crate::http::dispatch::{Dispatch, event_stream};
use crate::http::torchserve::predictions;

/// The predictions routes (guarded by the inference token when one is set).
pub fn predictions(state: AppState) -> Router {
    Router::new()
        // PUT as well as POST: `curl -T kitten.jpg` uploads with PUT, as TorchServe's
        // quickstart sends it.
        .route(
            "/predictions/{model}",
            post(predict_default).put(predict_default),
        )
        .route(
            "/predictions/{model}/{version}",
            post(predict_version).put(predict_version),
        )
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
    let kind = dispatch.model.spec.handler;
    let prediction = match crate::http::multipart::parts(&body).await {
        Ok(Some(parts)) => predictions::from_parts(kind, parts),
        Ok(None) => predictions::request(kind, body),
        Err(e) => Err(e),
    };
    let prediction = match prediction {
        Ok(prediction) => prediction,
        Err(e) => {
            dispatch.record(e.kind().status().as_u16());
            return e.into_response();
        }
    };
    if prediction.stream {
        return stream(state, dispatch, prediction.request).await;
    }
    let response = dispatch
        .run(&state, prediction.request)
        .await
        .and_then(|answered| render(answered.output, state.config().max_response_size))
        .unwrap_or_else(IntoResponse::into_response);
    dispatch.record(response.status().as_u16());
    response
}

/// A generation streamed as TorchServe streams intermediate responses: chunked
/// transfer encoding, one line of JSON per token, the last one with the whole text
/// and its details. A failure before the first token is an ordinary error answer; one
/// after it is a last line `{"code", "type", "message"}`.
async fn stream(
    state: AppState,
    dispatch: Dispatch,
    request: spillway_handlers::Request,
) -> Response {
    let (events, received) = flume::unbounded();
    let submitted = match dispatch.queue(&state, request, Some(events)).await {
        Ok(submitted) => submitted,
        Err(e) => {
            dispatch.record(e.kind().status().as_u16());
            return e.into_response();
        }
    };
    dispatch.record(200);
    let chunks = event_stream(move |out| async move {
        // In flight (never evicted under it) until the stream ends.
        let _dispatch = dispatch;
        let mut finished = false;
        while let Ok(event) = received.recv_async().await {
            finished = matches!(event, spillway_handlers::GenerationEvent::Finished(_));
            let _ = out.send_async(predictions::stream_chunk(&event)).await;
            if finished {
                break;
            }
        }
        if !finished {
            let error = match submitted.answer.await {
                Ok(Err(e)) => e,
                _ => Error::Internal("the generation ended without finishing".into()),
            };
            let mut line = serde_json::to_vec(&error.body()).unwrap_or_default();
            line.push(b'\n');
            let _ = out.send_async(line).await;
        }
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
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
