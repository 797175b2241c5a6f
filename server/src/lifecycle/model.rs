//! [`ModelHandle`]: one registered model version — what it is (name, version, archive,
//! configs) and where it is in its life: its [`Phase`] (changed only through
//! [`phase::step`](super::phase::step)) and, while it serves, its [`Serving`] machinery.
//! Requests reach the model only through [`ModelHandle::submit`]. The supervisor
//! ([`super::Lifecycle`]) is what moves it from phase to phase; the transitions here
//! each take the handle's one lock, ask `step`, and do what it says that touches the
//! handle itself (start serving, discard a build, retire, demote).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use spillway_handlers::{EventSender, Handler, HandlerInfo, HandlerKind, Output, Request};
use tokio::sync::oneshot;

use super::loader::{Loaded, Source};
use super::phase::{self, Command, Event, LoadStage, Phase, Residency};
use crate::config::model_config::ModelConfig;
use crate::config::setup_config::SetupConfig;
use crate::devices::manager::{DeviceBytes, DeviceManager, demoted_bytes};
use crate::error::{Error, ErrorKind, Result};
use crate::serving::batcher::Job;
use crate::serving::worker::WorkerInfo;
use crate::serving::{Serving, Setup, Workers};
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
    /// The store-relative archive name (or `org/name` of the HF cache) it was
    /// registered from.
    pub url: String,
    pub handler: HandlerKind,
    pub format: ArchiveFormat,
    pub config: ModelConfig,
    pub setup: SetupConfig,
    pub job_queue_size: usize,
    pub loaded_at_startup: bool,
}

/// Why its load failed, and the class of that failure (what a request is answered).
#[derive(Debug, Clone)]
struct Failure {
    reason: String,
    kind: ErrorKind,
}

/// Its phase and what the phase holds.
struct Life {
    phase: Phase,
    /// While READY.
    serving: Option<Box<Serving>>,
    /// While FAILED.
    failure: Option<Failure>,
}

/// Bytes over every device.
fn total(bytes: &DeviceBytes) -> u64 {
    bytes.values().sum()
}

/// One registered model version. Shared as `Arc<ModelHandle>`; when the registry and
/// every in-flight request have let go, the job queue closes and the workers stop.
pub struct ModelHandle {
    pub spec: ModelSpec,
    /// What it is built from, to build it again after an eviction (`None` for a model
    /// made in a test); replaced when its archive changed and was opened again.
    source: Mutex<Option<Source>>,
    /// The archive key (`store::archive_key`) its last load started from: a model that
    /// failed is tried again only once its archive changed since.
    attempted: Mutex<Option<crate::store::FileKey>>,
    /// Its workers: from model-config.yaml, then as scaled (kept across reloads).
    workers: Mutex<Workers>,
    labels: ModelLabels,
    /// The last minute of its answers (describe's `recent`, the status page).
    recent: crate::serving::recent::RecentAnswers,
    /// Its load's long work (conversions, offload copies) while it goes on.
    progress: Arc<spillway_handlers::weights::progress::Progress>,
    life: RwLock<Life>,
    /// Bumped at every change of phase, for requests waiting for a model to serve.
    changes: tokio::sync::watch::Sender<u64>,
    /// Requests between arriving and being answered.
    in_flight: AtomicUsize,
    /// Woken when the last request in flight is answered.
    idle: tokio::sync::Notify,
}

/// A request in flight on a model (see [`ModelHandle::begin_request`]); it may outlive
/// the handler that began it (a streamed answer).
pub struct InFlight(Arc<ModelHandle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
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
            .and_then(|s| crate::store::archive_key(s.path()));
        Arc::new(Self {
            labels: ModelLabels::new(&spec.name, &spec.version),
            recent: crate::serving::recent::RecentAnswers::default(),
            progress: spillway_handlers::weights::progress::Progress::logged(format!(
                "{}/{}",
                spec.name, spec.version
            )),
            workers: Mutex::new(Workers {
                min: spec.config.min_workers,
                max: spec.config.max_workers,
            }),
            spec,
            source: Mutex::new(source),
            attempted: Mutex::new(attempted),
            life: RwLock::new(Life {
                phase: Phase::Loading(LoadStage::Queued),
                serving: None,
                failure: None,
            }),
            changes: tokio::sync::watch::Sender::new(0),
            in_flight: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
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
            .and_then(|s| crate::store::archive_key(s.path()));
        *self.attempted.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// Whether its archive changed since the load it last attempted.
    fn archive_changed_since_attempt(&self) -> bool {
        let Some(source) = self.source() else {
            return false;
        };
        let now = crate::store::archive_key(source.path());
        let attempted = self.attempted.lock().unwrap_or_else(|e| e.into_inner());
        now.is_some() && now != *attempted
    }

    fn life(&self) -> std::sync::RwLockReadGuard<'_, Life> {
        // A poisoned lock only means a panic elsewhere while holding it; the life
        // itself is always a complete value.
        self.life.read().unwrap_or_else(|e| e.into_inner())
    }

    fn life_mut(&self) -> std::sync::RwLockWriteGuard<'_, Life> {
        self.life.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Its phase now.
    pub fn phase(&self) -> Phase {
        self.life().phase
    }

    /// `event` through the transition function, under the lock: the new phase is set
    /// and the commands that concern the handle's own state are left to the caller,
    /// which still holds `life`. `None` when the event does not apply.
    fn apply(&self, life: &mut Life, event: Event) -> Option<Vec<Command>> {
        let (next, commands) = phase::step(life.phase, event)?;
        if next != life.phase {
            tracing::debug!(model = %self.key(), from = ?life.phase, to = ?next, ?event, "phase");
        }
        life.phase = next;
        if !matches!(next, Phase::Failed) {
            life.failure = None;
        }
        Some(commands)
    }

    /// Applies `event` and retires the serving machinery when the transition says so;
    /// the returned thread finishes once its memory is free. `None`: nothing to wait
    /// for (ignored, or nothing was serving).
    fn transition(&self, event: Event) -> (bool, Option<std::thread::JoinHandle<()>>) {
        let mut life = self.life_mut();
        let Some(commands) = self.apply(&mut life, event) else {
            return (false, None);
        };
        let retired = commands
            .contains(&Command::Retire)
            .then(|| life.serving.take())
            .flatten()
            .map(|mut serving| serving.retire());
        drop(life);
        self.changed();
        (true, retired)
    }

    /// A serving model whose mapped weight files were truncated or rewritten underneath
    /// ([`Handler::weights_changed`]) stops serving: it is unloaded, to be loaded again
    /// from its archive as it is now by the next request. Its requests in flight are
    /// answered 503 by their workers. True when it was unloaded here.
    pub fn unload_if_weights_changed(&self) -> bool {
        let changed = match &self.life().serving {
            Some(serving) => serving.handler.weights_changed(),
            None => None,
        };
        let Some(why) = changed else {
            return false;
        };
        tracing::warn!(model = %self.key(), error = %why, "unloaded: its weights changed under it; the next request loads it again");
        self.labels.weights_changed();
        self.transition(Event::WeightsChanged).0
    }

    /// A model that failed to load is made loadable again (unloaded) once its archive
    /// changed since the load that failed: the file being copied in when it was read
    /// is complete now, or was fixed. True when it was.
    pub fn retry_if_archive_changed(&self) -> bool {
        if self.phase() != Phase::Failed || !self.archive_changed_since_attempt() {
            return false;
        }
        let retried = self.transition(Event::Retry).0;
        if retried {
            tracing::info!(model = %self.key(), "its archive changed since its load failed: it is loaded again on this request");
        }
        retried
    }

    /// Counts a request as in flight until the guard drops: a model with requests in
    /// flight is never chosen for eviction.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Returns once no request is in flight, or `within` has passed (false then).
    pub async fn idle_within(&self, within: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }

    /// Notified at every change of phase.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// UNLOADED → LOADING, for the one caller that then reloads it; false for everyone
    /// else (already loading, serving, failed or gone).
    pub fn begin_reload(&self) -> bool {
        self.transition(Event::Reload).0
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

    /// Tells describe what the load is doing now (ignored unless loading).
    pub fn set_stage(&self, stage: LoadStage) {
        self.transition(Event::Stage(stage));
    }

    /// The load finished: with a build, the model serves it (its admission commits) —
    /// unless the model left meanwhile (unregistered, failed past its startup timeout,
    /// or serving another build), when the build is dropped and its admission rolls
    /// back. Must run inside the tokio runtime (the batcher is a task). Whether it
    /// serves now.
    pub fn loaded(&self, loaded: Loaded, load_time: Duration) -> Result<bool> {
        let mut life = self.life_mut();
        let serves = phase::step(life.phase, Event::Loaded)
            .is_some_and(|(_, commands)| commands.contains(&Command::StartServing));
        if !serves {
            let _discard = self.apply(&mut life, Event::Loaded);
            let phase = life.phase;
            drop(life);
            tracing::info!(model = %self.key(), ?phase, "a load finished after its model left it: what it built is dropped");
            drop(loaded);
            return Ok(false);
        }
        let Loaded { handler, admission } = loaded;
        let (plan, lease) = match admission {
            Some(admission) => {
                let (plan, lease) = admission.commit();
                (Some(plan), Some(lease))
            }
            None => (None, None),
        };
        let workers = *self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let setup = Setup {
            name: &self.spec.name,
            config: &self.spec.config,
            job_queue_size: self.spec.job_queue_size,
            workers,
            labels: &self.labels,
        };
        let started = Serving::start(handler, plan, lease, &setup, load_time);
        let result = match started {
            Ok(serving) => {
                let _serve = self.apply(&mut life, Event::Loaded);
                life.serving = Some(Box::new(serving));
                Ok(true)
            }
            Err(e) => {
                let _fail = self.apply(&mut life, Event::LoadFailed);
                life.failure = Some(Failure {
                    reason: e.chain(),
                    kind: e.kind(),
                });
                Err(e)
            }
        };
        drop(life);
        self.changed();
        result
    }

    /// The load failed with `error` (or ran past its startup timeout).
    pub fn load_failed(&self, error: &Error) {
        let mut life = self.life_mut();
        if self.apply(&mut life, Event::LoadFailed).is_some() {
            life.failure = Some(Failure {
                reason: error.chain(),
                kind: error.kind(),
            });
        }
        drop(life);
        self.changed();
    }

    /// No room for it now: it waits, unloaded, for a request to load it (a start-up
    /// model that would evict another, or a reload that found the room held by busy
    /// models — the request that tried waits and tries again).
    pub fn defer(&self) {
        self.transition(Event::Deferred);
    }

    /// Taken out of the registry: it never serves again. Its queued jobs are answered,
    /// then its workers are joined and its memory freed; returns when all that is done.
    pub async fn unregister(&self) {
        let (_, retired) = self.transition(Event::Unregister);
        if let Some(retired) = retired {
            let _ = tokio::task::spawn_blocking(move || retired.join()).await;
        }
    }

    /// The id of the lease it serves under (while it serves a model with weights).
    pub fn lease_id(&self) -> Option<u64> {
        self.life()
            .serving
            .as_ref()
            .and_then(|s| s.lease())
            .map(|l| l.id())
    }

    /// Gives its bytes to another model: with `to_disk` (the `disk` strategy) its
    /// resident units are streamed from their mapping from now on and its lease shrinks
    /// to what streaming needs; otherwise — or when its units are on disk already, or
    /// its handler cannot stream them — it is unloaded (it stays registered, and its
    /// next request loads it again). Returns the thread that finishes once an unloaded
    /// model's memory is free, and whether its units went to disk.
    pub fn evict(
        &self,
        to_disk: bool,
        devices: &DeviceManager,
    ) -> (Option<std::thread::JoinHandle<()>>, bool) {
        if to_disk && self.demote(devices) {
            return (None, true);
        }
        // A model whose units are on disk, or cannot stream them, is unloaded.
        let demoted_already = self.phase() == Phase::Ready(Residency::Demoted);
        let (_, retired) = self.transition(Event::Evict {
            to_disk: to_disk && demoted_already,
        });
        (retired, false)
    }

    /// The `disk` eviction, when its handler can stream its units: true when they went.
    fn demote(&self, devices: &DeviceManager) -> bool {
        let mut life = self.life_mut();
        if life.phase != Phase::Ready(Residency::Resident) {
            return false;
        }
        let Some(serving) = life.serving.as_ref() else {
            return false;
        };
        let (Some(plan), Some(lease)) = (serving.plan.clone(), serving.lease()) else {
            return false;
        };
        let Some(units) = serving.handler.units() else {
            return false;
        };
        let before = total(&lease.bytes());
        let demoted = units.demote();
        crate::devices::release_freed_memory();
        devices.resize(lease, demoted_bytes(&plan, &demoted));
        lease.set_demoted(true);
        let after = total(&lease.bytes());
        let commands = self.apply(&mut life, Event::Evict { to_disk: true });
        debug_assert_eq!(commands, Some(vec![Command::Demote]));
        drop(life);
        tracing::info!(model = %self.key(), freed = before.saturating_sub(after), "evicted to disk: its units stream until its next request");
        self.changed();
        true
    }

    /// Whether it serves with its units demoted to disk.
    pub fn is_demoted(&self) -> bool {
        self.phase() == Phase::Ready(Residency::Demoted)
    }

    /// Starts bringing a demoted model's units back: the one caller that gets the
    /// handler and its lease's bytes before and after goes on ([`Self::promoted`]);
    /// everyone else gets `None` (not demoted, or promoting already).
    pub fn begin_promotion(&self) -> Option<Promotion> {
        let mut life = self.life_mut();
        let serving = life.serving.as_ref()?;
        let (Some(plan), Some(_)) = (serving.plan.as_ref(), serving.lease()) else {
            return None;
        };
        let target = crate::devices::manager::held_by(plan);
        let handler = serving.handler.clone();
        self.apply(&mut life, Event::PromoteStarted)?;
        drop(life);
        self.changed();
        Some(Promotion { handler, target })
    }

    /// Runs `f` with its lease (while it serves with one).
    pub fn with_lease<T>(&self, f: impl FnOnce(&crate::devices::manager::Lease) -> T) -> Option<T> {
        self.life().serving.as_ref().and_then(|s| s.lease()).map(f)
    }

    /// The promotion is over: its units came back (`ok`) or stay on disk.
    pub fn promoted(&self, ok: bool) {
        let mut life = self.life_mut();
        if self.apply(&mut life, Event::Promoted { ok }).is_some()
            && let Some(lease) = life.serving.as_ref().and_then(|s| s.lease())
        {
            lease.settle();
            if ok {
                lease.set_demoted(false);
            }
        }
        drop(life);
        self.changed();
    }

    /// Jobs waiting in the queue (None unless the model is serving).
    pub fn queue_depth(&self) -> Option<usize> {
        self.life().serving.as_ref().map(|s| s.jobs.len())
    }

    /// What a metrics scrape reads of a serving model (None unless serving).
    pub fn sample(&self) -> Option<ModelSample> {
        self.life().serving.as_ref().map(|serving| ModelSample {
            labels: self.labels.clone(),
            queue_depth: serving.jobs.len(),
            streamed: serving
                .handler
                .units()
                .map(|u| u.stream_totals())
                .unwrap_or_default(),
            prefix_cache: serving.handler.prefix_cache(),
        })
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.phase(), Phase::Ready(_))
    }

    pub fn is_unloaded(&self) -> bool {
        self.phase() == Phase::Unloaded
    }

    pub fn failure(&self) -> Option<String> {
        self.life().failure.as_ref().map(|f| f.reason.clone())
    }

    /// Why it does not take a request now.
    fn not_ready(&self, life: &Life) -> Error {
        let model = self.spec.name.clone();
        if let Some(failure) = &life.failure {
            return Error::LoadFailed {
                model,
                reason: failure.reason.clone(),
                kind: failure.kind,
            };
        }
        Error::NotReady {
            model,
            state: match life.phase {
                Phase::Unloaded => "it is not loaded (unloaded, or evicted to make room)".into(),
                Phase::Loading(stage) => format!("it is loading ({})", stage.describe()),
                Phase::Failed => "it failed to load".into(),
                Phase::Gone => "it was unregistered".into(),
                Phase::Ready(_) => {
                    "it has no workers (scale it up with PUT /models/{name}?min_worker=1)".into()
                }
            },
        }
    }

    /// Prepares `request` for its handler (tokenizing it once, off the async runtime),
    /// queues it, and returns where its answer will arrive. With `events`, a generation
    /// streams its tokens there as they are generated.
    pub async fn submit(&self, request: Request, events: Option<EventSender>) -> Result<Submitted> {
        let handler = {
            let life = self.life();
            match &life.serving {
                Some(serving) => serving.handler.clone(),
                None => return Err(self.not_ready(&life)),
            }
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
        let life = self.life();
        let Some(serving) = &life.serving else {
            return Err(self.not_ready(&life));
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
            Err(flume::TrySendError::Disconnected(_)) => Err(self.not_ready(&life)),
        }
    }

    /// Changes the number of workers, now and for every later load of the model.
    pub fn scale(&self, min: usize, max: usize) -> Result<()> {
        let life = self.life();
        let Some(serving) = &life.serving else {
            return Err(self.not_ready(&life));
        };
        serving
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .scale(min, max)?;
        *self.workers.lock().unwrap_or_else(|e| e.into_inner()) = Workers {
            min,
            max: max.max(min),
        };
        Ok(())
    }

    pub fn describe(&self) -> ModelDescription {
        let spec = &self.spec;
        let life = self.life();
        let workers = *self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let mut description = ModelDescription {
            model_name: spec.name.clone(),
            model_version: spec.version.clone(),
            model_url: spec.url.clone(),
            runtime: "spillway",
            handler: spec.handler,
            status: life.phase.status().to_string(),
            min_workers: workers.min,
            max_workers: workers.max,
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
            error: life.failure.as_ref().map(|f| f.reason.clone()),
            model: None,
            setup_config: spec.setup.clone(),
            loading_stage: match life.phase {
                Phase::Loading(stage) => Some(stage),
                _ => None,
            },
            loading_progress: match life.phase {
                Phase::Loading(_) => self.progress.snapshot(),
                _ => None,
            },
            device_state: life.phase.device_state(),
            placement: None,
            workers: Vec::new(),
            recent: self.recent.summary(Instant::now()),
        };
        if let Some(serving) = &life.serving {
            let pool = serving.pool.lock().unwrap_or_else(|e| e.into_inner());
            description.workers = pool.describe();
            description.queue_depth = Some(serving.jobs.len());
            description.min_workers = pool.min_workers;
            description.max_workers = pool.max_workers;
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

/// A promotion under way: the handler whose units come back, and what its lease grows
/// back to.
pub struct Promotion {
    pub handler: Arc<dyn Handler>,
    pub target: DeviceBytes,
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
        let refused = model.not_ready(&model.life());
        assert!(refused.to_string().contains("converting"), "{refused}");
        model.load_failed(&Error::bad_config("setup_config.json", "broken"));
        model.set_stage(LoadStage::Building);
        assert_eq!(
            stage(&model),
            ("FAILED".into(), None),
            "a stage after failing is ignored"
        );
    }

    fn echo() -> Loaded {
        Loaded {
            handler: Arc::new(spillway_handlers::tasks::echo::Echo),
            admission: None,
        }
    }

    fn hi() -> Request {
        Request::Raw(spillway_handlers::RawBody {
            content_type: None,
            bytes: b"hi".to_vec(),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unloaded_model_stays_registered_and_says_so() {
        let model = handle();
        assert!(model.loaded(echo(), Duration::ZERO).expect("ready"));
        let answer = model.submit(hi(), None).await.expect("queued").answer;
        assert!(matches!(answer.await, Ok(Ok(Output::Raw(_)))));
        let (retired, to_disk) = model.evict(false, &DeviceManager::new(test_pools()));
        assert!(!to_disk);
        retired.expect("it was serving").join().expect("retired");
        assert_eq!(model.describe().status, "UNLOADED");
        let refused = model.submit(hi(), None).await.expect_err("not serving");
        assert_eq!(refused.kind(), crate::error::ErrorKind::NotReady);
        assert!(refused.to_string().contains("not loaded"), "{refused}");
    }

    fn test_pools() -> crate::devices::manager::ManagerConfig {
        crate::devices::manager::ManagerConfig {
            host_budget: 1 << 30,
            host_budget_given: true,
            gpus: Vec::new(),
            pack_gpus: false,
            evicts_to_disk: false,
        }
    }

    /// Today's bug this guards: a load that finished after its model was unregistered
    /// made it READY again (and kept its memory).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_that_finishes_after_unregister_is_dropped_not_served() {
        let model = handle();
        model.set_stage(LoadStage::Building);
        model.unregister().await;
        assert!(!model.loaded(echo(), Duration::ZERO).expect("no error"));
        assert_eq!(model.phase(), Phase::Gone);
        assert!(model.submit(hi(), None).await.is_err());
        assert_eq!(model.describe().status, "UNREGISTERED");
    }

    /// Today's bug this guards: `PUT /models/m?min_worker=2` was forgotten when the
    /// model was evicted and loaded again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scale_outlives_an_eviction_and_a_reload() {
        let model = handle();
        assert!(model.loaded(echo(), Duration::ZERO).expect("ready"));
        model.scale(2, 3).expect("scaled");
        let (retired, _) = model.evict(false, &DeviceManager::new(test_pools()));
        retired.expect("serving").join().expect("retired");
        assert!(model.begin_reload());
        assert!(model.loaded(echo(), Duration::ZERO).expect("ready again"));
        let described = model.describe();
        assert_eq!((described.min_workers, described.max_workers), (2, 3));
        assert_eq!(described.workers.len(), 2);
    }

    /// A failed model answers its requests with the class of its failure (a bad
    /// archive 400, no room 507), not a blanket 503.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_model_answers_with_its_failures_class() {
        let model = handle();
        model.load_failed(&Error::bad_archive(
            std::path::Path::new("m.mar"),
            "no manifest",
        ));
        let refused = model.submit(hi(), None).await.expect_err("failed");
        assert_eq!(refused.kind(), ErrorKind::BadRequest);
        assert!(refused.to_string().contains("no manifest"), "{refused}");
    }
}
