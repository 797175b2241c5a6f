//! Hugging Face's `ViTForImageClassification` (`model_type: vit`): candle-transformers'
//! ViT, read from the checkpoint as transformers saves it (`vit.embeddings...`,
//! `vit.encoder.layer.N...`, `classifier`). Config keys that would change the math and
//! that this graph does not run are refused by name.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::vit;

use crate::error::CandleContext;
use crate::{HandlerError, WeightSource};

pub struct Vit {
    model: vit::Model,
    pub image_size: usize,
}

/// Whether `config` is one this module serves.
pub fn serves(config: &serde_json::Value) -> bool {
    config.get("model_type").and_then(|t| t.as_str()) == Some("vit")
}

impl Vit {
    pub fn load(
        config: &serde_json::Value,
        classes: usize,
        weights: &WeightSource,
        device: &Device,
    ) -> Result<Self, HandlerError> {
        let bad = |reason: String| HandlerError::bad_file("config.json", reason);
        if let Some(act) = config.get("hidden_act").and_then(|v| v.as_str())
            && !matches!(act, "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu")
        {
            return Err(HandlerError::Unsupported(format!(
                "ViT's hidden_act `{act}` is not served (gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )));
        }
        let parsed: vit::Config = serde_json::from_value(config.clone())
            .map_err(|e| bad(format!("a ViT config: {e}")))?;
        let vb = weights.var_builder(DType::F32, device);
        let model = vit::Model::new(&parsed, classes, vb)
            .context(|| "cannot build ViTForImageClassification from the weights".to_string())?;
        Ok(Self {
            model,
            image_size: parsed.image_size,
        })
    }

    /// `[batch, 3, size, size]` → `[batch, classes]` logits.
    pub fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        self.model.forward(images)
    }
}
