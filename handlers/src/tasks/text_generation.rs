//! The `text_generation` handler: the decoder families of
//! [`crate::models::decoder::families`] (HF safetensors, or GGUF converted by
//! [`crate::models::gguf`]) laid out by the plan, generating with a KV cache.
//!
//! A request is a prompt and [`GenerateParameters`]; its answer a [`Generation`] (text,
//! finish reason, token ids). Greedy decoding is deterministic; sampling is seeded. A
//! request is a [`Sequence`] that [`TextGeneration::advance`] moves on one token at a
//! time, alone or together with others: [`GenerationBatch`] is continuous batching
//! (model-config.yaml `continuousBatching: true`). A request with an
//! [`EventSender`](crate::EventSender) gets each token's text as it is generated.

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::LogitsProcessor;
use tokenizers::Tokenizer;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::cpu::quantized::GEMM_ROWS;
use crate::error::CandleContext;
use crate::generate::{
    EventSender, FinishReason, GenerateParameters, GenerateRequest, Generation, GenerationEvent,
    TokenLogprob, TokenLogprobs,
};
use crate::handler::PrefixCacheTotals;
use crate::handler::{Finished, Input, Output, PromptInput, Request, StepBatch};
use crate::models::decoder::prefix_cache::PrefixCache;
use crate::models::decoder::{DecoderSpec, KvCache, KvPrefix, MappedDecoder};
use crate::sampling::adjust::Adjustments;
use crate::sampling::{GrammarVocabulary, TokenConstraint};
use crate::tools::ChatTools;
use crate::weights::WeightsWatch;
use crate::{Handler, HandlerError, HandlerInfo, HandlerKind, LoadOptions, ModelFiles};

/// A loaded decoder and its tokenizer.
pub struct TextGeneration {
    model: MappedDecoder,
    tokenizer: Tokenizer,
    /// The model's own chat template, when it has one (for chat requests).
    chat_template: Option<ChatTemplate>,
    eos: Vec<u32>,
    dtype: DType,
    parameters: usize,
    /// [`crate::WeightSource::holding`] of its weights.
    holding: String,
    /// Whether the files it still maps changed underneath.
    watch: WeightsWatch,
    /// The vocabulary for constrained decoding, built on the first request with a
    /// grammar (or why this tokenizer cannot be used for it).
    grammar_vocabulary: std::sync::OnceLock<Result<GrammarVocabulary, String>>,
    /// The keys and values of what finished sequences fed the model, for prompts that
    /// start the same way (`None`: a budget of 0).
    prefixes: Option<Prefixes>,
}

/// Tokens in a block of the prefix cache: a prompt reuses whole blocks.
const PREFIX_BLOCK: usize = 16;

/// A generator's prefix cache and its counts.
struct Prefixes {
    cache: std::sync::Mutex<PrefixCache<KvPrefix>>,
    lookup_tokens: std::sync::atomic::AtomicU64,
    hit_tokens: std::sync::atomic::AtomicU64,
}

impl TextGeneration {
    pub fn load(files: &dyn ModelFiles, options: &LoadOptions) -> Result<Self, HandlerError> {
        let bytes = files.read_required("config.json")?;
        let config: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| HandlerError::bad_file("config.json", e))?;
        let config = DecoderSpec::from_config(&config)?;
        let tokenizer = Tokenizer::from_bytes(files.read_required("tokenizer.json")?)
            .map_err(|e| HandlerError::bad_file("tokenizer.json", e))?;
        let weights = files.model_weights()?;
        let dtype = options.dtype.unwrap_or(DType::F32);
        let parameters = weights.parameters();
        let holding = weights.holding();
        let model =
            MappedDecoder::load(&weights, &config, dtype, |unit| options.placement_of(unit))?;
        if let Some(changed) = weights.changed() {
            return Err(changed);
        }
        let mut eos = config.eos_ids();
        if let Some(id) = tokenizer
            .token_to_id("<|im_end|>")
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            && !eos.contains(&id)
            && eos.is_empty()
        {
            eos.push(id);
        }
        let chat_template = match files.read("tokenizer_config.json")? {
            Some(bytes) => {
                let config: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| HandlerError::bad_file("tokenizer_config.json", e))?;
                ChatTemplate::from_tokenizer_config(&config)?
            }
            None => None,
        };
        let share_prefixes = options.prefix_cache_bytes > 0 && !model.keys_depend_on_length();
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            eos,
            dtype,
            parameters,
            holding,
            watch: weights.watch(),
            grammar_vocabulary: std::sync::OnceLock::new(),
            // LongRoPE's keys depend on the sequence's length: no prefix is shared.
            prefixes: share_prefixes.then(|| Prefixes {
                cache: std::sync::Mutex::new(PrefixCache::new(
                    PREFIX_BLOCK,
                    options.prefix_cache_bytes,
                )),
                lookup_tokens: Default::default(),
                hit_tokens: Default::default(),
            }),
        })
    }

    /// Starts `sequence` (before its prefill) from the longest prefix of its prompt the
    /// cache holds: its cache copied from the held one, only the rest of the prompt left
    /// to compute.
    fn reuse_prefix(&self, sequence: &mut Sequence) -> Result<(), HandlerError> {
        let Some(prefixes) = &self.prefixes else {
            return Ok(());
        };
        if sequence.cache.position != 0 || !sequence.ids.is_empty() {
            return Ok(());
        }
        let prompt = &sequence.next_input;
        prefixes
            .lookup_tokens
            .fetch_add(prompt.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // A prompt long enough for the prompt GEMM keeps a rest long enough for it too:
        // quantized weights multiply fewer rows on another path (quantized activations),
        // which would round differently from the prompt computed whole.
        let rest = match prompt.len() >= GEMM_ROWS {
            true => GEMM_ROWS,
            false => 1,
        };
        let hit = prefixes
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lookup_leaving(prompt, rest);
        let Some(hit) = hit else {
            return Ok(());
        };
        sequence.cache = self
            .model
            .resume(&hit.value, hit.tokens)
            .context(|| "cannot start from the cached prefix".into())?;
        sequence.next_input.drain(..hit.tokens);
        sequence.cached_tokens = hit.tokens;
        prefixes
            .hit_tokens
            .fetch_add(hit.tokens as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Keeps what a finished sequence fed the model (its prompt and all but its last
    /// token), in whole blocks, for later prompts that start the same way: its cache's
    /// buffers themselves, no copy.
    fn remember(&self, sequence: Sequence) {
        let Some(prefixes) = &self.prefixes else {
            return;
        };
        let fed = sequence.cache.position;
        let whole = fed / PREFIX_BLOCK * PREFIX_BLOCK;
        if whole == 0 {
            return;
        }
        let tokens: Vec<u32> = sequence
            .prompt
            .iter()
            .chain(&sequence.ids)
            .take(whole)
            .copied()
            .collect();
        // A cache that no longer holds its start (a rolled sliding window) keeps nothing.
        let Ok(Some(prefix)) = sequence.cache.into_prefix(whole) else {
            return;
        };
        let bytes = prefix.bytes();
        prefixes
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(&tokens, prefix, bytes);
    }

    /// A matcher for the request's grammar, if it has one.
    fn constraint(
        &self,
        parameters: &GenerateParameters,
    ) -> Result<Option<TokenConstraint>, HandlerError> {
        let Some(grammar) = &parameters.grammar else {
            return Ok(None);
        };
        let vocabulary = self
            .grammar_vocabulary
            .get_or_init(|| {
                GrammarVocabulary::new(&self.tokenizer, self.model.config().vocab_size, &self.eos)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| HandlerError::Input(e.clone()))?;
        vocabulary.compile(grammar).map(Some)
    }

    /// Refuses a `logit_bias` for a token the model does not have.
    fn check_bias(&self, parameters: &GenerateParameters) -> Result<(), HandlerError> {
        let vocab = self.model.config().vocab_size;
        match parameters
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= vocab)
        {
            Some((id, _)) => Err(HandlerError::Input(format!(
                "logit_bias names token {id}, past the model's {vocab} tokens"
            ))),
            None => Ok(()),
        }
    }

    /// The prompt that the model's chat template makes of `messages`, the assistant's
    /// turn begun.
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        tools: Option<&ChatTools>,
    ) -> Result<String, HandlerError> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            HandlerError::Input(
                "this model has no chat template (tokenizer_config.json's chat_template): \
                 send a prompt instead"
                    .into(),
            )
        })?;
        if messages.is_empty() {
            return Err(HandlerError::Input(
                "the conversation has no messages".into(),
            ));
        }
        template.render_with_tools(messages, tools)
    }

    /// Tokenizes a prompt as the model's tokenizer does (special tokens it adds included).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, HandlerError> {
        self.encode_with(prompt, true)
    }

    /// Tokenizes a prompt, with or without the special tokens the tokenizer adds (a
    /// rendered chat template writes its own BOS, as transformers' apply_chat_template
    /// assumes: adding another would double it).
    fn encode_with(
        &self,
        prompt: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, HandlerError> {
        Ok(self
            .tokenizer
            .encode(prompt, add_special_tokens)
            .map_err(|source| HandlerError::Tokenizer {
                context: "cannot tokenize the prompt".into(),
                source,
            })?
            .get_ids()
            .to_vec())
    }

    /// Checks a prompt's tokens and parameters against the model's positions.
    fn check_length(
        &self,
        prompt: &[u32],
        parameters: &GenerateParameters,
    ) -> Result<(), HandlerError> {
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
        Ok(())
    }

    /// A sequence for a prepared prompt, ready for its prefill (nothing computed yet).
    pub fn begin(&self, prompt: &PromptInput) -> Result<Sequence, HandlerError> {
        self.check_length(&prompt.ids, &prompt.parameters)?;
        // `prepare` compiled its grammar; a copy of that matcher starts the sequence.
        let constraint = match &prompt.constraint {
            Some(constraint) => Some(constraint.clone()),
            None => self.constraint(&prompt.parameters)?,
        };
        let mut sequence = self.sequence(prompt.ids.clone(), &prompt.parameters, constraint);
        sequence.events = prompt.events.clone();
        Ok(sequence)
    }

    /// [`TextGeneration::begin`] for token ids and parameters (no events).
    pub fn begin_tokens(
        &self,
        prompt: Vec<u32>,
        parameters: &GenerateParameters,
    ) -> Result<Sequence, HandlerError> {
        self.check_length(&prompt, parameters)?;
        self.check_bias(parameters)?;
        let constraint = self.constraint(parameters)?;
        Ok(self.sequence(prompt, parameters, constraint))
    }

    /// A sequence for checked token ids, ready for its prefill.
    fn sequence(
        &self,
        prompt: Vec<u32>,
        parameters: &GenerateParameters,
        constraint: Option<TokenConstraint>,
    ) -> Sequence {
        Sequence {
            prompt: prompt.clone(),
            cached_tokens: 0,
            cache: KvCache::default(),
            next_input: prompt,
            sampler: LogitsProcessor::from_sampling(
                parameters.seed.unwrap_or(299_792_458),
                parameters.sampling(),
            ),
            ids: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            finish: None,
            parameters: parameters.clone(),
            events: None,
            streamed: 0,
            constraint,
            failure: None,
        }
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
            self.reuse_prefix(sequence)?;
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
    /// (end-of-sequence token, a stop sequence in the text, or max_new_tokens); streams
    /// the token when the sequence has events.
    fn accept(&self, sequence: &mut Sequence, logits: &Tensor) -> Result<(), HandlerError> {
        let id = match self.sample(sequence, logits)? {
            Ok(id) => id,
            Err(failure) => {
                // This request's grammar failed: it alone ends, with its error.
                sequence.failure = Some(failure);
                return Ok(());
            }
        };
        if let Some(top) = sequence.parameters.logprobs {
            sequence.logprobs.push(self.logprobs(logits, id, top)?);
        }
        sequence.ids.push(id);
        sequence.next_input = vec![id];
        // The text is decoded every step only when something reads it: stop sequences
        // are looked for in it, and streaming sends it.
        let needs_text = !sequence.parameters.stop.is_empty() || sequence.events.is_some();
        if self.eos.contains(&id) && !sequence.parameters.ignore_eos {
            sequence.finish = Some(FinishReason::EosToken);
        } else if needs_text {
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
            }
        }
        if sequence.finish.is_none() && sequence.ids.len() >= sequence.parameters.max_new_tokens {
            sequence.finish = Some(FinishReason::Length);
        }
        if matches!(
            sequence.finish,
            Some(FinishReason::EosToken | FinishReason::Length)
        ) {
            sequence.text = self.decode(&sequence.ids)?;
        }
        sequence.stream(id);
        Ok(())
    }

    /// The next token of `sequence` from its step's `logits`: penalized, biased and
    /// masked by its grammar as the request asks, then sampled. The outer error fails
    /// the step (every sequence in it); the inner one only this request (its grammar).
    fn sample(
        &self,
        sequence: &mut Sequence,
        logits: &Tensor,
    ) -> Result<Result<u32, HandlerError>, HandlerError> {
        let parameters = &sequence.parameters;
        let adjustments = Adjustments {
            presence_penalty: parameters.presence_penalty,
            frequency_penalty: parameters.frequency_penalty,
            logit_bias: &parameters.logit_bias,
        };
        if adjustments.is_identity() && sequence.constraint.is_none() {
            return Ok(Ok(sequence
                .sampler
                .sample(logits)
                .context(|| "sampling failed".into())?));
        }
        let mut row: Vec<f32> = logits
            .to_dtype(DType::F32)
            .and_then(|l| l.flatten_all())
            .and_then(|l| l.to_vec1())
            .context(|| "sampling".into())?;
        adjustments.apply(&mut row, &sequence.ids);
        if let Some(constraint) = &mut sequence.constraint
            && let Err(failure) = constraint.mask(&mut row)
        {
            return Ok(Err(failure));
        }
        let size = row.len();
        let row = Tensor::from_vec(row, size, &Device::Cpu).context(|| "sampling".into())?;
        let id = sequence
            .sampler
            .sample(&row)
            .context(|| "sampling failed".into())?;
        if let Some(constraint) = &mut sequence.constraint
            && let Err(failure) = constraint.consume(id)
        {
            return Ok(Err(failure));
        }
        Ok(Ok(id))
    }

    /// Token `id`'s log-probability under `logits` (log-softmax), and the `top` most
    /// likely tokens'.
    fn logprobs(
        &self,
        logits: &Tensor,
        id: u32,
        top: usize,
    ) -> Result<TokenLogprobs, HandlerError> {
        let logits: Vec<f32> = logits
            .to_dtype(DType::F32)
            .and_then(|l| l.flatten_all())
            .and_then(|l| l.to_vec1())
            .context(|| "log-probabilities".into())?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum: f32 = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        let token = |id: u32| -> Result<TokenLogprob, HandlerError> {
            Ok(TokenLogprob {
                id,
                text: self.token_text(id)?,
                logprob: logits
                    .get(id as usize)
                    .map_or(f32::NEG_INFINITY, |l| l - log_sum),
            })
        };
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let top = top.min(order.len());
        if top > 0 && top < order.len() {
            order.select_nth_unstable_by(top - 1, by_logit);
        }
        order.truncate(top);
        order.sort_by(by_logit);
        Ok(TokenLogprobs {
            token: token(id)?,
            top: order.into_iter().map(token).collect::<Result<_, _>>()?,
        })
    }

    /// One token's text on its own (special tokens spelled out).
    fn token_text(&self, id: u32) -> Result<String, HandlerError> {
        self.tokenizer
            .decode(&[id], false)
            .map_err(|source| HandlerError::Tokenizer {
                context: "cannot decode a token".into(),
                source,
            })
    }

    /// The answer of a finished sequence (its grammar's failure, if it failed).
    fn answer(&self, mut sequence: Sequence) -> Result<Output, HandlerError> {
        let answer = match sequence.failure.take() {
            Some(failure) => Err(failure),
            None => Ok(Output::Generation(sequence.generation())),
        };
        self.remember(sequence);
        answer
    }

    fn respond(&self, prompt: &PromptInput) -> Result<Output, HandlerError> {
        let mut sequence = self.begin(prompt)?;
        while !sequence.finished() {
            self.advance(&mut [&mut sequence])?;
        }
        self.answer(sequence)
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
    prompt: Vec<u32>,
    /// Leading prompt tokens started from the prefix cache.
    cached_tokens: usize,
    cache: KvCache,
    /// What the next step feeds the model: the prompt before the prefill, then the last
    /// token.
    next_input: Vec<u32>,
    sampler: LogitsProcessor,
    ids: Vec<u32>,
    /// Each generated token's log-probabilities, when the request asked.
    logprobs: Vec<TokenLogprobs>,
    text: String,
    finish: Option<FinishReason>,
    parameters: GenerateParameters,
    /// Where its tokens are streamed, if anywhere.
    events: Option<EventSender>,
    /// Bytes of `text` already streamed.
    streamed: usize,
    /// Its place in the grammar it must follow, if it has one.
    constraint: Option<TokenConstraint>,
    /// Why it ended without an answer (its grammar failed), if it did.
    failure: Option<HandlerError>,
}

impl Sequence {
    pub fn finished(&self) -> bool {
        self.finish.is_some() || self.failure.is_some()
    }

    /// Token ids generated so far.
    pub fn token_ids(&self) -> &[u32] {
        &self.ids
    }

    fn generation(&self) -> Generation {
        let (text, tool_calls) = if self.parameters.tools.is_empty() || !self.finished() {
            (self.text.clone(), Vec::new())
        } else {
            crate::tools::split_calls(&self.text, &self.parameters.tools)
        };
        let finish = self.finish.unwrap_or(FinishReason::Length);
        Generation {
            text,
            finish_reason: if tool_calls.is_empty() || finish == FinishReason::Length {
                finish
            } else {
                FinishReason::ToolCalls
            },
            tool_calls,
            prompt_tokens: self.prompt.len(),
            cached_tokens: self.cached_tokens,
            token_ids: self.ids.clone(),
            details: self.parameters.details,
            logprobs: self.logprobs.clone(),
        }
    }

    /// Sends token `id` with the text that became final with it, and the finished
    /// generation once it is.
    fn stream(&mut self, id: u32) {
        let Some(events) = &self.events else {
            return;
        };
        // With tools offered, text that may become a call waits, and what is sent at
        // the end is the answer without its calls.
        let tools = !self.parameters.tools.is_empty();
        let finished = self.finished().then(|| self.generation());
        let (text, upto) = match &finished {
            Some(generation) if tools => (generation.text.as_str(), generation.text.len()),
            Some(_) => (self.text.as_str(), self.text.len()),
            None if tools => (
                self.text.as_str(),
                settled_len(&self.text, &self.parameters.stop)
                    .min(crate::tools::streamable_len(&self.text)),
            ),
            None => (
                self.text.as_str(),
                settled_len(&self.text, &self.parameters.stop),
            ),
        };
        let delta = text
            .get(self.streamed..upto.max(self.streamed))
            .unwrap_or_default()
            .to_string();
        self.streamed = upto.max(self.streamed);
        // A receiver that has gone means the client left; the worker drops the request.
        let logprobs = self
            .logprobs
            .last()
            .filter(|_| self.parameters.logprobs.is_some())
            .cloned();
        let _ = events.send(GenerationEvent::Token {
            id,
            text: delta,
            logprobs,
        });
        if let Some(generation) = finished {
            let _ = events.send(GenerationEvent::Finished(generation));
        }
    }
}

/// How much of an unfinished generation's `text` is final: all but an incomplete
/// character at the end (the tokenizer decodes half a UTF-8 sequence as U+FFFD) and a
/// tail that could still grow into a stop sequence.
fn settled_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    let hold = stop
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .saturating_sub(1);
    end = end.saturating_sub(hold);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// Continuous batching over [`TextGeneration`]: sequences join with their prefill and
/// leave when they finish; every step decodes all running ones together.
pub struct GenerationBatch<'a> {
    owner: &'a TextGeneration,
    running: Vec<(u64, Sequence)>,
}

impl StepBatch for GenerationBatch<'_> {
    fn join(&mut self, ticket: u64, input: &Input) -> Option<Result<Output, HandlerError>> {
        let Input::Prompt(prompt) = input else {
            return Some(Err(HandlerError::Input(
                "text_generation takes a prompt".into(),
            )));
        };
        let mut sequence = match self.owner.begin(prompt) {
            Ok(sequence) => sequence,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = self.owner.advance(&mut [&mut sequence]) {
            return Some(Err(e));
        }
        if sequence.finished() {
            return Some(self.owner.answer(sequence));
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
            .map(|(ticket, sequence)| (ticket, self.owner.answer(sequence)))
            .collect())
    }

    fn running(&self) -> usize {
        self.running.len()
    }
}

impl Handler for TextGeneration {
    fn weights_changed(&self) -> Option<HandlerError> {
        self.watch.changed()
    }

    fn prepare(&self, request: Request) -> Result<Input, HandlerError> {
        let (request, templated) = match request {
            Request::Generate(request) => (request, false),
            Request::Chat(chat) => {
                let mut parameters = chat.parameters;
                if let Some(tools) = &chat.tools {
                    if let Some(grammar) = tools.grammar() {
                        if parameters.grammar.is_some() {
                            return Err(HandlerError::Input(
                                "a required tool call and a response format cannot both \
                                 constrain the answer"
                                    .into(),
                            ));
                        }
                        parameters.grammar = Some(grammar);
                    }
                    parameters.tools = tools.functions.clone();
                }
                (
                    GenerateRequest {
                        prompt: self.chat_prompt(&chat.messages, chat.tools.as_ref())?,
                        parameters,
                    },
                    true,
                )
            }
            _ => return Err(HandlerError::Input("text_generation takes a prompt".into())),
        };
        if request.prompt.is_empty() {
            return Err(HandlerError::Input("the request has no prompt".into()));
        }
        request.parameters.check()?;
        let ids = self.encode_with(&request.prompt, !templated)?;
        self.check_length(&ids, &request.parameters)?;
        self.check_bias(&request.parameters)?;
        // A grammar that cannot be compiled is refused before the request queues.
        let constraint = self.constraint(&request.parameters)?;
        Ok(Input::Prompt(Box::new(PromptInput {
            ids,
            parameters: request.parameters,
            events: None,
            constraint,
        })))
    }

    fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
        Ok(batch
            .iter()
            .map(|input| match input {
                Input::Prompt(prompt) => self.respond(prompt),
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

    fn units(&self) -> Option<&dyn crate::weights::layer_stack::Units> {
        Some(self.model.units())
    }

    fn prefix_cache(&self) -> Option<PrefixCacheTotals> {
        let prefixes = self.prefixes.as_ref()?;
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        Some(PrefixCacheTotals {
            lookup_tokens: prefixes.lookup_tokens.load(relaxed),
            hit_tokens: prefixes.hit_tokens.load(relaxed),
            bytes: prefixes
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .held(),
        })
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
            weights: Some(self.holding.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Grammar;

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
        let handler = load_folder(dir.path());
        (dir, handler)
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_each_step_and_its_most_likely_tokens() {
        let (_dir, handler) = tiny_generator();
        let prompt = handler.encode("hello world").expect("tokens");
        let generate = |logprobs: Option<usize>, do_sample: bool| {
            let parameters = GenerateParameters {
                max_new_tokens: 6,
                logprobs,
                do_sample,
                temperature: do_sample.then_some(1.5),
                seed: Some(7),
                ..GenerateParameters::default()
            };
            let mut sequence = handler
                .begin_tokens(prompt.clone(), &parameters)
                .expect("begin");
            while !sequence.finished() {
                handler.advance(&mut [&mut sequence]).expect("step");
            }
            sequence.generation()
        };
        let plain = generate(None, false);
        assert!(plain.logprobs.is_empty(), "none unless asked");
        let greedy = generate(Some(3), false);
        assert_eq!(
            greedy.token_ids, plain.token_ids,
            "asking changes nothing else"
        );
        assert_eq!(greedy.logprobs.len(), greedy.token_ids.len());
        let wide = generate(Some(20), false);
        for (step, (lp, wide)) in greedy.logprobs.iter().zip(&wide.logprobs).enumerate() {
            assert_eq!(lp.token.id, greedy.token_ids[step]);
            assert_eq!(lp.top.len(), 3);
            // Greedy picks the most likely token; the alternatives come most likely first,
            // and are the first of a wider list.
            assert_eq!(lp.top[0].id, lp.token.id, "step {step}");
            assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
            assert_eq!(lp.top[..], wide.top[..3]);
            let mass: f32 = wide.top.iter().map(|t| t.logprob.exp()).sum();
            assert!(lp.token.logprob <= 0.0 && mass <= 1.0 + 1e-5, "{mass}");
            assert_eq!(
                lp.token.text,
                handler.token_text(lp.token.id).expect("text")
            );
        }
        // Sampling reports the sampled token's own log-probability, under the raw
        // distribution (not the one temperature reshaped).
        let sampled = generate(Some(20), true);
        for (step, lp) in sampled.logprobs.iter().enumerate() {
            assert_eq!(lp.token.id, sampled.token_ids[step]);
            if let Some(listed) = lp.top.iter().find(|t| t.id == lp.token.id) {
                assert_eq!(listed.logprob, lp.token.logprob);
            }
        }
        let too_many = GenerateParameters {
            logprobs: Some(21),
            ..GenerateParameters::default()
        };
        assert!(too_many.check().is_err());
    }

    /// A plan that keeps the embeddings, final norm and head in RAM and streams every
    /// block from disk, each pass.
    fn blocks_on_disk(config: &DecoderSpec) -> spillway_placement::Plan {
        use spillway_placement::{Device as Placed, PlacedUnit, Plan, UnitKind};
        Plan {
            strategy: "test".into(),
            units: MappedDecoder::unit_names(config)
                .into_iter()
                .map(|name| PlacedUnit {
                    device: match name.starts_with("model.layers.") {
                        true => Placed::DISK,
                        false => Placed::CPU,
                    },
                    name,
                    bytes: 1,
                    kind: UnitKind::Post,
                    tied: vec![],
                })
                .collect(),
            devices: vec![],
            stream_device: Placed::CPU,
            streamed_bytes_per_forward: 1,
            notes: vec![],
        }
    }

    /// Answers `prompt` greedily for 6 tokens.
    fn greedy(handler: &TextGeneration, prompt: &[u32]) -> Generation {
        let input = Input::Prompt(Box::new(PromptInput {
            ids: prompt.to_vec(),
            parameters: GenerateParameters {
                max_new_tokens: 6,
                ..GenerateParameters::default()
            },
            events: None,
            constraint: None,
        }));
        match alone(handler, &input) {
            Output::Generation(generation) => generation,
            other => panic!("not a generation: {other:?}"),
        }
    }

    /// A prompt that starts like one answered before (an agent's system prompt, a chat
    /// resending its history) is started from the cached keys and values of its whole
    /// leading blocks and answers exactly as without the cache, in RAM and with every
    /// block streamed from disk; the counts say what was reused.
    #[test]
    fn a_prompt_starting_like_an_earlier_one_reuses_its_prefix_and_answers_the_same() {
        let (dir, plain) = tiny_generator();
        let vocab = crate::testing::vocabulary().len() as u32;
        let system: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % vocab).collect();
        let with = |tail: &[u32]| -> Vec<u32> { system.iter().chain(tail).copied().collect() };
        for streamed in [false, true] {
            let options = LoadOptions {
                prefix_cache_bytes: 1 << 30,
                plan: streamed.then(|| blocks_on_disk(plain.model.config())),
                ..LoadOptions::default()
            };
            let cached = TextGeneration::load(
                &crate::weights::files::FolderFiles::new(dir.path()),
                &options,
            )
            .expect("load");
            assert_eq!(cached.model.streamed_units() > 0, streamed);
            let first = with(&[5, 6]);
            let answer = greedy(&cached, &first);
            assert_eq!(answer.cached_tokens, 0, "nothing seen yet");
            assert_eq!(answer.token_ids, greedy(&plain, &first).token_ids);
            // Another question after the same system prompt: its first block of 16 is
            // reused (two would leave fewer than GEMM_ROWS of its 43 tokens to compute).
            let second = with(&[9, 9, 9]);
            let reused = greedy(&cached, &second);
            assert_eq!(reused.cached_tokens, 16, "streamed: {streamed}");
            assert_eq!(reused.token_ids, greedy(&plain, &second).token_ids);
            // The next turn of the first: its prompt, its answer, more. What the first
            // fed the model (42 + 5 tokens) is held in whole blocks: 32 of them.
            let mut turn: Vec<u32> = first.iter().chain(&answer.token_ids).copied().collect();
            turn.extend([11, 12, 13, 14, 15, 16, 17, 18, 19, 20]);
            let next = greedy(&cached, &turn);
            assert_eq!(next.cached_tokens, 32);
            assert_eq!(next.token_ids, greedy(&plain, &turn).token_ids);
            // ... and after it, the same conversation goes on from 48 of its tokens.
            let mut later = turn.clone();
            later.extend(&next.token_ids);
            later.extend([21, 22]);
            let last = greedy(&cached, &later);
            assert_eq!(last.cached_tokens, 48);
            assert_eq!(last.token_ids, greedy(&plain, &later).token_ids);
            let totals = cached.prefix_cache().expect("a prefix cache");
            let looked: usize = [&first, &second, &turn, &later]
                .iter()
                .map(|p| p.len())
                .sum();
            assert_eq!(totals.lookup_tokens, looked as u64);
            assert_eq!(totals.hit_tokens, 16 + 32 + 48);
            assert!(totals.bytes > 0);
        }
        assert!(plain.prefix_cache().is_none(), "a budget of 0 keeps none");
    }

    fn load_folder(dir: &std::path::Path) -> TextGeneration {
        TextGeneration::load(
            &crate::weights::files::FolderFiles::new(dir),
            &LoadOptions::default(),
        )
        .expect("load")
    }

    fn byte_level_generator() -> (tempfile::TempDir, TextGeneration) {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::testing::TinyLlama::default()
            .write_byte_level_generator(dir.path())
            .expect("write");
        let handler = load_folder(dir.path());
        (dir, handler)
    }

    fn generate(
        handler: &TextGeneration,
        prompt: &str,
        parameters: GenerateParameters,
    ) -> Generation {
        let input = handler
            .prepare(Request::Generate(crate::GenerateRequest {
                prompt: prompt.into(),
                parameters,
            }))
            .expect("prepare");
        match alone(handler, &input) {
            Output::Generation(generation) => generation,
            other => panic!("not a generation: {other:?}"),
        }
    }

    #[test]
    fn a_grammar_the_greedy_text_already_follows_changes_nothing() {
        let (_dir, handler) = byte_level_generator();
        let parameters = GenerateParameters {
            max_new_tokens: 12,
            ignore_eos: true,
            ..GenerateParameters::default()
        };
        let free = generate(&handler, "say", parameters.clone());
        assert_eq!(free.token_ids.len(), 12);
        let text = handler
            .tokenizer
            .decode(&free.token_ids, false)
            .expect("text");
        let literal: String = text
            .chars()
            .map(|c| format!("\\x{{{:x}}}", c as u32))
            .collect();
        for grammar in [
            Grammar::Regex("[\\s\\S]*".into()),
            Grammar::Regex(format!("{literal}[\\s\\S]*")),
        ] {
            let constrained = generate(
                &handler,
                "say",
                GenerateParameters {
                    grammar: Some(grammar.clone()),
                    ..parameters.clone()
                },
            );
            assert_eq!(constrained.token_ids, free.token_ids, "{grammar:?}");
        }
    }

    #[test]
    fn a_json_schema_is_followed_greedy_and_sampled_in_a_batch_and_ends_with_eos() {
        let (_dir, handler) = byte_level_generator();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "colour": {"enum": ["red", "green", "blue"]},
                "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 3},
            },
            "required": ["colour", "sizes"],
            "additionalProperties": false,
        });
        let parameters = |do_sample: bool, seed: u64| GenerateParameters {
            max_new_tokens: 60,
            do_sample,
            seed: Some(seed),
            grammar: Some(Grammar::JsonSchema(schema.clone())),
            ..GenerateParameters::default()
        };
        let inputs: Vec<Input> = [(false, 1), (true, 1), (true, 2), (true, 3)]
            .into_iter()
            .map(|(do_sample, seed)| {
                handler
                    .prepare(Request::Generate(crate::GenerateRequest {
                        prompt: "give".into(),
                        parameters: parameters(do_sample, seed),
                    }))
                    .expect("prepare")
            })
            .collect();
        let alone: Vec<Output> = inputs.iter().map(|i| alone(&handler, i)).collect();
        for answer in &alone {
            let Output::Generation(generation) = answer else {
                panic!("{answer:?}");
            };
            assert_eq!(
                generation.finish_reason,
                FinishReason::EosToken,
                "{generation:?}"
            );
            let value: serde_json::Value =
                serde_json::from_str(&generation.text).expect("the answer parses as JSON");
            assert!(
                ["red", "green", "blue"].contains(&value["colour"].as_str().expect("colour")),
                "{value}"
            );
            let sizes = value["sizes"].as_array().expect("sizes");
            assert!((1..=3).contains(&sizes.len()), "{value}");
            assert!(
                sizes.iter().all(|s| s.as_u64().is_some_and(|n| n <= 99)),
                "{value}"
            );
            assert_eq!(value.as_object().map(|o| o.len()), Some(2), "{value}");
        }
        // Together in a running batch, each answers as it did alone.
        let mut batch = handler.step_batch().expect("steps");
        let mut answers: Vec<Option<Output>> = vec![None; inputs.len()];
        for (ticket, input) in inputs.iter().enumerate() {
            if let Some(answer) = batch.join(ticket as u64, input) {
                answers[ticket] = Some(answer.expect("answer"));
            }
        }
        while batch.running() > 0 {
            for (ticket, answer) in batch.step().expect("step") {
                answers[ticket as usize] = Some(answer.expect("answer"));
            }
        }
        let answers: Vec<Output> = answers.into_iter().map(|a| a.expect("answered")).collect();
        assert_eq!(answers, alone);
    }

    #[test]
    fn a_required_tool_call_always_parses_and_validates_named_or_any() {
        let (dir, _) = byte_level_generator();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({
                // A template that takes tools (and keeps the prompt short).
                "chat_template": "{% if tools %}T{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}: ",
            })
            .to_string(),
        )
        .expect("write");
        let handler = load_folder(dir.path());
        let function = |name: &str, property: &str| crate::tools::ToolFunction {
            name: name.into(),
            description: None,
            parameters: serde_json::json!({
                "type": "object",
                "properties": {property: {"enum": ["a", "b"]}},
                "required": [property],
                "additionalProperties": false,
            }),
        };
        let functions = vec![function("first", "x"), function("second", "y")];
        for (choice, parallel, seed) in [
            (crate::tools::ToolChoice::Required, false, 1),
            (crate::tools::ToolChoice::Required, true, 2),
            (
                crate::tools::ToolChoice::Function("second".into()),
                false,
                3,
            ),
        ] {
            let input = handler
                .prepare(Request::Chat(crate::chat::ChatRequest {
                    messages: vec![ChatMessage::new("user", "call")],
                    parameters: GenerateParameters {
                        max_new_tokens: 120,
                        do_sample: true,
                        seed: Some(seed),
                        ..GenerateParameters::default()
                    },
                    tools: Some(ChatTools {
                        functions: functions.clone(),
                        choice: choice.clone(),
                        parallel,
                    }),
                }))
                .expect("prepare");
            let Output::Generation(answer) = alone(&handler, &input) else {
                panic!("a generation");
            };
            // A random model may go on making parallel calls to max_new_tokens; the
            // whole calls it made are read all the same.
            assert!(
                answer.finish_reason == FinishReason::ToolCalls
                    || (parallel && answer.finish_reason == FinishReason::Length),
                "{answer:?}"
            );
            assert!(!answer.tool_calls.is_empty());
            assert!(parallel || answer.tool_calls.len() == 1, "{answer:?}");
            for call in &answer.tool_calls {
                let arguments: serde_json::Value =
                    serde_json::from_str(&call.arguments).expect("arguments parse");
                let property = match call.name.as_str() {
                    "first" => "x",
                    "second" => "y",
                    other => panic!("called {other}"),
                };
                assert!(["a", "b"].contains(&arguments[property].as_str().expect("value")));
                if let crate::tools::ToolChoice::Function(name) = &choice {
                    assert_eq!(&call.name, name);
                }
            }
        }
    }

    #[test]
    fn logit_bias_and_penalties_move_greedy_decoding_as_asked() {
        let (_dir, handler) = byte_level_generator();
        let base = GenerateParameters {
            max_new_tokens: 8,
            ignore_eos: true,
            ..GenerateParameters::default()
        };
        let free = generate(&handler, "say", base.clone());
        let forced = generate(
            &handler,
            "say",
            GenerateParameters {
                logit_bias: vec![(u32::from(b'z'), 100.0)],
                ..base.clone()
            },
        );
        assert_eq!(forced.text, "zzzzzzzz");
        let banned = generate(
            &handler,
            "say",
            GenerateParameters {
                logit_bias: vec![(free.token_ids[0], -100.0)],
                ..base.clone()
            },
        );
        assert_ne!(banned.token_ids[0], free.token_ids[0]);
        // A strong frequency penalty never repeats a token within 8 steps of 260.
        let varied = generate(
            &handler,
            "say",
            GenerateParameters {
                frequency_penalty: 2.0,
                presence_penalty: 2.0,
                logit_bias: vec![(u32::from(b'z'), 3.0)],
                ..base.clone()
            },
        );
        let mut distinct = varied.token_ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 1, "{varied:?}");
        let refused = handler
            .prepare(Request::Generate(crate::GenerateRequest {
                prompt: "say".into(),
                parameters: GenerateParameters {
                    logit_bias: vec![(5000, 1.0)],
                    ..base
                },
            }))
            .expect_err("a token past the vocabulary");
        assert!(
            matches!(refused, HandlerError::Input(ref m) if m.contains("5000")),
            "{refused:?}"
        );
    }

    fn request(handler: &TextGeneration, prompt: &str, max_new_tokens: usize) -> Input {
        handler
            .prepare(Request::Generate(crate::GenerateRequest {
                prompt: prompt.into(),
                parameters: GenerateParameters {
                    max_new_tokens,
                    details: true,
                    ..GenerateParameters::default()
                },
            }))
            .expect("prepare")
    }

    fn alone(handler: &TextGeneration, input: &Input) -> Output {
        let mut answers = handler.run(std::slice::from_ref(input)).expect("run");
        answers.remove(0).expect("answer")
    }

    #[test]
    fn a_running_batch_answers_each_request_as_if_it_ran_alone() {
        let (_dir, handler) = tiny_generator();
        let inputs = [
            request(&handler, "hello world", 5),
            request(&handler, "the quick brown fox jumps", 2),
            request(&handler, "a", 1),
            request(&handler, "rust", 7),
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
            let (Output::Generation(got), Output::Generation(want)) = (got, want) else {
                panic!("generations");
            };
            assert_eq!(got, want, "request {i}");
        }
        // A bad request fails alone, and one that is dropped is not answered.
        assert!(matches!(
            batch.join(
                9,
                &Input::Raw(crate::RawBody {
                    content_type: None,
                    bytes: b"x".to_vec()
                })
            ),
            Some(Err(_))
        ));
        assert!(batch.join(10, &request(&handler, "hello", 4)).is_none());
        batch.leave(10);
        assert_eq!(batch.running(), 0);
    }

    #[test]
    fn a_streamed_generation_sends_each_token_and_text_that_adds_up_to_the_answer() {
        let (_dir, handler) = tiny_generator();
        let stops = [vec![], vec!["o".to_string()], vec!["zz".to_string()]];
        for stop in stops {
            let mut input = handler
                .prepare(Request::Generate(crate::GenerateRequest {
                    prompt: "hello world".into(),
                    parameters: GenerateParameters {
                        max_new_tokens: 12,
                        stop: stop.clone(),
                        ..GenerateParameters::default()
                    },
                }))
                .expect("prepare");
            let (events, received) = flume::unbounded();
            assert!(input.stream_to(events));
            let Output::Generation(answer) = alone(&handler, &input) else {
                panic!("a generation");
            };
            let events: Vec<GenerationEvent> = received.drain().collect();
            let (tokens, finished) = events.split_at(events.len() - 1);
            assert_eq!(
                finished,
                [GenerationEvent::Finished(answer.clone())],
                "stop {stop:?}: finished last, with the answer"
            );
            let mut ids = Vec::new();
            let mut text = String::new();
            for event in tokens {
                let GenerationEvent::Token {
                    id, text: delta, ..
                } = event
                else {
                    panic!("tokens before the end");
                };
                ids.push(*id);
                text.push_str(delta);
                for s in &stop {
                    assert!(
                        !text.contains(s.as_str()),
                        "streamed past stop {s:?}: {text:?}"
                    );
                }
            }
            assert_eq!(ids, answer.token_ids, "stop {stop:?}: one event per token");
            assert_eq!(
                text, answer.text,
                "stop {stop:?}: deltas add up to the text"
            );
        }
    }

    /// A chat is tokenized as its rendered template says, nothing added: the template
    /// writes BOS itself (here `[CLS]`, which the tokenizer would also add around a plain
    /// prompt), as transformers' `apply_chat_template` tokenizes it.
    #[test]
    fn a_chat_gets_the_templates_bos_once_and_a_prompt_the_tokenizers() {
        let (dir, _) = tiny_generator();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({
                "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }} {% endfor %}",
                "bos_token": "[CLS]"
            })
            .to_string(),
        )
        .expect("write");
        let handler = load_folder(dir.path());
        let ids = |request: Request| match handler.prepare(request) {
            Ok(Input::Prompt(prompt)) => prompt.ids,
            _ => panic!("prepared"),
        };
        let chat = ids(Request::Chat(crate::chat::ChatRequest {
            tools: None,
            messages: vec![crate::chat::ChatMessage::new("user", "hello world")],
            parameters: GenerateParameters::default(),
        }));
        let (cls, sep) = (2, 3);
        assert_eq!(chat.first(), Some(&cls), "{chat:?}");
        assert_ne!(chat.get(1), Some(&cls), "BOS twice: {chat:?}");
        assert_ne!(chat.last(), Some(&sep), "{chat:?}");
        let prompt = ids(Request::Generate(GenerateRequest {
            prompt: "hello world".into(),
            parameters: GenerateParameters::default(),
        }));
        assert_eq!(
            (prompt.first(), prompt.last()),
            (Some(&cls), Some(&sep)),
            "{prompt:?}"
        );
        assert_eq!(&chat[1..], &prompt[1..prompt.len() - 1], "the same words");
    }

    #[test]
    fn prepare_refuses_bad_requests_as_client_errors() {
        let (_dir, handler) = tiny_generator();
        let generate = |prompt: &str, parameters: GenerateParameters| {
            handler.prepare(Request::Generate(crate::GenerateRequest {
                prompt: prompt.into(),
                parameters,
            }))
        };
        let bad = [
            ("", GenerateParameters::default()),
            (
                "x",
                GenerateParameters {
                    max_new_tokens: 0,
                    ..GenerateParameters::default()
                },
            ),
            (
                "x",
                GenerateParameters {
                    temperature: Some(-1.0),
                    ..GenerateParameters::default()
                },
            ),
            (
                "x",
                GenerateParameters {
                    top_p: Some(1.5),
                    ..GenerateParameters::default()
                },
            ),
            (
                "x",
                GenerateParameters {
                    stop: vec![String::new()],
                    ..GenerateParameters::default()
                },
            ),
            (
                "x",
                GenerateParameters {
                    max_new_tokens: 100_000,
                    ..GenerateParameters::default()
                },
            ),
        ];
        for (prompt, parameters) in bad {
            let err = generate(prompt, parameters.clone()).expect_err("refused");
            assert!(err.is_client_error(), "{prompt:?} {parameters:?}: {err}");
        }
        assert!(handler.prepare(Request::Texts(vec!["x".into()])).is_err());
        let sampled = GenerateParameters {
            do_sample: true,
            top_k: Some(5),
            temperature: Some(0.7),
            ..GenerateParameters::default()
        };
        assert_eq!(
            sampled.sampling(),
            candle_transformers::generation::Sampling::TopK {
                k: 5,
                temperature: 0.7
            }
        );
    }
}
