//! Unsloth-class LoRA fine-tuning for Burn: get_peft_model, PEFT adapters, CLI.
