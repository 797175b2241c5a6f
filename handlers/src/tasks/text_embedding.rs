//! The `text_embedding` handler: encoders (BERT, RoBERTa, XLM-RoBERTa, DistilBERT) turned into sentence embeddings
//! with the pooling and normalisation their sentence-transformers files ask for.
//!
//! Inputs longer than `max_seq_length` (sentence_bert_config.json, else the model's
//! maximum positions, capped by setup_config's `max_length`) are truncated, as
//! sentence-transformers does. A batch's texts are tokenized one by one (a bad text
//! fails alone), padded to the longest in each chunk, and run through the model.

use crate::models::encoder::MappedEncoder;
use crate::tasks::encoder_text::EncoderText;
use candle_core::{D, DType, Device, Tensor};
use tokenizers::Encoding;

use crate::error::CandleContext;
use crate::models::sentence_transformers::{Pooling, SentenceTransformerConfig};
use crate::weights::WeightsWatch;
use crate::{
    Handler, HandlerError, HandlerInfo, HandlerKind, Input, LoadOptions, ModelFiles, Output,
    Request,
};

/// A loaded sentence-embedding model (any encoder family).
pub struct TextEmbedding {
    model: MappedEncoder,
    text: EncoderText,
    pooling: Pooling,
    normalize: bool,
    device: Device,
    dtype: DType,
    parameters: usize,
    /// Whether the files it still maps changed underneath.
    watch: WeightsWatch,
}

impl TextEmbedding {
    pub fn load(files: &dyn ModelFiles, options: &LoadOptions) -> Result<Self, HandlerError> {
        let sentence = SentenceTransformerConfig::read(files)?;
        let text = EncoderText::load(
            files,
            "text_embedding",
            options.max_length.or(sentence.max_seq_length),
        )?;
        let weights = files.model_weights()?;
        let dtype = options.dtype.unwrap_or(DType::F32);
        let parameters = weights.parameters();
        let model = MappedEncoder::load(&weights, &text.spec, dtype, |unit| {
            options.placement_of(unit)
        })?;
        if let Some(changed) = weights.changed() {
            return Err(changed);
        }
        Ok(Self {
            model,
            text,
            pooling: sentence.pooling,
            normalize: sentence.normalize,
            device: options.device.clone(),
            dtype,
            parameters,
            watch: weights.watch(),
        })
    }

    /// Embeds already tokenized texts in one forward pass.
    fn embed(&self, encodings: &[&Encoding]) -> Result<Vec<Vec<f32>>, HandlerError> {
        let forward = || -> candle_core::Result<Vec<Vec<f32>>> {
            let inputs = self.text.inputs(encodings, &self.device)?;
            let hidden = self.model.forward(&inputs)?.to_dtype(DType::F32)?;
            let pooled = pool(&hidden, &inputs.mask, self.pooling)?;
            let pooled = if self.normalize {
                l2_normalize(&pooled)?
            } else {
                pooled
            };
            pooled.to_vec2()
        };
        forward().context(|| format!("encoder forward pass failed (batch of {})", encodings.len()))
    }
}

/// Pools `[batch, tokens, hidden]` into `[batch, hidden * modes]` over the attention mask.
pub fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> candle_core::Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?; // [b, t, 1]
    let mut parts = Vec::with_capacity(pooling.modes());
    if pooling.cls {
        parts.push(hidden.narrow(1, 0, 1)?.squeeze(1)?);
    }
    if pooling.max {
        // Padding positions get a large negative value so they never win the max.
        let masked = hidden.broadcast_add(&((mask.ones_like()? - &mask)? * -1e9)?)?;
        parts.push(masked.max(1)?);
    }
    if pooling.mean || pooling.mean_sqrt_len {
        let sum = hidden.broadcast_mul(&mask)?.sum(1)?; // [b, h]
        let count = mask.sum(1)?.clamp(1e-9, f64::MAX)?; // [b, 1]
        if pooling.mean {
            parts.push(sum.broadcast_div(&count)?);
        }
        if pooling.mean_sqrt_len {
            parts.push(sum.broadcast_div(&count.sqrt()?)?);
        }
    }
    Tensor::cat(&parts, 1)
}

/// Divides each row by its L2 norm (with torch's `F.normalize` epsilon).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

impl Handler for TextEmbedding {
    fn weights_changed(&self) -> Option<HandlerError> {
        self.watch.changed()
    }

    fn prepare(&self, request: Request) -> Result<Input, HandlerError> {
        self.text.prepare(request, "text_embedding")
    }

    fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
        self.text.run_batch(
            batch,
            "text_embedding",
            |chunk| self.embed(chunk),
            Output::Embeddings,
        )
    }

    fn units(&self) -> Option<&dyn crate::weights::layer_stack::Units> {
        Some(self.model.units())
    }

    fn info(&self) -> HandlerInfo {
        self.text.info(
            HandlerKind::TextEmbedding,
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
    use crate::testing::TinyBert;
    use crate::weights::files::FolderFiles;
    use candle_transformers::models::bert::{BertModel, Config as BertConfig};
    use tokenizers::Tokenizer;

    fn texts(handler: &TextEmbedding, batch: &[&[&str]]) -> Vec<Input> {
        batch
            .iter()
            .map(|texts| {
                handler
                    .prepare(Request::Texts(
                        texts.iter().map(|t| t.to_string()).collect(),
                    ))
                    .expect("prepare")
            })
            .collect()
    }

    fn embeddings(output: &Result<Output, HandlerError>) -> Vec<Vec<f32>> {
        match output {
            Ok(Output::Embeddings(e)) => e.clone(),
            other => panic!("expected embeddings, got {other:?}"),
        }
    }

    /// The reference: candle-transformers' BertModel loaded by candle's own mmap loader,
    /// one text at a time (no padding), pooled with plain loops.
    fn reference(dir: &std::path::Path, spec: &TinyBert, text: &str) -> Vec<f32> {
        let config: BertConfig = serde_json::from_value(spec.config()).expect("config");
        #[allow(unsafe_code)]
        // SAFETY: the test's own temporary file, not modified while mapped.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .expect("mmap");
        let model = BertModel::load(vb, &config).expect("load");
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).expect("no truncation");
        let mut ids = tokenizer
            .encode(text, true)
            .expect("encode")
            .get_ids()
            .to_vec();
        if let Some(max) = spec.max_seq_length
            && ids.len() > max
        {
            let sep = ids[ids.len() - 1];
            ids.truncate(max - 1);
            ids.push(sep);
        }
        let n = ids.len();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let hidden = model
            .forward(&input, &input.zeros_like().expect("zeros"), None)
            .and_then(|h| h.squeeze(0))
            .and_then(|h| h.to_vec2::<f32>())
            .expect("forward");
        let dim = hidden[0].len();
        let mut pooled: Vec<f32> = match spec.pooling {
            "cls" => hidden[0].clone(),
            "max" => (0..dim)
                .map(|d| hidden.iter().map(|row| row[d]).fold(f32::MIN, f32::max))
                .collect(),
            _ => (0..dim)
                .map(|d| hidden.iter().map(|row| row[d]).sum::<f32>() / n as f32)
                .collect(),
        };
        if spec.normalize {
            let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt();
            pooled.iter_mut().for_each(|x| *x /= norm);
        }
        pooled
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn batched_padded_embeddings_match_the_unpadded_reference_for_each_pooling() {
        for (pooling, normalize) in [("mean", true), ("cls", false), ("max", true)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let spec = TinyBert {
                pooling,
                normalize,
                ..TinyBert::default()
            };
            spec.write(dir.path()).expect("write");
            let handler =
                TextEmbedding::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
                    .expect("load");
            let batch = [
                &["hello world", "the quick brown fox jumps over spillways"][..],
                &["rust"][..],
            ];
            let outputs = handler.run(&texts(&handler, &batch)).expect("run");
            assert_eq!(outputs.len(), 2);
            let got: Vec<Vec<f32>> = outputs.iter().flat_map(embeddings).collect();
            let sentences: Vec<&str> = batch.iter().flat_map(|b| b.iter().copied()).collect();
            for (text, embedding) in sentences.iter().zip(&got) {
                let want = reference(dir.path(), &spec, text);
                let diff = max_abs_diff(embedding, &want);
                assert!(diff <= 1e-5, "{pooling}: {text:?} differs by {diff}");
            }
        }
    }

    #[test]
    fn a_demoted_model_streams_its_units_answers_the_same_and_promotes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        TinyBert::default().write(dir.path()).expect("write");
        let handler = TextEmbedding::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
            .expect("load");
        let batch = texts(&handler, &[&["hello world", "rust"]]);
        let before: Vec<Vec<f32>> = handler
            .run(&batch)
            .expect("run")
            .iter()
            .flat_map(embeddings)
            .collect();
        assert_eq!(handler.info().streamed_units, Some(0));
        let model = handler.units().expect("BERT has units");
        let units = model.demote();
        assert_eq!(units.len(), 3, "embeddings and both blocks: {units:?}");
        assert_eq!(handler.info().streamed_units, Some(3));
        let streamed_before = model.stream_totals().units;
        let demoted: Vec<Vec<f32>> = handler
            .run(&batch)
            .expect("run")
            .iter()
            .flat_map(embeddings)
            .collect();
        assert_eq!(
            model.stream_totals().units - streamed_before,
            3,
            "read from disk"
        );
        assert_eq!(model.promote().expect("promote").len(), 3);
        assert_eq!(handler.info().streamed_units, Some(0));
        let promoted: Vec<Vec<f32>> = handler
            .run(&batch)
            .expect("run")
            .iter()
            .flat_map(embeddings)
            .collect();
        for ((b, d), p) in before.iter().zip(&demoted).zip(&promoted) {
            assert!(max_abs_diff(b, d) <= 1e-5, "demoted differs");
            assert_eq!(b, p, "promoted computes as before");
        }
    }

    #[test]
    fn inputs_longer_than_max_seq_length_are_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = TinyBert::default(); // max_seq_length 24
        spec.write(dir.path()).expect("write");
        let handler = TextEmbedding::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
            .expect("load");
        let long = "the quick brown fox ".repeat(10);
        let outputs = handler
            .run(&texts(
                &handler,
                &[&[long.as_str(), &format!("{long} hello world model")]],
            ))
            .expect("run");
        let got = embeddings(&outputs[0]);
        let diff = max_abs_diff(&got[0], &got[1]);
        assert_eq!(
            diff, 0.0,
            "text past the limit must not change the embedding"
        );
        let want = reference(dir.path(), &spec, &long);
        assert!(max_abs_diff(&got[0], &want) <= 1e-5);
        assert_eq!(handler.info().max_input_tokens, Some(24));
    }

    #[test]
    fn a_prepared_input_counts_texts_and_the_longest_truncated_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        TinyBert::default().write(dir.path()).expect("write"); // max_seq_length 24
        let handler = TextEmbedding::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
            .expect("load");
        let size = |t: &[&str]| {
            handler
                .prepare(Request::Texts(t.iter().map(|s| s.to_string()).collect()))
                .expect("prepare")
                .size()
                .expect("texts have a size")
        };
        // [CLS] + words + [SEP].
        assert_eq!(
            size(&["hello world", "hello"]),
            crate::InputSize { rows: 2, tokens: 4 }
        );
        let long = "the quick brown fox ".repeat(10);
        assert_eq!(
            size(&[long.as_str()]).tokens,
            24,
            "truncated like the forward pass"
        );
        let raw = Input::Raw(crate::RawBody {
            content_type: None,
            bytes: vec![],
        });
        assert_eq!(raw.size(), None);
        assert!(
            handler.prepare(Request::Texts(vec![])).is_err(),
            "a request without texts is refused"
        );
    }

    #[test]
    fn setup_max_length_caps_the_input_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        TinyBert::default().write(dir.path()).expect("write");
        let options = LoadOptions {
            max_length: Some(8),
            ..LoadOptions::default()
        };
        let handler = TextEmbedding::load(&FolderFiles::new(dir.path()), &options).expect("load");
        assert_eq!(handler.info().max_input_tokens, Some(8));
        let outputs = handler
            .run(&texts(
                &handler,
                &[&["a b c d e f g h i j", "a b c d e f x y z"]],
            ))
            .expect("run");
        let got = embeddings(&outputs[0]);
        assert_eq!(
            max_abs_diff(&got[0], &got[1]),
            0.0,
            "both are cut to [CLS] a..f [SEP]"
        );
    }

    #[test]
    fn a_non_bert_model_is_refused_with_its_model_type() {
        let dir = tempfile::tempdir().expect("tempdir");
        TinyBert::default().write(dir.path()).expect("write");
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#)
            .expect("write");
        let err = TextEmbedding::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("llama"), "{err}");
    }
}
