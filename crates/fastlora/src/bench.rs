//! `fastlora bench`: end-to-end LoRA SFT steps on a random-weight Llama of a named shape, timed
//! the way `../shared/peers` time HF+PEFT and Unsloth (same shapes, r = 16 and alpha 16 on all
//! seven projections, dropout 0, AdamW, labels = inputs, median step after warm-up), so the
//! three can be compared line by line.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use fastlora_llama::{LlamaConfig, ModelError, WeightSource, flash_attention};
use serde::Serialize;

use crate::CudaMemory;
use crate::data::Batch;
use crate::error::{FastLoraError, Result};
use crate::peft::AttentionPath;
use crate::pretrained::FastLanguageModel;
use crate::train::{StepTimes, TrainArgs, TrainConfig, TrainDevice, Trainer};

/// A Llama shape the peers benchmark: the dimensions of a public checkpoint, weights random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchShape {
    /// The name used on the command line and in the peers' output.
    pub name: &'static str,
    /// `hidden_size`.
    pub hidden: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads`.
    pub kv_heads: usize,
    /// `vocab_size`.
    pub vocab: usize,
}

/// The shapes of `../shared/peers/peft_bench.py` and `unsloth_bench.py`.
pub const BENCH_SHAPES: [BenchShape; 3] = [
    BenchShape {
        name: "smollm2-135m",
        hidden: 576,
        intermediate: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        vocab: 49152,
    },
    BenchShape {
        name: "llama-3.2-1b",
        hidden: 2048,
        intermediate: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        vocab: 128256,
    },
    BenchShape {
        name: "llama-3.1-8b",
        hidden: 4096,
        intermediate: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        vocab: 128256,
    },
];

impl BenchShape {
    /// The shape called `name`.
    ///
    /// # Errors
    /// An unknown name, listing the known ones.
    pub fn by_name(name: &str) -> Result<Self> {
        BENCH_SHAPES
            .iter()
            .copied()
            .find(|s| s.name == name)
            .ok_or_else(|| FastLoraError::Input {
                path: PathBuf::from("--shape"),
                message: format!(
                    "unknown shape `{name}`: one of {}",
                    BENCH_SHAPES.map(|s| s.name).join(", ")
                ),
            })
    }

    /// The config transformers' `LlamaConfig` gives these dimensions (the peers' defaults:
    /// untied head, RoPE θ 10 000, RMSNorm ε 1e-6), with room for `seq` positions.
    ///
    /// # Errors
    /// None in practice; a config the parser rejects is reported as such.
    pub fn config(&self, seq: usize) -> Result<LlamaConfig> {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": seq.max(2048),
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "hidden_act": "silu",
        });
        Ok(LlamaConfig::from_json_str(
            &json.to_string(),
            &PathBuf::from(format!("<bench shape {}>", self.name)),
        )?)
    }
}

/// Uniform weights of a given standard deviation from a counter-based generator, filled on
/// every core: an 8B-shaped model gets its random weights in seconds (the seeded normal draws
/// of [`crate::RandomWeights`] would take minutes). Norm gains are 1.
pub struct BenchWeights {
    std: f32,
}

impl BenchWeights {
    /// Weights with standard deviation `std` (HF's initializer range is 0.02).
    pub fn new(std: f32) -> Self {
        Self { std }
    }
}

/// SplitMix64: a bijective mix of a counter, so every element is independent of the order
/// the threads fill them in.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl WeightSource for BenchWeights {
    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> std::result::Result<Option<Vec<f32>>, ModelError> {
        let len: usize = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(Some(vec![1.0; len]));
        }
        let seed = name.bytes().fold(0xCBF2_9CE4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
        });
        // Uniform on [-a, a] has standard deviation a/√3.
        let half_width = self.std * 3f32.sqrt();
        let mut values = vec![0f32; len];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = len.div_ceil(threads).max(1 << 16);
        std::thread::scope(|scope| {
            for (c, part) in values.chunks_mut(chunk).enumerate() {
                scope.spawn(move || {
                    let first = (c * chunk) as u64;
                    for (i, v) in part.iter_mut().enumerate() {
                        let bits = splitmix64(seed ^ (first + i as u64));
                        // 24 random bits → [0, 1).
                        let unit = (bits >> 40) as f32 / (1u64 << 24) as f32;
                        *v = (2.0 * unit - 1.0) * half_width;
                    }
                });
            }
        });
        Ok(Some(values))
    }

    fn location(&self) -> PathBuf {
        PathBuf::from("<bench random weights>")
    }
}

/// Flags of `fastlora bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model shape: smollm2-135m, llama-3.2-1b or llama-3.1-8b.
    #[arg(long, default_value = "smollm2-135m")]
    pub shape: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Gradient checkpointing: false, true or unsloth.
    #[arg(long, default_value = "unsloth")]
    pub use_gradient_checkpointing: String,
    /// LoRA rank (alpha is set equal, as in the peers).
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Steps after the timed ones that sync the device between the step's phases, for the
    /// per-phase times (their medians); the timed steps sync only where a step ends, as the
    /// peers' do, because a sync inside a step idles the device while the host catches up.
    #[arg(long, default_value_t = 3)]
    pub phase_steps: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// bf16 or f32 (CUDA); the CPU runs f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Run the portable (unfused) path instead of the fused kernels, as a baseline.
    #[arg(long)]
    pub portable: bool,
    /// After the timed steps, run one more with every model block and fused-op phase timed
    /// (device syncs around each) and print the breakdown to stderr.
    #[arg(long)]
    pub profile: bool,
    /// CUDA device memory: buffers at their exact size, or CubeCL's paged pools.
    #[arg(long, value_enum, default_value_t = CudaMemory::Exact)]
    pub cuda_memory: CudaMemory,
    /// Rows pack documents of 100 to 700 tokens (the last one cut at the row's end), each
    /// attending only to itself, as `fastlora train --packing` batches do.
    #[arg(long)]
    pub packed: bool,
    /// Recompute the MLP's down projection in checkpointed backward too, as Unsloth does (by
    /// default the recompute skips it: the layer output's value is not read there).
    #[arg(long)]
    pub full_recompute: bool,
}

/// One benchmark line, in the peers' JSON field names where they have one.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Always `fastlora`.
    pub r#impl: &'static str,
    /// Shape name.
    pub shape: String,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Checkpointing mode.
    pub ckpt: String,
    /// `fused` or `portable`.
    pub path: &'static str,
    /// The attention the timed steps ran: `cudnn` (cuDNN's fused kernel ran in them), `block`
    /// (the block-wise op) or `materialised`.
    pub attention: &'static str,
    /// Median step, milliseconds.
    pub step_ms: f64,
    /// Tokens per second at the median step.
    pub tok_s: f64,
    /// `exact` or `pools`: how CUDA memory was allocated (see [`CudaMemory`]).
    pub cuda_memory: &'static str,
    /// Whether the rows packed documents (`--packed`).
    pub packed: bool,
    /// Whether checkpointed backward recomputed the MLP's down projection (`--full-recompute`).
    pub full_recompute: bool,
    /// Device memory the allocator had reserved at the end (an upper bound of the peak in
    /// use), GiB; absent where the backend does not say.
    pub peak_reserved_gib: Option<f64>,
    /// The peers' FLOP estimate per token × tokens / step time, TFLOP/s.
    pub approx_tflops: f64,
    /// Loss of the last timed step.
    pub loss: f64,
    /// Median of each phase over the `--phase-steps` steps, milliseconds (see [`StepTimes`]).
    pub forward_ms: f64,
    /// Backward, milliseconds.
    pub backward_ms: f64,
    /// Gradient gathering and clipping, milliseconds.
    pub clip_ms: f64,
    /// AdamW, milliseconds.
    pub optimizer_ms: f64,
    /// The host's own time in the step (see [`StepTimes::host`]), milliseconds.
    pub host_ms: f64,
}

/// Runs `fastlora bench` and prints one JSON line.
///
/// # Errors
/// Bad flags, a NaN loss, or CUDA asked of a build without the `cuda` feature.
pub fn bench_command(args: BenchArgs) -> Result<BenchResult> {
    let device = TrainDevice::parse(Some(&args.device), args.dtype.as_deref())?;
    fused_mlp::set_fused_enabled(!args.portable);
    fused_mlp::set_graph_only_enabled(!args.full_recompute);
    // A bisecting switch for the loss kernel.
    if std::env::var_os("FASTLORA_NO_FUSED_CE").is_some() {
        fastlora_llama::set_fused_cross_entropy(false);
    }
    let result = match device {
        TrainDevice::Cpu => bench_on::<crate::CpuBackend>(&args, Default::default(), |_| None)?,
        #[cfg(feature = "cuda")]
        TrainDevice::Cuda { index, bf16 } => {
            use burn::backend::Autodiff;
            use burn::backend::cuda::CudaDevice;
            use fused_mlp::CudaBackend;

            use crate::train::cuda_reserved_bytes;
            let device = CudaDevice::new(index);
            if bf16 {
                bench_on::<Autodiff<CudaBackend<burn::tensor::bf16>>>(
                    &args,
                    device,
                    cuda_reserved_bytes,
                )?
            } else {
                bench_on::<Autodiff<CudaBackend<f32>>>(&args, device, cuda_reserved_bytes)?
            }
        }
        #[cfg(not(feature = "cuda"))]
        TrainDevice::Cuda { .. } => {
            return Err(FastLoraError::Input {
                path: PathBuf::from("--device"),
                message: "this fastlora was built without CUDA; build it with \
                          `cargo build --release -p fastlora --features cuda` (or `cargo xtask stage`)"
                    .to_string(),
            });
        }
    };
    println!(
        "{}",
        serde_json::to_string(&result).expect("a plain struct serialises")
    );
    Ok(result)
}

fn bench_on<B: AutodiffBackend>(
    args: &BenchArgs,
    device: B::Device,
    reserved_bytes: impl Fn(&B::Device) -> Option<u64>,
) -> Result<BenchResult> {
    let inner = device.clone();
    args.cuda_memory
        .run::<B, _>(&device, || bench_steps::<B>(args, inner, reserved_bytes))
}

fn bench_steps<B: AutodiffBackend>(
    args: &BenchArgs,
    device: B::Device,
    reserved_bytes: impl Fn(&B::Device) -> Option<u64>,
) -> Result<BenchResult> {
    let shape = BenchShape::by_name(&args.shape)?;
    let config = shape.config(args.seq)?;
    let lora = TrainArgs {
        r: Some(args.r),
        lora_alpha: Some(args.r as f64),
        lora_dropout: Some(0.0),
        target_modules: Some("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".to_string()),
        use_gradient_checkpointing: Some(args.use_gradient_checkpointing.clone()),
        max_seq_length: Some(args.seq),
        ..TrainArgs::default()
    }
    .lora_config()?;
    crate::pretrained::reserve_lora_columns(&lora);
    let base =
        FastLanguageModel::<B>::from_source(config, &mut BenchWeights::new(0.02), None, &device)?;
    let peft = base.get_peft_model(lora)?;
    let counts = peft.parameter_counts();
    eprint!("{}", peft.report);
    let train = TrainConfig {
        learning_rate: 1e-4,
        warmup_steps: 0,
        batch_size: args.batch,
        grad_accum: 1,
        max_grad_norm: None,
        weight_decay: 0.01,
        output_dir: std::env::temp_dir().join("fastlora-bench"),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(peft, train);
    let batch = random_batch(args.batch, args.seq, shape.vocab, args.packed);
    let total = args.warmup + args.steps + args.phase_steps;
    let mut steps: Vec<f64> = Vec::with_capacity(args.steps);
    let mut phases: Vec<StepTimes> = Vec::with_capacity(args.phase_steps);
    let mut loss = f64::NAN;
    let mut cudnn_before = flash_attention::cudnn_calls();
    for step in 0..total {
        let timed = (args.warmup..args.warmup + args.steps).contains(&step);
        let phased = step >= args.warmup + args.steps;
        if step == args.warmup {
            cudnn_before = flash_attention::cudnn_calls();
        }
        trainer.set_profiling(phased);
        let _ = B::sync(&device);
        let started = Instant::now();
        let record = trainer.step(std::slice::from_ref(&batch), total)?;
        let _ = B::sync(&device);
        let seconds = started.elapsed().as_secs_f64();
        let label = match (step < args.warmup, phased) {
            (true, _) => " (warm-up)",
            (_, true) => " (phases)",
            _ => "",
        };
        let times = trainer.last_step_times().filter(|_| phased);
        let phase_times = match times {
            Some(t) => format!(
                "  (forward {:.1}, backward {:.1}, clip {:.1}, optimizer {:.1} ms; host busy {:.1} ms)",
                t.forward * 1e3,
                t.backward * 1e3,
                t.clip * 1e3,
                t.optimizer * 1e3,
                t.host * 1e3,
            ),
            None => String::new(),
        };
        eprintln!(
            "step {:>2}{label} {:8.1} ms  loss {:.4}{phase_times}",
            step + 1,
            seconds * 1e3,
            record.loss,
        );
        if timed {
            loss = record.loss;
            steps.push(seconds);
        }
        phases.extend(times);
    }
    trainer.set_profiling(false);
    let attention = match AttentionPath::of::<B>() {
        AttentionPath::Materialised => "materialised",
        _ if flash_attention::cudnn_calls() != cudnn_before => "cudnn",
        _ => "block",
    };
    if args.profile {
        print_block_profile(&mut trainer, &batch, total)?;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let phase = |f: fn(&StepTimes) -> f64| median(phases.iter().map(f).collect());
    let step_s = median(steps);
    let tokens = (args.batch * args.seq) as f64;
    let ckpt = args.use_gradient_checkpointing != "false";
    // The peers' estimate: 4N (+2N recompute) per token for a frozen-base LoRA step, plus
    // attention.
    let n = counts.all as f64;
    let (l, s, h) = (shape.layers as f64, args.seq as f64, shape.hidden as f64);
    let flops_tok = (4.0 + if ckpt { 2.0 } else { 0.0 }) * n
        + (3.0 + if ckpt { 1.0 } else { 0.0 }) * 2.0 * 2.0 * l * s * h / 2.0;
    let gib = |bytes: u64| (crate::train::gib(bytes) * 100.0).round() / 100.0;
    let ms = |seconds: f64| (seconds * 1e5).round() / 100.0;
    Ok(BenchResult {
        r#impl: "fastlora",
        shape: shape.name.to_string(),
        batch: args.batch,
        seq: args.seq,
        ckpt: args.use_gradient_checkpointing.clone(),
        path: if args.portable { "portable" } else { "fused" },
        cuda_memory: args.cuda_memory.name(),
        packed: args.packed,
        full_recompute: args.full_recompute,
        attention,
        step_ms: ms(step_s),
        tok_s: (tokens / step_s).round(),
        peak_reserved_gib: reserved_bytes(&device).map(gib),
        approx_tflops: (flops_tok * tokens / step_s / 1e12 * 10.0).round() / 10.0,
        loss: (loss * 1e4).round() / 1e4,
        forward_ms: ms(phase(|t| t.forward)),
        backward_ms: ms(phase(|t| t.backward)),
        clip_ms: ms(phase(|t| t.clip)),
        optimizer_ms: ms(phase(|t| t.optimizer)),
        host_ms: ms(phase(|t| t.host)),
    })
}

/// Runs one step with block timing on and prints each block's total, largest first. Under
/// checkpointing the layer blocks run twice (forward, then the recompute in backward): their
/// call counts say so.
fn print_block_profile<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    batch: &Batch,
    total: usize,
) -> Result<()> {
    let _ = phase_timing::take_totals();
    phase_timing::set_profiling(true);
    let step = trainer.step(std::slice::from_ref(batch), total + 1);
    phase_timing::set_profiling(false);
    step?;
    let times = trainer.last_step_times().unwrap_or_default();
    let mut blocks: Vec<_> = phase_timing::take_totals().into_iter().collect();
    blocks.sort_by_key(|b| std::cmp::Reverse(b.1.time));
    eprintln!(
        "profile (one step, synced per block): forward {:.1} ms, backward {:.1} ms, clip {:.1} ms, optimizer {:.1} ms",
        times.forward * 1e3,
        times.backward * 1e3,
        times.clip * 1e3,
        times.optimizer * 1e3
    );
    for (name, block) in blocks {
        eprintln!(
            "  {:>9.2} ms  {:>4} calls  {name}",
            block.time.as_secs_f64() * 1e3,
            block.calls
        );
    }
    Ok(())
}

/// `batch` rows of `seq` uniformly random token ids, every token trained (labels = inputs, as
/// the peers pass `labels=input_ids`); with `packed`, each row cut into documents of
/// [`PACKED_DOCUMENT_LENGTHS`] in turn.
fn random_batch(batch: usize, seq: usize, vocab: usize, packed: bool) -> Batch {
    let input_ids: Vec<i64> = (0..batch * seq)
        .map(|i| (splitmix64(i as u64) % vocab as u64) as i64)
        .collect();
    let documents = packed.then(|| {
        let mut lengths = PACKED_DOCUMENT_LENGTHS.iter().cycle();
        let mut labels = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let mut filled = 0;
            while filled < seq {
                let len = (*lengths.next().expect("a cycle never ends")).min(seq - filled);
                let label = labels.last().map_or(0, |&l: &i64| l + 1);
                labels.extend(std::iter::repeat_n(label, len));
                filled += len;
            }
        }
        labels
    });
    Batch {
        labels: input_ids.clone(),
        attention_mask: vec![1; batch * seq],
        documents,
        input_ids,
        batch,
        seq,
    }
}

/// Document lengths of `fastlora bench --packed` rows, in turn.
const PACKED_DOCUMENT_LENGTHS: [usize; 7] = [300, 700, 100, 500, 200, 600, 400];

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed rows take the document lengths in turn, cutting the last at the row's end.
    #[test]
    fn packed_batches_cut_rows_into_the_listed_documents() {
        let batch = random_batch(2, 1000, 50, true);
        let labels = batch.documents.expect("packed");
        let runs = flash_attention::SegmentRuns::from_labels(&labels, [2, 1000]);
        assert_eq!(runs.lengths(), &[300, 700, 100, 500, 200, 200]);
        assert!(random_batch(2, 1000, 50, false).documents.is_none());
    }

    #[test]
    fn shapes_match_the_published_parameter_counts() {
        // Parameter counts of the public checkpoints these shapes copy (untied heads here, so
        // SmolLM2's tied count plus one head).
        let expect = [
            ("smollm2-135m", 134_515_008 + 49152 * 576),
            ("llama-3.2-1b", 1_235_814_400 + 128_256 * 2048),
            ("llama-3.1-8b", 8_030_261_248),
        ];
        for (name, params) in expect {
            let config = BenchShape::by_name(name).unwrap().config(2048).unwrap();
            assert_eq!(config.num_parameters(), params, "{name}");
        }
    }

    #[test]
    fn unknown_shape_names_the_flag_and_the_choices() {
        let err = BenchShape::by_name("gpt-5").unwrap_err().to_string();
        assert!(
            err.contains("--shape") && err.contains("llama-3.2-1b"),
            "{err}"
        );
    }

    #[test]
    fn bench_weights_have_the_asked_spread_and_differ_per_tensor() {
        let mut source = BenchWeights::new(0.02);
        let a = source.tensor("a.weight", &[300_000]).unwrap().unwrap();
        let b = source.tensor("b.weight", &[300_000]).unwrap().unwrap();
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 2e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
        assert_ne!(a[..8], b[..8]);
        let norm = source.tensor("model.norm.weight", &[4]).unwrap().unwrap();
        assert_eq!(norm, vec![1.0; 4]);
    }

    #[test]
    fn cpu_bench_runs_a_real_training_step() {
        // A tiny sequence on the smallest shape: the loss starts near ln(vocab) for a random
        // model and the JSON line is complete.
        let args = BenchArgs {
            shape: "smollm2-135m".to_string(),
            batch: 1,
            seq: 8,
            use_gradient_checkpointing: "true".to_string(),
            r: 4,
            steps: 1,
            warmup: 0,
            phase_steps: 1,
            device: "cpu".to_string(),
            dtype: None,
            portable: false,
            profile: true,
            cuda_memory: CudaMemory::Exact,
            packed: false,
            full_recompute: false,
        };
        let result = bench_command(args).unwrap();
        let ln_vocab = (49152f64).ln();
        assert!((result.loss - ln_vocab).abs() < 0.5, "loss {}", result.loss);
        assert!(result.step_ms > 0.0 && result.tok_s > 0.0);
        assert!(result.forward_ms > 0.0 && result.backward_ms > 0.0);
        assert_eq!(result.peak_reserved_gib, None);
    }
}
