//! Chat: a conversation's messages, and the model's own chat template that turns them
//! into its prompt — the Jinja template in `tokenizer_config.json` (`chat_template`;
//! a GGUF's conversion writes it there too), rendered with minijinja as transformers'
//! `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! Python's string methods).

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::HandlerError;
use crate::generate::GenerateParameters;
use crate::tools::{ChatTools, ToolCall};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant message made.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
    /// The speaker's name (a tool message's function), if given.
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message of `role` saying `content`, with no tool calls.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// As transformers hands messages to a template: tool calls as `{"id", "type":
/// "function", "function": {"name", "arguments"}}` with the arguments a JSON object.
impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("role", &self.role)?;
        map.serialize_entry("content", &self.content)?;
        if !self.tool_calls.is_empty() {
            let calls: Vec<serde_json::Value> = self
                .tool_calls
                .iter()
                .map(|call| {
                    let arguments: serde_json::Value = serde_json::from_str(&call.arguments)
                        .unwrap_or_else(|_| serde_json::Value::String(call.arguments.clone()));
                    serde_json::json!({
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": arguments},
                    })
                })
                .collect();
            map.serialize_entry("tool_calls", &calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            map.serialize_entry("tool_call_id", id)?;
        }
        if let Some(name) = &self.name {
            map.serialize_entry("name", name)?;
        }
        map.end()
    }
}

/// A conversation to continue as the assistant, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub parameters: GenerateParameters,
    /// The functions it offers the model, if any.
    pub tools: Option<ChatTools>,
}

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template reads `tools` (else tools are described in a system
    /// message, [`crate::tools::fallback_instructions`]).
    takes_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";
const TOOL_USE: &str = "tool_use";

impl ChatTemplate {
    /// The template in a `tokenizer_config.json`, if it has one: `chat_template` as a
    /// string, or the one named "default" in a list of named templates.
    pub fn from_tokenizer_config(config: &serde_json::Value) -> Result<Option<Self>, HandlerError> {
        let (source, tool_source) = match config.get("chat_template") {
            Some(serde_json::Value::String(source)) => (source.clone(), None),
            Some(serde_json::Value::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or_else(|| named.first());
                let tool_use = named
                    .iter()
                    .find(|t| t["name"] == "tool_use")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string);
                match default.and_then(|t| t["template"].as_str()) {
                    Some(source) => (source.to_string(), tool_use),
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        // A special token is a string, or an object with its `content`.
        let token = |key: &str| -> String {
            match config.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other["content"].as_str().unwrap_or_default().to_string(),
                None => String::new(),
            }
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let takes_tools = tool_source.is_some() || source.contains("tools");
        env.add_template_owned(NAME, source).map_err(|e| {
            HandlerError::bad_file("tokenizer_config.json", format!("chat_template: {e}"))
        })?;
        if let Some(tool_source) = tool_source {
            env.add_template_owned(TOOL_USE, tool_source).map_err(|e| {
                HandlerError::bad_file(
                    "tokenizer_config.json",
                    format!("chat_template tool_use: {e}"),
                )
            })?;
        }
        Ok(Some(ChatTemplate {
            env,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            takes_tools,
        }))
    }

    /// The prompt for a conversation that may offer `tools` and hold tool calls and
    /// their results: through the template's own `tools` (its `tool_use` template when
    /// it has one), or, for a template without, with the tools described in a system
    /// message, calls written as `<tool_call>` blocks and results as user messages in
    /// `<tool_response>` tags.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&ChatTools>,
    ) -> Result<String, HandlerError> {
        let name = if tools.is_some() && self.env.get_template(TOOL_USE).is_ok() {
            TOOL_USE
        } else {
            NAME
        };
        if self.takes_tools {
            let tools = tools.map(ChatTools::template_value);
            return self.render_named(name, messages, true, tools);
        }
        let mut transcript: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
        if let Some(tools) = tools {
            let instructions = crate::tools::fallback_instructions(tools);
            match messages.first() {
                Some(first) if first.role == "system" => {}
                _ => transcript.push(ChatMessage::new("system", instructions.trim_end())),
            }
            for message in messages {
                if message.role == "system" && transcript.is_empty() {
                    transcript.push(ChatMessage::new(
                        "system",
                        format!("{}\n\n{instructions}", message.content).trim_end(),
                    ));
                } else {
                    transcript.push(message.clone());
                }
            }
        } else {
            transcript.extend(messages.iter().cloned());
        }
        let transcript: Vec<ChatMessage> = transcript
            .into_iter()
            .map(|message| match message.role.as_str() {
                "tool" => ChatMessage::new(
                    "user",
                    format!("<tool_response>\n{}\n</tool_response>", message.content),
                ),
                _ if !message.tool_calls.is_empty() => {
                    let blocks: Vec<String> = message
                        .tool_calls
                        .iter()
                        .map(crate::tools::call_block)
                        .collect();
                    let content = [message.content.as_str(), &blocks.join("\n")]
                        .iter()
                        .filter(|s| !s.is_empty())
                        .copied()
                        .collect::<Vec<_>>()
                        .join("\n");
                    ChatMessage::new(message.role, content)
                }
                _ => message,
            })
            .collect();
        self.render_named(NAME, &transcript, true, None)
    }

    /// The prompt for `messages`, ending with the assistant's turn begun when
    /// `add_generation_prompt`. A template that refuses the conversation (for
    /// instance roles out of order) is the client's error.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, HandlerError> {
        self.render_named(NAME, messages, add_generation_prompt, None)
    }

    fn render_named(
        &self,
        name: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<Vec<serde_json::Value>>,
    ) -> Result<String, HandlerError> {
        self.env
            .get_template(name)
            .and_then(|template| {
                template.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token,
                    eos_token => self.eos_token,
                    tools => tools,
                })
            })
            .map_err(|e| {
                HandlerError::Input(format!(
                    "the model's chat template refused the messages: {e}"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    #[test]
    fn renders_a_chatml_template_with_a_default_system_message() {
        // SmolLM2's template, as its GGUF carries it.
        let source = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let config = serde_json::json!({ "chat_template": source });
        let template = ChatTemplate::from_tokenizer_config(&config)
            .expect("parses")
            .expect("present");
        let prompt = template
            .render(&[message("user", "Hi?")], true)
            .expect("renders");
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = template
            .render(
                &[message("system", "Be brief"), message("user", "Hi?")],
                false,
            )
            .expect("renders");
        assert_eq!(
            with_system,
            "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        );
    }

    fn weather_tools() -> ChatTools {
        ChatTools {
            functions: vec![crate::tools::ToolFunction {
                name: "get_weather".into(),
                description: None,
                parameters: serde_json::json!({"type": "object"}),
            }],
            choice: crate::tools::ToolChoice::Auto,
            parallel: false,
        }
    }

    fn template_of(source: &str) -> ChatTemplate {
        ChatTemplate::from_tokenizer_config(&serde_json::json!({"chat_template": source}))
            .expect("parses")
            .expect("present")
    }

    fn a_tool_conversation() -> Vec<ChatMessage> {
        let mut asked = message("assistant", "");
        asked.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        }];
        let mut answer = message("tool", "sunny");
        answer.tool_call_id = Some("call_1".into());
        vec![message("user", "Weather in Paris?"), asked, answer]
    }

    #[test]
    fn a_template_that_takes_tools_gets_them_and_the_calls_as_transformers_passes_them() {
        let source = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}<{{ m.role }}>{% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{% endif %}{{ m.content }}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}{% endfor %}";
        let template = template_of(source);
        let prompt = template
            .render_with_tools(&a_tool_conversation(), Some(&weather_tools()))
            .expect("renders");
        assert_eq!(
            prompt,
            "[get_weather]<user>Weather in Paris?<assistant>get_weather(Paris)<tool>sunny#call_1"
        );
    }

    #[test]
    fn a_template_without_tools_gets_them_described_and_the_calls_written_as_blocks() {
        let source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}";
        let template = template_of(source);
        let prompt = template
            .render_with_tools(&a_tool_conversation(), Some(&weather_tools()))
            .expect("renders");
        assert!(
            prompt.starts_with("<system>You can call functions."),
            "{prompt}"
        );
        assert!(prompt.contains("{\"name\":\"get_weather\""), "{prompt}");
        assert!(
            prompt.contains("<assistant><tool_call>{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}</tool_call>\n"),
            "{prompt}"
        );
        assert!(
            prompt.ends_with("<user><tool_response>\nsunny\n</tool_response>\n"),
            "{prompt}"
        );
        let mut with_system = a_tool_conversation();
        with_system.insert(0, message("system", "Be brief."));
        let prompt = template
            .render_with_tools(&with_system, Some(&weather_tools()))
            .expect("renders");
        assert!(
            prompt.starts_with("<system>Be brief.\n\nYou can call functions."),
            "{prompt}"
        );
        assert_eq!(prompt.matches("<system>").count(), 1, "{prompt}");
    }

    #[test]
    fn special_tokens_python_methods_and_refusals_work_as_in_transformers() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n  {% if m['content'] %}{{ m['content'].strip() | upper }}{% endif %}{% endfor %}";
        let config = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}],
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
        });
        let template = ChatTemplate::from_tokenizer_config(&config)
            .expect("parses")
            .expect("present");
        assert_eq!(
            template
                .render(&[message("user", "  hi ")], true)
                .expect("renders"),
            "<s>HI",
            "bos_token from an object, .strip() from Python, lstrip/trim_blocks"
        );
        let refused = template
            .render(&[message("tool", "x")], true)
            .expect_err("raise_exception refuses");
        assert!(
            matches!(refused, HandlerError::Input(ref m) if m.contains("no tools")),
            "{refused:?}"
        );
        assert!(
            ChatTemplate::from_tokenizer_config(&serde_json::json!({}))
                .expect("no template is fine")
                .is_none()
        );
    }
}
