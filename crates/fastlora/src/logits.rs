//! The parity tool behind `fastlora logits`: logits and loss of a model (optionally with an
//! adapter) on token ids read from a safetensors file.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use fastlora_llama::{Checkpoint, FloatDtype, causal_lm_loss, write_safetensors};

use crate::error::{FastLoraError, Result};
use crate::peft::PeftModel;
use crate::pretrained::FastLanguageModel;

/// Reads the i64 `input_ids` tensor, `[batch, seq]`, of a safetensors file.
///
/// # Errors
/// [`FastLoraError::Input`] when the tensor is absent, not 2-D, not integer, or holds an id
/// outside `0..vocab_size`.
pub fn read_input_ids(path: &Path, vocab_size: usize) -> Result<(Vec<i64>, [usize; 2])> {
    let checkpoint = Checkpoint::open(path)?;
    let input = |message: String| FastLoraError::Input {
        path: path.to_path_buf(),
        message,
    };
    if !checkpoint.contains("input_ids") {
        return Err(input("no tensor named `input_ids`".to_string()));
    }
    let shape = checkpoint.shape("input_ids")?;
    let [batch, seq] = shape[..] else {
        return Err(input(format!(
            "`input_ids` must be [batch, seq], found shape {shape:?}"
        )));
    };
    if seq < 2 || batch == 0 {
        return Err(input(format!(
            "`input_ids` needs at least one row of two tokens, found shape {shape:?}"
        )));
    }
    let ids = checkpoint.read_i64("input_ids", &shape)?;
    if let Some(bad) = ids.iter().find(|&&id| id < 0 || id as usize >= vocab_size) {
        return Err(input(format!(
            "token id {bad} in `input_ids` is outside the vocabulary 0..{vocab_size}"
        )));
    }
    Ok((ids, [batch, seq]))
}

/// Computes `logits` (`[batch, seq, vocab]`, f32) and the mean next-token `loss` (`[1]`) of
/// `model` on the ids in `input_path`, and writes both to `out_path` (atomically).
///
/// # Errors
/// Bad input (see [`read_input_ids`]) or an I/O failure naming the file.
pub fn write_logits<B: Backend>(
    model: &fastlora_llama::LlamaForCausalLm<B>,
    vocab_size: usize,
    input_path: &Path,
    out_path: &Path,
) -> Result<f32> {
    let (ids, shape) = read_input_ids(input_path, vocab_size)?;
    let device = model.embed_tokens.weight.device();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), &device);
    let logits = model.forward(ids.clone(), None);
    let loss = causal_lm_loss(logits.clone(), ids);
    let loss_data = loss.into_data();
    let value = loss_data
        .to_vec::<f32>()
        .map_err(|e| FastLoraError::Input {
            path: input_path.to_path_buf(),
            message: format!("loss is not f32: {e:?}"),
        })?[0];
    let tensors = vec![
        ("logits".to_string(), logits.into_data()),
        ("loss".to_string(), loss_data),
    ];
    write_safetensors(
        out_path,
        &crate::export::encode(tensors, FloatDtype::F32),
        &BTreeMap::new(),
    )?;
    Ok(value)
}

/// Loads the model at `model_dir` (and the adapter at `adapter_dir`), then [`write_logits`].
///
/// # Errors
/// Loading errors naming the file, tensor or field; see [`write_logits`].
pub fn logits_command<B: Backend>(
    model_dir: &str,
    adapter_dir: Option<&Path>,
    input_path: &Path,
    out_path: &Path,
    device: &B::Device,
) -> Result<f32> {
    let base = FastLanguageModel::<B>::from_pretrained(model_dir, device)?;
    let vocab = base.config.vocab_size;
    match adapter_dir {
        Some(dir) => {
            let peft = PeftModel::from_pretrained(base, dir)?.for_inference();
            write_logits(peft.model(), vocab, input_path, out_path)
        }
        None => write_logits(&base.model, vocab, input_path, out_path),
    }
}
