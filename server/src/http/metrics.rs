//! `GET /metrics`: Prometheus text exposition of everything in `crate::telemetry::metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::app::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .with_state(state)
}

async fn render(State(state): State<AppState>) -> impl IntoResponse {
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
        state.metrics().render(),
    )
}
