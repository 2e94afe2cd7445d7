//! GPU check and benchmark of the linear-memory attention on Burn's CUDA backend (plain
//! `CubeBackend`, autodiff), against the materialised attention (on the same backend, or on the
//! CPU for f32).
//!
//! Usage: `attention-bench [MODE]`, MODE one of
//!
//! - `check-f32`, `check-bf16`: fast vs materialised outputs and `dq`, `dk`, `dv` (relative
//!   error `max|Δ| / max|ref|`, pass bar 1e-4 f32 / 2e-2 bf16) for GQA 1, 3, 4, 8, d 64 and
//!   128, s 1000, 1024 and 2047 (f32: 517, 1000, 1024), plain, padded (a left- and a
//!   right-padded row), packed (rows of several documents, one right-padded: segments known only
//!   on the device) and documents (rows of several documents, no padding, their runs known on
//!   the host, as the model passes packed rows). The f32 reference runs on the CPU (ndarray):
//!   Burn's CUDA matmul rounds f32 through TF32. Plain and documents bf16 cells run cuDNN's fused
//!   kernel (`"cudnn"` says whether its forward and backward ran; documents as ragged
//!   sequences), and run again with cuDNN off to check the block-wise op;
//! - `time`: forward + backward (median of 10 after 3 warm-up, synced), bf16, at b4×32 heads
//!   ×2048×d64 and b2×32×2048×d128 (8 KV heads): cuDNN's fused kernel, the block-wise op, and
//!   materialised, over whole rows; then rows packing documents of 100–700 tokens (runs known):
//!   cuDNN's ragged kernel against the block-wise op;
//! - `memory`: device memory (CubeCL `memory_usage`) of fast forward + backward at b1, 32 heads,
//!   8 KV heads, d128, s 2k, 8k, 32k (and materialised at 2k, 8k for contrast), bf16;
//! - `cudnn-probe`: the loaded cuDNN's version, and fused forwards + backwards called directly
//!   (b1, 4 heads, 2 KV heads, s 256, d 64), over the whole row and over runs of 100 and 156
//!   tokens, printing cuDNN's error when it declines;
//! - `all` (default): each of the above in its own process (Burn fixes a CUDA device's float
//!   dtype per process).
//!
//! Every result is one JSON line on stdout; the exit status is 1 if a check fails.

use std::process::Command;
use std::time::Instant;

use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, bf16};
use cubecl::Runtime;
use cubecl::cuda::CudaRuntime;
use std::sync::Arc;

use flash_attention::{
    FlashAttentionBackend, SegmentRuns, Segments, attention_segments, cudnn_calls, flash_attention,
    materialised_attention, set_cudnn_enabled,
};
use fused_mlp::CudaBackend;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let device = CudaDevice::default();
    let ok = match mode.as_str() {
        "cudnn-probe" => cudnn_probe(&device),
        "check-f32" => check::<Autodiff<CudaBackend<f32>>, Autodiff<NdArray<f32>>>(
            "f32",
            1e-4,
            // Shorter than the bf16 cells': the CPU computes the reference.
            &[517, 1000, 1024],
            &device,
            &Default::default(),
        ),
        "check-bf16" => check::<Autodiff<CudaBackend<bf16>>, Autodiff<CudaBackend<bf16>>>(
            "bf16",
            2e-2,
            &[1000, 1024, 2047],
            &device,
            &device,
        ),
        "time" => {
            time::<Autodiff<CudaBackend<bf16>>>(&device);
            true
        }
        "memory" => {
            memory(&device);
            true
        }
        "all" => {
            let exe = std::env::current_exe().expect("own path");
            ["cudnn-probe", "check-f32", "check-bf16", "time", "memory"]
                .iter()
                .map(|m| {
                    Command::new(&exe)
                        .arg(m)
                        .status()
                        .is_ok_and(|s| s.success())
                })
                // Every mode runs, whatever an earlier one returned.
                .collect::<Vec<bool>>()
                .into_iter()
                .all(|ok| ok)
        }
        other => {
            eprintln!(
                "unknown mode {other:?}: cudnn-probe | check-f32 | check-bf16 | time | memory | all"
            );
            false
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}

/// Calls cuDNN's fused attention directly and prints what happened (one JSON line each): over
/// the whole row, then over two runs.
fn cudnn_probe(device: &CudaDevice) -> bool {
    use fastlora_cuda_gemm::{SdpaRuns, SdpaSaved, cudnn_version, sdpa_backward, sdpa_forward};
    type B = CudaBackend<bf16>;
    let version = cudnn_version().map_err(|e| e.to_string());
    println!(
        "{{\"probe\":\"cudnn_version\",\"result\":{:?}}}",
        format!("{version:?}")
    );
    let (q, k, v) = inputs::<B>(1, 4, 2, 256, 64, device);
    let prim = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let (q, k, v) = (prim(q), prim(k), prim(v));
    let scale = 64f32.powf(-0.5);
    let (starts, lengths) = ([0, 100], [100, 156]);
    let mut all_ok = true;
    for (name, runs) in [
        ("rows", None),
        (
            "runs",
            Some(SdpaRuns {
                seq: 256,
                starts: &starts,
                lengths: &lengths,
            }),
        ),
    ] {
        let report = |pass: &str, result: Result<(), String>| {
            match &result {
                Ok(()) => println!("{{\"probe\":\"sdpa_{pass}\",\"over\":\"{name}\",\"ok\":true}}"),
                Err(e) => println!(
                    "{{\"probe\":\"sdpa_{pass}\",\"over\":\"{name}\",\"ok\":false,\"error\":{e:?}}}"
                ),
            }
            result.is_ok()
        };
        let forward = sdpa_forward(&q, &k, &v, scale, runs);
        let ok = match forward {
            Ok((o, lse)) => {
                report("forward", Ok(()));
                let saved = SdpaSaved {
                    q: &q,
                    k: &k,
                    v: &v,
                    o: &o,
                    lse: &lse,
                    runs,
                };
                let backward = sdpa_backward(&saved, &o, scale).map(|_| ());
                report("backward", backward.map_err(|e| e.to_string()))
            }
            Err(e) => report("forward", Err(e.to_string())),
        };
        all_ok &= ok;
    }
    all_ok
}

fn host(t: Tensor<impl Backend, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}

fn host4(t: Tensor<impl Backend, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}

fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_finite() {
                f64::from((g - w).abs())
            } else {
                f64::INFINITY
            }
        })
        .fold(0f64, f64::max);
    worst / scale.max(f64::MIN_POSITIVE)
}

type Inputs<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

fn inputs<B: Backend>(
    b: usize,
    h: usize,
    kvh: usize,
    s: usize,
    d: usize,
    device: &B::Device,
) -> Inputs<B> {
    let normal = Distribution::Normal(0.0, 1.0);
    (
        Tensor::random([b, h, s, d], normal, device),
        Tensor::random([b, kvh, s, d], normal, device),
        Tensor::random([b, kvh, s, d], normal, device),
    )
}

/// Each token's document in a "documents" cell: row 0 holds documents of 300, 1, 500 and the
/// rest of the tokens, row 1 two halves (no padding).
fn document_labels(b: usize, s: usize) -> Vec<i64> {
    (0..b * s)
        .map(|i| {
            let (row, j) = (i / s, i % s);
            let starts: &[usize] = if row == 0 { &[300, 301, 801] } else { &[s / 2] };
            starts.iter().filter(|&&start| j >= start).count() as i64
        })
        .collect()
}

/// The segments of a check cell's layout. Padded: row 0 has 37 left-padding tokens, row 1 50
/// right. Packed: row 0 holds documents of 300, 1, 500 and the rest of the tokens, row 1 two
/// halves and 50 tokens of right padding. Documents: [`document_labels`]; `runs` gives them to
/// the fast op as runs known on the host (what the model does), else as device segments.
fn cell_segments<BK: Backend>(
    layout: &str,
    b: usize,
    s: usize,
    runs: bool,
    device: &BK::Device,
) -> Option<Segments<BK>> {
    let (left, right) = (37, 50);
    let int = |f: &dyn Fn(usize, usize) -> i64| {
        let values: Vec<i64> = (0..b * s).map(|i| f(i / s, i % s)).collect();
        Tensor::<BK, 2, Int>::from_data(TensorData::new(values, [b, s]), device)
    };
    let ids = match layout {
        "padded" => attention_segments(
            Some(int(&|row, j| {
                i64::from(if row == 0 { j >= left } else { j < s - right })
            })),
            None,
        ),
        "packed" => attention_segments(
            Some(int(&|row, j| i64::from(row == 0 || j < s - right))),
            Some(int(&|row, j| {
                let starts: &[usize] = if row == 0 { &[300, 301, 801] } else { &[s / 2] };
                starts.iter().filter(|&&start| j >= start).count() as i64
            })),
        ),
        "documents" if runs => {
            let runs = SegmentRuns::from_labels(&document_labels(b, s), [b, s]);
            return Some(Segments::from_runs(Arc::new(runs), device));
        }
        "documents" => {
            let labels = document_labels(b, s);
            attention_segments(
                None,
                Some(Tensor::from_data(TensorData::new(labels, [b, s]), device)),
            )
        }
        _ => None,
    };
    ids.map(Segments::from_ids)
}

/// Output, dq, dk, dv of one attention (`fast` or materialised) on host, for the loss
/// `Σ o·cot`.
type Run = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn attention_run<BK: AutodiffBackend>(
    (q, k, v): Inputs<BK>,
    cot: Tensor<BK, 3>,
    attention: impl FnOnce(Inputs<BK>) -> Tensor<BK, 3>,
) -> Run {
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let o = attention((q.clone(), k.clone(), v.clone()));
    let grads = (o.clone() * cot).sum().backward();
    (
        host(o.inner()),
        host4(q.grad(&grads).expect("dq")),
        host4(k.grad(&grads).expect("dk")),
        host4(v.grad(&grads).expect("dv")),
    )
}

/// The same values on backend `R` (through f32, exact for f32/bf16/f16 sources).
fn moved<B: Backend, R: Backend, const D: usize>(
    t: &Tensor<B, D>,
    device: &R::Device,
) -> Tensor<R, D> {
    Tensor::from_data(t.to_data().convert::<f32>(), device)
}

/// The fast attention on `B` against the materialised attention on `R` with the same inputs:
/// `R` is `B` itself for bf16 (the bar is bf16's), the CPU for f32 (Burn's CUDA matmul rounds
/// f32 through TF32, ~1e-3, an order above the 1e-4 bar).
fn check<B: AutodiffBackend + FlashAttentionBackend, R: AutodiffBackend>(
    dtype: &str,
    tol: f64,
    seqs: &[usize],
    device: &B::Device,
    reference_device: &R::Device,
) -> bool {
    let mut all_ok = true;
    let (b, kvh) = (2, 2);
    for g in [1, 3, 4, 8] {
        for d in [64, 128] {
            for &s in seqs {
                for (layout, cudnn) in [
                    ("plain", true),
                    ("plain", false),
                    ("padded", false),
                    ("packed", false),
                    ("documents", true),
                    ("documents", false),
                ] {
                    set_cudnn_enabled(cudnn);
                    let h = kvh * g;
                    let (q, k, v) = inputs::<B>(b, h, kvh, s, d, device);
                    let cot = Tensor::<B, 3>::random(
                        [b, s, h * d],
                        Distribution::Normal(0.0, 1.0),
                        device,
                    );
                    let reference_inputs = (
                        moved::<B, R, 4>(&q, reference_device),
                        moved::<B, R, 4>(&k, reference_device),
                        moved::<B, R, 4>(&v, reference_device),
                    );
                    let reference_cot = moved::<B, R, 3>(&cot, reference_device);
                    let calls_before = cudnn_calls();
                    let segments = cell_segments::<B>(layout, b, s, true, device);
                    let fast = attention_run((q, k, v), cot, |(q, k, v)| {
                        flash_attention(q, k, v, segments, None)
                    });
                    let calls_after = cudnn_calls();
                    // Both the forward and the backward went through cuDNN.
                    let fused = calls_after.0 > calls_before.0 && calls_after.1 > calls_before.1;
                    let segments = cell_segments::<R>(layout, b, s, false, reference_device)
                        .map(|segments| segments.ids().clone());
                    let reference = attention_run(reference_inputs, reference_cot, |(q, k, v)| {
                        materialised_attention(q, k, v, segments)
                    });
                    let errs = [
                        rel_error(&fast.0, &reference.0),
                        rel_error(&fast.1, &reference.1),
                        rel_error(&fast.2, &reference.2),
                        rel_error(&fast.3, &reference.3),
                    ];
                    let ok = errs.iter().all(|e| *e <= tol);
                    all_ok &= ok;
                    println!(
                        "{{\"check\":\"attention\",\"dtype\":\"{dtype}\",\"b\":{b},\"heads\":{h},\"kv_heads\":{kvh},\"seq\":{s},\"head_dim\":{d},\"layout\":\"{layout}\",\"cudnn\":{fused},\"rel_o\":{:.3e},\"rel_dq\":{:.3e},\"rel_dk\":{:.3e},\"rel_dv\":{:.3e},\"tol\":{tol:e},\"ok\":{ok}}}",
                        errs[0], errs[1], errs[2], errs[3]
                    );
                }
            }
        }
    }
    all_ok
}

fn median_ms(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times: Vec<f64> = (0..10)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn fwd_bwd<B: AutodiffBackend + FlashAttentionBackend>(
    fast: bool,
    (q, k, v): &Inputs<B>,
    cot: &Tensor<B, 3>,
    segments: Option<&Segments<B>>,
    device: &B::Device,
) {
    let (q, k, v) = (
        q.clone().require_grad(),
        k.clone().require_grad(),
        v.clone().require_grad(),
    );
    let o = if fast {
        flash_attention(q.clone(), k.clone(), v.clone(), segments.cloned(), None)
    } else {
        let ids = segments.map(|segments| segments.ids().clone());
        materialised_attention(q.clone(), k.clone(), v.clone(), ids)
    };
    let grads = (o * cot.clone()).sum().backward();
    let _ = (q.grad(&grads), k.grad(&grads), v.grad(&grads));
    B::sync(device).expect("device sync");
}

fn time<B: AutodiffBackend + FlashAttentionBackend>(device: &B::Device) {
    for (b, h, kvh, s, d) in [(4, 32, 8, 2048, 64), (2, 32, 8, 2048, 128)] {
        let x = inputs::<B>(b, h, kvh, s, d, device);
        let cot = Tensor::<B, 3>::random([b, s, h * d], Distribution::Normal(0.0, 1.0), device);
        // Causal attention FLOPs: fwd 2 GEMMs, bwd 5 (one a recompute), each b·h·s²·d (halved).
        let flops = 7.0 * 2.0 * (b * h * s * s * d) as f64 / 2.0;
        for (name, fast, cudnn) in [
            ("cudnn", true, true),
            ("flash_burn", true, false),
            ("materialised_burn", false, false),
        ] {
            set_cudnn_enabled(cudnn);
            let before = cudnn_calls();
            let ms = median_ms(|| fwd_bwd(fast, &x, &cot, None, device));
            let ran_cudnn = cudnn_calls() != before;
            println!(
                "{{\"bench\":\"attention_fwd_bwd\",\"impl\":\"{name}\",\"cudnn_ran\":{ran_cudnn},\"dtype\":\"bf16\",\"b\":{b},\"heads\":{h},\"kv_heads\":{kvh},\"seq\":{s},\"head_dim\":{d},\"ms\":{ms:.3},\"causal_tflops\":{:.1}}}",
                flops / ms / 1e9
            );
        }
    }
    // Packed rows: documents of 100–700 tokens, cut at each row's end.
    let (b, h, kvh, s, d) = (4, 32, 8, 2048, 64);
    let cycle = [300, 700, 100, 500, 200, 600, 400];
    let mut labels = Vec::with_capacity(b * s);
    let mut document_lengths = Vec::new();
    let mut next = cycle.iter().cycle();
    for _ in 0..b {
        let mut filled = 0;
        while filled < s {
            let len = (*next.next().expect("cycle")).min(s - filled);
            labels.extend(std::iter::repeat_n(document_lengths.len() as i64, len));
            document_lengths.push(len);
            filled += len;
        }
    }
    let runs = Arc::new(SegmentRuns::from_labels(&labels, [b, s]));
    let segments = Segments::<B>::from_runs(runs.clone(), device);
    let x = inputs::<B>(b, h, kvh, s, d, device);
    let cot = Tensor::<B, 3>::random([b, s, h * d], Distribution::Normal(0.0, 1.0), device);
    let useful: f64 = document_lengths.iter().map(|&l| (l * l) as f64).sum();
    let flops = 7.0 * 2.0 * (h * d) as f64 * useful / 2.0;
    for (name, cudnn) in [("cudnn_ragged", true), ("flash_burn", false)] {
        set_cudnn_enabled(cudnn);
        let before = cudnn_calls();
        let ms = median_ms(|| fwd_bwd(true, &x, &cot, Some(&segments), device));
        let ran_cudnn = cudnn_calls() != before;
        println!(
            "{{\"bench\":\"attention_fwd_bwd_documents\",\"impl\":\"{name}\",\"cudnn_ran\":{ran_cudnn},\"dtype\":\"bf16\",\"b\":{b},\"heads\":{h},\"kv_heads\":{kvh},\"seq\":{s},\"head_dim\":{d},\"documents\":{},\"ms\":{ms:.3},\"useful_causal_tflops\":{:.1}}}",
            runs.len(),
            flops / ms / 1e9
        );
    }
}

fn memory(device: &CudaDevice) {
    type B = Autodiff<CudaBackend<bf16>>;
    let bdev = device.clone();
    let client = CudaRuntime::client(device);
    let (b, h, kvh, d) = (1, 32, 8, 128);
    for (s, fast, cudnn) in [
        (2048, true, true),
        (8192, true, true),
        (32768, true, true),
        (2048, true, false),
        (8192, true, false),
        (32768, true, false),
        (2048, false, false),
        (8192, false, false),
    ] {
        set_cudnn_enabled(cudnn);
        client.memory_cleanup();
        let base = client.memory_usage().expect("memory usage");
        let x = inputs::<B>(b, h, kvh, s, d, &bdev);
        let cot = Tensor::<B, 3>::random([b, s, h * d], Distribution::Normal(0.0, 1.0), &bdev);
        B::sync(&bdev).expect("sync");
        let inputs_usage = client.memory_usage().expect("memory usage");
        let (q, k, v) = (
            x.0.clone().require_grad(),
            x.1.clone().require_grad(),
            x.2.clone().require_grad(),
        );
        let o = if fast {
            flash_attention(q.clone(), k.clone(), v.clone(), None, None)
        } else {
            materialised_attention(q.clone(), k.clone(), v.clone(), None)
        };
        B::sync(&bdev).expect("sync");
        // The graph now holds what the backward will read.
        let after_fwd = client.memory_usage().expect("memory usage");
        let grads = (o * cot.clone()).sum().backward();
        let _ = (q.grad(&grads), k.grad(&grads), v.grad(&grads));
        B::sync(&bdev).expect("sync");
        let after_bwd = client.memory_usage().expect("memory usage");
        let mib = |x: u64| x as f64 / (1u64 << 20) as f64;
        println!(
            "{{\"bench\":\"attention_memory\",\"impl\":\"{}\",\"dtype\":\"bf16\",\"b\":{b},\"heads\":{h},\"kv_heads\":{kvh},\"seq\":{s},\"head_dim\":{d},\"inputs_in_use_mib\":{:.1},\"after_fwd_in_use_mib\":{:.1},\"after_bwd_in_use_mib\":{:.1},\"reserved_after_bwd_mib\":{:.1},\"reserved_before_mib\":{:.1}}}",
            match (fast, cudnn) {
                (true, true) => "cudnn",
                (true, false) => "flash_burn",
                _ => "materialised_burn",
            },
            mib(inputs_usage.bytes_in_use.saturating_sub(base.bytes_in_use)),
            mib(after_fwd.bytes_in_use.saturating_sub(base.bytes_in_use)),
            mib(after_bwd.bytes_in_use.saturating_sub(base.bytes_in_use)),
            mib(after_bwd.bytes_reserved),
            mib(base.bytes_reserved),
        );
        drop(grads);
    }
}
