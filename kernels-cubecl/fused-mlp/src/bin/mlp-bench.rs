//! Microbenchmark of the LoRA SwiGLU MLP, forward + backward, on Burn's CUDA backend (plain
//! `CubeBackend`, autodiff): the fused op with the gate/up base weights stored with spare
//! columns (as the model loader stores them: the LoRA terms folded into the base GEMMs) and
//! without (the LoRA terms accumulated as rank-r products), against the portable path on the
//! same backend.
//! `cargo xtask gpu-test` stages it; `xtask/peers/lora_mlp_torch.py` times PyTorch eager on the
//! same shapes in the same run.
//!
//! Usage: `mlp-bench [tokens hidden intermediate rank]` (default 8192 2048 8192 16), bf16.
//! Prints the median of 10 timed iterations after 3 warm-up ones, each iteration
//! `y = mlp(x)`, `(y·c).sum().backward()` with a fixed random cotangent `c`, then a device sync.
//! Then a per-phase breakdown of the fused op in both storages (`phase_timing`: each phase
//! between device syncs, mean of 5 iterations), with the TFLOP/s of the phases made of
//! base-size GEMMs.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{Distribution, bf16};
use fused_mlp::{CudaBackend, OutputUse, mlp, set_fused_enabled, weight_with_spare_columns};
use lora_layers::{LoraAdapterConfig, LoraInit, LoraLinear, LoraLinearConfig};
use phase_timing as phases;

type B = Autodiff<CudaBackend<bf16>>;

fn projection(
    d_in: usize,
    d_out: usize,
    rank: usize,
    seed: u64,
    spare_columns: bool,
    device: &burn::backend::cuda::CudaDevice,
) -> LoraLinear<B> {
    let base = LoraLinearConfig::new(d_in, d_out).init::<B>(device);
    let base = match spare_columns {
        true => {
            let values = base
                .base_weight()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            let weight = weight_with_spare_columns::<B>(values, [d_out, d_in], device);
            LoraLinear::from_weights(weight, None)
        }
        false => base,
    };
    base.init_adapter(
        &LoraAdapterConfig::new(rank, 1.0),
        LoraInit::Random,
        seed,
        "bench",
    )
    .expect("random init")
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

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: tokens hidden intermediate rank"))
        .collect();
    let [n, d, i, r] = match args[..] {
        [] => [8192, 2048, 8192, 16],
        [n, d, i, r] => [n, d, i, r],
        _ => panic!("usage: mlp-bench [tokens hidden intermediate rank]"),
    };
    let device = burn::backend::cuda::CudaDevice::default();
    fused_mlp::set_spare_lora_columns(2 * r);
    let gate_up = |spare| {
        [
            projection(d, i, r, 1, spare, &device),
            projection(d, i, r, 2, spare, &device),
        ]
    };
    let ([gate, up], [gate_s, up_s]) = (gate_up(false), gate_up(true));
    let down = projection(i, d, r, 3, false, &device);
    let x =
        Tensor::<B, 3>::random([1, n, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let cot = Tensor::<B, 3>::random([1, n, d], Distribution::Normal(0.0, 1.0), &device);
    // Base GEMMs: 3 forward (gate, up, down) + 3 for dX/dH in backward, 2·N·D·I FLOPs each.
    let base_flops = 6.0 * 2.0 * (n * d * i) as f64;
    println!("LoRA MLP fwd+bwd, bf16, tokens {n}, {d}→{i}, r={r}");
    let step = |gate: &LoraLinear<B>, up: &LoraLinear<B>| {
        let y = mlp(x.clone(), gate, up, &down, OutputUse::Values);
        let grads = (y * cot.clone()).sum().backward();
        drop(grads);
        B::sync(&device).expect("device sync");
    };
    let variants = [
        ("fused, spare columns", &gate_s, &up_s, true),
        ("fused", &gate, &up, true),
        ("portable", &gate, &up, false),
    ];
    for (label, gate, up, fused) in variants {
        set_fused_enabled(fused);
        let ms = median_ms(|| step(gate, up));
        println!(
            "{label:<21} {ms:8.3} ms   {:6.1} TFLOP/s (base GEMM FLOPs only)",
            base_flops / (ms * 1e-3) / 1e12
        );
    }

    set_fused_enabled(true);
    // How many base-size (N·D·I) GEMMs each phase holds.
    let base_gemms = |name: &str| match name.get(..5) {
        Some("fwd 2") | Some("bwd 5") => 2.0,
        Some("fwd 4") | Some("bwd 1") => 1.0,
        _ => 0.0,
    };
    const PROFILED: u32 = 5;
    for (label, gate, up, _) in &variants[..2] {
        phases::set_profiling(true);
        let _ = phases::take_totals();
        for _ in 0..PROFILED {
            step(gate, up);
        }
        phases::set_profiling(false);
        println!("{label} by phase (synced; mean of {PROFILED} iterations):");
        let mut sum = 0.0;
        for (name, total) in phases::take_totals() {
            let ms = total.time.as_secs_f64() * 1e3 / f64::from(PROFILED);
            sum += ms;
            let gemms = base_gemms(name);
            let rate = if gemms > 0.0 {
                format!(
                    "{:6.1} TFLOP/s",
                    gemms * 2.0 * (n * d * i) as f64 / (ms * 1e-3) / 1e12
                )
            } else {
                String::new()
            };
            println!("  {name:<44} {ms:8.3} ms  {rate}");
        }
        println!("  {:<44} {sum:8.3} ms", "sum of phases");
    }
}
