//! Typed reads of fields of the JSON files Hugging Face writes, with errors naming file and field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::ModelError;

/// Reads a JSON file whose top level must be an object.
///
/// # Errors
///
/// [`ModelError::Io`] if the file cannot be read, [`ModelError::Json`] if it is not JSON or
/// its top level is not an object.
pub(crate) fn read_object(path: &Path) -> Result<Map<String, Value>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io("read", path, e))?;
    parse_object(&text, path)
}

/// Parses `text` (the contents of `path`) as a JSON object.
///
/// # Errors
///
/// [`ModelError::Json`] if it is not JSON or its top level is not an object.
pub(crate) fn parse_object(text: &str, path: &Path) -> Result<Map<String, Value>, ModelError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ModelError::Json {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            message: format!(
                "expected a JSON object at the top level, found {}",
                kind(&other)
            ),
        }),
        Err(e) => Err(ModelError::malformed_json(path, &e)),
    }
}

/// `a string`, `an array`, ... for messages about unexpected JSON values.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields of one JSON object of a file, read with errors that name the file and the field.
///
/// A field set to `null` reads as absent, as transformers treats it.
pub(crate) struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
    /// `""` at the top level, `"rope_parameters."` inside that object.
    prefix: String,
}

impl<'a> Fields<'a> {
    /// The top-level object of the file at `path`.
    pub(crate) fn new(path: &'a Path, map: &'a Map<String, Value>) -> Self {
        Self {
            path,
            map,
            prefix: String::new(),
        }
    }

    /// The file these fields come from.
    pub(crate) fn path(&self) -> &'a Path {
        self.path
    }

    /// The value of `key`, or `None` when it is absent or `null`.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    /// The full (dotted) name of `key`, for messages.
    pub(crate) fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A [`ModelError::ConfigField`] about `key`.
    pub(crate) fn error(&self, key: &str, message: impl Into<String>) -> ModelError {
        ModelError::field(self.path, self.name(key), message)
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ModelError {
        self.error(
            key,
            format!("must be {expected}, found {}", describe(found)),
        )
    }

    fn missing(&self, key: &str, expected: &str) -> ModelError {
        self.error(key, format!("is missing; expected {expected}"))
    }

    /// A non-negative integer, if present.
    pub(crate) fn optional_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        const EXPECTED: &str = "a non-negative integer";
        self.get(key)
            .map(|value| {
                value
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong_type(key, EXPECTED, value))
            })
            .transpose()
    }

    /// A non-negative integer that must be present.
    pub(crate) fn required_usize(&self, key: &str) -> Result<usize, ModelError> {
        self.optional_usize(key)?
            .ok_or_else(|| self.missing(key, "a non-negative integer"))
    }

    /// A token id, if present.
    ///
    /// A negative id reads as absent: some early Llama conversions write `-1` for "no pad token",
    /// which transformers accepts.
    pub(crate) fn optional_token_id(&self, key: &str) -> Result<Option<u32>, ModelError> {
        self.get(key)
            .map(|value| self.token_id(key, value))
            .transpose()
            .map(Option::flatten)
    }

    /// One token id or a list of them (`eos_token_id` is either); empty when absent.
    pub(crate) fn token_ids(&self, key: &str) -> Result<Vec<u32>, ModelError> {
        let ids = match self.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| self.token_id(key, item))
                .collect::<Result<Vec<_>, _>>()?,
            Some(value) => vec![self.token_id(key, value)?],
        };
        Ok(ids.into_iter().flatten().collect())
    }

    fn token_id(&self, key: &str, value: &Value) -> Result<Option<u32>, ModelError> {
        if value.as_i64().is_some_and(|id| id < 0) {
            return Ok(None);
        }
        value
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, "a token id (an integer below 2^32)", value))
    }

    /// A number, if present.
    pub(crate) fn optional_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key)
            .map(|value| {
                value
                    .as_f64()
                    .ok_or_else(|| self.wrong_type(key, "a number", value))
            })
            .transpose()
    }

    /// A number that must be present.
    pub(crate) fn required_f64(&self, key: &str) -> Result<f64, ModelError> {
        self.optional_f64(key)?
            .ok_or_else(|| self.missing(key, "a number"))
    }

    /// A boolean, if present.
    pub(crate) fn optional_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key)
            .map(|value| {
                value
                    .as_bool()
                    .ok_or_else(|| self.wrong_type(key, "true or false", value))
            })
            .transpose()
    }

    /// A string, if present.
    pub(crate) fn optional_str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        self.get(key)
            .map(|value| {
                value
                    .as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", value))
            })
            .transpose()
    }

    /// A string that must be present.
    pub(crate) fn required_str(&self, key: &str) -> Result<&'a str, ModelError> {
        self.optional_str(key)?
            .ok_or_else(|| self.missing(key, "a string"))
    }

    /// A nested object, if present; its fields' names are prefixed with `key.` in messages.
    pub(crate) fn optional_object(&self, key: &str) -> Result<Option<Fields<'a>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields {
                path: self.path,
                map,
                prefix: format!("{}.", self.name(key)),
            })),
            Some(value) => Err(self.wrong_type(key, "an object", value)),
        }
    }

    /// The keys present in this object, `null`-valued ones included.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.map.keys().map(String::as_str)
    }
}

/// `a string ("x")`, `a number (3)`, ... so that messages show the offending value.
fn describe(value: &Value) -> String {
    match value {
        Value::Null | Value::Array(_) | Value::Object(_) => kind(value).to_string(),
        scalar => format!("{} ({scalar})", kind(value)),
    }
}
