//! [`AppState`]: what every HTTP handler shares — settings, the model store, the
//! registry, the device manager, the metrics handle and start-up progress. One `Clone` struct around an `Arc`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::ServerConfig;
use crate::devices::manager::DeviceManager;
use crate::lifecycle::registry::ModelRegistry;
use crate::store::ModelStore;

/// Progress of the models named at start-up (for `/ping`).
#[derive(Debug, Default)]
pub struct StartupProgress {
    pending: AtomicUsize,
    failed: AtomicBool,
}

/// The server's health as `/ping` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Loading,
    Unhealthy,
}

impl StartupProgress {
    pub fn expect(&self, models: usize) {
        self.pending.fetch_add(models, Ordering::SeqCst);
    }

    pub fn finished(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::SeqCst);
        }
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn health(&self) -> Health {
        if self.failed.load(Ordering::SeqCst) {
            Health::Unhealthy
        } else if self.pending.load(Ordering::SeqCst) > 0 {
            Health::Loading
        } else {
            Health::Healthy
        }
    }
}

struct Inner {
    config: ServerConfig,
    store: ModelStore,
    registry: ModelRegistry,
    metrics: PrometheusHandle,
    startup: StartupProgress,
    devices: DeviceManager,
    store_watch: crate::store::watch::WatchReport,
}

/// Shared server state.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    pub fn new(config: ServerConfig, metrics: PrometheusHandle) -> Self {
        let devices = DeviceManager::new(config.devices.manager_config(&crate::devices::probe()));
        Self {
            inner: Arc::new(Inner {
                store: ModelStore::new(&config.model_store),
                config,
                registry: ModelRegistry::default(),
                metrics,
                startup: StartupProgress::default(),
                devices,
                store_watch: Default::default(),
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

    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    pub fn startup(&self) -> &StartupProgress {
        &self.inner.startup
    }

    /// The device manager: who holds which device bytes.
    /// What the model store's watcher reports (`watch_model_store`).
    pub fn store_watch(&self) -> &crate::store::watch::WatchReport {
        &self.inner.store_watch
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.inner.devices
    }
}
