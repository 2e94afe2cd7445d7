//! Integration tests live in `tests/`; fixtures in `fixtures/`, made by `scripts/`.
//!
//! This library holds what both the tests and the fixture-making example need: the adapters
//! fastlora itself makes for the PEFT cross-check (`fixtures/fastlora-made`, checked on the GPU
//! machine by `scripts/check_with_peft.py`).

use std::path::{Path, PathBuf};

use fastlora::lora_config::{Bias, InitLoraWeights};
use fastlora::{CpuBackend, FastLanguageModel, LoraConfig, Result, logits_command};

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// The adapters fastlora makes for PEFT to load: (folder name, base fixture, config).
pub fn fastlora_made_adapters() -> Vec<(&'static str, &'static str, LoraConfig)> {
    vec![
        (
            "llama-tiny-unsloth-defaults",
            "llama-tiny",
            LoraConfig {
                init_lora_weights: InitLoraWeights::Random,
                ..LoraConfig::default()
            },
        ),
        (
            "qwen2-tiny-rslora-bias-mts",
            "qwen2-tiny",
            LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                use_rslora: true,
                bias: Bias::All,
                modules_to_save: Some(vec!["lm_head".into()]),
                init_lora_weights: InitLoraWeights::Random,
                random_state: 7,
                ..LoraConfig::default()
            },
        ),
    ]
}

/// Writes each of [`fastlora_made_adapters`] into `out/<name>/` with the logits fastlora
/// computes with it on `fixtures/inputs.safetensors` (`logits.safetensors`).
///
/// # Errors
/// Loading or writing failures.
pub fn make_fastlora_adapters(out: &Path) -> Result<()> {
    let device = Default::default();
    for (name, base, config) in fastlora_made_adapters() {
        let model = FastLanguageModel::<CpuBackend>::from_pretrained(
            fixture(base).to_str().unwrap_or(base),
            &device,
        )?;
        let dir = out.join(name);
        let mut peft = model.get_peft_model(config)?;
        // PEFT records the base it was made on; the check script resolves it beside the adapter.
        peft.lora_config.base_model_name_or_path = Some(base.to_string());
        peft.save_pretrained(&dir)?;
        logits_command::<CpuBackend>(
            fixture(base).to_str().unwrap_or(base),
            Some(&dir),
            &fixture("inputs.safetensors"),
            &dir.join("logits.safetensors"),
            &device,
        )?;
    }
    Ok(())
}
