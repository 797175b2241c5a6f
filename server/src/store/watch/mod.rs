//! `watch_model_store=true`: the model store, live. Every half second the store is
//! listed ([`listing`]); [`policy::StoreWatch`] (pure) says what changed, and the
//! lifecycle (`lifecycle::watch`) acts:
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
use std::sync::Mutex;
use std::time::Duration;

use crate::error::Result;
use crate::store::{FileKey, ModelStore};

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

    pub fn update(&self, f: impl FnOnce(&mut ReportInner)) {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// The store's archives and model folders with what identifies their current form.
pub fn listing(store: &ModelStore) -> Result<BTreeMap<String, FileKey>> {
    let mut listed = BTreeMap::new();
    for name in store.archives()? {
        if let Some(key) = crate::store::archive_key(&store.root().join(&name)) {
            listed.insert(name, key);
        }
    }
    Ok(listed)
}
