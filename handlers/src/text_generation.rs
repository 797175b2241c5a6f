//! The `text_generation` handler: Llama-family decoders (HF safetensors, or GGUF converted
//! by [`crate::gguf`]) laid out by the plan, generating with a KV cache.
//!
//! Request: `{"inputs": "prompt", "parameters": {"max_new_tokens": 32, "do_sample": false,
//! "temperature": .., "top_p": .., "top_k": .., "seed": .., "stop": [..], "details": true}}`
//! (or a text/plain prompt). Answer: `{"generated_text": "..."}`, plus `"details":
//! {"finish_reason": "length"|"eos_token"|"stop_sequence", "generated_tokens": n,
//! "token_ids": [...]}` when asked. Greedy decoding is deterministic; sampling is seeded.
//! Generation is a token iterator ([`Generation`]), so streaming can come later.

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::error::CandleContext;
use crate::handler::{Input, Output, RawBody, decode_texts};
use crate::llama::{KvCache, LlamaConfig, MappedLlama};
use crate::{Handler, HandlerError, HandlerInfo, HandlerKind, LoadOptions, ModelFiles};

/// Generation parameters, with TGI's names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParameters {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub details: bool,
}

fn default_max_new_tokens() -> usize {
    32
}

impl Default for GenerateParameters {
    fn default() -> Self {
        Self {
            max_new_tokens: default_max_new_tokens(),
            do_sample: false,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            details: false,
        }
    }
}

/// A decoded generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub parameters: GenerateParameters,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    inputs: String,
    #[serde(default)]
    parameters: Option<GenerateParameters>,
}

impl GenerateParameters {
    fn check(&self) -> Result<(), HandlerError> {
        let bad = |m: String| Err(HandlerError::Input(m));
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if let Some(t) = self.temperature
            && !(t > 0.0 && t.is_finite())
        {
            return bad(format!("temperature must be positive, got {t}"));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad(format!("top_p must be in (0, 1], got {p}"));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop sequences must not be empty".into());
        }
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        if !self.do_sample {
            return Sampling::ArgMax;
        }
        let temperature = self.temperature.unwrap_or(1.0);
        match (self.top_k, self.top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

impl FinishReason {
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        }
    }
}

/// A loaded decoder and its tokenizer.
pub struct TextGeneration {
    model: MappedLlama,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    dtype: DType,
    parameters: usize,
}

impl TextGeneration {
    pub fn load(files: &dyn ModelFiles, options: &LoadOptions) -> Result<Self, HandlerError> {
        let bytes = files.read_required("config.json")?;
        let family: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| HandlerError::bad_file("config.json", e))?;
        let model_type = family
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if !matches!(model_type, "llama" | "mistral" | "qwen2") {
            return Err(HandlerError::Unsupported(format!(
                "text_generation serves Llama-family decoders (model_type llama, mistral, qwen2); this model's is {model_type:?}"
            )));
        }
        let config: LlamaConfig =
            serde_json::from_slice(&bytes).map_err(|e| HandlerError::bad_file("config.json", e))?;
        let tokenizer = Tokenizer::from_bytes(files.read_required("tokenizer.json")?)
            .map_err(|e| HandlerError::bad_file("tokenizer.json", e))?;
        let weights = files.model_weights()?;
        let dtype = options.dtype.unwrap_or(DType::F32);
        let parameters = weights.parameters();
        let model = MappedLlama::load(&weights, &config, dtype, |unit| options.placement_of(unit))?;
        let mut eos = config.eos_ids();
        if let Some(id) = tokenizer
            .token_to_id("<|im_end|>")
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            && !eos.contains(&id)
            && eos.is_empty()
        {
            eos.push(id);
        }
        Ok(Self {
            model,
            tokenizer,
            eos,
            dtype,
            parameters,
        })
    }

    /// Tokenizes a prompt as the model's tokenizer does (special tokens it adds included).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, HandlerError> {
        Ok(self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| HandlerError::Input(format!("cannot tokenize the prompt: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Starts generating after `prompt_ids`.
    pub fn generate(
        &self,
        prompt_ids: Vec<u32>,
        parameters: &GenerateParameters,
    ) -> Result<Generation<'_>, HandlerError> {
        let limit = self.model.config().positions();
        if prompt_ids.is_empty() {
            return Err(HandlerError::Input("the prompt is empty".into()));
        }
        if prompt_ids.len() + parameters.max_new_tokens > limit {
            return Err(HandlerError::Input(format!(
                "the prompt ({} tokens) plus max_new_tokens ({}) exceeds the model's {limit} positions",
                prompt_ids.len(),
                parameters.max_new_tokens
            )));
        }
        Ok(Generation {
            owner: self,
            cache: KvCache::default(),
            next_input: prompt_ids,
            sampler: LogitsProcessor::from_sampling(
                parameters.seed.unwrap_or(299_792_458),
                parameters.sampling(),
            ),
            remaining: parameters.max_new_tokens,
            done: false,
        })
    }

    fn respond(&self, request: &GenerateRequest) -> Result<Output, HandlerError> {
        let prompt = self.encode(&request.prompt)?;
        let prompt_tokens = prompt.len();
        let mut generation = self.generate(prompt, &request.parameters)?;
        let mut ids = Vec::new();
        let mut finish = FinishReason::Length;
        let mut text = String::new();
        for next in generation.by_ref() {
            let id = next?;
            if self.eos.contains(&id) {
                ids.push(id);
                finish = FinishReason::EosToken;
                break;
            }
            ids.push(id);
            text = self.decode(&ids)?;
            if let Some(at) = request
                .parameters
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(at);
                finish = FinishReason::StopSequence;
                break;
            }
        }
        if finish == FinishReason::EosToken {
            text = self.decode(&ids)?;
        }
        let mut answer = serde_json::json!({ "generated_text": text });
        if request.parameters.details {
            answer["details"] = serde_json::json!({
                "finish_reason": finish.name(),
                "prompt_tokens": prompt_tokens,
                "generated_tokens": ids.len(),
                "token_ids": ids,
            });
        }
        Ok(Output::Json(answer))
    }

    fn decode(&self, ids: &[u32]) -> Result<String, HandlerError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|source| HandlerError::Tokenizer {
                context: "cannot decode generated tokens".into(),
                source,
            })
    }
}

/// A generation in progress: yields one token id per step.
pub struct Generation<'a> {
    owner: &'a TextGeneration,
    cache: KvCache,
    next_input: Vec<u32>,
    sampler: LogitsProcessor,
    remaining: usize,
    done: bool,
}

impl Iterator for Generation<'_> {
    type Item = Result<u32, HandlerError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.remaining == 0 {
            return None;
        }
        let mut step = || -> candle_core::Result<u32> {
            let input = Tensor::new(self.next_input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = self
                .owner
                .model
                .forward(&input, &mut self.cache)?
                .squeeze(0)?;
            self.sampler.sample(&logits)
        };
        match step().context(|| "generation step failed".into()) {
            Ok(id) => {
                self.remaining -= 1;
                self.next_input = vec![id];
                Some(Ok(id))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Decodes a generation request body.
pub fn decode_request(body: &RawBody) -> Result<GenerateRequest, HandlerError> {
    let is_json = body
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/json"))
        || body.bytes.first() == Some(&b'{');
    let request = if is_json {
        let parsed: Body = serde_json::from_slice(&body.bytes)
            .map_err(|e| HandlerError::Input(format!("invalid generation request: {e}")))?;
        GenerateRequest {
            prompt: parsed.inputs,
            parameters: parsed.parameters.unwrap_or_default(),
        }
    } else {
        let mut texts = decode_texts(body)?;
        GenerateRequest {
            prompt: texts.remove(0),
            parameters: GenerateParameters::default(),
        }
    };
    if request.prompt.is_empty() {
        return Err(HandlerError::Input("the request has no prompt".into()));
    }
    request.parameters.check()?;
    Ok(request)
}

impl Handler for TextGeneration {
    fn decode(&self, body: RawBody) -> Result<Input, HandlerError> {
        decode_request(&body).map(Input::Generate)
    }

    fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
        Ok(batch
            .iter()
            .map(|input| match input {
                Input::Generate(request) => self.respond(request),
                _ => Err(HandlerError::Input("text_generation takes a prompt".into())),
            })
            .collect())
    }

    fn info(&self) -> HandlerInfo {
        HandlerInfo {
            handler: HandlerKind::TextGeneration,
            architecture: Some("llama".into()),
            dtype: Some(format!("{:?}", self.dtype).to_lowercase()),
            device: "cpu".into(),
            max_input_tokens: Some(self.model.config().positions()),
            streamed_units: Some(self.model.streamed_units()),
            parameters: Some(self.parameters),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> RawBody {
        RawBody {
            content_type: Some("application/json".into()),
            bytes: s.as_bytes().to_vec(),
        }
    }

    #[test]
    fn decodes_tgi_style_requests_and_refuses_bad_parameters() {
        let r = decode_request(&json(r#"{"inputs": "hi", "parameters": {"max_new_tokens": 5, "details": true, "stop": ["."]}}"#))
            .expect("valid");
        assert_eq!(r.prompt, "hi");
        assert_eq!(
            (r.parameters.max_new_tokens, r.parameters.details),
            (5, true)
        );
        assert_eq!(r.parameters.sampling(), Sampling::ArgMax);
        let r = decode_request(&json(r#"{"inputs": "hi", "parameters": {"do_sample": true, "top_k": 5, "temperature": 0.7}}"#)).expect("valid");
        assert_eq!(
            r.parameters.sampling(),
            Sampling::TopK {
                k: 5,
                temperature: 0.7
            }
        );
        for bad in [
            r#"{"inputs": ""}"#,
            r#"{"inputs": "x", "parameters": {"max_new_tokens": 0}}"#,
            r#"{"inputs": "x", "parameters": {"temperature": -1}}"#,
            r#"{"inputs": "x", "parameters": {"top_p": 1.5}}"#,
            r#"{"inputs": "x", "parameters": {"stop": [""]}}"#,
            r#"{"inputs": "x", "parameters": {"max_tokens": 3}}"#,
            r#"{"inputs": 3}"#,
        ] {
            assert!(
                decode_request(&json(bad)).expect_err(bad).is_client_error(),
                "{bad}"
            );
        }
    }
}
