//! Unsloth's rule for calling `get_peft_model` on a model that already has LoRA adapters.

use serde_json::Value;

use crate::LoraConfig;
use crate::error::{ConfigDifference, LoraConfigError};
use crate::validate::Notice;

/// What to do when LoRA is requested for a model that already has adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReapplyDecision {
    /// The existing adapters match the request: keep them and do nothing.
    KeepExisting,
}

impl ReapplyDecision {
    /// The message to show the user.
    pub fn notice(self) -> Notice {
        match self {
            ReapplyDecision::KeepExisting => Notice::AlreadyHasAdapters,
        }
    }
}

/// The parameters Unsloth compares before reusing existing adapters. `modules_to_save` is not
/// among them: Unsloth keeps the existing adapter's.
const COMPARED_FIELDS: [&str; 10] = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "bias",
    "layers_to_transform",
    "layers_pattern",
    "use_rslora",
    "init_lora_weights",
    "use_dora",
    "target_modules",
];

impl LoraConfig {
    /// Decides whether this requested config may reuse the adapters a model already has,
    /// made with `existing`: it may when `r`, `lora_alpha`, `lora_dropout`, `bias`,
    /// `layers_to_transform`, `layers_pattern`, `use_rslora`, `init_lora_weights`, `use_dora`
    /// and the set of target modules are equal, and neither `loftq_config` holds anything.
    ///
    /// Compare configs after [`LoraConfig::normalize`], so that `embed_tokens` has moved out of
    /// `target_modules` in both.
    ///
    /// # Errors
    ///
    /// [`LoraConfigError::AlreadyHasDifferentAdapters`], listing every parameter that differs.
    pub fn check_reapply(&self, existing: &LoraConfig) -> Result<ReapplyDecision, LoraConfigError> {
        let requested_values = self.peft_field_values();
        let existing_values = existing.peft_field_values();
        let value_of = |values: &[(&'static str, Value)], field: &str| {
            values
                .iter()
                .find(|(key, _)| *key == field)
                .map_or(Value::Null, |(_, value)| value.clone())
        };

        let mut differences: Vec<ConfigDifference> = COMPARED_FIELDS
            .iter()
            .filter_map(|&field| {
                let requested = value_of(&requested_values, field);
                let existing = value_of(&existing_values, field);
                (requested != existing).then(|| ConfigDifference {
                    field,
                    requested: requested.to_string(),
                    existing: existing.to_string(),
                })
            })
            .collect();
        if !(self.loftq_config.is_empty() && existing.loftq_config.is_empty()) {
            differences.push(ConfigDifference {
                field: "loftq_config",
                requested: Value::Object(self.loftq_config.clone()).to_string(),
                existing: Value::Object(existing.loftq_config.clone()).to_string(),
            });
        }

        if differences.is_empty() {
            Ok(ReapplyDecision::KeepExisting)
        } else {
            Err(LoraConfigError::AlreadyHasDifferentAdapters { differences })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Bias, TargetModules};

    #[test]
    fn same_parameters_keep_existing_adapters() {
        let existing = LoraConfig::default();
        let requested = LoraConfig {
            // Not compared, as in Unsloth.
            random_state: 1,
            modules_to_save: Some(vec!["lm_head".into()]),
            ..LoraConfig::default()
        };
        let decision = requested.check_reapply(&existing).unwrap();
        assert_eq!(decision, ReapplyDecision::KeepExisting);
        assert_eq!(
            decision.notice().to_string(),
            "Already have LoRA adapters! We shall skip this step."
        );
    }

    #[test]
    fn target_order_does_not_matter() {
        let a = LoraConfig {
            target_modules: Some(TargetModules::names(["v_proj", "q_proj"])),
            ..LoraConfig::default()
        };
        let b = LoraConfig {
            target_modules: Some(TargetModules::names(["q_proj", "v_proj"])),
            ..LoraConfig::default()
        };
        assert!(a.check_reapply(&b).is_ok());
    }

    #[test]
    fn different_parameters_are_listed() {
        let existing = LoraConfig::default();
        let mut requested = LoraConfig {
            r: 32,
            bias: Bias::All,
            target_modules: Some(TargetModules::names(["q_proj"])),
            ..LoraConfig::default()
        };
        requested.loftq_config.insert("loftq_bits".into(), 4.into());
        let error = requested.check_reapply(&existing).unwrap_err();
        let LoraConfigError::AlreadyHasDifferentAdapters { differences } = &error else {
            panic!("{error:?}");
        };
        let fields: Vec<_> = differences.iter().map(|d| d.field).collect();
        assert_eq!(fields, ["r", "bias", "target_modules", "loftq_config"]);
        assert_eq!(differences[0].requested, "32");
        assert_eq!(differences[0].existing, "16");
        let message = error.to_string();
        assert!(message.contains("already has LoRA adapters"), "{message}");
        assert!(
            message.contains("`r`: requested 32, existing 16"),
            "{message}"
        );
    }

    #[test]
    fn integral_alpha_compares_equal_across_spellings() {
        let existing = LoraConfig::from_json_str(
            r#"{"peft_type":"LORA","r":16,"lora_alpha":16,
                "target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}"#,
        )
        .unwrap();
        assert!(LoraConfig::default().check_reapply(&existing).is_ok());
    }
}
