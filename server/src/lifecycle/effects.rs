//! Carrying out the device manager's decisions: evicting models — `restart` (unload,
//! keep them registered) or `disk` (keep them loaded with their units streamed from
//! disk, a GPU unit then streamed to its GPU for each pass; `cpu`, keeping GPU units in
//! host RAM, is not built and falls back to `disk`) — and
//! bringing an evicted model back when a request arrives for it: reloading it, or
//! promoting its units. The loader calls [`evict`] before building a model that needs
//! the room; the inference path calls [`ensure_serving`].

use std::sync::Arc;
use std::time::Duration;

use crate::app::AppState;
use crate::config::OffloadStrategy;
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::model::ModelHandle;

use spillway_placement::ledger::Eviction;

/// The longest a disk-evicted model's promotion waits for its requests in flight.
const PROMOTE_AFTER: Duration = Duration::from_secs(1);

/// How long a reload that found no room (the models holding it busy) waits to try again.
const RETRY_ROOM: Duration = Duration::from_millis(50);

/// Evicts `models` by the configured strategy and waits until their memory is free (a
/// restarted model's queued requests are answered and its workers joined first).
/// Blocking.
pub fn evict(state: &AppState, evictions: &[Eviction]) {
    let strategy = state.config().devices.offload_strategy;
    for Eviction { model: key, unload } in evictions {
        let Ok(model) = state.registry().get(&key.name, Some(&key.version)) else {
            continue; // unregistered meanwhile: its memory is going anyway
        };
        if !unload
            && matches!(strategy, OffloadStrategy::Disk | OffloadStrategy::Cpu)
            && let Some(freed) = model.demote(state.devices())
        {
            tracing::info!(model = %key, freed, "evicted to disk: its units stream until its next request");
            model.labels().evicted("disk");
            continue;
        }
        if let Some(retired) = model.evict() {
            tracing::info!(model = %key, "evicted to make room (restart: it reloads on its next request)");
            model.labels().evicted("restart");
            let _ = retired.join();
        }
    }
    // Whichever thread let go of an evicted model's last reference, its memory goes
    // back to the OS before the model that needed the room is built.
    crate::devices::release_freed_memory();
}

/// `source`'s archive opened again as it is now (rewritten in place, or replaced by a
/// rename), which `model` is built from from now on. A failure fails the model until
/// its archive changes again.
async fn reopen(
    state: &AppState,
    model: &Arc<ModelHandle>,
    source: crate::lifecycle::loader::Source,
) -> Result<crate::lifecycle::loader::Source> {
    let (state, handler) = (state.clone(), model.spec.handler);
    let reopened = tokio::task::spawn_blocking(move || source.reopen(&state, handler))
        .await
        .map_err(|e| Error::Internal(format!("the reopening task failed: {e}")))
        .and_then(|r| r);
    match reopened {
        Ok(source) => {
            tracing::info!(model = %model.key(), "its archive changed: opened again");
            model.set_source(source.clone());
            Ok(source)
        }
        Err(e) => {
            // The request was fine; the model is what cannot serve (a 503, as for any
            // model that failed to load), until its archive changes again.
            let reason = format!("its archive changed and cannot be opened: {}", e.chain());
            tracing::error!(model = %model.key(), "{reason}");
            model.set_failed(reason.clone());
            Err(Error::NotReady {
                model: model.spec.name.clone(),
                state: reason,
            })
        }
    }
}

/// Returns once `model` serves: a model evicted by unloading is loaded again first (the
/// request waits, within `within`, as it would in the queue); one evicted to disk
/// serves at once from its streamed units while they are promoted back beside it. A
/// model loading for the first time or failed is left as it is: submitting to it
/// answers why.
pub async fn ensure_serving(
    state: &AppState,
    model: &Arc<ModelHandle>,
    within: Duration,
) -> Result<()> {
    let mut changes = model.changes();
    // A model whose weight files changed under it is loaded again from them as they are
    // now; one that failed to load is tried again once its archive changed.
    model.unload_if_weights_changed();
    model.retry_if_archive_changed();
    if model.is_demoted() {
        // The request is served at once from the streamed units. Their promotion back
        // starts once the requests in flight are answered (or after PROMOTE_AFTER under
        // steady load), so it does not compete with them for the cores; one request
        // starts it, the others find it running.
        let (state, promoting) = (state.clone(), model.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PROMOTE_AFTER;
            while promoting.in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let model = promoting.clone();
            let promoted = tokio::task::spawn_blocking(move || model.promote(&state)).await;
            if let Ok(Err(e)) = promoted {
                tracing::warn!(model = %promoting.spec.name, error = %e.chain(), "its units stay on disk");
            }
        });
        return Ok(());
    }
    if !model.is_unloaded() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if !model.begin_reload() {
            // Another request is reloading it: wait until it serves, fails, or stays
            // evicted (no room yet) — then this request may try the reload itself.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    model: model.spec.name.clone(),
                    timeout: within,
                });
            }
            wait_until(
                model,
                &mut changes,
                |m| m.is_ready() || m.failure().is_some() || m.is_unloaded(),
                left,
            )
            .await?;
            if !model.is_unloaded() {
                return Ok(());
            }
            tokio::time::sleep(RETRY_ROOM.min(left)).await;
            continue;
        }
        let Some(source) = model.source() else {
            model.set_failed("it cannot be loaded again (no archive to build it from)".into());
            return Ok(());
        };
        model.attempt();
        let source = match source.archive_changed() {
            true => reopen(state, model, source).await?,
            false => source,
        };
        model.labels().reloaded();
        // A task of its own: a request that stops waiting does not stop the load.
        let reload = tokio::spawn(crate::lifecycle::loader::load(
            state.clone(),
            model.clone(),
            source,
            None,
        ));
        match tokio::time::timeout_at(deadline, reload).await {
            Ok(Ok(Ok(()))) => return Ok(()),
            // No room while the models holding it are busy: it stays evicted, and the
            // request waits for room (up to its response timeout) as it would in a queue.
            Ok(Ok(Err(e))) if e.kind() == ErrorKind::InsufficientStorage => {
                model.set_unloaded();
                if tokio::time::Instant::now() + RETRY_ROOM >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(RETRY_ROOM).await;
            }
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(e)) => return Err(Error::Internal(format!("the reload task failed: {e}"))),
            Err(_) => {
                return Err(Error::Timeout {
                    model: model.spec.name.clone(),
                    timeout: within,
                });
            }
        }
    }
}

/// Waits, within `within`, until `done` holds for `model`, waking at its changes.
async fn wait_until(
    model: &ModelHandle,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    done: impl Fn(&ModelHandle) -> bool,
    within: Duration,
) -> Result<()> {
    let waited = tokio::time::timeout(within, async {
        while !done(model) {
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    waited.map_err(|_| Error::Timeout {
        model: model.spec.name.clone(),
        timeout: within,
    })
}
