//! LoRA configuration for fastlora: the parameters of Unsloth's
//! `FastLanguageModel.get_peft_model`, their validation against a model, and Hugging Face PEFT's
//! `adapter_config.json`, read and written so that PEFT and fastlora can exchange adapters.
//!
//! - Build a config from Unsloth's defaults with [`LoraConfig::builder`] (or
//!   [`LoraConfig::default`] and struct update syntax), or deserialize a user's TOML/JSON table.
//! - Read a PEFT adapter with [`LoraConfig::load`] / [`LoraConfig::from_json_str`]: missing keys
//!   take PEFT's defaults, unknown keys are kept.
//! - Fit it to a model with [`LoraConfig::normalize`], which validates, applies Unsloth's rules
//!   (e.g. `embed_tokens` moves to `modules_to_save`) and reports [`Notice`]s.
//! - Ask per module: [`LoraConfig::targets`], [`LoraConfig::rank_for`],
//!   [`LoraConfig::scaling_for`].
//! - Write it back with [`LoraConfig::save`], atomically, with PEFT's full key set.
//!
//! ```
//! use lora_config::{ArchitectureInfo, LoraConfig};
//!
//! let (config, notices) = LoraConfig::builder()
//!     .r(16)
//!     .target_modules(["q_proj", "v_proj", "embed_tokens"])
//!     .build()?
//!     .normalize(&ArchitectureInfo::llama(16))?;
//! assert!(config.targets("model.layers.3.self_attn.q_proj"));
//! assert_eq!(config.modules_to_save.as_deref(), Some(&["embed_tokens".to_owned()][..]));
//! assert_eq!(notices.len(), 1);
//! # Ok::<(), lora_config::LoraConfigError>(())
//! ```

mod architecture;
mod builder;
mod config;
mod error;
mod options;
mod peft_json;
mod reapply;
mod targeting;
mod validate;

pub use architecture::ArchitectureInfo;
pub use builder::LoraConfigBuilder;
pub use config::LoraConfig;
pub use error::{ConfigDifference, LoraConfigError};
pub use options::{Bias, GradientCheckpointing, InitLoraWeights};
pub use peft_json::{ADAPTER_CONFIG_FILE, PEFT_ADAPTER_CONFIG_KEYS};
pub use reapply::ReapplyDecision;
pub use targeting::{ALL_LINEAR, ExcludeModules, ModuleKind, TargetModules};
pub use validate::Notice;
