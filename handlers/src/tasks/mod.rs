//! The built-in handlers, one per task, and [`load`], which builds one by kind.
//!
//! - [`text_embedding`]: BERT sentence embeddings with sentence-transformers pooling.
//! - [`text_classification`]: `BertForSequenceClassification`, labels from `id2label`.
//! - [`text_generation`]: Llama-family generation (greedy or seeded sampling, stop
//!   sequences) behind a token iterator.
//! - [`bert_text`]: tokenization and batching shared by the BERT text handlers.
//! - [`echo`]: returns its input unchanged; measures the server itself.

pub mod bert_text;
pub mod echo;
pub mod text_classification;
pub mod text_embedding;
pub mod text_generation;

use std::sync::Arc;

use crate::handler::{Handler, HandlerKind, LoadOptions, RawBody};
use crate::{HandlerError, ModelFiles};
use echo::Echo;
use text_embedding::TextEmbedding;

/// Builds the handler `kind` from the model's files.
pub fn load(
    kind: HandlerKind,
    files: &dyn ModelFiles,
    options: &LoadOptions,
) -> Result<Arc<dyn Handler>, HandlerError> {
    Ok(match kind {
        HandlerKind::TextEmbedding => Arc::new(TextEmbedding::load(files, options)?),
        HandlerKind::TextClassification => Arc::new(text_classification::TextClassification::load(
            files, options,
        )?),
        HandlerKind::TextGeneration => {
            Arc::new(text_generation::TextGeneration::load(files, options)?)
        }
        HandlerKind::Echo => Arc::new(Echo),
    })
}

/// Decodes the text inputs of a request body: `{"inputs": "text"}`, `{"inputs": ["a", "b"]}`,
/// a bare JSON string or array of strings, or a text/plain body.
pub fn decode_texts(body: &RawBody) -> Result<Vec<String>, HandlerError> {
    let is_json = body
        .content_type
        .as_deref()
        .map(|ct| ct.starts_with("application/json"))
        .unwrap_or_else(|| {
            body.bytes
                .first()
                .is_some_and(|b| matches!(b, b'{' | b'[' | b'"'))
        });
    let texts = if is_json {
        let value: serde_json::Value = serde_json::from_slice(&body.bytes)
            .map_err(|e| HandlerError::Input(format!("malformed JSON body: {e}")))?;
        texts_from_json(value)?
    } else {
        let text = String::from_utf8(body.bytes.clone())
            .map_err(|_| HandlerError::Input("the request body is not valid UTF-8 text".into()))?;
        vec![text]
    };
    if texts.is_empty() || (texts.len() == 1 && texts[0].trim().is_empty()) {
        return Err(HandlerError::Input("the request has no input text".into()));
    }
    Ok(texts)
}

fn texts_from_json(value: serde_json::Value) -> Result<Vec<String>, HandlerError> {
    use serde_json::Value;
    let inputs = match value {
        Value::Object(mut map) => map
            .remove("inputs")
            .or_else(|| map.remove("data"))
            .or_else(|| map.remove("body"))
            .ok_or_else(|| {
                HandlerError::Input("expected a JSON object with an \"inputs\" field".into())
            })?,
        other => other,
    };
    match inputs {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(HandlerError::Input(format!(
                    "\"inputs\" must hold strings, found {}",
                    json_kind(&other)
                ))),
            })
            .collect(),
        other => Err(HandlerError::Input(format!(
            "\"inputs\" must be a string or an array of strings, found {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
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
    fn decodes_the_accepted_text_shapes() {
        assert_eq!(
            decode_texts(&json(r#"{"inputs": "hi"}"#)).ok(),
            Some(vec!["hi".to_string()])
        );
        assert_eq!(
            decode_texts(&json(r#"{"inputs": ["a", "b"]}"#)).ok(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            decode_texts(&json(r#"["x"]"#)).ok(),
            Some(vec!["x".to_string()])
        );
        let plain = RawBody {
            content_type: Some("text/plain".into()),
            bytes: b"{not json".to_vec(),
        };
        assert_eq!(
            decode_texts(&plain).ok(),
            Some(vec!["{not json".to_string()])
        );
        let sniffed = RawBody {
            content_type: None,
            bytes: br#"{"inputs": "y"}"#.to_vec(),
        };
        assert_eq!(decode_texts(&sniffed).ok(), Some(vec!["y".to_string()]));
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
            let err = decode_texts(&json(body)).expect_err(body);
            assert!(err.is_client_error(), "{body}: {err}");
        }
    }
}
