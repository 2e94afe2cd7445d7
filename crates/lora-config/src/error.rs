//! The one error type of this crate.

use std::fmt;
use std::path::PathBuf;

/// Everything that can be wrong with a LoRA configuration, its file, or its fit to a model.
///
/// Each message names the offending field and says what would be accepted instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraConfigError {
    /// A rank (`r`, or a value in `rank_pattern`) is 0.
    #[error("`{field}` is {value}, but a LoRA rank must be an integer greater than 0")]
    InvalidRank {
        /// `r`, or `rank_pattern["<key>"]`.
        field: String,
        /// The rejected rank.
        value: usize,
    },

    /// An alpha (`lora_alpha`, or a value in `alpha_pattern`) is not a finite number above 0.
    #[error("`{field}` is {value}, but a LoRA alpha must be a finite number greater than 0")]
    InvalidAlpha {
        /// `lora_alpha`, or `alpha_pattern["<key>"]`.
        field: String,
        /// The rejected alpha.
        value: f64,
    },

    /// `lora_dropout` lies outside `[0, 1)`.
    #[error(
        "`lora_dropout` is {value}, but it must lie in [0.0, 1.0); \
         0.0 turns dropout off and keeps the fused fast path"
    )]
    InvalidDropout {
        /// The rejected probability.
        value: f64,
    },

    /// `target_modules` names a module the model does not have.
    #[error(
        "`target_modules` names `{name}`, which this model does not have; valid names: {}",
        QuotedList(valid)
    )]
    UnknownTargetModule {
        /// The unknown entry.
        name: String,
        /// The short module names the model has.
        valid: Vec<String>,
    },

    /// A field that holds regular expressions has one that does not compile.
    #[error(
        "`{field}` holds the regular expression `{pattern}`, which does not compile \
         (Rust `regex` syntax; look-around and back-references are not available): {reason}"
    )]
    InvalidRegex {
        /// The field, e.g. `target_modules` or `rank_pattern`.
        field: &'static str,
        /// The pattern as written.
        pattern: String,
        /// The regex compiler's explanation.
        reason: String,
    },

    /// `layers_to_transform` names a layer the model does not have.
    #[error(
        "`layers_to_transform` contains layer {index}, but the model has {num_layers} layers; \
         valid indices are 0..{num_layers} (end exclusive)"
    )]
    LayerIndexOutOfRange {
        /// The rejected index.
        index: usize,
        /// How many decoder layers the model has.
        num_layers: usize,
    },

    /// `modules_to_save` names a module that may not be trained in full.
    #[error(
        "`modules_to_save` contains `{name}`; allowed entries: {}",
        QuotedList(allowed)
    )]
    InvalidModulesToSave {
        /// The rejected entry.
        name: String,
        /// The modules that may be trained in full.
        allowed: Vec<String>,
    },

    /// `init_lora_weights` asks for an initialisation fastlora does not implement.
    #[error(
        "`init_lora_weights` is {value}, which is not supported; \
         supported: true, false, \"gaussian\", \"pissa\", \"pissa_niter_<K>\""
    )]
    UnsupportedInit {
        /// The rejected value, as JSON.
        value: String,
    },

    /// A PEFT option that fastlora does not implement is switched on.
    #[error("`{field}` is {value}, which is not supported: {reason}")]
    UnsupportedOption {
        /// The PEFT or Unsloth field.
        field: &'static str,
        /// Its value, as JSON.
        value: String,
        /// Why, and what to set instead.
        reason: &'static str,
    },

    /// Two options contradict each other.
    #[error("{reason}")]
    IncompatibleOptions {
        /// Which options clash, and how to resolve it.
        reason: &'static str,
    },

    /// The file describes another PEFT method than LoRA.
    #[error("`peft_type` is \"{found}\", but only \"LORA\" adapters are supported")]
    UnsupportedPeftType {
        /// The `peft_type` found.
        found: String,
    },

    /// The text is not valid JSON.
    #[error("malformed JSON: {message}")]
    MalformedJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's explanation, including the position.
        message: String,
    },

    /// The JSON document is not an object.
    #[error("an adapter config must be a JSON object, but this document is {found}")]
    NotAnObject {
        /// What was found instead, e.g. `an array`.
        found: &'static str,
    },

    /// A field has a value of the wrong type or outside its allowed set.
    #[error("invalid value for `{field}`: {message}")]
    InvalidField {
        /// The field.
        field: String,
        /// What is wrong, and what was expected.
        message: String,
    },

    /// An error in a named file.
    #[error("{}: {error}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        error: Box<LoraConfigError>,
    },

    /// Reading or writing a file failed.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        /// What was attempted, e.g. `read`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },

    /// The configuration would train nothing on this model.
    #[error(
        "no module of the model would be trained: `target_modules` ({target_modules}) selects no \
         layer once `layers_to_transform` and `exclude_modules` apply, and `modules_to_save` is empty"
    )]
    NothingToTrain {
        /// `target_modules` as JSON.
        target_modules: String,
    },

    /// LoRA is applied again to a model whose adapters were made with other parameters.
    #[error(
        "the model already has LoRA adapters, and the new parameters differ ({}); \
         pass the existing adapter's parameters, or start from the base model",
        Differences(differences)
    )]
    AlreadyHasDifferentAdapters {
        /// Every parameter that differs.
        differences: Vec<ConfigDifference>,
    },
}

/// One parameter in which a requested LoRA configuration differs from the existing adapter's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDifference {
    /// The field, e.g. `r`.
    pub field: &'static str,
    /// The requested value, as JSON.
    pub requested: String,
    /// The existing adapter's value, as JSON.
    pub existing: String,
}

impl fmt::Display for ConfigDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}`: requested {}, existing {}",
            self.field, self.requested, self.existing
        )
    }
}

/// Writes `"a", "b", "c"`.
struct QuotedList<'a>(&'a [String]);

impl fmt::Display for QuotedList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "\"{item}\"")?;
        }
        Ok(())
    }
}

/// Writes differences separated by `; `.
struct Differences<'a>(&'a [ConfigDifference]);

impl fmt::Display for Differences<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, difference) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{difference}")?;
        }
        Ok(())
    }
}
