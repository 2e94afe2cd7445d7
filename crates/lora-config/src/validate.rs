//! Validation: value checks that need no model ([`LoraConfig::validate_values`]), and the fit to
//! a model with Unsloth's adjustments ([`LoraConfig::normalize`]).

use std::fmt;

use regex::Regex;
use serde_json::Value;

use crate::LoraConfig;
use crate::architecture::ArchitectureInfo;
use crate::error::LoraConfigError;
use crate::options::Bias;
use crate::targeting::{
    ExcludeModules, ModuleKind, TargetModules, is_dotted_suffix, last_component,
    pattern_key_matches,
};

/// Something [`LoraConfig::normalize`] changed or wants the user to know; not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// `embed_tokens` was listed in `target_modules`; as in Unsloth it is trained in full
    /// instead, through `modules_to_save`.
    EmbeddingMovedToModulesToSave {
        /// The entry that was moved.
        module: String,
    },
    /// `target_modules` was `None`; PEFT's default for the architecture was filled in.
    DefaultTargetModules {
        /// The names filled in.
        modules: Vec<String>,
    },
    /// `finetune_last_n_layers` was turned into `layers_to_transform`.
    LastLayersSelected {
        /// The selected layer indices.
        layers: Vec<usize>,
    },
    /// An option forces the slower, unfused LoRA path (Unsloth's kernels need
    /// `lora_dropout = 0` and `bias = "none"`).
    SlowPath {
        /// The option.
        field: &'static str,
        /// Its value, as JSON.
        value: String,
    },
    /// A module is both in `target_modules` and in `modules_to_save`; it is trained in full and
    /// gets no adapter.
    TrainedInFullNotAdapted {
        /// The module.
        module: String,
    },
    /// `loftq_config` was set without `init_lora_weights = "loftq"`; it was cleared, as PEFT
    /// does.
    LoftqConfigCleared,
    /// Initialisation settings for a method that is not selected; PEFT ignores them too.
    InitSettingsIgnored {
        /// The field, e.g. `eva_config`.
        field: &'static str,
    },
    /// A `rank_pattern` or `alpha_pattern` key selects no adapted module.
    UnusedPatternKey {
        /// `rank_pattern` or `alpha_pattern`.
        field: &'static str,
        /// The key.
        key: String,
    },
    /// The model already has adapters with the same parameters; nothing is done.
    AlreadyHasAdapters,
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::EmbeddingMovedToModulesToSave { module } => write!(
                f,
                "`{module}` in `target_modules` is trained in full instead of with LoRA: \
                 moved to `modules_to_save`"
            ),
            Notice::DefaultTargetModules { modules } => write!(
                f,
                "`target_modules` is unset; using PEFT's default for this architecture: {}",
                Value::from_iter(modules.iter().cloned())
            ),
            Notice::LastLayersSelected { layers } => write!(
                f,
                "`finetune_last_n_layers` selects layers {}",
                Value::from_iter(layers.iter().copied())
            ),
            Notice::SlowPath { field, value } => write!(
                f,
                "`{field}` = {value} is supported, but the fused LoRA kernels need \
                 `lora_dropout` = 0 and `bias` = \"none\"; training takes the slower path"
            ),
            Notice::TrainedInFullNotAdapted { module } => write!(
                f,
                "`{module}` is in both `target_modules` and `modules_to_save`: it is trained \
                 in full and gets no LoRA adapter"
            ),
            Notice::LoftqConfigCleared => f.write_str(
                "`loftq_config` is ignored unless `init_lora_weights` is \"loftq\"; cleared it",
            ),
            Notice::InitSettingsIgnored { field } => write!(
                f,
                "`{field}` is ignored: its initialisation method is not selected"
            ),
            Notice::UnusedPatternKey { field, key } => {
                write!(f, "`{field}` key `{key}` selects no adapted module")
            }
            Notice::AlreadyHasAdapters => {
                f.write_str("Already have LoRA adapters! We shall skip this step.")
            }
        }
    }
}

/// Only causal language modelling is trained.
const CAUSAL_LM: &str = "CAUSAL_LM";

impl LoraConfig {
    /// Checks everything that does not depend on the model: ranks, alphas, dropout, the
    /// initialisation, regular expressions, and that no unsupported PEFT option is on.
    ///
    /// # Errors
    ///
    /// The first problem found, e.g. [`LoraConfigError::InvalidRank`] for `r = 0`,
    /// [`LoraConfigError::UnsupportedOption`] for `use_dora = true`, or
    /// [`LoraConfigError::InvalidRegex`] for a pattern that does not compile.
    pub fn validate_values(&self) -> Result<(), LoraConfigError> {
        check_rank("r".to_owned(), self.r)?;
        for (key, &rank) in &self.rank_pattern {
            check_rank(format!("rank_pattern[\"{key}\"]"), rank)?;
        }
        check_alpha("lora_alpha".to_owned(), self.lora_alpha)?;
        for (key, &alpha) in &self.alpha_pattern {
            check_alpha(format!("alpha_pattern[\"{key}\"]"), alpha)?;
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(LoraConfigError::InvalidDropout {
                value: self.lora_dropout,
            });
        }
        if !self.init_lora_weights.is_supported() {
            return Err(LoraConfigError::UnsupportedInit {
                value: self.init_lora_weights.to_string(),
            });
        }
        self.check_unsupported_options()?;
        self.check_regexes()?;
        self.check_layer_selection_options()
    }

    /// Fits the config to a model: validates it and applies Unsloth's and PEFT's adjustments.
    ///
    /// Adjustments, each reported as a [`Notice`]:
    /// - `target_modules = None` becomes the architecture's PEFT default;
    /// - `finetune_last_n_layers = n` becomes `layers_to_transform` = the last `n` layers
    ///   (clamped to 1..=num_layers) when `layers_to_transform` is unset;
    /// - `embed_tokens` in `target_modules` moves to `modules_to_save` (Unsloth's rule);
    ///   `lm_head` stays a legal LoRA target;
    /// - duplicate `modules_to_save` entries are dropped; a non-empty `loftq_config` is cleared.
    ///
    /// # Errors
    ///
    /// Everything [`LoraConfig::validate_values`] reports, plus
    /// [`LoraConfigError::UnknownTargetModule`], [`LoraConfigError::InvalidModulesToSave`],
    /// [`LoraConfigError::LayerIndexOutOfRange`], [`LoraConfigError::UnsupportedOption`] for
    /// a regular expression that selects the embedding, and
    /// [`LoraConfigError::NothingToTrain`].
    pub fn normalize(
        mut self,
        arch: &ArchitectureInfo,
    ) -> Result<(LoraConfig, Vec<Notice>), LoraConfigError> {
        self.validate_values()?;
        let mut notices = Vec::new();
        notices.extend(self.fill_default_targets(arch));
        notices.extend(self.select_last_layers(arch));
        notices.extend(self.move_embedding_to_modules_to_save(arch));
        self.check_target_names(arch)?;
        self.check_modules_to_save(arch)?;
        self.check_layer_indices(arch)?;
        self.check_pattern_spares_embedding(arch)?;
        if !self.loftq_config.is_empty() {
            self.loftq_config.clear();
            notices.push(Notice::LoftqConfigCleared);
        }
        notices.extend(self.ignored_init_settings());
        notices.extend(self.slow_path_notices());
        notices.extend(self.modules_trained_in_full_not_adapted());
        notices.extend(self.unused_pattern_keys(arch));
        let trains_in_full = self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty());
        if self.targeted_modules(arch).is_empty() && !trains_in_full {
            return Err(LoraConfigError::NothingToTrain {
                target_modules: self.target_modules_json(),
            });
        }
        Ok((self, notices))
    }

    /// Checks the config against a model without changing it; the notices say what
    /// [`LoraConfig::normalize`] would adjust.
    ///
    /// # Errors
    ///
    /// As [`LoraConfig::normalize`].
    pub fn validate(&self, arch: &ArchitectureInfo) -> Result<Vec<Notice>, LoraConfigError> {
        self.clone().normalize(arch).map(|(_, notices)| notices)
    }

    /// Full dotted names of the modules of `arch` that get adapters, in model order.
    pub fn targeted_modules(&self, arch: &ArchitectureInfo) -> Vec<String> {
        arch.modules()
            .into_iter()
            .filter(|(name, kind)| self.targets_with_kind(name, *kind))
            .map(|(name, _)| name)
            .collect()
    }

    fn check_unsupported_options(&self) -> Result<(), LoraConfigError> {
        let switches: [(&'static str, bool, &'static str); 4] = [
            (
                "use_dora",
                self.use_dora,
                "DoRA is not implemented; set `use_dora` to false",
            ),
            (
                "fan_in_fan_out",
                self.fan_in_fan_out,
                "Llama's linear weights are stored as (out_features, in_features); \
                 set `fan_in_fan_out` to false",
            ),
            (
                "lora_bias",
                self.lora_bias,
                "a trainable bias on lora_B is not implemented; set `lora_bias` to false",
            ),
            (
                "use_qalora",
                self.use_qalora,
                "QA-LoRA is not implemented; set `use_qalora` to false",
            ),
        ];
        if let Some((field, _, reason)) = switches.into_iter().find(|(_, on, _)| *on) {
            return Err(LoraConfigError::UnsupportedOption {
                field,
                value: "true".to_owned(),
                reason,
            });
        }

        let variant_configs: [(&'static str, &Option<Value>, &'static str); 9] = [
            (
                "megatron_config",
                &self.megatron_config,
                "Megatron parallel layers are not implemented; set it to null",
            ),
            (
                "layer_replication",
                &self.layer_replication,
                "layer replication is not implemented; set it to null",
            ),
            (
                "trainable_token_indices",
                &self.trainable_token_indices,
                "training single token embeddings is not implemented; set it to null, or \
                 list `embed_tokens` in `modules_to_save`",
            ),
            (
                "alora_invocation_tokens",
                &self.alora_invocation_tokens,
                "activated LoRA is not implemented; set it to null",
            ),
            (
                "velora_config",
                &self.velora_config,
                "VeLoRA is not implemented; set it to null",
            ),
            (
                "monteclora_config",
                &self.monteclora_config,
                "MonteCLoRA is not implemented; set it to null",
            ),
            (
                "use_bdlora",
                &self.use_bdlora,
                "block-diagonal LoRA is not implemented; set it to null",
            ),
            (
                "arrow_config",
                &self.arrow_config,
                "Arrow routing is not implemented; set it to null",
            ),
            (
                "kasa_config",
                &self.kasa_config,
                "KaSA is not implemented; set it to null",
            ),
        ];
        if let Some((field, Some(value), reason)) = variant_configs
            .into_iter()
            .find(|(_, value, _)| value.as_ref().is_some_and(|v| !v.is_null()))
        {
            return Err(LoraConfigError::UnsupportedOption {
                field,
                value: value.to_string(),
                reason,
            });
        }

        if let Some(parameters) = self.target_parameters.as_ref().filter(|p| !p.is_empty()) {
            return Err(LoraConfigError::UnsupportedOption {
                field: "target_parameters",
                value: Value::from_iter(parameters.iter().cloned()).to_string(),
                reason: "LoRA on bare parameters (MoE experts) is not implemented; \
                         set it to null or []",
            });
        }
        if let Some(scheme) = &self.qat_scheme {
            return Err(LoraConfigError::UnsupportedOption {
                field: "qat_scheme",
                value: Value::from(scheme.as_str()).to_string(),
                reason: "quantisation-aware training is not implemented; leave it unset",
            });
        }
        if let Some(task) = self.task_type.as_deref().filter(|task| *task != CAUSAL_LM) {
            return Err(LoraConfigError::UnsupportedOption {
                field: "task_type",
                value: Value::from(task).to_string(),
                reason: "only causal language modelling is trained; use \"CAUSAL_LM\"",
            });
        }
        Ok(())
    }

    fn check_regexes(&self) -> Result<(), LoraConfigError> {
        if let Some(TargetModules::Pattern(pattern)) = &self.target_modules {
            check_regex("target_modules", pattern, pattern)?;
        }
        if let Some(ExcludeModules::Pattern(pattern)) = &self.exclude_modules {
            check_regex("exclude_modules", pattern, pattern)?;
        }
        // The keys are pasted into `(.*\.)?(key)$` by PEFT; check them in that position.
        for key in self.rank_pattern.keys() {
            check_regex("rank_pattern", key, &format!(r"(?:.*\.)?(?:{key})"))?;
        }
        for key in self.alpha_pattern.keys() {
            check_regex("alpha_pattern", key, &format!(r"(?:.*\.)?(?:{key})"))?;
        }
        for pattern in self.layers_pattern.iter().flatten() {
            check_regex(
                "layers_pattern",
                pattern,
                &format!(r".*?\.(?:{pattern})\.[0-9]+\."),
            )?;
        }
        Ok(())
    }

    /// PEFT's `__post_init__` rules for the layer selection options.
    fn check_layer_selection_options(&self) -> Result<(), LoraConfigError> {
        let is_pattern = matches!(self.target_modules, Some(TargetModules::Pattern(_)));
        if is_pattern && self.layers_to_transform.is_some() {
            return Err(LoraConfigError::IncompatibleOptions {
                reason: "`layers_to_transform` cannot be used when `target_modules` is a regular \
                         expression; put the layer indices into the expression, or list module \
                         names in `target_modules`",
            });
        }
        if is_pattern && self.layers_pattern.is_some() {
            return Err(LoraConfigError::IncompatibleOptions {
                reason: "`layers_pattern` cannot be used when `target_modules` is a regular \
                         expression; remove `layers_pattern`",
            });
        }
        let has_layers_pattern = self.layers_pattern.as_ref().is_some_and(|p| !p.is_empty());
        let selects_layers =
            self.layers_to_transform.is_some() || self.finetune_last_n_layers.is_some();
        if has_layers_pattern && !selects_layers {
            return Err(LoraConfigError::IncompatibleOptions {
                reason: "`layers_pattern` is set but `layers_to_transform` is not; set \
                         `layers_to_transform` too, or remove `layers_pattern`",
            });
        }
        Ok(())
    }

    fn fill_default_targets(&mut self, arch: &ArchitectureInfo) -> Option<Notice> {
        // PEFT leaves `target_modules` unset when only `target_parameters` is used.
        if self.target_modules.is_some() || self.target_parameters.is_some() {
            return None;
        }
        self.target_modules = Some(TargetModules::names(
            arch.default_target_modules.iter().cloned(),
        ));
        Some(Notice::DefaultTargetModules {
            modules: arch.default_target_modules.clone(),
        })
    }

    fn select_last_layers(&mut self, arch: &ArchitectureInfo) -> Option<Notice> {
        let wanted = self.finetune_last_n_layers?;
        if self.layers_to_transform.is_some() || arch.num_layers == 0 {
            return None;
        }
        let count = wanted.clamp(1, arch.num_layers);
        let layers: Vec<usize> = (arch.num_layers - count..arch.num_layers).collect();
        self.layers_to_transform = Some(layers.clone());
        Some(Notice::LastLayersSelected { layers })
    }

    fn move_embedding_to_modules_to_save(&mut self, arch: &ArchitectureInfo) -> Vec<Notice> {
        let Some(TargetModules::Names(names)) = &mut self.target_modules else {
            return Vec::new();
        };
        let embedding = arch.embedding_name();
        let moved: Vec<String> = names
            .iter()
            .filter(|name| last_component(name) == embedding)
            .cloned()
            .collect();
        names.retain(|name| last_component(name) != embedding);
        if moved.is_empty() {
            return Vec::new();
        }
        let saved = self.modules_to_save.get_or_insert_with(Vec::new);
        if !saved.iter().any(|name| last_component(name) == embedding) {
            saved.push(embedding.to_owned());
        }
        moved
            .into_iter()
            .map(|module| Notice::EmbeddingMovedToModulesToSave { module })
            .collect()
    }

    fn check_target_names(&self, arch: &ArchitectureInfo) -> Result<(), LoraConfigError> {
        let Some(TargetModules::Names(names)) = &self.target_modules else {
            return Ok(());
        };
        let mut valid = arch.linear_module_names();
        valid.push(arch.lm_head_name().to_owned());
        match names
            .iter()
            .find(|name| !valid.iter().any(|v| v == last_component(name)))
        {
            None => Ok(()),
            Some(unknown) => {
                // embed_tokens is accepted too (it moves to modules_to_save): say so.
                valid.push(arch.embedding_name().to_owned());
                Err(LoraConfigError::UnknownTargetModule {
                    name: unknown.clone(),
                    valid,
                })
            }
        }
    }

    fn check_modules_to_save(&mut self, arch: &ArchitectureInfo) -> Result<(), LoraConfigError> {
        let Some(saved) = &mut self.modules_to_save else {
            return Ok(());
        };
        let allowed = [arch.embedding_module.as_str(), arch.lm_head_module.as_str()];
        if let Some(bad) = saved
            .iter()
            .find(|name| !allowed.iter().any(|full| is_dotted_suffix(name, full)))
        {
            return Err(LoraConfigError::InvalidModulesToSave {
                name: bad.clone(),
                allowed: vec![
                    arch.embedding_name().to_owned(),
                    arch.lm_head_name().to_owned(),
                ],
            });
        }
        let mut seen = Vec::with_capacity(saved.len());
        saved.retain(|name| {
            let new = !seen.contains(name);
            seen.push(name.clone());
            new
        });
        Ok(())
    }

    fn check_layer_indices(&self, arch: &ArchitectureInfo) -> Result<(), LoraConfigError> {
        match self
            .layers_to_transform
            .iter()
            .flatten()
            .find(|&&index| index >= arch.num_layers)
        {
            Some(&index) => Err(LoraConfigError::LayerIndexOutOfRange {
                index,
                num_layers: arch.num_layers,
            }),
            None => Ok(()),
        }
    }

    /// LoRA on embeddings is not implemented; a list entry moves to `modules_to_save`, but a
    /// regular expression cannot be rewritten, so it is refused.
    fn check_pattern_spares_embedding(
        &self,
        arch: &ArchitectureInfo,
    ) -> Result<(), LoraConfigError> {
        let Some(TargetModules::Pattern(pattern)) = &self.target_modules else {
            return Ok(());
        };
        if self.targets_with_kind(&arch.embedding_module, ModuleKind::Embedding) {
            return Err(LoraConfigError::UnsupportedOption {
                field: "target_modules",
                value: Value::from(pattern.as_str()).to_string(),
                reason: "the expression selects the token embedding, and LoRA on embeddings is \
                         not implemented; exclude it, or list `embed_tokens` in \
                         `modules_to_save` to train it in full",
            });
        }
        Ok(())
    }

    fn ignored_init_settings(&self) -> Vec<Notice> {
        [
            ("eva_config", &self.eva_config),
            ("corda_config", &self.corda_config),
            ("lora_ga_config", &self.lora_ga_config),
        ]
        .into_iter()
        .filter(|(_, value)| value.as_ref().is_some_and(|v| !v.is_null()))
        .map(|(field, _)| Notice::InitSettingsIgnored { field })
        .collect()
    }

    fn slow_path_notices(&self) -> Vec<Notice> {
        let mut notices = Vec::new();
        if self.lora_dropout != 0.0 {
            notices.push(Notice::SlowPath {
                field: "lora_dropout",
                value: self.lora_dropout.to_string(),
            });
        }
        if self.bias != Bias::None {
            notices.push(Notice::SlowPath {
                field: "bias",
                value: format!("\"{}\"", self.bias),
            });
        }
        notices
    }

    fn modules_trained_in_full_not_adapted(&self) -> Vec<Notice> {
        let (Some(TargetModules::Names(names)), Some(saved)) =
            (&self.target_modules, &self.modules_to_save)
        else {
            return Vec::new();
        };
        names
            .iter()
            .filter(|name| {
                saved
                    .iter()
                    .any(|s| last_component(s) == last_component(name))
            })
            .map(|name| Notice::TrainedInFullNotAdapted {
                module: name.clone(),
            })
            .collect()
    }

    fn unused_pattern_keys(&self, arch: &ArchitectureInfo) -> Vec<Notice> {
        let adapted = self.targeted_modules(arch);
        let unused = |field: &'static str, key: &String| {
            (!adapted.iter().any(|name| pattern_key_matches(key, name))).then(|| {
                Notice::UnusedPatternKey {
                    field,
                    key: key.clone(),
                }
            })
        };
        let ranks = self
            .rank_pattern
            .keys()
            .filter_map(|k| unused("rank_pattern", k));
        let alphas = self
            .alpha_pattern
            .keys()
            .filter_map(|k| unused("alpha_pattern", k));
        ranks.chain(alphas).collect()
    }

    pub(crate) fn target_modules_json(&self) -> String {
        self.target_modules
            .as_ref()
            .map_or(Value::Null, TargetModules::to_json_value)
            .to_string()
    }
}

fn check_rank(field: String, value: usize) -> Result<(), LoraConfigError> {
    if value == 0 {
        return Err(LoraConfigError::InvalidRank { field, value });
    }
    Ok(())
}

fn check_alpha(field: String, value: f64) -> Result<(), LoraConfigError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(LoraConfigError::InvalidAlpha { field, value });
    }
    Ok(())
}

/// Checks that `pattern` compiles on its own (so that the error points into the user's text)
/// and inside `body`, the expression matching will build around it.
fn check_regex(field: &'static str, pattern: &str, body: &str) -> Result<(), LoraConfigError> {
    Regex::new(pattern)
        .and_then(|_| Regex::new(&format!("^(?:{body})$")))
        .map(|_| ())
        .map_err(|error| LoraConfigError::InvalidRegex {
            field,
            pattern: pattern.to_owned(),
            reason: error.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InitLoraWeights;

    fn llama() -> ArchitectureInfo {
        ArchitectureInfo::llama(4)
    }

    fn normalize(config: LoraConfig) -> Result<(LoraConfig, Vec<Notice>), LoraConfigError> {
        config.normalize(&llama())
    }

    fn error_of(config: LoraConfig) -> LoraConfigError {
        match normalize(config) {
            Ok(_) => panic!("expected an error"),
            Err(error) => error,
        }
    }

    #[test]
    fn unsloth_defaults_are_valid_and_silent() {
        let (config, notices) = normalize(LoraConfig::default()).unwrap();
        assert_eq!(config, LoraConfig::default());
        assert!(notices.is_empty(), "{notices:?}");
        assert_eq!(config.targeted_modules(&llama()).len(), 4 * 7);
    }

    #[test]
    fn zero_rank_is_rejected_with_field_name() {
        let error = error_of(LoraConfig {
            r: 0,
            ..LoraConfig::default()
        });
        assert!(
            matches!(error, LoraConfigError::InvalidRank { ref field, value: 0 } if field == "r")
        );
        let message = error.to_string();
        assert!(
            message.contains("`r`") && message.contains("greater than 0"),
            "{message}"
        );

        let mut config = LoraConfig::default();
        config.rank_pattern.insert("q_proj".into(), 0);
        let message = error_of(config).to_string();
        assert!(message.contains("rank_pattern[\"q_proj\"]"), "{message}");
    }

    #[test]
    fn bad_alpha_is_rejected() {
        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let error = error_of(LoraConfig {
                lora_alpha: alpha,
                ..LoraConfig::default()
            });
            assert!(
                matches!(error, LoraConfigError::InvalidAlpha { .. }),
                "{alpha}"
            );
            let message = error.to_string();
            assert!(message.contains("`lora_alpha`") && message.contains("greater than 0"));
        }
        let mut config = LoraConfig::default();
        config.alpha_pattern.insert("v_proj".into(), -2.0);
        let message = error_of(config).to_string();
        assert!(message.contains("alpha_pattern[\"v_proj\"]"), "{message}");
    }

    #[test]
    fn dropout_must_lie_in_unit_interval() {
        for dropout in [-0.1, 1.0, 1.5, f64::NAN] {
            let error = error_of(LoraConfig {
                lora_dropout: dropout,
                ..LoraConfig::default()
            });
            assert!(matches!(error, LoraConfigError::InvalidDropout { .. }));
            let message = error.to_string();
            assert!(message.contains("`lora_dropout`") && message.contains("[0.0, 1.0)"));
        }
        let (_, notices) = normalize(LoraConfig {
            lora_dropout: 0.1,
            ..LoraConfig::default()
        })
        .unwrap();
        assert!(matches!(
            notices.as_slice(),
            [Notice::SlowPath {
                field: "lora_dropout",
                ..
            }]
        ));
    }

    #[test]
    fn unknown_target_module_lists_valid_names() {
        let error = error_of(LoraConfig {
            target_modules: Some(TargetModules::names(["q_proj", "c_attn"])),
            ..LoraConfig::default()
        });
        let LoraConfigError::UnknownTargetModule { name, valid } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(name, "c_attn");
        assert!(valid.contains(&"down_proj".to_owned()) && valid.contains(&"lm_head".to_owned()));
        let message = error.to_string();
        assert!(message.contains("`target_modules`") && message.contains("\"q_proj\""));
    }

    #[test]
    fn layer_index_out_of_range_names_the_range() {
        let error = error_of(LoraConfig {
            layers_to_transform: Some(vec![0, 4]),
            ..LoraConfig::default()
        });
        assert!(matches!(
            error,
            LoraConfigError::LayerIndexOutOfRange {
                index: 4,
                num_layers: 4
            }
        ));
        let message = error.to_string();
        assert!(message.contains("`layers_to_transform`") && message.contains("0..4"));
    }

    #[test]
    fn modules_to_save_allows_only_embeddings_and_head() {
        let error = error_of(LoraConfig {
            modules_to_save: Some(vec!["lm_head".into(), "norm".into()]),
            ..LoraConfig::default()
        });
        assert!(
            matches!(error, LoraConfigError::InvalidModulesToSave { ref name, .. } if name == "norm")
        );
        let message = error.to_string();
        assert!(message.contains("`modules_to_save`"));
        assert!(message.contains("\"embed_tokens\"") && message.contains("\"lm_head\""));

        let (config, _) = normalize(LoraConfig {
            modules_to_save: Some(vec![
                "lm_head".into(),
                "model.embed_tokens".into(),
                "lm_head".into(),
            ]),
            ..LoraConfig::default()
        })
        .unwrap();
        assert_eq!(
            config.modules_to_save,
            Some(vec!["lm_head".into(), "model.embed_tokens".into()])
        );
    }

    #[test]
    fn unsupported_init_lists_supported_values() {
        for init in [
            InitLoraWeights::Loftq,
            InitLoraWeights::Other("olora".into()),
        ] {
            let error = error_of(LoraConfig {
                init_lora_weights: init,
                ..LoraConfig::default()
            });
            assert!(matches!(error, LoraConfigError::UnsupportedInit { .. }));
            let message = error.to_string();
            assert!(message.contains("`init_lora_weights`"));
            assert!(
                message.contains("true, false, \"gaussian\", \"pissa\""),
                "{message}"
            );
        }
        for init in [
            InitLoraWeights::Standard,
            InitLoraWeights::Random,
            InitLoraWeights::Gaussian,
            InitLoraWeights::Pissa { niter: Some(4) },
        ] {
            normalize(LoraConfig {
                init_lora_weights: init,
                ..LoraConfig::default()
            })
            .unwrap();
        }
    }

    #[test]
    fn unsupported_peft_options_are_named() {
        let cases: [(&str, LoraConfig); 8] = [
            (
                "kasa_config",
                LoraConfig {
                    kasa_config: Some(serde_json::json!({})),
                    ..LoraConfig::default()
                },
            ),
            (
                "use_dora",
                LoraConfig {
                    use_dora: true,
                    ..LoraConfig::default()
                },
            ),
            (
                "fan_in_fan_out",
                LoraConfig {
                    fan_in_fan_out: true,
                    ..LoraConfig::default()
                },
            ),
            (
                "lora_bias",
                LoraConfig {
                    lora_bias: true,
                    ..LoraConfig::default()
                },
            ),
            (
                "use_qalora",
                LoraConfig {
                    use_qalora: true,
                    ..LoraConfig::default()
                },
            ),
            (
                "layer_replication",
                LoraConfig {
                    layer_replication: Some(serde_json::json!([[0, 4], [2, 6]])),
                    ..LoraConfig::default()
                },
            ),
            (
                "qat_scheme",
                LoraConfig {
                    qat_scheme: Some("int4".into()),
                    ..LoraConfig::default()
                },
            ),
            (
                "task_type",
                LoraConfig {
                    task_type: Some("SEQ_CLS".into()),
                    ..LoraConfig::default()
                },
            ),
        ];
        for (expected, config) in cases {
            let error = error_of(config);
            let LoraConfigError::UnsupportedOption { field, .. } = &error else {
                panic!("{error:?}");
            };
            assert_eq!(*field, expected);
            assert!(
                error.to_string().contains(&format!("`{expected}`")),
                "{error}"
            );
        }
        let message = error_of(LoraConfig {
            use_dora: true,
            ..LoraConfig::default()
        })
        .to_string();
        assert!(message.contains("set `use_dora` to false"), "{message}");
    }

    #[test]
    fn invalid_regexes_are_reported() {
        let error = error_of(LoraConfig {
            target_modules: Some(TargetModules::Pattern(r".*\.(q|v_proj".into())),
            ..LoraConfig::default()
        });
        assert!(matches!(
            error,
            LoraConfigError::InvalidRegex {
                field: "target_modules",
                ..
            }
        ));

        let mut config = LoraConfig::default();
        config.rank_pattern.insert("q_proj[".into(), 4);
        assert!(matches!(
            error_of(config),
            LoraConfigError::InvalidRegex {
                field: "rank_pattern",
                ..
            }
        ));

        let error = error_of(LoraConfig {
            layers_to_transform: Some(vec![0]),
            layers_pattern: Some(vec!["(?<=x)layers".into()]),
            ..LoraConfig::default()
        });
        assert!(matches!(
            error,
            LoraConfigError::InvalidRegex {
                field: "layers_pattern",
                ..
            }
        ));
    }

    #[test]
    fn peft_layer_option_rules() {
        let pattern = || Some(TargetModules::Pattern(r".*\.q_proj".into()));
        for config in [
            LoraConfig {
                target_modules: pattern(),
                layers_to_transform: Some(vec![0]),
                ..LoraConfig::default()
            },
            LoraConfig {
                layers_pattern: Some(vec!["layers".into()]),
                ..LoraConfig::default()
            },
        ] {
            assert!(matches!(
                error_of(config),
                LoraConfigError::IncompatibleOptions { .. }
            ));
        }
    }

    #[test]
    fn embed_tokens_moves_to_modules_to_save() {
        let (config, notices) = normalize(LoraConfig {
            target_modules: Some(TargetModules::names(["q_proj", "embed_tokens", "lm_head"])),
            ..LoraConfig::default()
        })
        .unwrap();
        assert_eq!(
            config.target_modules,
            Some(TargetModules::names(["q_proj", "lm_head"]))
        );
        assert_eq!(
            config.modules_to_save,
            Some(vec!["embed_tokens".to_owned()])
        );
        assert_eq!(
            notices,
            [Notice::EmbeddingMovedToModulesToSave {
                module: "embed_tokens".into()
            }]
        );
        assert!(notices[0].to_string().contains("modules_to_save"));
        // lm_head stays a LoRA target.
        assert!(config.targets("lm_head"));
        assert!(!config.targets_with_kind("model.embed_tokens", ModuleKind::Embedding));
    }

    #[test]
    fn regex_selecting_the_embedding_is_refused() {
        let error = error_of(LoraConfig {
            target_modules: Some(TargetModules::Pattern(".*".into())),
            ..LoraConfig::default()
        });
        assert!(matches!(
            error,
            LoraConfigError::UnsupportedOption {
                field: "target_modules",
                ..
            }
        ));
    }

    #[test]
    fn missing_targets_take_peft_architecture_default() {
        let (config, notices) = normalize(LoraConfig {
            target_modules: None,
            ..LoraConfig::default()
        })
        .unwrap();
        assert_eq!(
            config.target_modules,
            Some(TargetModules::names(["q_proj", "v_proj"]))
        );
        assert!(matches!(
            notices.as_slice(),
            [Notice::DefaultTargetModules { .. }]
        ));
    }

    #[test]
    fn finetune_last_n_layers_selects_the_tail() {
        let (config, notices) = normalize(LoraConfig {
            finetune_last_n_layers: Some(2),
            ..LoraConfig::default()
        })
        .unwrap();
        assert_eq!(config.layers_to_transform, Some(vec![2, 3]));
        assert_eq!(notices, [Notice::LastLayersSelected { layers: vec![2, 3] }]);
        assert!(!config.targets("model.layers.1.self_attn.q_proj"));
        assert!(config.targets("model.layers.3.self_attn.q_proj"));

        let (clamped, _) = normalize(LoraConfig {
            finetune_last_n_layers: Some(99),
            ..LoraConfig::default()
        })
        .unwrap();
        assert_eq!(clamped.layers_to_transform, Some(vec![0, 1, 2, 3]));
    }

    #[test]
    fn nothing_to_train_is_an_error() {
        let error = error_of(LoraConfig {
            target_modules: Some(TargetModules::names(["q_proj"])),
            exclude_modules: Some(ExcludeModules::Names(["q_proj".to_owned()].into())),
            ..LoraConfig::default()
        });
        assert!(matches!(error, LoraConfigError::NothingToTrain { .. }));

        // Training only the embedding in full is fine.
        normalize(LoraConfig {
            target_modules: Some(TargetModules::names(["embed_tokens"])),
            ..LoraConfig::default()
        })
        .unwrap();
    }

    #[test]
    fn informative_notices() {
        let mut config = LoraConfig {
            bias: Bias::All,
            target_modules: Some(TargetModules::names(["q_proj", "lm_head"])),
            modules_to_save: Some(vec!["lm_head".into()]),
            eva_config: Some(serde_json::json!({"rho": 2.0})),
            ..LoraConfig::default()
        };
        config.rank_pattern.insert("gate_proj".into(), 4);
        config.loftq_config.insert("loftq_bits".into(), 4.into());
        let (config, notices) = normalize(config).unwrap();
        assert!(config.loftq_config.is_empty());
        for expected in [
            Notice::LoftqConfigCleared,
            Notice::InitSettingsIgnored {
                field: "eva_config",
            },
            Notice::SlowPath {
                field: "bias",
                value: "\"all\"".into(),
            },
            Notice::TrainedInFullNotAdapted {
                module: "lm_head".into(),
            },
            Notice::UnusedPatternKey {
                field: "rank_pattern",
                key: "gate_proj".into(),
            },
        ] {
            assert!(
                notices.contains(&expected),
                "{expected:?} missing from {notices:?}"
            );
        }
        for notice in &notices {
            assert!(!notice.to_string().is_empty());
        }
    }

    #[test]
    fn validate_does_not_change_the_config() {
        let config = LoraConfig {
            target_modules: Some(TargetModules::names(["q_proj", "embed_tokens"])),
            ..LoraConfig::default()
        };
        let notices = config.validate(&llama()).unwrap();
        assert_eq!(notices.len(), 1);
        assert!(config.modules_to_save.is_none());
    }
}
