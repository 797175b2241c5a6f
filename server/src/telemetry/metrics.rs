//! Every metric the server records: the names (TorchServe's where it has one, `spillway_*`
//! otherwise), their help texts, the Prometheus recorder, and small recording helpers so
//! call sites never spell a metric name.
//!
//! Two stores, one text: Spillway's own `spillway_*` series live in the
//! `metrics-exporter-prometheus` recorder and print as it prints them; TorchServe's families
//! ([`TS_FAMILIES`], its `ts/configs/metrics.yaml` in `prometheus` mode) live here and print
//! as TorchServe's Java Prometheus client (simpleclient 0.9) prints them — a trailing comma
//! after the last label, values in Java's `Double.toString` form (`3.0`, `1.2345678E7`), and
//! `# HELP` saying "Torchserve prometheus counter metric with unit: Count" — so what parses
//! TorchServe's `/metrics` parses Spillway's ([`render`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use spillway_handlers::PrefixCacheTotals;
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

/// Every response of the three APIs with a 2XX status, per host (TorchServe's name; it
/// counts in the frontend).
pub const REQUESTS_2XX: &str = "Requests2XX";
/// Every response with a 4XX status (TorchServe's name).
pub const REQUESTS_4XX: &str = "Requests4XX";
/// Every other response: 5XX, and 1XX and 3XX as TorchServe counts them (TorchServe's name).
pub const REQUESTS_5XX: &str = "Requests5XX";
/// Whole milliseconds the most recent job waited in its queue, per host (TorchServe's name).
pub const QUEUE_TIME_MS: &str = "QueueTime";
/// Whole milliseconds the most recent batch spent in the handler, per host (TorchServe's name).
pub const WORKER_THREAD_TIME_MS: &str = "WorkerThreadTime";
/// Whole milliseconds each model took to load, by `WorkerName` (TorchServe's name).
pub const WORKER_LOAD_TIME_MS: &str = "WorkerLoadTime";
/// Host CPU utilization between two scrapes, percent (TorchServe's name).
pub const CPU_UTILIZATION: &str = "CPUUtilization";
/// Host memory in use (total − available), megabytes (TorchServe's name).
pub const MEMORY_USED_MB: &str = "MemoryUsed";
/// Host memory available, megabytes (TorchServe's name).
pub const MEMORY_AVAILABLE_MB: &str = "MemoryAvailable";
/// Host memory in use, percent of the total (TorchServe's name).
pub const MEMORY_UTILIZATION: &str = "MemoryUtilization";
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
/// Prompt tokens a generator looked up in its prefix cache.
pub const PREFIX_LOOKUP_TOKENS_TOTAL: &str = "spillway_prefix_cache_lookup_tokens_total";
/// Prompt tokens found there (their keys and values not computed again).
pub const PREFIX_HIT_TOKENS_TOTAL: &str = "spillway_prefix_cache_hit_tokens_total";
/// Bytes the prefix cache holds now.
pub const PREFIX_CACHE_BYTES: &str = "spillway_prefix_cache_bytes";

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
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
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
    for (name, help) in [
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
            PREFIX_LOOKUP_TOKENS_TOTAL,
            "Prompt tokens looked up in the model's prefix cache.",
        ),
        (
            PREFIX_HIT_TOKENS_TOTAL,
            "Prompt tokens found in the model's prefix cache (not computed again).",
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
    describe_gauge!(QUEUE_DEPTH, "Jobs waiting in the model's queue.");
    describe_gauge!(
        PREFIX_CACHE_BYTES,
        Unit::Bytes,
        "Bytes the model's prefix cache holds."
    );
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

/// A TorchServe metric family: its name, Prometheus type, the `unit` its `metrics.yaml`
/// gives it (printed in `# HELP`), and its label names in TorchServe's order.
pub struct TsFamily {
    pub name: &'static str,
    pub kind: &'static str,
    pub unit: &'static str,
    pub labels: &'static [&'static str],
}

/// TorchServe's frontend and system labels: `Level` (always `Host`) and `Hostname`.
const HOST: &[&str] = &["Level", "Hostname"];
/// TorchServe's per-model counters' labels, lower case as its `metrics.yaml` spells them.
const MODEL: &[&str] = &["model_name", "model_version", "hostname"];
const GPU: &[&str] = &["Level", "DeviceId", "Hostname"];

const fn family(
    name: &'static str,
    kind: &'static str,
    unit: &'static str,
    labels: &'static [&'static str],
) -> TsFamily {
    TsFamily {
        name,
        kind,
        unit,
        labels,
    }
}

/// The TorchServe families Spillway exports, as TorchServe 0.8–0.12 registers them from
/// `ts/configs/metrics.yaml` in `prometheus` mode. Each prints its `# HELP` and `# TYPE`
/// from start-up, samples or not, as TorchServe's do. Left out, because Spillway measures
/// nothing they would hold: `DiskUsage`, `DiskUtilization`, `DiskAvailable`,
/// `GPUUtilization`, and the handler-reported `HandlerTime` and `PredictionTime`.
pub const TS_FAMILIES: &[TsFamily] = &[
    family(REQUESTS_2XX, "counter", "Count", HOST),
    family(REQUESTS_4XX, "counter", "Count", HOST),
    family(REQUESTS_5XX, "counter", "Count", HOST),
    family(INFERENCE_REQUESTS_TOTAL, "counter", "Count", MODEL),
    family(INFERENCE_LATENCY_US, "counter", "Microseconds", MODEL),
    family(QUEUE_LATENCY_US, "counter", "Microseconds", MODEL),
    family(QUEUE_TIME_MS, "gauge", "Milliseconds", HOST),
    family(WORKER_THREAD_TIME_MS, "gauge", "Milliseconds", HOST),
    family(
        WORKER_LOAD_TIME_MS,
        "gauge",
        "Milliseconds",
        &["WorkerName", "Level", "Hostname"],
    ),
    family(CPU_UTILIZATION, "gauge", "Percent", HOST),
    family(MEMORY_USED_MB, "gauge", "Megabytes", HOST),
    family(MEMORY_AVAILABLE_MB, "gauge", "Megabytes", HOST),
    family(MEMORY_UTILIZATION, "gauge", "Percent", HOST),
    family(GPU_MEMORY_UTILIZATION, "gauge", "Percent", GPU),
    family(GPU_MEMORY_USED_MB, "gauge", "Megabytes", GPU),
];

/// One TorchServe sample: an `f64` kept as its bits, so a request updates it without a
/// lock (the store's lock is taken once, when a label set is first seen).
#[derive(Debug, Default)]
struct TsCell(AtomicU64);

impl TsCell {
    fn add(&self, delta: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + delta).to_bits())
            });
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// TorchServe's families' samples: family name → label values (in the family's label
/// order) → value.
type TsSamples = BTreeMap<&'static str, BTreeMap<Vec<String>, Arc<TsCell>>>;

fn ts_samples() -> std::sync::MutexGuard<'static, TsSamples> {
    static SAMPLES: Mutex<TsSamples> = Mutex::new(BTreeMap::new());
    SAMPLES.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sample of TorchServe family `name` with label `values`, made at its first use.
fn ts_cell(name: &'static str, values: Vec<String>) -> Arc<TsCell> {
    ts_samples()
        .entry(name)
        .or_default()
        .entry(values)
        .or_default()
        .clone()
}

/// Sets a TorchServe gauge.
fn ts_set(name: &'static str, values: Vec<String>, value: f64) {
    ts_cell(name, values).set(value);
}

/// The host-level samples every request updates, each looked up once, at its first use.
#[derive(Default)]
struct HostCells {
    requests_2xx: OnceLock<Arc<TsCell>>,
    requests_4xx: OnceLock<Arc<TsCell>>,
    requests_5xx: OnceLock<Arc<TsCell>>,
    queue_time: OnceLock<Arc<TsCell>>,
    worker_thread_time: OnceLock<Arc<TsCell>>,
}

fn host_cells() -> &'static HostCells {
    static CELLS: OnceLock<HostCells> = OnceLock::new();
    CELLS.get_or_init(HostCells::default)
}

/// The host-level sample of `family` held in `cell`.
fn host_cell<'a>(cell: &'a OnceLock<Arc<TsCell>>, family: &'static str) -> &'a TsCell {
    cell.get_or_init(|| ts_cell(family, host()))
}

/// `d` as Java's `Double.toString` writes it, which TorchServe's Prometheus client prints
/// (`Collector.doubleToGoString`): `3.0`, `290371.129`; from 10⁷ up and below 10⁻³ in
/// Java's scientific form, `1.2345678E7`, `5.0E-4`; `+Inf`, `-Inf`, `NaN`.
pub fn java_double(d: f64) -> String {
    if d.is_nan() {
        return "NaN".into();
    }
    if d.is_infinite() {
        return if d > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let magnitude = d.abs();
    if magnitude == 0.0 || (1e-3..1e7).contains(&magnitude) {
        // Rust's shortest round-trip digits, as Java's; Java always shows a fraction.
        let text = format!("{d}");
        return if text.contains('.') {
            text
        } else {
            format!("{text}.0")
        };
    }
    let text = format!("{d:e}");
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let mantissa = if mantissa.contains('.') {
        mantissa.to_string()
    } else {
        format!("{mantissa}.0")
    };
    format!("{mantissa}E{exponent}")
}

/// A label value escaped as in the text format: `\`, `\"` and `\n`.
fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Whether a sample named `sample` of family `family` is wanted: all of them, or those
/// named in `GET /metrics?name[]=...` (a sample's name, as TorchServe filters; or its
/// family's, for a Spillway histogram's `_bucket`, `_sum` and `_count`).
fn wanted(names: Option<&BTreeSet<String>>, family: &str, sample: &str) -> bool {
    names.is_none_or(|names| names.contains(sample) || names.contains(family))
}

/// TorchServe's families as its Java client prints them (`TextFormat.write004`): per
/// family `# HELP` and `# TYPE`, then one line per label set, each label followed by
/// `",`. Unfiltered, a family with no samples yet still prints its two header lines;
/// filtered, it is left out (as `filteredMetricFamilySamples` leaves it).
fn render_torchserve(names: Option<&BTreeSet<String>>, out: &mut String) {
    use std::fmt::Write;
    let samples = ts_samples();
    for family in TS_FAMILIES {
        let children = samples.get(family.name);
        let count = children.map_or(0, |c| c.len());
        if names.is_some() && (count == 0 || !wanted(names, family.name, family.name)) {
            continue;
        }
        let _ = writeln!(
            out,
            "# HELP {0} Torchserve prometheus {1} metric with unit: {2}\n# TYPE {0} {1}",
            family.name, family.kind, family.unit
        );
        for (values, value) in children.into_iter().flatten() {
            out.push_str(family.name);
            out.push('{');
            for (label, value) in family.labels.iter().zip(values) {
                out.push_str(label);
                out.push_str("=\"");
                escape_label(value, out);
                out.push_str("\",");
            }
            out.push_str("} ");
            out.push_str(&java_double(value.get()));
            out.push('\n');
        }
    }
}

/// Keeps the samples of `text` (the exporter's output) that `names` asks for, and the
/// `# HELP`/`# TYPE` lines of each family that keeps one.
fn filter_exposition(text: &str, names: &BTreeSet<String>, out: &mut String) {
    let mut header: Vec<&str> = Vec::new();
    let mut family = "";
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
        {
            let name = rest.split(' ').next().unwrap_or("");
            if name != family {
                header.clear();
                family = name;
            }
            header.push(line);
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if line.is_empty() || line.starts_with('#') || !wanted(Some(names), family, sample) {
            continue;
        }
        for h in header.drain(..) {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
}

/// The whole `/metrics` text: TorchServe's families as TorchServe prints them, then
/// Spillway's own from the exporter. With `names` (`?name[]=...`), only those samples.
pub fn render(handle: &PrometheusHandle, names: Option<&BTreeSet<String>>) -> String {
    let mut out = String::new();
    render_torchserve(names, &mut out);
    let exported = handle.render();
    match names {
        None => out.push_str(&exported),
        Some(names) => filter_exposition(&exported, names, &mut out),
    }
    out
}

/// What a scrape samples of one serving model.
pub struct ModelSample {
    pub labels: ModelLabels,
    pub queue_depth: usize,
    pub streamed: StreamTotals,
    pub prefix_cache: Option<PrefixCacheTotals>,
}

/// The host's name, as TorchServe's `Hostname` label gives it.
fn hostname() -> &'static str {
    static HOSTNAME: OnceLock<String> = OnceLock::new();
    HOSTNAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    })
}

/// TorchServe's host-level label values: `Level="Host"`, `Hostname`.
fn host() -> Vec<String> {
    vec!["Host".into(), hostname().into()]
}

/// One response of any of the three APIs, counted by status as TorchServe's
/// `NettyUtils.sendHttpResponse` counts it: 2XX, 4XX, and everything else (5XX, and the
/// 1XX and 3XX that TorchServe also counts there) in `Requests5XX`.
pub fn response(status: u16) {
    let cells = host_cells();
    let (cell, family) = match status {
        200..=299 => (&cells.requests_2xx, REQUESTS_2XX),
        400..=499 => (&cells.requests_4xx, REQUESTS_4XX),
        _ => (&cells.requests_5xx, REQUESTS_5XX),
    };
    host_cell(cell, family).add(1.0);
}

/// Brings the values sampled at scrape time up to date: host CPU and memory, this
/// process's RSS, and each serving model's queue depth and disk-unit streaming totals.
pub fn refresh(models: &[ModelSample], pools: &[PoolView]) {
    if let Some(busy) = cpu_utilization() {
        ts_set(CPU_UTILIZATION, host(), busy);
    }
    if let Some(memory) = crate::devices::host_memory() {
        let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let used = memory.total_bytes - memory.available_bytes.min(memory.total_bytes);
        ts_set(MEMORY_USED_MB, host(), mb(used));
        ts_set(MEMORY_AVAILABLE_MB, host(), mb(memory.available_bytes));
        if memory.total_bytes > 0 {
            ts_set(
                MEMORY_UTILIZATION,
                host(),
                100.0 * used as f64 / memory.total_bytes as f64,
            );
        }
    }
    for gpu in crate::devices::gpus().found() {
        let labels = vec!["Host".into(), gpu.ordinal.to_string(), hostname().into()];
        let used = gpu.total.saturating_sub(gpu.free);
        ts_set(
            GPU_MEMORY_USED_MB,
            labels.clone(),
            used as f64 / (1024.0 * 1024.0),
        );
        if gpu.total > 0 {
            ts_set(
                GPU_MEMORY_UTILIZATION,
                labels,
                100.0 * used as f64 / gpu.total as f64,
            );
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
        if let Some(prefix) = model.prefix_cache {
            counter!(PREFIX_LOOKUP_TOKENS_TOTAL, &labels).absolute(prefix.lookup_tokens);
            counter!(PREFIX_HIT_TOKENS_TOTAL, &labels).absolute(prefix.hit_tokens);
            gauge!(PREFIX_CACHE_BYTES, &labels).set(prefix.bytes as f64);
        }
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

/// The `model_name` / `model_version` labels of one model, and the handles of the series
/// every request updates: made once, when the model is registered, so a request records
/// its metrics without building keys or taking the registry's locks.
#[derive(Clone)]
pub struct ModelLabels {
    name: String,
    version: String,
    per_request: Arc<PerRequest>,
}

impl std::fmt::Debug for ModelLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelLabels")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

/// The series a request or a batch updates, each made at its first use (so a series
/// appears in `/metrics` once something was counted in it, as before).
#[derive(Default)]
struct PerRequest {
    inference_requests: OnceLock<Arc<TsCell>>,
    inference_latency: OnceLock<Arc<TsCell>>,
    queue_latency: OnceLock<Arc<TsCell>>,
    request_seconds: OnceLock<metrics::Histogram>,
    /// `spillway_prediction_responses_total` by status class, 1XX to 5XX.
    by_status: [OnceLock<metrics::Counter>; 5],
    queue_wait_seconds: OnceLock<metrics::Histogram>,
    batches: OnceLock<metrics::Counter>,
    batch_size: OnceLock<metrics::Histogram>,
    handler_seconds: OnceLock<metrics::Histogram>,
}

impl ModelLabels {
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            name: name.to_string(),
            version: version.to_string(),
            per_request: Arc::default(),
        }
    }

    fn pairs(&self) -> [(&'static str, String); 2] {
        [
            ("model_name", self.name.clone()),
            ("model_version", self.version.clone()),
        ]
    }

    /// TorchServe's per-model sample of `family`: `model_name`, `model_version`,
    /// `hostname`.
    fn ts(&self, cell: &OnceLock<Arc<TsCell>>, family: &'static str) -> Arc<TsCell> {
        cell.get_or_init(|| {
            let values = vec![self.name.clone(), self.version.clone(), hostname().into()];
            ts_cell(family, values)
        })
        .clone()
    }

    fn histogram(
        &self,
        handle: &OnceLock<metrics::Histogram>,
        name: &'static str,
    ) -> metrics::Histogram {
        handle
            .get_or_init(|| histogram!(name, &self.pairs()))
            .clone()
    }

    fn counter(&self, handle: &OnceLock<metrics::Counter>, name: &'static str) -> metrics::Counter {
        handle.get_or_init(|| counter!(name, &self.pairs())).clone()
    }

    /// One prediction answered with `status` after `latency`.
    pub fn prediction(&self, status: u16, latency: Duration) {
        let series = &self.per_request;
        self.ts(&series.inference_requests, INFERENCE_REQUESTS_TOTAL)
            .add(1.0);
        self.ts(&series.inference_latency, INFERENCE_LATENCY_US)
            .add(micros(latency));
        self.histogram(&series.request_seconds, REQUEST_SECONDS)
            .record(latency.as_secs_f64());
        let class = status / 100;
        let slot = usize::from(class.clamp(1, 5)) - 1;
        series.by_status[slot]
            .get_or_init(|| {
                let [name, version] = self.pairs();
                counter!(
                    PREDICTIONS_BY_STATUS,
                    &[name, version, ("status", format!("{class}XX"))]
                )
            })
            .increment(1);
    }

    /// A job waited `waited` in the queue before its batch started.
    pub fn queued(&self, waited: Duration) {
        let series = &self.per_request;
        self.ts(&series.queue_latency, QUEUE_LATENCY_US)
            .add(micros(waited));
        self.histogram(&series.queue_wait_seconds, QUEUE_WAIT_SECONDS)
            .record(waited.as_secs_f64());
        host_cell(&host_cells().queue_time, QUEUE_TIME_MS).set(whole_ms(waited));
    }

    /// A batch of `size` requests goes to the handler.
    pub fn batch(&self, size: usize) {
        let series = &self.per_request;
        self.counter(&series.batches, BATCHES_TOTAL).increment(1);
        self.histogram(&series.batch_size, BATCH_SIZE)
            .record(size as f64);
    }

    /// The handler took `took` over a batch.
    pub fn handled(&self, took: Duration) {
        self.histogram(&self.per_request.handler_seconds, HANDLER_SECONDS)
            .record(took.as_secs_f64());
        host_cell(&host_cells().worker_thread_time, WORKER_THREAD_TIME_MS).set(whole_ms(took));
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
        // TorchServe names each worker `W-<port>-<model>_<version>`; one load here serves
        // all of a model's workers, named after its first (worker ids start at 9000).
        let worker = format!("W-9000-{}_{}", self.name, self.version);
        let mut values = vec![worker];
        values.extend(host());
        ts_set(WORKER_LOAD_TIME_MS, values, whole_ms(took));
    }
}

/// Microseconds with their fraction, as TorchServe adds `nanoTime` differences / 1000.0.
fn micros(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// Whole milliseconds, as TorchServe's `TimeUnit.MILLISECONDS.convert` gives them.
fn whole_ms(d: Duration) -> f64 {
    d.as_millis() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Java's `Double.toString` for the same values (JDK 17 and 21 agree on these).
    #[test]
    fn values_print_as_javas_double_to_string() {
        for (value, java) in [
            (0.0, "0.0"),
            (3.0, "3.0"),
            (-1.0, "-1.0"),
            (290371.129, "290371.129"),
            (365.21, "365.21"),
            (0.001, "0.001"),
            (9_999_999.0, "9999999.0"),
            (1e7, "1.0E7"),
            (12_345_678.0, "1.2345678E7"),
            (1.5e10, "1.5E10"),
            (5e-4, "5.0E-4"),
            (1.25e-7, "1.25E-7"),
            (20.054508209228516, "20.054508209228516"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(java_double(value), java, "{value}");
        }
    }

    /// TorchServe's lines, from its docs/metrics_api.md and test_metrics.py: header-only
    /// families until something is counted, a comma after every label, `.0` values.
    #[test]
    fn torchserve_families_print_as_torchserve_prints_them() {
        let labels = ModelLabels::new("m\"x", "1.0");
        labels.prediction(200, Duration::from_micros(1500));
        labels.prediction(200, Duration::from_nanos(2_500_500));
        let mut text = String::new();
        render_torchserve(None, &mut text);
        let host = hostname();
        for line in [
            "# HELP Requests2XX Torchserve prometheus counter metric with unit: Count",
            "# TYPE Requests2XX counter",
            "# HELP ts_inference_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds",
            "# TYPE QueueTime gauge",
            "# HELP MemoryUsed Torchserve prometheus gauge metric with unit: Megabytes",
            &format!(
                r#"ts_inference_requests_total{{model_name="m\"x",model_version="1.0",hostname="{host}",}} 2.0"#
            ),
            &format!(
                r#"ts_inference_latency_microseconds{{model_name="m\"x",model_version="1.0",hostname="{host}",}} 4000.5"#
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        // Filtered, only what was asked for, and no family without a sample.
        let names = BTreeSet::from([
            "ts_inference_requests_total".to_string(),
            "GPUMemoryUsed".into(),
        ]);
        let mut filtered = String::new();
        render_torchserve(Some(&names), &mut filtered);
        assert!(
            filtered.starts_with("# HELP ts_inference_requests_total "),
            "{filtered}"
        );
        assert!(!filtered.contains("GPUMemoryUsed") || !crate::devices::gpus().found().is_empty());
        assert!(!filtered.contains("latency"), "{filtered}");
    }

    #[test]
    fn filtering_the_exporters_text_keeps_the_headers_of_kept_samples() {
        let text = "# HELP a_seconds A.\n# TYPE a_seconds histogram\na_seconds_bucket{le=\"1\"} 1\na_seconds_sum 0.5\na_seconds_count 1\n\n# TYPE b gauge\nb 2\n";
        let mut out = String::new();
        filter_exposition(
            text,
            &BTreeSet::from(["a_seconds_count".to_string()]),
            &mut out,
        );
        assert_eq!(
            out,
            "# HELP a_seconds A.\n# TYPE a_seconds histogram\na_seconds_count 1\n"
        );
        out.clear();
        filter_exposition(
            text,
            &BTreeSet::from(["a_seconds".to_string(), "b".into()]),
            &mut out,
        );
        assert_eq!(out.lines().count(), 7, "{out}");
    }
}
