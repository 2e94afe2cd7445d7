//! Writing a (merged) model as an HF safetensors folder that transformers loads.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::TensorData;
use fastlora_llama::{FloatDtype, ModelError, TensorToWrite, write_atomically, write_safetensors};

use crate::error::Result;
use crate::pretrained::FastLanguageModel;

/// Tokenizer and generation files copied from the source folder when present.
const COMPANION_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

impl<B: Backend> FastLanguageModel<B> {
    /// Writes `config.json`, `model.safetensors` (in `dtype`, metadata `format=pt`) and the
    /// source folder's tokenizer files into `dir`, each file atomically. A source without
    /// tokenizer files (a GGUF file) gets `tokenizer.json`, `tokenizer_config.json` (special
    /// tokens, chat template) and `generation_config.json` written from its tokenizer: this is
    /// `fastlora export`, GGUF → HF folder.
    ///
    /// A model whose tied `lm_head` was untied (a trained or adapted head) is written untied,
    /// with `tie_word_embeddings: false`.
    ///
    /// # Errors
    /// An I/O failure naming the file.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>, dtype: FloatDtype) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io("create", dir, e))?;
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let tensors = encode(self.model.base_tensors(), dtype);
        write_safetensors(&dir.join("model.safetensors"), &tensors, &metadata)?;
        let mut config = self.config.to_hf_json(dtype);
        config["tie_word_embeddings"] = serde_json::Value::Bool(self.model.lm_head.is_none());
        let text = serde_json::to_string_pretty(&config).expect("a JSON value always serialises");
        write_file(&dir.join("config.json"), text.as_bytes())?;
        let mut copied = Vec::new();
        for name in COMPANION_FILES {
            let from = self.source.join(name);
            if from.is_file() {
                let bytes = std::fs::read(&from).map_err(|e| ModelError::io("read", &from, e))?;
                write_file(&dir.join(name), &bytes)?;
                copied.push(name);
            }
        }
        // A source without HF tokenizer files (a GGUF file, generated weights) still has its
        // tokenizer in memory: write it, so the folder is complete for transformers.
        if let Some(tokenizer) = self.tokenizer.as_ref().filter(|_| copied.is_empty()) {
            tokenizer.save(dir)?;
            let generation = serde_json::json!({
                "bos_token_id": tokenizer.bos_id(),
                "eos_token_id": tokenizer.eos_id(),
                "pad_token_id": tokenizer.pad_id(),
            });
            let text = serde_json::to_string_pretty(&generation).expect("JSON serialises");
            write_file(&dir.join("generation_config.json"), text.as_bytes())?;
        }
        Ok(())
    }
}

/// Encodes named tensors for [`write_safetensors`], floats stored as `dtype`.
pub(crate) fn encode(tensors: Vec<(String, TensorData)>, dtype: FloatDtype) -> Vec<TensorToWrite> {
    tensors
        .into_iter()
        .map(|(name, data)| {
            let shape = data.shape.to_vec();
            let values = data
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("converted to f32");
            TensorToWrite::from_f32(name, shape, &values, dtype)
        })
        .collect()
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |temp| {
        std::fs::write(temp, bytes).map_err(|e| ModelError::io("write", temp, e))
    })?;
    Ok(())
}
