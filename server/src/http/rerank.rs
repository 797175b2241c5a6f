//! The rerank APIs, on the inference address, answered by a `text_classification` model
//! that scores (query, passage) pairs — a cross-encoder (one logit, scored with a sigmoid):
//!
//! - `POST /rerank`, text-embeddings-inference's shape: `{"query", "texts", "raw_scores",
//!   "return_text", "truncate"}` → `[{"index", "score", "text"?}]`, best first. TEI
//!   serves one model; here `"model"` names it, and may be left out while exactly one
//!   text_classification model is registered.
//! - `POST /v1/rerank`, the shape vLLM, Jina and Cohere's clients send: `{"model", "query",
//!   "documents" (strings or `{"text"}`), "top_n", "return_documents"}` →
//!   `{"id", "model", "results": [{"index", "relevance_score", "document": {"text"}}],
//!   "usage": {"total_tokens"}}`, best first. Fields it does not serve (Cohere's
//!   `max_chunks_per_doc` and `max_tokens_per_doc`: inputs are truncated at the model's
//!   limit instead) are refused by name, never ignored.
//!
//! Both turn the request into one `Request::Pairs` through the model's queue, batching
//! and metrics, as `/predictions` does. Errors: TorchServe's shape on `/rerank`, OpenAI's
//! on `/v1/rerank` (as every `/v1/` answer).

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use spillway_handlers::{HandlerKind, Output, Request};

use crate::app::AppState;
use crate::error::{Error, Result};
use crate::http::dispatch::Dispatch;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/rerank", post(tei))
        .route("/v1/rerank", post(v1))
        .with_state(state)
}

fn bad(message: impl Into<String>) -> Error {
    Error::BadRequest(message.into())
}

/// text-embeddings-inference's `/rerank` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeiBody {
    model: Option<String>,
    query: String,
    texts: Vec<String>,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
    /// TEI truncates inputs past the model's limit when asked and refuses them otherwise;
    /// Spillway always truncates (longest first), so either value is served.
    #[serde(default)]
    #[allow(dead_code)]
    truncate: Option<bool>,
    truncation_direction: Option<String>,
}

/// A `/v1/rerank` document: a string, or `{"text": ...}` as Cohere's and Jina's
/// clients may send.
#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    fn text(self) -> String {
        match self {
            Document::Text(text) | Document::Object { text } => text,
        }
    }
}

/// The body vLLM's, Jina's and Cohere's rerank clients send.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1Body {
    model: Option<String>,
    query: String,
    documents: Vec<Document>,
    top_n: Option<usize>,
    return_documents: Option<bool>,
    /// Cohere's fields of structured documents to rank on: only `text` is read.
    rank_fields: Option<Vec<String>>,
}

/// One scored passage.
#[derive(Debug, Clone, PartialEq)]
struct Scored {
    index: usize,
    score: f32,
    logit: f32,
}

/// The model a rerank request names, or the only text_classification model.
fn reranker(state: &AppState, model: Option<&str>) -> Result<String> {
    if let Some(model) = model {
        return Ok(model.to_string());
    }
    let classifiers: Vec<String> = state
        .registry()
        .defaults()
        .into_iter()
        .filter(|m| m.spec.handler == HandlerKind::TextClassification)
        .map(|m| m.spec.name.clone())
        .collect();
    match classifiers.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(bad(
            "no text_classification model is registered to rerank with; register a cross-encoder",
        )),
        several => Err(bad(format!(
            "\"model\" is required when several text_classification models are registered ({})",
            several.join(", ")
        ))),
    }
}

/// Scores every (query, passage) pair through the model's queue, best first (ties keep
/// the passages' order). Returns the model's name and the tokens the pairs held.
async fn rank(
    state: &AppState,
    model: Option<&str>,
    query: String,
    passages: &[String],
) -> Result<(String, Vec<Scored>, usize)> {
    if query.is_empty() {
        return Err(bad("\"query\" must not be empty"));
    }
    if passages.is_empty() {
        return Err(bad("there are no passages to rerank"));
    }
    let name = reranker(state, model)?;
    let dispatch = Dispatch::to(state, &name, None)?;
    let answered = async {
        let handler = dispatch.model.spec.handler;
        if handler != HandlerKind::TextClassification {
            return Err(bad(format!(
                "model {name} is a {handler} model; reranking takes a text_classification model (a cross-encoder)"
            )));
        }
        let pairs = passages
            .iter()
            .map(|passage| (query.clone(), passage.clone()))
            .collect();
        dispatch.run(state, Request::Pairs(pairs)).await
    }
    .await;
    match &answered {
        Ok(_) => dispatch.record(200),
        Err(e) => dispatch.record(e.kind().status().as_u16()),
    }
    let answered = answered?;
    let Output::Classifications(classes) = answered.output else {
        return Err(Error::Internal(
            "a classifier answered something else".into(),
        ));
    };
    let mut scored: Vec<Scored> = classes
        .iter()
        .enumerate()
        .map(|(index, class)| Scored {
            index,
            score: class.score,
            logit: class.logit,
        })
        .collect();
    scored.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    Ok((name, scored, answered.input_tokens))
}

async fn tei(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let answer = async {
        let body: TeiBody = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("invalid rerank request: {e}")))?;
        if let Some(direction) = body.truncation_direction.as_deref()
            && !direction.eq_ignore_ascii_case("right")
        {
            return Err(bad(format!(
                "truncation_direction {direction:?}: inputs are truncated on the right"
            )));
        }
        let (_, scored, _) = rank(&state, body.model.as_deref(), body.query, &body.texts).await?;
        let results: Vec<Value> = scored
            .iter()
            .map(|s| {
                let mut result = json!({
                    "index": s.index,
                    "score": if body.raw_scores { s.logit } else { s.score },
                });
                if body.return_text {
                    result["text"] = json!(body.texts[s.index]);
                }
                result
            })
            .collect();
        Ok(axum::Json(Value::Array(results)).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

async fn v1(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let answer = async {
        let body: V1Body = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("invalid rerank request: {e}")))?;
        if body.top_n == Some(0) {
            return Err(bad("top_n must be at least 1"));
        }
        if let Some(fields) = body.rank_fields.as_deref()
            && fields != ["text"]
        {
            return Err(bad(format!(
                "rank_fields {fields:?}: documents are ranked on their text only"
            )));
        }
        let documents: Vec<String> = body.documents.into_iter().map(Document::text).collect();
        let (model, scored, tokens) =
            rank(&state, body.model.as_deref(), body.query, &documents).await?;
        let keep = body.top_n.unwrap_or(scored.len()).min(scored.len());
        let with_documents = body.return_documents.unwrap_or(true);
        let results: Vec<Value> = scored[..keep]
            .iter()
            .map(|s| {
                let mut result = json!({"index": s.index, "relevance_score": s.score});
                if with_documents {
                    result["document"] = json!({"text": documents[s.index]});
                }
                result
            })
            .collect();
        Ok(axum::Json(json!({
            "id": format!("rerank-{}", crate::telemetry::request_id::RequestId::new().as_str()),
            "model": model,
            "results": results,
            "usage": {"total_tokens": tokens},
        }))
        .into_response())
    };
    answer.await.unwrap_or_else(|error| {
        let status = error.kind().status();
        (status, axum::Json(crate::http::openai::error_body(&error))).into_response()
    })
}
