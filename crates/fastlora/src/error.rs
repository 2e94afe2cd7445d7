//! The facade's error type: every failure names the file, tensor or field it concerns.

use std::path::PathBuf;

use fastlora_llama::ModelError;
use lora_config::LoraConfigError;
use lora_layers::InitError;

/// Errors from loading models, applying LoRA, and reading or writing adapters.
#[derive(Debug, thiserror::Error)]
pub enum FastLoraError {
    /// An invalid LoRA configuration.
    #[error(transparent)]
    Config(#[from] LoraConfigError),
    /// A model, checkpoint, tokenizer or hub problem.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Adapter initialisation failed.
    #[error(transparent)]
    Init(#[from] InitError),
    /// An adapter directory that does not fit the model.
    #[error("adapter {path}: {message}")]
    Adapter {
        /// The adapter file or directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Bad training data.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Generation settings or prompt rejected.
    #[error(transparent)]
    Generation(#[from] crate::generate::GenerationError),
    /// Training stopped (e.g. a NaN loss).
    #[error("training: {0}")]
    Training(String),
    /// A bad input file of a command (e.g. the `input_ids` of `fastlora logits`).
    #[error("{path}: {message}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, FastLoraError>;
