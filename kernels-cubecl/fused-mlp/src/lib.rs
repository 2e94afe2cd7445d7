//! Fused SwiGLU + LoRA MLP: portable reference and CubeCL kernels.
