//! [`AppState`]: what every HTTP handler shares — the lifecycle (and through it the
//! settings, the model store, the registry and the device manager), the metrics handle
//! and start-up progress. One `Clone` struct around an `Arc`; only `http` (and `lib`'s
//! `run`) use it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::ServerConfig;
use crate::devices::manager::{DeviceManager, ManagerConfig};
use crate::lifecycle::Lifecycle;
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
    lifecycle: Lifecycle,
    metrics: PrometheusHandle,
    startup: StartupProgress,
}

/// Shared server state.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    pub fn new(config: ServerConfig, metrics: PrometheusHandle) -> Self {
        let devices = DeviceManager::new(ManagerConfig::from_settings(
            &config.devices,
            &crate::devices::probe(),
        ));
        Self {
            inner: Arc::new(Inner {
                lifecycle: Lifecycle::new(config, devices),
                metrics,
                startup: StartupProgress::default(),
            }),
        }
    }

    /// The owner of every model's life: registering, loading, evicting, unregistering.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.inner.lifecycle
    }

    pub fn config(&self) -> &ServerConfig {
        self.lifecycle().config()
    }

    pub fn store(&self) -> &ModelStore {
        self.lifecycle().store()
    }

    pub fn registry(&self) -> &ModelRegistry {
        self.lifecycle().registry()
    }

    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    pub fn startup(&self) -> &StartupProgress {
        &self.inner.startup
    }

    /// What the model store's watcher reports (`watch_model_store`).
    pub fn store_watch(&self) -> &crate::store::watch::WatchReport {
        self.lifecycle().watch_report()
    }

    /// The device manager: who holds which device bytes.
    pub fn devices(&self) -> &DeviceManager {
        self.lifecycle().devices()
    }
}
