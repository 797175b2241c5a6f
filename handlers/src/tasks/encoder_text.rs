//! What the encoder text handlers share: the checkpoint's [`EncoderSpec`], a tokenizer set up for
//! truncation at the model's input limit and per-batch padding (tokenizer.json often
//! carries fixed padding, as MiniLM's pads everything to 128), per-request tokenization
//! before queueing (a bad text fails only its request), and padding a batch of
//! encodings into tensors (with config.json's `pad_token_id`: the id RoBERTa's positions
//! skip).

use candle_core::{DType, Device};
use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::models::encoder::{EncoderInputs, EncoderSpec, MappedEncoder};

use crate::{HandlerError, HandlerInfo, HandlerKind, Input, ModelFiles, Output, Request};

/// The torch spelling of a candle device ("cpu", "cuda:0").
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("mps:{gpu_id}"),
    }
}

/// Texts per forward pass: bounds activation memory whatever the batch size.
const MAX_TEXTS_PER_FORWARD: usize = 64;

/// An encoder checkpoint's spec and tokenizer.
pub struct EncoderText {
    pub spec: EncoderSpec,
    /// Raw config.json, for handler-specific keys (`id2label`).
    pub config_json: serde_json::Value,
    tokenizer: Tokenizer,
    pub max_tokens: usize,
    /// Encodings carry character offsets (as transformers' pipelines report spans),
    /// not byte offsets.
    pub char_offsets: bool,
}

impl EncoderText {
    /// Reads config.json (which must be an encoder family's) and tokenizer.json; inputs
    /// are cut at `max_tokens` (else the model's maximum positions, never more).
    pub fn load(
        files: &dyn ModelFiles,
        handler: &str,
        max_tokens: Option<usize>,
    ) -> Result<Self, HandlerError> {
        let bytes = files.read_required("config.json")?;
        let config_json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| HandlerError::bad_file("config.json", e))?;
        let spec = EncoderSpec::from_config(&config_json, handler)?;
        let max_tokens = max_tokens
            .unwrap_or(spec.max_tokens())
            .min(spec.max_tokens());
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
        tokenizer.with_padding(None);
        Ok(Self {
            spec,
            config_json,
            tokenizer,
            max_tokens,
            char_offsets: false,
        })
    }

    /// Tokenizes a request's texts or text pairs (a pair as the tokenizer's template lays
    /// it out: separators and token types; truncated at the input limit, longest first),
    /// once: the batch runs from these encodings.
    pub fn prepare(&self, request: Request, handler: &str) -> Result<Input, HandlerError> {
        let inputs: Vec<tokenizers::EncodeInput> = match request {
            Request::Texts(texts) => texts.into_iter().map(Into::into).collect(),
            Request::Pairs(pairs) => pairs.into_iter().map(Into::into).collect(),
            Request::Tokens(token_lists) => return self.prepare_tokens(token_lists),
            _ => return Err(HandlerError::Input(format!("{handler} takes texts"))),
        };
        if inputs.is_empty() {
            return Err(HandlerError::Input("the request has no input text".into()));
        }
        inputs
            .into_iter()
            .map(|input| {
                match self.char_offsets {
                    true => self.tokenizer.encode_char_offsets(input, true),
                    false => self.tokenizer.encode(input, true),
                }
                .map_err(|source| HandlerError::Tokenizer {
                    context: "cannot tokenize an input text".into(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Input::Texts)
    }

    /// The text of `ids`, as the tokenizer's decoder joins them (subword prefixes and
    /// byte-level marks undone).
    pub fn decode(&self, ids: &[u32]) -> Result<String, HandlerError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|source| HandlerError::Tokenizer {
                context: "cannot decode tokens".into(),
                source,
            })
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

    /// What describe says about an encoder handler of kind `handler`.
    pub fn info(
        &self,
        handler: HandlerKind,
        model: &MappedEncoder,
        dtype: DType,
        device: &Device,
        parameters: usize,
    ) -> HandlerInfo {
        HandlerInfo {
            handler,
            architecture: Some(self.spec.family.name.into()),
            dtype: Some(format!("{dtype:?}").to_lowercase()),
            device: device_name(device),
            max_input_tokens: Some(self.max_tokens),
            streamed_units: Some(model.streamed_units()),
            parameters: Some(parameters),
            weights: None,
        }
    }

    /// The batch's inputs, each `[batch, longest]`, padded on the right; positions as the
    /// family numbers them.
    pub fn inputs(
        &self,
        encodings: &[&Encoding],
        device: &Device,
    ) -> candle_core::Result<EncoderInputs> {
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let padded = |row: &[u32], pad: u32| {
            let mut row = row.to_vec();
            row.resize(len, pad);
            row
        };
        let ids: Vec<Vec<u32>> = encodings
            .iter()
            .map(|e| padded(e.get_ids(), self.spec.pad_token_id))
            .collect();
        // A family with one token type (RoBERTa's) reads every token as type 0, as its
        // tokenizers give them; where types count, one past the table is an error.
        let types: Vec<Vec<u32>> = encodings
            .iter()
            .map(|e| match self.spec.type_vocab_size {
                0 | 1 => vec![0; len],
                _ => padded(e.get_type_ids(), 0),
            })
            .collect();
        if let Some(bad) = types
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.spec.type_vocab_size.max(1))
        {
            candle_core::bail!(
                "token type {bad} is past the model's {} token types (the tokenizer does not fit the model)",
                self.spec.type_vocab_size
            );
        }
        let mask: Vec<Vec<u32>> = encodings
            .iter()
            .map(|e| padded(e.get_attention_mask(), 0))
            .collect();
        EncoderInputs::from_rows(&self.spec, &ids, &types, &mask, device)
    }
}
