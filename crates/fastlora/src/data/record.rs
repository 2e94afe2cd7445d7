//! One training record, recognised from its JSON keys: plain text, Alpaca, or chat.

use serde_json::{Map, Value};

use super::error::{DataError, json_kind};
use crate::chat::{ChatMessage, Role};

/// A record in one of the three accepted shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// `{"text": ...}`: trained on whole.
    Text(String),
    /// `{"instruction", "input"?, "output"}`.
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    /// `{"messages": [{"role", "content"}, ...]}`.
    Chat(Vec<ChatMessage>),
}

const ALPACA: &str = "Alpaca";
const ALPACA_NEEDS: &str = "`instruction` and `output`, and optionally `input`";
const CHAT: &str = "chat";
const CHAT_NEEDS: &str = "`role` and `content` in every message";

impl Record {
    /// Recognises `value`'s shape. Other keys are ignored (datasets carry ids, sources...);
    /// when several shapes' keys are present, `messages` wins over Alpaca's keys, which win
    /// over `text` (Alpaca datasets often also hold the whole prompt as `text`, which would
    /// lose the prompt/response split).
    ///
    /// # Errors
    ///
    /// [`DataError::NotAnObject`], [`DataError::UnknownShape`], [`DataError::MissingField`],
    /// [`DataError::WrongType`] or [`DataError::UnknownRole`].
    pub(crate) fn from_json(value: &Value) -> Result<Self, DataError> {
        let Value::Object(object) = value else {
            return Err(DataError::NotAnObject {
                found: json_kind(value),
            });
        };
        if let Some(messages) = object.get("messages") {
            return chat(messages).map(Record::Chat);
        }
        if object.contains_key("instruction") || object.contains_key("output") {
            return alpaca(object);
        }
        if let Some(text) = object.get("text") {
            return string("text", text).map(Record::Text);
        }
        Err(DataError::UnknownShape {
            keys: object.keys().cloned().collect(),
        })
    }

    /// Whether the record holds nothing to learn from (blank text, blank Alpaca instruction
    /// and output, no messages).
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Record::Text(text) => text.trim().is_empty(),
            Record::Alpaca {
                instruction,
                output,
                ..
            } => instruction.trim().is_empty() && output.trim().is_empty(),
            Record::Chat(messages) => messages.is_empty(),
        }
    }
}

fn alpaca(object: &Map<String, Value>) -> Result<Record, DataError> {
    let required = |field: &str| {
        object
            .get(field)
            .ok_or_else(|| DataError::MissingField {
                shape: ALPACA,
                field: field.to_string(),
                needs: ALPACA_NEEDS,
            })
            .and_then(|value| string(field, value))
    };
    let instruction = required("instruction")?;
    let output = required("output")?;
    // `"input": null` is how some exports write "no input".
    let input = match object.get("input") {
        None | Some(Value::Null) => String::new(),
        Some(value) => string("input", value)?,
    };
    Ok(Record::Alpaca {
        instruction,
        input,
        output,
    })
}

fn chat(messages: &Value) -> Result<Vec<ChatMessage>, DataError> {
    let Value::Array(messages) = messages else {
        return Err(DataError::WrongType {
            field: "messages".into(),
            expected: "an array of {\"role\", \"content\"} objects",
            found: json_kind(messages),
        });
    };
    messages
        .iter()
        .enumerate()
        .map(|(index, message)| {
            let field = |name: &str| format!("messages[{index}].{name}");
            let Value::Object(message) = message else {
                return Err(DataError::WrongType {
                    field: format!("messages[{index}]"),
                    expected: "a {\"role\", \"content\"} object",
                    found: json_kind(message),
                });
            };
            let required = |name: &str| {
                message.get(name).ok_or_else(|| DataError::MissingField {
                    shape: CHAT,
                    field: field(name),
                    needs: CHAT_NEEDS,
                })
            };
            let role: Role = string(&field("role"), required("role")?)?.parse()?;
            let content = string(&field("content"), required("content")?)?;
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn string(field: &str, value: &Value) -> Result<String, DataError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        other => Err(DataError::WrongType {
            field: field.to_string(),
            expected: "a string",
            found: json_kind(other),
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn recognises_the_three_shapes() {
        assert_eq!(
            Record::from_json(&json!({"text": "hi", "id": 3})).unwrap(),
            Record::Text("hi".into())
        );
        assert_eq!(
            Record::from_json(&json!({"instruction": "i", "output": "o", "text": "ignored"}))
                .unwrap(),
            Record::Alpaca {
                instruction: "i".into(),
                input: String::new(),
                output: "o".into()
            }
        );
        assert_eq!(
            Record::from_json(&json!({"instruction": "i", "input": null, "output": "o"})).unwrap(),
            Record::Alpaca {
                instruction: "i".into(),
                input: String::new(),
                output: "o".into()
            }
        );
        assert_eq!(
            Record::from_json(&json!({"messages": [{"role": "user", "content": "q"}]})).unwrap(),
            Record::Chat(vec![ChatMessage::user("q")])
        );
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        let message = |value: Value| Record::from_json(&value).unwrap_err().to_string();
        assert_eq!(
            message(json!([1])),
            "a record must be a JSON object, found an array"
        );
        let unknown = message(json!({"prompt": "p", "completion": "c"}));
        assert!(
            unknown.contains("\"prompt\"") && unknown.contains("\"completion\""),
            "{unknown}"
        );
        assert!(message(json!({"instruction": "i"})).starts_with("Alpaca record without `output`"));
        assert_eq!(
            message(json!({"text": 5})),
            "`text` must be a string, found a number"
        );
        assert_eq!(
            message(json!({"messages": [{"role": "user", "content": null}]})),
            "`messages[0].content` must be a string, found null"
        );
        assert!(
            message(json!({"messages": [{"content": "x"}]}))
                .starts_with("chat record without `messages[0].role`")
        );
        assert!(
            message(json!({"messages": [{"role": "human", "content": "x"}]})).contains("\"human\"")
        );
        assert!(message(json!({"messages": "hello"})).starts_with("`messages` must be an array"));
    }
}
