//! A vision checkpoint's tensors by canonical name ([`torchvision::canonical_name`]):
//! the safetensors weights (a `.pth` arrives converted, see [`crate::weights::pickle`])
//! read through a map from canonical to stored names.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::graph::TensorSource;
use super::torchvision::{Shapes, canonical_name};
use crate::error::CandleContext;
use crate::{HandlerError, WeightSource};

pub struct CanonicalWeights {
    source: WeightSource,
    /// Canonical name → stored name.
    stored: HashMap<String, String>,
}

impl CanonicalWeights {
    pub fn new(source: WeightSource) -> Self {
        let stored = source
            .tensor_names()
            .into_iter()
            .map(|name| (canonical_name(&name), name))
            .collect();
        Self { source, stored }
    }

    /// Every floating-point tensor's shape by canonical name (what recognition reads;
    /// counters such as `num_batches_tracked` are left out).
    pub fn shapes(&self) -> Shapes {
        self.stored
            .iter()
            .filter_map(|(canonical, stored)| {
                let info = self.source.info(stored)?;
                matches!(
                    info.dtype,
                    safetensors::Dtype::F32
                        | safetensors::Dtype::F16
                        | safetensors::Dtype::BF16
                        | safetensors::Dtype::F64
                )
                .then(|| (canonical.clone(), info.shape.clone()))
            })
            .collect()
    }

    pub fn source(&self) -> &WeightSource {
        &self.source
    }
}

impl TensorSource for CanonicalWeights {
    fn tensor(&self, name: &str) -> Result<Tensor, HandlerError> {
        let stored = self.stored.get(name).ok_or_else(|| {
            HandlerError::bad_file("weights", format!("tensor `{name}` is missing"))
        })?;
        self.source
            .load(stored, DType::F32, &Device::Cpu)
            .context(|| format!("cannot read tensor `{stored}`"))
    }

    fn has(&self, name: &str) -> bool {
        self.stored.contains_key(name)
    }
}
