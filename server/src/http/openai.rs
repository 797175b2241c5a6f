//! The OpenAI-compatible API, on the inference address: `GET /v1/models`,
//! `POST /v1/embeddings` (text_embedding models), `POST /v1/completions` and
//! `POST /v1/chat/completions` (text_generation models; `stream: true` answers with
//! server-sent events ending in `data: [DONE]`). Model names are the registered names;
//! requests join the same queue and batch as `/predictions`. Errors have OpenAI's shape.
//!
//! Every request field is honoured or refused with a 400 naming it, as OpenAI refuses
//! an unknown one. Grammars: `response_format` (`json_object`, `json_schema`) and
//! vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (Lark).
//! Refused clearly rather than answered differently: `n` > 1, `echo`, and
//! `dimensions` other than the model's own. Log-probabilities are those
//! of the model's raw distribution (before temperature and top-p), as vLLM reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use spillway_handlers::{
    ChatMessage, ChatRequest, ChatTools, FinishReason, GenerateParameters, GenerateRequest,
    Generation, GenerationEvent, HandlerKind, MAX_TOP_LOGPROBS, Output, Request, TokenLogprobs,
    ToolCall, ToolChoice, ToolFunction,
};

use crate::app::AppState;
use crate::error::{Error, Result};
use crate::http::dispatch::{Dispatch, event_stream};

pub fn router(state: AppState) -> Router {
    started_at();
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(state)
}

/// `max_tokens` when a completion names none (OpenAI's default for /v1/completions).
const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// `max_tokens` when a chat completion names none (OpenAI's is the context's rest; a
/// server default keeps one request from holding a batch slot that long).
const DEFAULT_CHAT_TOKENS: usize = 512;

fn bad(message: impl Into<String>) -> Error {
    Error::BadRequest(message.into())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// When the API started (the `created` of every model: the server's registrations
/// are younger than the process).
fn started_at() -> u64 {
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(unix_now)
}

/// A fresh id for a completion (`prefix-<n>`).
fn completion_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A JSON body, or OpenAI's error for a malformed one.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))
}

async fn models(State(state): State<AppState>) -> Response {
    let data: Vec<Value> = state
        .registry()
        .defaults()
        .iter()
        .map(|m| {
            json!({
                "id": m.spec.name,
                "object": "model",
                "created": started_at(),
                "owned_by": "spillway",
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

// ---- embeddings ----

#[derive(Deserialize)]
struct EmbeddingsBody {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

/// An embeddings body, whether it wants base64, and its request for the handler.
fn decode_embeddings(body: &[u8]) -> Result<(EmbeddingsBody, bool, Request)> {
    let mut body: EmbeddingsBody = parse(body)?;
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(bad(format!(
                "encoding_format must be \"float\" or \"base64\", got {other:?}"
            )));
        }
    };
    let request = embedding_request(body.input.take())?;
    Ok((body, base64, request))
}

/// What an OpenAI endpoint (`/v1/completions`, `/v1/chat/completions`,
/// `/v1/embeddings`) makes of a body, before any model is involved: the handler request,
/// or why the body is refused. What the fuzz targets and the corpus replay call.
pub fn decode(path: &str, body: &[u8]) -> Result<Request> {
    match path {
        "/v1/completions" => decode_completion(body).map(|(_, r)| r),
        "/v1/chat/completions" => decode_chat(body).map(|(_, r)| r),
        "/v1/embeddings" => decode_embeddings(body).map(|(_, _, r)| r),
        other => Err(Error::BadRequest(format!("no OpenAI endpoint {other}"))),
    }
}

async fn embeddings(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    respond(async {
        let (body, base64, request) = decode_embeddings(&body)?;
        let dispatch = Dispatch::to(&state, &body.model, None)?;
        expect_handler(&dispatch, HandlerKind::TextEmbedding, "/v1/embeddings")?;
        let answered = recorded(&dispatch, dispatch.run(&state, request).await)?;
        let Output::Embeddings(vectors) = answered.output else {
            return Err(Error::Internal("an embedding model answered something else".into()));
        };
        if let Some(dimensions) = body.dimensions {
            let own = vectors.first().map_or(0, Vec::len);
            if dimensions != own {
                return Err(bad(format!(
                    "model {} makes {own}-dimensional embeddings and cannot shorten them; \
                     leave dimensions out or set it to {own}",
                    body.model
                )));
            }
        }
        let data: Vec<Value> = vectors
            .iter()
            .enumerate()
            .map(|(index, vector)| {
                let embedding = if base64 {
                    json!(base64_f32(vector))
                } else {
                    json!(vector)
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Ok(axum::Json(json!({
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": answered.input_tokens, "total_tokens": answered.input_tokens},
        }))
        .into_response())
    })
    .await
}

/// An embeddings `input` as the handler takes it: a string or an array of strings
/// (texts), or an array of token ids or of such arrays (texts the client tokenized with
/// the model's own tokenizer).
fn embedding_request(input: Value) -> Result<Request> {
    let shape = || {
        bad(
            "input must be a string, an array of strings, an array of token ids, or an \
             array of arrays of token ids",
        )
    };
    let token = |v: &Value| -> Result<u32> {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| bad("token ids must be whole numbers"))
    };
    let tokens = |items: &[Value]| -> Result<Vec<u32>> { items.iter().map(token).collect() };
    let request = match input {
        Value::String(text) => Request::Texts(vec![text]),
        Value::Array(items) => match items.first() {
            Some(Value::String(_)) => Request::Texts(
                items
                    .into_iter()
                    .map(|item| match item {
                        Value::String(text) => Ok(text),
                        _ => Err(shape()),
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(Value::Number(_)) => Request::Tokens(vec![tokens(&items)?]),
            Some(Value::Array(_)) => Request::Tokens(
                items
                    .iter()
                    .map(|item| {
                        item.as_array()
                            .ok_or_else(shape)
                            .and_then(|ids| tokens(ids))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => return Err(shape()),
        },
        _ => return Err(shape()),
    };
    let empty = match &request {
        Request::Texts(texts) => texts.iter().any(String::is_empty),
        Request::Tokens(lists) => lists.iter().any(Vec::is_empty),
        _ => false,
    };
    if empty {
        return Err(bad("input must not hold an empty string or token list"));
    }
    Ok(request)
}

/// Little-endian float32 bytes in standard base64, as OpenAI's `encoding_format: base64`.
fn base64_f32(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---- completions ----

/// `stop`: a string or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What completions and chat completions share.
#[derive(Deserialize)]
struct Sampling {
    model: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    response_format: Option<Value>,
    /// vLLM's extension (also TGI's): sample from the `top_k` most likely tokens.
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    best_of: Option<usize>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    store: Option<bool>,
    /// Every other field, for the grammar fields vLLM spells `guided_*`.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// The request fields both endpoints read: honoured, or refused by value when this
/// server cannot honour the value (`n` > 1, `store: true`). `user` and `metadata`
/// describe the request and change nothing in the answer, as at OpenAI (this server
/// keeps no completions). Any other field is refused as OpenAI refuses it.
const SHARED_FIELDS: [&str; 24] = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "response_format",
    "user",
    "store",
    "metadata",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "echo",
    "best_of",
];
/// The fields only chat completions read.
const CHAT_FIELDS: [&str; 6] = [
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];
/// The fields only completions read.
const COMPLETION_FIELDS: [&str; 2] = ["prompt", "suffix"];

/// The body of `endpoint` as `T`, parsed once; a field the endpoint does not read is
/// refused with OpenAI's message.
fn parse_fields<T: serde::de::DeserializeOwned>(body: &[u8], endpoint: Endpoint) -> Result<T> {
    let value: Value = parse(body)?;
    if let Value::Object(fields) = &value {
        check_fields(fields, endpoint)?;
    }
    serde_json::from_value(value).map_err(|e| bad(format!("invalid request body: {e}")))
}

fn check_fields(fields: &serde_json::Map<String, Value>, endpoint: Endpoint) -> Result<()> {
    let own: &[&str] = match endpoint {
        Endpoint::Chat => &CHAT_FIELDS,
        Endpoint::Completions => &COMPLETION_FIELDS,
    };
    match fields
        .keys()
        .find(|k| !SHARED_FIELDS.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        Some(unknown) => Err(bad(format!(
            "Unrecognized request argument supplied: {unknown}"
        ))),
        None => Ok(()),
    }
}

impl Sampling {
    /// How many alternatives' log-probabilities each token reports, if any: chat's
    /// `logprobs: true` with `top_logprobs`, or completions' `logprobs: N`.
    fn logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>> {
        match (endpoint, &self.logprobs) {
            (Endpoint::Chat, None | Some(Value::Null | Value::Bool(false))) => {
                if self.top_logprobs.is_some() {
                    return Err(bad("top_logprobs needs logprobs: true"));
                }
                Ok(None)
            }
            (Endpoint::Chat, Some(Value::Bool(true))) => Ok(Some(self.top_logprobs.unwrap_or(0))),
            (Endpoint::Completions, None | Some(Value::Null)) => Ok(None),
            (Endpoint::Completions, Some(Value::Number(n))) => n
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| bad("logprobs must be a whole number")),
            (Endpoint::Chat, Some(_)) => Err(bad("logprobs must be true or false")),
            (Endpoint::Completions, Some(_)) => Err(bad("logprobs must be a whole number")),
        }
    }

    /// The handler's parameters; what this server cannot honour is refused.
    fn parameters(&self, default_tokens: usize, endpoint: Endpoint) -> Result<GenerateParameters> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad(
                "n must be 1: this server generates one choice per request",
            ));
        }
        let logprobs = self.logprobs(endpoint)?;
        if logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(bad(format!(
                "at most {MAX_TOP_LOGPROBS} alternatives' log-probabilities per token"
            )));
        }
        if self.echo {
            return Err(bad("echo is not supported by this server"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(bad(
                "best_of must be 1: this server generates one choice per request",
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(bad("suffix (insertion) is not supported by this server"));
        }
        if self.store == Some(true) {
            return Err(bad(
                "store: this server keeps no completions; leave it out or set it to false",
            ));
        }
        let logit_bias = self
            .logit_bias
            .iter()
            .flatten()
            .map(|(token, bias)| {
                let id = token.parse::<u32>().map_err(|_| {
                    bad(format!("logit_bias keys must be token ids, got {token:?}"))
                })?;
                let bias = bias
                    .as_f64()
                    .ok_or_else(|| bad(format!("logit_bias for token {token} must be a number")))?;
                Ok((id, bias as f32))
            })
            .collect::<Result<Vec<_>>>()?;
        let from_format = self
            .response_format
            .as_ref()
            .map(crate::http::grammar::response_format)
            .transpose()?
            .flatten();
        let guided = crate::http::grammar::guided(&self.rest)?;
        let grammar = match (from_format, guided) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "ask for one grammar at a time: response_format or guided_*, not both",
                ));
            }
            (a, b) => a.or(b),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(bad(format!(
                "temperature must be between 0 and 2, got {temperature}"
            )));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        // temperature 0 is greedy decoding; so is top_p with it.
        let greedy = temperature == 0.0;
        Ok(GenerateParameters {
            max_new_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(default_tokens),
            do_sample: !greedy,
            temperature: (!greedy).then_some(temperature),
            top_p: if greedy {
                None
            } else {
                self.top_p.filter(|&p| p < 1.0)
            },
            top_k: if greedy { None } else { self.top_k },
            seed: self.seed,
            stop,
            details: true,
            ignore_eos: false,
            logprobs,
            grammar,
            logit_bias,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            tools: Vec::new(),
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<WireMessage>,
    #[serde(default)]
    tools: Option<Vec<WireTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTool {
    #[serde(rename = "type")]
    kind: String,
    function: WireFunction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    /// `strict`: accepted, as it asks for no more than this server does (a call the
    /// model must make is always constrained to its schema).
    #[serde(default, rename = "strict")]
    _strict: Option<bool>,
}

/// The tools of a chat body as the handler takes them: none when it offers none or
/// says `tool_choice: "none"`.
fn chat_tools(
    tools: Option<Vec<WireTool>>,
    choice: Option<Value>,
    parallel: Option<bool>,
) -> Result<Option<ChatTools>> {
    let tools = tools.unwrap_or_default();
    let choice = match choice {
        None => (!tools.is_empty()).then_some(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" => Some(ToolChoice::Auto),
            "required" => Some(ToolChoice::Required),
            other => {
                return Err(bad(format!(
                    "tool_choice must be \"none\", \"auto\", \"required\" or a function, got {other:?}"
                )));
            }
        },
        Some(object @ Value::Object(_)) => {
            match (object["type"].as_str(), object["function"]["name"].as_str()) {
                (Some("function"), Some(name)) => Some(ToolChoice::Function(name.to_string())),
                _ => {
                    return Err(bad(
                        "tool_choice as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ));
                }
            }
        }
        Some(_) => return Err(bad("tool_choice must be a string or an object")),
    };
    let Some(choice) = choice else {
        return Ok(None);
    };
    if tools.is_empty() {
        return Err(bad("tool_choice needs tools"));
    }
    let mut functions = Vec::with_capacity(tools.len());
    for tool in tools {
        if tool.kind != "function" {
            return Err(bad(format!(
                "tools of type {:?} are not supported (only \"function\")",
                tool.kind
            )));
        }
        let function = tool.function;
        if function.name.is_empty()
            || functions
                .iter()
                .any(|f: &ToolFunction| f.name == function.name)
        {
            return Err(bad(format!(
                "tool names must be given and distinct, got {:?}",
                function.name
            )));
        }
        let parameters = function
            .parameters
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if !parameters.is_object() {
            return Err(bad(format!(
                "tool {}: parameters must be a JSON schema (an object)",
                function.name
            )));
        }
        functions.push(ToolFunction {
            name: function.name,
            description: function.description,
            parameters,
        });
    }
    if let ToolChoice::Function(name) = &choice
        && !functions.iter().any(|f| &f.name == name)
    {
        return Err(bad(format!(
            "tool_choice names {name:?}, which is not among the tools"
        )));
    }
    Ok(Some(ChatTools {
        functions,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// A message; fields a client echoes back empty (`refusal`, `audio`, ...) are
/// accepted when null, refused by name otherwise.
#[derive(Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct WireToolCall {
    id: String,
    function: WireCalled,
}

#[derive(Deserialize)]
struct WireCalled {
    name: String,
    /// JSON text, as OpenAI sends it (an object is taken too).
    arguments: Value,
}

impl WireMessage {
    /// A message's text: a string, or the text parts of a content array.
    fn into_message(self) -> Result<ChatMessage> {
        let content = match self.content {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text,
            Some(Value::Array(parts)) => parts
                .iter()
                .map(
                    |part| match (part["type"].as_str(), part["text"].as_str()) {
                        (Some("text"), Some(text)) => Ok(text),
                        _ => Err(bad("only text content parts are supported")),
                    },
                )
                .collect::<Result<Vec<_>>>()?
                .concat(),
            Some(_) => return Err(bad("message content must be a string or an array of parts")),
        };
        if let Some((key, _)) = self
            .rest
            .iter()
            .find(|(_, v)| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(bad(format!("messages: the field {key:?} is not supported")));
        }
        let tool_calls = self
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(|call| ToolCall {
                id: call.id,
                name: call.function.name,
                arguments: match call.function.arguments {
                    Value::String(text) => text,
                    other => other.to_string(),
                },
            })
            .collect();
        Ok(ChatMessage {
            role: self.role,
            content,
            tool_calls,
            tool_call_id: self.tool_call_id,
            name: self.name,
        })
    }
}

/// Which of the two endpoints a generation answers, and how its JSON differs.
#[derive(Clone, Copy)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn object(self, streamed: bool) -> &'static str {
        match (self, streamed) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn id(self) -> String {
        completion_id(match self {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        })
    }

    /// One choice: the whole text, or (streamed) a piece of it, with the
    /// log-probabilities of its tokens when asked (`logprobs` empty otherwise).
    fn choice(
        self,
        text: &str,
        finish: Option<FinishReason>,
        streamed: bool,
        logprobs: &[TokenLogprobs],
    ) -> Value {
        let finish_reason = finish.map(finish_reason);
        let logprobs = if logprobs.is_empty() {
            Value::Null
        } else {
            self.logprobs_json(logprobs)
        };
        match (self, streamed) {
            (Endpoint::Completions, _) => json!({
                "index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs,
            }),
            (Endpoint::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }),
            (Endpoint::Chat, true) => {
                let delta = if finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs})
            }
        }
    }

    /// Tokens' log-probabilities as each endpoint spells them: chat's `content` list
    /// (token, logprob, UTF-8 bytes, top_logprobs), completions' parallel lists.
    fn logprobs_json(self, tokens: &[TokenLogprobs]) -> Value {
        match self {
            Endpoint::Chat => {
                let entry = |t: &spillway_handlers::TokenLogprob| json!({"token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes()});
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(&t.token);
                        e["top_logprobs"] = t.top.iter().map(entry).collect();
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Endpoint::Completions => {
                let mut offset = 0;
                let mut offsets = Vec::new();
                for t in tokens {
                    offsets.push(offset);
                    offset += t.token.text.len();
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        Value::Object(
                            t.top
                                .iter()
                                .map(|a| (a.text.clone(), json!(a.logprob)))
                                .collect(),
                        )
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| t.token.text.clone()).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.token.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// Calls as OpenAI writes them in a message (or, `streamed`, in a delta, with their
/// index).
fn tool_calls_json(calls: &[ToolCall], streamed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(index, call)| {
            let mut entry = json!({
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            });
            if streamed {
                entry["index"] = json!(index);
            }
            entry
        })
        .collect()
}

fn usage(prompt_tokens: usize, generation: &Generation) -> Value {
    let completion = generation.token_ids.len();
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    })
}

fn decode_completion(body: &[u8]) -> Result<(Sampling, Request)> {
    let body: CompletionBody = parse_fields(body, Endpoint::Completions)?;
    let prompt = match body.prompt {
        Value::String(prompt) => prompt,
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        Value::Array(_) => {
            return Err(bad(
                "prompt must be one string (batches of prompts are not supported)",
            ));
        }
        _ => return Err(bad("prompt must be a string")),
    };
    let parameters = body
        .sampling
        .parameters(DEFAULT_COMPLETION_TOKENS, Endpoint::Completions)?;
    let request = Request::Generate(GenerateRequest { prompt, parameters });
    Ok((body.sampling, request))
}

fn decode_chat(body: &[u8]) -> Result<(Sampling, Request)> {
    let body: ChatBody = parse_fields(body, Endpoint::Chat)?;
    let messages = body
        .messages
        .into_iter()
        .map(WireMessage::into_message)
        .collect::<Result<Vec<_>>>()?;
    let parameters = body
        .sampling
        .parameters(DEFAULT_CHAT_TOKENS, Endpoint::Chat)?;
    let tools = chat_tools(body.tools, body.tool_choice, body.parallel_tool_calls)?;
    let request = Request::Chat(ChatRequest {
        messages,
        parameters,
        tools,
    });
    Ok((body.sampling, request))
}

async fn completions(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    respond(async {
        let (sampling, request) = decode_completion(&body)?;
        generate(state, sampling, request, Endpoint::Completions).await
    })
    .await
}

async fn chat_completions(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    respond(async {
        let (sampling, request) = decode_chat(&body)?;
        generate(state, sampling, request, Endpoint::Chat).await
    })
    .await
}

/// Runs a generation and answers it whole, or streams it as server-sent events.
async fn generate(
    state: AppState,
    sampling: Sampling,
    request: Request,
    endpoint: Endpoint,
) -> Result<Response> {
    let dispatch = Dispatch::to(&state, &sampling.model, None)?;
    expect_handler(&dispatch, HandlerKind::TextGeneration, "this endpoint")?;
    let (id, created, model) = (endpoint.id(), unix_now(), sampling.model.clone());
    if !sampling.stream {
        let answered = recorded(&dispatch, dispatch.run(&state, request).await)?;
        let Output::Generation(generation) = answered.output else {
            return Err(Error::Internal(
                "a generation model answered something else".into(),
            ));
        };
        let mut choice = endpoint.choice(
            &generation.text,
            Some(generation.finish_reason),
            false,
            &generation.logprobs,
        );
        if !generation.tool_calls.is_empty() {
            choice["message"]["tool_calls"] = tool_calls_json(&generation.tool_calls, false);
            if generation.text.is_empty() {
                choice["message"]["content"] = Value::Null;
            }
        }
        return Ok(axum::Json(json!({
            "id": id,
            "object": endpoint.object(false),
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(answered.input_tokens, &generation),
        }))
        .into_response());
    }
    let (events, received) = flume::unbounded();
    let submitted = recorded(
        &dispatch,
        dispatch.queue(&state, request, Some(events)).await,
    )?;
    let chunk = move |choices: Value, usage: Option<Value>| -> Event {
        let mut chunk = json!({
            "id": id,
            "object": endpoint.object(true),
            "created": created,
            "model": model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        Event::default().data(chunk.to_string())
    };
    let include_usage = sampling.include_usage();
    let prompt_tokens = submitted.input_tokens;
    let stream = event_stream(move |out| async move {
        let yield_ = |event: Event| {
            let out = out.clone();
            async move {
                let _ = out.send_async(event).await;
            }
        };
        // The request stays in flight (never evicted under it) until the stream ends.
        let _dispatch = dispatch;
        if let Endpoint::Chat = endpoint {
            yield_(chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]), None)).await;
        }
        let mut finished = None;
        while let Ok(event) = received.recv_async().await {
            match event {
                // A token whose text is held back (it may begin a stop sequence) still
                // sends its log-probabilities when they were asked for.
                GenerationEvent::Token { text, logprobs, .. }
                    if !text.is_empty() || logprobs.is_some() =>
                {
                    let logprobs: Vec<TokenLogprobs> = logprobs.into_iter().collect();
                    let choice = endpoint.choice(&text, None, true, &logprobs);
                    yield_(chunk(json!([choice]), None)).await;
                }
                GenerationEvent::Token { .. } => {}
                GenerationEvent::Finished(generation) => {
                    finished = Some(generation);
                    break;
                }
            }
        }
        match finished {
            Some(generation) => {
                if !generation.tool_calls.is_empty() {
                    // Calls are sent whole, in one delta, once the answer is finished.
                    let delta =
                        json!({"tool_calls": tool_calls_json(&generation.tool_calls, true)});
                    yield_(chunk(json!([{"index": 0, "delta": delta, "finish_reason": null, "logprobs": null}]), None)).await;
                }
                let choice = endpoint.choice("", Some(generation.finish_reason), true, &[]);
                yield_(chunk(json!([choice]), None)).await;
                if include_usage {
                    yield_(chunk(json!([]), Some(usage(prompt_tokens, &generation)))).await;
                }
            }
            None => {
                // It failed mid-way: its answer says why.
                let error = match submitted.answer.await {
                    Ok(Err(e)) => e,
                    _ => Error::Internal("the generation ended without finishing".into()),
                };
                yield_(Event::default().data(error_body(&error).to_string())).await;
            }
        }
        yield_(Event::default().data("[DONE]")).await;
    });
    Ok(Sse::new(stream).into_response())
}

fn expect_handler(dispatch: &Dispatch, kind: HandlerKind, endpoint: &str) -> Result<()> {
    let handler = dispatch.model.spec.handler;
    if handler == kind {
        Ok(())
    } else {
        Err(bad(format!(
            "model {} is a {handler} model; {endpoint} serves {kind} models",
            dispatch.model.spec.name
        )))
    }
}

/// Counts the request in its model's metrics with the status it is answered (200, or
/// its error's), and passes the result on.
fn recorded<T>(dispatch: &Dispatch, result: Result<T>) -> Result<T> {
    match &result {
        Ok(_) => dispatch.record(200),
        Err(e) => dispatch.record(e.kind().status().as_u16()),
    }
    result
}

/// An endpoint's answer, with errors in OpenAI's shape.
async fn respond(answer: impl std::future::Future<Output = Result<Response>>) -> Response {
    answer.await.unwrap_or_else(|error| {
        let status = error.kind().status();
        (status, axum::Json(error_body(&error))).into_response()
    })
}

/// `{"error": {"message", "type", "param", "code"}}`.
pub(crate) fn error_body(error: &Error) -> Value {
    let kind = error.kind();
    let status = kind.status();
    let error_type = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let code = (status == axum::http::StatusCode::NOT_FOUND).then_some("model_not_found");
    json!({"error": {
        "message": error.public_message(),
        "type": error_type,
        "param": null,
        "code": code,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_standard_padded_base64_of_little_endian_floats() {
        // 1.0f32 = 00 00 80 3f; 2.0 = 00 00 00 40; -0.5 = 00 00 00 bf.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 2.0]), "AACAPwAAAEA=");
        assert_eq!(base64_f32(&[1.0, 2.0, -0.5]), "AACAPwAAAEAAAAC/");
        assert_eq!(base64_f32(&[]), "");
    }

    fn sampling(body: Value) -> Sampling {
        serde_json::from_value(
            json!({"model": "m"})
                .as_object()
                .cloned()
                .map(|mut m| {
                    m.extend(body.as_object().cloned().unwrap_or_default());
                    Value::Object(m)
                })
                .unwrap_or_default(),
        )
        .expect("parses")
    }

    #[test]
    fn sampling_maps_openai_names_and_refuses_what_it_cannot_honour() {
        let greedy = sampling(json!({"temperature": 0, "max_tokens": 5, "stop": "x"}))
            .parameters(16, Endpoint::Chat)
            .expect("fine");
        assert!(!greedy.do_sample);
        assert_eq!(
            (greedy.max_new_tokens, greedy.stop),
            (5, vec!["x".to_string()])
        );
        let sampled =
            sampling(json!({"top_p": 0.9, "seed": 3, "max_completion_tokens": 7, "max_tokens": 2}))
                .parameters(16, Endpoint::Chat)
                .expect("fine");
        assert!(sampled.do_sample);
        assert_eq!(
            (
                sampled.temperature,
                sampled.top_p,
                sampled.seed,
                sampled.max_new_tokens
            ),
            (Some(1.0), Some(0.9), Some(3), 7)
        );
        assert_eq!(
            sampling(json!({}))
                .parameters(16, Endpoint::Chat)
                .expect("fine")
                .max_new_tokens,
            16
        );
        for refused in [
            json!({"n": 2}),
            json!({"top_logprobs": 2}),
            json!({"logprobs": true, "top_logprobs": 21}),
            json!({"logprobs": 3}),
            json!({"echo": true}),
            json!({"temperature": 2.5}),
        ] {
            assert!(
                sampling(refused.clone())
                    .parameters(16, Endpoint::Chat)
                    .is_err(),
                "{refused}"
            );
        }
        assert!(
            sampling(json!({"n": 1, "logprobs": false}))
                .parameters(16, Endpoint::Chat)
                .is_ok()
        );
        // Chat asks with a flag and a count; completions with a count.
        let asked = |body: Value, endpoint| {
            sampling(body)
                .parameters(16, endpoint)
                .ok()
                .and_then(|p| p.logprobs)
        };
        assert_eq!(
            asked(json!({"logprobs": true, "top_logprobs": 4}), Endpoint::Chat),
            Some(4)
        );
        assert_eq!(asked(json!({"logprobs": true}), Endpoint::Chat), Some(0));
        assert_eq!(
            asked(json!({"logprobs": 3}), Endpoint::Completions),
            Some(3)
        );
        assert_eq!(asked(json!({}), Endpoint::Completions), None);
        assert!(
            sampling(json!({"logprobs": true}))
                .parameters(16, Endpoint::Completions)
                .is_err()
        );
    }

    #[test]
    fn embedding_inputs_take_strings_or_token_ids() {
        let parsed = |v: Value| embedding_request(v).ok();
        assert_eq!(parsed(json!("a")), Some(Request::Texts(vec!["a".into()])));
        assert_eq!(
            parsed(json!(["a", "b"])),
            Some(Request::Texts(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parsed(json!([1, 2])),
            Some(Request::Tokens(vec![vec![1, 2]]))
        );
        assert_eq!(
            parsed(json!([[1, 2], [3]])),
            Some(Request::Tokens(vec![vec![1, 2], vec![3]]))
        );
        for refused in [
            json!([]),
            json!(""),
            json!(5),
            json!(["a", 1]),
            json!([1, "a"]),
            json!([-1]),
            json!([1.5]),
            json!([[1], []]),
            json!([[1], 2]),
        ] {
            assert!(embedding_request(refused.clone()).is_err(), "{refused}");
        }
    }
}
