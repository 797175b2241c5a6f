//! [`SetupConfig`]: a model's `setup_config.json`, with the keys HuggingFace accelerate
//! users know (`device_map`, `max_memory`, `torch_dtype`, `max_length`, ...).
//!
//! `device_map`, `max_memory` and `offload_folder` are read by the planner
//! (`crate::devices::placement`); this module reads the rest and what the handler is told.

use serde::{Deserialize, Serialize};
use spillway_handlers::LoadOptions;
use spillway_handlers::weights::quantize;
use spillway_handlers::weights::quantize::GgmlDType;
use spillway_placement::{DeviceRequest, TensorDType};

use crate::error::{Error, Result};

const FILE: &str = "setup_config.json";

/// What a quantization the server's default asked for says it was asked by.
const DEFAULT_QUANTIZATION: &str = "the server's quantize";

/// A checkpoint quantized as it loads: to `format`, as `asked_by` (the setup key) said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantization {
    pub format: GgmlDType,
    pub asked_by: String,
}

impl Quantization {
    fn new(format: GgmlDType, asked_by: String) -> Self {
        Self { format, asked_by }
    }

    /// Whether the server's `quantize` default asked for it (no key of the model's).
    pub fn is_server_default(&self) -> bool {
        self.asked_by == DEFAULT_QUANTIZATION
    }

    /// The format's name (`q4_k`).
    pub fn name(&self) -> String {
        quantize::format_name(self.format)
    }

    /// What describe says of it: the format, and for accelerate's keys that it is the
    /// nearest GGML format to bitsandbytes'.
    pub fn describe(&self) -> String {
        match self.asked_by.as_str() {
            "quantization" => format!("quantized at load to {}", self.name()),
            DEFAULT_QUANTIZATION => format!(
                "quantized at load to {} (the server's quantize default)",
                self.name()
            ),
            key => format!(
                "quantized at load to {} for {key} (the nearest GGML format to bitsandbytes')",
                self.name()
            ),
        }
    }
}

/// The parsed file. Unknown keys are kept for the describe API but not used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SetupConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_map: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_folder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_state_dict: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_cpu_mem_usage: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
    /// The server's `quantize` default, for a file that asks for no quantization.
    #[serde(skip)]
    default_quantization: Option<String>,
}

impl SetupConfig {
    pub fn parse(bytes: Option<&[u8]>) -> Result<Self> {
        match bytes {
            None => Ok(Self::default()),
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| Error::bad_config(FILE, e)),
        }
    }

    /// The dtype to serve in: `torch_dtype` (torch's spellings, "torch.float16" too),
    /// or `None` for "auto" or none given (the checkpoint's own). The one place that
    /// reads it.
    pub fn dtype(&self) -> Result<Option<TensorDType>> {
        match self.torch_dtype.as_deref() {
            None | Some("auto") => Ok(None),
            Some(name) => TensorDType::parse(name)
                .filter(|d| matches!(d, TensorDType::F32 | TensorDType::F16 | TensorDType::BF16))
                .map(Some)
                .ok_or_else(|| {
                    Error::bad_config(
                        FILE,
                        format!(
                            "torch_dtype `{name}` is not one of float32, float16, bfloat16, auto"
                        ),
                    )
                }),
        }
    }

    /// `prefix_cache_bytes`: the bytes a generator's prefix cache may hold (0 turns it
    /// off); `None` when not given (the planner's default).
    pub fn prefix_cache_bytes(&self) -> Result<Option<u64>> {
        match self.other.get("prefix_cache_bytes") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(value) => value.as_u64().map(Some).ok_or_else(|| {
                Error::bad_config(
                    FILE,
                    format!("prefix_cache_bytes must be a whole number of bytes, found {value}"),
                )
            }),
        }
    }

    /// How to quantize the checkpoint as it loads: `quantization` (`"q4_k"`, ...; see
    /// [`quantize::FORMATS`]), or accelerate's bitsandbytes spellings mapped to the
    /// nearest GGML format — `load_in_8bit` → q8_0, `load_in_4bit` (and a
    /// `quantization_config` saying either, any `bnb_4bit_quant_type`) → q4_k. `None`
    /// when none is asked. Conflicting keys, an unknown format or another
    /// `quant_method` are refused by name.
    pub fn quantization(&self) -> Result<Option<Quantization>> {
        let flag = |map: &serde_json::Map<String, serde_json::Value>, key: &str| match map.get(key)
        {
            None | Some(serde_json::Value::Null) => Ok(false),
            Some(value) => value.as_bool().ok_or_else(|| {
                Error::bad_config(FILE, format!("{key} must be true or false, found {value}"))
            }),
        };
        let bnb = |map: &serde_json::Map<String, serde_json::Value>, at: &str| {
            let mut asked = Vec::new();
            if flag(map, "load_in_8bit")? {
                asked.push(Quantization::new(
                    GgmlDType::Q8_0,
                    format!("{at}load_in_8bit"),
                ));
            }
            if flag(map, "load_in_4bit")? {
                asked.push(Quantization::new(
                    GgmlDType::Q4K,
                    format!("{at}load_in_4bit"),
                ));
            }
            Ok::<_, Error>(asked)
        };
        let mut asked = bnb(&self.other, "")?;
        match self.other.get("quantization_config") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(config)) => {
                let method = config.get("quant_method").and_then(|m| m.as_str());
                if let Some(method) = method.filter(|m| *m != "bitsandbytes") {
                    return Err(Error::bad_config(
                        FILE,
                        format!(
                            "quantization_config.quant_method `{method}` is not served: \
                             quantize at load with `quantization` (q4_0, q8_0, q4_k, ...) instead"
                        ),
                    ));
                }
                asked.extend(bnb(config, "quantization_config.")?);
            }
            Some(other) => {
                return Err(Error::bad_config(
                    FILE,
                    format!("quantization_config must be an object, found {other}"),
                ));
            }
        }
        if let Some(value) = self.other.get("quantization").filter(|v| !v.is_null()) {
            let format = value
                .as_str()
                .and_then(quantize::format_named)
                .ok_or_else(|| {
                    let names: Vec<&str> = quantize::FORMATS.iter().map(|(n, _)| *n).collect();
                    Error::bad_config(
                        FILE,
                        format!("quantization {value} is not one of {}", names.join(", ")),
                    )
                })?;
            asked.push(Quantization::new(format, "quantization".into()));
        }
        // The server's default (a format checked when the server starts), for a model
        // that asks for nothing.
        if asked.is_empty()
            && let Some(format) = self
                .default_quantization
                .as_deref()
                .and_then(quantize::format_named)
        {
            asked.push(Quantization::new(format, DEFAULT_QUANTIZATION.into()));
        }
        asked.dedup_by(|a, b| a.format == b.format);
        match asked.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.clone())),
            [first, second, ..] => Err(Error::bad_config(
                FILE,
                format!(
                    "{} asks for {} and {} for {}: give one",
                    first.asked_by,
                    first.name(),
                    second.asked_by,
                    second.name()
                ),
            )),
        }
    }

    /// Quantizes to `format` at load unless the file asks otherwise (the server's
    /// `quantize` default).
    pub fn quantize_by_default(&mut self, format: &str) {
        self.default_quantization = Some(format.to_string());
    }

    /// Whether [`Self::quantization`] asks for one (a malformed one is refused when the
    /// model is opened).
    pub fn quantizes(&self) -> bool {
        self.quantization().is_ok_and(|q| q.is_some())
    }

    /// What the model asks of the device manager: `device` ("cpu", "cuda", "cudax2",
    /// "cuda:0", "cuda:0,1"); `None` when not given (the managed GPUs, shared).
    pub fn device_request(&self) -> Result<Option<DeviceRequest>> {
        match self.other.get("device") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(text)) => text
                .parse()
                .map(Some)
                .map_err(|e| Error::bad_config(FILE, e)),
            Some(other) => Err(Error::bad_config(
                FILE,
                format!("device must be a string such as \"cuda:0\", found {other}"),
            )),
        }
    }

    /// What the handler is told at load time. (Where units go is the planner's job:
    /// `crate::devices::placement`; the loader adds the plan.)
    pub fn load_options(&self) -> Result<LoadOptions> {
        if self.max_length == Some(0) {
            return Err(Error::bad_config(FILE, "max_length must be at least 1"));
        }
        Ok(LoadOptions {
            device: spillway_handlers::Device::Cpu,
            dtype: self.dtype()?.and_then(spillway_handlers::candle_dtype),
            max_length: self.max_length,
            plan: None,
            handler_config: serde_json::Map::new(),
            // The planner's budget, set by the loader with the plan.
            prefix_cache_bytes: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_accelerate_keys() {
        let c = SetupConfig::parse(Some(
            br#"{"device_map": "auto", "max_memory": {"0": "10GiB", "cpu": "30GiB"}, "torch_dtype": "float32",
                "max_length": 128, "low_cpu_mem_usage": true, "model_name": "x"}"#,
        ))
        .expect("parse");
        assert_eq!(c.max_length, Some(128));
        assert_eq!(
            c.other.get("model_name").and_then(|v| v.as_str()),
            Some("x")
        );
        let options = c.load_options().expect("options");
        assert_eq!(options.dtype, Some(spillway_handlers::DType::F32));
        assert_eq!(options.max_length, Some(128));
    }

    #[test]
    fn bad_dtypes_and_malformed_files_are_refused() {
        let err = SetupConfig::parse(Some(br#"{"torch_dtype": "int3"}"#))
            .and_then(|c| c.load_options())
            .expect_err("dtype");
        assert!(err.to_string().contains("int3"), "{err}");
        assert!(SetupConfig::parse(Some(b"{oops")).is_err());
        // One reading of torch_dtype for the planner and the handler alike.
        let dtype = |name: &str| {
            SetupConfig {
                torch_dtype: Some(name.into()),
                ..SetupConfig::default()
            }
            .dtype()
            .ok()
        };
        assert_eq!(dtype("torch.float16"), Some(Some(TensorDType::F16)));
        assert_eq!(dtype("bf16"), Some(Some(TensorDType::BF16)));
        assert_eq!(dtype("float"), Some(Some(TensorDType::F32)));
        assert_eq!(dtype("auto"), Some(None));
        assert_eq!(dtype("float64"), None, "not a dtype the handlers serve in");
        assert_eq!(dtype("int8"), None);
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn quantization_is_read_from_its_key_and_accelerates_and_conflicts_are_refused() {
        let q =
            |json: &str| SetupConfig::parse(Some(json.as_bytes())).and_then(|c| c.quantization());
        let format = |json: &str| q(json).expect(json).map(|q| (q.name(), q.asked_by));
        assert_eq!(format("{}"), None);
        assert_eq!(format(r#"{"load_in_8bit": false}"#), None);
        assert_eq!(
            format(r#"{"quantization": "Q4_K"}"#),
            Some(("q4_k".into(), "quantization".into()))
        );
        assert_eq!(
            format(r#"{"load_in_8bit": true}"#),
            Some(("q8_0".into(), "load_in_8bit".into()))
        );
        assert_eq!(
            format(
                r#"{"quantization_config": {"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}}"#
            ),
            Some(("q4_k".into(), "quantization_config.load_in_4bit".into()))
        );
        assert_eq!(
            format(r#"{"load_in_4bit": true, "quantization": "q4_k"}"#).map(|f| f.0),
            Some("q4_k".into()),
            "the same format twice is one"
        );
        // The server's default applies where the file asks for nothing.
        let with_default = |json: &str| {
            let mut setup = SetupConfig::parse(Some(json.as_bytes())).expect(json);
            setup.quantize_by_default("q4_k");
            setup.quantization().expect(json).map(|q| q.describe())
        };
        assert_eq!(
            with_default("{}").as_deref(),
            Some("quantized at load to q4_k (the server's quantize default)")
        );
        assert_eq!(
            with_default(r#"{"load_in_8bit": true}"#).as_deref(),
            Some(
                "quantized at load to q8_0 for load_in_8bit (the nearest GGML format to bitsandbytes')"
            )
        );
        for (bad, says) in [
            (r#"{"quantization": "nf4"}"#, "not one of q4_0"),
            (r#"{"quantization": 4}"#, "not one of"),
            (
                r#"{"load_in_8bit": "yes"}"#,
                "load_in_8bit must be true or false",
            ),
            (
                r#"{"load_in_8bit": true, "load_in_4bit": true}"#,
                "load_in_8bit asks for q8_0 and load_in_4bit for q4_k",
            ),
            (
                r#"{"quantization_config": {"quant_method": "gptq", "bits": 4}}"#,
                "quant_method `gptq` is not served",
            ),
        ] {
            let err = q(bad).expect_err(bad).to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_example_setup_config_parses() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/setup_config.json");
        let config =
            SetupConfig::parse(Some(&std::fs::read(path).expect("example"))).expect("valid");
        assert_eq!(
            config.load_options().expect("options").max_length,
            Some(256)
        );
    }
}
