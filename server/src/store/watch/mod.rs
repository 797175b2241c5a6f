//! `watch_model_store=true`: the model store, live. Every half second the store is
//! listed; [`policy::StoreWatch`] (pure) says what changed, and this module acts:
//!
//! - a new archive, once complete (unchanged for `model_store_settle_seconds`), is
//!   registered and loaded;
//! - one that is replaced (renamed over, or rewritten and settled) is loaded from the new
//!   file *before* the old model is dropped: requests keep going to the old one until the
//!   new one serves, so none sees a gap (the two are in memory together meanwhile);
//! - one that disappears is unregistered: new requests get 404 at once, requests already
//!   in flight are answered first, then it is unloaded.
//!
//! A bad archive is logged and shown on the status page, never fatal; it is tried again
//! when it changes.

pub mod policy;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::app::AppState;
use crate::error::Result;
use crate::lifecycle::loader::{self, LoadRequest};
use crate::lifecycle::model::ModelHandle;
use policy::{Change, FileKey, StoreWatch};

/// How often the store is listed.
pub const POLL: Duration = Duration::from_millis(500);

/// What the watcher reports (the status page shows it).
#[derive(Debug, Default)]
pub struct WatchReport {
    inner: Mutex<ReportInner>,
}

#[derive(Debug, Default, Clone)]
pub struct ReportInner {
    /// Archives that failed to register or replace, with why.
    pub problems: BTreeMap<String, String>,
    /// Archives waiting to settle.
    pub pending: Vec<String>,
}

impl WatchReport {
    pub fn snapshot(&self) -> ReportInner {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ReportInner)) {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// The store's archives and model folders with what identifies their current form.
pub fn listing(state: &AppState) -> Result<BTreeMap<String, FileKey>> {
    use std::os::unix::fs::MetadataExt;
    let mut listed = BTreeMap::new();
    for name in state.store().archives()? {
        let path = state.config().model_store.join(&name);
        // A model folder changes with its manifest.
        let file = if path.is_dir() {
            path.join(crate::store::manifest::MANIFEST_PATH)
        } else {
            path
        };
        if let Ok(meta) = std::fs::metadata(&file) {
            listed.insert(
                name,
                FileKey {
                    len: meta.len(),
                    modified: meta.modified().ok(),
                    inode: meta.ino(),
                },
            );
        }
    }
    Ok(listed)
}

/// Starts the watcher (a task of the runtime) from the store as it is now.
pub fn spawn(state: AppState) -> Result<()> {
    let settle = state.config().model_store_settle;
    let mut watch = StoreWatch::new(settle, listing(&state)?);
    tracing::info!(
        "watching the model store {} (settle {} s)",
        state.config().model_store.display(),
        settle.as_secs_f64()
    );
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let listed = {
                let state = state.clone();
                tokio::task::spawn_blocking(move || listing(&state)).await
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
            state.store_watch().update(|r| {
                r.pending = pending;
                r.problems.retain(|name, _| listed.contains_key(name));
            });
            for change in changes {
                apply(&state, change).await;
            }
        }
    });
    Ok(())
}

async fn apply(state: &AppState, change: Change) {
    let (url, result) = match change {
        Change::Added(url) => {
            tracing::info!(archive = %url, "appeared in the model store: registering it");
            let result = add(state, &url).await;
            (url, result)
        }
        Change::Replaced(url) => {
            tracing::info!(archive = %url, "changed in the model store: loading the new one before dropping the old");
            let result = replace(state, &url).await;
            (url, result)
        }
        Change::Removed(url) => {
            tracing::info!(archive = %url, "left the model store: unregistering its models");
            retire(state, from_archive(state, &url)).await;
            (url, Ok(()))
        }
    };
    match result {
        Ok(()) => state.store_watch().update(|r| {
            r.problems.remove(&url);
        }),
        Err(e) => {
            let why = e.chain();
            tracing::warn!(archive = %url, error = %why, "the model store's archive was not taken");
            state.store_watch().update(|r| {
                r.problems.insert(url, why);
            });
        }
    }
}

/// The registered models loaded from the store's archive `url`.
fn from_archive(state: &AppState, url: &str) -> Vec<Arc<ModelHandle>> {
    state
        .registry()
        .all()
        .into_iter()
        .filter(|m| m.spec.url == url)
        .collect()
}

async fn add(state: &AppState, url: &str) -> Result<()> {
    if !from_archive(state, url).is_empty() {
        // Registered by hand (or at start) already: a later change replaces it.
        return Ok(());
    }
    let request = LoadRequest {
        url: url.to_string(),
        ..LoadRequest::default()
    };
    loader::register(state, request, true).await.map(|_| ())
}

/// Loads `url` again into a new model, serves it, then retires the old ones.
async fn replace(state: &AppState, url: &str) -> Result<()> {
    let old = from_archive(state, url);
    if old.is_empty() {
        return add(state, url).await;
    }
    let request = LoadRequest {
        url: url.to_string(),
        ..LoadRequest::default()
    };
    let fresh = loader::load_apart(state, request).await?;
    let (name, version) = (fresh.spec.name.clone(), fresh.spec.version.clone());
    let mut retired = Vec::new();
    match state.registry().replace(fresh) {
        Some(same_version) => retired.push(same_version),
        None => state.registry().set_default(&name, &version)?,
    }
    // What else the old archive registered (another version, or another name).
    for model in old {
        if retired.iter().any(|r| Arc::ptr_eq(r, &model)) {
            continue;
        }
        match state
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
    retire(state, retired).await;
    Ok(())
}

/// Takes `models` out of the registry (if still there), waits for their requests in
/// flight, then unloads them.
async fn retire(state: &AppState, models: Vec<Arc<ModelHandle>>) {
    for model in &models {
        let (name, version) = (&model.spec.name, &model.spec.version);
        if let Ok(current) = state.registry().get(name, Some(version))
            && Arc::ptr_eq(&current, model)
        {
            // The default version goes last: move the default away first.
            if let Ok(versions) = state.registry().versions(name)
                && let Some(other) = versions.iter().find(|v| !Arc::ptr_eq(v, model))
            {
                let _ = state.registry().set_default(name, &other.spec.version);
            }
            let _ = state.registry().remove(name, Some(version));
        }
    }
    for model in models {
        let deadline = Instant::now() + model.spec.config.response_timeout;
        while model.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        model.unload().await;
        tracing::info!(model = %model.spec.name, version = %model.spec.version, "unregistered");
    }
}
