//! Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in Burn, loaded from HF checkpoints.
