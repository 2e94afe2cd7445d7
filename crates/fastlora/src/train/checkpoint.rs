//! Training checkpoints: `checkpoint-{step}/` holding the adapter (PEFT format), the AdamW state
//! and `trainer_state.json`, published by one directory rename so a kill never leaves a
//! half-written checkpoint under the final name.

use std::path::{Path, PathBuf};

use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use fastlora_llama::ModelError;
use serde::{Deserialize, Serialize};

use super::{Adam, StepRecord};
use crate::error::{FastLoraError, Result};
use crate::export::write_file;
use crate::peft::PeftModel;

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer";
const PREFIX: &str = "checkpoint-";

/// Where a run is: everything besides the weights and optimizer moments that resuming needs.
///
/// The data order is a function of `(seed, step)`, so the step is also the data position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Seed of the data order.
    pub seed: u64,
    /// Every step's record so far.
    pub history: Vec<StepRecord>,
}

impl TrainerState {
    /// The state before the first step.
    pub fn new(seed: u64) -> Self {
        Self {
            step: 0,
            seed,
            history: Vec::new(),
        }
    }
}

type OptimizerRecord<B> = <Adam<B> as Optimizer<fastlora_llama::LlamaForCausalLm<B>, B>>::Record;

pub(super) fn save<B: AutodiffBackend>(
    peft: &PeftModel<B>,
    optimizer: &Adam<B>,
    state: &TrainerState,
    output_dir: &Path,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("{PREFIX}{}", state.step));
    let partial = output_dir.join(format!(".{PREFIX}{}.partial", state.step));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| ModelError::io("remove", &partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| ModelError::io("create", &partial, e))?;
    peft.save_pretrained(&partial)?;
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .record(optimizer.to_record(), partial.join(OPTIMIZER_FILE))
        .map_err(|e| training_io(&partial.join(OPTIMIZER_FILE), &e.to_string()))?;
    let text = serde_json::to_string_pretty(state).expect("the state always serialises");
    write_file(&partial.join(STATE_FILE), text.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| ModelError::io("remove", &final_dir, e))?;
    }
    std::fs::rename(&partial, &final_dir)
        .map_err(|e| ModelError::io("rename into place", &final_dir, e))?;
    Ok(final_dir)
}

pub(super) fn load<B: AutodiffBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(TrainerState, OptimizerRecord<B>)> {
    let state_path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&state_path).map_err(|e| ModelError::io("read", &state_path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| training_io(&state_path, &e.to_string()))?;
    let record = NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .load(dir.join(OPTIMIZER_FILE), device)
        .map_err(|e| training_io(&dir.join(OPTIMIZER_FILE), &e.to_string()))?;
    Ok((state, record))
}

/// The complete checkpoint with the highest step under `output_dir` (partial ones, left by a
/// kill, are ignored), or `output_dir` itself when it is a checkpoint.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    if output_dir.join(STATE_FILE).is_file() {
        return Some(output_dir.to_path_buf());
    }
    std::fs::read_dir(output_dir)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            let step: usize = name.strip_prefix(PREFIX)?.parse().ok()?;
            entry
                .path()
                .join(STATE_FILE)
                .is_file()
                .then_some((step, entry.path()))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, path)| path)
}

fn training_io(path: &Path, message: &str) -> FastLoraError {
    FastLoraError::Input {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}
