//! [`SetupConfig`]: a model's `setup_config.json`, with the keys HuggingFace accelerate
//! users know (`device_map`, `max_memory`, `torch_dtype`, `max_length`, ...).
//!
//! `device_map`, `max_memory` and `offload_folder` are read by the planner
//! (`crate::placement`); this module reads the rest and what the handler is told.

use serde::{Deserialize, Serialize};
use spillway_handlers::LoadOptions;

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

    /// What the handler is told at load time. (Where units go is the planner's job:
    /// `crate::placement`.)
    pub fn load_options(&self) -> Result<LoadOptions> {
        let dtype = match self.torch_dtype.as_deref() {
            None | Some("auto") => None,
            Some("float32" | "torch.float32" | "fp32") => Some(spillway_handlers::DType::F32),
            Some("float16" | "torch.float16" | "fp16" | "half") => {
                Some(spillway_handlers::DType::F16)
            }
            Some("bfloat16" | "torch.bfloat16" | "bf16") => Some(spillway_handlers::DType::BF16),
            Some(other) => {
                return Err(Error::bad_config(
                    FILE,
                    format!("torch_dtype `{other}` is not one of float32, float16, bfloat16, auto"),
                ));
            }
        };
        if self.max_length == Some(0) {
            return Err(Error::bad_config(FILE, "max_length must be at least 1"));
        }
        Ok(LoadOptions {
            device: spillway_handlers::Device::Cpu,
            dtype,
            max_length: self.max_length,
            plan: None,
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
