//! The built-in tiny Llama that `fastlora train` uses when no model is given: a 2-layer
//! Llama-architecture model with seeded random weights and a small byte-level BPE tokenizer,
//! written as an ordinary HF folder so it loads, trains and generates through the same code
//! as any checkpoint.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use fastlora_llama::{FloatDtype, LlamaConfig, ModelError, WeightSource};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::Result;
use crate::export::write_file;
use crate::pretrained::FastLanguageModel;

const CONFIG: &str = include_str!("../assets/tiny-llama/config.json");
const TOKENIZER: &str = include_str!("../assets/tiny-llama/tokenizer.json");
const TOKENIZER_CONFIG: &str = include_str!("../assets/tiny-llama/tokenizer_config.json");

/// The bundled Alpaca-style demo dataset (JSONL) the default `fastlora train` learns.
pub const TINY_DATASET: &str = include_str!("../assets/tiny_dataset.jsonl");

/// Seeded N(0, σ²) weights (the LM head 5σ), with RMSNorm gains at 1: a random model of any
/// config.
pub struct RandomWeights {
    rng: ChaCha8Rng,
    std: f64,
}

impl RandomWeights {
    /// Weights drawn from `seed` with standard deviation `std`.
    pub fn new(seed: u64, std: f64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            std,
        }
    }
}

impl WeightSource for RandomWeights {
    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> std::result::Result<Option<Vec<f32>>, ModelError> {
        let len = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(Some(vec![1.0; len]));
        }
        // The head stays frozen under LoRA; at the body's scale its logits span too little for
        // any adapter to make a confident prediction, so it gets a wider one.
        let std = if name == "lm_head.weight" {
            5.0 * self.std
        } else {
            self.std
        };
        let normal = Normal::new(0.0, std).expect("a positive, finite σ");
        Ok(Some(
            (0..len)
                .map(|_| normal.sample(&mut self.rng) as f32)
                .collect(),
        ))
    }

    fn location(&self) -> PathBuf {
        PathBuf::from("<built-in random weights>")
    }
}

/// Writes the built-in tiny Llama into `dir` (config, tokenizer, seeded weights), unless a
/// previous run already did, and returns `dir`.
///
/// # Errors
/// I/O failures naming the file.
pub fn materialize_builtin_model(dir: &Path) -> Result<PathBuf> {
    if dir.join("model.safetensors").is_file() {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io("create", dir, e))?;
    write_file(&dir.join("tokenizer.json"), TOKENIZER.as_bytes())?;
    write_file(
        &dir.join("tokenizer_config.json"),
        TOKENIZER_CONFIG.as_bytes(),
    )?;
    write_file(&dir.join("config.json"), CONFIG.as_bytes())?;
    let config = LlamaConfig::load(&dir.join("config.json"))?;
    let mut weights = RandomWeights::new(3407, 0.1);
    let model = FastLanguageModel::<NdArray<f32>>::from_source(
        config,
        &mut weights,
        None,
        &Default::default(),
    )?;
    let model = FastLanguageModel {
        source: dir.to_path_buf(),
        ..model
    };
    model.save_pretrained(dir, FloatDtype::F32)?;
    Ok(dir.to_path_buf())
}
