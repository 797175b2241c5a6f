//! The `text_classification` handler: `BertForSequenceClassification` checkpoints. The
//! encoder runs as a [`MappedBert`] stack as the plan says; the pooler (dense + tanh on
//! the first token) and the classifier are small and stay resident. Labels come from
//! config.json's `id2label`; scores are a softmax (a sigmoid per label for
//! `problem_type: multi_label_classification`). Each text is answered with its top
//! label: `[{"label": "POSITIVE", "score": 0.98}, ...]`.

use candle_core::{D, DType, Device, Module};
use candle_nn::Linear;
use tokenizers::Encoding;

use crate::error::CandleContext;
use crate::models::encoder::MappedBert;
use crate::tasks::encoder_text::BertText;
use crate::weights::WeightsWatch;
use crate::{
    Classification, Handler, HandlerError, HandlerInfo, HandlerKind, Input, LoadOptions,
    ModelFiles, Output, Request,
};

pub struct TextClassification {
    model: MappedBert,
    text: BertText,
    pooler: Linear,
    classifier: Linear,
    labels: Vec<String>,
    multi_label: bool,
    device: Device,
    dtype: DType,
    parameters: usize,
    /// Whether the files it still maps changed underneath.
    watch: WeightsWatch,
}

/// Label names in index order, from `id2label` (else `num_labels` as LABEL_i).
fn labels(config: &serde_json::Value) -> Result<Vec<String>, HandlerError> {
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
        return Ok(pairs.into_iter().map(|(_, l)| l).collect());
    }
    let n = config
        .get("num_labels")
        .and_then(|v| v.as_u64())
        .unwrap_or(2) as usize;
    Ok((0..n).map(|i| format!("LABEL_{i}")).collect())
}

impl TextClassification {
    pub fn load(files: &dyn ModelFiles, options: &LoadOptions) -> Result<Self, HandlerError> {
        let text = BertText::load(files, "text_classification", options.max_length)?;
        let labels = labels(&text.config_json)?;
        let multi_label = text
            .config_json
            .get("problem_type")
            .and_then(|v| v.as_str())
            == Some("multi_label_classification");
        let weights = files.model_weights()?;
        let dtype = options.dtype.unwrap_or(DType::F32);
        let device = options.device.clone();
        let h = text.config.hidden_size;
        let prefix = if weights.info("bert.pooler.dense.weight").is_some() {
            "bert."
        } else {
            ""
        };
        let vb = weights.var_builder(dtype, &device);
        let pooler =
            candle_nn::linear(h, h, vb.pp(format!("{prefix}pooler.dense"))).context(|| {
                "cannot load the pooler (a BertForSequenceClassification checkpoint has one)".into()
            })?;
        let classifier = candle_nn::linear(h, labels.len(), vb.pp("classifier"))
            .context(|| format!("cannot load the classifier for {} labels", labels.len()))?;
        let parameters = weights.parameters();
        let model = MappedBert::load(&weights, &text.config, dtype, |unit| {
            options.placement_of(unit)
        })?;
        if let Some(changed) = weights.changed() {
            return Err(changed);
        }
        Ok(Self {
            model,
            text,
            pooler,
            classifier,
            labels,
            multi_label,
            device,
            dtype,
            parameters,
            watch: weights.watch(),
        })
    }

    /// Per-label probabilities of each text, `[texts][labels]`.
    pub fn scores(&self, encodings: &[&Encoding]) -> Result<Vec<Vec<f32>>, HandlerError> {
        let forward = || -> candle_core::Result<Vec<Vec<f32>>> {
            let (ids, types, mask) = self.text.tensors(encodings, &self.device)?;
            let hidden = self.model.forward(&ids, &types, &mask)?;
            // Contiguous: MKL's matmul refuses a strided left-hand side (the portable gemm takes it).
            let first = hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
            let pooled = self
                .pooler
                .forward(&first.to_device(&self.device)?)?
                .tanh()?;
            let logits = self.classifier.forward(&pooled)?.to_dtype(DType::F32)?;
            let scores = if self.multi_label {
                candle_nn::ops::sigmoid(&logits)?
            } else {
                candle_nn::ops::softmax(&logits, D::Minus1)?
            };
            scores.to_vec2()
        };
        forward().context(|| {
            format!(
                "classification forward pass failed (batch of {})",
                encodings.len()
            )
        })
    }

    fn answer(&self, scores: &[f32]) -> Classification {
        let (best, score) = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, s)| (i, *s))
            .unwrap_or((0, 0.0));
        Classification {
            label: self.labels.get(best).cloned().unwrap_or_default(),
            score,
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
            |chunk| self.scores(chunk),
            |scores| Output::Classifications(scores.iter().map(|s| self.answer(s)).collect()),
        )
    }

    fn units(&self) -> Option<&dyn crate::weights::layer_stack::Units> {
        Some(self.model.units())
    }

    fn info(&self) -> HandlerInfo {
        HandlerInfo {
            handler: HandlerKind::TextClassification,
            architecture: Some("bert".into()),
            dtype: Some(format!("{:?}", self.dtype).to_lowercase()),
            device: "cpu".into(),
            max_input_tokens: Some(self.text.max_tokens),
            streamed_units: Some(self.model.streamed_units()),
            parameters: Some(self.parameters),
            weights: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WeightSource;
    use crate::testing::TinyBert;
    use crate::weights::files::FolderFiles;
    use crate::weights::layer_stack::UnitPlacement;
    use candle_core::Tensor;
    use candle_transformers::models::bert::{BertModel, Config};

    fn write_classifier(dir: &std::path::Path) -> (TinyBert, Vec<String>) {
        let spec = TinyBert::default();
        let labels = ["negative", "neutral", "positive"];
        spec.write_sequence_classifier(dir, &labels).expect("write");
        (spec, labels.iter().map(|l| l.to_string()).collect())
    }

    #[test]
    fn scores_match_candles_bert_with_the_pooler_and_classifier_applied_by_hand() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spec, names) = write_classifier(dir.path());
        let config: Config = serde_json::from_value(spec.config()).expect("config");
        let source = WeightSource::open(&dir.path().join("model.safetensors")).expect("source");
        let reference = BertModel::load(source.var_builder(DType::F32, &Device::Cpu), &config)
            .expect("reference");
        let get = |name: &str| -> Vec<f32> {
            source
                .load(name, DType::F32, &Device::Cpu)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect(name)
        };
        let (pw, pb, cw, cb) = (
            get("bert.pooler.dense.weight"),
            get("bert.pooler.dense.bias"),
            get("classifier.weight"),
            get("classifier.bias"),
        );
        let h = spec.hidden_size;

        for streamed in [false, true] {
            let options = LoadOptions::default();
            let handler =
                TextClassification::load(&FolderFiles::new(dir.path()), &options).expect("load");
            let handler = if streamed {
                let model = MappedBert::load(&source, &config, DType::F32, |_| {
                    Ok(UnitPlacement::Streamed(Device::Cpu))
                })
                .expect("stack");
                TextClassification { model, ..handler }
            } else {
                handler
            };
            let texts = ["hello world", "the quick brown fox jumps"];
            let input = handler
                .prepare(Request::Texts(
                    texts.iter().map(|t| t.to_string()).collect(),
                ))
                .expect("prepare");
            let Input::Texts(encoded) = &input else {
                panic!("texts are tokenized");
            };
            let encodings: Vec<&Encoding> = encoded.iter().collect();
            let got = handler.scores(&encodings).expect("scores");
            for (i, encoding) in encodings.iter().enumerate() {
                let ids = Tensor::new(encoding.get_ids(), &Device::Cpu)
                    .and_then(|t| t.unsqueeze(0))
                    .expect("ids");
                let hidden = reference
                    .forward(&ids, &ids.zeros_like().expect("types"), None)
                    .expect("forward");
                let cls: Vec<f32> = hidden
                    .narrow(1, 0, 1)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .expect("cls");
                let pooled: Vec<f32> = (0..h)
                    .map(|r| (pb[r] + (0..h).map(|c| pw[r * h + c] * cls[c]).sum::<f32>()).tanh())
                    .collect();
                let logits: Vec<f32> = (0..3)
                    .map(|r| cb[r] + (0..h).map(|c| cw[r * h + c] * pooled[c]).sum::<f32>())
                    .collect();
                let total: f32 = logits.iter().map(|l| l.exp()).sum();
                for (label, logit) in logits.iter().enumerate() {
                    let want = logit.exp() / total;
                    assert!(
                        (got[i][label] - want).abs() <= 1e-5,
                        "streamed={streamed} text {i} label {label}: {} vs {want}",
                        got[i][label]
                    );
                }
                let best = logits
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(j, _)| j)
                    .expect("best");
                assert_eq!(handler.answer(&got[i]).label, names[best]);
            }
        }
    }

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
}
