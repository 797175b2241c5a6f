//! The `text_classification` handler: `*ForSequenceClassification` checkpoints of every
//! encoder family (BERT's pooler + classifier, RoBERTa's and XLM-RoBERTa's dense +
//! out_proj head, DistilBERT's pre_classifier + ReLU). The encoder runs as a
//! [`MappedEncoder`] stack as the plan says; the head is small and stays resident.
//! Labels come from config.json's `id2label`; logits become scores as transformers'
//! text-classification pipeline makes them: none for `problem_type: regression`, a
//! sigmoid per label for multi-label models and single-logit ones (cross-encoders), a
//! softmax otherwise. Each input — a text or a (text, text pair) — is answered with its
//! top label: `[{"label": "POSITIVE", "score": 0.98}, ...]`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use tokenizers::Encoding;

use crate::error::CandleContext;
use crate::models::encoder::EncoderSpec;
use crate::models::encoder::MappedEncoder;
use crate::models::encoder::modern_block::activate;
use crate::models::encoder::spec::HeadActivation;
use crate::tasks::encoder_text::EncoderText;
use crate::weights::WeightsWatch;
use crate::{
    Classification, Handler, HandlerError, HandlerInfo, HandlerKind, Input, LoadOptions,
    ModelFiles, Output, Request,
};
use candle_nn::LayerNorm;
use candle_transformers::models::bert::HiddenAct;

/// How logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scoring {
    Softmax,
    Sigmoid,
    Raw,
}

impl Scoring {
    /// transformers' pipeline's choice: `problem_type` first, then the label count.
    fn of(config: &serde_json::Value, labels: usize) -> Self {
        match config.get("problem_type").and_then(|v| v.as_str()) {
            Some("regression") => Scoring::Raw,
            Some("multi_label_classification") => Scoring::Sigmoid,
            _ if labels == 1 => Scoring::Sigmoid,
            _ => Scoring::Softmax,
        }
    }
}

/// A family's classifier head, loaded.
struct Head {
    dense: Linear,
    activation: HiddenAct,
    /// tanh instead of `activation` (BERT's pooler, RoBERTa's head).
    tanh: bool,
    norm: Option<LayerNorm>,
    out: Linear,
    /// Pool the mean of the tokens instead of taking the first (ModernBERT's
    /// `classifier_pooling: mean`).
    mean: bool,
}

impl Head {
    fn load(
        weights: &crate::WeightSource,
        spec: &EncoderSpec,
        labels: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, HandlerError> {
        let head = &spec.family.head;
        let vb = weights.var_builder(dtype, device);
        let dense_name = if head.dense_in_base {
            format!(
                "{}{}",
                spec.prefix_in(|t| weights.info(t).is_some()),
                head.dense
            )
        } else {
            head.dense.to_string()
        };
        // ModernBERT's head has a bias only where `classifier_bias` says so.
        let bias = spec.modern.as_ref().is_none_or(|m| m.classifier_bias);
        let h = spec.hidden_size;
        let dense = candle_nn::linear_b(h, h, bias, vb.pp(&dense_name)).context(|| {
            format!("cannot load the classifier head's `{dense_name}` (a *ForSequenceClassification checkpoint has it)")
        })?;
        let norm = match (head.norm, &spec.modern) {
            (Some(name), Some(modern)) => Some(
                crate::models::encoder::modern_block::norm(vb.pp(name), spec, modern)
                    .context(|| format!("cannot load the classifier head's `{name}`"))?,
            ),
            _ => None,
        };
        let out = candle_nn::linear(h, labels, vb.pp(head.out)).context(|| {
            format!(
                "cannot load the classifier `{}` for {labels} labels",
                head.out
            )
        })?;
        let (activation, tanh) = match head.activation {
            HeadActivation::Tanh => (HiddenAct::Gelu, true),
            HeadActivation::Relu => (HiddenAct::Relu, false),
            HeadActivation::FromConfig => (
                spec.modern
                    .as_ref()
                    .map_or(HiddenAct::Gelu, |m| m.classifier_activation),
                false,
            ),
        };
        Ok(Self {
            dense,
            activation,
            tanh,
            norm,
            out,
            mean: spec.modern.as_ref().is_some_and(|m| m.classifier_mean),
        })
    }

    /// `[batch, tokens, hidden]` last hidden states (and the 0/1 mask) → `[batch,
    /// labels]` logits.
    fn forward(&self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let pooled = if self.mean {
            let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
            hidden
                .broadcast_mul(&mask)?
                .sum(1)?
                .broadcast_div(&mask.sum(1)?)?
        } else {
            // Contiguous: MKL's matmul refuses a strided left-hand side (the portable gemm takes it).
            hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?
        };
        let dense = self.dense.forward(&pooled)?;
        let dense = if self.tanh {
            dense.tanh()?
        } else {
            activate(&dense, self.activation)?
        };
        let dense = match &self.norm {
            Some(norm) => norm.forward(&dense)?,
            None => dense,
        };
        self.out.forward(&dense)
    }
}

pub struct TextClassification {
    model: MappedEncoder,
    text: EncoderText,
    head: Head,
    labels: Vec<String>,
    scoring: Scoring,
    device: Device,
    dtype: DType,
    parameters: usize,
    /// Whether the files it still maps changed underneath.
    watch: WeightsWatch,
}

/// Label names in index order, from `id2label` (else `num_labels` as LABEL_i).
pub(crate) fn labels(config: &serde_json::Value) -> Result<Vec<String>, HandlerError> {
    if let Some(map) = config.get("id2label").and_then(|v| v.as_object()) {
        let mut pairs: Vec<(usize, String)> = map
            .iter()
            .map(|(k, v)| {
                let index = k.parse().map_err(|_| {
                    HandlerError::bad_file("config.json", format!("id2label key `{k}`"))
                })?;
                Ok((index, v.as_str().unwrap_or_default().to_string()))
            })
            .collect::<Result<_, HandlerError>>()?;
        pairs.sort();
        if pairs.iter().enumerate().any(|(i, (index, _))| i != *index) {
            return Err(HandlerError::bad_file(
                "config.json",
                "id2label must number labels 0..n",
            ));
        }
        if !pairs.is_empty() {
            return Ok(pairs.into_iter().map(|(_, l)| l).collect());
        }
    }
    let n = config
        .get("num_labels")
        .and_then(|v| v.as_u64())
        .unwrap_or(2) as usize;
    Ok((0..n).map(|i| format!("LABEL_{i}")).collect())
}

impl TextClassification {
    pub fn load(files: &dyn ModelFiles, options: &LoadOptions) -> Result<Self, HandlerError> {
        let text = EncoderText::load(files, "text_classification", options.max_length)?;
        let labels = labels(&text.config_json)?;
        let scoring = Scoring::of(&text.config_json, labels.len());
        let weights = files.model_weights()?;
        let dtype = options.dtype.unwrap_or(DType::F32);
        let device = options.device.clone();
        let spec = &text.spec;
        let head = Head::load(&weights, spec, labels.len(), dtype, &device)?;
        let parameters = weights.parameters();
        let model = MappedEncoder::load(&weights, spec, dtype, |unit| options.placement_of(unit))?;
        if let Some(changed) = weights.changed() {
            return Err(changed);
        }
        Ok(Self {
            model,
            text,
            head,
            labels,
            scoring,
            device,
            dtype,
            parameters,
            watch: weights.watch(),
        })
    }

    /// Per-label logits of each input, `[inputs][labels]`.
    pub fn logits(&self, encodings: &[&Encoding]) -> Result<Vec<Vec<f32>>, HandlerError> {
        let forward = || -> candle_core::Result<Vec<Vec<f32>>> {
            let inputs = self.text.inputs(encodings, &self.device)?;
            let hidden = self.model.forward(&inputs)?.to_device(&self.device)?;
            self.head
                .forward(&hidden, &inputs.mask)?
                .to_dtype(DType::F32)?
                .to_vec2()
        };
        forward().context(|| {
            format!(
                "classification forward pass failed (batch of {})",
                encodings.len()
            )
        })
    }

    /// Per-label scores from one input's logits.
    fn scores(&self, logits: &[f32]) -> Vec<f32> {
        match self.scoring {
            Scoring::Raw => logits.to_vec(),
            Scoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
            Scoring::Softmax => {
                let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = logits.iter().map(|l| (l - top).exp()).collect();
                let total: f32 = exp.iter().sum();
                exp.into_iter().map(|e| e / total).collect()
            }
        }
    }

    fn answer(&self, logits: &[f32]) -> Classification {
        let scores = self.scores(logits);
        let (best, score) = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, s)| (i, *s))
            .unwrap_or((0, 0.0));
        Classification {
            label: self.labels.get(best).cloned().unwrap_or_default(),
            score,
            logit: logits.get(best).copied().unwrap_or_default(),
        }
    }
}

impl Handler for TextClassification {
    fn weights_changed(&self) -> Option<HandlerError> {
        self.watch.changed()
    }

    fn prepare(&self, request: Request) -> Result<Input, HandlerError> {
        self.text.prepare(request, "text_classification")
    }

    fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
        self.text.run_batch(
            batch,
            "text_classification",
            |chunk| self.logits(chunk),
            |logits| Output::Classifications(logits.iter().map(|l| self.answer(l)).collect()),
        )
    }

    fn units(&self) -> Option<&dyn crate::weights::layer_stack::Units> {
        Some(self.model.units())
    }

    fn info(&self) -> HandlerInfo {
        self.text.info(
            HandlerKind::TextClassification,
            &self.model,
            self.dtype,
            &self.device,
            self.parameters,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_id2label_or_num_labels() {
        let cfg = serde_json::json!({"id2label": {"1": "b", "0": "a"}});
        assert_eq!(labels(&cfg).expect("labels"), ["a", "b"]);
        assert_eq!(
            labels(&serde_json::json!({"num_labels": 3})).expect("labels"),
            ["LABEL_0", "LABEL_1", "LABEL_2"]
        );
        assert!(labels(&serde_json::json!({"id2label": {"0": "a", "2": "c"}})).is_err());
    }

    /// Each family's head (BERT's pooler, RoBERTa's dense + out_proj, DistilBERT's
    /// pre_classifier + ReLU, ModernBERT's pooling and head, a one-logit cross-encoder)
    /// against transformers' logits, with the encoder resident, partly and wholly on disk.
    #[test]
    fn every_encoder_familys_classifier_head_matches_transformers_logits() {
        use crate::models::encoder::fixture_tests::{
            FIXTURES, FixtureModel, PLACEMENTS, TOLERANCE, encodings, largest_difference,
        };
        use crate::weights::files::FolderFiles;
        for name in FIXTURES {
            let fixture = FixtureModel::new(name);
            let encodings = encodings(&fixture.want);
            let encodings: Vec<&Encoding> = encodings.iter().collect();
            let mut handler = Some(
                TextClassification::load(
                    &FolderFiles::new(fixture.folder.path()),
                    &LoadOptions::default(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}")),
            );
            for placement in PLACEMENTS {
                let current = TextClassification {
                    model: fixture.encoder(&fixture.spec, placement),
                    ..handler.take().expect("handler")
                };
                let got = current.logits(&encodings).expect("logits");
                assert_eq!(got.len(), fixture.want.logits.len());
                for (row, (g, w)) in got.iter().zip(&fixture.want.logits).enumerate() {
                    let diff = largest_difference(g, w);
                    assert!(
                        diff <= TOLERANCE,
                        "{name} {placement:?} row {row}: logits {g:?}, transformers {w:?}"
                    );
                }
                handler = Some(current);
            }
        }
    }

    #[test]
    fn scores_follow_transformers_pipeline() {
        use serde_json::json;
        assert_eq!(Scoring::of(&json!({}), 3), Scoring::Softmax);
        assert_eq!(Scoring::of(&json!({}), 1), Scoring::Sigmoid);
        assert_eq!(
            Scoring::of(&json!({"problem_type": "multi_label_classification"}), 3),
            Scoring::Sigmoid
        );
        assert_eq!(
            Scoring::of(&json!({"problem_type": "regression"}), 1),
            Scoring::Raw
        );
    }
}
