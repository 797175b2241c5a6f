//! KServe's Open Inference Protocol (v2, REST) on the inference address:
//! `GET /v2`, `/v2/health/live`, `/v2/health/ready`,
//! `GET /v2/models/{m}[/versions/{v}]` (metadata), `.../ready`, and
//! `POST /v2/models/{m}[/versions/{v}]/infer`. Errors are `{"error": "..."}`.
//!
//! Tensors, by handler:
//! - `text_embedding`: input `text` BYTES `[n]` → output `embedding` FP32 `[n, dim]`;
//! - `text_classification`: → `label` BYTES `[n]` and `score` FP32 `[n]`;
//! - `text_generation`: input `text_input` BYTES `[1]` (request `parameters` are TGI's
//!   generation parameters) → `text_output` BYTES `[1]`;
//! - `echo`: BYTES in, the same BYTES out.
//!
//! Tensor data travels as JSON or with the binary tensor data extension that Triton's
//! clients use by default (a JSON header of `Inference-Header-Content-Length` bytes,
//! then each binary tensor's bytes; BYTES elements as 4-byte little-endian lengths
//! followed by the bytes). Outputs are binary when the request asks
//! (`binary_data_output`, or an output's `binary_data`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use spillway_handlers::{
    GenerateParameters, GenerateRequest, HandlerKind, Output, RawBody, Request,
};

use crate::app::{AppState, Health};
use crate::error::{Error, Result};
use crate::http::dispatch::Dispatch;
use crate::lifecycle::model::ModelHandle;

const BINARY_HEADER_LENGTH: &str = "inference-header-content-length";

/// The model routes (guarded by the inference token when one is set).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(metadata_default))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(metadata_version),
        )
        .route("/v2/models/{model}/ready", get(ready_default))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(ready_version),
        )
        .route("/v2/models/{model}/infer", post(infer_default))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer_version),
        )
        .with_state(state)
}

/// KServe v1, as TorchServe serves it with `service_envelope=kserve`:
/// `POST /v1/models/{model}:predict` with `{"instances": [...]}` (each a text, or an
/// object holding it under `data`, `text` or `inputs`), answered
/// `{"predictions": [...]}` — one embedding, `{label, score}`, generated text or echo
/// per instance.
pub fn v1_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/models/{target}", post(v1_predict))
        .with_state(state)
}

#[derive(Deserialize)]
struct V1Request {
    instances: Vec<Value>,
}

async fn v1_predict(
    State(state): State<AppState>,
    Path(target): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(name) = target.strip_suffix(":predict") else {
        let message = format!(
            "no such endpoint: /v1/models/{target} (KServe v1 predicts at /v1/models/{{model}}:predict)"
        );
        return (StatusCode::NOT_FOUND, axum::Json(json!({"error": message}))).into_response();
    };
    let dispatch = match Dispatch::to(&state, name, None) {
        Ok(dispatch) => dispatch,
        Err(e) => return error_response(e),
    };
    let answer = async {
        let request: V1Request = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("expected {{\"instances\": [...]}}: {e}")))?;
        if dispatch.model.spec.handler == HandlerKind::ImageClassifier {
            return v1_images(&state, &dispatch, &request.instances).await;
        }
        let texts = request
            .instances
            .iter()
            .map(instance_text)
            .collect::<Result<Vec<String>>>()?;
        if texts.is_empty() {
            return Err(bad("instances is empty"));
        }
        let predictions: Vec<Value> = match dispatch.model.spec.handler {
            HandlerKind::TextEmbedding
            | HandlerKind::TextClassification
            | HandlerKind::TokenClassification => {
                match dispatch.run(&state, Request::Texts(texts)).await?.output {
                    Output::Embeddings(vectors) => vectors.into_iter().map(|v| json!(v)).collect(),
                    Output::Classifications(classes) => classes
                        .into_iter()
                        .map(|c| json!({"label": c.label, "score": c.score}))
                        .collect(),
                    Output::Entities(per_text) => per_text
                        .iter()
                        .map(|entities| {
                            crate::http::torchserve::predictions::entities_json(entities)
                        })
                        .collect(),
                    _ => {
                        return Err(Error::Internal(
                            "a text model answered something else".into(),
                        ));
                    }
                }
            }
            kind => {
                // One request per instance, queued together so they can share a batch.
                let requests = texts.into_iter().map(|text| match kind {
                    HandlerKind::TextGeneration => Request::Generate(GenerateRequest {
                        prompt: text,
                        parameters: GenerateParameters::default(),
                    }),
                    _ => Request::Raw(RawBody {
                        content_type: Some("text/plain".into()),
                        bytes: text.into_bytes(),
                    }),
                });
                let answers = futures_util::future::join_all(
                    requests.map(|request| dispatch.run(&state, request)),
                )
                .await;
                answers
                    .into_iter()
                    .map(|answered| match answered?.output {
                        Output::Generation(generation) => Ok(json!(generation.text)),
                        Output::Raw(body) => Ok(json!(String::from_utf8_lossy(&body.bytes))),
                        _ => Err(Error::Internal("unexpected answer".into())),
                    })
                    .collect::<Result<_>>()?
            }
        };
        Ok::<_, Error>(axum::Json(json!({"predictions": predictions})).into_response())
    }
    .await;
    let response = answer.unwrap_or_else(error_response);
    dispatch.record(response.status().as_u16());
    response
}

/// KServe v1 for an image classifier: each instance an image in base64 (a string, or an
/// object with it under `data` or `b64`, as TorchServe's KServe examples send it), answered
/// `{"predictions": [{label: probability, ...}, ...]}`, labels most likely first.
async fn v1_images(state: &AppState, dispatch: &Dispatch, instances: &[Value]) -> Result<Response> {
    if instances.is_empty() {
        return Err(bad("instances is empty"));
    }
    let images = instances
        .iter()
        .enumerate()
        .map(|(i, instance)| {
            let text = instance_string(instance, &["data", "b64", "image"]).ok_or_else(|| {
                bad(format!(
                    "instance {i} must be base64 text, or an object with it under data or b64"
                ))
            })?;
            crate::http::torchserve::predictions::base64_image(text, i)
        })
        .collect::<Result<Vec<_>>>()?;
    let Output::Labels(per_image) = dispatch.run(state, Request::Images(images)).await?.output
    else {
        return Err(Error::Internal(
            "an image model answered something else".into(),
        ));
    };
    let objects: Vec<String> = per_image
        .iter()
        .map(|labels| crate::http::torchserve::predictions::labels_json(labels))
        .collect();
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        format!("{{\"predictions\":[{}]}}", objects.join(",")),
    )
        .into_response())
}

/// A v1 instance's string: the instance itself, or the first of `keys` it holds.
fn instance_string<'a>(instance: &'a Value, keys: &[&str]) -> Option<&'a str> {
    match instance {
        Value::String(text) => Some(text.as_str()),
        Value::Object(fields) => keys.iter().find_map(|key| fields.get(*key)?.as_str()),
        _ => None,
    }
}

/// An instance's text: a string, or an object with it under `data`, `text` or `inputs`.
fn instance_text(instance: &Value) -> Result<String> {
    let text = instance_string(instance, &["data", "text", "inputs"]);
    text.map(str::to_string).ok_or_else(|| {
        bad("each instance must be a text, or an object with a text under data, text or inputs")
    })
}

/// The health routes, never guarded: probes carry no credentials.
pub fn health(state: AppState) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .with_state(state)
}

/// `{"error": "..."}` with the status the error's kind has everywhere.
fn error_response(error: Error) -> Response {
    let status = error.kind().status();
    (status, axum::Json(json!({"error": error.public_message()}))).into_response()
}

fn bad(message: impl Into<String>) -> Error {
    Error::BadRequest(message.into())
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "spillway",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

async fn live() -> Response {
    axum::Json(json!({"live": true})).into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.startup().health() == Health::Healthy;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({"ready": ready}))).into_response()
}

/// A tensor's name, datatype and shape (-1 for any size).
type TensorSpec = (&'static str, &'static str, Vec<i64>);

/// The tensors a handler takes and gives.
fn signature(kind: HandlerKind) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    match kind {
        HandlerKind::TextEmbedding => (
            vec![("text", "BYTES", vec![-1])],
            vec![("embedding", "FP32", vec![-1, -1])],
        ),
        HandlerKind::TextClassification => (
            vec![("text", "BYTES", vec![-1])],
            vec![("label", "BYTES", vec![-1]), ("score", "FP32", vec![-1])],
        ),
        // Each text's entities as one JSON string.
        HandlerKind::TokenClassification => (
            vec![("text", "BYTES", vec![-1])],
            vec![("entities", "BYTES", vec![-1])],
        ),
        HandlerKind::TextGeneration => (
            vec![("text_input", "BYTES", vec![1])],
            vec![("text_output", "BYTES", vec![1])],
        ),
        // Images in BYTES (base64 in JSON, raw in binary); each image's labels as one
        // JSON string, most likely first.
        HandlerKind::ImageClassifier => (
            vec![("data", "BYTES", vec![-1])],
            vec![("labels", "BYTES", vec![-1])],
        ),
        HandlerKind::Echo => (
            vec![("input", "BYTES", vec![-1])],
            vec![("output", "BYTES", vec![-1])],
        ),
    }
}

fn tensor_specs(specs: &[TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|(name, datatype, shape)| json!({"name": name, "datatype": datatype, "shape": shape}))
        .collect()
}

fn metadata(state: &AppState, name: &str, version: Option<&str>) -> Result<Value> {
    let model = state.registry().get(name, version)?;
    let versions: Vec<String> = state
        .registry()
        .versions(name)?
        .iter()
        .map(|m| m.spec.version.clone())
        .collect();
    let (inputs, outputs) = signature(model.spec.handler);
    Ok(json!({
        "name": model.spec.name,
        "versions": versions,
        "platform": format!("spillway_{}", model.spec.handler),
        "inputs": tensor_specs(&inputs),
        "outputs": tensor_specs(&outputs),
    }))
}

async fn metadata_default(State(state): State<AppState>, Path(model): Path<String>) -> Response {
    metadata(&state, &model, None).map_or_else(error_response, |v| axum::Json(v).into_response())
}

async fn metadata_version(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    metadata(&state, &model, Some(&version))
        .map_or_else(error_response, |v| axum::Json(v).into_response())
}

/// Ready: loaded, or evicted (it comes back on its next request); not while loading
/// or after a failed load.
fn model_ready(model: &ModelHandle) -> bool {
    model.is_ready() || model.is_unloaded()
}

fn ready_answer(state: &AppState, name: &str, version: Option<&str>) -> Response {
    match state.registry().get(name, version) {
        Ok(model) => {
            let ready = model_ready(&model);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, axum::Json(json!({"name": name, "ready": ready}))).into_response()
        }
        Err(e) => error_response(e),
    }
}

async fn ready_default(State(state): State<AppState>, Path(model): Path<String>) -> Response {
    ready_answer(&state, &model, None)
}

async fn ready_version(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    ready_answer(&state, &model, Some(&version))
}

// ---- infer ----

#[derive(Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

#[derive(Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

async fn infer_default(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    infer(state, &model, None, &headers, &body).await
}

async fn infer_version(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    infer(state, &model, Some(&version), &headers, &body).await
}

async fn infer(
    state: AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let dispatch = match Dispatch::to(&state, name, version) {
        Ok(dispatch) => dispatch,
        Err(e) => return error_response(e),
    };
    let answer = async {
        let (request, handler_request) = decode(dispatch.model.spec.handler, headers, body)?;
        let answered = dispatch.run(&state, handler_request).await?;
        let outputs = output_tensors(answered.output)?;
        Ok::<_, Error>(encode_response(&dispatch.model, &request, outputs))
    }
    .await;
    let response = answer.unwrap_or_else(error_response);
    dispatch.record(response.status().as_u16());
    response
}

/// What an inference request (JSON, or JSON and binary tensor data) makes for a model
/// served by `kind`, before the model is involved: the parsed request and the handler's,
/// or why the body is refused. What the fuzz targets and the corpus replay call.
pub fn decode(
    kind: HandlerKind,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(InferRequest, Request)> {
    let (request, binary) = parse_request(headers, body)?;
    let handler_request = handler_request(kind, &request, binary)?;
    Ok((request, handler_request))
}

/// The JSON part of the body, and the binary part after it (empty without one).
fn parse_request<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(InferRequest, &'a [u8])> {
    let header_length = match headers.get(BINARY_HEADER_LENGTH) {
        Some(value) => {
            let length: usize = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad("Inference-Header-Content-Length must be a number"))?;
            if length > body.len() {
                return Err(bad(format!(
                    "Inference-Header-Content-Length {length} is longer than the body ({} bytes)",
                    body.len()
                )));
            }
            length
        }
        None => body.len(),
    };
    let (json_part, binary) = body.split_at(header_length);
    let request: InferRequest = serde_json::from_slice(json_part)
        .map_err(|e| bad(format!("invalid inference request: {e}")))?;
    Ok((request, binary))
}

/// The strings of a BYTES input tensor, from its JSON `data` or its binary bytes.
fn input_strings(tensor: &InputTensor, binary: &mut &[u8]) -> Result<Vec<String>> {
    input_elements(tensor, binary)?
        .into_iter()
        .map(|element| match element {
            Element::Text(text) => Ok(text),
            Element::Bytes(bytes) => String::from_utf8(bytes).map_err(|_| {
                bad(format!(
                    "input {} holds bytes that are not UTF-8 text",
                    tensor.name
                ))
            }),
        })
        .collect()
}

/// One element of a BYTES tensor: text from JSON `data`, or bytes from the binary extension.
enum Element {
    Text(String),
    Bytes(Vec<u8>),
}

/// The images of a BYTES input: raw bytes from the binary extension, base64 from JSON.
fn input_images(tensor: &InputTensor, binary: &mut &[u8]) -> Result<Vec<Vec<u8>>> {
    input_elements(tensor, binary)?
        .into_iter()
        .enumerate()
        .map(|(i, element)| match element {
            Element::Text(text) => crate::http::torchserve::predictions::base64_image(&text, i),
            Element::Bytes(bytes) => Ok(bytes),
        })
        .collect()
}

fn input_elements(tensor: &InputTensor, binary: &mut &[u8]) -> Result<Vec<Element>> {
    if tensor.datatype != "BYTES" {
        return Err(bad(format!(
            "input {} must be BYTES (text), got {}",
            tensor.name, tensor.datatype
        )));
    }
    // A request's shape is concrete: -1 ("any size") belongs to metadata, not to inputs.
    let expected = tensor
        .shape
        .iter()
        .try_fold(1u64, |n, &d| {
            u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
        })
        .ok_or_else(|| {
            bad(format!(
                "input {} has shape {:?}: dimensions must be non-negative and their product \
                 must fit 64 bits",
                tensor.name, tensor.shape
            ))
        })?;
    let strings = if let Some(size) = tensor.parameters.get("binary_data_size") {
        let size = size
            .as_u64()
            .ok_or_else(|| bad("binary_data_size must be a number"))? as usize;
        if size > binary.len() {
            return Err(bad(format!(
                "input {}: binary data is shorter than its binary_data_size",
                tensor.name
            )));
        }
        let (mut data, rest) = binary.split_at(size);
        *binary = rest;
        let mut strings = Vec::new();
        while !data.is_empty() {
            if data.len() < 4 {
                return Err(bad(format!(
                    "input {}: a truncated BYTES element",
                    tensor.name
                )));
            }
            let (length, rest) = data.split_at(4);
            let length = u32::from_le_bytes([length[0], length[1], length[2], length[3]]) as usize;
            if length > rest.len() {
                return Err(bad(format!(
                    "input {}: a truncated BYTES element",
                    tensor.name
                )));
            }
            let (element, rest) = rest.split_at(length);
            strings.push(Element::Bytes(element.to_vec()));
            data = rest;
        }
        strings
    } else {
        let data = tensor
            .data
            .as_ref()
            .ok_or_else(|| bad(format!("input {} has no data", tensor.name)))?;
        flatten(data)
            .into_iter()
            .map(|v| {
                v.as_str()
                    .map(|s| Element::Text(s.to_string()))
                    .ok_or_else(|| {
                        bad(format!("input {}: BYTES data must be strings", tensor.name))
                    })
            })
            .collect::<Result<Vec<_>>>()?
    };
    if strings.len() as u64 != expected {
        return Err(bad(format!(
            "input {} has shape {:?} ({expected} elements) but {} elements of data",
            tensor.name,
            tensor.shape,
            strings.len()
        )));
    }
    Ok(strings)
}

/// Nested JSON arrays, flattened in row-major order.
fn flatten(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        other => vec![other],
    }
}

/// The handler's request from the one input tensor.
fn handler_request(kind: HandlerKind, request: &InferRequest, binary: &[u8]) -> Result<Request> {
    let [tensor] = request.inputs.as_slice() else {
        return Err(bad(format!(
            "this model takes one input tensor, got {}",
            request.inputs.len()
        )));
    };
    let mut binary = binary;
    if kind == HandlerKind::ImageClassifier {
        let images = input_images(tensor, &mut binary)?;
        if images.is_empty() {
            return Err(bad(format!("input {} is empty", tensor.name)));
        }
        return Ok(Request::Images(images));
    }
    let strings = input_strings(tensor, &mut binary)?;
    if strings.is_empty() {
        return Err(bad(format!("input {} is empty", tensor.name)));
    }
    match kind {
        HandlerKind::TextEmbedding
        | HandlerKind::TextClassification
        | HandlerKind::TokenClassification => Ok(Request::Texts(strings)),
        HandlerKind::TextGeneration => {
            let [prompt] = <[String; 1]>::try_from(strings)
                .map_err(|s| bad(format!("text_input takes one prompt, got {}", s.len())))?;
            let parameters = generation_parameters(&request.parameters)?;
            Ok(Request::Generate(GenerateRequest { prompt, parameters }))
        }
        HandlerKind::Echo => Ok(Request::Raw(RawBody {
            content_type: None,
            bytes: strings.concat().into_bytes(),
        })),
        HandlerKind::ImageClassifier => Err(Error::Internal(
            "an image input is read as images, not as text".into(),
        )),
    }
}

/// The request `parameters` a generation model reads: TGI's names (with its `grammar`
/// and OpenAI's penalties), and the binary extension's.
const GENERATION_PARAMETERS: [&str; 11] = [
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "grammar",
    "frequency_penalty",
    "presence_penalty",
    "binary_data_output",
];

/// TGI's generation parameters from the request's `parameters` (the binary
/// extension's are not the handler's); a key no one reads is refused by name.
fn generation_parameters(parameters: &Map<String, Value>) -> Result<GenerateParameters> {
    if let Some(unknown) = parameters
        .keys()
        .find(|k| !GENERATION_PARAMETERS.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown generation parameter {unknown:?} (known: {})",
            GENERATION_PARAMETERS.join(", ")
        )));
    }
    let penalty = |key: &str| -> Result<f32> {
        match parameters.get(key) {
            None => Ok(0.0),
            Some(v) => v
                .as_f64()
                .map(|p| p as f32)
                .ok_or_else(|| bad(format!("{key} must be a number"))),
        }
    };
    let defaults = GenerateParameters::default();
    let number = |key: &str| parameters.get(key).and_then(Value::as_f64);
    Ok(GenerateParameters {
        max_new_tokens: parameters
            .get("max_new_tokens")
            .and_then(Value::as_u64)
            .map_or(defaults.max_new_tokens, |n| n as usize),
        do_sample: parameters
            .get("do_sample")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        temperature: number("temperature"),
        top_p: number("top_p"),
        top_k: parameters
            .get("top_k")
            .and_then(Value::as_u64)
            .map(|k| k as usize),
        seed: parameters.get("seed").and_then(Value::as_u64),
        stop: match parameters.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("stop must hold strings"))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("stop must be a string or an array of strings")),
        },
        details: false,
        ignore_eos: false,
        logprobs: None,
        grammar: parameters
            .get("grammar")
            .map(crate::http::grammar::tgi)
            .transpose()?,
        logit_bias: Vec::new(),
        presence_penalty: penalty("presence_penalty")?,
        frequency_penalty: penalty("frequency_penalty")?,
        tools: Vec::new(),
    })
}

/// An output tensor: name, datatype, shape, and its data.
struct OutputTensor {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<usize>,
    data: TensorData,
}

enum TensorData {
    Floats(Vec<f32>),
    Strings(Vec<String>),
}

impl TensorData {
    fn to_json(&self) -> Value {
        match self {
            TensorData::Floats(values) => json!(values),
            TensorData::Strings(values) => json!(values),
        }
    }

    /// The binary tensor data extension's bytes.
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::Floats(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            TensorData::Strings(values) => values
                .iter()
                .flat_map(|s| {
                    let mut element = (s.len() as u32).to_le_bytes().to_vec();
                    element.extend_from_slice(s.as_bytes());
                    element
                })
                .collect(),
        }
    }
}

fn output_tensors(output: Output) -> Result<Vec<OutputTensor>> {
    Ok(match output {
        Output::Embeddings(vectors) => {
            let dim = vectors.first().map_or(0, Vec::len);
            vec![OutputTensor {
                name: "embedding",
                datatype: "FP32",
                shape: vec![vectors.len(), dim],
                data: TensorData::Floats(vectors.into_iter().flatten().collect()),
            }]
        }
        Output::Classifications(classes) => vec![
            OutputTensor {
                name: "label",
                datatype: "BYTES",
                shape: vec![classes.len()],
                data: TensorData::Strings(classes.iter().map(|c| c.label.clone()).collect()),
            },
            OutputTensor {
                name: "score",
                datatype: "FP32",
                shape: vec![classes.len()],
                data: TensorData::Floats(classes.iter().map(|c| c.score).collect()),
            },
        ],
        Output::Entities(per_text) => vec![OutputTensor {
            name: "entities",
            datatype: "BYTES",
            shape: vec![per_text.len()],
            data: TensorData::Strings(
                per_text
                    .iter()
                    .map(|entities| {
                        crate::http::torchserve::predictions::entities_json(entities).to_string()
                    })
                    .collect(),
            ),
        }],
        Output::Labels(per_image) => vec![OutputTensor {
            name: "labels",
            datatype: "BYTES",
            shape: vec![per_image.len()],
            data: TensorData::Strings(
                per_image
                    .iter()
                    .map(|labels| crate::http::torchserve::predictions::labels_json(labels))
                    .collect(),
            ),
        }],
        Output::Generation(generation) => vec![OutputTensor {
            name: "text_output",
            datatype: "BYTES",
            shape: vec![1],
            data: TensorData::Strings(vec![generation.text]),
        }],
        Output::Raw(body) => vec![OutputTensor {
            name: "output",
            datatype: "BYTES",
            shape: vec![1],
            data: TensorData::Strings(vec![
                String::from_utf8(body.bytes)
                    .map_err(|_| Error::Internal("the echoed bytes are not UTF-8 text".into()))?,
            ]),
        }],
    })
}

/// The response, with the requested outputs (all when none are named), each as JSON
/// data or binary as the request asked.
fn encode_response(
    model: &ModelHandle,
    request: &InferRequest,
    outputs: Vec<OutputTensor>,
) -> Response {
    let all_binary = request
        .parameters
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut described = Vec::new();
    let mut binary = Vec::new();
    for tensor in outputs {
        let asked = request.outputs.iter().find(|o| o.name == tensor.name);
        if !request.outputs.is_empty() && asked.is_none() {
            continue;
        }
        let as_binary = asked
            .and_then(|o| o.parameters.get("binary_data"))
            .and_then(Value::as_bool)
            .unwrap_or(all_binary);
        let mut entry = json!({
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        });
        if as_binary {
            let bytes = tensor.data.to_bytes();
            entry["parameters"] = json!({"binary_data_size": bytes.len()});
            binary.extend_from_slice(&bytes);
        } else {
            entry["data"] = tensor.data.to_json();
        }
        described.push(entry);
    }
    let mut body = json!({
        "model_name": model.spec.name,
        "model_version": model.spec.version,
        "outputs": described,
    });
    if let Some(id) = &request.id {
        body["id"] = json!(id);
    }
    let header = body.to_string().into_bytes();
    if binary.is_empty() {
        return ([(header::CONTENT_TYPE, "application/json")], header).into_response();
    }
    let header_length = header.len();
    let mut bytes = header;
    bytes.extend_from_slice(&binary);
    let mut response =
        ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response();
    response
        .headers_mut()
        .insert(BINARY_HEADER_LENGTH, HeaderValue::from(header_length));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_strings(strings: &[&str]) -> Vec<u8> {
        TensorData::Strings(strings.iter().map(|s| s.to_string()).collect()).to_bytes()
    }

    #[test]
    fn bytes_inputs_read_from_json_or_binary_and_shapes_must_agree() {
        let tensor = |shape: Vec<i64>, data: Option<Value>, size: Option<usize>| InputTensor {
            name: "text".into(),
            shape,
            datatype: "BYTES".into(),
            parameters: size
                .map(|s| {
                    json!({"binary_data_size": s})
                        .as_object()
                        .cloned()
                        .unwrap_or_default()
                })
                .unwrap_or_default(),
            data,
        };
        let mut none: &[u8] = &[];
        let from_json = input_strings(&tensor(vec![2], Some(json!(["a", "b"])), None), &mut none);
        assert_eq!(from_json.ok(), Some(vec!["a".to_string(), "b".to_string()]));
        let nested = input_strings(
            &tensor(vec![2, 1], Some(json!([["a"], ["b"]])), None),
            &mut none,
        );
        assert_eq!(nested.ok(), Some(vec!["a".to_string(), "b".to_string()]));
        let bytes = [binary_strings(&["héllo", ""]), b"tail".to_vec()].concat();
        let mut rest: &[u8] = &bytes;
        let from_binary = input_strings(&tensor(vec![2], None, Some(bytes.len() - 4)), &mut rest);
        assert_eq!(
            from_binary.ok(),
            Some(vec!["héllo".to_string(), String::new()])
        );
        assert_eq!(rest, b"tail", "the next tensor's bytes are left");
        for (shape, data, size, bytes) in [
            (vec![3], Some(json!(["a", "b"])), None, vec![]),
            (vec![1], Some(json!([1])), None, vec![]),
            (vec![1], None, None, vec![]),
            (vec![1], None, Some(9), binary_strings(&["a"])),
            (vec![1], None, Some(5), vec![9, 0, 0, 0, b'a']),
            (vec![-1], Some(json!(["a"])), None, vec![]),
            (vec![i64::MAX, 4], Some(json!(["a"])), None, vec![]),
        ] {
            let mut rest: &[u8] = &bytes;
            assert!(input_strings(&tensor(shape, data, size), &mut rest).is_err());
        }
    }

    #[test]
    fn binary_bytes_elements_are_length_prefixed_little_endian() {
        assert_eq!(binary_strings(&["ab"]), vec![2, 0, 0, 0, b'a', b'b']);
        assert_eq!(
            TensorData::Floats(vec![1.0]).to_bytes(),
            vec![0, 0, 0x80, 0x3f]
        );
    }
}
