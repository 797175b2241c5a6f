//! Tool calling for chat requests: the functions a request offers and how it lets the
//! model use them ([`ChatTools`]), how the model is told about them when its chat
//! template does not take a `tools` variable ([`fallback_instructions`]), the grammar
//! that makes a required call always parse ([`ChatTools::grammar`]), and the calls
//! read back out of the generated text ([`split_calls`]).
//!
//! A call is written as Hermes and Qwen 2.5 write it —
//! `<tool_call>{"name": "...", "arguments": {...}}</tool_call>`, one block per call —
//! or, as Llama 3.1 and Mistral answer, the whole answer a JSON object (or an array of
//! them) with `name` and `arguments` (or `parameters`). Only names the request offered
//! are calls; anything else stays text.

use serde_json::{Value, json};

use crate::generate::Grammar;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolFunction {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of its arguments (an object).
    pub parameters: Value,
}

/// Whether and which of the functions the model must call.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// It decides (calls are read from its answer if it makes any).
    Auto,
    /// It must call at least one (its answer is constrained to calls).
    Required,
    /// It must call this one.
    Function(String),
}

/// The tools of a chat request that offers any (OpenAI's `tool_choice: "none"` offers
/// none).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTools {
    pub functions: Vec<ToolFunction>,
    pub choice: ToolChoice,
    /// Whether one answer may make several calls.
    pub parallel: bool,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

impl ChatTools {
    /// The functions as chat templates take them (`tools`): OpenAI's tool objects.
    pub fn template_value(&self) -> Vec<Value> {
        self.functions
            .iter()
            .map(|f| {
                let mut function = json!({"name": f.name, "parameters": f.parameters});
                if let Some(description) = &f.description {
                    function["description"] = json!(description);
                }
                json!({"type": "function", "function": function})
            })
            .collect()
    }

    /// The grammar the answer must follow: calls only, to the named function or any
    /// offered one, arguments valid against their schema; none under `Auto`.
    pub fn grammar(&self) -> Option<Grammar> {
        let offered: Vec<&ToolFunction> = match &self.choice {
            ToolChoice::Auto => return None,
            ToolChoice::Required => self.functions.iter().collect(),
            ToolChoice::Function(name) => {
                self.functions.iter().filter(|f| &f.name == name).collect()
            }
        };
        let alternatives: Vec<Value> = offered
            .iter()
            .map(|f| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({
            "anyOf": alternatives,
            "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
        });
        let repeat = if self.parallel { "(\"\\n\" call)*" } else { "" };
        Some(Grammar::Lark(format!(
            "start: call {repeat}\ncall: {open} body {close}\nbody: %json {schema}\n",
            open = json!(OPEN),
            close = json!(CLOSE),
        )))
    }
}

/// What a model whose chat template takes no `tools` is told, as a system message
/// (before the request's own system message, if it has one).
pub fn fallback_instructions(tools: &ChatTools) -> String {
    let mut text = String::from(
        "You can call functions. To call one, answer with \
         <tool_call>{\"name\": \"<function name>\", \"arguments\": <its arguments as a JSON object>}</tool_call> \
         (one block per call) and nothing else. The functions:\n",
    );
    for tool in tools.template_value() {
        text.push_str(&tool["function"].to_string());
        text.push('\n');
    }
    text
}

/// A call as a template's transcript writes it back (for models without `tools`).
pub fn call_block(call: &ToolCall) -> String {
    let arguments: Value =
        serde_json::from_str(&call.arguments).unwrap_or(Value::String(call.arguments.clone()));
    format!(
        "{OPEN}{}{CLOSE}",
        json!({"name": call.name, "arguments": arguments})
    )
}

/// A fresh call id (`call_` and 24 hex digits, as OpenAI's are opaque).
fn call_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("call_{:08x}{:016x}", n as u32, nanos ^ n.rotate_left(32))
}

/// A call from a JSON object naming an offered function.
fn call_of(value: &Value, offered: &[ToolFunction]) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?;
    if !offered.iter().any(|f| f.name == name) {
        return None;
    }
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        Some(Value::String(text)) => {
            serde_json::from_str::<Value>(text).ok()?;
            text.clone()
        }
        Some(object @ Value::Object(_)) => object.to_string(),
        None => "{}".into(),
        Some(_) => return None,
    };
    Some(ToolCall {
        id: call_id(),
        name: name.to_string(),
        arguments,
    })
}

/// The answer's text and the calls it makes: `<tool_call>` blocks taken out of the
/// text, or an answer that is wholly a call's JSON. An answer with a block that is not
/// a call of an offered function is all text (no calls).
pub fn split_calls(text: &str, offered: &[ToolFunction]) -> (String, Vec<ToolCall>) {
    let whole = || (text.to_string(), Vec::new());
    if text.contains(OPEN) {
        let mut content = String::new();
        let mut calls = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find(OPEN) {
            content.push_str(&rest[..at]);
            let after = &rest[at + OPEN.len()..];
            let (body, next, closed) = match after.find(CLOSE) {
                Some(end) => (&after[..end], &after[end + CLOSE.len()..], true),
                None => (after, "", false),
            };
            let Some(call) = serde_json::from_str::<Value>(body.trim())
                .ok()
                .and_then(|v| call_of(&v, offered))
            else {
                if closed || calls.is_empty() {
                    return whole();
                }
                // A last call cut short (max_new_tokens) stays text; those before
                // it count.
                content.push_str(&rest[at..]);
                break;
            };
            calls.push(call);
            rest = next;
        }
        if !rest.contains(OPEN) {
            content.push_str(rest);
        }
        return (content.trim().to_string(), calls);
    }
    let trimmed = text.trim();
    let trimmed = trimmed
        .strip_prefix("[TOOL_CALLS]")
        .unwrap_or(trimmed)
        .trim();
    match serde_json::from_str::<Value>(trimmed) {
        Ok(object @ Value::Object(_)) => match call_of(&object, offered) {
            Some(call) => (String::new(), vec![call]),
            None => whole(),
        },
        Ok(Value::Array(items)) if !items.is_empty() => {
            match items
                .iter()
                .map(|v| call_of(v, offered))
                .collect::<Option<Vec<_>>>()
            {
                Some(calls) => (String::new(), calls),
                None => whole(),
            }
        }
        _ => whole(),
    }
}

/// How much of an unfinished answer's text can be streamed as text while calls may
/// still come: none once it starts like a call's JSON, else all but a `<tool_call>`
/// tag or its beginning.
pub fn streamable_len(text: &str) -> usize {
    let start = text.trim_start();
    if start.starts_with('{') || start.starts_with('[') {
        return 0;
    }
    if let Some(at) = text.find(OPEN) {
        return at;
    }
    // A tail that could be the tag's beginning waits.
    (1..OPEN.len())
        .rev()
        .find(|&n| text.ends_with(&OPEN[..n]))
        .map_or(text.len(), |n| text.len() - n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<ToolFunction> {
        vec![ToolFunction {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }]
    }

    #[test]
    fn calls_are_read_from_blocks_and_from_whole_json_answers() {
        let offered = weather();
        let (text, calls) = split_calls(
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}",
            &offered,
        );
        assert_eq!(text, "Let me look.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[1].arguments, r#"{"city":"Oslo"}"#);
        assert_ne!(calls[0].id, calls[1].id);
        let (text, calls) = split_calls(
            r#" {"name": "get_weather", "parameters": {"city": "Rome"}}"#,
            &offered,
        );
        assert!(text.is_empty());
        assert_eq!(calls[0].arguments, r#"{"city":"Rome"}"#);
        let (_, calls) = split_calls(
            r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": "{\"city\": \"Lima\"}"}]"#,
            &offered,
        );
        assert_eq!(calls[0].arguments, r#"{"city": "Lima"}"#);
    }

    #[test]
    fn a_last_call_cut_short_stays_text_and_the_whole_ones_count() {
        let (text, calls) = split_calls(
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>\n<tool_call>{\"name\": \"get_wea",
            &weather(),
        );
        assert_eq!(calls.len(), 1);
        assert_eq!(text, "<tool_call>{\"name\": \"get_wea");
    }

    #[test]
    fn text_that_is_not_a_call_of_an_offered_function_stays_text() {
        let offered = weather();
        for answer in [
            "Paris is sunny.",
            r#"{"name": "launch_rockets", "arguments": {}}"#,
            "<tool_call>{not json}</tool_call>",
            r#"{"city": "Paris"}"#,
        ] {
            assert_eq!(
                split_calls(answer, &offered),
                (answer.to_string(), vec![]),
                "{answer}"
            );
        }
    }

    #[test]
    fn streaming_holds_back_what_may_become_a_call() {
        assert_eq!(streamable_len("Hello there"), 11);
        assert_eq!(streamable_len("Hello <tool"), 6);
        assert_eq!(streamable_len("Hi <tool_call>{\"na"), 3);
        assert_eq!(streamable_len("  {\"name\""), 0);
        assert_eq!(streamable_len("a < b"), 5);
    }

    #[test]
    fn required_and_named_choices_have_a_grammar_auto_has_none() {
        let mut tools = ChatTools {
            functions: weather(),
            choice: ToolChoice::Auto,
            parallel: true,
        };
        assert_eq!(tools.grammar(), None);
        tools.choice = ToolChoice::Required;
        let Some(Grammar::Lark(lark)) = tools.grammar() else {
            panic!("a Lark grammar");
        };
        assert!(
            lark.contains("%json") && lark.contains("get_weather") && lark.contains("\"\\n\" call"),
            "{lark}"
        );
        assert!(fallback_instructions(&tools).contains("\"name\":\"get_weather\""));
    }
}
