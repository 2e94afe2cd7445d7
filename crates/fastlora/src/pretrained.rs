//! [`FastLanguageModel`]: a base model with its config and tokenizer, as Unsloth's
//! `FastLanguageModel.from_pretrained` returns it.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use fastlora_llama::{
    Checkpoint, GgufWeights, LlamaConfig, LlamaForCausalLm, LlamaTokenizer, WeightSource,
    build_model, gguf_config, is_gguf_path, open_gguf, resolve_model,
};
use lora_config::{ArchitectureInfo, LoraConfig};

use crate::error::Result;
use crate::peft::PeftModel;

/// A loaded base model: weights, config and (when the folder has one) tokenizer.
#[derive(Debug, Clone)]
pub struct FastLanguageModel<B: Backend> {
    /// The module tree.
    pub model: LlamaForCausalLm<B>,
    /// Its HF config.
    pub config: LlamaConfig,
    /// The tokenizer, when `tokenizer.json` is present.
    pub tokenizer: Option<LlamaTokenizer>,
    /// The local folder the model was read from (a hub id resolves to its cache snapshot).
    pub source: PathBuf,
}

impl<B: Backend> FastLanguageModel<B> {
    /// Loads a model from a local folder or file, or a hub id (`owner/name[@revision]`) through
    /// the Hugging Face cache (`HF_HOME`, `HF_HUB_OFFLINE` respected).
    ///
    /// The folder holds `config.json` and `model.safetensors` or a sharded
    /// `model.safetensors.index.json`; weights in f32, bf16 or f16 are read as f32. A path to
    /// a `.gguf` file is read by [`FastLanguageModel::from_gguf`] instead.
    ///
    /// # Errors
    /// [`crate::FastLoraError::Model`] naming the file, tensor or field at fault.
    pub fn from_pretrained(name_or_path: &str, device: &B::Device) -> Result<Self> {
        let path = Path::new(name_or_path);
        if is_gguf_path(path) && path.is_file() {
            return Self::from_gguf(path, device);
        }
        let source = resolve_model(name_or_path)?;
        let config = LlamaConfig::load(&source.join("config.json"))?;
        let mut checkpoint = Checkpoint::open(&source)?;
        let model = build_model(&config, &mut checkpoint, device)?;
        let tokenizer = match source.join("tokenizer.json").exists() {
            true => Some(LlamaTokenizer::load(&source)?),
            false => None,
        };
        Ok(Self {
            model,
            config,
            tokenizer,
            source,
        })
    }

    /// Loads a llama.cpp GGUF file: config from its metadata, weights dequantized to f32 (the
    /// query/key RoPE row permutation undone), tokenizer from its `tokenizer.ggml.*` metadata.
    ///
    /// # Errors
    /// [`crate::FastLoraError::Model`] for an unreadable file, an unsupported architecture,
    /// quantization or tokenizer, or a tensor of the wrong shape.
    pub fn from_gguf(path: &Path, device: &B::Device) -> Result<Self> {
        let file = open_gguf(path)?;
        let config = gguf_config(&file)?;
        let tokenizer = LlamaTokenizer::from_gguf(&file)?;
        let mut weights = GgufWeights::new(file, &config);
        let model = build_model(&config, &mut weights, device)?;
        Ok(Self {
            model,
            config,
            tokenizer: Some(tokenizer),
            source: path.to_path_buf(),
        })
    }

    /// A model built from `config` with weights from any [`WeightSource`] (e.g. the built-in
    /// tiny model's random weights).
    ///
    /// # Errors
    /// Whatever the source returns.
    pub fn from_source(
        config: LlamaConfig,
        source: &mut dyn WeightSource,
        tokenizer: Option<LlamaTokenizer>,
        device: &B::Device,
    ) -> Result<Self> {
        let model = build_model(&config, source, device)?;
        Ok(Self {
            model,
            config,
            tokenizer,
            source: source.location(),
        })
    }

    /// Injects LoRA adapters as `config` says: Unsloth's `FastLanguageModel.get_peft_model`.
    ///
    /// # Errors
    /// An invalid configuration for this architecture, or a failed initialisation (PiSSA).
    pub fn get_peft_model(self, config: LoraConfig) -> Result<PeftModel<B>> {
        PeftModel::inject(self, config)
    }

    /// What LoRA may target in this model.
    pub fn architecture(&self) -> ArchitectureInfo {
        ArchitectureInfo::llama(self.config.num_hidden_layers)
    }

    /// The folder the model came from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}
