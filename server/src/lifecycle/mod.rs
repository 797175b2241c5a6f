//! A model version's life, and the one place that changes it. [`Lifecycle`] owns what
//! a life touches — the settings, the model store, the [`registry`] of versions, the
//! device manager, and the loaded instances by lease — and its supervisor methods
//! (`supervisor`) carry out every transition: registering, loading, evicting, bringing
//! back, unregistering, and the store watcher's changes (`watch`).
//!
//! - [`phase`]: the pure transition function — a version's [`phase::Phase`] × an
//!   [`phase::Event`] → the next phase and the commands to carry out; property-tested.
//! - [`model`]: [`model::ModelHandle`], one registered version: its spec, its phase
//!   and, while it serves, its serving machinery.
//! - [`loader`]: how a model is built, step by step (open, admit, build).
//! - [`registry`]: registered versions by name, and each name's default.
//! - `supervisor`: the transitions carried out; the failure policy (README, "When a
//!   model fails") is written there once for every origin.
//! - `watch`: the model store's changes, acted on.
//!
//! Dependencies are handed in at construction; nothing here reaches for the HTTP
//! layer's shared state.

pub mod loader;
pub mod model;
pub mod phase;
pub mod registry;
mod supervisor;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use spillway_placement::ledger::ModelKey;

use crate::config::ServerConfig;
use crate::devices::manager::DeviceManager;
use crate::store::ModelStore;
use crate::store::watch::WatchReport;
use model::ModelHandle;
use registry::ModelRegistry;

pub use supervisor::Origin;

struct Inner {
    config: ServerConfig,
    store: ModelStore,
    registry: ModelRegistry,
    devices: DeviceManager,
    /// Every loaded instance by the id of its lease: an eviction names a lease, and
    /// reaches the instance that holds it — registered, or loading beside the one it
    /// replaces.
    instances: Mutex<BTreeMap<u64, Weak<ModelHandle>>>,
    /// What the model store's watcher reports (`watch_model_store`).
    watch_report: WatchReport,
}

/// The owner of every model version's life. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

impl Lifecycle {
    pub fn new(config: ServerConfig, devices: DeviceManager) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: ModelStore::new(&config.model_store),
                config,
                registry: ModelRegistry::default(),
                devices,
                instances: Mutex::default(),
                watch_report: WatchReport::default(),
            }),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &ModelStore {
        &self.inner.store
    }

    pub fn registry(&self) -> &ModelRegistry {
        &self.inner.registry
    }

    /// The device manager: who holds which device bytes.
    pub fn devices(&self) -> &DeviceManager {
        &self.inner.devices
    }

    /// What the model store's watcher reports.
    pub fn watch_report(&self) -> &WatchReport {
        &self.inner.watch_report
    }

    /// Whether `model` has requests in flight (any of its loaded instances).
    fn busy(&self, model: &ModelKey) -> bool {
        self.instances()
            .values()
            .filter_map(Weak::upgrade)
            .chain(self.registry().get(&model.name, Some(&model.version)).ok())
            .any(|m| m.key() == *model && m.in_flight() > 0)
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Weak<ModelHandle>>> {
        self.inner
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// `model` serves under `lease` from now on.
    fn serving_under(&self, lease: u64, model: &Arc<ModelHandle>) {
        let mut instances = self.instances();
        instances.retain(|_, m| m.strong_count() > 0);
        instances.insert(lease, Arc::downgrade(model));
    }

    /// The instance that serves under `lease`, if it still does.
    fn instance(&self, lease: u64) -> Option<Arc<ModelHandle>> {
        let model = self.instances().get(&lease)?.upgrade()?;
        (model.lease_id() == Some(lease)).then_some(model)
    }
}
