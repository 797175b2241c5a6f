//! Every metric the server records: the names (TorchServe's where it has one, `spillway_*`
//! otherwise), their help texts, the Prometheus recorder, and small recording helpers so
//! call sites never spell a metric name.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use spillway_handlers::weights::layer_stack::StreamTotals;
use spillway_placement::Plan;

use crate::devices::manager::PoolView;

/// Requests answered by the predictions API, by model (TorchServe's name).
pub const INFERENCE_REQUESTS_TOTAL: &str = "ts_inference_requests_total";
/// Cumulative time from request to answer, microseconds (TorchServe's name and meaning).
pub const INFERENCE_LATENCY_US: &str = "ts_inference_latency_microseconds";
/// Cumulative time requests waited in the job queue, microseconds (TorchServe's name).
pub const QUEUE_LATENCY_US: &str = "ts_queue_latency_microseconds";
/// How long the model took to load, seconds.
pub const MODEL_LOAD_SECONDS: &str = "spillway_model_load_seconds";
/// Prediction answers by status class.
pub const PREDICTIONS_BY_STATUS: &str = "spillway_prediction_responses_total";
/// Batches run by workers.
pub const BATCHES_TOTAL: &str = "spillway_batches_total";
/// Queued requests dropped before running because their client was gone.
pub const DROPPED_REQUESTS_TOTAL: &str = "spillway_dropped_requests_total";
/// Worker panics (each restarts the worker's loop).
pub const WORKER_RESTARTS_TOTAL: &str = "spillway_worker_restarts_total";

/// Successful prediction answers, per host (TorchServe's name; it counts in the frontend).
pub const REQUESTS_2XX: &str = "Requests2XX";
/// Prediction answers with a client error (TorchServe's name).
pub const REQUESTS_4XX: &str = "Requests4XX";
/// Prediction answers with a server error, 503 and 504 included (TorchServe's name).
pub const REQUESTS_5XX: &str = "Requests5XX";
/// Milliseconds the most recent job waited in its queue (TorchServe's name).
pub const QUEUE_TIME_MS: &str = "QueueTime";
/// Milliseconds the most recent batch spent in the handler (TorchServe's name).
pub const WORKER_THREAD_TIME_MS: &str = "WorkerThreadTime";
/// Milliseconds the model took to load (TorchServe's name).
pub const WORKER_LOAD_TIME_MS: &str = "WorkerLoadTime";
/// Host CPU utilization between two scrapes, percent (TorchServe's name).
pub const CPU_UTILIZATION: &str = "CPUUtilization";
/// Host memory in use (total − available), megabytes (TorchServe's name).
pub const MEMORY_USED_MB: &str = "MemoryUsed";
/// Host memory available, megabytes (TorchServe's name).
pub const MEMORY_AVAILABLE_MB: &str = "MemoryAvailable";
/// GPU memory in use on each GPU, megabytes (TorchServe's name; CUDA builds).
pub const GPU_MEMORY_USED_MB: &str = "GPUMemoryUsed";
/// GPU memory in use on each GPU, percent of its total (TorchServe's name; CUDA builds).
pub const GPU_MEMORY_UTILIZATION: &str = "GPUMemoryUtilization";
/// This process's resident memory, bytes.
pub const PROCESS_RESIDENT_BYTES: &str = "spillway_process_resident_bytes";
/// Request to answer, seconds (histogram; buckets from 50 µs).
pub const REQUEST_SECONDS: &str = "spillway_request_duration_seconds";
/// Time in the job queue before a worker took the batch, seconds (histogram).
pub const QUEUE_WAIT_SECONDS: &str = "spillway_queue_wait_seconds";
/// Handler time per batch, seconds (histogram).
pub const HANDLER_SECONDS: &str = "spillway_handler_duration_seconds";
/// Requests per batch (histogram).
pub const BATCH_SIZE: &str = "spillway_batch_size";
/// Jobs waiting in the model's queue at scrape time.
pub const QUEUE_DEPTH: &str = "spillway_queue_depth";
/// Requests refused with 503 because the queue was full.
pub const REJECTED_TOTAL: &str = "spillway_rejected_requests_total";
/// Requests answered 504 because the response timeout passed.
pub const TIMED_OUT_TOTAL: &str = "spillway_timed_out_requests_total";
/// Weight bytes the plan put on each device.
pub const PLACED_BYTES: &str = "spillway_placed_bytes";
/// The budget (`max_memory` or detected) of each device the plan used.
pub const DEVICE_BUDGET_BYTES: &str = "spillway_device_budget_bytes";
pub const DEVICE_USED_BYTES: &str = "spillway_device_used_bytes";
pub const DEVICE_FREE_BYTES: &str = "spillway_device_free_bytes";
pub const EVICTIONS_TOTAL: &str = "spillway_evictions_total";
pub const RELOADS_TOTAL: &str = "spillway_reloads_total";
/// Times a model stopped serving because a weight file changed under it.
pub const WEIGHTS_CHANGED_TOTAL: &str = "spillway_weights_changed_total";
pub const PROMOTIONS_TOTAL: &str = "spillway_promotions_total";
pub const PROMOTION_SECONDS: &str = "spillway_promotion_seconds";
/// Disk units materialized for a forward pass (process-wide).
pub const STREAMED_UNITS_TOTAL: &str = "spillway_streamed_units_total";
/// Bytes read from disk units for forward passes (process-wide).
pub const STREAMED_BYTES_TOTAL: &str = "spillway_streamed_bytes_total";
/// Time spent materializing disk units, microseconds (process-wide; overlaps compute
/// when read ahead).
pub const MATERIALIZE_US_TOTAL: &str = "spillway_materialize_microseconds_total";

/// Latency buckets, seconds: 50 µs resolves the server's own overhead, 60 s covers a
/// long generation.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = [REQUEST_SECONDS, QUEUE_WAIT_SECONDS, HANDLER_SECONDS]
                .into_iter()
                .try_fold(PrometheusBuilder::new(), |b, name| {
                    b.set_buckets_for_metric(Matcher::Full(name.into()), LATENCY_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS)
                })
                .unwrap_or_else(|e| {
                    tracing::warn!("histogram buckets not set ({e}); using the default");
                    PrometheusBuilder::new()
                });
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder can only be present if an embedding program installed one;
            // ours then stays unused and /metrics shows nothing, which the log says.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            // The baseline of the first CPUUtilization sample.
            let _ = cpu_utilization();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        INFERENCE_REQUESTS_TOTAL,
        "Total number of inference requests."
    );
    describe_counter!(
        INFERENCE_LATENCY_US,
        Unit::Microseconds,
        "Cumulative inference duration in microseconds."
    );
    describe_counter!(
        QUEUE_LATENCY_US,
        Unit::Microseconds,
        "Cumulative queue duration in microseconds."
    );
    describe_gauge!(
        PROMOTION_SECONDS,
        Unit::Seconds,
        "Time the last promotion of the model's units from disk took, in seconds (an evicted model's reload time is its load time)."
    );
    describe_gauge!(
        MODEL_LOAD_SECONDS,
        Unit::Seconds,
        "Time the model took to load, in seconds."
    );
    describe_counter!(
        PREDICTIONS_BY_STATUS,
        "Prediction responses by HTTP status class."
    );
    describe_counter!(BATCHES_TOTAL, "Batches run by the model's workers.");
    describe_counter!(
        DROPPED_REQUESTS_TOTAL,
        "Queued requests dropped because the client had gone."
    );
    describe_counter!(
        WORKER_RESTARTS_TOTAL,
        "Worker restarts after a handler panic."
    );
    use metrics::describe_histogram;
    for (name, help) in [
        (REQUESTS_2XX, "Prediction answers with a 2XX status."),
        (REQUESTS_4XX, "Prediction answers with a 4XX status."),
        (REQUESTS_5XX, "Prediction answers with a 5XX status."),
        (
            REJECTED_TOTAL,
            "Requests refused with 503: the queue was full.",
        ),
        (
            TIMED_OUT_TOTAL,
            "Requests answered 504: the response timeout passed.",
        ),
        (
            STREAMED_UNITS_TOTAL,
            "Disk units materialized for forward passes.",
        ),
        (
            EVICTIONS_TOTAL,
            "Times the model was evicted to make room for another (strategy label).",
        ),
        (
            RELOADS_TOTAL,
            "Times an evicted model was loaded again for a request.",
        ),
        (
            WEIGHTS_CHANGED_TOTAL,
            "Times the model was unloaded because a file its weights are mapped from was truncated or rewritten under it.",
        ),
        (
            PROMOTIONS_TOTAL,
            "Times a model evicted to disk had its units made resident again for a request.",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_counter!(
        STREAMED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes read from disk units for forward passes."
    );
    describe_counter!(
        MATERIALIZE_US_TOTAL,
        Unit::Microseconds,
        "Time spent materializing disk units."
    );
    for (name, help) in [
        (
            QUEUE_TIME_MS,
            "Milliseconds the last job waited in the queue.",
        ),
        (
            WORKER_THREAD_TIME_MS,
            "Milliseconds the last batch spent in the handler.",
        ),
        (WORKER_LOAD_TIME_MS, "Milliseconds the model took to load."),
        (
            CPU_UTILIZATION,
            "Host CPU utilization since the last scrape, percent.",
        ),
        (MEMORY_USED_MB, "Host memory in use, megabytes."),
        (MEMORY_AVAILABLE_MB, "Host memory available, megabytes."),
        (GPU_MEMORY_USED_MB, "GPU memory in use, megabytes."),
        (
            GPU_MEMORY_UTILIZATION,
            "GPU memory in use, percent of the GPU's total.",
        ),
        (QUEUE_DEPTH, "Jobs waiting in the model's queue."),
    ] {
        describe_gauge!(name, help);
    }
    for (name, help) in [
        (PROCESS_RESIDENT_BYTES, "Resident memory of this process."),
        (
            PLACED_BYTES,
            "Weight bytes placed on each device by the model's plan.",
        ),
        (
            DEVICE_BUDGET_BYTES,
            "Each device's budget in the model's plan.",
        ),
        (
            DEVICE_USED_BYTES,
            "Bytes the device manager's models hold on each managed device (given back when a model's workers are joined).",
        ),
        (
            DEVICE_FREE_BYTES,
            "Bytes left in each managed device's budget.",
        ),
    ] {
        describe_gauge!(name, Unit::Bytes, help);
    }
    for (name, help) in [
        (REQUEST_SECONDS, "Prediction request to answer."),
        (
            QUEUE_WAIT_SECONDS,
            "Time a job waited before its batch started.",
        ),
        (HANDLER_SECONDS, "Handler time per batch."),
    ] {
        describe_histogram!(name, Unit::Seconds, help);
    }
    describe_histogram!(BATCH_SIZE, "Requests per batch.");
}

/// What a scrape samples of one serving model.
pub struct ModelSample {
    pub labels: ModelLabels,
    pub queue_depth: usize,
    pub streamed: StreamTotals,
}

/// TorchServe's labels for host-level metrics: `Level="Host"` and the `Hostname`.
pub fn host_labels() -> [(&'static str, String); 2] {
    static HOSTNAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hostname = HOSTNAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    });
    [("Level", "Host".into()), ("Hostname", hostname.clone())]
}

/// One API response, counted by status class as TorchServe's `Requests2XX`,
/// `Requests4XX` and `Requests5XX` count every response of its inference and
/// management APIs (unknown models and refused bodies included).
pub fn response(status: u16) {
    let name = match status {
        200..=299 => REQUESTS_2XX,
        400..=499 => REQUESTS_4XX,
        500..=599 => REQUESTS_5XX,
        _ => return,
    };
    counter!(name, &host_labels()).increment(1);
}

/// Brings the values sampled at scrape time up to date: host CPU and memory, this
/// process's RSS, and each serving model's queue depth and disk-unit streaming totals.
pub fn refresh(models: &[ModelSample], pools: &[PoolView]) {
    let host = host_labels();
    if let Some(busy) = cpu_utilization() {
        gauge!(CPU_UTILIZATION, &host).set(busy);
    }
    if let Some(memory) = crate::devices::host_memory() {
        let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        gauge!(MEMORY_USED_MB, &host).set(mb(
            memory.total_bytes - memory.available_bytes.min(memory.total_bytes)
        ));
        gauge!(MEMORY_AVAILABLE_MB, &host).set(mb(memory.available_bytes));
    }
    for gpu in crate::devices::gpus().found() {
        let labels = [
            host[0].clone(),
            ("device_id", gpu.ordinal.to_string()),
            host[1].clone(),
        ];
        let used = gpu.total.saturating_sub(gpu.free);
        gauge!(GPU_MEMORY_USED_MB, &labels).set(used as f64 / (1024.0 * 1024.0));
        if gpu.total > 0 {
            gauge!(GPU_MEMORY_UTILIZATION, &labels).set(100.0 * used as f64 / gpu.total as f64);
        }
    }
    if let Some(rss) = process_rss_bytes() {
        gauge!(PROCESS_RESIDENT_BYTES).set(rss as f64);
    }
    for pool in pools {
        gauge!(DEVICE_USED_BYTES, "device" => pool.device.clone()).set(pool.used as f64);
        gauge!(DEVICE_FREE_BYTES, "device" => pool.device.clone()).set(pool.free as f64);
    }
    for model in models {
        let labels = model.labels.pairs();
        gauge!(QUEUE_DEPTH, &labels).set(model.queue_depth as f64);
        counter!(STREAMED_UNITS_TOTAL, &labels).absolute(model.streamed.units);
        counter!(STREAMED_BYTES_TOTAL, &labels).absolute(model.streamed.bytes);
        counter!(MATERIALIZE_US_TOTAL, &labels).absolute(model.streamed.nanos / 1000);
    }
}

/// (busy, total) jiffies of the host from /proc/stat's first line.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle + iowait are not busy.
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Percent of host CPU busy since the previous sample that is at least a clock tick
/// old (the first sample is taken when the recorder is installed).
fn cpu_utilization() -> Option<f64> {
    static LAST: Mutex<Option<(u64, u64)>> = Mutex::new(None);
    let now = cpu_jiffies()?;
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let Some(before) = *last else {
        *last = Some(now);
        return None;
    };
    let (busy, total) = (
        now.0.saturating_sub(before.0),
        now.1.saturating_sub(before.1),
    );
    if total == 0 {
        return None;
    }
    *last = Some(now);
    Some(busy as f64 * 100.0 / total as f64)
}

fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// The `model_name` / `model_version` labels of one model.
#[derive(Debug, Clone)]
pub struct ModelLabels {
    name: String,
    version: String,
}

impl ModelLabels {
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            name: name.to_string(),
            version: version.to_string(),
        }
    }

    fn pairs(&self) -> [(&'static str, String); 2] {
        [
            ("model_name", self.name.clone()),
            ("model_version", self.version.clone()),
        ]
    }

    /// One prediction answered with `status` after `latency`.
    pub fn prediction(&self, status: u16, latency: Duration) {
        counter!(INFERENCE_REQUESTS_TOTAL, &self.pairs()).increment(1);
        counter!(INFERENCE_LATENCY_US, &self.pairs()).increment(micros(latency));
        histogram!(REQUEST_SECONDS, &self.pairs()).record(latency.as_secs_f64());
        let class = format!("{}XX", status / 100);
        let [name, version] = self.pairs();
        counter!(PREDICTIONS_BY_STATUS, &[name, version, ("status", class)]).increment(1);
    }

    /// A job waited `waited` in the queue before its batch started.
    pub fn queued(&self, waited: Duration) {
        counter!(QUEUE_LATENCY_US, &self.pairs()).increment(micros(waited));
        histogram!(QUEUE_WAIT_SECONDS, &self.pairs()).record(waited.as_secs_f64());
        gauge!(QUEUE_TIME_MS, &self.pairs()).set(waited.as_secs_f64() * 1e3);
    }

    /// A batch of `size` requests goes to the handler.
    pub fn batch(&self, size: usize) {
        counter!(BATCHES_TOTAL, &self.pairs()).increment(1);
        histogram!(BATCH_SIZE, &self.pairs()).record(size as f64);
    }

    /// The handler took `took` over a batch.
    pub fn handled(&self, took: Duration) {
        histogram!(HANDLER_SECONDS, &self.pairs()).record(took.as_secs_f64());
        gauge!(WORKER_THREAD_TIME_MS, &self.pairs()).set(took.as_secs_f64() * 1e3);
    }

    /// A request refused because the queue was full (503).
    pub fn rejected(&self) {
        counter!(REJECTED_TOTAL, &self.pairs()).increment(1);
    }

    /// A request whose response timeout passed (504).
    pub fn timed_out(&self) {
        counter!(TIMED_OUT_TOTAL, &self.pairs()).increment(1);
    }

    /// The plan's weight bytes and budget per device.
    pub fn placed(&self, plan: &Plan) {
        for usage in &plan.devices {
            let [name, version] = self.pairs();
            let labels = [name, version, ("device", usage.device.to_string())];
            gauge!(PLACED_BYTES, &labels).set(usage.weights as f64);
            if let Some(budget) = usage.budget {
                gauge!(DEVICE_BUDGET_BYTES, &labels).set(budget as f64);
            }
        }
    }

    pub fn dropped(&self, jobs: usize) {
        counter!(DROPPED_REQUESTS_TOTAL, &self.pairs()).increment(jobs as u64);
    }

    pub fn evicted(&self, strategy: &'static str) {
        let [name, version] = self.pairs();
        counter!(
            EVICTIONS_TOTAL,
            &[name, version, ("strategy", strategy.to_string())]
        )
        .increment(1);
    }

    pub fn promoted(&self, took: Duration) {
        counter!(PROMOTIONS_TOTAL, &self.pairs()).increment(1);
        gauge!(PROMOTION_SECONDS, &self.pairs()).set(took.as_secs_f64());
    }

    pub fn reloaded(&self) {
        counter!(RELOADS_TOTAL, &self.pairs()).increment(1);
    }

    pub fn weights_changed(&self) {
        counter!(WEIGHTS_CHANGED_TOTAL, &self.pairs()).increment(1);
    }

    pub fn worker_restart(&self) {
        counter!(WORKER_RESTARTS_TOTAL, &self.pairs()).increment(1);
    }

    pub fn loaded(&self, took: Duration) {
        gauge!(MODEL_LOAD_SECONDS, &self.pairs()).set(took.as_secs_f64());
        gauge!(WORKER_LOAD_TIME_MS, &self.pairs()).set(took.as_secs_f64() * 1e3);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
