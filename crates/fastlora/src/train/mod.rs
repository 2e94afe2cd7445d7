//! The LoRA trainer: AdamW over the trainable parameters only, warmup + linear/cosine schedule,
//! exact gradient accumulation, global-norm clipping, atomic resumable checkpoints.

mod checkpoint;
mod command;
mod metrics;
mod plot;
mod schedule;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, TensorData};
use fastlora_llama::{
    LlamaForCausalLm, PackedDocuments, causal_lm_fused_loss_sum, default_chunk_tokens,
};
use fused_adamw::{FusedAdamWConfig, GroupedAdamW};
use serde::{Deserialize, Serialize};

pub use checkpoint::{TrainerState, latest_checkpoint};
#[cfg(feature = "cuda")]
pub(crate) use command::cuda_reserved_bytes;
pub(crate) use command::gib;
pub use command::{TrainArgs, TrainDevice, train_command};
pub use plot::write_loss_curve;
pub use schedule::{LrScheduler, learning_rate};

use crate::data::Batch;
use crate::error::{FastLoraError, Result};
use crate::peft::PeftModel;

/// Hyper-parameters of a training run (TRL's `SFTConfig` names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning rate for trained `embed_tokens`/`lm_head` copies (Unsloth's
    /// `embedding_learning_rate`); `None` uses `learning_rate`.
    pub embedding_learning_rate: Option<f64>,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Schedule after warmup.
    pub lr_scheduler: LrScheduler,
    /// Steps of linear warmup from 0.
    pub warmup_steps: usize,
    /// Passes over the data (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Optimizer steps to run; overrides `epochs`.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order.
    pub seed: u64,
    /// Save a checkpoint every this many steps (`None`: only at the end).
    pub save_steps: Option<usize>,
    /// Where checkpoints, metrics and the final adapter go.
    pub output_dir: PathBuf,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            embedding_learning_rate: None,
            weight_decay: 0.01,
            lr_scheduler: LrScheduler::Linear,
            warmup_steps: 5,
            epochs: 1,
            max_steps: None,
            batch_size: 2,
            grad_accum: 4,
            max_grad_norm: Some(1.0),
            seed: 3407,
            save_steps: None,
            output_dir: PathBuf::from("outputs"),
        }
    }
}

impl TrainConfig {
    /// Optimizer steps a run over `examples` examples takes.
    pub fn total_steps(&self, examples: usize) -> usize {
        let per_step = self.batch_size * self.grad_accum;
        self.max_steps
            .unwrap_or_else(|| (examples * self.epochs).div_ceil(per_step).max(1))
    }
}

/// One optimizer step's record: what the progress bar, `metrics.csv` and resume checks read.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based step number.
    pub step: usize,
    /// Mean loss over the step's trained tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping; `None` without clipping, which then costs
    /// nothing (as in transformers' `Trainer`, which computes it only to clip).
    pub grad_norm: Option<f64>,
    /// Tokens processed (padding excluded).
    pub tokens: usize,
}

/// AdamW over all trained tensors at once: one fused kernel launch per group of 16 tensors on
/// the CubeCL backends, Burn's `AdamW` math on the others; Burn's adaptor record either way, so
/// checkpoints are interchangeable with Burn's optimizer.
type Adam<B> = GroupedAdamW<LlamaForCausalLm<B>, B>;

/// Drives training of a [`PeftModel`] over batches made by a caller-supplied function.
pub struct Trainer<B: AutodiffBackend> {
    /// The model being trained.
    pub peft: PeftModel<B>,
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// Where the run is.
    pub state: TrainerState,
    optimizer: Adam<B>,
    /// Per-phase wall times of the last step, when profiling is on.
    times: Option<StepTimes>,
}

/// Wall time of the parts of one optimizer step, in seconds, each part ended by a device
/// synchronisation (so asynchronous GPU work is charged to the part that issued it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    /// Embedding, decoder layers and the chunked LM head + loss (which also computes the
    /// loss's own gradient chunk by chunk).
    pub forward: f64,
    /// Autodiff backward through the layers (recomputing them under checkpointing).
    pub backward: f64,
    /// Gathering the parameter gradients, the global norm and clipping.
    pub clip: f64,
    /// The AdamW update.
    pub optimizer: f64,
    /// Of the whole step, the host's own time: each phase up to the point where it waits for
    /// the device. Near the total, the step is bound by the host issuing work (or by a full
    /// launch queue); far below it, by the device.
    pub host: f64,
}

impl StepTimes {
    /// The whole step.
    pub fn total(&self) -> f64 {
        self.forward + self.backward + self.clip + self.optimizer
    }
}

/// Times consecutive parts of a step on `device`, syncing it at each mark.
struct PhaseClock<'a, B: Backend> {
    device: &'a B::Device,
    last: Instant,
    /// Summed time from each mark to the next one's sync.
    host: f64,
}

impl<'a, B: Backend> PhaseClock<'a, B> {
    fn start(device: &'a B::Device) -> Self {
        sync_device::<B>(device);
        Self {
            device,
            last: Instant::now(),
            host: 0.0,
        }
    }

    /// Seconds since the previous mark, after the device has finished.
    fn mark(&mut self) -> f64 {
        self.host += self.last.elapsed().as_secs_f64();
        sync_device::<B>(self.device);
        let now = Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        seconds
    }
}

/// Waits for the device's queued work; a failed sync surfaces at the next read anyway.
fn sync_device<B: Backend>(device: &B::Device) {
    let _ = B::sync(device);
}

impl<B: AutodiffBackend> Trainer<B> {
    /// A fresh run.
    pub fn new(peft: PeftModel<B>, config: TrainConfig) -> Self {
        let optimizer = adamw(&config);
        let state = TrainerState::new(config.seed);
        // LoRA dropout masks come from the layer-seed stream (see `checkpointing`): start it
        // from the run's seed so a run is reproducible.
        checkpointing::seed_layers(config.seed);
        Self {
            peft: peft.for_training(),
            config,
            state,
            optimizer,
            times: None,
        }
    }

    /// Turns per-phase timing of each step on or off ([`Trainer::last_step_times`]). It
    /// synchronises the device between phases, which costs a little throughput.
    pub fn set_profiling(&mut self, on: bool) {
        self.times = on.then(StepTimes::default);
    }

    /// The phase times of the last step, when profiling is on.
    pub fn last_step_times(&self) -> Option<StepTimes> {
        self.times
    }

    /// Continues the run saved in `checkpoint_dir` (see [`Trainer::save_checkpoint`]); `peft`
    /// must be the base model with that checkpoint's adapter loaded.
    ///
    /// # Errors
    /// A missing or unreadable `trainer_state.json` or optimizer state, naming the file.
    pub fn resume(peft: PeftModel<B>, config: TrainConfig, checkpoint_dir: &Path) -> Result<Self> {
        let device = peft.model().embed_tokens.weight.device();
        let (state, record) = checkpoint::load::<B>(checkpoint_dir, &device)?;
        let optimizer = adamw(&config).load_record(record);
        Ok(Self {
            peft: peft.for_training(),
            config,
            state,
            optimizer,
            times: None,
        })
    }

    /// Runs one optimizer step over `micro_batches` (gradient accumulation: the loss is the
    /// mean over all their trained tokens, so k micro-batches equal one k× larger batch).
    ///
    /// # Errors
    /// [`FastLoraError::Training`] when the loss is NaN or infinite; the model is not updated.
    pub fn step(&mut self, micro_batches: &[Batch], total_steps: usize) -> Result<StepRecord> {
        let model = self.peft.model().clone();
        let device = model.embed_tokens.weight.device();
        let mut clock = self
            .times
            .is_some()
            .then(|| PhaseClock::<B>::start(&device));
        let mut times = StepTimes::default();
        let StepGradients {
            mut grads,
            loss,
            tokens,
        } = step_gradients_timed(&model, micro_batches, clock.as_mut(), &mut times);
        let step = self.state.step + 1;
        if !loss.is_finite() {
            return Err(FastLoraError::Training(format!(
                "the loss became {loss} at step {step}; training stopped and the model was not updated"
            )));
        }
        let grad_norm = clip_global_norm(&model, &mut grads, self.config.max_grad_norm);
        if let Some(clock) = clock.as_mut() {
            times.clip = clock.mark();
        }
        let lr = learning_rate(
            self.config.lr_scheduler,
            self.config.learning_rate,
            self.state.step,
            self.config.warmup_steps,
            total_steps,
        );
        let model = match self.config.embedding_learning_rate {
            Some(embedding_lr) => {
                let embed_lr = embedding_lr * lr / self.config.learning_rate;
                let embedding_grads = split_embedding_grads(&model, &mut grads);
                let model = self.optimizer.step(lr, model, grads);
                self.optimizer.step(embed_lr, model, embedding_grads)
            }
            None => self.optimizer.step(lr, model, grads),
        };
        if let Some(clock) = clock.as_mut() {
            times.optimizer = clock.mark();
            times.host = clock.host;
            self.times = Some(times);
        }
        self.peft.base.model = model;
        let record = StepRecord {
            step,
            loss,
            lr,
            grad_norm,
            tokens,
        };
        self.state.step = step;
        self.state.history.push(record);
        Ok(record)
    }

    /// Writes a checkpoint of the run into `output_dir/checkpoint-{step}` atomically: the
    /// adapter (PEFT format), the optimizer state and `trainer_state.json` go into a temporary
    /// folder that is renamed into place once complete, so a kill at any moment leaves the
    /// previous checkpoints intact.
    ///
    /// # Errors
    /// I/O failures naming the path.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        checkpoint::save(
            &self.peft,
            &self.optimizer,
            &self.state,
            &self.config.output_dir,
        )
    }
}

/// The gradients of one optimizer step and its loss.
pub struct StepGradients {
    /// Gradients of the mean loss over all trained tokens of the step.
    pub grads: GradientsParams,
    /// That mean loss.
    pub loss: f64,
    /// Tokens processed (padding excluded).
    pub tokens: usize,
}

/// Gradients of the mean next-token loss over every trained token of `micro_batches`, summed
/// micro-batch by micro-batch: each micro-batch's summed loss is divided by the step's total
/// token count, so the result equals one batch holding them all. The LM head and the loss run
/// through [`causal_lm_fused_loss_sum`], a chunk of tokens at a time, with the chunk size of
/// [`default_chunk_tokens`].
pub fn step_gradients<B: AutodiffBackend>(
    model: &LlamaForCausalLm<B>,
    micro_batches: &[Batch],
) -> StepGradients {
    step_gradients_timed(model, micro_batches, None, &mut StepTimes::default())
}

/// [`step_gradients`], adding the forward and backward time of each micro-batch to `times`
/// when a clock is given.
fn step_gradients_timed<B: AutodiffBackend>(
    model: &LlamaForCausalLm<B>,
    micro_batches: &[Batch],
    mut clock: Option<&mut PhaseClock<'_, B>>,
    times: &mut StepTimes,
) -> StepGradients {
    let device = model.embed_tokens.weight.device();
    let trained: usize = micro_batches.iter().map(Batch::num_trained_tokens).sum();
    let chunk_tokens = default_chunk_tokens(model.embed_tokens.weight.dims()[0]);
    let mut accumulator = GradientsAccumulator::<LlamaForCausalLm<B>>::new();
    let mut loss_sum = 0.0;
    let mut tokens = 0;
    for batch in micro_batches {
        let ids = int_tensor::<B>(&batch.input_ids, [batch.batch, batch.seq], &device);
        let labels = int_tensor::<B>(&batch.labels, [batch.batch, batch.seq], &device);
        let mask = batch
            .training_key_mask()
            .map(|mask| int_tensor::<B>(mask, [batch.batch, batch.seq], &device));
        let documents = batch
            .documents
            .as_ref()
            .map(|d| PackedDocuments::from_labels(d, [batch.batch, batch.seq], &device));
        // The head and loss run chunk by chunk: [tokens, vocab] f32 logits never exist whole.
        let hidden = model.hidden_states_packed(ids, mask, documents.as_ref());
        let sum = phase_timing::phase::<B, _>("loss (chunked head + CE)", &device, || {
            causal_lm_fused_loss_sum(model, hidden, labels, chunk_tokens)
        });
        if let Some(clock) = clock.as_deref_mut() {
            times.forward += clock.mark();
        }
        // The loss is known once the forward has run: read it while the backward is issued, so
        // the host holds it before the backward ends and prepares the optimizer step while the
        // device still works (a plain read here would idle the device through that).
        let loss_read = fused_mlp::start_read(sum.clone().inner());
        let grads = (sum / trained.max(1) as f64).backward();
        if let Some(clock) = clock.as_deref_mut() {
            times.backward += clock.mark();
        }
        let loss = loss_read.finish().iter::<f64>().next();
        loss_sum += loss.expect("the loss sum holds one value");
        tokens += batch.attention_mask.iter().filter(|&&m| m != 0).count();
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    StepGradients {
        grads: accumulator.grads(),
        loss: loss_sum / trained.max(1) as f64,
        tokens,
    }
}

fn adamw<B: AutodiffBackend>(config: &TrainConfig) -> Adam<B> {
    // transformers' AdamW: β = (0.9, 0.999), ε = 1e-8, decoupled weight decay.
    FusedAdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(config.weight_decay as f32)
        .init_grouped()
}

fn int_tensor<B: Backend>(
    values: &[i64],
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// Squares of every gradient the model's parameters received, summed in f32 on the device: one
/// kernel launch per gradient on the CubeCL backends (`fused_adamw::SquaredNorm`), plain Burn
/// ops elsewhere, and one read at the end.
struct GradSquares<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: fused_adamw::SquaredNorm<B::InnerBackend>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradSquares<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.total.add(grad);
        }
    }
}

/// Multiplies every gradient by `factor`.
struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, grad.mul_scalar(self.factor));
        }
    }
}

/// torch's `clip_grad_norm_`: scales all gradients by `max / (norm + 1e-6)` when the global L2
/// norm exceeds `max`. Returns the norm before clipping; without `max`, computes nothing (one
/// kernel launch per parameter tensor and a device read: 5–20 ms a step for a LoRA model's
/// hundreds of adapter tensors on the H200) and returns `None`.
fn clip_global_norm<B: AutodiffBackend>(
    model: &LlamaForCausalLm<B>,
    grads: &mut GradientsParams,
    max: Option<f64>,
) -> Option<f64> {
    let max = max?;
    let mut squares = GradSquares::<B> {
        grads,
        total: fused_adamw::SquaredNorm::new(),
    };
    model.visit(&mut squares);
    let norm = f64::from(squares.total.finish()).sqrt();
    let factor = max / (norm + 1e-6);
    if factor < 1.0 {
        model.visit(&mut ScaleGrads { grads, factor });
    }
    Some(norm)
}

/// Moves the gradients of the `embed_tokens`/`lm_head` weights out of `grads`, for their own
/// learning rate.
fn split_embedding_grads<B: AutodiffBackend>(
    model: &LlamaForCausalLm<B>,
    grads: &mut GradientsParams,
) -> GradientsParams {
    let mut ids: Vec<ParamId> = vec![model.embed_tokens.weight.id];
    if let Some(head) = &model.lm_head {
        // A packed head is no parameter (a trained `modules_to_save` head is dense).
        if let Some(weight) = head.weight.as_dense() {
            ids.push(weight.id);
        }
    }
    let mut out = GradientsParams::new();
    for id in ids {
        if let Some(grad) = grads.remove::<B::InnerBackend, 2>(id) {
            out.register(id, grad);
        }
    }
    out
}

/// Why a training run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// All steps ran.
    Finished,
    /// Ctrl-C: the run saved a checkpoint and stopped.
    Interrupted,
}

/// Runs `trainer` to `total_steps`, taking micro-batches from `batches(step, micro)`, saving
/// checkpoints every `save_steps` and at the end (or on Ctrl-C, when `stop` is raised), and
/// writing `metrics.csv`. `on_step` sees each step's record (the progress bar).
///
/// # Errors
/// A NaN/inf loss (the last good checkpoint is kept) or an I/O failure.
pub fn run<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    total_steps: usize,
    mut batches: impl FnMut(usize) -> Vec<Batch>,
    stop: &Arc<AtomicBool>,
    mut on_step: impl FnMut(&StepRecord, f64),
) -> Result<RunEnd> {
    let started = Instant::now();
    let mut tokens = 0usize;
    while trainer.state.step < total_steps {
        if stop.load(Ordering::SeqCst) {
            trainer.save_checkpoint()?;
            return Ok(RunEnd::Interrupted);
        }
        let micro = batches(trainer.state.step);
        let record = trainer.step(&micro, total_steps)?;
        tokens += record.tokens;
        on_step(
            &record,
            tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        );
        let at_save = trainer
            .config
            .save_steps
            .is_some_and(|n| record.step.is_multiple_of(n));
        if at_save || record.step == total_steps {
            trainer.save_checkpoint()?;
        }
    }
    Ok(RunEnd::Finished)
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::log_softmax;
    use fastlora_llama::IGNORE_INDEX;
    use lora_config::InitLoraWeights;

    use super::*;
    use crate::data::{Example, collate};
    use crate::{CpuBackend, FastLanguageModel, LoraConfig, PeftModel, materialize_builtin_model};

    type B = CpuBackend;
    type Inner = <B as AutodiffBackend>::InnerBackend;

    /// The built-in model with LoRA from `config` (its files are read whole at loading, so
    /// their temporary folder may go).
    fn builtin_peft(config: LoraConfig) -> PeftModel<B> {
        let dir = tempfile::tempdir().unwrap();
        let path = materialize_builtin_model(dir.path()).unwrap();
        FastLanguageModel::<B>::from_pretrained(path.to_str().unwrap(), &Default::default())
            .unwrap()
            .get_peft_model(config)
            .unwrap()
    }

    /// Every LoRA factor's gradient, `(name, values)` in the model's order, from `grad_of`.
    fn adapter_grads(
        model: &LlamaForCausalLm<B>,
        grad_of: impl Fn(&Param<Tensor<B, 2>>) -> Option<Tensor<Inner, 2>>,
    ) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        for (name, proj) in model.projections() {
            // Only adapters train: the frozen weights have no gradient.
            let Some(adapter) = proj.adapter.as_ref() else {
                continue;
            };
            for (factor, param) in [("A", &adapter.lora_a), ("B", &adapter.lora_b)] {
                let grad = grad_of(param).unwrap_or_else(|| panic!("{name}.{factor}: no gradient"));
                let values = grad.into_data().to_vec::<f32>().unwrap();
                out.push((format!("{name}.{factor}"), values));
            }
        }
        out
    }

    /// Asserts each gradient of `got` within 1e-4 of the largest magnitude of its counterpart
    /// in `want` (which must not be zero); returns how many were compared.
    fn assert_grads_close(got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)]) -> usize {
        assert_eq!(got.len(), want.len());
        for ((name, got), (_, want)) in got.iter().zip(want) {
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(want)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            assert!(scale > 0.0, "{name}: zero gradient");
            assert!(err <= 1e-4 * scale, "{name}: {err} over {scale}");
        }
        got.len()
    }

    /// A right-padded batch trains without a key mask (so the fused attention can run), also
    /// when padded further to a longer row (as for cuDNN); its loss and LoRA gradients must be
    /// those of the forward that masks the padding, computed here the plain way: full logits,
    /// log-softmax, mean NLL over the labelled positions.
    #[test]
    fn right_padded_batch_trains_as_if_masked() {
        let device = Default::default();
        let model = builtin_peft(
            LoraConfig::builder()
                .r(8)
                .lora_alpha(16.0)
                .target_modules(["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
                .init_lora_weights(InitLoraWeights::Random)
                .random_state(3407)
                .build()
                .unwrap(),
        );
        let short = Example::fully_trained(vec![5, 17, 42, 99]);
        let long = Example::fully_trained(vec![11, 12, 13, 14, 15, 16, 17, 18]);
        let batch = collate(&[&short, &long], 3);
        assert_eq!(batch.training_key_mask(), None);
        let longer = batch.clone().padded_to_multiple_of(16, 3, 64);
        assert_eq!(longer.seq, 16);
        let runs = [
            step_gradients(model.model(), std::slice::from_ref(&batch)),
            step_gradients(model.model(), std::slice::from_ref(&longer)),
        ];

        let [rows, seq] = [batch.batch, batch.seq];
        let ids = int_tensor::<B>(&batch.input_ids, [rows, seq], &device);
        let mask = int_tensor::<B>(&batch.attention_mask, [rows, seq], &device);
        let labels = int_tensor::<B>(&batch.labels, [rows, seq], &device).slice([0..rows, 1..seq]);
        let logits = model.model().forward(ids, Some(mask));
        let vocab = logits.dims()[2];
        let logp = log_softmax(logits.slice([0..rows, 0..seq - 1, 0..vocab]), 2);
        let keep = labels.clone().not_equal_elem(IGNORE_INDEX);
        let targets = labels.mask_fill(keep.clone().bool_not(), 0);
        let picked = logp
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .squeeze_dim::<2>(2);
        let keep = keep.float();
        let loss = (picked * keep.clone()).sum().neg() / keep.sum();
        let want_loss = f64::from(loss.clone().into_scalar());
        let want = loss.backward();
        let want = adapter_grads(model.model(), |param| param.grad(&want));
        let mut compared = 0;
        for got in &runs {
            assert!(
                (got.loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
                "loss {} vs masked {want_loss}",
                got.loss
            );
            let grads = adapter_grads(model.model(), |param| got.grads.get::<Inner, 2>(param.id));
            compared += assert_grads_close(&grads, &want);
        }
        assert_eq!(
            compared,
            2 * 5 * 2 * 2,
            "2 layers × 5 adapted projections × 2 factors × 2 row lengths"
        );
    }

    /// `clip_global_norm` against a float64 host computation: the norm over every LoRA
    /// gradient, each gradient scaled by `max / (norm + 1e-6)` when the norm exceeds `max`,
    /// untouched below it, and nothing computed without a `max`.
    #[test]
    fn clipping_scales_by_the_float64_global_norm() {
        let model = builtin_peft(
            LoraConfig::builder()
                .r(4)
                .init_lora_weights(InitLoraWeights::Random)
                .random_state(11)
                .build()
                .unwrap(),
        );
        let example = Example::fully_trained(vec![5, 17, 42, 99, 3, 8]);
        let batch = collate(&[&example], 3);
        // Deterministic on the CPU: every call gives the same gradients.
        let grads = || step_gradients(model.model(), std::slice::from_ref(&batch)).grads;
        let values = |grads: &GradientsParams| -> Vec<Vec<f64>> {
            adapter_grads(model.model(), |param| grads.get::<Inner, 2>(param.id))
                .into_iter()
                .map(|(_, values)| values.into_iter().map(f64::from).collect())
                .collect()
        };
        let before = values(&grads());
        let norm = before.iter().flatten().map(|g| g * g).sum::<f64>().sqrt();
        assert!(norm > 0.0);

        let mut unclipped = grads();
        assert_eq!(clip_global_norm(model.model(), &mut unclipped, None), None);
        assert_eq!(values(&unclipped), before);
        let mut loose = grads();
        let got = clip_global_norm(model.model(), &mut loose, Some(2.0 * norm)).unwrap();
        assert!((got - norm).abs() <= 1e-5 * norm, "{got} vs {norm}");
        assert_eq!(values(&loose), before);

        let mut clipped = grads();
        let max = norm / 4.0;
        clip_global_norm(model.model(), &mut clipped, Some(max)).unwrap();
        let factor = max / (norm + 1e-6);
        for (got, want) in values(&clipped)
            .iter()
            .flatten()
            .zip(before.iter().flatten())
        {
            assert!(
                (got - want * factor).abs() <= 1e-6 * norm,
                "{got} vs {}",
                want * factor
            );
        }
    }

    /// Three examples packed into two rows (none cut at a row boundary) give the loss and LoRA
    /// gradients of the same three examples as an ordinary padded batch; the same rows without
    /// their document boundaries do not.
    #[test]
    fn packed_rows_train_as_their_examples_alone() {
        let model = builtin_peft(
            LoraConfig::builder()
                .r(8)
                .lora_alpha(16.0)
                .init_lora_weights(InitLoraWeights::Random)
                .random_state(7)
                .build()
                .unwrap(),
        );
        let examples = [
            Example::fully_trained(vec![5, 17, 42, 99]),
            Example::fully_trained(vec![11, 12, 13, 14, 15]),
            Example::fully_trained(vec![7, 70, 77]),
        ];
        let rows = crate::data::pack(&examples, 9).unwrap();
        assert_eq!(rows.len(), 2);
        let packed = collate(&rows.iter().collect::<Vec<_>>(), 3);
        assert_eq!(
            packed.documents.as_deref(),
            Some(&[0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, -1, -1, -1, -1, -1, -1][..])
        );
        let alone = collate(&examples.iter().collect::<Vec<_>>(), 3);
        assert_eq!(alone.documents, None);
        assert_eq!(packed.num_trained_tokens(), alone.num_trained_tokens());
        let mut unbounded = packed.clone();
        unbounded.documents = None;

        let [got, want, crossed] = [&packed, &alone, &unbounded]
            .map(|batch| step_gradients(model.model(), std::slice::from_ref(batch)));
        assert!(
            (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
            "packed loss {} vs alone {}",
            got.loss,
            want.loss
        );
        assert!(
            (crossed.loss - want.loss).abs() > 1e-3 * want.loss.abs(),
            "the boundaries change nothing: {} vs {}",
            crossed.loss,
            want.loss
        );
        let grads_of = |run: &StepGradients| {
            adapter_grads(model.model(), |param| run.grads.get::<Inner, 2>(param.id))
        };
        let compared = assert_grads_close(&grads_of(&got), &grads_of(&want));
        assert_eq!(compared, 2 * 7 * 2, "2 layers × 7 projections × 2 factors");
    }
}
