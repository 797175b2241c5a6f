//! [`ServerConfig`]: the server's settings, merged once at start-up from (highest first)
//! command-line flags, `SPILLWAY_*` environment variables (both arrive as [`Overrides`]),
//! TorchServe's `config.properties`, and defaults.

pub mod model_config;
pub mod properties;
pub mod setup_config;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// Which models to load at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupModels {
    /// Every archive and model folder in the store.
    All,
    /// Only these (`NAME=ARCHIVE` or `ARCHIVE`, whose manifest names the model).
    List(Vec<StartupModel>),
}

/// One model named at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupModel {
    pub name: Option<String>,
    pub url: String,
}

impl std::str::FromStr for StartupModels {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(StartupModels::All);
        }
        let mut list = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if item.eq_ignore_ascii_case("standalone") {
                continue;
            }
            let model = match item.split_once('=') {
                Some((name, url)) if !name.trim().is_empty() && !url.trim().is_empty() => {
                    StartupModel {
                        name: Some(name.trim().to_string()),
                        url: url.trim().to_string(),
                    }
                }
                Some(_) => {
                    return Err(Error::bad_config(
                        "--models",
                        format!("`{item}`: expected NAME=ARCHIVE, ARCHIVE or all"),
                    ));
                }
                None => StartupModel {
                    name: None,
                    url: item.to_string(),
                },
            };
            list.push(model);
        }
        Ok(StartupModels::List(list))
    }
}

/// Settings given on the command line or in `SPILLWAY_*` variables: `spillway serve`'s
/// flags are derived from this one definition. `None` means "not given", so
/// config.properties or the default applies.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// TorchServe config.properties to read.
    #[arg(long, env = "SPILLWAY_TS_CONFIG")]
    pub ts_config: Option<PathBuf>,
    /// Folder of model archives [default: ./model-store].
    #[arg(long, env = "SPILLWAY_MODEL_STORE")]
    pub model_store: Option<PathBuf>,
    /// Models to load at start-up: `all`, or `NAME=ARCHIVE,...` / `ARCHIVE,...` [default: all].
    #[arg(long, env = "SPILLWAY_MODELS")]
    pub models: Option<String>,
    /// [default: 127.0.0.1:8080]
    #[arg(long, env = "SPILLWAY_INFERENCE_ADDRESS")]
    pub inference_address: Option<String>,
    /// [default: 127.0.0.1:8081]
    #[arg(long, env = "SPILLWAY_MANAGEMENT_ADDRESS")]
    pub management_address: Option<String>,
    /// [default: 127.0.0.1:8082]
    #[arg(long, env = "SPILLWAY_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Workers per model when its model-config.yaml names none [default: 1].
    #[arg(long, env = "SPILLWAY_DEFAULT_WORKERS_PER_MODEL")]
    pub default_workers_per_model: Option<usize>,
    /// Queued requests per model before 503 [default: 100].
    #[arg(long, env = "SPILLWAY_JOB_QUEUE_SIZE")]
    pub job_queue_size: Option<usize>,
    /// Largest request body in bytes [default: 6553500].
    #[arg(long, env = "SPILLWAY_MAX_REQUEST_SIZE")]
    pub max_request_size: Option<usize>,
    /// Largest response body in bytes [default: 6553500].
    #[arg(long, env = "SPILLWAY_MAX_RESPONSE_SIZE")]
    pub max_response_size: Option<usize>,
    /// Open connections each listener holds at once; past it, new ones wait in the
    /// kernel's backlog [default: 1024].
    #[arg(long, env = "SPILLWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers, and again its body, before the
    /// connection is closed (408 for a body) [default: 30].
    #[arg(long, env = "SPILLWAY_REQUEST_READ_TIMEOUT")]
    pub request_read_timeout: Option<usize>,
    /// Bearer token for the management API (required when it is off loopback).
    #[arg(long, env = "SPILLWAY_MANAGEMENT_TOKEN", hide_env_values = true)]
    pub management_token: Option<String>,
    /// Bearer token for the inference API.
    #[arg(long, env = "SPILLWAY_INFERENCE_TOKEN", hide_env_values = true)]
    pub inference_token: Option<String>,
    /// Where archives that cannot be mapped in place are unpacked [default: ~/.cache/spillway].
    #[arg(long, env = "SPILLWAY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Threads for HTTP and queues; model compute runs on its own threads [default: cores/2, at least 2].
    #[arg(long, env = "SPILLWAY_IO_THREADS")]
    pub io_threads: Option<usize>,
    /// Host RAM the device manager lets models hold, e.g. "8GiB" [default: what is free at start].
    #[arg(long, env = "SPILLWAY_MAX_HOST_MEMORY")]
    pub max_host_memory: Option<String>,
    /// GPUs the device manager uses, e.g. "cuda:0,cuda:1" [default: every visible GPU].
    #[arg(long, env = "SPILLWAY_MANAGED_DEVICES")]
    pub managed_devices: Option<String>,
    /// What evicting a model does: restart (unload; reload on its next request), disk (stream its units from disk; promote them on its next request), cpu (GPU units to host RAM, else disk) [default: restart].
    #[arg(long, env = "SPILLWAY_OFFLOAD_STRATEGY")]
    pub offload_strategy: Option<String>,
    /// Whether models may share a GPU (true/false) [default: false].
    #[arg(long, env = "SPILLWAY_ALLOW_MULTI_DEVICE")]
    pub allow_multiple_per_device: Option<bool>,
    /// TorchServe's `service_envelope`: `kserve` also serves KServe v1's
    /// `POST /v1/models/{model}:predict` [default: json].
    #[arg(long, env = "SPILLWAY_SERVICE_ENVELOPE")]
    pub service_envelope: Option<String>,
    /// Log lines as `text` (for people) or `json` (one object a line, for collectors)
    /// [default: text].
    #[arg(long, env = "SPILLWAY_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Watch the model store: register archives that appear, replace those that change,
    /// unregister those that go (true/false) [default: false].
    #[arg(long, env = "SPILLWAY_WATCH_MODEL_STORE")]
    pub watch_model_store: Option<bool>,
    /// Seconds an archive must stay unchanged before the watcher takes it [default: 2].
    #[arg(long, env = "SPILLWAY_MODEL_STORE_SETTLE_SECONDS")]
    pub model_store_settle_seconds: Option<usize>,
    /// Quantize every text_generation model whose setup_config.json asks for no
    /// quantization to this format at load (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k,
    /// q4_k, q5_k, q6_k) [default: none].
    #[arg(long, env = "SPILLWAY_QUANTIZE")]
    pub quantize: Option<String>,
}

/// How log lines are written (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// tracing's human-readable lines.
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, the event's fields
    /// (`message`, ...) and `span`/`spans` (a request's `id` among them).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(Error::bad_config(
                "log_format",
                format!("`{other}` is not text or json"),
            )),
        }
    }
}

/// What evicting a model does. A strategy a model cannot follow falls back to the next:
/// `cpu` → `disk` → `restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OffloadStrategy {
    /// Unload it; it stays registered and reloads on its next request.
    Restart,
    /// Keep it loaded with its resident units streamed from their mapping (pages
    /// dropped); promoted back on its next request.
    Disk,
    /// Move its GPU units to host RAM, promoted back on its next request (this build
    /// has no GPU units, so it falls back to `disk`).
    Cpu,
}

/// The device manager's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSettings {
    /// `max_host_memory`; `None`: the RAM free at start.
    pub max_host_memory: Option<u64>,
    /// `managed_devices` (GPU ordinals); `None`: every visible GPU.
    pub managed_gpus: Option<Vec<usize>>,
    pub offload_strategy: OffloadStrategy,
    pub allow_multiple_per_device: bool,
}

impl DeviceSettings {
    fn parse(
        max_host_memory: Option<String>,
        managed_devices: Option<String>,
        offload_strategy: Option<String>,
        allow_multiple_per_device: Option<bool>,
    ) -> Result<Self> {
        let max_host_memory = max_host_memory
            .map(|text| {
                spillway_placement::ByteSize::parse(&text)
                    .map(|size| size.bytes.0)
                    .map_err(|e| Error::bad_config("max_host_memory", e))
            })
            .transpose()?;
        let managed_gpus = managed_devices
            .map(|text| {
                text.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(|d| match d.parse::<spillway_placement::Device>() {
                        Ok(device) if device.kind == spillway_placement::DeviceType::Cuda => {
                            Ok(device.ordinal)
                        }
                        _ => Err(Error::bad_config(
                            "managed_devices",
                            format!(
                                "`{d}` is not a GPU such as cuda:0 (host RAM is always managed)"
                            ),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let offload_strategy = match offload_strategy.as_deref().map(str::trim) {
            None | Some("restart") => OffloadStrategy::Restart,
            Some("disk") => OffloadStrategy::Disk,
            Some("cpu") => OffloadStrategy::Cpu,
            Some(other) => {
                return Err(Error::bad_config(
                    "offload_strategy",
                    format!("`{other}` is not one of restart, cpu, disk"),
                ));
            }
        };
        Ok(Self {
            max_host_memory,
            managed_gpus,
            offload_strategy,
            allow_multiple_per_device: allow_multiple_per_device.unwrap_or(false),
        })
    }
}

/// The merged server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub inference_address: SocketAddr,
    pub management_address: SocketAddr,
    pub metrics_address: SocketAddr,
    pub model_store: PathBuf,
    pub startup_models: StartupModels,
    pub default_workers_per_model: usize,
    pub job_queue_size: usize,
    pub max_request_size: usize,
    pub max_response_size: usize,
    /// Connections each listener holds at once.
    pub max_connections: usize,
    /// How long a request's headers, and then its body, may take to arrive.
    pub request_read_timeout: Duration,
    /// Required on the management API when set (and whenever it is off loopback).
    pub management_token: Option<String>,
    /// Required on the inference API when set.
    pub inference_token: Option<String>,
    /// Where archives that cannot be mapped in place are unpacked.
    pub cache_dir: PathBuf,
    /// Response timeout for models whose config gives none (TorchServe's default).
    pub default_response_timeout: Duration,
    /// Threads of the async runtime (HTTP and queues; model compute has its own).
    pub io_threads: usize,
    /// The device manager's settings.
    pub devices: DeviceSettings,
    /// Whether KServe v1's `POST /v1/models/{model}:predict` is served
    /// (`service_envelope=kserve`, as TorchServe).
    pub kserve_v1: bool,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Whether the model store is watched (`watch_model_store`).
    pub watch_model_store: bool,
    /// How long an archive must stay unchanged before the watcher takes it.
    pub model_store_settle: Duration,
    /// The format generators are quantized to at load when their setup_config.json asks
    /// for none (`quantize`).
    pub quantize: Option<String>,
}

/// A properties file's `true` / `false`.
fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::bad_config(
            key,
            format!("`{value}` is not true or false"),
        )),
    }
}

/// TorchServe's default body limit (6,553,500 bytes).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 6_553_500;

impl ServerConfig {
    /// Merges overrides, the properties file they name (if any) and defaults.
    pub fn resolve(overrides: Overrides) -> Result<Self> {
        let properties = match &overrides.ts_config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
                crate::config::properties::parse(&text)
            }
            None => BTreeMap::new(),
        };
        Self::merge(overrides, &properties)
    }

    /// The pure part of [`ServerConfig::resolve`].
    pub fn merge(o: Overrides, props: &BTreeMap<String, String>) -> Result<Self> {
        let prop = |key: &str| props.get(key).filter(|v| !v.is_empty()).cloned();
        let address = |given: Option<String>, key: &str, default: &str| -> Result<SocketAddr> {
            let text = given
                .or_else(|| prop(key))
                .unwrap_or_else(|| default.to_string());
            parse_address(&text).map_err(|reason| Error::bad_config(key, reason))
        };
        let number = |given: Option<usize>, key: &str, default: usize| -> Result<usize> {
            match given {
                Some(n) => Ok(n),
                None => prop(key).map_or(Ok(default), |v| {
                    v.parse()
                        .map_err(|_| Error::bad_config(key, format!("`{v}` is not a whole number")))
                }),
            }
        };
        let startup_models = o
            .models
            .clone()
            .or_else(|| prop("load_models"))
            .unwrap_or_else(|| "all".to_string())
            .parse()?;
        let cache_dir = o
            .cache_dir
            .clone()
            .or_else(|| prop("cache_dir").map(PathBuf::from))
            .unwrap_or_else(default_cache_dir);
        let kserve_v1 = match o
            .service_envelope
            .clone()
            .or_else(|| prop("service_envelope"))
            .as_deref()
            .map(str::trim)
        {
            None | Some("" | "json" | "body" | "kservev2") => false,
            Some("kserve") => true,
            Some(other) => {
                return Err(Error::bad_config(
                    "service_envelope",
                    format!("`{other}` is not one of json, body, kserve, kservev2"),
                ));
            }
        };
        let quantize = match o.quantize.clone().or_else(|| prop("quantize")) {
            None => None,
            Some(name) => match spillway_handlers::weights::quantize::format_named(name.trim()) {
                Some(format) => Some(spillway_handlers::weights::quantize::format_name(format)),
                None => {
                    return Err(Error::bad_config(
                        "quantize",
                        format!(
                            "`{name}` is not one of {}",
                            spillway_handlers::weights::quantize::FORMATS
                                .map(|(n, _)| n)
                                .join(", ")
                        ),
                    ));
                }
            },
        };
        let config = ServerConfig {
            quantize,
            kserve_v1,
            log_format: o
                .log_format
                .clone()
                .or_else(|| prop("log_format"))
                .map_or(Ok(LogFormat::default()), |v| v.parse())?,
            watch_model_store: match o.watch_model_store {
                Some(given) => given,
                None => prop("watch_model_store")
                    .map(|v| parse_bool("watch_model_store", &v))
                    .transpose()?
                    .unwrap_or(false),
            },
            model_store_settle: Duration::from_secs(number(
                o.model_store_settle_seconds,
                "model_store_settle_seconds",
                2,
            )? as u64),
            inference_address: address(o.inference_address, "inference_address", "127.0.0.1:8080")?,
            management_address: address(
                o.management_address,
                "management_address",
                "127.0.0.1:8081",
            )?,
            metrics_address: address(o.metrics_address, "metrics_address", "127.0.0.1:8082")?,
            model_store: o
                .model_store
                .clone()
                .or_else(|| prop("model_store").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("model-store")),
            startup_models,
            default_workers_per_model: number(
                o.default_workers_per_model,
                "default_workers_per_model",
                1,
            )?,
            job_queue_size: number(o.job_queue_size, "job_queue_size", 100)?,
            max_request_size: number(
                o.max_request_size,
                "max_request_size",
                DEFAULT_MAX_MESSAGE_SIZE,
            )?,
            max_response_size: number(
                o.max_response_size,
                "max_response_size",
                DEFAULT_MAX_MESSAGE_SIZE,
            )?,
            max_connections: match number(o.max_connections, "max_connections", 1024)? {
                0 => return Err(Error::bad_config("max_connections", "must be at least 1")),
                n => n,
            },
            request_read_timeout: match number(o.request_read_timeout, "request_read_timeout", 30)?
            {
                0 => {
                    return Err(Error::bad_config(
                        "request_read_timeout",
                        "must be at least 1 second",
                    ));
                }
                n => Duration::from_secs(n as u64),
            },
            management_token: o
                .management_token
                .clone()
                .or_else(|| prop("management_token")),
            inference_token: o
                .inference_token
                .clone()
                .or_else(|| prop("inference_token")),
            cache_dir,
            default_response_timeout: Duration::from_secs(120),
            io_threads: number(o.io_threads, "io_threads", default_io_threads())?.max(1),
            devices: DeviceSettings::parse(
                o.max_host_memory
                    .clone()
                    .or_else(|| prop("max_host_memory")),
                o.managed_devices
                    .clone()
                    .or_else(|| prop("managed_devices")),
                o.offload_strategy
                    .clone()
                    .or_else(|| prop("offload_strategy")),
                match o.allow_multiple_per_device {
                    Some(given) => Some(given),
                    None => prop("allow_multiple_per_device")
                        .map(|v| parse_bool("allow_multiple_per_device", &v))
                        .transpose()?,
                },
            )?,
        };
        config.check()?;
        Ok(config)
    }

    /// Refuses settings that would be unsafe or cannot work.
    fn check(&self) -> Result<()> {
        if !is_loopback(self.management_address.ip()) && self.management_token.is_none() {
            return Err(Error::bad_config(
                "management_address",
                format!(
                    "{} is not a loopback address: the management API can register models, so it \
                     needs a token off loopback (set SPILLWAY_MANAGEMENT_TOKEN or management_token)",
                    self.management_address
                ),
            ));
        }
        if self.job_queue_size == 0 {
            return Err(Error::bad_config("job_queue_size", "must be at least 1"));
        }
        Ok(())
    }
}

/// One I/O thread per two cores, at least two. Measured on 2 cores (bench/load.py): two
/// threads serve echo at 62k req/s (p50 0.5 ms) against 31k with one, and MiniLM is
/// unchanged (474 vs 476 req/s at 32 connections, 4.4 ms at one). With candle's own
/// element-wise pools (before the fused kernels) a second thread had cost MiniLM 8 ms.
fn default_io_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| (n.get() / 2).max(2))
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("spillway")
}

/// Reads `http://host:port`, `host:port` or `:port` (TorchServe writes the scheme).
pub fn parse_address(text: &str) -> std::result::Result<SocketAddr, String> {
    let bare = text.trim();
    let bare = bare
        .strip_prefix("http://")
        .or_else(|| bare.strip_prefix("https://").map(|_| ""))
        .unwrap_or(bare);
    if bare.is_empty() {
        return Err(format!(
            "`{text}`: TLS listeners are not supported; use http://HOST:PORT"
        ));
    }
    let bare = bare.trim_end_matches('/');
    let bare = match bare.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None if bare.starts_with(':') => format!("127.0.0.1{bare}"),
        None => bare.to_string(),
    };
    bare.parse()
        .map_err(|_| format!("`{text}` is not an address; expected http://HOST:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn device_manager_settings_come_from_the_file_or_the_flags() {
        let merged = |o: Overrides, p: &[(&str, &str)]| ServerConfig::merge(o, &props(p));
        let config = merged(
            Overrides::default(),
            &[
                ("max_host_memory", "2GiB"),
                ("managed_devices", "cuda:1, cuda:0"),
                ("allow_multiple_per_device", "true"),
            ],
        )
        .expect("valid");
        assert_eq!(config.devices.max_host_memory, Some(2 << 30));
        assert_eq!(config.devices.managed_gpus, Some(vec![1, 0]));
        assert!(config.devices.allow_multiple_per_device);
        assert_eq!(config.devices.offload_strategy, OffloadStrategy::Restart);
        let flag = Overrides {
            max_host_memory: Some("512MiB".into()),
            ..Overrides::default()
        };
        let config = merged(flag, &[("max_host_memory", "2GiB")]).expect("valid");
        assert_eq!(
            config.devices.max_host_memory,
            Some(512 << 20),
            "the flag wins"
        );
        // Unmanaged by default: the budget is what the probe says is free.
        let probed = spillway_placement::Machine {
            gpus: vec![spillway_placement::GpuMemory {
                ordinal: 0,
                free: 10,
                total: 20,
            }],
            cpu_available: 1000,
            cpu_total: 2000,
            cpu_reserve: None,
        };
        let defaults = merged(Overrides::default(), &[]).expect("valid").devices;
        let pools = crate::devices::manager::ManagerConfig::from_settings(&defaults, &probed);
        assert_eq!((pools.host_budget, pools.host_budget_given), (1000, false));
        assert_eq!(pools.gpus.len(), 1, "every visible GPU");
        for (key, value) in [
            ("max_host_memory", "lots"),
            ("managed_devices", "cpu"),
            ("offload_strategy", "swap"),
            ("allow_multiple_per_device", "maybe"),
        ] {
            let err = merged(Overrides::default(), &[(key, value)]).expect_err(value);
            assert!(err.to_string().contains(key), "{key}={value}: {err}");
        }
    }

    #[test]
    fn defaults_are_loopback_and_serve_the_whole_store() {
        let config = ServerConfig::merge(Overrides::default(), &BTreeMap::new()).expect("config");
        assert_eq!(config.inference_address.to_string(), "127.0.0.1:8080");
        assert_eq!(config.management_address.to_string(), "127.0.0.1:8081");
        assert_eq!(config.metrics_address.to_string(), "127.0.0.1:8082");
        assert_eq!(config.startup_models, StartupModels::All);
        assert_eq!(config.model_store, PathBuf::from("model-store"));
        assert_eq!(config.job_queue_size, 100);
        assert_eq!(config.max_request_size, DEFAULT_MAX_MESSAGE_SIZE);
    }

    #[test]
    fn overrides_beat_properties_which_beat_defaults() {
        let p = props(&[
            ("inference_address", "http://127.0.0.1:9000"),
            ("job_queue_size", "7"),
            ("max_request_size", "1000"),
            ("load_models", "a=a.mar,b.mar"),
        ]);
        let o = Overrides {
            job_queue_size: Some(3),
            ..Overrides::default()
        };
        let config = ServerConfig::merge(o, &p).expect("config");
        assert_eq!(config.inference_address.port(), 9000);
        assert_eq!(config.job_queue_size, 3);
        assert_eq!(config.max_request_size, 1000);
        assert_eq!(
            config.startup_models,
            StartupModels::List(vec![
                StartupModel {
                    name: Some("a".into()),
                    url: "a.mar".into()
                },
                StartupModel {
                    name: None,
                    url: "b.mar".into()
                },
            ])
        );
    }

    #[test]
    fn an_open_management_address_needs_a_token() {
        let p = props(&[("management_address", "http://0.0.0.0:8081")]);
        let err = ServerConfig::merge(Overrides::default(), &p).expect_err("must refuse");
        assert!(
            err.to_string().contains("SPILLWAY_MANAGEMENT_TOKEN"),
            "{err}"
        );
        let o = Overrides {
            management_token: Some("secret".into()),
            ..Overrides::default()
        };
        assert!(ServerConfig::merge(o, &p).is_ok());
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = ServerConfig::merge(Overrides::default(), &props(&[("job_queue_size", "many")]))
            .expect_err("bad number");
        assert!(err.to_string().contains("job_queue_size"), "{err}");
        let err = ServerConfig::merge(
            Overrides::default(),
            &props(&[("metrics_address", "nowhere")]),
        )
        .expect_err("bad address");
        assert!(err.to_string().contains("metrics_address"), "{err}");
        assert!("a=".parse::<StartupModels>().is_err());
    }

    #[test]
    fn addresses_take_torchserve_and_plain_forms() {
        assert_eq!(
            parse_address("http://0.0.0.0:8080").map(|a| a.port()),
            Ok(8080)
        );
        assert_eq!(parse_address("127.0.0.1:0").map(|a| a.port()), Ok(0));
        assert_eq!(
            parse_address("localhost:81").map(|a| a.to_string()),
            Ok("127.0.0.1:81".into())
        );
        assert!(parse_address("https://0.0.0.0:8443").is_err());
    }
}

#[cfg(test)]
mod example_tests {
    //! The documented example files stay valid.
    use super::*;

    fn example(path: &str) -> BTreeMap<String, String> {
        let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path);
        crate::config::properties::parse(&std::fs::read_to_string(full).expect("example file"))
    }

    #[test]
    fn the_example_config_properties_parses_to_the_defaults() {
        let config =
            ServerConfig::merge(Overrides::default(), &example("configs/config.properties"))
                .expect("valid");
        assert_eq!(config.inference_address.to_string(), "127.0.0.1:8080");
        assert_eq!(config.startup_models, StartupModels::All);
    }

    #[test]
    fn the_docker_config_needs_a_management_token() {
        let props = example("docker/config.properties");
        assert!(ServerConfig::merge(Overrides::default(), &props).is_err());
        let o = Overrides {
            management_token: Some("t".into()),
            ..Overrides::default()
        };
        let config = ServerConfig::merge(o, &props).expect("valid with a token");
        assert_eq!(config.metrics_address.to_string(), "0.0.0.0:8082");
        assert_eq!(config.cache_dir, PathBuf::from("/home/model-server/cache"));
    }
}
