//! `GET /devices` (on the management API): the device manager's pools — each managed
//! device's budget, what is used and free, and which model versions hold how much,
//! whether still loading, and when each was last used.

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::app::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/devices", get(pools))
        .with_state(state)
}

async fn pools(State(state): State<AppState>) -> impl IntoResponse {
    let settings = &state.config().devices;
    axum::Json(json!({
        "pools": state.devices().pools(),
        "offloadStrategy": settings.offload_strategy,
        "allowMultiplePerDevice": settings.allow_multiple_per_device,
    }))
}
