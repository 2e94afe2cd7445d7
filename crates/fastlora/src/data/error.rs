//! The error type of the data pipeline: every failure names the file and line at fault.

use std::fmt;
use std::path::PathBuf;

use fastlora_llama::ModelError;

use crate::chat::Role;

/// Where a record sits in its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of a JSON Lines file.
    Line(usize),
    /// 1-based position in the top-level array of a JSON file.
    Element(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(line) => write!(f, "line {line}"),
            Location::Element(index) => write!(f, "element {index}"),
        }
    }
}

/// Everything that can go wrong reading, rendering and tokenizing training data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The data file cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The source holds no usable example.
    #[error("{source_name}: no examples: {reason}")]
    NoExamples {
        /// The file (or the name given to a string source).
        source_name: String,
        /// Why: empty, or every record skipped (and for which reasons).
        reason: String,
    },

    /// A line (or the whole file, for a JSON array) is not valid JSON.
    #[error("{source_name}, line {line}, column {column}: malformed JSON: {message}")]
    Json {
        /// The file (or the name given to a string source).
        source_name: String,
        /// 1-based line in the file.
        line: usize,
        /// 1-based column in the line.
        column: usize,
        /// serde_json's description.
        message: String,
    },

    /// A JSON file whose top level is neither records (JSON Lines) nor an array of them.
    #[error("{source_name}: expected JSON Lines or a JSON array of records, found {found}")]
    NotRecords {
        /// The file (or the name given to a string source).
        source_name: String,
        /// The JSON kind found at the top level.
        found: &'static str,
    },

    /// A record is bad; `error` says how.
    #[error("{source_name}, {location}: {error}")]
    Record {
        /// The file (or the name given to a string source).
        source_name: String,
        /// The record's line or array element.
        location: Location,
        /// What is wrong with it: one of the record-level variants below.
        error: Box<DataError>,
    },

    /// A record is a JSON value other than an object.
    #[error("a record must be a JSON object, found {found}")]
    NotAnObject {
        /// The JSON kind found.
        found: &'static str,
    },

    /// A record's keys match none of the accepted shapes.
    #[error(
        "the record matches none of the accepted shapes {{\"text\"}}, \
         {{\"instruction\", \"input\" (optional), \"output\"}} and \
         {{\"messages\": [{{\"role\", \"content\"}}, ...]}}; its keys are {}",
        format_keys(.keys)
    )]
    UnknownShape {
        /// The record's keys.
        keys: Vec<String>,
    },

    /// A field a shape requires is missing.
    #[error("{shape} record without `{field}` (it needs {needs})")]
    MissingField {
        /// The shape the record was taken for: `Alpaca` or `chat`.
        shape: &'static str,
        /// The missing field, dotted for nested ones (`messages[2].role`).
        field: String,
        /// The fields the shape needs.
        needs: &'static str,
    },

    /// A field has the wrong JSON type.
    #[error("`{field}` must be {expected}, found {found}")]
    WrongType {
        /// The field, dotted for nested ones (`messages[1].content`).
        field: String,
        /// What is accepted, e.g. `a string`.
        expected: &'static str,
        /// The JSON kind found.
        found: &'static str,
    },

    /// A chat message's role is not one chat templates know.
    #[error("unknown chat role \"{role}\"; the roles are {}", format_roles())]
    UnknownRole {
        /// The role as written.
        role: String,
    },

    /// Chat data, but the tokenizer has no chat template to render it with.
    #[error(
        "chat records need the tokenizer's chat template, and this tokenizer has none \
         (no `chat_template` in tokenizer_config.json, no chat_template.jinja)"
    )]
    NoChatTemplate,

    /// The tokenizer has no EOS token, which every example must end with.
    #[error(
        "the tokenizer has no eos_token (tokenizer_config.json): examples must end with one, \
         or the model never learns to stop"
    )]
    NoEosToken,

    /// An example is longer than `max_seq_length` and over-long examples are errors.
    #[error(
        "the example has {tokens} tokens, more than max_seq_length {max_seq_length} \
         (raise max_seq_length, or truncate over-long examples)"
    )]
    TooLong {
        /// The example's length in tokens.
        tokens: usize,
        /// The configured limit.
        max_seq_length: usize,
    },

    /// The chat template failed to compile or render (including its `raise_exception`).
    #[error("chat template: {message}")]
    Template {
        /// minijinja's description, with the template line.
        message: String,
    },

    /// Rendering a conversation turn by turn does not give prefixes of the whole rendering,
    /// so the assistant turns cannot be located for the completion-only loss.
    #[error(
        "chat template: rendering the conversation up to message {message_index} does not give \
         a prefix of the whole conversation's rendering, so the assistant turns cannot be \
         masked (train on the whole text with completion_only = false)"
    )]
    TemplateNotIncremental {
        /// 0-based index of the assistant message whose span could not be located.
        message_index: usize,
    },

    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] ModelError),

    /// A data setting is out of range.
    #[error("invalid data setting: {message}")]
    InvalidConfig {
        /// What is wrong, and what is accepted.
        message: String,
    },

    /// An example built from ids and labels of different lengths.
    #[error("an example needs one label per token: {tokens} tokens, {labels} labels")]
    LabelCount {
        /// Number of token ids.
        tokens: usize,
        /// Number of labels.
        labels: usize,
    },
}

impl DataError {
    /// For [`DataError::Record`], what is wrong with the record; otherwise the error itself.
    pub fn innermost(&self) -> &DataError {
        match self {
            DataError::Record { error, .. } => error.as_ref().innermost(),
            other => other,
        }
    }
}

fn format_keys(keys: &[String]) -> String {
    if keys.is_empty() {
        return "none (an empty object)".to_string();
    }
    keys.iter()
        .map(|key| format!("\"{key}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn format_roles() -> String {
    Role::ALL
        .iter()
        .map(|role| role.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The JSON kind of `value`, for messages ("a string", "null"...).
pub(crate) fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
