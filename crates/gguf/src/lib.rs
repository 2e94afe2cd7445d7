//! A reader for GGUF, llama.cpp's model file format (versions 2 and 3), with dequantisation of
//! its tensors to f32. No Burn dependency: this crate yields metadata values and `Vec<f32>`s;
//! mapping them onto a model is the caller's business.
//!
//! - [`GgufFile::open`] memory-maps a file and validates its whole header: every count and
//!   length against the bytes left, every tensor's shape, type, alignment and bounds. A
//!   malformed file is a [`GgufError`] naming the file and the key or tensor, never a panic or
//!   an over-read.
//! - Metadata: [`GgufFile::metadata`], or typed getters such as [`GgufFile::get_u32`] and
//!   [`GgufFile::get_str_array`] whose errors name the key and the expected and actual types.
//! - Tensors: [`GgufFile::tensors`] / [`GgufFile::tensor_info`] ([`TensorInfo::shape`] is the
//!   row-major PyTorch shape, GGUF's dims reversed), [`GgufFile::raw_bytes`], and
//!   [`GgufFile::dequantize_f32`] for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K,
//!   bit-identical to ggml's `dequantize_row_*` and gguf-py's `gguf.quants.dequantize`.
//! - [`dequantize`] decodes raw blocks without a file.
//!
//! ```no_run
//! use fastlora_gguf::GgufFile;
//!
//! let gguf = GgufFile::open(".cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let arch = gguf.architecture()?; // "llama"
//! let heads = gguf.get_u32(&format!("{arch}.attention.head_count"))?;
//! let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
//! let embed = gguf.tensor_info("token_embd.weight").expect("present");
//! assert_eq!(embed.shape(), [tokens.len(), 576]); // [vocab, hidden]
//! let weights = gguf.dequantize_f32("token_embd.weight")?;
//! # let _ = (heads, weights);
//! # Ok::<(), fastlora_gguf::GgufError>(())
//! ```

mod cursor;
mod error;
mod file;
mod ggml_type;
mod header;
mod metadata;
mod quant;
mod tensor;

#[cfg(test)]
mod tests;

pub use error::{DequantizeError, GgufError, GgufErrorKind};
pub use file::GgufFile;
pub use ggml_type::GgmlType;
pub use header::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub use metadata::{MetadataArray, MetadataType, MetadataValue};
pub use quant::dequantize;
pub use tensor::TensorInfo;
