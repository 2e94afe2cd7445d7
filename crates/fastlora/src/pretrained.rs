//! [`FastLanguageModel`]: a base model with its config and tokenizer, as Unsloth's
//! `FastLanguageModel.from_pretrained` returns it; [`LoadOptions`] to keep a GGUF model's
//! quantized base packed, and [`BaseMemoryReport`] for what that saves.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use fastlora_llama::{
    Checkpoint, GgufWeights, LlamaConfig, LlamaForCausalLm, LlamaTokenizer, ModelError,
    WeightSource, build_model, gguf_config, is_gguf_path, open_gguf, resolve_model,
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

/// Gives the gate and up weights of models loaded from now on room for LoRA factors of
/// `lora`'s largest rank beside them (both projections' factors side by side, see
/// [`fused_mlp::set_spare_lora_columns`]), so the fused MLP folds their LoRA terms into the
/// base GEMMs. Only the backends the fused ops run on store the room.
pub(crate) fn reserve_lora_columns(lora: &LoraConfig) {
    let rank = lora.rank_pattern.values().copied().fold(lora.r, usize::max);
    fused_mlp::set_spare_lora_columns(2 * rank);
}

/// How [`FastLanguageModel::from_pretrained_with`] loads a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep a GGUF model's quantized projection weights (the Q8_0, Q4_0, Q4_1, Q4_K, Q5_K or
    /// Q6_K blocks of `q/k/v/o_proj` and `gate/up/down_proj`, as stored in the file) packed in
    /// memory and dequantize each one in its forward, QLoRA's quantized base under f32 LoRA
    /// adapters. Logits and LoRA gradients are those of the dense load; embeddings, norms and
    /// the LM head stay f32 ([`BaseMemoryReport`] says what is saved).
    ///
    /// The saving is in resident model memory and in inference. During training Burn's
    /// autodiff keeps each projection's dequantized weight until backward (a matmul saves its
    /// right-hand side for the gradient of its input), so a training step's activation memory
    /// still holds one dense copy of every projection of the layers it runs through.
    ///
    /// Only GGUF files hold quantized weights: asking it of another source is an error.
    pub quantized_base: bool,
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
        Self::from_pretrained_with(name_or_path, LoadOptions::default(), device)
    }

    /// [`FastLanguageModel::from_pretrained`] with [`LoadOptions`], e.g. a GGUF model with its
    /// quantized base kept packed:
    ///
    /// ```no_run
    /// use fastlora::{CpuBackend, FastLanguageModel, LoadOptions};
    ///
    /// let options = LoadOptions { quantized_base: true };
    /// let model = FastLanguageModel::<CpuBackend>::from_pretrained_with(
    ///     ".cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
    ///     options,
    ///     &Default::default(),
    /// )?;
    /// println!("{}", model.base_memory_report());
    /// # Ok::<(), fastlora::FastLoraError>(())
    /// ```
    ///
    /// # Errors
    /// As [`FastLanguageModel::from_pretrained`]; [`ModelError::Unsupported`] naming
    /// `name_or_path` when [`LoadOptions::quantized_base`] asks a non-GGUF source to stay
    /// quantized.
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let path = Path::new(name_or_path);
        if is_gguf_path(path) && path.is_file() {
            return Self::load_gguf(path, options, device);
        }
        // A missing `.gguf` path goes on to the resolver, whose error says it is not found.
        if options.quantized_base && !is_gguf_path(path) {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                what: "quantized base (LoadOptions::quantized_base): only a .gguf file holds quantized weights to keep; load this model without it".to_string(),
            }
            .into());
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
        Self::load_gguf(path, LoadOptions::default(), device)
    }

    fn load_gguf(path: &Path, options: LoadOptions, device: &B::Device) -> Result<Self> {
        let file = open_gguf(path)?;
        let config = gguf_config(&file)?;
        let tokenizer = LlamaTokenizer::from_gguf(&file)?;
        let mut weights =
            GgufWeights::new(file, &config).with_quantized_projections(options.quantized_base);
        let model = build_model(&config, &mut weights, device)?;
        if options.quantized_base {
            tracing::info!("{}", BaseMemoryReport::of(&model));
        }
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

    /// How much memory the base weights take, packed projections included.
    pub fn base_memory_report(&self) -> BaseMemoryReport {
        BaseMemoryReport::of(&self.model)
    }
}

/// The memory of a model's base weights when projections are kept packed
/// ([`LoadOptions::quantized_base`]): what the packed ones would take as f32 against what they
/// take, and what stays f32.
///
/// Displays as e.g. `base weights: 405.0 MiB as f32 → 63.3 MiB kept quantized (Q4_1) in 210
/// projections, 84.4 % saved; 108.1 MiB more stay f32`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseMemoryReport {
    /// Projections whose base weight is kept packed.
    pub packed_tensors: usize,
    /// What those weights would take as f32 (4 bytes a value).
    pub dense_bytes: u64,
    /// What their packed forms take.
    pub stored_bytes: u64,
    /// Their packed formats, sorted, each once (e.g. `["Q4_1"]`).
    pub formats: Vec<String>,
    /// The other base weights, kept dense, as f32: embeddings, norms, dense projections,
    /// biases and an untied LM head (adapters are not base weights).
    pub other_f32_bytes: u64,
}

impl BaseMemoryReport {
    /// The report of `model` as it is now (an adapter merged into a packed base has made it
    /// dense).
    pub fn of<B: Backend>(model: &LlamaForCausalLm<B>) -> Self {
        let f32_bytes = |values: usize| 4 * values as u64;
        let mut report = Self {
            packed_tensors: 0,
            dense_bytes: 0,
            stored_bytes: 0,
            formats: Vec::new(),
            other_f32_bytes: 0,
        };
        let mut formats = BTreeSet::new();
        for (_, proj) in model.projections() {
            let [rows, cols] = proj.weight.dims();
            match proj.weight.as_packed() {
                Some(packed) => {
                    report.packed_tensors += 1;
                    report.dense_bytes += f32_bytes(rows * cols);
                    report.stored_bytes += packed.weight().stored_bytes() as u64;
                    formats.insert(packed.weight().format().to_string());
                }
                None => report.other_f32_bytes += f32_bytes(rows * cols),
            }
            if let Some(bias) = &proj.bias {
                report.other_f32_bytes += f32_bytes(bias.dims()[0]);
            }
        }
        let norms = model
            .layers
            .iter()
            .flat_map(|layer| [&layer.input_layernorm, &layer.post_attention_layernorm]);
        for norm in norms.chain([&model.norm]) {
            report.other_f32_bytes += f32_bytes(norm.weight.dims()[0]);
        }
        let [vocab, hidden] = model.embed_tokens.weight.dims();
        report.other_f32_bytes += f32_bytes(vocab * hidden);
        report.formats = formats.into_iter().collect();
        report
    }

    /// The fraction of the packed weights' f32 size that packing saves, `1 − stored/dense`
    /// (0 when nothing is packed).
    pub fn saved_fraction(&self) -> f64 {
        match self.dense_bytes {
            0 => 0.0,
            dense => 1.0 - self.stored_bytes as f64 / dense as f64,
        }
    }
}

impl fmt::Display for BaseMemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        if self.packed_tensors == 0 {
            return write!(
                f,
                "base weights: none kept quantized; {:.1} MiB as f32",
                mib(self.other_f32_bytes)
            );
        }
        write!(
            f,
            "base weights: {:.1} MiB as f32 → {:.1} MiB kept quantized ({}) in {} projections, {:.1} % saved; {:.1} MiB more stay f32",
            mib(self.dense_bytes),
            mib(self.stored_bytes),
            self.formats.join(", "),
            self.packed_tensors,
            100.0 * self.saved_fraction(),
            mib(self.other_f32_bytes),
        )
    }
}
