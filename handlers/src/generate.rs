//! What a generation request asks for and what it yields, in a handler's terms: the
//! parameters (TGI's names), why generation stopped, the finished [`Generation`], and
//! the [`GenerationEvent`]s streamed on the way. No protocol's JSON lives here.

use candle_transformers::generation::Sampling;

use crate::HandlerError;
use crate::tools::{ToolCall, ToolFunction};

/// Generation parameters, with TGI's names and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParameters {
    pub max_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Whether the answer carries its details (finish reason, token ids).
    pub details: bool,
    /// Run to `max_new_tokens` even past end-of-sequence tokens (as vLLM's `ignore_eos`;
    /// for benchmarks that need a fixed number of tokens).
    pub ignore_eos: bool,
    /// Report each generated token's log-probability and this many most likely
    /// alternatives (at most [`MAX_TOP_LOGPROBS`]); `None` reports none.
    pub logprobs: Option<usize>,
    /// The grammar the generated text must follow, if any (constrained decoding).
    pub grammar: Option<Grammar>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`, each in
    /// [-100, 100]).
    pub logit_bias: Vec<(u32, f32)>,
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`, in [-2, 2]).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`, in [-2, 2]).
    pub frequency_penalty: f32,
    /// Functions whose calls are read out of the answer into
    /// [`Generation::tool_calls`] (a chat request that offers tools); none: the answer
    /// is all text.
    pub tools: Vec<ToolFunction>,
}

/// What the generated text must be, enforced token by token (constrained decoding): a
/// token that could not continue a text of this grammar is never sampled.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// JSON valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// Text the whole of which this regular expression matches.
    Regex(String),
    /// A grammar in llguidance's Lark dialect (which can embed JSON schemas with
    /// `%json`).
    Lark(String),
    /// Exactly one of these strings (vLLM's `guided_choice`).
    Choice(Vec<String>),
}

/// The most alternatives a request may ask log-probabilities for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `max_new_tokens` when a request names none.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 32;

impl Default for GenerateParameters {
    fn default() -> Self {
        Self {
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            do_sample: false,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            details: false,
            ignore_eos: false,
            logprobs: None,
            grammar: None,
            logit_bias: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            tools: Vec::new(),
        }
    }
}

impl GenerateParameters {
    /// Refuses values no sampler can use (a client error).
    pub fn check(&self) -> Result<(), HandlerError> {
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
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return bad(format!(
                "at most {MAX_TOP_LOGPROBS} alternatives' log-probabilities per token"
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop sequences must not be empty".into());
        }
        for (name, penalty) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&penalty) {
                return bad(format!("{name} must be between -2 and 2, got {penalty}"));
            }
        }
        if let Some((id, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, bias)| !(-100.0..=100.0).contains(bias))
        {
            return bad(format!(
                "logit_bias for token {id} must be between -100 and 100, got {bias}"
            ));
        }
        if let Some(Grammar::Choice(choices)) = &self.grammar
            && choices.is_empty()
        {
            return bad("guided_choice needs at least one choice".into());
        }
        Ok(())
    }

    pub(crate) fn sampling(&self) -> Sampling {
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

/// A prompt and how to continue it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub parameters: GenerateParameters,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
    /// The answer called tools ([`Generation::tool_calls`]).
    ToolCalls,
}

impl FinishReason {
    /// TGI's name for it.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated text (cut before a stop sequence that ended it).
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Leading prompt tokens whose keys and values came from the prefix cache (not
    /// computed again).
    pub cached_tokens: usize,
    /// Every generated token, the end-of-sequence token included when one ended it.
    pub token_ids: Vec<u32>,
    /// The request's `details` parameter, for protocols that answer with details only
    /// when asked.
    pub details: bool,
    /// Each generated token's log-probability, when the request asked (else empty).
    pub logprobs: Vec<TokenLogprobs>,
    /// The calls the answer made, when the request offered tools (`text` is then the
    /// answer without them).
    pub tool_calls: Vec<ToolCall>,
}

/// A generated token's log-probability under the model (its raw distribution, before
/// temperature or top-p), and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: TokenLogprob,
    /// Most likely first.
    pub top: Vec<TokenLogprob>,
}

/// One token: its id, its text on its own, and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

/// What a streaming generation request receives while it runs: one `Token` per
/// generated token, then `Finished`. Text deltas add up to the final text: text that
/// could still turn out to begin a stop sequence, or an incomplete UTF-8 character, is
/// held back until it cannot. A request that fails mid-way gets no `Finished` (its
/// error arrives as its answer).
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    Token {
        id: u32,
        text: String,
        /// Its log-probabilities, when the request asked.
        logprobs: Option<TokenLogprobs>,
    },
    Finished(Generation),
}

/// Where a request's [`GenerationEvent`]s go. A send to a receiver that has gone is
/// ignored: the worker notices the client left and drops the request.
pub type EventSender = flume::Sender<GenerationEvent>;
