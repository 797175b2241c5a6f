//! Chat: a conversation's messages, and the model's own chat template that turns them
//! into its prompt — the Jinja template in `tokenizer_config.json` (`chat_template`;
//! a GGUF's conversion writes it there too), rendered with minijinja as transformers'
//! `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! Python's string methods).

use serde::Serialize;

use crate::HandlerError;
use crate::generate::GenerateParameters;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A conversation to continue as the assistant, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub parameters: GenerateParameters,
}

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// The template in a `tokenizer_config.json`, if it has one: `chat_template` as a
    /// string, or the one named "default" in a list of named templates.
    pub fn from_tokenizer_config(config: &serde_json::Value) -> Result<Option<Self>, HandlerError> {
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(source)) => source.clone(),
            Some(serde_json::Value::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or_else(|| named.first());
                match default.and_then(|t| t["template"].as_str()) {
                    Some(source) => source.to_string(),
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
        env.add_template_owned(NAME, source).map_err(|e| {
            HandlerError::bad_file("tokenizer_config.json", format!("chat_template: {e}"))
        })?;
        Ok(Some(ChatTemplate {
            env,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        }))
    }

    /// The prompt for `messages`, ending with the assistant's turn begun when
    /// `add_generation_prompt`. A template that refuses the conversation (for
    /// instance roles out of order) is the client's error.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, HandlerError> {
        self.env
            .get_template(NAME)
            .and_then(|template| {
                template.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token,
                    eos_token => self.eos_token,
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
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
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
