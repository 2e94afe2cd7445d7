//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong finding, reading or writing a model's files.
///
/// Every message starts with the file (or directory, or Hub repository) concerned and names the
/// field or tensor at fault, with what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// Reading, writing or renaming a file failed.
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        /// What was attempted, e.g. `read` or `rename the temporary file over`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A JSON file is malformed, or its top level is not an object.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error (0 when unknown).
        line: usize,
        /// 1-based column of the error (0 when unknown).
        column: usize,
        /// What is wrong.
        message: String,
    },

    /// A field of a JSON file is missing, has the wrong type, or an invalid value.
    #[error("{}: field `{field}` {message}", path.display())]
    ConfigField {
        /// The file.
        path: PathBuf,
        /// The field, dotted for nested ones, e.g. `rope_parameters.factor`.
        field: String,
        /// What is wrong, and what would be accepted.
        message: String,
    },

    /// The file asks for something this crate does not implement.
    #[error("{}: unsupported {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported, and what is.
        what: String,
    },

    /// A safetensors file is truncated or corrupt, or cannot be written as asked.
    #[error("{}: invalid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A GGUF file is truncated or corrupt, holds a tensor of a type that cannot be decoded,
    /// or lacks (or mistypes) metadata the model needs.
    #[error("{}: GGUF: {message}", path.display())]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong, naming the tensor or metadata key at fault where there is one.
        message: String,
    },

    /// A checkpoint does not hold a tensor the model needs.
    #[error("{}: tensor `{name}` not found", path.display())]
    MissingTensor {
        /// The safetensors file, or the shard index of a sharded checkpoint.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },

    /// A tensor has another shape than the configuration implies.
    #[error(
        "{}: tensor `{name}` has shape {found:?}, but the model config implies {expected:?}",
        path.display()
    )]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// The safetensors file holding it.
        path: PathBuf,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype that cannot be read as asked.
    #[error("{}: tensor `{name}` has dtype {dtype}, expected {expected}", path.display())]
    DType {
        /// The tensor's name.
        name: String,
        /// The safetensors file holding it.
        path: PathBuf,
        /// The dtype stored in the file, e.g. `I64`.
        dtype: String,
        /// What would be accepted, e.g. `a float dtype (F32, BF16, F16 or F64)`.
        expected: &'static str,
    },

    /// A model reference names neither an existing path nor a usable Hub repository.
    #[error("{what}")]
    NotFound {
        /// What was looked for and where.
        what: String,
    },

    /// A Hugging Face Hub repository cannot be resolved to a local snapshot.
    #[error("Hugging Face Hub repo `{repo_id}`: {message}")]
    Hub {
        /// The repository id, e.g. `HuggingFaceTB/SmolLM2-135M`.
        repo_id: String,
        /// What went wrong, and how to fix it.
        message: String,
    },

    /// A tokenizer file cannot be used.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// `tokenizer.json`, `tokenizer_config.json` or `chat_template.jinja`.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ModelError {
    /// A [`ModelError::Io`]: `action` on `path` failed with `source`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A [`ModelError::Gguf`] about `path`.
    pub(crate) fn gguf(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Gguf {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A [`ModelError::ConfigField`] for `field` of `path`.
    pub(crate) fn field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::ConfigField {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// A [`ModelError::Json`] for a `serde_json` syntax error in `path`.
    pub(crate) fn malformed_json(path: impl Into<PathBuf>, error: &serde_json::Error) -> Self {
        let (line, column) = (error.line(), error.column());
        // serde_json appends the position, which the variant already shows up front.
        let full = error.to_string();
        let reason = full
            .strip_suffix(&format!(" at line {line} column {column}"))
            .unwrap_or(&full);
        Self::Json {
            path: path.into(),
            line,
            column,
            message: format!("malformed JSON: {reason}"),
        }
    }
}
