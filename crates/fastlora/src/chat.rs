//! Chat templates: the Jinja `chat_template` of a Hugging Face tokenizer, rendered as
//! transformers' `apply_chat_template` renders it.
//!
//! transformers compiles the template in a sandboxed Jinja2 environment with
//! `trim_blocks=True, lstrip_blocks=True` and the loop-controls extension, adds the global
//! `raise_exception(message)` and a `tojson` filter that writes Python's `json.dumps` form, and
//! renders it with `messages`, `add_generation_prompt` and the special tokens (`bos_token`,
//! `eos_token`). [`ChatTemplate`] sets up minijinja the same way; Python string methods
//! (`.strip()`, `.startswith()`, `.split()`...) come from minijinja-contrib's pycompat.
//!
//! Not provided: `strftime_now` (templates such as Llama 3.1's then fall back to their fixed
//! date, which keeps training data reproducible), `tools`, `documents`, and message fields other
//! than `role` and `content`.

use std::fmt;
use std::str::FromStr;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::data::DataError;

/// The name the template is compiled under; it appears in render errors (`chat_template:3`).
const TEMPLATE_NAME: &str = "chat_template";

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions framing the conversation.
    System,
    /// The human side.
    User,
    /// The model's side: the turns a completion-only loss trains on.
    Assistant,
    /// The result of a tool call.
    Tool,
}

impl Role {
    /// Every role, in the order error messages list them.
    pub const ALL: [Role; 4] = [Role::System, Role::User, Role::Assistant, Role::Tool];

    /// The role's name as chat templates see it (`"user"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = DataError;

    /// Parses a role name exactly as written in chat data (lower case).
    ///
    /// # Errors
    ///
    /// [`DataError::UnknownRole`] naming the role, whose message lists the accepted ones.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == name)
            .ok_or_else(|| DataError::UnknownRole {
                role: name.to_string(),
            })
    }
}

/// One turn of a conversation, as chat templates receive it: `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` saying `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    environment: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles Jinja `template` (a tokenizer's `chat_template`); `bos_token` and `eos_token`
    /// are the tokenizer's, passed to the template as the variables of the same names (left
    /// undefined when `None`, as transformers does for unset special tokens).
    ///
    /// # Errors
    ///
    /// [`DataError::Template`] if the template has a syntax error.
    pub fn new(
        template: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, DataError> {
        let mut environment = Environment::new();
        // As transformers' `_compile_jinja_template`: HF templates are written for these.
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function("raise_exception", raise_exception);
        environment.add_filter("tojson", python_tojson);
        environment
            .add_template_owned(TEMPLATE_NAME, template.to_string())
            .map_err(template_error)?;
        Ok(Self {
            environment,
            bos_token,
            eos_token,
        })
    }

    /// The tokenizer's chat template with its BOS and EOS tokens, or `None` if the tokenizer
    /// has no chat template.
    ///
    /// # Errors
    ///
    /// [`DataError::Template`] if the template has a syntax error.
    pub fn from_tokenizer(
        tokenizer: &fastlora_llama::LlamaTokenizer,
    ) -> Result<Option<Self>, DataError> {
        tokenizer
            .chat_template()
            .map(|template| {
                Self::new(
                    template,
                    tokenizer.bos_token().map(str::to_string),
                    tokenizer.eos_token().map(str::to_string),
                )
            })
            .transpose()
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with the header of an
    /// assistant turn, ready for the model to write the reply.
    ///
    /// # Errors
    ///
    /// [`DataError::Template`] if rendering fails, including the template's own
    /// `raise_exception(...)` (e.g. "Conversation roles must alternate"), whose message is kept.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let template = self
            .environment
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let mut context = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        if let Some(bos) = &self.bos_token {
            context.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            context.push(("eos_token", Value::from(eos.as_str())));
        }
        let context: Value = context.into_iter().collect();
        template.render(context).map_err(template_error)
    }
}

/// `raise_exception(message)`, which HF templates call to reject a conversation.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, whose
/// separators are `", "` and `": "` (minijinja's own filter writes compact, HTML-escaped JSON).
fn python_tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(width) => {
            let indent = vec![b' '; width];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&indent);
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonFormatter,
        )),
    };
    written.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON")
            .with_source(e)
    })?;
    // serde_json writes valid UTF-8.
    let json = String::from_utf8_lossy(&out).into_owned();
    Ok(Value::from_safe_string(json))
}

/// Compact JSON with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// A minijinja error as [`DataError::Template`], with its detail and template line.
fn template_error(error: minijinja::Error) -> DataError {
    DataError::Template {
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
             message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}\
             {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            None,
            None,
        )
        .unwrap()
    }

    #[test]
    fn renders_with_and_without_generation_prompt() {
        let messages = [ChatMessage::user("Hi")];
        let template = chatml();
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn roles_parse_and_unknown_ones_are_listed() {
        assert_eq!("assistant".parse::<Role>().unwrap(), Role::Assistant);
        let error = "human".parse::<Role>().unwrap_err();
        let message = error.to_string();
        assert!(message.contains("\"human\""), "{message}");
        assert!(
            message.contains("system, user, assistant, tool"),
            "{message}"
        );
    }

    #[test]
    fn special_tokens_are_variables_and_unset_ones_undefined() {
        let source =
            "{{ bos_token }}|{% if eos_token is defined %}{{ eos_token }}{% else %}none{% endif %}";
        let template = ChatTemplate::new(source, Some("<s>".into()), None).unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "<s>|none");
    }

    #[test]
    fn trim_and_lstrip_blocks_are_on_as_in_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(
            template
                .render(&[ChatMessage::user("a"), ChatMessage::user("b")], false)
                .unwrap(),
            "U:a\nU:b\n"
        );
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let source = "{% for m in messages %}{% if m.content.startswith('stop') %}{% break %}{% endif %}\
                      [{{ m.content.strip().upper() }}]{% endfor %}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        let messages = [
            ChatMessage::user("  one "),
            ChatMessage::assistant("two"),
            ChatMessage::user("stop here"),
            ChatMessage::user("three"),
        ];
        assert_eq!(template.render(&messages, false).unwrap(), "[ONE][TWO]");
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        let error = template
            .render(&[ChatMessage::assistant("hi")], false)
            .unwrap_err();
        assert!(matches!(error, DataError::Template { .. }));
        assert!(
            error
                .to_string()
                .contains("Conversation must start with a user message"),
            "{error}"
        );
    }

    #[test]
    fn tojson_writes_python_json() {
        let source = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(
            template.render(&[ChatMessage::user("<ü>")], false).unwrap(),
            "{\"role\": \"user\", \"content\": \"<ü>\"}|{\n  \"role\": \"user\",\n  \"content\": \"<ü>\"\n}"
        );
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        let error = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(error, DataError::Template { .. }), "{error:?}");
        assert!(error.to_string().contains("chat template"), "{error}");
    }
}
