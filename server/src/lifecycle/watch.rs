//! The model store's watcher (`watch_model_store=true`), acted on: every half second
//! the store is listed (`store::watch::listing`); the pure `store::watch::policy` says
//! what changed, and this module carries it out through the lifecycle:
//!
//! - a new archive, once complete (unchanged for `model_store_settle_seconds`), is
//!   registered and loaded;
//! - one that is replaced (renamed over, or rewritten and settled) is loaded from the new
//!   file *before* the old model is dropped: requests keep going to the old one until the
//!   new one serves, so none sees a gap (the two are in memory together meanwhile, each
//!   under its own lease);
//! - one that disappears is unregistered: new requests get 404 at once, requests already
//!   in flight are answered first, then it is unloaded.
//!
//! A bad archive is logged and shown on the status page, never fatal; it is tried again
//! when it changes.

use std::sync::Arc;
use std::time::Instant;

use super::loader::LoadRequest;
use super::model::ModelHandle;
use super::{Lifecycle, Origin};
use crate::error::Result;
use crate::store::watch::policy::{Change, StoreWatch};
use crate::store::watch::{POLL, listing};

/// Starts the watcher (a task of the runtime) from the store as it is now.
pub fn spawn(lifecycle: Lifecycle) -> Result<()> {
    let settle = lifecycle.config().model_store_settle;
    let mut watch = StoreWatch::new(settle, listing(lifecycle.store())?);
    tracing::info!(
        "watching the model store {} (settle {} s)",
        lifecycle.config().model_store.display(),
        settle.as_secs_f64()
    );
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let listed = {
                let store = lifecycle.store().clone();
                tokio::task::spawn_blocking(move || listing(&store)).await
            };
            let listed = match listed {
                Ok(Ok(listed)) => listed,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e.chain(), "cannot list the model store");
                    continue;
                }
                Err(_) => continue,
            };
            let changes = watch.observe(Instant::now(), &listed);
            let pending: Vec<String> = watch.pending().map(str::to_string).collect();
            lifecycle.watch_report().update(|r| {
                r.pending = pending;
                r.problems.retain(|name, _| listed.contains_key(name));
            });
            for change in changes {
                apply(&lifecycle, change).await;
            }
        }
    });
    Ok(())
}

async fn apply(lifecycle: &Lifecycle, change: Change) {
    let (url, result) = match change {
        Change::Added(url) => {
            tracing::info!(archive = %url, "appeared in the model store: registering it");
            let result = add(lifecycle, &url).await;
            (url, result)
        }
        Change::Replaced(url) => {
            tracing::info!(archive = %url, "changed in the model store: loading the new one before dropping the old");
            let result = replace(lifecycle, &url).await;
            (url, result)
        }
        Change::Removed(url) => {
            tracing::info!(archive = %url, "left the model store: unregistering its models");
            retire(lifecycle, from_archive(lifecycle, &url)).await;
            (url, Ok(()))
        }
    };
    match result {
        Ok(()) => lifecycle.watch_report().update(|r| {
            r.problems.remove(&url);
        }),
        Err(e) => {
            let why = e.chain();
            tracing::warn!(archive = %url, error = %why, "the model store's archive was not taken");
            lifecycle.watch_report().update(|r| {
                r.problems.insert(url, why);
            });
        }
    }
}

/// The registered models loaded from the store's archive `url`.
fn from_archive(lifecycle: &Lifecycle, url: &str) -> Vec<Arc<ModelHandle>> {
    lifecycle
        .registry()
        .all()
        .into_iter()
        .filter(|m| m.spec.url == url)
        .collect()
}

async fn add(lifecycle: &Lifecycle, url: &str) -> Result<()> {
    if !from_archive(lifecycle, url).is_empty() {
        // Registered by hand (or at start) already: a later change replaces it.
        return Ok(());
    }
    let request = LoadRequest {
        url: url.to_string(),
        ..LoadRequest::default()
    };
    lifecycle
        .register(request, Origin::StoreWatch)
        .await
        .map(|_| ())
}

/// Loads `url` again into a new model, serves it, then retires the old ones.
async fn replace(lifecycle: &Lifecycle, url: &str) -> Result<()> {
    let old = from_archive(lifecycle, url);
    if old.is_empty() {
        return add(lifecycle, url).await;
    }
    let request = LoadRequest {
        url: url.to_string(),
        ..LoadRequest::default()
    };
    let fresh = lifecycle.load_apart(request).await?;
    let (name, version) = (fresh.spec.name.clone(), fresh.spec.version.clone());
    let mut retired = Vec::new();
    match lifecycle.registry().replace(fresh) {
        Some(same_version) => retired.push(same_version),
        None => lifecycle.registry().set_default(&name, &version)?,
    }
    // What else the old archive registered (another version, or another name).
    for model in old {
        if retired.iter().any(|r| Arc::ptr_eq(r, &model)) {
            continue;
        }
        match lifecycle
            .registry()
            .remove(&model.spec.name, Some(&model.spec.version))
        {
            Ok(removed) => retired.extend(removed),
            Err(e) => {
                tracing::warn!(model = %model.spec.name, error = %e.chain(), "the old version stays registered")
            }
        }
    }
    tracing::info!(model = %name, version = %version, archive = %url, "now serves the new archive");
    retire(lifecycle, retired).await;
    Ok(())
}

/// Takes `models` out of the registry (if still there), waits for their requests in
/// flight, then unloads them.
async fn retire(lifecycle: &Lifecycle, models: Vec<Arc<ModelHandle>>) {
    for model in &models {
        let (name, version) = (&model.spec.name, &model.spec.version);
        if let Ok(current) = lifecycle.registry().get(name, Some(version))
            && Arc::ptr_eq(&current, model)
        {
            // The default version goes last: move the default away first.
            if let Ok(versions) = lifecycle.registry().versions(name)
                && let Some(other) = versions.iter().find(|v| !Arc::ptr_eq(v, model))
            {
                let _ = lifecycle.registry().set_default(name, &other.spec.version);
            }
            let _ = lifecycle.registry().remove(name, Some(version));
        }
    }
    for model in models {
        model.idle_within(model.spec.config.response_timeout).await;
        model.unregister().await;
        tracing::info!(model = %model.spec.name, version = %model.spec.version, "unregistered");
    }
}
