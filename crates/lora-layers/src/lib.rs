//! Burn LoRA modules: a frozen base linear plus a low-rank A/B adapter ([`LoraLinear`]), PEFT's
//! initialisations ([`LoraInit`]) seeded per module, and merge / unmerge / unload.
//!
//! Layouts follow PEFT so adapters move between the two unchanged: the base weight is
//! `[d_output, d_input]`, `lora_A` is `[r, d_input]`, `lora_B` is `[d_output, r]`. The base may
//! be kept packed (quantized, QLoRA-style) through [`PackedWeight`] and dequantized on use.

mod init;
mod linear;
mod packed;

pub use init::{FactorShape, InitError, LoraFactors, LoraInit, init_factors, module_seed};
pub use linear::{LoraAdapter, LoraAdapterConfig, LoraLinear, LoraLinearConfig};
pub use packed::{BaseWeight, PackedBase, PackedWeight};
