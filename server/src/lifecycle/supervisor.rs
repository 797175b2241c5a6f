//! The supervisor: the only code that carries out a model version's transitions —
//! registering and loading it, evicting it to make room (`restart`: unloaded, kept
//! registered; `disk`: kept serving with its units streamed from disk; `cpu`, keeping
//! GPU units in host RAM, is not built and falls back to `disk`), bringing an evicted
//! model back when a request arrives, and unregistering it. Each transition goes through
//! the handle ([`ModelHandle`]), which asks the pure `phase::step`; what lies outside
//! the handle — the registry, the device manager's ledger, the instances by lease — is
//! done here.
//!
//! # The failure policy, one table for every origin
//! | failure | HTTP, synchronous | HTTP, asynchronous | start-up | store watcher | reload on a request |
//! |---|---|---|---|---|---|
//! | archive or config unreadable | answered 400 (404 not in the store), nothing registered | same | logged, `/ping` Unhealthy, nothing registered | on the status page, nothing registered; tried again when the file changes | the model FAILED (answers 503: a copy may still be under way) until its archive changes |
//! | a version already registered | 409, the ledger untouched | same | logged | the old one is replaced instead | — |
//! | no room now (busy models hold it) | 507, the ledger untouched | same | registered UNLOADED: loads on its first request | as HTTP | waits for room within the response timeout, then 507 |
//! | larger than the pools themselves | 400, the planner saying by how much (also a device request naming no such GPU) | same | registered FAILED | as HTTP | FAILED (400) |
//! | the build fails | unregistered again, answered with the class (400 archive, 507 memory, 500 fault) | FAILED with the class: its requests are answered so | FAILED | as HTTP, synchronous | FAILED with the class |
//! | past `startupTimeout` | unregistered again, 503 | FAILED: its requests answered 503 | FAILED | as HTTP, synchronous | 504 for the waiting request, FAILED |
//!
//! A FAILED model is loaded again on the first request after its archive changed
//! ([`ModelHandle::retry_if_archive_changed`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use spillway_handlers::weights::progress::{self, Progress};
use spillway_placement::ledger::Eviction;

use super::Lifecycle;
use super::loader::{self, LoadRequest, Opened, Source};
use super::model::ModelHandle;
use crate::config::OffloadStrategy;
use crate::devices::manager::Admission;
use crate::error::{Error, ErrorKind, Result};

/// The longest a disk-evicted model's promotion waits for its requests in flight.
const PROMOTE_AFTER: Duration = Duration::from_secs(1);

/// How long a reload that found no room (the models holding it busy) waits to try again.
const RETRY_ROOM: Duration = Duration::from_millis(50);

/// Where a registration comes from; the failure policy differs by origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `POST /models`: answered once the model serves (or failed), or at once.
    Http { synchronous: bool },
    /// A model named at start-up: it never evicts another; one that does not fit next
    /// to the others waits, unloaded, for its first request.
    Startup,
    /// The model store's watcher found a new archive.
    StoreWatch,
}

impl Lifecycle {
    /// Registers and loads a model as `origin` asks (see the failure policy above).
    pub async fn register(&self, request: LoadRequest, origin: Origin) -> Result<Arc<ModelHandle>> {
        let may_evict = origin != Origin::Startup;
        let (opened, admitted) = self.open_and_admit(request, may_evict).await?;
        let Opened { spec, source } = opened;
        let handle = ModelHandle::new(spec, Some(source.clone()));
        let admission = match admitted {
            Admitted::Now(admission) => admission,
            Admitted::Deferred => {
                handle.defer();
                self.registry().insert(handle.clone())?;
                tracing::info!(model = %handle.spec.name, "registered; it loads on its first request (the device pools are full)");
                return Ok(handle);
            }
            Admitted::Never(e) => {
                handle.load_failed(&e);
                self.registry().insert(handle.clone())?;
                tracing::error!(model = %handle.spec.name, error = %e.chain(), "registered FAILED: it does not fit the device pools");
                return Ok(handle);
            }
        };
        // A refused duplicate drops its admission here, and the ledger is as before.
        self.registry().insert(handle.clone())?;
        let load = self
            .clone()
            .load(handle.clone(), source, admission, may_evict);
        match origin {
            Origin::Http { synchronous: false } => {
                tokio::spawn(load);
            }
            // Start-up models load one after another; one that fails stays registered,
            // FAILED, saying why.
            Origin::Startup => load.await?,
            Origin::Http { synchronous: true } | Origin::StoreWatch => {
                if let Err(e) = load.await {
                    self.unregister(&handle.spec.name, Some(&handle.spec.version))
                        .await
                        .ok();
                    return Err(e);
                }
            }
        }
        Ok(handle)
    }

    /// Opens the archive and, where its tensors can be planned now, admits it (on the
    /// blocking pool, its long work logged as it goes). A version already registered
    /// is refused before anything is admitted.
    async fn open_and_admit(
        &self,
        request: LoadRequest,
        may_evict: bool,
    ) -> Result<(Opened, Admitted)> {
        let lifecycle = self.clone();
        tokio::task::spawn_blocking(move || {
            let progress = Progress::logged(request.url.clone());
            progress::with(&progress, || {
                let opened = loader::open(lifecycle.config(), lifecycle.store(), &request)?;
                let (name, version) = (&opened.spec.name, &opened.spec.version);
                if lifecycle.registry().get(name, Some(version)).is_ok() {
                    return Err(Error::Conflict(format!(
                        "Model version {version} is already registered for model {name}"
                    )));
                }
                if !opened.plans_at_registration() {
                    return Ok((opened, Admitted::Now(None)));
                }
                let key = spillway_placement::ledger::ModelKey {
                    name: name.clone(),
                    version: version.clone(),
                };
                let admitted = loader::admit(
                    &lifecycle,
                    &key,
                    opened.device_request(),
                    may_evict,
                    opened.files(),
                    &opened.spec.setup,
                    &opened.spec.config,
                );
                let admitted = match admitted {
                    Ok(Some(admission)) => Admitted::Now(Some(admission)),
                    Ok(None) => Admitted::Deferred,
                    // A start-up model is registered whatever happens to its plan, so
                    // its requests say why rather than 404.
                    Err(e) if !may_evict => Admitted::Never(e),
                    Err(e) => return Err(e),
                };
                Ok((opened, admitted))
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("archive task failed: {e}")))?
    }

    /// Opens and loads a model without registering it (the store watcher's replacement,
    /// registered once it serves).
    pub async fn load_apart(&self, request: LoadRequest) -> Result<Arc<ModelHandle>> {
        let lifecycle = self.clone();
        let opened = tokio::task::spawn_blocking(move || {
            loader::open(lifecycle.config(), lifecycle.store(), &request)
        })
        .await
        .map_err(|e| Error::Internal(format!("archive task failed: {e}")))??;
        let handle = ModelHandle::new(opened.spec, Some(opened.source.clone()));
        self.clone()
            .load(handle.clone(), opened.source, None, true)
            .await?;
        Ok(handle)
    }

    /// Builds `handle` on a blocking thread and starts its workers; on failure leaves it
    /// FAILED with the whole cause. `admission` is `None` where the model is admitted
    /// as it loads (a GGUF model, an evicted one coming back, a replacement), evicting
    /// others only if `may_evict` (else, finding no room, it waits UNLOADED).
    async fn load(
        self,
        handle: Arc<ModelHandle>,
        source: Source,
        admission: Option<Admission>,
        may_evict: bool,
    ) -> Result<()> {
        let started = Instant::now();
        let startup_timeout = handle.spec.config.startup_timeout;
        let building = {
            let (lifecycle, handle) = (self.clone(), handle.clone());
            tokio::task::spawn_blocking(move || {
                progress::with(handle.progress(), || {
                    loader::build(&lifecycle, &handle, source, admission, may_evict)
                })
            })
        };
        // Past startupTimeout the model fails; the build still running is left to
        // finish, and what it built (and leased) is dropped with it.
        let built = match tokio::time::timeout(startup_timeout, building).await {
            Ok(built) => built
                .map_err(|e| Error::Internal(format!("load task failed: {e}")))
                .and_then(|r| r),
            Err(_) => Err(Error::NotReady {
                model: handle.spec.name.clone(),
                state: format!(
                    "it did not load within its startup timeout ({} s; startupTimeout in \
                     model-config.yaml, or startup_timeout when registering)",
                    startup_timeout.as_secs()
                ),
            }),
        };
        let served = match built {
            Ok(None) => {
                handle.defer();
                tracing::info!(model = %handle.spec.name, "converted; it loads on its first request (the device pools are full)");
                return Ok(());
            }
            Ok(Some(loaded)) => handle.loaded(loaded, started.elapsed()),
            Err(e) => {
                handle.load_failed(&e);
                Err(e)
            }
        };
        match served {
            Ok(true) => {
                if let Some(lease) = handle.lease_id() {
                    self.serving_under(lease, &handle);
                }
                tracing::info!(
                    model = %handle.spec.name, version = %handle.spec.version,
                    "loaded in {:.3} s", started.elapsed().as_secs_f64()
                );
                Ok(())
            }
            Ok(false) => Err(Error::NotReady {
                model: handle.spec.name.clone(),
                state: "it was unregistered while it loaded".into(),
            }),
            Err(e) => {
                tracing::error!(model = %handle.spec.name, error = %e.chain(), "load failed");
                Err(e)
            }
        }
    }

    /// Unregisters one version, or (with `None`) every version of a model: new requests
    /// get 404 at once, queued ones are answered, then its memory is freed. A load
    /// still under way finds it gone and drops what it built.
    pub async fn unregister(&self, name: &str, version: Option<&str>) -> Result<()> {
        for model in self.registry().remove(name, version)? {
            model.unregister().await;
        }
        Ok(())
    }

    /// Evicts the instances `evictions` name by the configured strategy and waits until
    /// their memory is free (a restarted model's queued requests are answered and its
    /// workers joined first). An instance that left meanwhile is skipped: its memory is
    /// going anyway. A victim that became busy after it was chosen is still evicted:
    /// its requests in flight are answered before its memory goes. Blocking.
    pub(super) fn evict(&self, evictions: &[Eviction]) {
        let strategy = self.config().devices.offload_strategy;
        for Eviction {
            lease,
            model: key,
            unload,
        } in evictions
        {
            let Some(model) = self.instance(*lease) else {
                continue;
            };
            let to_disk =
                !unload && matches!(strategy, OffloadStrategy::Disk | OffloadStrategy::Cpu);
            let (retired, went_to_disk) = model.evict(to_disk, self.devices());
            if went_to_disk {
                model.labels().evicted("disk");
                continue;
            }
            if let Some(retired) = retired {
                tracing::info!(model = %key, "evicted to make room (restart: it reloads on its next request)");
                model.labels().evicted("restart");
                let _ = retired.join();
            }
        }
        // Whichever thread let go of an evicted model's last reference, its memory goes
        // back to the OS before the model that needed the room is built.
        crate::devices::release_freed_memory();
    }

    /// Brings a demoted model's units back, evicting what must leave for them first.
    /// Only one caller promotes; the others return at once. Blocking.
    fn promote(&self, model: &ModelHandle) -> Result<()> {
        let Some(promotion) = model.begin_promotion() else {
            return Ok(());
        };
        let held_before = model.with_lease(|lease| lease.bytes()).unwrap_or_default();
        let busy = |m: &spillway_placement::ledger::ModelKey| self.busy(m);
        let grown = model
            .with_lease(|lease| self.devices().grow(lease, promotion.target.clone(), &busy))
            .unwrap_or(Ok(Vec::new()));
        let give_back = || {
            model.with_lease(|lease| self.devices().resize(lease, held_before.clone()));
        };
        let evict = match grown {
            Ok(evict) => evict,
            Err(refusal) => {
                give_back();
                model.promoted(false);
                return Err(Error::NoRoom {
                    model: model.key().to_string(),
                    refusal,
                });
            }
        };
        self.evict(&evict);
        let started = Instant::now();
        let promoted = promotion.handler.units().map_or_else(
            || Ok(Vec::new()),
            |units| crate::devices::building_weights(|| units.promote()),
        );
        if promoted.is_err() {
            give_back();
        }
        model.promoted(promoted.is_ok());
        match promoted {
            Ok(_) => {
                model.labels().promoted(started.elapsed());
                Ok(())
            }
            Err(source) => Err(Error::Load {
                path: model.spec.url.clone().into(),
                source: Box::new(source),
            }),
        }
    }

    /// `model`'s archive opened again as it is now (rewritten in place, or replaced by
    /// a rename), which it is built from from now on. A failure fails the model until
    /// its archive changes again.
    async fn reopen(&self, model: &Arc<ModelHandle>, source: Source) -> Result<Source> {
        let (lifecycle, handler) = (self.clone(), model.spec.handler);
        let reopened =
            tokio::task::spawn_blocking(move || source.reopen(lifecycle.config(), handler))
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
                // Most often a copy still being written: the request was fine, and the
                // model cannot serve until its archive changes again (503, not the
                // archive's 400).
                let reason = format!("its archive changed and cannot be opened: {}", e.chain());
                tracing::error!(model = %model.key(), "{reason}");
                let e = Error::NotReady {
                    model: model.spec.name.clone(),
                    state: reason,
                };
                model.load_failed(&e);
                Err(e)
            }
        }
    }

    /// Returns once `model` serves: a model evicted by unloading is loaded again first (the
    /// request waits, within `within`, as it would in the queue); one evicted to disk
    /// serves at once from its streamed units while they are promoted back beside it. A
    /// model loading for the first time or failed is left as it is: submitting to it
    /// answers why.
    pub async fn ensure_serving(&self, model: &Arc<ModelHandle>, within: Duration) -> Result<()> {
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
            let (lifecycle, promoting) = (self.clone(), model.clone());
            tokio::spawn(async move {
                promoting.idle_within(PROMOTE_AFTER).await;
                let model = promoting.clone();
                let promoted = tokio::task::spawn_blocking(move || lifecycle.promote(&model)).await;
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
                let e = Error::Internal(
                    "it cannot be loaded again (no archive to build it from)".into(),
                );
                model.load_failed(&e);
                return Ok(());
            };
            model.attempt();
            let source = match source.archive_changed() {
                true => self.reopen(model, source).await?,
                false => source,
            };
            model.labels().reloaded();
            // A task of its own: a request that stops waiting does not stop the load.
            let reload = tokio::spawn(self.clone().load(model.clone(), source, None, true));
            match tokio::time::timeout_at(deadline, reload).await {
                Ok(Ok(Ok(()))) => return Ok(()),
                // No room while the models holding it are busy: it stays evicted, and the
                // request waits for room (up to its response timeout) as it would in a queue.
                Ok(Ok(Err(e))) if e.kind() == ErrorKind::InsufficientStorage => {
                    model.defer();
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
}

/// What admitting a model at registration decided.
enum Admitted {
    /// Admitted (or, `None`, admitted as it loads: a GGUF model, one without weights).
    Now(Option<Admission>),
    /// It fits only by evicting others, which its origin may not: it waits, unloaded.
    Deferred,
    /// It fits nowhere: registered FAILED with why (start-up models).
    Never(Error),
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
