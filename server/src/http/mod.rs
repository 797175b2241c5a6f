//! The three HTTP APIs, each its own router on its own listener: inference
//! (`/ping`, `/predictions/...`), management (`/models...`) and metrics (`/metrics`).
//!
//! - [`torchserve`]: TorchServe's inference API (health and predictions) and management
//!   API (register, describe, scale, unregister, set-default).
//! - [`openai`]: the OpenAI-compatible API (inference address).
//! - [`kserve`]: KServe's Open Inference Protocol v2 (inference address).
//! - [`rerank`]: `/rerank` (text-embeddings-inference's) and `/v1/rerank` (vLLM's,
//!   Jina's, Cohere's) over a cross-encoder (inference address).
//! - [`openapi`]: each API's description (`OPTIONS /`), as TorchServe answers it.
//! - [`dispatch`]: one request's way to its model, shared by every protocol.
//! - [`multipart`]: `multipart/form-data` bodies as named parts (TorchServe's `data`).
//! - [`metrics`]: Prometheus text.
//! - [`connections`]: accepting connections within limits (count, header time).
//! - [`devices`]: `GET /devices`, the device manager's pools (management API).
//! - [`status_page`]: `GET /`, the status page (management API).
//! - [`error`]: the one place where errors become statuses and JSON bodies.
//!
//! Bearer tokens, when configured, guard a whole API ([`require_token`]). Every request to
//! the inference and management APIs passes one edge layer ([`edge`]: its id and access
//! line, TorchServe's response counters, header and body limits, JSON error bodies).

pub mod connections;
pub mod devices;
pub mod dispatch;
pub mod error;
pub mod grammar;
pub mod kserve;
pub mod metrics;
pub mod multipart;
pub mod openai;
pub mod openapi;
pub mod rerank;
pub mod status_page;
pub mod torchserve;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use spillway_handlers::RawBody;

use crate::app::AppState;
use crate::error::Error;
use crate::telemetry::request_id::{self, RequestId};

pub fn inference_router(state: AppState) -> Router {
    let token = state.config().inference_token.clone();
    let limit = state.config().max_request_size;
    let json_protocols = openai::router(state.clone())
        .merge(kserve::router(state.clone()))
        .merge(rerank::router(state.clone()))
        .route_layer(middleware::from_fn(error::json_bodies_only));
    let mut routes = torchserve::inference::predictions(state.clone())
        .merge(json_protocols)
        .merge(openapi::router(
            openapi::Api::Inference,
            axum::routing::MethodRouter::new(),
        ));
    if state.config().kserve_v1 {
        routes = routes.merge(kserve::v1_router(state.clone()));
    }
    guarded(routes, token)
        .merge(torchserve::inference::health(state.clone()))
        .merge(kserve::health(state.clone()))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            Edge {
                limit,
                read_timeout: state.config().request_read_timeout,
            },
            edge,
        ))
}

pub fn management_router(state: AppState) -> Router {
    let token = state.config().management_token.clone();
    let limit = state.config().max_request_size;
    let read_timeout = state.config().request_read_timeout;
    guarded(
        torchserve::management::router(state.clone())
            .merge(devices::router(state.clone()))
            .merge(openapi::router(
                openapi::Api::Management,
                status_page::get(state),
            )),
        token,
    )
    .layer(middleware::from_fn_with_state(
        Edge {
            limit,
            read_timeout,
        },
        edge,
    ))
}

pub fn metrics_router(state: AppState) -> Router {
    metrics::router(state).layer(middleware::from_fn(count_response))
}

/// `/models/m/` routes as `/models/m`, as in TorchServe (applied before routing).
pub fn trim_trailing_slash(mut request: Request) -> Request {
    let path = request.uri().path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{trimmed}?{query}"),
            None => trimmed.to_string(),
        };
        let mut parts = request.uri().clone().into_parts();
        if let Ok(pq) = path_and_query.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    request
}

/// Health probes: left out of the access log (a probe every second would drown the
/// requests); counted in `Requests2XX`, as TorchServe counts them.
fn is_probe(path: &str) -> bool {
    matches!(path, "/ping" | "/v2/health/live" | "/v2/health/ready")
}

/// The limits [`edge`] applies: `max_request_size` and `request_read_timeout`.
#[derive(Debug, Clone, Copy)]
struct Edge {
    limit: usize,
    read_timeout: std::time::Duration,
}

/// What every request to the inference and management APIs goes through, outermost
/// first — one layer, since each `from_fn` layer clones the router behind it and boxes a
/// future for every request (five of them were a fifth of the echo path's CPU):
/// 1. its id (the client's `X-Request-Id` when it is a sane one, else a new one): the
///    request runs inside a `request{id=...}` span and as that request
///    ([`RequestId::scope`], which the model's queue reads), the answer carries the id in
///    `X-Request-Id`, and one access line is written per request;
/// 2. counted in TorchServe's `Requests2XX`/`4XX`/`5XX` ([`count`]);
/// 3. headers past `error::MAX_HEADER_BYTES`: 431;
/// 4. every error answer gets a JSON body in its API's shape (`error::json_errors`);
/// 5. the body read whole within `request_read_timeout` and `max_request_size`
///    (`error::read_body_within`).
async fn edge(State(edge): State<Edge>, request: Request, next: Next) -> Response {
    use tracing::Instrument;
    let id = RequestId::from_client(
        request
            .headers()
            .get(request_id::HEADER)
            .map(|v| v.as_bytes()),
    );
    let span = tracing::info_span!("request", id = %id);
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let started = std::time::Instant::now();
    let answer = async {
        let response = match error::headers_too_large(&request) {
            Some(refused) => refused,
            None => {
                let response =
                    match error::read_body_within(edge.limit, edge.read_timeout, request).await {
                        Ok(request) => next.run(request).await,
                        Err(refused) => refused,
                    };
                error::json_errors(edge.limit, &method, &path, response).await
            }
        };
        count(&response);
        response
    };
    let mut response = id.clone().scope(answer).instrument(span.clone()).await;
    if !is_probe(&path) {
        span.in_scope(|| {
            tracing::info!(
                target: crate::telemetry::logging::ACCESS,
                %method,
                %path,
                status = response.status().as_u16(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "answered"
            );
        });
    }
    if let Ok(value) = header::HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    response
}

/// Counts `response` in TorchServe's host-level status metrics, as TorchServe's
/// `NettyUtils.sendHttpResponse` counts every response of the three APIs, probes and
/// scrapes included.
fn count(response: &Response) {
    crate::telemetry::metrics::response(response.status().as_u16());
}

/// [`count`] for the metrics API: a scrape is counted once its text is made, so it shows
/// the scrapes before it.
async fn count_response(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    count(&response);
    response
}

fn guarded(router: Router, token: Option<String>) -> Router {
    let router = router.fallback(error::unknown_endpoint);
    match token {
        Some(token) => router.layer(middleware::from_fn_with_state(
            Arc::<str>::from(token),
            require_token,
        )),
        None => router,
    }
}

/// Rejects requests without `Authorization: Bearer <token>`.
async fn require_token(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        next.run(request).await
    } else {
        axum::response::IntoResponse::into_response(Error::Unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A request body read within `max_request_size`, with its content type.
pub struct Body(pub RawBody);

impl FromRequest<AppState> for Body {
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let limit = state.config().max_request_size;
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    Error::PayloadTooLarge { limit }
                } else {
                    Error::BadRequest(format!(
                        "cannot read the request body: {}",
                        rejection.body_text()
                    ))
                }
            })?;
        Ok(Body(RawBody {
            content_type,
            bytes: bytes.to_vec(),
        }))
    }
}
