//! Carrying out the device manager's decisions: evicting models (the `restart`
//! strategy: unload, keeping them registered) and bringing an evicted model back when a
//! request arrives for it. The loader calls [`evict`] before building a model that
//! needs the room; the inference path calls [`ensure_serving`].

use std::sync::Arc;
use std::time::Duration;

use crate::app::AppState;
use crate::error::{Error, Result};
use crate::model::ModelHandle;

use super::policy::ModelKey;

/// Evicts `models` and waits until their memory is free (their queued requests are
/// answered and their workers joined first). Blocking.
pub fn evict(state: &AppState, models: &[ModelKey]) {
    for key in models {
        let Ok(model) = state.registry().get(&key.name, Some(&key.version)) else {
            continue; // unregistered meanwhile: its memory is going anyway
        };
        if let Some(retired) = model.evict() {
            tracing::info!(model = %key, "evicted to make room (restart: it reloads on its next request)");
            model.labels().evicted("restart");
            let _ = retired.join();
        }
    }
}

/// Returns once `model` serves, loading it again first if it was evicted (the request
/// waits, within `within`, as it would in the queue). A model loading for the first
/// time or failed is left as it is: submitting to it answers why.
pub async fn ensure_serving(
    state: &AppState,
    model: &Arc<ModelHandle>,
    within: Duration,
) -> Result<()> {
    let mut changes = model.changes();
    if !model.is_unloaded() {
        return Ok(());
    }
    if model.begin_reload() {
        let Some(source) = model.source().cloned() else {
            model.set_failed("it cannot be loaded again (no archive to build it from)".into());
            return Ok(());
        };
        model.labels().reloaded();
        tokio::spawn(crate::loader::load(
            state.clone(),
            model.clone(),
            source,
            None,
        ));
    }
    let waited = tokio::time::timeout(within, async {
        // Until it serves or fails (whoever reloads it says which).
        while !(model.is_ready() || model.failure().is_some()) {
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    match waited {
        Ok(()) => Ok(()),
        Err(_) => Err(Error::Timeout {
            model: model.spec.name.clone(),
            timeout: within,
        }),
    }
}
