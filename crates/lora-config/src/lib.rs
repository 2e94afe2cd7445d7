//! LoraConfig: Unsloth get_peft_model parameters, validation and PEFT adapter_config.json.
