//! Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in Burn, loaded from HF checkpoints.

mod cache;
mod checkpoint;
mod config;
mod documents;
mod error;
mod gguf;
mod hub;
mod json;
mod linear_cross_entropy;
mod loss;
mod model;
mod tokenizer;

pub use cache::KvCache;
pub use checkpoint::{
    Checkpoint, Dtype, FloatDtype, INDEX_FILE, SINGLE_FILE, TensorToWrite, write_atomically,
    write_safetensors,
};
pub use config::{LlamaConfig, ModelType, RopeScaling};
pub use documents::{PackedDocuments, document_runs};
pub use error::ModelError;
pub use fastlora_gguf::{self, GgufFile};
pub use flash_attention;
pub use fused_ce::set_enabled as set_fused_cross_entropy;
pub use gguf::{
    GgufWeights, gguf_config, gguf_config_json, is_gguf_path, open_gguf, unpermute_rope_rows,
};
pub use hub::{HubSettings, ModelRef, resolve_model, resolve_model_with};
pub use linear_cross_entropy::{
    CHUNK_LOGITS_BYTES, causal_lm_fused_loss_sum, default_chunk_tokens, linear_cross_entropy,
    linear_cross_entropy_sum,
};
pub use loss::{IGNORE_INDEX, causal_lm_loss, causal_lm_loss_sum, token_cross_entropy};
pub use model::{
    Attention, DecoderLayer, Embedding, LAYER_PROJECTIONS, LayerContext, LlamaForCausalLm, Mlp,
    RmsNorm, RotaryEmbedding, WeightSource, build_model,
};
pub use tokenizer::LlamaTokenizer;
