//! Burn LoRA modules: frozen base linear plus low-rank A/B, init, merge.
