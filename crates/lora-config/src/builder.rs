//! [`LoraConfigBuilder`]: Unsloth's `get_peft_model` keyword arguments as chained setters.

use crate::LoraConfig;
use crate::error::LoraConfigError;
use crate::options::{Bias, GradientCheckpointing, InitLoraWeights};
use crate::targeting::{ExcludeModules, TargetModules};

/// Builds a [`LoraConfig`] from Unsloth's defaults; [`LoraConfigBuilder::build`] validates it.
///
/// ```
/// use lora_config::LoraConfig;
///
/// let config = LoraConfig::builder()
///     .r(32)
///     .lora_alpha(64.0)
///     .use_rslora(true)
///     .target_modules(["q_proj", "v_proj"])
///     .build()?;
/// assert_eq!(config.scaling_for("model.layers.0.self_attn.q_proj"), 64.0 / 32f64.sqrt());
/// # Ok::<(), lora_config::LoraConfigError>(())
/// ```
///
/// Setters cover the parameters of Unsloth's `get_peft_model`; the remaining PEFT fields are
/// public on [`LoraConfig`] and can be set there.
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct LoraConfigBuilder {
    config: LoraConfig,
}

impl LoraConfig {
    /// A builder starting from Unsloth's defaults ([`LoraConfig::default`]).
    pub fn builder() -> LoraConfigBuilder {
        LoraConfigBuilder::default()
    }
}

impl LoraConfigBuilder {
    /// Sets the rank `r`.
    pub fn r(mut self, r: usize) -> Self {
        self.config.r = r;
        self
    }

    /// Sets `lora_alpha`.
    pub fn lora_alpha(mut self, lora_alpha: f64) -> Self {
        self.config.lora_alpha = lora_alpha;
        self
    }

    /// Sets `lora_dropout`.
    pub fn lora_dropout(mut self, lora_dropout: f64) -> Self {
        self.config.lora_dropout = lora_dropout;
        self
    }

    /// Sets which biases are trained.
    pub fn bias(mut self, bias: Bias) -> Self {
        self.config.bias = bias;
        self
    }

    /// Targets modules by name (exact or `.`-separated suffix), e.g. `["q_proj", "v_proj"]`.
    pub fn target_modules<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.target_modules = Some(TargetModules::names(names));
        self
    }

    /// Targets the modules whose full dotted name matches `pattern` entirely.
    pub fn target_modules_regex(mut self, pattern: impl Into<String>) -> Self {
        self.config.target_modules = Some(TargetModules::Pattern(pattern.into()));
        self
    }

    /// Targets every Linear layer except `lm_head` (PEFT's `"all-linear"`).
    pub fn target_all_linear(mut self) -> Self {
        self.config.target_modules = Some(TargetModules::AllLinear);
        self
    }

    /// Never adapts these modules (exact name or `.`-separated suffix).
    pub fn exclude_modules<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.exclude_modules = Some(ExcludeModules::Names(
            names.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Only adapts decoder layers with these indices.
    pub fn layers_to_transform(mut self, layers: impl IntoIterator<Item = usize>) -> Self {
        self.config.layers_to_transform = Some(layers.into_iter().collect());
        self
    }

    /// Names the decoder-layer list used to find layer indices (e.g. `"layers"`).
    pub fn layers_pattern<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.layers_pattern = Some(patterns.into_iter().map(Into::into).collect());
        self
    }

    /// Only adapts the last `n` decoder layers (resolved by [`LoraConfig::normalize`]).
    pub fn finetune_last_n_layers(mut self, n: usize) -> Self {
        self.config.finetune_last_n_layers = Some(n);
        self
    }

    /// Sets activation checkpointing.
    pub fn use_gradient_checkpointing(mut self, mode: GradientCheckpointing) -> Self {
        self.config.use_gradient_checkpointing = mode;
        self
    }

    /// Sets the seed.
    pub fn random_state(mut self, seed: u64) -> Self {
        self.config.random_state = seed;
        self
    }

    /// Sets the longest training sequence.
    pub fn max_seq_length(mut self, max_seq_length: usize) -> Self {
        self.config.max_seq_length = max_seq_length;
        self
    }

    /// Switches rank-stabilised scaling (`alpha / √r`) on or off.
    pub fn use_rslora(mut self, use_rslora: bool) -> Self {
        self.config.use_rslora = use_rslora;
        self
    }

    /// Trains these modules in full (`embed_tokens`, `lm_head`).
    pub fn modules_to_save<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.modules_to_save = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Sets how the LoRA matrices are initialised.
    pub fn init_lora_weights(mut self, init: InitLoraWeights) -> Self {
        self.config.init_lora_weights = init;
        self
    }

    /// Gives the modules selected by `pattern` (see [`LoraConfig::rank_pattern`]) rank `r`.
    pub fn rank_pattern(mut self, pattern: impl Into<String>, r: usize) -> Self {
        self.config.rank_pattern.insert(pattern.into(), r);
        self
    }

    /// Gives the modules selected by `pattern` (see [`LoraConfig::alpha_pattern`]) this alpha.
    pub fn alpha_pattern(mut self, pattern: impl Into<String>, alpha: f64) -> Self {
        self.config.alpha_pattern.insert(pattern.into(), alpha);
        self
    }

    /// Keeps adapters on tied embedding and output weights tied.
    pub fn ensure_weight_tying(mut self, ensure: bool) -> Self {
        self.config.ensure_weight_tying = ensure;
        self
    }

    /// Sets Unsloth's offload directory for fully trained embeddings.
    pub fn temporary_location(mut self, location: impl Into<String>) -> Self {
        self.config.temporary_location = location.into();
        self
    }

    /// Records the base model's Hub id or path (written to `adapter_config.json`).
    pub fn base_model_name_or_path(mut self, name: impl Into<String>) -> Self {
        self.config.base_model_name_or_path = Some(name.into());
        self
    }

    /// Validates the values ([`LoraConfig::validate_values`]) and returns the config. Checks
    /// against a model happen later, in [`LoraConfig::normalize`].
    ///
    /// # Errors
    ///
    /// As [`LoraConfig::validate_values`].
    pub fn build(self) -> Result<LoraConfig, LoraConfigError> {
        self.config.validate_values()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sets_fields_and_validates() {
        let config = LoraConfig::builder()
            .r(32)
            .lora_alpha(64.0)
            .lora_dropout(0.1)
            .bias(Bias::LoraOnly)
            .use_rslora(true)
            .target_modules(["q_proj", "v_proj"])
            .layers_to_transform([0, 1])
            .layers_pattern(["layers"])
            .use_gradient_checkpointing(GradientCheckpointing::Off)
            .random_state(1)
            .max_seq_length(512)
            .modules_to_save(["lm_head"])
            .init_lora_weights(InitLoraWeights::Gaussian)
            .rank_pattern("q_proj", 8)
            .alpha_pattern("q_proj", 4.0)
            .base_model_name_or_path("unsloth/Llama-3.2-1B")
            .build()
            .unwrap();
        assert_eq!(config.r, 32);
        assert_eq!(config.lora_alpha, 64.0);
        assert_eq!(config.bias, Bias::LoraOnly);
        assert_eq!(config.layers_to_transform, Some(vec![0, 1]));
        assert_eq!(config.rank_for("model.layers.0.self_attn.q_proj"), 8);
        assert_eq!(
            config.scaling_for("model.layers.0.self_attn.q_proj"),
            4.0 / 8f64.sqrt()
        );
        assert_eq!(
            LoraConfig::builder().build().unwrap(),
            LoraConfig::default()
        );
    }

    #[test]
    fn builder_rejects_invalid_values() {
        assert!(matches!(
            LoraConfig::builder().r(0).build(),
            Err(LoraConfigError::InvalidRank { .. })
        ));
        assert!(matches!(
            LoraConfig::builder().target_modules_regex("(").build(),
            Err(LoraConfigError::InvalidRegex { .. })
        ));
        assert!(LoraConfig::builder().target_all_linear().build().is_ok());
    }
}
