//! Spillway: a TorchServe-compatible model server. This crate is the server: HTTP APIs,
//! configuration, the model store and archives, the registry, batching and workers.
//! Model code lives in `spillway-handlers`.
//!
//! # Layout
//! One folder a concern; dependencies point one way, `http` → `lifecycle` → `serving`,
//! `devices`, `store`, `config` (`telemetry`, `error` and `timestamp` are used by all):
//! - [`config`]: the server's settings (`config.properties`, flags, `SPILLWAY_*`) and a
//!   model's `model-config.yaml` and `setup_config.json`.
//! - [`store`]: the model store, archives and their manifests, models in the HF cache, and
//!   the store's watcher (`store::watch`).
//! - [`lifecycle`]: a model version's life — registration, loading, eviction, reloading,
//!   retiring — and the registry of versions.
//! - [`serving`]: a loaded model's job queue, batcher, worker threads and recent answers.
//! - [`devices`]: what the machine has, the device manager (pools, leases, the pure
//!   least-recently-used policy) and placement planning from tensor headers.
//! - [`http`]: the three listeners, one module per protocol, the one error → status map.
//! - [`telemetry`]: metrics (every name), log lines and request ids.
//! - [`cli`]: `spillway archive` and `spillway pull`.
//! - [`app`] (what HTTP handlers share), [`error`], [`shutdown`], [`timestamp`].
//!
//! A request, top to bottom: [`http`] (TorchServe's body becomes a handler `Request` in
//! `http::torchserve::predictions`) → `lifecycle::registry` (name and version →
//! `lifecycle::model::ModelHandle`) → `ModelHandle::submit` (tokenized once by the
//! handler's `prepare`, on the blocking pool) → the model's job queue →
//! `serving::batcher` → `serving::worker` (OS threads) → the handler → the typed answer
//! over a oneshot channel (and a generation's tokens over an event channel) → back to the
//! protocol's JSON.
//!
//! A model load, top to bottom (`lifecycle::loader`): [`store`] (the url stays inside the
//! store) → `store::archive` (checked; weights mapped) → `store::manifest`,
//! `config::model_config`, `config::setup_config` → for safetensors, planned and leased →
//! registered (LOADING) → in the background: a GGUF converted and then planned, offload
//! copies written, the handler built → workers start (READY). Retiring a model joins its
//! workers, then drops its weights and lease.
//!
//! Planning: `devices::placement` reads tensor headers and hands them, with the device
//! manager (`devices::manager`: pools, leases, least-recently-used eviction), to
//! `spillway-placement`; the plan is shown by describe and by `spillway plan`.

pub mod app;
pub mod cli;
pub mod config;
pub mod devices;
pub mod error;
pub mod fuzz_targets;
pub mod http;
#[cfg(test)]
mod layering_tests;
pub mod lifecycle;
pub mod serving;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod timestamp;

use std::future::Future;

use tokio::net::TcpListener;

use crate::app::AppState;
use crate::config::{ServerConfig, StartupModels};
use crate::error::{Error, Result};
use crate::lifecycle::loader::LoadRequest;

/// The three bound listeners. Binding is the caller's job, so tests can bind port 0.
pub struct Listeners {
    pub inference: TcpListener,
    pub management: TcpListener,
    pub metrics: TcpListener,
}

/// Where the three listeners are bound (the ports the OS chose, for port 0).
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub inference: std::net::SocketAddr,
    pub management: std::net::SocketAddr,
    pub metrics: std::net::SocketAddr,
}

impl Listeners {
    /// The bound addresses.
    pub fn addresses(&self) -> Result<Addresses> {
        let addr = |l: &TcpListener| l.local_addr().map_err(|e| Error::Internal(e.to_string()));
        Ok(Addresses {
            inference: addr(&self.inference)?,
            management: addr(&self.management)?,
            metrics: addr(&self.metrics)?,
        })
    }

    /// Binds the configured addresses.
    pub async fn bind(config: &ServerConfig) -> Result<Self> {
        let bind = |addr: std::net::SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|e| {
                Error::Internal(format!("cannot listen on {addr} for the {what} API: {e}"))
            })
        };
        Ok(Self {
            inference: bind(config.inference_address, "inference").await?,
            management: bind(config.management_address, "management").await?,
            metrics: bind(config.metrics_address, "metrics").await?,
        })
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets requests in flight
/// finish, and returns.
pub async fn run(
    config: ServerConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if !config.model_store.is_dir() {
        return Err(Error::BadRequest(format!(
            "the model store {} is not a folder (create it, or pass --model-store)",
            config.model_store.display()
        )));
    }
    if !spillway_handlers::cpu::threads::elementwise_ops_run_on_the_calling_thread() {
        tracing::warn!(
            "CANDLE_NUM_THREADS is not 1: candle's element-wise ops get a pool of their own, \
             which fights MKL's threads for the cores (the spillway binary sets it)"
        );
    }
    let state = AppState::new(config, telemetry::metrics::install());
    for (name, listener) in [
        ("Inference", &listeners.inference),
        ("Management", &listeners.management),
        ("Metrics", &listeners.metrics),
    ] {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        tracing::info!("{name} API listening on http://{addr}");
    }
    crate::devices::log_gpus();
    load_startup_models(&state)?;
    if state.config().watch_model_store {
        lifecycle::watch::spawn(state.lifecycle().clone())?;
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let limits = http::connections::ConnectionLimits {
        max_connections: state.config().max_connections,
        read_timeout: state.config().request_read_timeout,
    };
    let serve = |listener: TcpListener, router: axum::Router| {
        http::connections::serve(listener, router, limits, stop_rx.clone())
    };
    tokio::join!(
        serve(listeners.inference, http::inference_router(state.clone())),
        serve(listeners.management, http::management_router(state.clone())),
        serve(listeners.metrics, http::metrics_router(state.clone())),
    );
    tracing::info!("all requests answered; stopped");
    Ok(())
}

/// Starts loading the start-up models one after another in the background; `/ping`
/// reports Loading until they are all done.
fn load_startup_models(state: &AppState) -> Result<()> {
    let requests: Vec<LoadRequest> = match &state.config().startup_models {
        StartupModels::All => state
            .store()
            .archives()?
            .into_iter()
            .map(|url| LoadRequest {
                url,
                loaded_at_startup: true,
                ..LoadRequest::default()
            })
            .collect(),
        StartupModels::List(list) => list
            .iter()
            .map(|m| LoadRequest {
                url: m.url.clone(),
                name: m.name.clone(),
                loaded_at_startup: true,
                ..LoadRequest::default()
            })
            .collect(),
    };
    state.startup().expect(requests.len());
    let state = state.clone();
    tokio::spawn(async move {
        for request in requests {
            let url = request.url.clone();
            let result = state
                .lifecycle()
                .register(request, lifecycle::Origin::Startup)
                .await;
            if let Err(e) = &result {
                tracing::error!(archive = %url, "cannot load start-up model: {e}");
            }
            state.startup().finished(result.is_ok());
        }
    });
    Ok(())
}
