//! Small closed choices of the configuration: bias training, gradient checkpointing, and the
//! initialisation of the LoRA matrices.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// Which biases are trained (PEFT's `bias`).
///
/// Anything but [`Bias::None`] takes the unfused path, as in Unsloth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// `"none"`: no bias is trained.
    #[default]
    None,
    /// `"all"`: every bias of the model is trained and saved.
    All,
    /// `"lora_only"`: only the biases of LoRA-wrapped layers are trained and saved.
    LoraOnly,
}

impl Bias {
    /// Whether this mode trains (and saves) the base bias of a layer; `adapted` says whether
    /// the layer carries a LoRA adapter.
    pub fn trains(self, adapted: bool) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::LoraOnly => adapted,
        }
    }

    /// The spelling used in `adapter_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bias::None => "none",
            Bias::All => "all",
            Bias::LoraOnly => "lora_only",
        }
    }
}

impl fmt::Display for Bias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Unsloth's `use_gradient_checkpointing`: `false`, `true` or `"unsloth"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum GradientCheckpointing {
    /// `false`: keep every activation.
    Off,
    /// `true`: recompute each decoder layer in the backward pass.
    On,
    /// `"unsloth"` (Unsloth's default): recompute, and offload the saved layer inputs to host
    /// memory.
    #[default]
    Unsloth,
}

impl GradientCheckpointing {
    fn to_json_value(self) -> Value {
        match self {
            GradientCheckpointing::Off => Value::Bool(false),
            GradientCheckpointing::On => Value::Bool(true),
            GradientCheckpointing::Unsloth => Value::from("unsloth"),
        }
    }
}

impl fmt::Display for GradientCheckpointing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json_value())
    }
}

impl Serialize for GradientCheckpointing {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            GradientCheckpointing::Off => serializer.serialize_bool(false),
            GradientCheckpointing::On => serializer.serialize_bool(true),
            GradientCheckpointing::Unsloth => serializer.serialize_str("unsloth"),
        }
    }
}

impl<'de> Deserialize<'de> for GradientCheckpointing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CheckpointingVisitor;

        impl Visitor<'_> for CheckpointingVisitor {
            type Value = GradientCheckpointing;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("false, true or \"unsloth\"")
            }

            fn visit_bool<E: de::Error>(self, on: bool) -> Result<Self::Value, E> {
                Ok(if on {
                    GradientCheckpointing::On
                } else {
                    GradientCheckpointing::Off
                })
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                match text {
                    "unsloth" => Ok(GradientCheckpointing::Unsloth),
                    _ => Err(E::invalid_value(Unexpected::Str(text), &self)),
                }
            }
        }

        deserializer.deserialize_any(CheckpointingVisitor)
    }
}

/// How the LoRA matrices are initialised (PEFT's `init_lora_weights`).
///
/// Every value PEFT accepts is read and written back unchanged; [`InitLoraWeights::is_supported`]
/// tells which ones fastlora can train with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum InitLoraWeights {
    /// `true` (PEFT's default): A is Kaiming-uniform, U(±1/√in_features), and B is zero, so
    /// the adapter starts as a no-op.
    #[default]
    Standard,
    /// `false`: A and B both random. PEFT meant it for debugging: the adapter is not a no-op.
    Random,
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Gaussian,
    /// `"pissa"` (exact SVD) or `"pissa_niter_K"` (randomised SVD with K subspace iterations).
    /// PiSSA rewrites the base weights.
    Pissa {
        /// `K` of `"pissa_niter_K"`; `None` for the exact SVD.
        niter: Option<u32>,
    },
    /// `"loftq"`: LoftQ, which needs a quantised base model. Not supported.
    Loftq,
    /// Any other string PEFT knows (`"olora"`, `"eva"`, `"corda"`, ...). Kept so that a file
    /// round trips, but not supported.
    Other(String),
}

impl InitLoraWeights {
    /// Whether fastlora can initialise adapters this way.
    pub fn is_supported(&self) -> bool {
        matches!(
            self,
            InitLoraWeights::Standard
                | InitLoraWeights::Random
                | InitLoraWeights::Gaussian
                | InitLoraWeights::Pissa { .. }
        )
    }

    /// Parses PEFT's string forms (`"gaussian"`, `"pissa_niter_4"`, ...).
    fn from_peft_str(text: &str) -> Self {
        match text {
            "gaussian" => InitLoraWeights::Gaussian,
            "pissa" => InitLoraWeights::Pissa { niter: None },
            "loftq" => InitLoraWeights::Loftq,
            _ => match text.strip_prefix("pissa_niter_").map(str::parse::<u32>) {
                // Only the canonical spelling of K is taken, so that writing it back
                // reproduces the input.
                Some(Ok(niter)) if text == format!("pissa_niter_{niter}") => {
                    InitLoraWeights::Pissa { niter: Some(niter) }
                }
                _ => InitLoraWeights::Other(text.to_owned()),
            },
        }
    }

    pub(crate) fn to_json_value(&self) -> Value {
        match self {
            InitLoraWeights::Standard => Value::Bool(true),
            InitLoraWeights::Random => Value::Bool(false),
            InitLoraWeights::Gaussian => Value::from("gaussian"),
            InitLoraWeights::Pissa { niter: None } => Value::from("pissa"),
            InitLoraWeights::Pissa { niter: Some(k) } => Value::from(format!("pissa_niter_{k}")),
            InitLoraWeights::Loftq => Value::from("loftq"),
            InitLoraWeights::Other(text) => Value::from(text.as_str()),
        }
    }
}

impl fmt::Display for InitLoraWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json_value())
    }
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InitVisitor;

        impl Visitor<'_> for InitVisitor {
            type Value = InitLoraWeights;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false, or a PEFT initialisation name such as \"gaussian\"")
            }

            fn visit_bool<E: de::Error>(self, standard: bool) -> Result<Self::Value, E> {
                Ok(if standard {
                    InitLoraWeights::Standard
                } else {
                    InitLoraWeights::Random
                })
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(InitLoraWeights::from_peft_str(text))
            }
        }

        deserializer.deserialize_any(InitVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_strings_round_trip() {
        for text in [
            "gaussian",
            "pissa",
            "pissa_niter_4",
            "loftq",
            "olora",
            "pissa_niter_04",
        ] {
            let init: InitLoraWeights = serde_json::from_value(Value::from(text)).unwrap();
            assert_eq!(init.to_json_value(), Value::from(text), "{text}");
        }
        let parsed: InitLoraWeights = serde_json::from_str("\"pissa_niter_16\"").unwrap();
        assert_eq!(parsed, InitLoraWeights::Pissa { niter: Some(16) });
        assert!(parsed.is_supported());
        let odd: InitLoraWeights = serde_json::from_str("\"pissa_niter_x\"").unwrap();
        assert_eq!(odd, InitLoraWeights::Other("pissa_niter_x".into()));
        assert!(!odd.is_supported());
        assert!(!InitLoraWeights::Loftq.is_supported());
    }

    #[test]
    fn init_bools() {
        let standard: InitLoraWeights = serde_json::from_str("true").unwrap();
        let random: InitLoraWeights = serde_json::from_str("false").unwrap();
        assert_eq!(standard, InitLoraWeights::Standard);
        assert_eq!(random, InitLoraWeights::Random);
        assert!(serde_json::from_str::<InitLoraWeights>("3").is_err());
    }

    #[test]
    fn gradient_checkpointing_forms() {
        for (json, expected) in [
            ("false", GradientCheckpointing::Off),
            ("true", GradientCheckpointing::On),
            ("\"unsloth\"", GradientCheckpointing::Unsloth),
        ] {
            let parsed: GradientCheckpointing = serde_json::from_str(json).unwrap();
            assert_eq!(parsed, expected);
            assert_eq!(serde_json::to_string(&parsed).unwrap(), json);
        }
        let err = serde_json::from_str::<GradientCheckpointing>("\"always\"").unwrap_err();
        assert!(
            err.to_string().contains("false, true or \"unsloth\""),
            "{err}"
        );
    }

    #[test]
    fn bias_spellings() {
        for bias in [Bias::None, Bias::All, Bias::LoraOnly] {
            let json = serde_json::to_string(&bias).unwrap();
            assert_eq!(json, format!("\"{bias}\""));
            assert_eq!(serde_json::from_str::<Bias>(&json).unwrap(), bias);
        }
    }
}
