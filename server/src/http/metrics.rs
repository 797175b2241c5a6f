//! `GET /metrics`: Prometheus text exposition of everything in `crate::telemetry::metrics`,
//! TorchServe's families as TorchServe prints them. As TorchServe's
//! `PrometheusMetricsRequestHandler`, it answers any path under `/metrics`, and
//! `?name[]=a&name[]=b` keeps only the samples named.

use std::collections::BTreeSet;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::app::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/metrics/{*rest}", get(render))
        .fallback(crate::http::error::unknown_endpoint)
        .with_state(state)
}

async fn render(
    State(state): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> impl IntoResponse {
    let names: BTreeSet<String> = params
        .into_iter()
        .filter(|(key, _)| key == "name[]")
        .map(|(_, name)| name)
        .collect();
    let models: Vec<_> = state
        .registry()
        .all()
        .iter()
        .filter_map(|m| m.sample())
        .collect();
    crate::telemetry::metrics::refresh(&models, &state.devices().pools());
    state.metrics().run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics::render(state.metrics(), (!names.is_empty()).then_some(&names)),
    )
}
