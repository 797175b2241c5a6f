//! TorchServe's prediction bodies: a request body becomes a handler [`Request`] by the
//! model's handler kind, and an [`Output`] becomes the JSON (or bytes) TorchServe
//! clients read. The only place that knows these shapes.
//!
//! - Text handlers: `{"inputs": "text"}`, `{"inputs": ["a", "b"]}` (also under `data`
//!   or `body`, as TorchServe's default handlers read them), a bare JSON string or array
//!   of strings, or a text/plain body. A classifier also takes text pairs (a
//!   cross-encoder's query and passage): `{"inputs": [["q", "p"], ...]}` or
//!   transformers' pipeline's `{"inputs": {"text": "q", "text_pair": "p"}}`.
//! - `token_classification`: texts as above; answered with each text's entities.
//! - `text_generation`: TGI's `{"inputs": "prompt", "parameters": {...}}`, or a
//!   text/plain prompt; answered `{"generated_text": "..."}`, with `details` when asked.
//! - `image_classifier`: the image as the body (`curl -T kitten.jpg`, `--data-binary`),
//!   or JSON holding base64 (a string, `{"data": ...}`, or an array of either for
//!   several images); a multipart form's `data` parts arrive here as images (see
//!   [`crate::http::multipart`]). Answered as TorchServe's image_classifier answers: per
//!   image an object of its top labels and probabilities, most likely first.
//! - `echo`: the body as it came.

use serde::Deserialize;
use serde_json::{Value, json};
use spillway_handlers::{
    GenerateParameters, GenerateRequest, Generation, HandlerKind, Output, RawBody, Request,
};

use crate::error::{Error, Result};

/// A prediction request: what the handler takes, and whether the answer streams.
#[derive(Debug)]
pub struct Prediction {
    pub request: Request,
    /// `"stream": true` in a generation's parameters: one JSON object per token.
    pub stream: bool,
}

/// The body as `kind`'s handler takes it. Malformed bodies are the client's error.
pub fn request(kind: HandlerKind, body: RawBody) -> Result<Prediction> {
    let whole = |request| Prediction {
        request,
        stream: false,
    };
    match kind {
        HandlerKind::TextEmbedding => match texts(&body)? {
            TextInputs::Texts(texts) => Ok(whole(Request::Texts(texts))),
            TextInputs::Pairs(_) => Err(bad(
                "text_embedding embeds texts one by one; text pairs are for a classifier or reranker",
            )),
        },
        HandlerKind::TokenClassification => match texts(&body)? {
            TextInputs::Texts(texts) => Ok(whole(Request::Texts(texts))),
            TextInputs::Pairs(_) => Err(bad(
                "token_classification labels the tokens of texts, not of text pairs",
            )),
        },
        HandlerKind::TextClassification => Ok(whole(match texts(&body)? {
            TextInputs::Texts(texts) => Request::Texts(texts),
            TextInputs::Pairs(pairs) => Request::Pairs(pairs),
        })),
        HandlerKind::TextGeneration => generate(&body).map(|(request, stream)| Prediction {
            request: Request::Generate(request),
            stream,
        }),
        HandlerKind::ImageClassifier => Ok(whole(Request::Images(images(&body)?))),
        HandlerKind::Echo => Ok(whole(Request::Raw(body))),
    }
}

/// The request for a multipart form's input `parts`: images for an image handler, else
/// the first part read as the whole body would be.
pub fn from_parts(
    kind: HandlerKind,
    parts: Vec<crate::http::multipart::Part>,
) -> Result<Prediction> {
    let parts = crate::http::multipart::inputs(parts)?;
    if kind == HandlerKind::ImageClassifier {
        return Ok(Prediction {
            request: Request::Images(parts.into_iter().map(|p| p.bytes).collect()),
            stream: false,
        });
    }
    let part = parts
        .into_iter()
        .next()
        .ok_or_else(|| bad("the form has no input"))?;
    request(
        kind,
        RawBody {
            content_type: part.content_type,
            bytes: part.bytes,
        },
    )
}

/// An image sent as base64 text (a `data:` URL's payload too).
pub fn base64_image(text: &str, index: usize) -> Result<Vec<u8>> {
    use base64::Engine;
    let payload = match text.find(";base64,") {
        Some(at) if text.starts_with("data:") => &text[at + ";base64,".len()..],
        _ => text,
    };
    let compact: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(compact.as_bytes()))
        .map_err(|e| {
            bad(format!(
                "image {index} is neither an image body nor base64 text: {e}"
            ))
        })
}

/// The images of an image handler's body.
fn images(body: &RawBody) -> Result<Vec<Vec<u8>>> {
    let Some(value) = json_of(body)? else {
        if body.bytes.is_empty() {
            return Err(bad(
                "the request has no image: send it as the body (curl -T kitten.jpg)",
            ));
        }
        return Ok(vec![body.bytes.clone()]);
    };
    fn item(value: &Value, index: usize) -> Result<Vec<u8>> {
        match value {
            Value::String(text) => base64_image(text, index),
            Value::Object(fields) => match ["data", "body", "b64", "image"]
                .iter()
                .find_map(|k| fields.get(*k))
            {
                Some(Value::String(text)) => base64_image(text, index),
                _ => Err(bad(format!(
                    "image {index}: an object must hold base64 under data, body, b64 or image"
                ))),
            },
            other => Err(bad(format!(
                "image {index} is {}, not base64 text",
                json_kind(other)
            ))),
        }
    }
    let images = match &value {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| item(v, i))
            .collect::<Result<Vec<_>>>()?,
        Value::Object(fields)
            if matches!(
                fields.get("data").or(fields.get("instances")),
                Some(Value::Array(_))
            ) =>
        {
            let Some(Value::Array(items)) = fields.get("data").or(fields.get("instances")) else {
                unreachable!("matched above")
            };
            items
                .iter()
                .enumerate()
                .map(|(i, v)| item(v, i))
                .collect::<Result<Vec<_>>>()?
        }
        single => vec![item(single, 0)?],
    };
    if images.is_empty() {
        return Err(bad("the request has no image"));
    }
    Ok(images)
}

/// One image's top labels as TorchServe's image_classifier writes them: an object from
/// label to probability, most likely first (the order is kept: written by hand, as
/// serde_json's maps sort their keys).
pub fn labels_json(labels: &[spillway_handlers::ScoredLabel]) -> String {
    let fields: Vec<String> = labels
        .iter()
        .map(|l| {
            format!(
                "{}:{}",
                Value::String(l.label.clone()),
                json!(l.probability)
            )
        })
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// One chunk of a streamed generation, a line of JSON: `{"token_id", "text"}` per
/// token (the text deltas add up to the generated text), and last
/// `{"generated_text", "details"}`.
pub fn stream_chunk(event: &spillway_handlers::GenerationEvent) -> Vec<u8> {
    let value = match event {
        spillway_handlers::GenerationEvent::Token { id, text, .. } => {
            json!({"token_id": id, "text": text})
        }
        spillway_handlers::GenerationEvent::Finished(generation) => {
            let mut generation = generation.clone();
            generation.details = true;
            generation_json(generation)
        }
    };
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// The answer's content type and bytes.
pub fn answer(output: Output) -> Result<(String, Vec<u8>)> {
    let json = |value: Value| {
        serde_json::to_vec(&value)
            .map(|bytes| ("application/json".to_string(), bytes))
            .map_err(|e| Error::Internal(format!("cannot encode the answer: {e}")))
    };
    match output {
        Output::Embeddings(embeddings) => json(json!(embeddings)),
        Output::Classifications(classes) => json(Value::Array(
            classes
                .into_iter()
                .map(|c| json!({"label": c.label, "score": c.score}))
                .collect(),
        )),
        Output::Entities(per_text) => json(Value::Array(
            per_text
                .iter()
                .map(|entities| entities_json(entities))
                .collect(),
        )),
        Output::Generation(generation) => json(generation_json(generation)),
        // One image (TorchServe's one request): its object; several: an array of them.
        Output::Labels(per_image) => {
            let objects: Vec<String> = per_image.iter().map(|l| labels_json(l)).collect();
            let text = match objects.as_slice() {
                [one] => one.clone(),
                many => format!("[{}]", many.join(",")),
            };
            Ok(("application/json".to_string(), text.into_bytes()))
        }
        Output::Raw(body) => Ok((
            body.content_type
                .unwrap_or_else(|| "application/octet-stream".into()),
            body.bytes,
        )),
    }
}

/// One text's entities as transformers' pipeline prints them: `[{"entity_group",
/// "score", "word", "start", "end"}]`.
pub fn entities_json(entities: &[spillway_handlers::Entity]) -> Value {
    Value::Array(
        entities
            .iter()
            .map(|e| {
                json!({"entity_group": e.entity_group, "score": e.score, "word": e.word,
                       "start": e.start, "end": e.end})
            })
            .collect(),
    )
}

fn generation_json(generation: Generation) -> Value {
    let mut answer = json!({ "generated_text": generation.text });
    if generation.details {
        answer["details"] = json!({
            "finish_reason": generation.finish_reason.name(),
            "prompt_tokens": generation.prompt_tokens,
            "generated_tokens": generation.token_ids.len(),
            "token_ids": generation.token_ids,
        });
    }
    answer
}

fn bad(message: impl Into<String>) -> Error {
    Error::BadRequest(message.into())
}

/// The body as JSON, or None where it is text. A body declared `application/json` must
/// parse; one declared `text/plain` is text whatever it holds. Any other (curl's `-d`
/// sends `application/x-www-form-urlencoded`; some clients send none) is JSON when it
/// parses as a JSON object, array or string, as TorchServe's handlers decode it, and
/// text otherwise.
fn json_of(body: &RawBody) -> Result<Option<Value>> {
    let content_type = body.content_type.as_deref().unwrap_or_default();
    let declared = |mime: &str| {
        content_type
            .split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(mime))
    };
    if declared("application/json") {
        let value = serde_json::from_slice(&body.bytes)
            .map_err(|e| bad(format!("malformed JSON body: {e}")))?;
        return Ok(Some(value));
    }
    if declared("text/plain") {
        return Ok(None);
    }
    let looks_like_json = body
        .bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| b"{[\"".contains(b));
    Ok(looks_like_json
        .then(|| serde_json::from_slice(&body.bytes).ok())
        .flatten())
}

/// The inputs of a text handler's request body: texts, or (text, text pair) inputs for
/// a classifier.
fn texts(body: &RawBody) -> Result<TextInputs> {
    let inputs = match json_of(body)? {
        Some(value) => texts_from_json(value)?,
        None => TextInputs::Texts(vec![
            String::from_utf8(body.bytes.clone())
                .map_err(|_| bad("the request body is not valid UTF-8 text"))?,
        ]),
    };
    match &inputs {
        TextInputs::Texts(texts)
            if texts.is_empty() || (texts.len() == 1 && texts[0].trim().is_empty()) =>
        {
            Err(bad("the request has no input text"))
        }
        TextInputs::Pairs(pairs) if pairs.is_empty() => Err(bad("the request has no input text")),
        _ => Ok(inputs),
    }
}

/// A text handler's inputs.
#[derive(Debug, PartialEq)]
enum TextInputs {
    Texts(Vec<String>),
    /// `[["query", "passage"], ...]` or `{"text": ..., "text_pair": ...}` items.
    Pairs(Vec<(String, String)>),
}

/// One item of `inputs`: a text, or a pair as a two-string array or as transformers'
/// pipeline's `{"text", "text_pair"}`.
fn input_item(item: Value) -> Result<std::result::Result<String, (String, String)>> {
    let string = |v: Option<Value>, what: &str| match v {
        Some(Value::String(s)) => Ok(s),
        other => Err(bad(format!(
            "{what} must be a string, found {}",
            other.as_ref().map_or("nothing", json_kind)
        ))),
    };
    match item {
        Value::String(s) => Ok(Ok(s)),
        Value::Array(pair) if pair.len() == 2 => {
            let mut pair = pair.into_iter();
            Ok(Err((
                string(pair.next(), "a pair's first text")?,
                string(pair.next(), "a pair's second text")?,
            )))
        }
        Value::Object(mut map) if map.contains_key("text") => {
            let text = string(map.remove("text"), "\"text\"")?;
            let pair = string(map.remove("text_pair"), "\"text_pair\"")?;
            if let Some(extra) = map.keys().next() {
                return Err(bad(format!("unknown field {extra:?} next to \"text\"")));
            }
            Ok(Err((text, pair)))
        }
        other => Err(bad(format!(
            "\"inputs\" must hold strings, [text, text_pair] arrays or {{\"text\", \"text_pair\"}} objects, found {}",
            json_kind(&other)
        ))),
    }
}

fn texts_from_json(value: Value) -> Result<TextInputs> {
    let inputs = match value {
        Value::Object(mut map) if !map.contains_key("text") => map
            .remove("inputs")
            .or_else(|| map.remove("data"))
            .or_else(|| map.remove("body"))
            .ok_or_else(|| bad("expected a JSON object with an \"inputs\" field"))?,
        other => other,
    };
    let items = match inputs {
        Value::Array(items) => items,
        item @ (Value::String(_) | Value::Object(_)) => vec![item],
        other => {
            return Err(bad(format!(
                "\"inputs\" must be a string or an array of strings, found {}",
                json_kind(&other)
            )));
        }
    };
    let (mut texts, mut pairs) = (Vec::new(), Vec::new());
    for item in items {
        match input_item(item)? {
            Ok(text) => texts.push(text),
            Err(pair) => pairs.push(pair),
        }
    }
    match (texts.is_empty(), pairs.is_empty()) {
        (_, true) => Ok(TextInputs::Texts(texts)),
        (true, false) => Ok(TextInputs::Pairs(pairs)),
        (false, false) => Err(bad(
            "\"inputs\" mixes texts and text pairs: send one kind per request",
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// TGI's request body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    inputs: String,
    #[serde(default)]
    parameters: Option<WireParameters>,
}

/// TGI's parameter names, as clients send them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireParameters {
    max_new_tokens: Option<usize>,
    #[serde(default)]
    do_sample: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    details: bool,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    stream: bool,
    /// TGI's `{"type": "json" | "regex", "value": ...}` (see [`crate::http::grammar`]).
    grammar: Option<Value>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
}

impl TryFrom<WireParameters> for GenerateParameters {
    type Error = Error;

    fn try_from(p: WireParameters) -> Result<Self> {
        let defaults = GenerateParameters::default();
        Ok(GenerateParameters {
            max_new_tokens: p.max_new_tokens.unwrap_or(defaults.max_new_tokens),
            do_sample: p.do_sample,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            seed: p.seed,
            stop: p.stop,
            details: p.details,
            ignore_eos: p.ignore_eos,
            logprobs: None,
            grammar: p
                .grammar
                .as_ref()
                .map(crate::http::grammar::tgi)
                .transpose()?,
            logit_bias: Vec::new(),
            presence_penalty: p.presence_penalty.unwrap_or(0.0),
            frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
            tools: Vec::new(),
        })
    }
}

/// A generation request body, and whether it asks to stream. The parameters' values
/// are the handler's to check.
fn generate(body: &RawBody) -> Result<(GenerateRequest, bool)> {
    let mut stream = false;
    let request = if let Some(value) = json_of(body)?.filter(Value::is_object) {
        let parsed: GenerateBody = serde_json::from_value(value)
            .map_err(|e| bad(format!("invalid generation request: {e}")))?;
        stream = parsed.parameters.as_ref().is_some_and(|p| p.stream);
        GenerateRequest {
            prompt: parsed.inputs,
            parameters: parsed
                .parameters
                .map(GenerateParameters::try_from)
                .transpose()?
                .unwrap_or_default(),
        }
    } else {
        let TextInputs::Texts(mut texts) = texts(body)? else {
            return Err(bad("a generation request takes one prompt, not text pairs"));
        };
        GenerateRequest {
            prompt: texts.remove(0),
            parameters: GenerateParameters::default(),
        }
    };
    if request.prompt.is_empty() {
        return Err(bad("the request has no prompt"));
    }
    Ok((request, stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn texts_of(body: &RawBody) -> Result<Vec<String>> {
        match texts(body)? {
            TextInputs::Texts(texts) => Ok(texts),
            TextInputs::Pairs(pairs) => panic!("texts expected, got pairs {pairs:?}"),
        }
    }

    #[test]
    fn a_classifier_takes_text_pairs_in_both_shapes() {
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        let pairs = |s: &str| match request(HandlerKind::TextClassification, json_body(s)) {
            Ok(Prediction {
                request: Request::Pairs(pairs),
                ..
            }) => Ok(pairs),
            Ok(other) => panic!("{s}: {other:?}"),
            Err(e) => Err(e.kind()),
        };
        assert_eq!(
            pairs(r#"{"inputs": [["q", "p1"], ["q", "p2"]]}"#),
            Ok(vec![pair("q", "p1"), pair("q", "p2")])
        );
        assert_eq!(
            pairs(r#"{"inputs": {"text": "q", "text_pair": "p"}}"#),
            Ok(vec![pair("q", "p")])
        );
        assert_eq!(
            pairs(r#"[{"text": "a", "text_pair": "b"}, {"text": "c", "text_pair": "d"}]"#),
            Ok(vec![pair("a", "b"), pair("c", "d")])
        );
        for bad in [
            r#"{"inputs": ["a", ["q", "p"]]}"#,
            r#"{"inputs": [["q", 1]]}"#,
            r#"{"inputs": [["q", "p", "r"]]}"#,
            r#"{"inputs": {"text": "q"}}"#,
            r#"{"inputs": {"text": "q", "text_pair": "p", "x": 1}}"#,
        ] {
            assert_eq!(pairs(bad), Err(ErrorKind::BadRequest), "{bad}");
        }
        let embedding = request(
            HandlerKind::TextEmbedding,
            json_body(r#"{"inputs": [["q", "p"]]}"#),
        );
        assert_eq!(
            embedding.map(|_| ()).map_err(|e| e.kind()),
            Err(ErrorKind::BadRequest)
        );
    }

    fn json_body(s: &str) -> RawBody {
        RawBody {
            content_type: Some("application/json".into()),
            bytes: s.as_bytes().to_vec(),
        }
    }

    #[test]
    fn decodes_the_accepted_text_shapes() {
        let one = |s: &str| texts_of(&json_body(s)).ok();
        assert_eq!(one(r#"{"inputs": "hi"}"#), Some(vec!["hi".to_string()]));
        assert_eq!(
            one(r#"{"inputs": ["a", "b"]}"#),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(one(r#"{"data": "d"}"#), Some(vec!["d".to_string()]));
        assert_eq!(one(r#"["x"]"#), Some(vec!["x".to_string()]));
        let plain = RawBody {
            content_type: Some("text/plain".into()),
            bytes: b"{not json".to_vec(),
        };
        assert_eq!(texts_of(&plain).ok(), Some(vec!["{not json".to_string()]));
        // Undeclared, or curl's -d default: JSON when it parses as JSON, else text.
        for content_type in [None, Some("application/x-www-form-urlencoded".to_string())] {
            let body = |bytes: &str| RawBody {
                content_type: content_type.clone(),
                bytes: bytes.as_bytes().to_vec(),
            };
            let got = |bytes: &str| texts_of(&body(bytes)).map_err(|e| e.kind());
            assert_eq!(
                got(r#"{"inputs": ["hello world"]}"#),
                Ok(vec!["hello world".to_string()])
            );
            assert_eq!(got(r#" {"inputs": "y"}"#), Ok(vec!["y".to_string()]));
            assert_eq!(got(r#"{"inputs": 5}"#), Err(ErrorKind::BadRequest));
            assert_eq!(got("hello world"), Ok(vec!["hello world".to_string()]));
            assert_eq!(got("{half json"), Ok(vec!["{half json".to_string()]));
            let (prompt, stream) = generate(&body(
                r#"{"inputs": "p", "parameters": {"max_new_tokens": 3, "stream": true}}"#,
            ))
            .expect("a generation request");
            assert_eq!(
                (
                    prompt.prompt.as_str(),
                    prompt.parameters.max_new_tokens,
                    stream
                ),
                ("p", 3, true)
            );
        }
    }

    #[test]
    fn refuses_malformed_or_empty_input_as_client_errors() {
        for body in [
            r#"{"inputs": "#,
            r#"{"inputs": []}"#,
            r#"{"inputs": ""}"#,
            r#"{"inputs": [1, 2]}"#,
            r#"{"text": "x"}"#,
            r#"42"#,
        ] {
            let err = request(HandlerKind::TextEmbedding, json_body(body)).expect_err(body);
            assert_eq!(err.kind(), ErrorKind::BadRequest, "{body}: {err}");
        }
        for body in [
            r#"{"inputs": ""}"#,
            r#"{"inputs": 3}"#,
            r#"{"inputs": "x", "parameters": {"max_tokens": 3}}"#,
            r#"{"inputs": "x", "parameters": {"top_k": -1}}"#,
        ] {
            let err = request(HandlerKind::TextGeneration, json_body(body)).expect_err(body);
            assert_eq!(err.kind(), ErrorKind::BadRequest, "{body}: {err}");
        }
    }

    #[test]
    fn decodes_tgi_parameters_with_their_defaults() {
        let Ok(Prediction {
            request: Request::Generate(r),
            stream: false,
        }) = request(
            HandlerKind::TextGeneration,
            json_body(
                r#"{"inputs": "hi", "parameters": {"max_new_tokens": 5, "details": true, "stop": ["."], "top_k": 4}}"#,
            ),
        )
        else {
            panic!("a generation request");
        };
        assert_eq!(r.prompt, "hi");
        assert_eq!(
            r.parameters,
            GenerateParameters {
                max_new_tokens: 5,
                details: true,
                stop: vec![".".into()],
                top_k: Some(4),
                ..GenerateParameters::default()
            }
        );
        let Ok(Prediction {
            request: Request::Generate(r),
            ..
        }) = request(
            HandlerKind::TextGeneration,
            json_body(r#"{"inputs": "hi"}"#),
        )
        else {
            panic!("a generation request");
        };
        assert_eq!(r.parameters, GenerateParameters::default());
        let plain = RawBody {
            content_type: Some("text/plain".into()),
            bytes: b"Once upon".to_vec(),
        };
        let Ok(Prediction {
            request: Request::Generate(r),
            ..
        }) = request(HandlerKind::TextGeneration, plain)
        else {
            panic!("a generation request");
        };
        assert_eq!(r.prompt, "Once upon");
    }

    #[test]
    fn generations_carry_details_only_when_asked() {
        let generation = Generation {
            text: "Paris".into(),
            finish_reason: spillway_handlers::FinishReason::EosToken,
            prompt_tokens: 3,
            cached_tokens: 0,
            token_ids: vec![7, 2],
            details: false,
            logprobs: Vec::new(),
            tool_calls: Vec::new(),
        };
        let render = |g: Generation| -> Value {
            let (ct, bytes) = answer(Output::Generation(g)).expect("answer");
            assert_eq!(ct, "application/json");
            serde_json::from_slice(&bytes).expect("json")
        };
        assert_eq!(
            render(generation.clone()),
            json!({"generated_text": "Paris"})
        );
        assert_eq!(
            render(Generation {
                details: true,
                ..generation
            }),
            json!({"generated_text": "Paris", "details": {"finish_reason": "eos_token",
                "prompt_tokens": 3, "generated_tokens": 2, "token_ids": [7, 2]}})
        );
    }
}
