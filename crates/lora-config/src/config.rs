//! The [`LoraConfig`] struct, its two sets of defaults, and the per-module rank, alpha and
//! scaling.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::options::{Bias, GradientCheckpointing, InitLoraWeights};
use crate::targeting::{ExcludeModules, TargetModules, pattern_key_matches};

/// Every parameter of Unsloth's `FastLanguageModel.get_peft_model`, plus every field PEFT writes
/// to `adapter_config.json`.
///
/// # Two sets of defaults
///
/// - [`LoraConfig::default`] and [`LoraConfig::builder`] start from **Unsloth's** defaults
///   (`r = 16`, `lora_alpha = 16`, the seven Llama projections, `"unsloth"` gradient
///   checkpointing, `random_state = 3407`, ...). So does the [`serde::Deserialize`] impl,
///   which is meant for user-written configs such as the CLI's TOML file.
/// - [`LoraConfig::from_json_str`] and [`LoraConfig::load`] read a PEFT `adapter_config.json`,
///   where a missing key means **PEFT's** default (`r = 8`, `lora_alpha = 8`,
///   `target_modules = None`, ...): see [`LoraConfig::peft_defaults`].
///
/// # Unsloth-only fields
///
/// `use_gradient_checkpointing`, `random_state`, `max_seq_length`, `temporary_location`,
/// `qat_scheme` and `finetune_last_n_layers` steer training, not the adapter. They are not PEFT
/// keys and are never written to `adapter_config.json`; they come from the user.
///
/// # Unsupported PEFT options
///
/// Fields for PEFT features fastlora does not implement (DoRA, LoRA variants, Megatron, ...)
/// are kept so that files round trip; [`LoraConfig::validate_values`] rejects a config that
/// switches one on. Variant configs fastlora never interprets are kept as raw JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    // --- LoRA hyper-parameters -------------------------------------------------------------
    /// Rank of the update `B·A` (PEFT `r`).
    pub r: usize,
    /// Numerator of the scaling `lora_alpha / r` (or `/ √r` with rsLoRA). Written as an
    /// integer when it is one, as PEFT does.
    pub lora_alpha: f64,
    /// Dropout probability on the LoRA branch input, in `[0, 1)`. Non-zero values take the
    /// unfused path.
    pub lora_dropout: f64,
    /// Which modules get adapters; `None` is PEFT's "the architecture's default", resolved by
    /// [`LoraConfig::normalize`].
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted, whatever `target_modules` says.
    pub exclude_modules: Option<ExcludeModules>,
    /// Which biases are trained.
    pub bias: Bias,
    /// Rank-stabilised LoRA: scale by `lora_alpha / √r` instead of `lora_alpha / r`.
    pub use_rslora: bool,
    /// Modules trained in full and saved in the adapter (`embed_tokens`, `lm_head`).
    pub modules_to_save: Option<Vec<String>>,
    /// How A and B are initialised.
    pub init_lora_weights: InitLoraWeights,
    /// Only adapt decoder layers with these indices (`None` or empty: all layers). A single
    /// integer in JSON is read as a one-element list.
    pub layers_to_transform: Option<Vec<usize>>,
    /// Regular expressions naming the `ModuleList` of decoder layers (e.g. `layers`), used to
    /// find a module's layer index for `layers_to_transform`. A single string in JSON is read
    /// as a one-element list.
    pub layers_pattern: Option<Vec<String>>,
    /// Per-module ranks. A key is a regular expression that selects a module when
    /// `(.*\.)?(key)$` matches its full name. Keys are tried in sorted order and the first
    /// match wins (PEFT tries them in file order; the two differ only when keys overlap).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas, matched like `rank_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// LoftQ settings; only read with `init_lora_weights = "loftq"`, which is not supported.
    pub loftq_config: Map<String, Value>,
    /// Bare `nn.Parameter`s to adapt (MoE experts). Not supported when non-empty.
    pub target_parameters: Option<Vec<String>>,
    /// Keep adapters on tied `embed_tokens`/`lm_head` weights tied.
    pub ensure_weight_tying: bool,

    // --- PEFT options fastlora does not implement ----------------------------------------------
    /// Weights stored as (in, out), as in GPT-2's Conv1D. Llama's are (out, in): must be false.
    pub fan_in_fan_out: bool,
    /// DoRA (weight-decomposed LoRA). Not supported.
    pub use_dora: bool,
    /// A trainable bias on `lora_B`. Not supported.
    pub lora_bias: bool,
    /// QA-LoRA. Not supported.
    pub use_qalora: bool,
    /// QA-LoRA's pooling group size (PEFT default 16).
    pub qalora_group_size: usize,
    /// Megatron's TransformerConfig, as raw JSON. Not supported.
    pub megatron_config: Option<Value>,
    /// Megatron's module path (PEFT default `"megatron.core"`).
    pub megatron_core: Option<String>,
    /// Layer replication ranges, as raw JSON. Not supported.
    pub layer_replication: Option<Value>,
    /// Token indices trained in the embedding, as raw JSON. Not supported.
    pub trainable_token_indices: Option<Value>,
    /// EVA initialisation settings, as raw JSON; only read with `init_lora_weights = "eva"`.
    pub eva_config: Option<Value>,
    /// CorDA initialisation settings, as raw JSON; only read with `"corda"`.
    pub corda_config: Option<Value>,
    /// LoRA-GA initialisation settings, as raw JSON; only read with `"lora_ga"`.
    pub lora_ga_config: Option<Value>,
    /// Activated-LoRA invocation tokens, as raw JSON. Not supported.
    pub alora_invocation_tokens: Option<Value>,
    /// VeLoRA settings, as raw JSON. Not supported.
    pub velora_config: Option<Value>,
    /// MonteCLoRA settings, as raw JSON. Not supported.
    pub monteclora_config: Option<Value>,
    /// Block-diagonal LoRA settings, as raw JSON. Not supported.
    pub use_bdlora: Option<Value>,
    /// Arrow routing settings, as raw JSON. Not supported.
    pub arrow_config: Option<Value>,
    /// KaSA settings, as raw JSON. Not supported.
    pub kasa_config: Option<Value>,

    // --- PEFT bookkeeping ------------------------------------------------------------------
    /// PEFT task type; fastlora trains `"CAUSAL_LM"`.
    pub task_type: Option<String>,
    /// The base model's Hub id or path.
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision.
    pub revision: Option<String>,
    /// Set by PEFT when saving a trained adapter.
    pub inference_mode: bool,
    /// The PEFT version that wrote the file; PEFT fills in its own when this is `None`.
    pub peft_version: Option<String>,
    /// Auto-class mapping for custom models, as raw JSON.
    pub auto_mapping: Option<Value>,

    // --- Unsloth-only: never written to adapter_config.json -------------------------------------
    /// Activation checkpointing during training.
    pub use_gradient_checkpointing: GradientCheckpointing,
    /// Seed for adapter initialisation and dropout.
    pub random_state: u64,
    /// Longest training sequence. Unsloth no longer reads it here.
    pub max_seq_length: usize,
    /// Where Unsloth offloads fully trained embeddings; kept for parity.
    pub temporary_location: String,
    /// Quantisation-aware training scheme (torchao). Not supported.
    pub qat_scheme: Option<String>,
    /// Adapt only the last `n` decoder layers when `layers_to_transform` is unset; resolved by
    /// [`LoraConfig::normalize`].
    pub finetune_last_n_layers: Option<usize>,

    // --- Round trip ------------------------------------------------------------------------
    /// Keys of an `adapter_config.json` that this crate does not know, kept verbatim and
    /// written back. Known keys placed here are ignored on write: the typed field wins.
    pub extra: Map<String, Value>,
}

impl Default for LoraConfig {
    /// Unsloth's `get_peft_model` defaults.
    fn default() -> Self {
        LoraConfig {
            r: 16,
            lora_alpha: 16.0,
            target_modules: Some(TargetModules::unsloth_default()),
            task_type: Some("CAUSAL_LM".to_owned()),
            ..LoraConfig::peft_defaults()
        }
    }
}

impl LoraConfig {
    /// PEFT's `LoraConfig()` defaults: what a key missing from `adapter_config.json` means.
    ///
    /// `r = 8`, `lora_alpha = 8`, `target_modules = None`, `task_type = None`; everything else
    /// matches Unsloth. The Unsloth-only fields take Unsloth's defaults.
    pub fn peft_defaults() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            bias: Bias::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::Standard,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            loftq_config: Map::new(),
            target_parameters: None,
            ensure_weight_tying: false,
            fan_in_fan_out: false,
            use_dora: false,
            lora_bias: false,
            use_qalora: false,
            qalora_group_size: 16,
            megatron_config: None,
            megatron_core: Some("megatron.core".to_owned()),
            layer_replication: None,
            trainable_token_indices: None,
            eva_config: None,
            corda_config: None,
            lora_ga_config: None,
            alora_invocation_tokens: None,
            velora_config: None,
            monteclora_config: None,
            use_bdlora: None,
            arrow_config: None,
            kasa_config: None,
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            peft_version: None,
            auto_mapping: None,
            use_gradient_checkpointing: GradientCheckpointing::Unsloth,
            random_state: 3407,
            max_seq_length: 2048,
            temporary_location: "_unsloth_temporary_saved_buffers".to_owned(),
            qat_scheme: None,
            finetune_last_n_layers: None,
            extra: Map::new(),
        }
    }

    /// The rank of the adapter on this module: the first `rank_pattern` key (in sorted order)
    /// that selects the full dotted `module_name`, else `r`.
    pub fn rank_for(&self, module_name: &str) -> usize {
        first_pattern_match(&self.rank_pattern, module_name).unwrap_or(self.r)
    }

    /// The alpha of the adapter on this module: the first `alpha_pattern` key (in sorted
    /// order) that selects the full dotted `module_name`, else `lora_alpha`.
    pub fn alpha_for(&self, module_name: &str) -> f64 {
        first_pattern_match(&self.alpha_pattern, module_name).unwrap_or(self.lora_alpha)
    }

    /// The factor the LoRA branch is multiplied by on this module: `alpha / r`, or
    /// `alpha / √r` with `use_rslora`, with `r` and `alpha` from [`LoraConfig::rank_for`] and
    /// [`LoraConfig::alpha_for`].
    ///
    /// A validated config has `r > 0`; for `r = 0` this is infinite rather than a panic.
    pub fn scaling_for(&self, module_name: &str) -> f64 {
        let rank = self.rank_for(module_name) as f64;
        let alpha = self.alpha_for(module_name);
        if self.use_rslora {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        }
    }
}

fn first_pattern_match<T: Copy>(patterns: &BTreeMap<String, T>, module_name: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(key, _)| pattern_key_matches(key, module_name))
        .map(|(_, value)| *value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_unsloths() {
        let config = LoraConfig::default();
        assert_eq!(config.r, 16);
        assert_eq!(config.lora_alpha, 16.0);
        assert_eq!(config.lora_dropout, 0.0);
        assert_eq!(
            config.target_modules,
            Some(TargetModules::names([
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ]))
        );
        assert_eq!(config.bias, Bias::None);
        assert_eq!(config.layers_to_transform, None);
        assert_eq!(config.layers_pattern, None);
        assert_eq!(
            config.use_gradient_checkpointing,
            GradientCheckpointing::Unsloth
        );
        assert_eq!(config.random_state, 3407);
        assert_eq!(config.max_seq_length, 2048);
        assert!(!config.use_rslora);
        assert_eq!(config.modules_to_save, None);
        assert_eq!(config.init_lora_weights, InitLoraWeights::Standard);
        assert!(config.loftq_config.is_empty());
        assert_eq!(
            config.temporary_location,
            "_unsloth_temporary_saved_buffers"
        );
        assert_eq!(config.qat_scheme, None);
        assert_eq!(config.target_parameters, None);
        assert!(!config.ensure_weight_tying);
        assert!(config.rank_pattern.is_empty() && config.alpha_pattern.is_empty());
        assert_eq!(config.task_type.as_deref(), Some("CAUSAL_LM"));
        assert!(!config.fan_in_fan_out && !config.use_dora && !config.lora_bias);
    }

    #[test]
    fn peft_defaults_differ_where_peft_does() {
        let config = LoraConfig::peft_defaults();
        assert_eq!((config.r, config.lora_alpha), (8, 8.0));
        assert_eq!(config.target_modules, None);
        assert_eq!(config.task_type, None);
        assert_eq!(config.megatron_core.as_deref(), Some("megatron.core"));
        assert_eq!(config.qalora_group_size, 16);
    }

    #[test]
    fn scaling_is_alpha_over_r() {
        let config = LoraConfig {
            r: 32,
            lora_alpha: 64.0,
            ..LoraConfig::default()
        };
        assert_eq!(config.scaling_for("model.layers.0.self_attn.q_proj"), 2.0);
    }

    #[test]
    fn rslora_scaling_is_alpha_over_sqrt_r() {
        for (r, alpha) in [(16usize, 16.0f64), (64, 32.0), (7, 3.5)] {
            let config = LoraConfig {
                r,
                lora_alpha: alpha,
                use_rslora: true,
                ..LoraConfig::default()
            };
            let expected = alpha / (r as f64).sqrt();
            let got = config.scaling_for("model.layers.0.mlp.up_proj");
            assert!(
                (got - expected).abs() <= 1e-12 * expected,
                "{got} vs {expected}"
            );
        }
    }

    #[test]
    fn patterns_override_rank_and_alpha_per_module() {
        let mut config = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            ..LoraConfig::default()
        };
        config.rank_pattern.insert("q_proj".into(), 32);
        config
            .rank_pattern
            .insert(r"layers\.0\.mlp\.down_proj".into(), 4);
        config.alpha_pattern.insert("down_proj".into(), 2.0);

        let q = "model.layers.5.self_attn.q_proj";
        assert_eq!((config.rank_for(q), config.alpha_for(q)), (32, 16.0));
        assert_eq!(config.scaling_for(q), 0.5);

        let down0 = "model.layers.0.mlp.down_proj";
        assert_eq!((config.rank_for(down0), config.alpha_for(down0)), (4, 2.0));
        assert_eq!(config.scaling_for(down0), 0.5);

        let down1 = "model.layers.1.mlp.down_proj";
        assert_eq!(config.rank_for(down1), 8);
        assert_eq!(config.scaling_for(down1), 0.25);

        let v = "model.layers.5.self_attn.v_proj";
        assert_eq!(config.scaling_for(v), 2.0);

        config.use_rslora = true;
        assert_eq!(config.scaling_for(q), 16.0 / 32f64.sqrt());
    }

    #[test]
    fn first_sorted_pattern_key_wins() {
        let mut config = LoraConfig::default();
        config.rank_pattern.insert("self_attn.q_proj".into(), 4);
        config.rank_pattern.insert("q_proj".into(), 8);
        // "q_proj" sorts before "self_attn.q_proj".
        assert_eq!(config.rank_for("model.layers.0.self_attn.q_proj"), 8);
    }
}
