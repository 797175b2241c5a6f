//! [`ModelConfig`]: TorchServe's per-model `model-config.yaml` (`minWorkers`, `batchSize`,
//! `maxBatchDelay`, ...), with the registration API's query parameters applied on top.
//! Keys this server does not use (`parallelType`, ...) are accepted and ignored; the
//! `handler:` section is kept for the built-in handlers, as TorchServe passes it to its.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Worker and batching settings of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelConfig {
    pub min_workers: usize,
    pub max_workers: usize,
    pub batch_size: usize,
    pub max_batch_delay: Duration,
    pub response_timeout: Duration,
    /// `startupTimeout` (TorchServe's, default 120 s): a load that takes longer leaves
    /// the model FAILED.
    pub startup_timeout: Duration,
    /// `deviceType` as written ("cpu", "gpu"); with `deviceIds`, what the model asks of
    /// the device manager ([`ModelConfig::device_request`]).
    pub device_type: Option<String>,
    /// `deviceIds`: the GPUs the model is pinned to.
    pub device_ids: Option<Vec<usize>>,
    pub job_queue_size: Option<usize>,
    /// `continuousBatching` (TorchServe's name): generation requests join and leave a
    /// running batch between decode steps instead of running batch by batch.
    pub continuous_batching: bool,
    /// `threadsPerWorker`: threads one worker's compute may use. Unset: the cores divided
    /// among `maxWorkers` (at least one each), so busy workers do not oversubscribe the
    /// machine (`crate::serving::worker::WorkerPool`).
    pub threads_per_worker: Option<usize>,
    /// `maxBatchTokens` (text-embeddings-inference's `max_batch_tokens`): a batch also
    /// closes before its padded size (texts × longest text, in tokens) would pass this.
    pub max_batch_tokens: Option<usize>,
    /// The `handler:` section, as TorchServe hands it to its handler
    /// (`ctx.model_yaml_config["handler"]`): the built-in handlers read their own keys
    /// (image_classifier's `topk`).
    pub handler: serde_json::Map<String, serde_json::Value>,
}

/// The file as written: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModelConfigFile {
    min_workers: Option<usize>,
    max_workers: Option<usize>,
    batch_size: Option<usize>,
    /// Milliseconds.
    max_batch_delay: Option<u64>,
    /// Seconds.
    response_timeout: Option<u64>,
    /// Seconds.
    startup_timeout: Option<u64>,
    device_type: Option<String>,
    device_ids: Option<Vec<usize>>,
    job_queue_size: Option<usize>,
    continuous_batching: Option<bool>,
    threads_per_worker: Option<usize>,
    max_batch_tokens: Option<usize>,
    handler: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Registration-time overrides (`POST /models?batch_size=..&initial_workers=..`).
#[derive(Debug, Clone, Default)]
pub struct ModelConfigOverrides {
    pub initial_workers: Option<usize>,
    pub batch_size: Option<usize>,
    pub max_batch_delay_ms: Option<u64>,
    pub response_timeout_s: Option<u64>,
    pub startup_timeout_s: Option<u64>,
}

/// TorchServe's `startupTimeout` default.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Server-wide defaults a model config falls back to.
#[derive(Debug, Clone, Copy)]
pub struct ModelDefaults {
    pub workers: usize,
    pub response_timeout: Duration,
}

impl ModelConfig {
    /// Parses `model-config.yaml` text (or none) and applies overrides and defaults.
    pub fn parse(
        yaml: Option<&str>,
        overrides: &ModelConfigOverrides,
        defaults: ModelDefaults,
    ) -> Result<Self> {
        let file: ModelConfigFile = match yaml {
            Some(text) if !text.trim().is_empty() => serde_saphyr::from_str(text)
                .map_err(|e| Error::bad_config("model-config.yaml", e))?,
            _ => ModelConfigFile::default(),
        };
        let min_workers = overrides
            .initial_workers
            .or(file.min_workers)
            .unwrap_or(defaults.workers);
        let max_workers = file.max_workers.unwrap_or(min_workers).max(min_workers);
        let batch_size = overrides.batch_size.or(file.batch_size).unwrap_or(1);
        if batch_size == 0 {
            return Err(Error::bad_config(
                "model-config.yaml",
                "batchSize must be at least 1",
            ));
        }
        let config = ModelConfig {
            min_workers,
            max_workers,
            batch_size,
            max_batch_delay: Duration::from_millis(
                overrides
                    .max_batch_delay_ms
                    .or(file.max_batch_delay)
                    .unwrap_or(100),
            ),
            response_timeout: overrides
                .response_timeout_s
                .or(file.response_timeout)
                .map(Duration::from_secs)
                .unwrap_or(defaults.response_timeout),
            startup_timeout: overrides
                .startup_timeout_s
                .or(file.startup_timeout)
                .map_or(DEFAULT_STARTUP_TIMEOUT, Duration::from_secs),
            device_type: file.device_type,
            device_ids: file.device_ids,
            job_queue_size: file.job_queue_size,
            continuous_batching: file.continuous_batching.unwrap_or(false),
            threads_per_worker: file.threads_per_worker,
            max_batch_tokens: file.max_batch_tokens,
            handler: file.handler.unwrap_or_default(),
        };
        if config.max_batch_tokens == Some(0) {
            return Err(Error::bad_config(
                "model-config.yaml",
                "maxBatchTokens must be at least 1",
            ));
        }
        if config.threads_per_worker == Some(0) {
            return Err(Error::bad_config(
                "model-config.yaml",
                "threadsPerWorker must be at least 1",
            ));
        }
        if config.startup_timeout.is_zero() {
            return Err(Error::bad_config(
                "model-config.yaml",
                "startupTimeout must be at least 1 second",
            ));
        }
        if config.response_timeout.is_zero() {
            return Err(Error::bad_config(
                "model-config.yaml",
                "responseTimeout must be at least 1 second",
            ));
        }
        Ok(config)
    }
}

impl ModelConfig {
    /// What `deviceType` and `deviceIds` ask of the device manager: "cpu"; "gpu" (any
    /// one GPU); `deviceIds` pins GPUs. `None` when neither is given.
    pub fn device_request(&self) -> Result<Option<spillway_placement::DeviceRequest>> {
        use spillway_placement::DeviceRequest;
        let kind = self.device_type.as_deref().map(str::to_ascii_lowercase);
        Ok(match (kind.as_deref(), &self.device_ids) {
            (None, None) => None,
            (Some("cpu"), _) => Some(DeviceRequest::Cpu),
            (Some("gpu" | "cuda") | None, Some(ids)) if !ids.is_empty() => {
                Some(DeviceRequest::Gpus(ids.clone()))
            }
            (Some("gpu" | "cuda"), _) => Some(DeviceRequest::AnyGpus(1)),
            (None, Some(_)) => None,
            (Some(other), _) => {
                return Err(Error::bad_config(
                    "model-config.yaml",
                    format!("deviceType `{other}` is not one of cpu, gpu"),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: ModelDefaults = ModelDefaults {
        workers: 1,
        response_timeout: Duration::from_secs(120),
    };

    #[test]
    fn device_type_and_ids_are_what_the_model_asks_of_the_device_manager() {
        use spillway_placement::DeviceRequest;
        let request = |yaml: &str| parse(yaml).expect("parses").device_request();
        assert_eq!(request("minWorkers: 1").ok(), Some(None));
        assert_eq!(
            request("deviceType: gpu").ok(),
            Some(Some(DeviceRequest::AnyGpus(1)))
        );
        assert_eq!(
            request("deviceType: gpu\ndeviceIds: [0, 1]").ok(),
            Some(Some(DeviceRequest::Gpus(vec![0, 1])))
        );
        assert!(request("deviceType: tpu").is_err());
    }

    /// `yaml` with no registration overrides and the test defaults.
    fn parse(yaml: &str) -> Result<ModelConfig> {
        ModelConfig::parse(Some(yaml), &ModelConfigOverrides::default(), DEFAULTS)
    }

    #[test]
    fn reads_torchserve_keys_and_keeps_the_handler_section() {
        let yaml = "minWorkers: 2\nmaxWorkers: 4\nbatchSize: 8\nmaxBatchDelay: 5\nresponseTimeout: 30\n\
                    deviceType: cpu\nparallelType: pp\nhandler:\n  max_length: 50\n";
        let c = parse(yaml).expect("parse");
        assert_eq!((c.min_workers, c.max_workers, c.batch_size), (2, 4, 8));
        assert_eq!(c.max_batch_delay, Duration::from_millis(5));
        assert_eq!(c.response_timeout, Duration::from_secs(30));
        assert_eq!(c.device_type.as_deref(), Some("cpu"));
        assert_eq!(c.handler.get("max_length"), Some(&serde_json::json!(50)));
        assert_eq!(
            c.device_request().expect("valid"),
            Some(spillway_placement::DeviceRequest::Cpu)
        );
        assert!(!c.continuous_batching, "off unless asked for");
        let c = parse("continuousBatching: true\n").expect("parse");
        assert!(c.continuous_batching);
        assert_eq!(
            c.threads_per_worker, None,
            "unset: the pool divides the cores"
        );
        let c = parse("threadsPerWorker: 3\n").expect("parse");
        assert_eq!(c.threads_per_worker, Some(3));
        assert_eq!(c.max_batch_tokens, None);
        let c = parse("maxBatchTokens: 4096\n").expect("parse");
        assert_eq!(c.max_batch_tokens, Some(4096));
        assert_eq!(
            c.startup_timeout, DEFAULT_STARTUP_TIMEOUT,
            "TorchServe's 120 s"
        );
        let c = parse("startupTimeout: 30\n").expect("parse");
        assert_eq!(c.startup_timeout, Duration::from_secs(30));
        assert!(parse("startupTimeout: 0\n").is_err());
    }

    #[test]
    fn registration_parameters_override_the_file() {
        let overrides = ModelConfigOverrides {
            initial_workers: Some(3),
            batch_size: Some(4),
            max_batch_delay_ms: Some(50),
            response_timeout_s: Some(9),
            startup_timeout_s: Some(7),
        };
        let c = ModelConfig::parse(
            Some("minWorkers: 1\nbatchSize: 2\nstartupTimeout: 30\n"),
            &overrides,
            DEFAULTS,
        )
        .expect("parse");
        assert_eq!(c.startup_timeout, Duration::from_secs(7));
        assert_eq!((c.min_workers, c.max_workers, c.batch_size), (3, 3, 4));
        assert_eq!(c.max_batch_delay, Duration::from_millis(50));
        assert_eq!(c.response_timeout, Duration::from_secs(9));
    }

    #[test]
    fn no_file_gives_the_defaults_and_bad_yaml_is_an_error() {
        let c =
            ModelConfig::parse(None, &ModelConfigOverrides::default(), DEFAULTS).expect("parse");
        assert_eq!((c.min_workers, c.batch_size), (1, 1));
        assert_eq!(c.response_timeout, Duration::from_secs(120));
        let err = parse("batchSize: [oops").expect_err("bad yaml");
        assert!(err.to_string().contains("model-config.yaml"), "{err}");
        assert!(parse("batchSize: 0").is_err());
        for zero in ["threadsPerWorker: 0", "maxBatchTokens: 0"] {
            let err = parse(zero).expect_err(zero);
            let key = zero.split(':').next().unwrap_or_default();
            assert!(err.to_string().contains(key), "{err}");
        }
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_example_model_config_parses() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/model-config.yaml");
        let text = std::fs::read_to_string(path).expect("example");
        let defaults = ModelDefaults {
            workers: 1,
            response_timeout: Duration::from_secs(120),
        };
        let c = ModelConfig::parse(Some(&text), &ModelConfigOverrides::default(), defaults)
            .expect("valid");
        assert_eq!(
            (c.batch_size, c.max_batch_delay),
            (8, Duration::from_millis(5))
        );
    }
}
