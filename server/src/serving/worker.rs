//! Workers: OS threads that run batches through the model's shared handler.
//!
//! All workers of a model share one `Arc<dyn Handler>` (one copy of the weights) and one
//! batch channel. A worker answers every job of its batch exactly once: with the
//! handler's per-item result, with the batch's error, or — when the handler panics —
//! with an internal error, after which the worker carries on (counted as a restart).
//! With `continuousBatching` a worker of a generation model keeps one running batch
//! instead: requests join it between decode steps and are answered as each finishes.
//! Model compute never runs on the async runtime.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use spillway_handlers::{Handler, HandlerError};

use crate::error::Error;
use crate::serving::batcher::{IdleWorkers, Job};
use crate::telemetry::metrics::ModelLabels;
use crate::telemetry::request_id::RequestId;

/// How often an idle worker checks whether it was asked to stop.
const STOP_POLL: Duration = Duration::from_millis(100);

/// What the describe API shows of a worker.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerInfo {
    pub id: String,
    pub start_time: String,
    pub status: &'static str,
    pub requests_served: u64,
    pub restarts: u64,
    pub gpu: bool,
    /// Threads this worker computes with.
    pub threads: usize,
}

struct WorkerStats {
    started_at: SystemTime,
    busy: AtomicBool,
    requests: AtomicU64,
    restarts: AtomicU64,
}

struct Worker {
    id: usize,
    threads: usize,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The workers of one model.
pub struct WorkerPool {
    handler: Arc<dyn Handler>,
    batches: flume::Receiver<Vec<Job>>,
    idle: Arc<IdleWorkers>,
    labels: ModelLabels,
    /// `Some(capacity)`: continuous batching, up to `capacity` requests running.
    continuous: Option<usize>,
    /// `threadsPerWorker`, if the model config sets it.
    threads_per_worker: Option<usize>,
    workers: Vec<Worker>,
    /// Threads of workers asked to stop (scaled down), finishing their batch.
    stopping: Vec<JoinHandle<()>>,
    next_id: usize,
    pub min_workers: usize,
    pub max_workers: usize,
}

impl WorkerPool {
    pub fn new(
        handler: Arc<dyn Handler>,
        batches: flume::Receiver<Vec<Job>>,
        idle: Arc<IdleWorkers>,
        labels: ModelLabels,
        continuous: Option<usize>,
        threads_per_worker: Option<usize>,
    ) -> Self {
        Self {
            handler,
            batches,
            idle,
            labels,
            continuous,
            threads_per_worker,
            workers: Vec::new(),
            stopping: Vec::new(),
            next_id: 9000,
            min_workers: 0,
            max_workers: 0,
        }
    }

    /// Sets the worker range and starts or stops workers to run `min` of them.
    /// Workers whose thread count the new range changes are replaced, so that the
    /// workers together never compute with more threads than the cores.
    pub fn scale(&mut self, min: usize, max: usize) -> Result<(), Error> {
        self.min_workers = min;
        self.max_workers = max.max(min);
        let threads = worker_threads(self.threads_per_worker, cores(), self.max_workers);
        let keep = if self.workers.iter().all(|w| w.threads == threads) {
            min
        } else {
            0
        };
        while self.workers.len() > keep {
            if let Some(worker) = self.workers.pop() {
                // The thread finishes its current batch, then exits on its own.
                worker.stop.store(true, Ordering::SeqCst);
                self.stopping.push(worker.thread);
            }
        }
        while self.workers.len() < min {
            self.spawn()?;
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let id = self.next_id;
        self.next_id += 1;
        let stats = Arc::new(WorkerStats {
            started_at: SystemTime::now(),
            busy: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let context = WorkerContext {
            handler: self.handler.clone(),
            batches: self.batches.clone(),
            idle: self.idle.clone(),
            labels: self.labels.clone(),
            continuous: self.continuous,
            stats: stats.clone(),
            stop: stop.clone(),
        };
        let threads = worker_threads(self.threads_per_worker, cores(), self.max_workers);
        let name = format!("worker-{id}");
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let ran =
                    spillway_handlers::cpu::threads::with_threads(threads, &name, || context.run());
                if let Err(e) = ran {
                    tracing::error!("worker {name} cannot start its compute threads: {e}");
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start a worker thread: {e}")))?;
        self.workers.push(Worker {
            id,
            threads,
            stats,
            stop,
            thread,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn describe(&self) -> Vec<WorkerInfo> {
        self.workers
            .iter()
            .map(|w| WorkerInfo {
                id: w.id.to_string(),
                start_time: crate::timestamp::rfc3339(w.stats.started_at),
                status: if w.stats.busy.load(Ordering::Relaxed) {
                    "BUSY"
                } else {
                    "READY"
                },
                requests_served: w.stats.requests.load(Ordering::Relaxed),
                restarts: w.stats.restarts.load(Ordering::Relaxed),
                gpu: false, // set from the model's plan by its describe()
                threads: w.threads,
            })
            .collect()
    }
}

impl WorkerPool {
    /// Every worker thread, for the caller to join. The workers are not told to stop:
    /// each runs until the batch channel closes (the model's queue closed and drained),
    /// so jobs already queued are still answered.
    pub fn retire(&mut self) -> Vec<JoinHandle<()>> {
        let mut threads = std::mem::take(&mut self.stopping);
        threads.extend(self.workers.drain(..).map(|w| w.thread));
        threads
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// Threads one worker computes with: `threadsPerWorker` when set, otherwise the cores
/// divided among `maxWorkers`, so that all of them busy at once do not start more
/// threads than there are cores (on 2 cores, 2 workers × 1 thread serve MiniLM batches
/// 632 req/s against 571 for 1 worker × 2 threads at 32 clients: BENCHMARKS.md).
fn worker_threads(configured: Option<usize>, cores: usize, max_workers: usize) -> usize {
    configured.unwrap_or(cores / max_workers.max(1)).max(1)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Everything one worker thread owns.
struct WorkerContext {
    handler: Arc<dyn Handler>,
    batches: flume::Receiver<Vec<Job>>,
    idle: Arc<IdleWorkers>,
    labels: ModelLabels,
    continuous: Option<usize>,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
}

impl WorkerContext {
    fn run(self) {
        if let Some(capacity) = self.continuous
            && self.run_continuous(capacity)
        {
            return;
        }
        while !self.stop.load(Ordering::SeqCst) {
            self.idle.enter();
            let received = self.batches.recv_timeout(STOP_POLL);
            self.idle.leave();
            match received {
                Ok(batch) => self.run_batch(batch),
                Err(flume::RecvTimeoutError::Timeout) => continue,
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    fn run_batch(&self, mut batch: Vec<Job>) {
        // Clients that gave up while the batch waited for a worker are not worth the compute.
        let before = batch.len();
        batch.retain(|job| !job.reply.is_closed());
        if batch.len() < before {
            self.labels.dropped(before - batch.len());
        }
        if batch.is_empty() {
            return;
        }
        self.stats.busy.store(true, Ordering::Relaxed);
        // Every line logged while the batch runs names its requests, from `info` up (the
        // default). An always-on span cost a formatted id list and a span a batch — 5 % of
        // the echo path's CPU under `RUST_LOG=warn`; the worker's own error lines name
        // their batch's requests at any level.
        let _batch = tracing::info_span!(
            "batch",
            requests = %crate::telemetry::request_id::joined(batch.iter().map(|job| job.request_id.as_ref()))
        )
        .entered();
        let started = Instant::now();
        let mut inputs = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            self.labels
                .queued(started.saturating_duration_since(job.enqueued_at));
            inputs.push(job.input);
            replies.push((job.reply, job.request_id));
        }
        let count = replies.len();
        let requests =
            || crate::telemetry::request_id::joined(replies.iter().map(|(_, id)| id.as_ref()));
        self.labels.batch(count);
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.run(&inputs)));
        self.labels.handled(started.elapsed());
        let answers: Vec<Result<_, Error>> = match ran {
            Ok(Ok(outputs)) if outputs.len() == count => outputs
                .into_iter()
                .map(|r| r.map_err(Error::from))
                .collect(),
            Ok(Ok(outputs)) => {
                // A fault in the handler: every request of the batch gets a 500.
                let message = format!("handler answered {} of {count} requests", outputs.len());
                tracing::error!(requests = %requests(), "{message}");
                (0..count)
                    .map(|_| Err(Error::Internal(message.clone())))
                    .collect()
            }
            Ok(Err(e)) => {
                tracing::error!(requests = %requests(), error = %crate::error::chain(&e), "batch of {count} failed");
                shared_error(Arc::new(e), count)
            }
            Err(panic) => shared_error(self.panicked(panic, &requests()), count),
        };
        // Answers computed from weight files changed underneath are not answers.
        let answers = match self.weights_changed() {
            Some(error) => shared_error(error, count),
            None => answers,
        };
        for ((reply, _), answer) in replies.into_iter().zip(answers) {
            // A closed receiver means the client gave up (timeout or disconnect).
            let _ = reply.send(answer);
        }
        self.stats
            .requests
            .fetch_add(count as u64, Ordering::Relaxed);
        self.stats.busy.store(false, Ordering::Relaxed);
    }
}

impl WorkerContext {
    /// Continuous batching: requests join the running batch between steps (up to
    /// `capacity` running; more wait in the queue) and are answered the moment they
    /// finish. A step's error fails the requests then running; a panic also starts a
    /// fresh batch (counted as a restart). On stop, running requests finish first.
    /// False when the handler has no step batches (it then runs whole batches).
    fn run_continuous(&self, capacity: usize) -> bool {
        let handler = self.handler.clone();
        let Some(mut batch) = handler.step_batch() else {
            return false;
        };
        // Each running request's reply and id.
        let mut waiting: HashMap<u64, (Reply, Option<RequestId>)> = HashMap::new();
        let mut next_ticket = 0u64;
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            if stopping && batch.running() == 0 {
                break;
            }
            let jobs = if stopping || batch.running() >= capacity {
                Vec::new()
            } else if batch.running() == 0 {
                self.stats.busy.store(false, Ordering::Relaxed);
                self.idle.enter();
                let received = self.batches.recv_timeout(STOP_POLL);
                self.idle.leave();
                match received {
                    Ok(jobs) => jobs,
                    Err(flume::RecvTimeoutError::Timeout) => continue,
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                self.batches.try_recv().unwrap_or_default()
            };
            self.stats.busy.store(true, Ordering::Relaxed);
            for job in jobs {
                if job.reply.is_closed() {
                    self.labels.dropped(1);
                    continue;
                }
                let started = Instant::now();
                self.labels
                    .queued(started.saturating_duration_since(job.enqueued_at));
                let ticket = next_ticket;
                next_ticket += 1;
                let joined =
                    std::panic::catch_unwind(AssertUnwindSafe(|| batch.join(ticket, &job.input)));
                match joined {
                    Ok(None) => {
                        waiting.insert(ticket, (job.reply, job.request_id));
                    }
                    Ok(Some(answer)) => {
                        self.labels.handled(started.elapsed());
                        let answer = match self.weights_changed() {
                            Some(error) => Err(Error::Handler(error)),
                            None => answer.map_err(Error::from),
                        };
                        self.answer(job.reply, answer);
                    }
                    Err(panic) => {
                        let requests = job.request_id.as_ref().map_or("", |id| id.as_str());
                        let error = self.panicked(panic, requests);
                        self.answer(job.reply, Err(Error::Handler(error)));
                    }
                }
            }
            waiting.retain(|ticket, (reply, _)| {
                let gone = reply.is_closed();
                if gone {
                    batch.leave(*ticket);
                    self.labels.dropped(1);
                }
                !gone
            });
            if batch.running() == 0 {
                continue;
            }
            self.labels.batch(batch.running());
            let started = Instant::now();
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| batch.step()));
            self.labels.handled(started.elapsed());
            if let Some(error) = self.weights_changed() {
                // Every running request read the changed weights: all fail, and the
                // batch (its KV caches computed from them) starts afresh.
                let finished = match &stepped {
                    Ok(Ok(finished)) => finished.iter().map(|(t, _)| *t).collect(),
                    _ => Vec::new(),
                };
                for ticket in finished {
                    if let Some((reply, _)) = waiting.remove(&ticket) {
                        self.answer(reply, Err(Error::Handler(error.clone())));
                    }
                }
                for (_, (reply, _)) in waiting.drain() {
                    self.answer(reply, Err(Error::Handler(error.clone())));
                }
                drop(stepped);
                drop(batch);
                match handler.step_batch() {
                    Some(fresh) => batch = fresh,
                    None => return true,
                }
                continue;
            }
            match stepped {
                Ok(Ok(finished)) => {
                    for (ticket, answer) in finished {
                        if let Some((reply, _)) = waiting.remove(&ticket) {
                            self.answer(reply, answer.map_err(Error::from));
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(
                        error = %crate::error::chain(&e),
                        requests = %running(&waiting),
                        "a step of {} running requests failed",
                        waiting.len()
                    );
                    let error = Arc::new(e);
                    for (_, (reply, _)) in waiting.drain() {
                        self.answer(reply, Err(Error::Handler(error.clone())));
                    }
                }
                Err(panic) => {
                    let error = self.panicked(panic, &running(&waiting));
                    for (_, (reply, _)) in waiting.drain() {
                        self.answer(reply, Err(Error::Handler(error.clone())));
                    }
                    // The batch may be half-updated: start afresh.
                    drop(batch);
                    match handler.step_batch() {
                        Some(fresh) => batch = fresh,
                        None => return true,
                    }
                }
            }
        }
        self.stats.busy.store(false, Ordering::Relaxed);
        true
    }

    fn answer(&self, reply: Reply, answer: Result<spillway_handlers::Output, Error>) {
        // A closed receiver means the client gave up (timeout or disconnect).
        let _ = reply.send(answer);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Why the handler's weights can no longer be trusted, if a file it maps changed
    /// underneath since it was loaded (see `Handler::weights_changed`).
    fn weights_changed(&self) -> Option<Arc<HandlerError>> {
        let error = self.handler.weights_changed()?;
        tracing::warn!(error = %error, "answers computed since are failed");
        Some(Arc::new(error))
    }

    /// Logs and counts a handler panic that failed the batch of `requests`.
    fn panicked(&self, panic: Box<dyn std::any::Any + Send>, requests: &str) -> Arc<HandlerError> {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(
            requests,
            "handler panicked with its batch in hand: {message}"
        );
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        self.labels.worker_restart();
        Arc::new(HandlerError::Panicked(message))
    }
}

type Reply = tokio::sync::oneshot::Sender<crate::error::Result<spillway_handlers::Output>>;

/// The ids of a continuous batch's running requests, for a log line.
fn running(waiting: &HashMap<u64, (Reply, Option<RequestId>)>) -> String {
    crate::telemetry::request_id::joined(waiting.values().map(|(_, id)| id.as_ref()))
}

fn shared_error(
    error: Arc<HandlerError>,
    count: usize,
) -> Vec<Result<spillway_handlers::Output, Error>> {
    (0..count)
        .map(|_| Err(Error::Handler(error.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use spillway_handlers::{HandlerInfo, Input, Output, RawBody, Request};
    use tokio::sync::oneshot;

    /// A handler that misbehaves as its input's first byte says: `n` answers nothing
    /// (too few answers), `p` panics, `e` fails the whole batch, `o` fails it with a
    /// device out of memory, `i` fails alone as bad input; anything else is echoed.
    struct Misbehaving;

    impl spillway_handlers::Handler for Misbehaving {
        fn prepare(&self, request: Request) -> Result<Input, HandlerError> {
            match request {
                Request::Raw(body) => Ok(Input::Raw(body)),
                _ => Err(HandlerError::Input("raw only".into())),
            }
        }

        fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
            let first = |input: &Input| match input {
                Input::Raw(body) => body.bytes.first().copied(),
                _ => None,
            };
            let marks: Vec<Option<u8>> = batch.iter().map(first).collect();
            if marks.contains(&Some(b'p')) {
                panic!("a test panic");
            }
            if marks.contains(&Some(b'e')) {
                return Err(HandlerError::Unsupported("a failed batch".into()));
            }
            if marks.contains(&Some(b'o')) {
                return Err(HandlerError::OutOfMemory {
                    context: "a test".into(),
                    source: candle_core_error(),
                });
            }
            Ok(batch
                .iter()
                .zip(&marks)
                .filter(|(_, mark)| **mark != Some(b'n'))
                .map(|(input, mark)| match (input, mark) {
                    (_, Some(b'i')) => Err(HandlerError::Input("bad input".into())),
                    (Input::Raw(body), _) => Ok(Output::Raw(body.clone())),
                    _ => Err(HandlerError::Input("raw only".into())),
                })
                .collect())
        }

        fn info(&self) -> HandlerInfo {
            spillway_handlers::tasks::echo::Echo.info()
        }
    }

    fn candle_core_error() -> spillway_handlers::CandleError {
        spillway_handlers::CandleError::Msg("CUDA_ERROR_OUT_OF_MEMORY".into())
    }

    type Answer = oneshot::Receiver<crate::error::Result<Output>>;

    fn job(body: &str) -> (Job, Answer) {
        let (reply, answer) = oneshot::channel();
        let input = Input::Raw(RawBody {
            content_type: None,
            bytes: body.as_bytes().to_vec(),
        });
        let job = Job {
            input,
            size: None,
            reply,
            enqueued_at: std::time::Instant::now(),
            request_id: None,
        };
        (job, answer)
    }

    /// Runs `batches` through one worker of a [`Misbehaving`] model; each job's answer
    /// (`Ok(body)` or `Err(kind)`), then the worker's restarts.
    fn run_batches(batches: &[&[&str]]) -> (Vec<Vec<Result<String, ErrorKind>>>, u64) {
        let (batch_tx, batch_rx) = flume::bounded(0);
        let mut pool = WorkerPool::new(
            Arc::new(Misbehaving),
            batch_rx,
            Arc::new(IdleWorkers::default()),
            ModelLabels::new("misbehaving", "1"),
            None,
            Some(1),
        );
        pool.scale(1, 1).expect("a worker");
        let mut answers = Vec::new();
        for bodies in batches {
            let (jobs, receivers): (Vec<Job>, Vec<Answer>) = bodies.iter().map(|b| job(b)).unzip();
            batch_tx.send(jobs).expect("the worker takes the batch");
            answers.push(
                receivers
                    .into_iter()
                    .map(
                        |answer| match answer.blocking_recv().expect("exactly one answer") {
                            Ok(Output::Raw(body)) => {
                                Ok(String::from_utf8(body.bytes).expect("utf-8"))
                            }
                            Ok(other) => panic!("unexpected {other:?}"),
                            Err(e) => Err(e.kind()),
                        },
                    )
                    .collect(),
            );
        }
        let restarts = pool.describe()[0].restarts;
        drop(batch_tx);
        for thread in pool.retire() {
            thread
                .join()
                .expect("the worker exits once its channel closes");
        }
        (answers, restarts)
    }

    #[test]
    fn every_job_gets_one_answer_of_the_right_class_whatever_the_handler_does() {
        let (answers, restarts) = run_batches(&[
            &["a", "n", "b"],
            &["x", "p"],
            &["e", "y"],
            &["o"],
            &["i", "z"],
            &["after"],
        ]);
        use ErrorKind::*;
        assert_eq!(
            answers,
            [
                vec![Err(Internal), Err(Internal), Err(Internal)],
                vec![Err(Internal), Err(Internal)],
                vec![Err(BadRequest), Err(BadRequest)],
                vec![Err(InsufficientStorage)],
                vec![Err(BadRequest), Ok("z".to_string())],
                vec![Ok("after".to_string())],
            ],
            "too few answers and panics are internal errors for the whole batch; a batch's \
             error keeps its class; bad input fails alone; the worker carries on"
        );
        assert_eq!(restarts, 1, "the panic is counted");
    }

    #[test]
    fn scaling_up_replaces_workers_so_their_threads_never_exceed_the_cores() {
        let (batch_tx, batch_rx) = flume::bounded::<Vec<Job>>(0);
        let mut pool = WorkerPool::new(
            Arc::new(Misbehaving),
            batch_rx,
            Arc::new(IdleWorkers::default()),
            ModelLabels::new("scaled", "1"),
            None,
            None,
        );
        let cores = cores();
        for (min, max) in [(1, 1), (2, 2), (1, 4), (1, 1)] {
            pool.scale(min, max).expect("workers");
            let threads: Vec<usize> = pool.describe().iter().map(|w| w.threads).collect();
            assert_eq!(threads.len(), min);
            let each = (cores / max).max(1);
            assert!(
                threads.iter().all(|&t| t == each),
                "range {min}..={max} on {cores} cores: {threads:?}"
            );
        }
        drop(batch_tx);
        for thread in pool.retire() {
            thread
                .join()
                .expect("the worker exits once its channel closes");
        }
    }

    #[test]
    fn workers_divide_the_cores_unless_told() {
        assert_eq!(worker_threads(None, 16, 1), 16);
        assert_eq!(worker_threads(None, 16, 4), 4);
        assert_eq!(worker_threads(None, 2, 2), 1);
        assert_eq!(worker_threads(None, 2, 3), 1, "never zero");
        assert_eq!(worker_threads(Some(3), 2, 2), 3, "an explicit count wins");
    }
}
