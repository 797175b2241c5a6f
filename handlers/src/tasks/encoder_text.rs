//! What the BERT text handlers share: the checkpoint's config, a tokenizer set up for
//! truncation at the model's input limit and per-batch padding (tokenizer.json often
//! carries fixed padding, as MiniLM's pads everything to 128), per-request tokenization
//! before queueing (a bad text fails only its request), and padding a batch of
//! encodings into tensors.

use candle_core::{Device, Tensor};
use candle_transformers::models::bert::Config as BertConfig;
use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::{HandlerError, Input, ModelFiles, Output, Request};

/// Texts per forward pass: bounds activation memory whatever the batch size.
const MAX_TEXTS_PER_FORWARD: usize = 64;

/// A BERT checkpoint's config and tokenizer.
pub struct BertText {
    pub config: BertConfig,
    /// Raw config.json, for handler-specific keys (`id2label`).
    pub config_json: serde_json::Value,
    tokenizer: Tokenizer,
    pub max_tokens: usize,
    pad_id: u32,
}

impl BertText {
    /// Reads config.json (which must be BERT's) and tokenizer.json; inputs are cut at
    /// `max_tokens` (else the model's maximum positions, never more).
    pub fn load(
        files: &dyn ModelFiles,
        handler: &str,
        max_tokens: Option<usize>,
    ) -> Result<Self, HandlerError> {
        let bytes = files.read_required("config.json")?;
        let config_json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| HandlerError::bad_file("config.json", e))?;
        let model_type = config_json
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if model_type != "bert" {
            return Err(HandlerError::Unsupported(format!(
                "{handler} serves BERT-family encoders (config.json model_type \"bert\"), this model's model_type is {model_type:?}"
            )));
        }
        let config: BertConfig =
            serde_json::from_slice(&bytes).map_err(|e| HandlerError::bad_file("config.json", e))?;
        let max_tokens = max_tokens
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        let mut tokenizer = Tokenizer::from_bytes(files.read_required("tokenizer.json")?)
            .map_err(|e| HandlerError::bad_file("tokenizer.json", e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|source| HandlerError::Tokenizer {
                context: "cannot set truncation".into(),
                source,
            })?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .unwrap_or(config.pad_token_id as u32);
        tokenizer.with_padding(None);
        Ok(Self {
            config,
            config_json,
            tokenizer,
            max_tokens,
            pad_id,
        })
    }

    /// Tokenizes a request's texts (truncated at the input limit), once: the batch runs
    /// from these encodings.
    pub fn prepare(&self, request: Request, handler: &str) -> Result<Input, HandlerError> {
        let texts = match request {
            Request::Texts(texts) => texts,
            Request::Tokens(token_lists) => return self.prepare_tokens(token_lists),
            _ => return Err(HandlerError::Input(format!("{handler} takes texts"))),
        };
        if texts.is_empty() {
            return Err(HandlerError::Input("the request has no input text".into()));
        }
        texts
            .iter()
            .map(|text| {
                self.tokenizer
                    .encode(text.as_str(), true)
                    .map_err(|source| HandlerError::Tokenizer {
                        context: "cannot tokenize an input text".into(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Input::Texts)
    }

    /// Encodings of texts the client tokenized: the ids as given (truncated at the
    /// input limit), each checked against the vocabulary.
    fn prepare_tokens(&self, token_lists: Vec<Vec<u32>>) -> Result<Input, HandlerError> {
        if token_lists.is_empty() || token_lists.iter().any(Vec::is_empty) {
            return Err(HandlerError::Input(
                "the request has an empty token list".into(),
            ));
        }
        let vocabulary = self.tokenizer.get_vocab_size(true);
        token_lists
            .into_iter()
            .map(|mut ids| {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocabulary) {
                    return Err(HandlerError::Input(format!(
                        "token id {bad} is outside the model's vocabulary of {vocabulary}"
                    )));
                }
                ids.truncate(self.max_tokens);
                let n = ids.len();
                let tokens = ids
                    .iter()
                    .map(|&id| self.tokenizer.id_to_token(id).unwrap_or_default())
                    .collect();
                Ok(Encoding::new(
                    ids,
                    vec![0; n],
                    tokens,
                    vec![None; n],
                    vec![(0, 0); n],
                    vec![0; n],
                    vec![1; n],
                    Vec::new(),
                    Default::default(),
                ))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Input::Texts)
    }

    /// Runs a batch of tokenized text requests: `forward` over chunks of at most 64
    /// texts, and each request answered with `answer` of its texts' results, in order.
    pub fn run_batch<T>(
        &self,
        batch: &[Input],
        handler: &str,
        forward: impl Fn(&[&Encoding]) -> Result<Vec<T>, HandlerError>,
        answer: impl Fn(Vec<T>) -> Output,
    ) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
        let encoded: Vec<Result<&[Encoding], HandlerError>> = batch
            .iter()
            .map(|input| match input {
                Input::Texts(encodings) => Ok(encodings.as_slice()),
                _ => Err(HandlerError::Input(format!("{handler} takes texts"))),
            })
            .collect();
        let all: Vec<&Encoding> = encoded.iter().flatten().flat_map(|e| e.iter()).collect();
        let mut results = Vec::with_capacity(all.len());
        for chunk in all.chunks(MAX_TEXTS_PER_FORWARD) {
            results.extend(forward(chunk)?);
        }
        let mut results = results.into_iter();
        Ok(encoded
            .into_iter()
            .map(|request| {
                request.map(|texts| answer(results.by_ref().take(texts.len()).collect()))
            })
            .collect())
    }

    /// `(ids, token types, attention mask)`, each `[batch, longest]`, padded on the right.
    pub fn tensors(
        &self,
        encodings: &[&Encoding],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let batch = encodings.len();
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![self.pad_id; batch * len];
        let mut type_ids = vec![0u32; batch * len];
        let mut mask = vec![0u32; batch * len];
        for (row, encoding) in encodings.iter().enumerate() {
            let at = row * len;
            let n = encoding.len();
            ids[at..at + n].copy_from_slice(encoding.get_ids());
            type_ids[at..at + n].copy_from_slice(encoding.get_type_ids());
            mask[at..at + n].copy_from_slice(encoding.get_attention_mask());
        }
        Ok((
            Tensor::from_vec(ids, (batch, len), device)?,
            Tensor::from_vec(type_ids, (batch, len), device)?,
            Tensor::from_vec(mask, (batch, len), device)?,
        ))
    }
}
