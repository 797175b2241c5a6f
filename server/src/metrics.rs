//! Every metric the server records: the names (TorchServe's where it has one, `spillway_*`
//! otherwise), their help texts, the Prometheus recorder, and small recording helpers so
//! call sites never spell a metric name.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder can only be present if an embedding program installed one;
            // ours then stays unused and /metrics shows nothing, which the log says.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
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
        let class = format!("{}XX", status / 100);
        let [name, version] = self.pairs();
        counter!(PREDICTIONS_BY_STATUS, &[name, version, ("status", class)]).increment(1);
    }

    /// A job waited `waited` in the queue before its batch started.
    pub fn queued(&self, waited: Duration) {
        counter!(QUEUE_LATENCY_US, &self.pairs()).increment(micros(waited));
    }

    pub fn batch(&self) {
        counter!(BATCHES_TOTAL, &self.pairs()).increment(1);
    }

    pub fn dropped(&self, jobs: usize) {
        counter!(DROPPED_REQUESTS_TOTAL, &self.pairs()).increment(jobs as u64);
    }

    pub fn worker_restart(&self) {
        counter!(WORKER_RESTARTS_TOTAL, &self.pairs()).increment(1);
    }

    pub fn loaded(&self, took: Duration) {
        gauge!(MODEL_LOAD_SECONDS, &self.pairs()).set(took.as_secs_f64());
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
