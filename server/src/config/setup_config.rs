//! [`SetupConfig`]: a model's `setup_config.json`, with the keys HuggingFace accelerate
//! users know (`device_map`, `max_memory`, `torch_dtype`, `max_length`, ...).
//!
//! `device_map`, `max_memory` and `offload_folder` are read by the planner
//! (`crate::devices::placement`); this module reads the rest and what the handler is told.

use serde::{Deserialize, Serialize};
use spillway_handlers::LoadOptions;
use spillway_placement::{DeviceRequest, TensorDType};

use crate::error::{Error, Result};

const FILE: &str = "setup_config.json";

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
