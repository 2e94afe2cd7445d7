//! `fastlora train`: every `get_peft_model` parameter and the trainer's as flags (or a TOML
//! `--config`), the built-in tiny model and dataset by default.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::backend::AutodiffBackend;
use fastlora_llama::{ModelError, flash_attention};
use indicatif::{ProgressBar, ProgressStyle};
use lora_config::{GradientCheckpointing, InitLoraWeights, LoraConfig, TargetModules};
use serde::Deserialize;

use super::{LrScheduler, RunEnd, TrainConfig, Trainer, latest_checkpoint, run};
use crate::builtin::{TINY_DATASET, materialize_builtin_model};
use crate::data::{Batch, DataConfig, Dataset};
use crate::error::{FastLoraError, Result};
use crate::peft::PeftModel;
use crate::pretrained::{FastLanguageModel, LoadOptions};
use crate::{CpuBackend, CudaMemory};

/// Flags of `fastlora train`. Unset flags take the `--config` file's values, then the defaults
/// (Unsloth's for LoRA, the built-in demo's for training when no `--model` is given).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these options (flag names with `_`, e.g. `lora_alpha = 32`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model folder, .safetensors file or hub id; default: the built-in tiny Llama.
    #[arg(long)]
    pub model: Option<String>,
    /// Keep a GGUF model's quantized projection weights quantized in memory and dequantize
    /// them per layer on the fly (the QLoRA idea; `.gguf` models only).
    #[arg(long)]
    pub quantized_base: Option<bool>,
    /// JSONL training data ({"text"}, Alpaca or chat rows); default: the bundled demo set.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Where checkpoints, metrics.csv and the final adapter go.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Continue the run in this checkpoint (or the latest checkpoint in this folder).
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,

    /// LoRA rank.
    #[arg(long)]
    pub r: Option<usize>,
    /// LoRA alpha (scaling alpha/r, or alpha/√r with rsLoRA).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names, a regex, or `all-linear`.
    #[arg(long)]
    pub target_modules: Option<String>,
    /// Which biases train: none, all or lora_only.
    #[arg(long)]
    pub bias: Option<String>,
    /// Comma-separated layer indices to adapt.
    #[arg(long, value_delimiter = ',')]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Name of the layer list for layers_to_transform (e.g. `layers`).
    #[arg(long)]
    pub layers_pattern: Option<String>,
    /// Adapt only the last N layers (when layers_to_transform is unset).
    #[arg(long)]
    pub finetune_last_n_layers: Option<usize>,
    /// Gradient checkpointing: false, true or unsloth.
    #[arg(long)]
    pub use_gradient_checkpointing: Option<String>,
    /// Seed of the adapter initialisation.
    #[arg(long)]
    pub random_state: Option<u64>,
    /// Longest example in tokens (longer ones are truncated and counted).
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// Rank-stabilised LoRA scaling.
    #[arg(long)]
    pub use_rslora: Option<bool>,
    /// Comma-separated modules trained in full: embed_tokens, lm_head.
    #[arg(long, value_delimiter = ',')]
    pub modules_to_save: Option<Vec<String>>,
    /// true, false, gaussian or pissa.
    #[arg(long)]
    pub init_lora_weights: Option<String>,
    /// LoftQ settings as JSON (LoftQ itself is not supported; only `{}` passes validation).
    #[arg(long)]
    pub loftq_config: Option<String>,
    /// Where Unsloth offloads trained embeddings (accepted for compatibility).
    #[arg(long)]
    pub temporary_location: Option<String>,
    /// Quantisation-aware training scheme (not supported; rejected when set).
    #[arg(long)]
    pub qat_scheme: Option<String>,
    /// Comma-separated MoE expert parameters to adapt (not supported; rejected when set).
    #[arg(long, value_delimiter = ',')]
    pub target_parameters: Option<Vec<String>>,
    /// Keep tied embeddings one parameter when one of them trains.
    #[arg(long)]
    pub ensure_weight_tying: Option<bool>,

    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of trained embed_tokens/lm_head copies.
    #[arg(long)]
    pub embedding_learning_rate: Option<f64>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// linear, cosine or constant.
    #[arg(long, value_enum)]
    pub lr_scheduler: Option<LrScheduler>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Passes over the data.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Global gradient-norm clip (0 disables).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N steps (and always at the end).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Pack examples into full rows of max_seq_length tokens.
    #[arg(long)]
    pub packing: Option<bool>,
    /// CUDA device memory: `exact` (default: buffers at their exact size, the unused ones
    /// released when the batch shape changes) or `pools` (CubeCL's paged pools).
    #[arg(long, value_enum)]
    pub cuda_memory: Option<CudaMemory>,
    /// Train on whole examples instead of responses only.
    #[arg(long)]
    pub train_on_prompts: Option<bool>,
    /// `cpu` (default) or `cuda`/`cuda:N` (a build with `--features cuda`).
    #[arg(long)]
    pub device: Option<String>,
    /// Float type of the base model and activations on CUDA: `bf16` (default) or `f32`; LoRA
    /// factors, their gradients and the optimizer state stay f32. The CPU runs f32.
    #[arg(long)]
    pub dtype: Option<String>,
}

/// Where `fastlora train` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainDevice {
    /// Burn's ndarray backend, f32.
    Cpu,
    /// Burn's CUDA `CubeBackend` on GPU `index`, in bf16 or f32.
    Cuda {
        /// The CUDA device ordinal.
        index: usize,
        /// bf16 (else f32) base weights and activations.
        bf16: bool,
    },
}

impl TrainDevice {
    /// The device a `--device` (`cpu`, `cuda`, `cuda:N`; default cpu) and `--dtype` (`bf16`,
    /// `f32`; default bf16 on CUDA, f32 on the CPU) pair names.
    ///
    /// # Errors
    /// An unknown device or dtype, or bf16 on the CPU, naming the flag.
    pub fn parse(device: Option<&str>, dtype: Option<&str>) -> Result<Self> {
        let bf16 = match dtype {
            None | Some("bf16") => true,
            Some("f32") => false,
            Some(other) => return Err(flag_error("dtype", other, "bf16 or f32")),
        };
        match device {
            None | Some("cpu") => match dtype {
                None | Some("f32") => Ok(Self::Cpu),
                Some(other) => Err(flag_error("dtype", other, "the CPU trains in f32")),
            },
            Some("cuda") => Ok(Self::Cuda { index: 0, bf16 }),
            Some(other) => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|index| Self::Cuda { index, bf16 })
                .ok_or_else(|| flag_error("device", other, "cpu, cuda or cuda:N")),
        }
    }
}

impl TrainArgs {
    /// Fills unset flags from the `--config` TOML file.
    ///
    /// # Errors
    /// An unreadable or invalid TOML file, naming it and the key.
    pub fn with_config_file(self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io("read", &path, e))?;
        let file: TrainArgs = toml::from_str(&text).map_err(|e| FastLoraError::Input {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(self.or(file))
    }

    /// `self`'s set values, else `other`'s.
    fn or(self, other: Self) -> Self {
        macro_rules! pick {
            ($($field:ident),*) => { Self { config: self.config, resume: self.resume, $($field: self.$field.or(other.$field)),* } };
        }
        pick!(
            model,
            quantized_base,
            dataset,
            output_dir,
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            bias,
            layers_to_transform,
            layers_pattern,
            finetune_last_n_layers,
            loftq_config,
            temporary_location,
            qat_scheme,
            target_parameters,
            use_gradient_checkpointing,
            random_state,
            max_seq_length,
            use_rslora,
            modules_to_save,
            init_lora_weights,
            ensure_weight_tying,
            lr,
            embedding_learning_rate,
            weight_decay,
            lr_scheduler,
            warmup_steps,
            epochs,
            max_steps,
            batch_size,
            grad_accum,
            max_grad_norm,
            seed,
            save_steps,
            packing,
            cuda_memory,
            train_on_prompts,
            device,
            dtype
        )
    }

    /// The device `--device`/`--dtype` name.
    ///
    /// # Errors
    /// An unknown device or dtype, naming the flag.
    pub fn train_device(&self) -> Result<TrainDevice> {
        TrainDevice::parse(self.device.as_deref(), self.dtype.as_deref())
    }

    /// The LoRA configuration these flags describe (Unsloth's defaults for unset ones).
    ///
    /// # Errors
    /// An invalid value, naming the flag and what is allowed.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let mut config = LoraConfig::default();
        set(&mut config.r, self.r);
        set(&mut config.lora_alpha, self.lora_alpha);
        set(&mut config.lora_dropout, self.lora_dropout);
        set(&mut config.random_state, self.random_state);
        set(&mut config.max_seq_length, self.max_seq_length);
        set(&mut config.use_rslora, self.use_rslora);
        set(&mut config.ensure_weight_tying, self.ensure_weight_tying);
        if let Some(targets) = &self.target_modules {
            config.target_modules = Some(parse_targets(targets));
        }
        if let Some(layers) = &self.layers_to_transform {
            config.layers_to_transform = Some(layers.clone());
        }
        if let Some(pattern) = &self.layers_pattern {
            config.layers_pattern = Some(vec![pattern.clone()]);
        }
        config.finetune_last_n_layers = self
            .finetune_last_n_layers
            .or(config.finetune_last_n_layers);
        if let Some(loftq) = &self.loftq_config {
            config.loftq_config = serde_json::from_str(loftq)
                .map_err(|e| flag_error("loftq-config", loftq, &format!("a JSON object ({e})")))?;
        }
        set(
            &mut config.temporary_location,
            self.temporary_location.clone(),
        );
        config.qat_scheme = self.qat_scheme.clone().or(config.qat_scheme);
        config.target_parameters = self.target_parameters.clone().or(config.target_parameters);
        if let Some(modules) = &self.modules_to_save {
            config.modules_to_save = Some(modules.clone());
        }
        if let Some(bias) = &self.bias {
            config.bias = json_value("bias", bias)?;
        }
        if let Some(mode) = &self.use_gradient_checkpointing {
            config.use_gradient_checkpointing = match mode.as_str() {
                "false" => GradientCheckpointing::Off,
                "true" => GradientCheckpointing::On,
                "unsloth" => GradientCheckpointing::Unsloth,
                other => {
                    return Err(flag_error(
                        "use-gradient-checkpointing",
                        other,
                        "false, true or unsloth",
                    ));
                }
            };
        }
        if let Some(init) = &self.init_lora_weights {
            config.init_lora_weights = match init.as_str() {
                "true" => InitLoraWeights::Standard,
                "false" => InitLoraWeights::Random,
                other => json_value("init_lora_weights", other)?,
            };
        }
        config.validate_values()?;
        Ok(config)
    }

    /// The trainer configuration (the built-in demo's defaults when no model is given).
    pub fn train_config(&self) -> TrainConfig {
        let demo = self.model.is_none();
        let mut config = TrainConfig {
            output_dir: PathBuf::from("outputs"),
            ..TrainConfig::default()
        };
        if demo {
            // A random 2-layer model memorises the demo set in a minute on two cores only
            // with a larger step than real fine-tuning uses.
            config.learning_rate = 1e-2;
            config.max_steps = Some(60);
            config.batch_size = 4;
            config.grad_accum = 1;
            config.warmup_steps = 3;
        }
        set(&mut config.learning_rate, self.lr);
        config.embedding_learning_rate = self
            .embedding_learning_rate
            .or(config.embedding_learning_rate);
        set(&mut config.weight_decay, self.weight_decay);
        set(&mut config.lr_scheduler, self.lr_scheduler);
        set(&mut config.warmup_steps, self.warmup_steps);
        set(&mut config.epochs, self.epochs);
        config.max_steps = self.max_steps.or(config.max_steps);
        set(&mut config.batch_size, self.batch_size);
        set(&mut config.grad_accum, self.grad_accum);
        if let Some(norm) = self.max_grad_norm {
            config.max_grad_norm = (norm > 0.0).then_some(norm);
        }
        set(&mut config.seed, self.seed);
        config.save_steps = self.save_steps.or(config.save_steps);
        if let Some(dir) = &self.output_dir {
            config.output_dir = dir.clone();
        }
        config
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

fn parse_targets(text: &str) -> TargetModules {
    match text {
        "all-linear" => TargetModules::AllLinear,
        t if t.chars().any(|c| "\\^$*+?()[]|".contains(c)) => TargetModules::Pattern(t.to_string()),
        t => TargetModules::Names(t.split(',').map(|s| s.trim().to_string()).collect()),
    }
}

/// Parses a flag through the field's JSON form, so flags accept exactly the file values.
fn json_value<T: serde::de::DeserializeOwned>(field: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string()))
        .map_err(|e| flag_error(&field.replace('_', "-"), value, &e.to_string()))
}

fn flag_error(flag: &str, value: &str, allowed: &str) -> FastLoraError {
    FastLoraError::Input {
        path: PathBuf::from(format!("--{flag}")),
        message: format!("invalid value `{value}`: {allowed}"),
    }
}

/// Runs `fastlora train` on the device `--device` names (the CPU by default).
///
/// # Errors
/// Bad flags, model, data or adapter (each naming the file or field), a NaN loss, I/O; CUDA in
/// a build without the `cuda` feature.
pub fn train_command(args: TrainArgs) -> Result<()> {
    let args = args.with_config_file()?;
    match args.train_device()? {
        TrainDevice::Cpu => train_on::<CpuBackend>(args, Default::default(), |_| None),
        #[cfg(feature = "cuda")]
        TrainDevice::Cuda { index, bf16 } => {
            use burn::backend::Autodiff;
            use burn::backend::cuda::CudaDevice;
            use fused_mlp::CudaBackend;
            let device = CudaDevice::new(index);
            let memory = args.cuda_memory.unwrap_or_default();
            if bf16 {
                type B = Autodiff<CudaBackend<burn::tensor::bf16>>;
                memory.run::<B, _>(&device.clone(), || {
                    train_on::<B>(args, device, cuda_reserved_bytes)
                })
            } else {
                type B = Autodiff<CudaBackend<f32>>;
                memory.run::<B, _>(&device.clone(), || {
                    train_on::<B>(args, device, cuda_reserved_bytes)
                })
            }
        }
        #[cfg(not(feature = "cuda"))]
        TrainDevice::Cuda { .. } => Err(FastLoraError::Input {
            path: PathBuf::from("--device"),
            message: "this fastlora was built without CUDA; build it with \
                      `cargo build --release -p fastlora --features cuda` (or `cargo xtask stage`)"
                .to_string(),
        }),
    }
}

/// `bytes` in GiB.
pub(crate) fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// Bytes CubeCL's allocator holds on the CUDA device: an upper bound of the memory in use at
/// the peak of the steps so far (its pools keep what the largest step needed).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_reserved_bytes(device: &burn::backend::cuda::CudaDevice) -> Option<u64> {
    use cubecl::Runtime;
    let client = cubecl::cuda::CudaRuntime::client(device);
    client.memory_usage().ok().map(|usage| usage.bytes_reserved)
}

/// Trains on `device`; `reserved_bytes` reads the device memory the allocator holds (printed
/// with each logged step where it is known: CUDA).
fn train_on<B: AutodiffBackend>(
    args: TrainArgs,
    device: B::Device,
    reserved_bytes: impl Fn(&B::Device) -> Option<u64>,
) -> Result<()> {
    let lora = args.lora_config()?;
    let config = args.train_config();
    let model_dir = match &args.model {
        Some(model) => model.clone(),
        None => materialize_builtin_model(&config.output_dir.join("builtin-tiny-llama"))?
            .display()
            .to_string(),
    };
    let options = LoadOptions {
        quantized_base: args.quantized_base.unwrap_or(false),
    };
    crate::pretrained::reserve_lora_columns(&lora);
    let base = FastLanguageModel::<B>::from_pretrained_with(&model_dir, options, &device)?;
    if options.quantized_base {
        println!("{}", base.base_memory_report());
    }
    let tokenizer = base.tokenizer.clone().ok_or_else(|| FastLoraError::Input {
        path: base.source.clone(),
        message: "training needs a tokenizer.json beside the model".to_string(),
    })?;
    let data_config = DataConfig {
        max_seq_length: lora.max_seq_length.min(base.config.max_position_embeddings),
        packing: args.packing.unwrap_or(false),
        completion_only: !args.train_on_prompts.unwrap_or(false),
        ..DataConfig::default()
    };
    let dataset = match &args.dataset {
        Some(path) => Dataset::from_jsonl(path, &tokenizer, &data_config)?,
        None => Dataset::from_jsonl_str(
            TINY_DATASET,
            "<built-in tiny_dataset.jsonl>",
            &tokenizer,
            &data_config,
        )?,
    };
    println!("{}", dataset.report());
    let pad_id = dataset.pad_id();
    // Longer rows that keep the attention on cuDNN (see `Batch::padded_to_multiple_of`).
    let row_multiple = flash_attention::fused_sequence_multiple::<B>();
    let max_positions = base.config.max_position_embeddings;

    let mut trainer = match &args.resume {
        Some(dir) => {
            let checkpoint = latest_checkpoint(dir).ok_or_else(|| FastLoraError::Input {
                path: dir.clone(),
                message: "no complete checkpoint (checkpoint-N with trainer_state.json) here"
                    .to_string(),
            })?;
            println!("resuming from {}", checkpoint.display());
            let peft = PeftModel::from_pretrained(base, &checkpoint)?;
            Trainer::resume(peft, config.clone(), &checkpoint)?
        }
        None => Trainer::new(base.get_peft_model(lora)?, config.clone()),
    };
    print!("{}", trainer.peft.report);
    trainer.peft.print_trainable_parameters();

    let total = config.total_steps(dataset.len());
    let per_step = config.batch_size * config.grad_accum;
    // Exact-size buffers serve only requests of their own size, so after a change of batch
    // shape the previous shape's buffers would stay reserved beside the new ones.
    let release_on_new_shape = args.cuda_memory.unwrap_or_default() == CudaMemory::Exact;
    let mut last_shape = None;
    let mut batches = |step: usize| {
        let micro: Vec<Batch> = (0..config.grad_accum)
            .map(|micro| {
                let first = step * per_step + micro * config.batch_size;
                let indices: Vec<usize> = (first..first + config.batch_size)
                    .map(|i| dataset.example_at(i, config.seed))
                    .collect();
                dataset.collate(&indices, pad_id).padded_to_multiple_of(
                    row_multiple,
                    pad_id,
                    max_positions,
                )
            })
            .collect();
        let shape = micro.first().map(|b| (b.batch, b.seq));
        if release_on_new_shape && last_shape.is_some() && last_shape != shape {
            B::memory_cleanup(&device);
        }
        last_shape = shape;
        micro
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    // A second Ctrl-C during the save still kills the process.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    let bar = ProgressBar::new(total as u64).with_position(trainer.state.step as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("a valid template"),
    );
    let metrics_path = config.output_dir.join("metrics.csv");
    let mut metrics = super::metrics::MetricsCsv::open(&metrics_path, trainer.state.step)?;
    let end = run(
        &mut trainer,
        total,
        &mut batches,
        &stop,
        |record, tokens_per_s| {
            bar.set_position(record.step as u64);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                record.loss, record.lr, tokens_per_s
            ));
            metrics.append(record, tokens_per_s);
            if record.step == 1 || record.step.is_multiple_of(10) || record.step == total {
                let memory = reserved_bytes(&device)
                    .map(|bytes| format!("  mem {:.2} GiB reserved", gib(bytes)))
                    .unwrap_or_default();
                let norm = record
                    .grad_norm
                    .map(|norm| format!("  grad_norm {norm:.3}"))
                    .unwrap_or_default();
                bar.suspend(|| {
                    println!(
                        "step {:>5}  loss {:.4}  lr {:.3e}{norm}{memory}",
                        record.step, record.loss, record.lr
                    )
                });
            }
        },
    );
    bar.finish_and_clear();
    metrics.finish()?;
    let curve = config.output_dir.join("loss.png");
    super::write_loss_curve(&curve, &trainer.state.history)?;
    match end? {
        RunEnd::Interrupted => println!(
            "interrupted: checkpoint saved at step {}",
            trainer.state.step
        ),
        RunEnd::Finished => {
            let adapter = config.output_dir.join("adapter");
            trainer.peft.save_pretrained(&adapter)?;
            let history = &trainer.state.history;
            if let (Some(first), Some(last)) = (history.first(), history.last()) {
                println!(
                    "loss {:.4} → {:.4} over {} steps",
                    first.loss, last.loss, last.step
                );
            }
            println!("adapter saved to {}", adapter.display());
            println!(
                "metrics: {}, loss curve: {}",
                metrics_path.display(),
                curve.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(flags: &[&str]) -> TrainArgs {
        Cli::parse_from(std::iter::once("train").chain(flags.iter().copied())).args
    }

    #[test]
    fn device_flags_parse_and_bad_ones_name_the_flag() {
        assert_eq!(parse(&[]).train_device().unwrap(), TrainDevice::Cpu);
        assert_eq!(
            parse(&["--device", "cuda"]).train_device().unwrap(),
            TrainDevice::Cuda {
                index: 0,
                bf16: true
            }
        );
        assert_eq!(
            parse(&["--device", "cuda:3", "--dtype", "f32"])
                .train_device()
                .unwrap(),
            TrainDevice::Cuda {
                index: 3,
                bf16: false
            }
        );
        for (flags, flag) in [
            (&["--device", "gpu"][..], "--device"),
            (&["--device", "cuda:x"][..], "--device"),
            (&["--device", "cuda", "--dtype", "f16"][..], "--dtype"),
            (&["--dtype", "bf16"][..], "--dtype"),
        ] {
            let err = parse(flags).train_device().unwrap_err().to_string();
            assert!(err.starts_with(flag), "{flags:?}: {err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = train_command(parse(&["--device", "cuda"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn flags_map_onto_lora_config_with_unsloth_defaults() {
        let args = parse(&[
            "--r",
            "8",
            "--lora-alpha",
            "32",
            "--use-rslora",
            "true",
            "--bias",
            "lora_only",
            "--target-modules",
            "q_proj,v_proj",
            "--modules-to-save",
            "lm_head",
            "--init-lora-weights",
            "gaussian",
            "--use-gradient-checkpointing",
            "false",
            "--layers-to-transform",
            "0,1",
        ]);
        let lora = args.lora_config().unwrap();
        assert_eq!((lora.r, lora.lora_alpha, lora.use_rslora), (8, 32.0, true));
        assert_eq!(lora.bias, lora_config::Bias::LoraOnly);
        assert_eq!(
            lora.target_modules,
            Some(TargetModules::Names(
                ["q_proj".into(), "v_proj".into()].into()
            ))
        );
        assert_eq!(lora.init_lora_weights, InitLoraWeights::Gaussian);
        assert_eq!(lora.use_gradient_checkpointing, GradientCheckpointing::Off);
        assert_eq!(lora.layers_to_transform, Some(vec![0, 1]));
        assert_eq!(lora.modules_to_save, Some(vec!["lm_head".to_string()]));
        let defaults = parse(&["--model", "x"]).lora_config().unwrap();
        assert_eq!(defaults, LoraConfig::default());
        assert_eq!(
            parse(&["--model", "x"]).train_config(),
            TrainConfig::default()
        );
    }

    #[test]
    fn bad_flag_values_name_the_flag() {
        let err = parse(&["--bias", "some"])
            .lora_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--bias") && err.contains("some"), "{err}");
        let err = parse(&["--use-gradient-checkpointing", "maybe"])
            .lora_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsloth"), "{err}");
        let err = parse(&["--r", "0"]).lora_config().unwrap_err().to_string();
        assert!(err.contains('r'), "{err}");
    }

    #[test]
    fn toml_config_fills_unset_flags_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "r = 32\nlora_alpha = 64.0\nlr = 1e-4\nmax_steps = 7\nlr_scheduler = \"cosine\"\n\
             cuda_memory = \"pools\"\n",
        )
        .unwrap();
        let args = parse(&["--config", path.to_str().unwrap(), "--r", "4"])
            .with_config_file()
            .unwrap();
        assert_eq!(args.cuda_memory, Some(CudaMemory::Pools));
        let flag = parse(&["--config", path.to_str().unwrap(), "--cuda-memory", "exact"]);
        assert_eq!(
            flag.with_config_file().unwrap().cuda_memory,
            Some(CudaMemory::Exact)
        );
        let lora = args.lora_config().unwrap();
        assert_eq!((lora.r, lora.lora_alpha), (4, 64.0));
        let train = args.train_config();
        assert_eq!(
            (train.learning_rate, train.max_steps, train.lr_scheduler),
            (1e-4, Some(7), LrScheduler::Cosine)
        );
        std::fs::write(&path, "rank = 3\n").unwrap();
        let err = parse(&["--config", path.to_str().unwrap()])
            .with_config_file()
            .unwrap_err()
            .to_string();
        assert!(err.contains("run.toml") && err.contains("rank"), "{err}");
    }
}
