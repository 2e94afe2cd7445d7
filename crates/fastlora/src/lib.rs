//! fastlora: Unsloth-class LoRA fine-tuning for Rust on Burn.
//!
//! The facade: [`FastLanguageModel::from_pretrained`] loads a Llama-family checkpoint (Llama,
//! Mistral, Qwen2, SmolLM) from a folder or the Hugging Face cache,
//! [`FastLanguageModel::get_peft_model`] injects LoRA adapters as Unsloth's `get_peft_model`
//! does, and [`PeftModel`] saves and loads adapters in PEFT's format and merges them.
//!
//! ```no_run
//! use fastlora::{CpuBackend, FastLanguageModel, LoraConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Default::default();
//! let model = FastLanguageModel::<CpuBackend>::from_pretrained("HuggingFaceTB/SmolLM2-135M", &device)?;
//! let config = LoraConfig::builder().r(16).lora_alpha(16.0).build()?;
//! let peft = model.get_peft_model(config)?;
//! peft.print_trainable_parameters();
//! peft.save_pretrained("my-adapter")?;
//! # Ok(())
//! # }
//! ```

mod adapter;
pub mod bench;
mod builtin;
mod chat;
mod cuda_memory;
mod data;
mod error;
mod export;
mod generate;
mod logits;
mod peft;
mod pretrained;
pub mod train;

pub use adapter::{ADAPTER_WEIGHTS_FILE, AdapterParameter};
pub use builtin::{RandomWeights, TINY_DATASET, materialize_builtin_model};
pub use chat::{ChatMessage, ChatTemplate, Role};
pub use cuda_memory::CudaMemory;
pub use data::{
    Batch, DataConfig, DataError, Dataset, DatasetReport, Example, Location, OnOverflow,
    alpaca_prompt, collate, epoch_order, pack,
};
pub use error::{FastLoraError, Result};
pub use generate::{GenerationConfig, GenerationError, eos_token_ids, generate};
pub use logits::{logits_command, read_input_ids, write_logits};
pub use peft::{AttentionPath, ParameterCounts, PatchReport, PeftModel};
pub use pretrained::{BaseMemoryReport, FastLanguageModel, LoadOptions};

pub use checkpointing;
pub use fastlora_llama as llama;
pub use fused_mlp;
pub use lora_config::{self, LoraConfig};
pub use lora_layers;

/// The default backend: Burn's ndarray CPU backend in f32 with autodiff.
pub type CpuBackend = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
