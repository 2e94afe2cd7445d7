//! The GPU test matrix of the fused LoRA kernels (`cargo xtask gpu-test` stages and runs it).
//!
//! - **bf16, layer level**: a one-layer Llama-family model of a real model's layer shape on
//!   Burn's CUDA backend (plain `CubeBackend`, autodiff), LoRA injected, loss forward and backward
//!   on fresh random weights and a ragged token batch, three times: fused kernels allowed and
//!   the portable path forced ([`fused_mlp::set_fused_enabled`]), both in bf16 on CUDA, and the
//!   portable path in f32 on the CPU (ndarray) as the oracle. The fused run's logits and the
//!   gradient of every LoRA A and B must be within 2e-2 of the oracle (max |bf16 − f32| /
//!   max |f32| per tensor), or, where bf16 itself is past that, within twice the portable bf16
//!   run's error (FlashAttention's rule for its bf16 kernels). Comparing bf16 with bf16
//!   instead measured two roundings against each other (1-6e-2 apart on the H200).
//!   dtype bf16 × r {8, 16, 64} × rsLoRA {off, on} × targets {all 7, attention, MLP} × shapes
//!   {SmolLM2-135M, Llama-3.2-1B}. q/k/v go through the fused QKV op (when all three carry
//!   LoRA), every other projection through the LoRA linear op and the MLP through the fused MLP
//!   op when fused; all through plain Burn ops when portable.
//!   Plus, per shape, gradient checkpointing `true` and `"unsloth"` against none (fused, bf16,
//!   within 2e-2) on a 4-layer model at 2 × 640 tokens: layer inputs above the offload
//!   threshold, so `"unsloth"` copies three of them to the host and back (the last prefetched
//!   while the layer after it runs backward), and causal attention through cuDNN. Each mode runs
//!   twice: the recompute skipping the MLP's down projection (the default) and running it; and
//!   no checkpointing runs a second time (`ckpt-off`), which shows the kernels' own run-to-run
//!   spread.
//! - **f32, op level**: the fused MLP op on CUDA against the portable MLP on the CPU (ndarray),
//!   same host-made weights and inputs: y, dx and the six LoRA gradients within 1e-4. The base
//!   weights are stored as the model loader stores them, gate and up with spare columns and
//!   down with spare rows and columns (32 by default, [`fused_mlp::weight_with_spare_columns`]):
//!   at r 8 and 16 the op folds the LoRA terms into the base GEMMs, at r 64 it accumulates them
//!   as rank-r products. The bf16 layer-level cells load their model through the loader, so
//!   the same split holds there. The CPU is
//!   the f32 oracle because Burn's CUDA matmul, which the portable path and attention use,
//!   rounds f32 through TF32 (~1e-3): a whole-layer f32 comparison measures that, not the
//!   kernels. r {8, 16, 64} × rsLoRA × both shapes.
//! - **f32, projection op** (`f32-linear`): the LoRA linear op on CUDA against
//!   `LoraLinear::forward` on the CPU, q_proj/k_proj shapes with r {8, 16, 64} and an LM-head
//!   shape without adapter: y, dx, dA, dB within 1e-4; and the fused QKV op against three
//!   `LoraLinear::forward` calls on the CPU (ranks r, r/2, r with three scalings, r {8, 16, 64}):
//!   the three outputs, dx and the six LoRA gradients within 1e-4.
//! - **f32, RMSNorm and RoPE ops** (`f32-norm-rope`): `fused_mlp::rms_norm` and
//!   `fused_mlp::rope` on CUDA (their kernels) against the portable ops on the CPU, both shapes,
//!   ragged token counts, RoPE on the projections' `[b, s, h, d]` view from a start offset: y and
//!   dx within 1e-5.
//!
//! Token counts are ragged (not multiples of 8 or 64). Before each run the device memory pool is
//! poisoned with NaN (a large NaN tensor is allocated and freed, so reused buffers start as NaN):
//! an output the kernels fail to write shows up. Each dtype runs in its own process (Burn fixes
//! a device's float dtype at first use). Exit status 1 if any cell fails.

use std::process::ExitCode;

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::nn::DropoutConfig;
use burn::prelude::*;
use burn::tensor::bf16;
use fastlora::llama::{LlamaConfig, causal_lm_loss};
use fastlora::lora_config::{GradientCheckpointing, InitLoraWeights};
use fastlora::lora_layers::{LoraAdapter, LoraLinear};
use fastlora::{AdapterParameter, FastLanguageModel, LoraConfig, RandomWeights};
use fused_mlp::{CudaBackend, set_fused_enabled};

/// A decoder layer's shape, taken from a real model's config.
struct LayerShape {
    name: &'static str,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

const SHAPES: [LayerShape; 2] = [
    LayerShape {
        name: "SmolLM2-135M",
        hidden: 576,
        intermediate: 1536,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
    },
    LayerShape {
        name: "Llama-3.2-1B",
        hidden: 2048,
        intermediate: 8192,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
    },
];

const TARGETS: [(&str, &[&str]); 3] = [
    (
        "all-7",
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    ),
    ("attention", &["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("mlp", &["gate_proj", "up_proj", "down_proj"]),
];

/// Ragged (batch, seq): token counts that are not multiples of 8 or 64.
const TOKENS: [(usize, usize); 3] = [(2, 37), (1, 203), (3, 61)];

const VOCAB: usize = 512;

/// bf16 tolerance: max |got − f32 oracle| / max |f32 oracle| over each output.
const BF16_TOL: f32 = 2e-2;
/// Where bf16 itself is past [`BF16_TOL`] (the portable bf16 run's error against the f32
/// oracle), the fused run may be off by up to this multiple of that error: FlashAttention's test
/// rule for a low-precision kernel (its error against an f32 reference at most twice that of the
/// plain low-precision implementation).
const BF16_PORTABLE_FACTOR: f32 = 2.0;

fn config_json(shape: &LayerShape, layers: usize) -> String {
    format!(
        r#"{{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": {},
            "intermediate_size": {}, "num_attention_heads": {}, "num_key_value_heads": {},
            "head_dim": {}, "num_hidden_layers": {layers}, "vocab_size": {VOCAB},
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "hidden_act": "silu"}}"#,
        shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    )
}

/// One cell's result: the worst relative difference over logits and LoRA gradients.
struct CellResult {
    worst: f32,
    worst_what: String,
    nan: bool,
}

/// Logits and every LoRA factor's gradient, as f32 vectors in a fixed order.
fn run_once<B: burn::tensor::backend::AutodiffBackend>(
    shape: &LayerShape,
    layers: usize,
    lora: &LoraConfig,
    ids: &[i64],
    tokens: (usize, usize),
    fused: bool,
    device: &B::Device,
) -> Vec<(String, Vec<f32>)> {
    set_fused_enabled(fused);
    // Poison: a NaN tensor as large as the largest activation, freed into the pool.
    let poison = Tensor::<B, 2>::full(
        [tokens.0 * tokens.1, shape.intermediate * 4],
        f32::NAN,
        device,
    );
    drop(poison);
    let config =
        LlamaConfig::from_json_str(&config_json(shape, layers), "gpu-matrix.json".as_ref())
            .expect("a valid config");
    let base =
        FastLanguageModel::<B>::from_source(config, &mut RandomWeights::new(7, 0.02), None, device)
            .expect("random weights");
    let peft = base
        .get_peft_model(lora.clone())
        .expect("valid LoRA config");
    let model = peft.model();
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [tokens.0, tokens.1]), device);
    let logits = model.forward(ids.clone(), None);
    let loss = causal_lm_loss(logits.clone(), ids);
    let grads = loss.backward();
    let mut out = vec![("logits".to_string(), to_f32(logits.inner()))];
    for (name, param) in peft.adapter_parameters() {
        if let AdapterParameter::Matrix(t) = param {
            let grad = t.grad(&grads).expect("every LoRA factor gets a gradient");
            out.push((name, to_f32(grad)));
        }
    }
    set_fused_enabled(true);
    out
}

fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

fn compare(fused: &[(String, Vec<f32>)], portable: &[(String, Vec<f32>)]) -> CellResult {
    let mut result = CellResult {
        worst: 0.0,
        worst_what: String::new(),
        nan: false,
    };
    for ((name, a), (_, b)) in fused.iter().zip(portable) {
        let scale = b
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let mut diff = 0f32;
        for (x, y) in a.iter().zip(b) {
            if !x.is_finite() {
                result.nan = true;
            }
            diff = diff.max((x - y).abs());
        }
        let rel = diff / scale;
        if rel > result.worst || rel.is_nan() {
            result.worst = rel;
            result.worst_what = name.clone();
        }
    }
    result
}

/// Host-side pseudo-random values in `[-scale, scale)`, the same on every backend.
fn host_random(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// How a host-made base weight is stored on the device.
#[derive(Clone, Copy)]
enum Storage {
    Plain,
    /// As the model loader stores gate and up ([`fused_mlp::weight_with_spare_columns`]).
    SpareColumns,
    /// As it stores down ([`fused_mlp::weight_with_spare_rows_and_columns`]).
    SpareRowsAndColumns,
}

/// A LoRA projection with host-made weights (identical on every backend), the base weight
/// stored as `storage` says (the spare room exists on CUDA only).
fn host_projection<B: Backend>(
    d_in: usize,
    d_out: usize,
    rank: usize,
    scaling: f64,
    seed: u64,
    storage: Storage,
    device: &B::Device,
) -> LoraLinear<B> {
    let tensor = |shape: [usize; 2], seed: u64, scale: f32| {
        Tensor::<B, 2>::from_data(
            TensorData::new(host_random(shape[0] * shape[1], seed, scale), shape),
            device,
        )
    };
    let bound = 1.0 / (d_in as f32).sqrt();
    let values = || host_random(d_out * d_in, seed, bound);
    let weight = match storage {
        Storage::Plain => tensor([d_out, d_in], seed, bound),
        Storage::SpareColumns => {
            fused_mlp::weight_with_spare_columns::<B>(values(), [d_out, d_in], device)
        }
        Storage::SpareRowsAndColumns => {
            fused_mlp::weight_with_spare_rows_and_columns::<B>(values(), [d_out, d_in], device)
        }
    };
    let mut linear = LoraLinear::from_weights(weight, None);
    linear.adapter = Some(LoraAdapter {
        lora_a: Param::from_tensor(tensor([rank, d_in], seed + 1, bound)),
        lora_b: Param::from_tensor(tensor([d_out, rank], seed + 2, 0.1)),
        scaling,
        dropout: DropoutConfig::new(0.0).init(),
        merged: false,
    });
    linear
}

/// The MLP op alone on backend `B`: output, dx and the six LoRA gradients.
fn mlp_op_once<B: burn::tensor::backend::AutodiffBackend>(
    shape: &LayerShape,
    rank: usize,
    scaling: f64,
    tokens: usize,
    fused: bool,
    device: &B::Device,
) -> Vec<(String, Vec<f32>)> {
    set_fused_enabled(fused);
    let poison = Tensor::<B, 2>::full([tokens, shape.intermediate * 4], f32::NAN, device);
    drop(poison);
    let (d, i) = (shape.hidden, shape.intermediate);
    let gate = host_projection::<B>(d, i, rank, scaling, 10, Storage::SpareColumns, device);
    let up = host_projection::<B>(d, i, rank, scaling, 20, Storage::SpareColumns, device);
    let down = host_projection::<B>(
        i,
        d,
        rank,
        scaling,
        30,
        Storage::SpareRowsAndColumns,
        device,
    );
    let host = |seed| {
        Tensor::<B, 3>::from_data(
            TensorData::new(host_random(tokens * d, seed, 1.0), [1, tokens, d]),
            device,
        )
    };
    let x = host(40).require_grad();
    let y = fused_mlp::mlp(x.clone(), &gate, &up, &down, fused_mlp::OutputUse::Values);
    let grads = (y.clone() * host(50)).sum().backward();
    let mut out = vec![
        ("y".to_string(), to_f32(y.inner())),
        ("dx".to_string(), to_f32(x.grad(&grads).expect("dx"))),
    ];
    out.extend(lora_gradients(
        &grads,
        [("gate", &gate), ("up", &up), ("down", &down)],
    ));
    set_fused_enabled(true);
    out
}

/// `dA_<name>` and `dB_<name>` of each projection's adapter from `grads`.
fn lora_gradients<'a, B: burn::tensor::backend::AutodiffBackend>(
    grads: &B::Gradients,
    projections: impl IntoIterator<Item = (&'a str, &'a LoraLinear<B>)>,
) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (name, proj) in projections {
        let adapter = proj.adapter.as_ref().expect("adapter");
        for (factor, param) in [("A", &adapter.lora_a), ("B", &adapter.lora_b)] {
            let grad = param.val().grad(grads).expect("LoRA gradient");
            out.push((format!("d{factor}_{name}"), to_f32(grad)));
        }
    }
    out
}

/// One projection through `fused_mlp::linear` on backend `B` (the op when `fused`, else
/// `LoraLinear::forward`): output, dx, and dA, dB when it carries an adapter.
fn linear_op_once<B: burn::tensor::backend::AutodiffBackend>(
    (d_in, d_out): (usize, usize),
    lora: Option<(usize, f64)>,
    tokens: usize,
    fused: bool,
    device: &B::Device,
) -> Vec<(String, Vec<f32>)> {
    set_fused_enabled(fused);
    let poison = Tensor::<B, 2>::full([tokens, d_out.max(d_in) * 4], f32::NAN, device);
    drop(poison);
    let (rank, scaling) = lora.unwrap_or((1, 1.0));
    let mut proj = host_projection::<B>(d_in, d_out, rank, scaling, 60, Storage::Plain, device);
    if lora.is_none() {
        proj.adapter = None;
    }
    let host = |len: usize, seed| {
        Tensor::<B, 3>::from_data(
            TensorData::new(host_random(tokens * len, seed, 1.0), [1, tokens, len]),
            device,
        )
    };
    let x = host(d_in, 70).require_grad();
    let y = fused_mlp::linear(x.clone(), &proj);
    let grads = (y.clone() * host(d_out, 80)).sum().backward();
    let mut out = vec![
        ("y".to_string(), to_f32(y.inner())),
        ("dx".to_string(), to_f32(x.grad(&grads).expect("dx"))),
    ];
    if let Some(adapter) = proj.adapter.as_ref() {
        for (factor, param) in [("A", &adapter.lora_a), ("B", &adapter.lora_b)] {
            let grad = param.val().grad(&grads).expect("LoRA gradient");
            out.push((format!("d{factor}"), to_f32(grad)));
        }
    }
    set_fused_enabled(true);
    out
}

/// q, k, v through `fused_mlp::qkv` on backend `B` (the fused op when `fused`, else three
/// `LoraLinear::forward` calls), ranks `r`, `r/2`, `r` and three scalings: the three outputs,
/// dx, and every dA, dB.
fn qkv_op_once<B: burn::tensor::backend::AutodiffBackend>(
    shape: &LayerShape,
    rank: usize,
    tokens: usize,
    fused: bool,
    device: &B::Device,
) -> Vec<(String, Vec<f32>)> {
    set_fused_enabled(fused);
    let (q_out, kv_out) = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let poison = Tensor::<B, 2>::full([tokens, q_out * 4], f32::NAN, device);
    drop(poison);
    let d = shape.hidden;
    let projections = [
        (q_out, rank, 2.0, 110),
        (kv_out, (rank / 2).max(1), 0.5, 120),
        (kv_out, rank, 16.0 / (rank as f64).sqrt(), 130),
    ]
    .map(|(d_out, r, s, seed)| host_projection::<B>(d, d_out, r, s, seed, Storage::Plain, device));
    let host = |len: usize, seed| {
        Tensor::<B, 3>::from_data(
            TensorData::new(host_random(tokens * len, seed, 1.0), [1, tokens, len]),
            device,
        )
    };
    let x = host(d, 140).require_grad();
    let [q, k, v] = &projections;
    let ys = fused_mlp::qkv(x.clone(), q, k, v);
    let loss = ys
        .iter()
        .zip([150, 160, 170])
        .map(|(y, seed)| (y.clone() * host(y.dims()[2], seed)).sum())
        .reduce(|a, b| a + b)
        .expect("three outputs");
    let grads = loss.backward();
    let mut out = Vec::new();
    for (name, y) in ["y_q", "y_k", "y_v"].iter().zip(ys) {
        out.push((name.to_string(), to_f32(y.inner())));
    }
    out.push(("dx".to_string(), to_f32(x.grad(&grads).expect("dx"))));
    out.extend(lora_gradients(
        &grads,
        ["q", "k", "v"].into_iter().zip(&projections),
    ));
    set_fused_enabled(true);
    out
}

/// RMSNorm over `[1, tokens, hidden]` and RoPE over the query view `[1, heads, tokens, d]` of a
/// `[1, tokens, heads, d]` tensor (positions from 11) on backend `B`, through `fused_mlp`'s
/// dispatch (kernels when `fused`): y and dx of each.
fn norm_rope_once<B: burn::tensor::backend::AutodiffBackend>(
    shape: &LayerShape,
    tokens: usize,
    fused: bool,
    device: &B::Device,
) -> Vec<(String, Vec<f32>)> {
    set_fused_enabled(fused);
    let poison = Tensor::<B, 2>::full([tokens, shape.hidden * 8], f32::NAN, device);
    drop(poison);
    let host = |dims: [usize; 3], seed, scale| {
        let len = dims.iter().product();
        Tensor::<B, 3>::from_data(TensorData::new(host_random(len, seed, scale), dims), device)
    };
    let mut out = Vec::new();

    let x = host([1, tokens, shape.hidden], 90, 2.0).require_grad();
    let weight = Tensor::<B, 1>::from_data(
        TensorData::new(host_random(shape.hidden, 91, 1.0), [shape.hidden]),
        device,
    );
    let y = fused_mlp::rms_norm(x.clone(), weight, 1e-5);
    let grads = (y.clone() * host([1, tokens, shape.hidden], 92, 1.0))
        .sum()
        .backward();
    out.push(("norm y".to_string(), to_f32(y.inner())));
    out.push(("norm dx".to_string(), to_f32(x.grad(&grads).expect("dx"))));

    let (h, d) = (shape.heads, shape.head_dim);
    let rope = fastlora::llama::RotaryEmbedding::<B>::new(
        &(0..d / 2)
            .map(|i| 10_000f64.powf(-2.0 * i as f64 / d as f64))
            .collect::<Vec<_>>(),
        tokens + 11,
        device,
    );
    let q = host([tokens, h, d], 93, 1.0)
        .reshape([1, tokens, h, d])
        .require_grad();
    let y = rope.apply(q.clone().swap_dims(1, 2), 11);
    let upstream = host([h, tokens, d], 94, 1.0).reshape([1, h, tokens, d]);
    let grads = (y.clone() * upstream).sum().backward();
    out.push(("rope y".to_string(), to_f32(y.inner())));
    out.push(("rope dx".to_string(), to_f32(q.grad(&grads).expect("dq"))));
    set_fused_enabled(true);
    out
}

/// Token ids from a host RNG, so every backend sees the same batch.
fn host_ids(tokens: (usize, usize), seed: u64) -> Vec<i64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..tokens.0 * tokens.1)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % VOCAB as u64) as i64
        })
        .collect()
}

/// One bf16 cell: the fused and the portable path on the CUDA backend `F`, both against the f32
/// portable path on the CPU backend `O` (same host-made weights and batch).
fn bf16_cell<F, O>(
    shape: &LayerShape,
    lora: &LoraConfig,
    tokens: (usize, usize),
    seed: u64,
    device: &F::Device,
    oracle_device: &O::Device,
) -> (CellResult, CellResult)
where
    F: burn::tensor::backend::AutodiffBackend,
    O: burn::tensor::backend::AutodiffBackend,
{
    let ids = host_ids(tokens, seed);
    let fused = run_once::<F>(shape, 1, lora, &ids, tokens, true, device);
    let portable = run_once::<F>(shape, 1, lora, &ids, tokens, false, device);
    let oracle = run_once::<O>(shape, 1, lora, &ids, tokens, false, oracle_device);
    (compare(&fused, &oracle), compare(&portable, &oracle))
}

fn main() -> ExitCode {
    // Burn keeps one set of defaults (the float dtype among them) per device, fixed by the first
    // backend that touches it: a CubeBackend<Cuda, f32> and a CubeBackend<Cuda, bf16> must not
    // share a device in one process. So each dtype runs in a child process of its own.
    let dtype = std::env::args().nth(1);
    let Some(dtype) = dtype else {
        let exe = std::env::current_exe().expect("the running binary's path");
        let mut ok = true;
        for dtype in ["bf16", "f32", "f32-linear", "f32-norm-rope"] {
            let status = std::process::Command::new(&exe)
                .arg(dtype)
                .status()
                .expect("spawning gpu-matrix for one dtype");
            ok &= status.success();
        }
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    };
    let device = burn::backend::cuda::CudaDevice::default();
    let cpu = burn::backend::ndarray::NdArrayDevice::Cpu;
    let (mut passed, mut failed) = (0, 0);
    let mut seed = 0u64;
    println!(
        "{:<6} {:<13} {:>3} {:<6} {:<10} {:>9} {:>10} {:>10}  worst at",
        "dtype", "shape", "r", "rslora", "targets", "tokens", "max rel", "(portable)"
    );
    let mut report = |line: String, ok: bool| {
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        println!("{line}{}", if ok { "" } else { "  FAIL" });
    };
    match dtype.as_str() {
        "bf16" => {
            // bf16, whole decoder layer + loss: fused against the portable path on the same backend.
            for shape in &SHAPES {
                for r in [8, 16, 64] {
                    for rslora in [false, true] {
                        for (targets_name, targets) in TARGETS {
                            let tokens = TOKENS[seed as usize % TOKENS.len()];
                            seed += 1;
                            let lora = LoraConfig::builder()
                                .r(r)
                                .lora_alpha(16.0)
                                .use_rslora(rslora)
                                .target_modules(targets.iter().copied())
                                .init_lora_weights(InitLoraWeights::Random)
                                .random_state(seed)
                                .build()
                                .expect("valid LoRA config");
                            let (fused, portable) =
                                bf16_cell::<Autodiff<CudaBackend<bf16>>, Autodiff<NdArray<f32>>>(
                                    shape, &lora, tokens, seed, &device, &cpu,
                                );
                            report(
                                format!(
                                    "{:<6} {:<13} {r:>3} {:<6} {targets_name:<10} {:>9} {:>10.3e} {:>10.3e}  {}",
                                    "bf16",
                                    shape.name,
                                    rslora,
                                    format!("{}x{}", tokens.0, tokens.1),
                                    fused.worst,
                                    portable.worst,
                                    fused.worst_what,
                                ),
                                !fused.nan
                                    && fused.worst
                                        <= BF16_TOL.max(BF16_PORTABLE_FACTOR * portable.worst),
                            );
                        }
                    }
                }
                // Gradient checkpointing (recompute, host offload) against none, fused, bf16.
                let lora = |mode| {
                    LoraConfig::builder()
                        .r(16)
                        .lora_alpha(16.0)
                        .init_lora_weights(InitLoraWeights::Random)
                        .random_state(99)
                        .use_gradient_checkpointing(mode)
                        .build()
                        .expect("valid LoRA config")
                };
                let tokens = (2, 640);
                let layers = 4;
                let ids = host_ids(tokens, 99);
                type Cuda16 = Autodiff<CudaBackend<bf16>>;
                let off = run_once::<Cuda16>(
                    shape,
                    layers,
                    &lora(GradientCheckpointing::Off),
                    &ids,
                    tokens,
                    true,
                    &device,
                );
                // "-full": the recompute also runs the MLP's down projection, whose value it
                // never reads (skipped by default), as a same-run reference for the skip;
                // "ckpt-off": no checkpointing again, the run-to-run spread of the kernels.
                for (name, mode, full_recompute) in [
                    ("ckpt-off", GradientCheckpointing::Off, false),
                    ("ckpt-true", GradientCheckpointing::On, false),
                    ("ckpt-unsl", GradientCheckpointing::Unsloth, false),
                    ("ckpt-true-full", GradientCheckpointing::On, true),
                    ("ckpt-unsl-full", GradientCheckpointing::Unsloth, true),
                ] {
                    fused_mlp::set_graph_only_enabled(!full_recompute);
                    let with =
                        run_once::<Cuda16>(shape, layers, &lora(mode), &ids, tokens, true, &device);
                    fused_mlp::set_graph_only_enabled(true);
                    let result = compare(&with, &off);
                    report(
                        format!(
                            "{:<6} {:<13} {:>3} {:<6} {name:<14} {:>9} {:>10.3e} {:>10}  {}",
                            "bf16",
                            shape.name,
                            16,
                            false,
                            "2x640",
                            result.worst,
                            "-",
                            result.worst_what,
                        ),
                        !result.nan && result.worst <= BF16_TOL,
                    );
                }
            }
        }
        "f32" => {
            // f32, the MLP op: fused on CUDA against the portable op on the CPU. The CPU is the f32
            // oracle because Burn's CUDA matmul (used by the portable path and by attention) rounds
            // f32 through TF32 (~1e-3); the fused op's GEMMs are cuBLAS with TF32 off.
            for shape in &SHAPES {
                for r in [8, 16, 64] {
                    for rslora in [false, true] {
                        let (batch, seq) = TOKENS[seed as usize % TOKENS.len()];
                        seed += 1;
                        let scaling = if rslora {
                            16.0 / (r as f64).sqrt()
                        } else {
                            16.0 / r as f64
                        };
                        let tokens = batch * seq;
                        let fused = mlp_op_once::<Autodiff<CudaBackend<f32>>>(
                            shape, r, scaling, tokens, true, &device,
                        );
                        let oracle = mlp_op_once::<Autodiff<NdArray<f32>>>(
                            shape, r, scaling, tokens, false, &cpu,
                        );
                        let result = compare(&fused, &oracle);
                        report(
                            format!(
                                "{:<6} {:<13} {r:>3} {:<6} {:<10} {:>9} {:>10.3e}  {}",
                                "f32",
                                shape.name,
                                rslora,
                                "mlp-op",
                                tokens,
                                result.worst,
                                result.worst_what,
                            ),
                            !result.nan && result.worst <= 1e-4,
                        );
                    }
                }
            }
        }
        "f32-linear" => {
            // f32, the projection op (q_proj-, k_proj- and LM-head-like shapes): cuBLAS on CUDA
            // against `LoraLinear::forward` on the CPU.
            for shape in &SHAPES {
                let q = (shape.hidden, shape.heads * shape.head_dim);
                let k = (shape.hidden, shape.kv_heads * shape.head_dim);
                let head = (shape.hidden, VOCAB);
                let cells = [
                    ("q_proj", q, Some((8, 2.0))),
                    ("k_proj", k, Some((16, 16.0 / 4.0))),
                    ("q_proj", q, Some((64, 0.25))),
                    ("lm_head", head, None),
                ];
                for (name, dims, lora) in cells {
                    let (batch, seq) = TOKENS[seed as usize % TOKENS.len()];
                    seed += 1;
                    let tokens = batch * seq;
                    let fused = linear_op_once::<Autodiff<CudaBackend<f32>>>(
                        dims, lora, tokens, true, &device,
                    );
                    let oracle =
                        linear_op_once::<Autodiff<NdArray<f32>>>(dims, lora, tokens, false, &cpu);
                    let result = compare(&fused, &oracle);
                    let r = lora.map_or(0, |(r, _)| r);
                    report(
                        format!(
                            "{:<6} {:<13} {r:>3} {:<6} {:<10} {:>9} {:>10.3e}  {}",
                            "f32", shape.name, false, name, tokens, result.worst, result.worst_what,
                        ),
                        !result.nan && result.worst <= 1e-4,
                    );
                }
                // The fused QKV op: q, k, v of one input, ranks r, r/2, r.
                for r in [8, 16, 64] {
                    let (batch, seq) = TOKENS[seed as usize % TOKENS.len()];
                    seed += 1;
                    let tokens = batch * seq;
                    let fused =
                        qkv_op_once::<Autodiff<CudaBackend<f32>>>(shape, r, tokens, true, &device);
                    let oracle =
                        qkv_op_once::<Autodiff<NdArray<f32>>>(shape, r, tokens, false, &cpu);
                    let result = compare(&fused, &oracle);
                    report(
                        format!(
                            "{:<6} {:<13} {r:>3} {:<6} {:<10} {:>9} {:>10.3e}  {}",
                            "f32",
                            shape.name,
                            "mixed",
                            "qkv-op",
                            tokens,
                            result.worst,
                            result.worst_what,
                        ),
                        !result.nan && result.worst <= 1e-4,
                    );
                }
            }
        }
        "f32-norm-rope" => {
            for shape in &SHAPES {
                for (batch, seq) in TOKENS {
                    let tokens = batch * seq;
                    let fused =
                        norm_rope_once::<Autodiff<CudaBackend<f32>>>(shape, tokens, true, &device);
                    let oracle =
                        norm_rope_once::<Autodiff<NdArray<f32>>>(shape, tokens, false, &cpu);
                    let result = compare(&fused, &oracle);
                    report(
                        format!(
                            "{:<6} {:<13} {:>3} {:<6} {:<10} {:>9} {:>10.3e}  {}",
                            "f32",
                            shape.name,
                            "-",
                            "-",
                            "norm+rope",
                            tokens,
                            result.worst,
                            result.worst_what,
                        ),
                        !result.nan && result.worst <= 1e-5,
                    );
                }
            }
        }
        other => panic!("unknown dtype `{other}`: bf16, f32, f32-linear or f32-norm-rope"),
    }
    println!("gpu-matrix {dtype}: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
