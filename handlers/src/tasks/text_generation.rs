//! The `text_generation` handler: Llama-family decoders (HF safetensors, or GGUF converted
//! by [`crate::models::gguf`]) laid out by the plan, generating with a KV cache.
//!
//! Request: `{"inputs": "prompt", "parameters": {"max_new_tokens": 32, "do_sample": false,
//! "temperature": .., "top_p": .., "top_k": .., "seed": .., "stop": [..], "details": true}}`
//! (or a text/plain prompt). Answer: `{"generated_text": "..."}`, plus `"details":
//! {"finish_reason": "length"|"eos_token"|"stop_sequence", "generated_tokens": n,
//! "token_ids": [...]}` when asked. Greedy decoding is deterministic; sampling is seeded.
//! A request is a [`Sequence`] that [`TextGeneration::advance`] moves on one token at a
//! time, alone or together with others: [`GenerationBatch`] is continuous batching
//! (model-config.yaml `continuousBatching: true`), and streaming can build on the same
//! step.

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::error::CandleContext;
use crate::handler::{Finished, Input, Output, RawBody, StepBatch};
use crate::models::llama::{KvCache, LlamaConfig, MappedLlama};
use crate::tasks::decode_texts;
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
    /// Run to `max_new_tokens` even past end-of-sequence tokens (as vLLM's `ignore_eos`;
    /// for benchmarks that need a fixed number of tokens).
    #[serde(default)]
    pub ignore_eos: bool,
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
            ignore_eos: false,
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

    /// A sequence for `request`, ready for its prefill (prompt tokenized and checked
    /// against the model's positions; nothing computed yet).
    pub fn begin(&self, request: &GenerateRequest) -> Result<Sequence, HandlerError> {
        self.begin_tokens(self.encode(&request.prompt)?, &request.parameters)
    }

    /// [`TextGeneration::begin`] for an already tokenized prompt.
    pub fn begin_tokens(
        &self,
        prompt: Vec<u32>,
        parameters: &GenerateParameters,
    ) -> Result<Sequence, HandlerError> {
        let limit = self.model.config().positions();
        if prompt.is_empty() {
            return Err(HandlerError::Input("the prompt is empty".into()));
        }
        if prompt.len() + parameters.max_new_tokens > limit {
            return Err(HandlerError::Input(format!(
                "the prompt ({} tokens) plus max_new_tokens ({}) exceeds the model's {limit} positions",
                prompt.len(),
                parameters.max_new_tokens
            )));
        }
        Ok(Sequence {
            prompt_tokens: prompt.len(),
            cache: KvCache::default(),
            next_input: prompt,
            sampler: LogitsProcessor::from_sampling(
                parameters.seed.unwrap_or(299_792_458),
                parameters.sampling(),
            ),
            ids: Vec::new(),
            text: String::new(),
            finish: None,
            parameters: parameters.clone(),
        })
    }

    /// Runs one step of every unfinished sequence in `sequences` and appends the token
    /// each produced: a sequence that has not had its prefill runs it alone (prompts
    /// differ in length); those decoding run together, one row each, so a step reads
    /// every weight once for all of them.
    pub fn advance(&self, sequences: &mut [&mut Sequence]) -> Result<(), HandlerError> {
        let (prefill, decode): (Vec<&mut &mut Sequence>, Vec<&mut &mut Sequence>) = sequences
            .iter_mut()
            .filter(|s| s.finish.is_none())
            .partition(|s| s.next_input.len() > 1 || s.ids.is_empty());
        for sequence in prefill {
            let input = Tensor::new(sequence.next_input.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .and_then(|t| self.model.forward(&t, &mut sequence.cache))
                .context(|| "prefill failed".into())?;
            self.accept(sequence, &input.squeeze(0).context(|| "prefill".into())?)?;
        }
        if decode.is_empty() {
            return Ok(());
        }
        let column: Vec<u32> = decode.iter().map(|s| s.next_input[0]).collect();
        let mut decode = decode;
        let logits = {
            let mut caches: Vec<&mut KvCache> = decode.iter_mut().map(|s| &mut s.cache).collect();
            Tensor::new(column.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(1))
                .and_then(|t| self.model.forward_sequences(&t, &mut caches))
                .context(|| "generation step failed".into())?
        };
        for (row, sequence) in decode.into_iter().enumerate() {
            let logits = logits.get(row).context(|| "generation step".into())?;
            self.accept(sequence, &logits)?;
        }
        Ok(())
    }

    /// Samples the next token from `logits` and decides whether `sequence` is done
    /// (end-of-sequence token, a stop sequence in the text, or max_new_tokens).
    fn accept(&self, sequence: &mut Sequence, logits: &Tensor) -> Result<(), HandlerError> {
        let id = sequence
            .sampler
            .sample(logits)
            .context(|| "sampling failed".into())?;
        sequence.ids.push(id);
        sequence.next_input = vec![id];
        if self.eos.contains(&id) && !sequence.parameters.ignore_eos {
            sequence.finish = Some(FinishReason::EosToken);
        } else if !sequence.parameters.stop.is_empty() {
            // Stop sequences are looked for in the text, so it is decoded every step
            // only when there are some.
            sequence.text = self.decode(&sequence.ids)?;
            if let Some(at) = sequence
                .parameters
                .stop
                .iter()
                .filter_map(|s| sequence.text.find(s.as_str()))
                .min()
            {
                sequence.text.truncate(at);
                sequence.finish = Some(FinishReason::StopSequence);
                return Ok(());
            }
        }
        if sequence.finish.is_none() && sequence.ids.len() >= sequence.parameters.max_new_tokens {
            sequence.finish = Some(FinishReason::Length);
        }
        if sequence.finish.is_some() {
            sequence.text = self.decode(&sequence.ids)?;
        }
        Ok(())
    }

    /// The answer of a finished sequence.
    fn answer(&self, sequence: Sequence) -> Output {
        let mut answer = serde_json::json!({ "generated_text": sequence.text });
        if sequence.parameters.details {
            answer["details"] = serde_json::json!({
                "finish_reason": sequence.finish.unwrap_or(FinishReason::Length).name(),
                "prompt_tokens": sequence.prompt_tokens,
                "generated_tokens": sequence.ids.len(),
                "token_ids": sequence.ids,
            });
        }
        Output::Json(answer)
    }

    fn respond(&self, request: &GenerateRequest) -> Result<Output, HandlerError> {
        let mut sequence = self.begin(request)?;
        while !sequence.finished() {
            self.advance(&mut [&mut sequence])?;
        }
        Ok(self.answer(sequence))
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

/// One request being generated: its KV cache and sampler, the tokens it produced and
/// their text. [`TextGeneration::advance`] moves it on by one token.
pub struct Sequence {
    prompt_tokens: usize,
    cache: KvCache,
    /// What the next step feeds the model: the prompt before the prefill, then the last
    /// token.
    next_input: Vec<u32>,
    sampler: LogitsProcessor,
    ids: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    parameters: GenerateParameters,
}

impl Sequence {
    pub fn finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Token ids generated so far.
    pub fn token_ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Continuous batching over [`TextGeneration`]: sequences join with their prefill and
/// leave when they finish; every step decodes all running ones together.
pub struct GenerationBatch<'a> {
    owner: &'a TextGeneration,
    running: Vec<(u64, Sequence)>,
}

impl StepBatch for GenerationBatch<'_> {
    fn join(&mut self, ticket: u64, input: &Input) -> Option<Result<Output, HandlerError>> {
        let Input::Generate(request) = input else {
            return Some(Err(HandlerError::Input(
                "text_generation takes a prompt".into(),
            )));
        };
        let mut sequence = match self.owner.begin(request) {
            Ok(sequence) => sequence,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = self.owner.advance(&mut [&mut sequence]) {
            return Some(Err(e));
        }
        if sequence.finished() {
            return Some(Ok(self.owner.answer(sequence)));
        }
        self.running.push((ticket, sequence));
        None
    }

    fn leave(&mut self, ticket: u64) {
        self.running.retain(|(t, _)| *t != ticket);
    }

    fn step(&mut self) -> Result<Vec<Finished>, HandlerError> {
        let mut sequences: Vec<&mut Sequence> = self.running.iter_mut().map(|(_, s)| s).collect();
        if let Err(e) = self.owner.advance(&mut sequences) {
            self.running.clear();
            return Err(e);
        }
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|(_, s)| s.finished());
        self.running = running;
        Ok(done
            .into_iter()
            .map(|(ticket, sequence)| (ticket, Ok(self.owner.answer(sequence))))
            .collect())
    }

    fn running(&self) -> usize {
        self.running.len()
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

    fn step_batch(&self) -> Option<Box<dyn StepBatch + '_>> {
        Some(Box::new(GenerationBatch {
            owner: self,
            running: Vec::new(),
        }))
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

    fn tiny_generator() -> (tempfile::TempDir, TextGeneration) {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = crate::testing::TinyLlama {
            vocab_size: crate::testing::vocabulary().len(),
            // No end-of-sequence token, so every request runs to its length.
            ..crate::testing::TinyLlama::default()
        };
        spec.write_generator(dir.path()).expect("write");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).expect("read"))
                .expect("config");
        config["eos_token_id"] = serde_json::Value::Null;
        std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
        let handler = TextGeneration::load(
            &crate::weights::files::FolderFiles::new(dir.path()),
            &LoadOptions::default(),
        )
        .expect("load");
        (dir, handler)
    }

    fn request(prompt: &str, max_new_tokens: usize) -> Input {
        Input::Generate(GenerateRequest {
            prompt: prompt.into(),
            parameters: GenerateParameters {
                max_new_tokens,
                details: true,
                ..GenerateParameters::default()
            },
        })
    }

    fn alone(handler: &TextGeneration, input: &Input) -> Output {
        let mut answers = handler.run(std::slice::from_ref(input)).expect("run");
        answers.remove(0).expect("answer")
    }

    #[test]
    fn a_running_batch_answers_each_request_as_if_it_ran_alone() {
        let (_dir, handler) = tiny_generator();
        let inputs = [
            request("hello world", 5),
            request("the quick brown fox jumps", 2),
            request("a", 1),
            request("rust", 7),
        ];
        let want: Vec<Output> = inputs.iter().map(|i| alone(&handler, i)).collect();
        let mut batch = handler.step_batch().expect("generation batches");
        let mut got: Vec<Option<Output>> = vec![None; inputs.len()];
        let mut finish = |ticket: u64, answer: Result<Output, HandlerError>| {
            let slot = &mut got[ticket as usize];
            assert!(slot.is_none(), "request {ticket} answered twice");
            *slot = Some(answer.expect("answer"));
        };
        for ticket in 0..2u64 {
            if let Some(answer) = batch.join(ticket, &inputs[ticket as usize]) {
                finish(ticket, answer);
            }
        }
        // One request finishes at its prefill (max_new_tokens 1).
        let early = batch.join(2, &inputs[2]).expect("done at once");
        finish(2, early);
        let mut steps = 0;
        while batch.running() > 0 {
            for (ticket, answer) in batch.step().expect("step") {
                finish(ticket, answer);
            }
            steps += 1;
            // A late request joins the running batch between steps.
            if steps == 1 {
                // Request 1 (2 tokens) left after this step; 0 runs on.
                assert!(batch.join(3, &inputs[3]).is_none());
                assert_eq!(batch.running(), 2);
            }
        }
        for (i, (got, want)) in got.into_iter().zip(want).enumerate() {
            let got = got.expect("every request answered");
            let (Output::Json(got), Output::Json(want)) = (got, want) else {
                panic!("json answers");
            };
            assert_eq!(got, want, "request {i}");
        }
        // A bad request fails alone, and one that is dropped is not answered.
        assert!(matches!(
            batch.join(9, &Input::Texts(vec!["x".into()])),
            Some(Err(_))
        ));
        assert!(batch.join(10, &request("hello", 4)).is_none());
        batch.leave(10);
        assert_eq!(batch.running(), 0);
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
