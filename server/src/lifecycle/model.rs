//! [`ModelHandle`]: one registered model version — what it is (name, version, archive,
//! configs), where it is in its life (loading and at which stage, ready, failed, or
//! registered but unloaded), and when ready, its plan, its lease on device bytes, its
//! job queue, batcher and workers. Requests reach the model only through
//! [`ModelHandle::submit`].
//!
//! A model stops serving by being *retired*: its job queue closes, the queued jobs are
//! still run, its worker threads are joined, and only then are its handler (the
//! weights) and its lease dropped — so a released lease means the memory is free.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use spillway_handlers::{EventSender, Handler, HandlerInfo, HandlerKind, Output, Request};
use tokio::sync::oneshot;

use crate::app::AppState;
use crate::config::model_config::ModelConfig;
use crate::config::setup_config::SetupConfig;
use crate::devices::manager::{DeviceBytes, DeviceManager, Lease, demoted_bytes, held_by};
use crate::error::{Error, Result};
use crate::lifecycle::loader::{Loaded, Source};
use crate::serving::batcher::{self, BatchPolicy, IdleWorkers, Job};
use crate::serving::worker::{WorkerInfo, WorkerPool};
use crate::store::archive::ArchiveFormat;
use crate::telemetry::metrics::{ModelLabels, ModelSample};
use spillway_placement::ledger::ModelKey;

/// A queued request: where its answer will arrive, and how many tokens its input
/// holds (for usage reports).
#[derive(Debug)]
pub struct Submitted {
    pub answer: oneshot::Receiver<Result<Output>>,
    pub input_tokens: usize,
}

/// What a model is, fixed at registration.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub version: String,
    /// The store-relative archive name it was registered from.
    pub url: String,
    pub handler: HandlerKind,
    pub format: ArchiveFormat,
    pub config: ModelConfig,
    pub setup: SetupConfig,
    pub job_queue_size: usize,
    pub loaded_at_startup: bool,
}

/// Where a model is in its life.
enum State {
    /// Registered, its weights not loaded (unloaded, or evicted to make room).
    Unloaded,
    Loading(LoadStage),
    Ready(Box<Serving>),
    Failed(String),
}

/// What a loading model is doing now (shown by describe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadStage {
    /// Registered; the slow part has not started yet.
    Queued,
    /// Converting a GGUF checkpoint into the offload folder.
    Converting,
    /// Planning where each unit lives and leasing its device bytes.
    Planning,
    /// Waiting for the models evicted to make room to give their memory back.
    Evicting,
    /// Writing disk units in the serving dtype to the offload folder.
    Offloading,
    /// Reading the weights and building the handler.
    Building,
}

impl LoadStage {
    fn describe(self) -> &'static str {
        match self {
            LoadStage::Queued => "about to start",
            LoadStage::Converting => "converting its GGUF weights",
            LoadStage::Planning => "planning its placement",
            LoadStage::Evicting => "waiting for the models it evicts to leave",
            LoadStage::Offloading => "writing its disk units to the offload folder",
            LoadStage::Building => "reading its weights",
        }
    }
}

/// Bytes over every device.
fn total(bytes: &DeviceBytes) -> u64 {
    bytes.values().sum()
}

/// A loaded model's serving machinery.
struct Serving {
    handler: Arc<dyn Handler>,
    jobs: flume::Sender<Job>,
    pool: Mutex<WorkerPool>,
    plan: Option<spillway_placement::Plan>,
    lease: Option<Lease>,
    /// Its resident units are streamed from disk (the `disk` eviction) until promoted.
    demoted: AtomicBool,
    /// A request is bringing the demoted units back.
    promoting: AtomicBool,
    loaded_at: SystemTime,
    load_time: Duration,
}

impl Serving {
    /// Starts retiring: the job queue closes (when `self` drops, right after), queued
    /// jobs still run, and a thread joins the workers, then drops the handler and the
    /// lease. The returned handle finishes when all that is done.
    fn retire(&mut self) -> std::thread::JoinHandle<()> {
        let workers = self
            .pool
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .retire();
        let handler = self.handler.clone();
        let lease = self.lease.take();
        std::thread::spawn(move || {
            for worker in workers {
                let _ = worker.join();
            }
            drop(handler);
            crate::devices::release_freed_memory();
            drop(lease);
        })
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        // Retired in the background; `ModelHandle::unload` waits for it instead.
        let _detached = self.retire();
    }
}

/// One registered model version. Shared as `Arc<ModelHandle>`; when the registry and
/// every in-flight request have let go, the job queue closes and the workers stop.
pub struct ModelHandle {
    pub spec: ModelSpec,
    /// What it is built from, to build it again after an eviction (`None` for a model
    /// made in a test); replaced when its archive changed and was opened again.
    source: Mutex<Option<Source>>,
    /// The archive key ([`crate::lifecycle::loader::archive_key`]) its last load started from: a
    /// model that failed is tried again only once its archive changed since.
    attempted: Mutex<Option<String>>,
    labels: ModelLabels,
    /// The last minute of its answers (describe's `recent`, the status page).
    recent: crate::serving::recent::RecentAnswers,
    /// Its load's long work (conversions, offload copies) while it goes on.
    progress: Arc<spillway_handlers::weights::progress::Progress>,
    state: RwLock<State>,
    /// Bumped at every change of state, for requests waiting for an evicted model.
    changes: tokio::sync::watch::Sender<u64>,
    /// Requests between arriving and being answered.
    in_flight: AtomicUsize,
}

/// A request in flight on a model (see [`ModelHandle::begin_request`]); it may outlive
/// the handler that began it (a streamed answer).
pub struct InFlight(Arc<ModelHandle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The describe API's view of a model.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelDescription {
    pub model_name: String,
    pub model_version: String,
    pub model_url: String,
    pub runtime: &'static str,
    pub handler: HandlerKind,
    pub status: String,
    /// What a LOADING model is doing now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loading_stage: Option<LoadStage>,
    /// Bytes done of the long step under way while LOADING (a conversion, an offload copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loading_progress: Option<spillway_handlers::weights::progress::Snapshot>,
    /// Where its weights are: "resident", "disk" (evicted to disk: its units stream
    /// until promoted) or "unloaded".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_state: Option<&'static str>,
    pub min_workers: usize,
    pub max_workers: usize,
    pub batch_size: usize,
    pub max_batch_delay: u128,
    pub response_timeout: u64,
    pub job_queue_size: usize,
    /// Jobs waiting in the queue now (while serving).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<usize>,
    pub loaded_at_startup: bool,
    /// When a request last asked for it (while it holds device memory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    pub archive_format: ArchiveFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_time_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<HandlerInfo>,
    pub setup_config: SetupConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<spillway_placement::Plan>,
    pub workers: Vec<WorkerInfo>,
    /// Its answers over the last minute: rate and latency percentiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recent: Option<crate::serving::recent::RecentSummary>,
}

impl ModelHandle {
    pub fn new(spec: ModelSpec, source: Option<Source>) -> Arc<Self> {
        let attempted = source
            .as_ref()
            .and_then(|s| crate::lifecycle::loader::archive_key(s.path()));
        Arc::new(Self {
            labels: ModelLabels::new(&spec.name, &spec.version),
            recent: crate::serving::recent::RecentAnswers::default(),
            progress: spillway_handlers::weights::progress::Progress::logged(format!(
                "{}/{}",
                spec.name, spec.version
            )),
            spec,
            source: Mutex::new(source),
            attempted: Mutex::new(attempted),
            state: RwLock::new(State::Loading(LoadStage::Queued)),
            changes: tokio::sync::watch::Sender::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// The device manager's name for it.
    pub fn key(&self) -> ModelKey {
        ModelKey {
            name: self.spec.name.clone(),
            version: self.spec.version.clone(),
        }
    }

    /// What it is built from.
    pub fn source(&self) -> Option<Source> {
        self.source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Builds it from `source` from now on (its archive, opened again).
    pub fn set_source(&self, source: Source) {
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Notes that a load starts from the archive as it is now.
    pub fn attempt(&self) {
        let now = self
            .source()
            .and_then(|s| crate::lifecycle::loader::archive_key(s.path()));
        *self.attempted.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// A serving model whose mapped weight files were truncated or rewritten underneath
    /// ([`Handler::weights_changed`]) stops serving: it is unloaded, to be loaded again
    /// from its archive as it is now by the next request. Its requests in flight are
    /// answered 503 by their workers. True when it was unloaded here.
    pub fn unload_if_weights_changed(&self) -> bool {
        let changed = match &*self.state() {
            State::Ready(serving) => serving.handler.weights_changed(),
            _ => None,
        };
        let Some(why) = changed else {
            return false;
        };
        tracing::warn!(model = %self.key(), error = %why, "unloaded: its weights changed under it; the next request loads it again");
        self.labels.weights_changed();
        self.evict().is_some()
    }

    /// A model that failed to load is made loadable again (unloaded) once its archive
    /// changed since the load that failed: the file being copied in when it was read
    /// is complete now, or was fixed. True when it was.
    pub fn retry_if_archive_changed(&self) -> bool {
        if self.failure().is_none() {
            return false;
        }
        let Some(source) = self.source() else {
            return false;
        };
        let now = crate::lifecycle::loader::archive_key(source.path());
        let attempted = self.attempted.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_none() || now == *attempted {
            return false;
        }
        drop(attempted);
        let mut state = self.state_mut();
        if !matches!(*state, State::Failed(_)) {
            return false;
        }
        *state = State::Unloaded;
        drop(state);
        tracing::info!(model = %self.key(), "its archive changed since its load failed: it is loaded again on this request");
        self.changed();
        true
    }

    /// Counts a request as in flight until the guard drops: a model with requests in
    /// flight is never evicted.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Notified at every change of state.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Whether it is registered but not loaded (evicted, or waiting for its first
    /// request).
    pub fn is_unloaded(&self) -> bool {
        matches!(*self.state(), State::Unloaded)
    }

    /// Registered without loading: it loads on its first request.
    pub fn set_unloaded(&self) {
        *self.state_mut() = State::Unloaded;
        self.changed();
    }

    /// UNLOADED → LOADING, for the one caller that then reloads it; false for everyone
    /// else (already loading, serving, or failed).
    pub fn begin_reload(&self) -> bool {
        let mut state = self.state_mut();
        if matches!(*state, State::Unloaded) {
            *state = State::Loading(LoadStage::Queued);
            drop(state);
            self.changed();
            true
        } else {
            false
        }
    }

    pub fn labels(&self) -> &ModelLabels {
        &self.labels
    }

    pub fn recent(&self) -> &crate::serving::recent::RecentAnswers {
        &self.recent
    }

    pub fn progress(&self) -> &Arc<spillway_handlers::weights::progress::Progress> {
        &self.progress
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the state
        // itself is always a complete value.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells describe what the load is doing now (ignored unless loading).
    pub fn set_stage(&self, stage: LoadStage) {
        let mut state = self.state_mut();
        if let State::Loading(_) = *state {
            *state = State::Loading(stage);
        }
        drop(state);
        self.changed();
    }

    /// Starts the batcher and workers around a loaded model. Must run inside the tokio
    /// runtime (the batcher is a task).
    pub fn set_ready(&self, loaded: Loaded, load_time: Duration) -> Result<()> {
        let Loaded {
            handler,
            plan,
            lease,
        } = loaded;
        let (jobs_tx, jobs_rx) = flume::bounded(self.spec.job_queue_size);
        // A rendezvous channel: a batch is handed over only when a worker takes it, so
        // jobs keep gathering in the queue (and join the next batch) while all are busy.
        let (batch_tx, batch_rx) = flume::bounded(0);
        let idle = Arc::new(IdleWorkers::default());
        let policy = BatchPolicy {
            batch_size: self.spec.config.batch_size,
            max_batch_delay: self.spec.config.max_batch_delay,
            max_batch_tokens: self.spec.config.max_batch_tokens,
        };
        let continuous = self
            .spec
            .config
            .continuous_batching
            .then_some(policy.batch_size);
        if continuous.is_some() && handler.step_batch().is_none() {
            tracing::warn!(
                model = %self.spec.name,
                "continuousBatching is set but this handler runs whole batches; ignored"
            );
        }
        let mut pool = WorkerPool::new(
            handler.clone(),
            batch_rx,
            idle.clone(),
            self.labels.clone(),
            continuous,
            self.spec.config.threads_per_worker,
        );
        pool.scale(self.spec.config.min_workers, self.spec.config.max_workers)?;
        tokio::spawn(batcher::run(
            jobs_rx,
            batch_tx,
            policy,
            idle,
            self.labels.clone(),
        ));
        self.labels.loaded(load_time);
        if let Some(plan) = &plan {
            self.labels.placed(plan);
        }
        if let Some(lease) = &lease {
            lease.settle();
        }
        *self.state_mut() = State::Ready(Box::new(Serving {
            handler,
            jobs: jobs_tx,
            pool: Mutex::new(pool),
            plan,
            lease,
            demoted: AtomicBool::new(false),
            promoting: AtomicBool::new(false),
            loaded_at: SystemTime::now(),
            load_time,
        }));
        self.changed();
        Ok(())
    }

    /// Stops serving and frees the model's memory, keeping it registered (UNLOADED):
    /// jobs already queued are answered, then the workers are joined and the weights
    /// and lease dropped. Returns when all that is done.
    pub async fn unload(&self) {
        if let Some(retired) = self.evict() {
            let _ = tokio::task::spawn_blocking(move || retired.join()).await;
        }
    }

    /// The `disk` eviction: its resident units are streamed from their mapping from now
    /// on and its lease shrinks to what streaming needs. The bytes given back; `None`
    /// when it is not serving or its handler cannot demote (then it is evicted by
    /// restarting instead).
    pub fn demote(&self, devices: &DeviceManager) -> Option<u64> {
        let state = self.state();
        let State::Ready(serving) = &*state else {
            return None;
        };
        let (Some(plan), Some(lease)) = (&serving.plan, &serving.lease) else {
            return None;
        };
        if serving.demoted.load(Ordering::SeqCst) {
            return None; // already on disk: evicting it again means restarting it
        }
        let units = serving.handler.units()?.demote();
        crate::devices::release_freed_memory();
        let before = total(&lease.bytes());
        devices.resize(lease, demoted_bytes(plan, &units));
        lease.set_demoted(true);
        let after = total(&lease.bytes());
        serving.demoted.store(true, Ordering::SeqCst);
        drop(state);
        self.changed();
        Some(before.saturating_sub(after))
    }

    /// Whether it serves with its units demoted to disk.
    pub fn is_demoted(&self) -> bool {
        matches!(&*self.state(), State::Ready(s) if s.demoted.load(Ordering::SeqCst))
    }

    /// Brings a demoted model's units back, evicting what must leave for them first.
    /// Only one caller promotes; the others return at once (and wait for `changes`).
    /// Blocking.
    pub fn promote(&self, state: &AppState) -> Result<()> {
        let (handler, held_before, evictions) = {
            let guard = self.state();
            let State::Ready(serving) = &*guard else {
                return Ok(());
            };
            let (Some(plan), Some(lease)) = (&serving.plan, &serving.lease) else {
                return Ok(());
            };
            if !serving.demoted.load(Ordering::SeqCst)
                || serving.promoting.swap(true, Ordering::SeqCst)
            {
                return Ok(());
            }
            let registry = state.registry();
            let busy = |m: &ModelKey| {
                registry
                    .get(&m.name, Some(&m.version))
                    .is_ok_and(|h| h.in_flight() > 0)
            };
            let before = lease.bytes();
            let grown = state.devices().grow(lease, held_by(plan), &busy);
            (serving.handler.clone(), before, grown)
        };
        // Done either way: promoted, or left demoted with its lease as it was.
        let finish = |promoted: bool| {
            if let State::Ready(serving) = &*self.state() {
                if let Some(lease) = &serving.lease {
                    lease.settle();
                }
                if promoted {
                    serving.demoted.store(false, Ordering::SeqCst);
                    if let Some(lease) = &serving.lease {
                        lease.set_demoted(false);
                    }
                } else if let Some(lease) = &serving.lease {
                    state.devices().resize(lease, held_before.clone());
                }
                serving.promoting.store(false, Ordering::SeqCst);
            }
            self.changed();
        };
        let evict = match evictions {
            Ok(evict) => evict,
            Err(refusal) => {
                finish(false);
                return Err(Error::NoRoom {
                    model: self.key().to_string(),
                    refusal,
                });
            }
        };
        crate::lifecycle::effects::evict(state, &evict);
        let started = std::time::Instant::now();
        let promoted = handler.units().map_or_else(
            || Ok(Vec::new()),
            |units| crate::devices::building_weights(|| units.promote()),
        );
        finish(promoted.is_ok());
        match promoted {
            Ok(_) => {
                self.labels.promoted(started.elapsed());
                Ok(())
            }
            Err(source) => Err(Error::Load {
                path: self.spec.url.clone().into(),
                source: Box::new(source),
            }),
        }
    }

    /// [`ModelHandle::unload`] without waiting: the returned thread finishes once the
    /// memory is free. `None` when it was not serving.
    pub fn evict(&self) -> Option<std::thread::JoinHandle<()>> {
        let mut state = self.state_mut();
        let State::Ready(_) = *state else {
            return None;
        };
        let State::Ready(mut serving) = std::mem::replace(&mut *state, State::Unloaded) else {
            unreachable!("checked above");
        };
        drop(state);
        let retired = serving.retire();
        drop(serving);
        self.changed();
        Some(retired)
    }

    pub fn set_failed(&self, reason: String) {
        *self.state_mut() = State::Failed(reason);
        self.changed();
    }

    /// Jobs waiting in the queue (None unless the model is serving).
    pub fn queue_depth(&self) -> Option<usize> {
        match &*self.state() {
            State::Ready(serving) => Some(serving.jobs.len()),
            _ => None,
        }
    }

    /// What a metrics scrape reads of a serving model (None unless serving).
    pub fn sample(&self) -> Option<ModelSample> {
        match &*self.state() {
            State::Ready(serving) => Some(ModelSample {
                labels: self.labels.clone(),
                queue_depth: serving.jobs.len(),
                streamed: serving
                    .handler
                    .units()
                    .map(|u| u.stream_totals())
                    .unwrap_or_default(),
            }),
            _ => None,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(*self.state(), State::Ready(_))
    }

    pub fn failure(&self) -> Option<String> {
        match &*self.state() {
            State::Failed(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    fn not_ready(&self, state: &State) -> Error {
        Error::NotReady {
            model: self.spec.name.clone(),
            state: match state {
                State::Unloaded => "it is not loaded (unloaded, or evicted to make room)".into(),
                State::Loading(stage) => format!("it is loading ({})", stage.describe()),
                State::Failed(reason) => format!("it failed to load: {reason}"),
                State::Ready(_) => {
                    "it has no workers (scale it up with PUT /models/{name}?min_worker=1)".into()
                }
            },
        }
    }

    /// Prepares `request` for its handler (tokenizing it once, off the async runtime),
    /// queues it, and returns where its answer will arrive. With `events`, a generation
    /// streams its tokens there as they are generated.
    pub async fn submit(&self, request: Request, events: Option<EventSender>) -> Result<Submitted> {
        let handler = match &*self.state() {
            State::Ready(serving) => serving.handler.clone(),
            other => return Err(self.not_ready(other)),
        };
        let mut input = if request.tokenizes() {
            tokio::task::spawn_blocking(move || handler.prepare(request))
                .await
                .map_err(|e| Error::Internal(format!("the tokenizing task failed: {e}")))??
        } else {
            handler.prepare(request)?
        };
        if let Some(events) = events {
            input.stream_to(events);
        }
        let input_tokens = input.tokens();
        // Sized only where a token budget will read it.
        let size = self.spec.config.max_batch_tokens.and_then(|_| input.size());
        let (reply, answer) = oneshot::channel();
        let job = Job {
            input,
            size,
            reply,
            enqueued_at: Instant::now(),
            request_id: crate::telemetry::request_id::RequestId::current(),
        };
        let state = self.state();
        let serving = match &*state {
            State::Ready(serving) => serving,
            other => return Err(self.not_ready(other)),
        };
        match serving.jobs.try_send(job) {
            Ok(()) => Ok(Submitted {
                answer,
                input_tokens,
            }),
            Err(flume::TrySendError::Full(_)) => {
                self.labels.rejected();
                Err(Error::QueueFull {
                    model: self.spec.name.clone(),
                    capacity: self.spec.job_queue_size,
                })
            }
            Err(flume::TrySendError::Disconnected(_)) => Err(self.not_ready(&state)),
        }
    }

    /// Changes the number of workers.
    pub fn scale(&self, min: usize, max: usize) -> Result<()> {
        match &*self.state() {
            State::Ready(serving) => serving
                .pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .scale(min, max),
            other => Err(self.not_ready(other)),
        }
    }

    pub fn describe(&self) -> ModelDescription {
        let spec = &self.spec;
        let state = self.state();
        let (status, error) = match &*state {
            State::Unloaded => ("UNLOADED".to_string(), None),
            State::Loading(_) => ("LOADING".to_string(), None),
            State::Ready(_) => ("READY".to_string(), None),
            State::Failed(reason) => ("FAILED".to_string(), Some(reason.clone())),
        };
        let (mut min_workers, mut max_workers) = (spec.config.min_workers, spec.config.max_workers);
        let mut description = ModelDescription {
            model_name: spec.name.clone(),
            model_version: spec.version.clone(),
            model_url: spec.url.clone(),
            runtime: "spillway",
            handler: spec.handler,
            status,
            min_workers,
            max_workers,
            batch_size: spec.config.batch_size,
            max_batch_delay: spec.config.max_batch_delay.as_millis(),
            response_timeout: spec.config.response_timeout.as_secs(),
            job_queue_size: spec.job_queue_size,
            queue_depth: None,
            loaded_at_startup: spec.loaded_at_startup,
            last_used: None,
            archive_format: spec.format,
            load_time_seconds: None,
            loaded_at: None,
            error,
            model: None,
            setup_config: spec.setup.clone(),
            loading_stage: match &*state {
                State::Loading(stage) => Some(*stage),
                _ => None,
            },
            loading_progress: match &*state {
                State::Loading(_) => self.progress.snapshot(),
                _ => None,
            },
            device_state: match &*state {
                State::Ready(serving) if serving.demoted.load(Ordering::SeqCst) => Some("disk"),
                State::Ready(_) => Some("resident"),
                State::Unloaded => Some("unloaded"),
                State::Loading(_) | State::Failed(_) => None,
            },
            placement: None,
            workers: Vec::new(),
            recent: self.recent.summary(Instant::now()),
        };
        if let State::Ready(serving) = &*state {
            let pool = serving.pool.lock().unwrap_or_else(|e| e.into_inner());
            (min_workers, max_workers) = (pool.min_workers, pool.max_workers);
            description.workers = pool.describe();
            description.queue_depth = Some(serving.jobs.len());
            description.min_workers = min_workers;
            description.max_workers = max_workers;
            description.load_time_seconds = Some(serving.load_time.as_secs_f64());
            description.loaded_at = Some(crate::timestamp::rfc3339(serving.loaded_at));
            description.model = Some(serving.handler.info());
            description.placement = serving.plan.clone();
            // TorchServe's `gpu` flag: whether the worker computes on a GPU.
            let on_gpu = serving.plan.as_ref().is_some_and(|p| p.computes_on_gpu());
            for worker in &mut description.workers {
                worker.gpu = on_gpu;
            }
        }
        description
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model_config::{ModelConfigOverrides, ModelDefaults};

    fn handle() -> Arc<ModelHandle> {
        let defaults = ModelDefaults {
            workers: 1,
            response_timeout: Duration::from_secs(5),
        };
        ModelHandle::new(
            ModelSpec {
                name: "m".into(),
                version: "1".into(),
                url: "m.mar".into(),
                handler: HandlerKind::Echo,
                format: ArchiveFormat::ZipStore,
                config: ModelConfig::parse(None, &ModelConfigOverrides::default(), defaults)
                    .expect("defaults"),
                setup: SetupConfig::default(),
                job_queue_size: 4,
                loaded_at_startup: false,
            },
            None,
        )
    }

    #[test]
    fn a_loading_model_shows_the_progress_of_its_long_work() {
        use spillway_handlers::weights::progress;
        let model = handle();
        model.set_stage(LoadStage::Converting);
        let (described, page) = progress::with(model.progress(), || {
            progress::begin("converting m.gguf", 1000);
            progress::advance(400);
            let described = model.describe();
            let page = crate::http::status_page::render(&crate::http::status_page::StatusPage {
                version: "0",
                models: vec![model.describe()],
                pools: vec![],
                offload_strategy: "restart".into(),
                store: None,
            });
            (described, page)
        });
        let json = serde_json::to_value(&described).expect("json");
        let progress = described.loading_progress.expect("progress while loading");
        assert_eq!(progress.stage, "converting m.gguf");
        assert_eq!((progress.done_bytes, progress.total_bytes), (400, 1000));
        assert!(page.contains("data-progress=\"40\""), "{page}");
        assert!(page.contains("converting m.gguf"));
        assert_eq!(
            model.describe().loading_progress,
            None,
            "the work is over once the load step returns"
        );
        assert_eq!(json["loadingProgress"]["doneBytes"], 400);
    }

    #[test]
    fn a_registered_model_shows_its_load_stage_until_it_serves_or_fails() {
        let model = handle();
        let stage = |m: &ModelHandle| {
            let d = m.describe();
            (d.status, d.loading_stage)
        };
        assert_eq!(stage(&model), ("LOADING".into(), Some(LoadStage::Queued)));
        model.set_stage(LoadStage::Converting);
        assert_eq!(
            stage(&model),
            ("LOADING".into(), Some(LoadStage::Converting))
        );
        let refused = model.not_ready(&model.state());
        assert!(refused.to_string().contains("converting"), "{refused}");
        model.set_failed("broken".into());
        model.set_stage(LoadStage::Building);
        assert_eq!(
            stage(&model),
            ("FAILED".into(), None),
            "a stage after failing is ignored"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unloaded_model_stays_registered_and_says_so() {
        let model = handle();
        let loaded = Loaded {
            handler: Arc::new(spillway_handlers::tasks::echo::Echo),
            plan: None,
            lease: None,
        };
        model.set_ready(loaded, Duration::ZERO).expect("ready");
        let hi = || {
            Request::Raw(spillway_handlers::RawBody {
                content_type: None,
                bytes: b"hi".to_vec(),
            })
        };
        let answer = model.submit(hi(), None).await.expect("queued").answer;
        assert!(matches!(answer.await, Ok(Ok(Output::Raw(_)))));
        model.unload().await;
        assert_eq!(model.describe().status, "UNLOADED");
        let refused = model.submit(hi(), None).await.expect_err("not serving");
        assert_eq!(refused.kind(), crate::error::ErrorKind::NotReady);
        assert!(refused.to_string().contains("not loaded"), "{refused}");
    }
}
