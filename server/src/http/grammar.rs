//! The request fields that ask for constrained decoding, as each protocol spells them,
//! read into the handler's [`Grammar`]: TGI's `grammar` object (on `/predictions` and
//! KServe v2's parameters), OpenAI's `response_format`, and vLLM's `guided_*` fields
//! (on the OpenAI endpoints). A request may ask in one way only.

use serde_json::Value;
use spillway_handlers::Grammar;

use crate::error::{Error, Result};

fn bad(message: impl Into<String>) -> Error {
    Error::BadRequest(message.into())
}

/// A JSON schema given as an object, or as a string holding one.
fn schema(value: &Value, field: &str) -> Result<Value> {
    match value {
        Value::Object(_) | Value::Bool(_) => Ok(value.clone()),
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| bad(format!("{field} is not a JSON schema: {e}"))),
        _ => Err(bad(format!("{field} must be a JSON schema (an object)"))),
    }
}

fn text(value: &Value, field: &str) -> Result<String> {
    value
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(format!("{field} must be a string")))
}

/// TGI's `grammar`: `{"type": "json", "value": schema}`, `{"type": "regex", "value":
/// "..."}`, and (this server's additions) `json_object`, `lark` and `choice`.
pub fn tgi(grammar: &Value) -> Result<Grammar> {
    let kind = grammar
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("grammar needs a \"type\": json, regex, json_object, lark or choice"))?;
    let value = grammar.get("value").unwrap_or(&Value::Null);
    if let Some(other) = grammar
        .as_object()
        .and_then(|o| o.keys().find(|k| !["type", "value"].contains(&k.as_str())))
    {
        return Err(bad(format!("grammar has an unknown field {other:?}")));
    }
    match kind {
        "json" | "json_schema" => Ok(Grammar::JsonSchema(schema(value, "grammar.value")?)),
        "json_object" => Ok(Grammar::JsonObject),
        "regex" => Ok(Grammar::Regex(text(value, "grammar.value")?)),
        "lark" => Ok(Grammar::Lark(text(value, "grammar.value")?)),
        "choice" => choices(value, "grammar.value"),
        other => Err(bad(format!(
            "grammar type {other:?} is not one of json, regex, json_object, lark, choice"
        ))),
    }
}

fn choices(value: &Value, field: &str) -> Result<Grammar> {
    let list = value
        .as_array()
        .ok_or_else(|| bad(format!("{field} must be an array of strings")))?;
    let choices = list
        .iter()
        .map(|c| text(c, field))
        .collect::<Result<Vec<_>>>()?;
    if choices.is_empty() {
        return Err(bad(format!("{field} needs at least one choice")));
    }
    Ok(Grammar::Choice(choices))
}

/// OpenAI's `response_format`: `{"type": "text"}` (no grammar), `{"type":
/// "json_object"}`, or `{"type": "json_schema", "json_schema": {"name", "schema",
/// "strict", "description"}}`. Strict or not, the schema is enforced.
pub fn response_format(format: &Value) -> Result<Option<Grammar>> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let spec = format
                .get("json_schema")
                .ok_or_else(|| bad("response_format json_schema needs a \"json_schema\" object"))?;
            if spec.get("name").and_then(Value::as_str).is_none() {
                return Err(bad("response_format.json_schema needs a \"name\""));
            }
            match spec.get("schema") {
                Some(s) => Ok(Some(Grammar::JsonSchema(schema(
                    s,
                    "response_format.json_schema.schema",
                )?))),
                // OpenAI's default: any JSON object.
                None => Ok(Some(Grammar::JsonObject)),
            }
        }
        Some(other) => Err(bad(format!(
            "response_format type {other:?} is not one of text, json_object, json_schema"
        ))),
        None => Err(bad("response_format needs a \"type\"")),
    }
}

/// vLLM's `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar` (a Lark
/// grammar here): at most one of them.
pub fn guided(fields: &serde_json::Map<String, Value>) -> Result<Option<Grammar>> {
    let mut found = Vec::new();
    for (key, value) in fields {
        let grammar = match key.as_str() {
            "guided_json" => Grammar::JsonSchema(schema(value, key)?),
            "guided_regex" => Grammar::Regex(text(value, key)?),
            "guided_choice" => choices(value, key)?,
            "guided_grammar" => Grammar::Lark(text(value, key)?),
            _ => continue,
        };
        found.push((key.clone(), grammar));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(_, g)| g)),
        _ => Err(bad(format!(
            "ask for one grammar at a time, got {}",
            found
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_protocols_spelling_reads_into_the_same_grammar() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let want = Grammar::JsonSchema(schema.clone());
        assert_eq!(
            tgi(&json!({"type": "json", "value": schema})).ok(),
            Some(want.clone())
        );
        assert_eq!(
            tgi(&json!({"type": "json", "value": schema.to_string()})).ok(),
            Some(want.clone()),
            "a schema may come as a string"
        );
        assert_eq!(
            response_format(&json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}})).ok(),
            Some(Some(want.clone()))
        );
        let fields = json!({"guided_json": schema, "model": "m"});
        assert_eq!(
            guided(fields.as_object().expect("object")).ok(),
            Some(Some(want))
        );
        assert_eq!(response_format(&json!({"type": "text"})).ok(), Some(None));
        assert_eq!(
            response_format(&json!({"type": "json_object"})).ok(),
            Some(Some(Grammar::JsonObject))
        );
        assert_eq!(
            tgi(&json!({"type": "regex", "value": "[0-9]+"})).ok(),
            Some(Grammar::Regex("[0-9]+".into()))
        );
        let choice = json!({"guided_choice": ["yes", "no"]});
        assert_eq!(
            guided(choice.as_object().expect("object")).ok(),
            Some(Some(Grammar::Choice(vec!["yes".into(), "no".into()])))
        );
    }

    #[test]
    fn malformed_or_doubled_requests_are_refused_naming_the_field() {
        let refused = |r: Result<Option<Grammar>>, names: &str| match r {
            Err(Error::BadRequest(m)) => assert!(m.contains(names), "{m}"),
            other => panic!("{other:?}"),
        };
        refused(tgi(&json!({"type": "yaml", "value": ""})).map(Some), "yaml");
        refused(
            tgi(&json!({"type": "regex", "value": 3})).map(Some),
            "grammar.value",
        );
        refused(
            tgi(&json!({"type": "regex", "value": "a", "flags": 1})).map(Some),
            "flags",
        );
        refused(response_format(&json!({"type": "xml"})), "xml");
        refused(
            response_format(&json!({"type": "json_schema", "json_schema": {"schema": {}}})),
            "name",
        );
        refused(
            response_format(
                &json!({"type": "json_schema", "json_schema": {"name": "x", "schema": "{not json"}}),
            ),
            "schema",
        );
        let two = json!({"guided_json": {}, "guided_regex": "a"});
        refused(guided(two.as_object().expect("object")), "one grammar");
        let empty = json!({"guided_choice": []});
        refused(guided(empty.as_object().expect("object")), "at least one");
    }
}
