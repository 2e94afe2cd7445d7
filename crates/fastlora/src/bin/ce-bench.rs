//! GPU benchmark of the chunked linear cross-entropy (`fastlora::llama::linear_cross_entropy`,
//! with the fused-CE kernel) on Burn's CUDA backend, bf16, forward + backward: hidden states
//! `[16384, 4096]`, a frozen LM head `[128256, 4096]` (Llama-3.1-8B's vocabulary and width).
//!
//! Prints one JSON line: the median time of 10 calls after 3 warm-up (synced), CubeCL's memory
//! in use after the backward, and the pool's reserved memory after the run minus before it (an
//! upper bound of the call's transient peak), in MiB. Its peer, torch eager `cross_entropy` on
//! materialised logits, is `xtask/peers/ce_peer.py` (same shapes).
//!
//! Usage: `ce-bench [TOKENS [VOCAB [HIDDEN]]]`.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::backend::cuda::CudaDevice;
use burn::prelude::*;
use burn::tensor::{Distribution, bf16};
use cubecl::Runtime;
use cubecl::cuda::CudaRuntime;
use fastlora::llama::{default_chunk_tokens, linear_cross_entropy};
use fused_mlp::CudaBackend;

type B = Autodiff<CudaBackend<bf16>>;

fn arg(index: usize, default: usize) -> usize {
    std::env::args()
        .nth(index)
        .map(|a| a.parse().expect("sizes are integers"))
        .unwrap_or(default)
}

fn main() {
    let (tokens, vocab, width) = (arg(1, 16_384), arg(2, 128_256), arg(3, 4_096));
    let device = CudaDevice::default();
    let client = CudaRuntime::client(&device);
    let hidden = Tensor::<B, 2>::random([tokens, width], Distribution::Normal(0.0, 1.0), &device);
    let weight = Tensor::<B, 2>::random([vocab, width], Distribution::Normal(0.0, 0.02), &device);
    let targets =
        Tensor::<B, 1, Int>::random([tokens], Distribution::Uniform(0.0, vocab as f64), &device);
    let chunk = default_chunk_tokens(vocab);
    let step = || {
        let hidden = hidden.clone().require_grad();
        let loss =
            linear_cross_entropy(hidden.clone(), weight.clone(), None, targets.clone(), chunk);
        let grads = loss.backward();
        let grad = hidden
            .grad(&grads)
            .expect("the hidden states get a gradient");
        B::sync(&device).expect("device sync");
        grad
    };
    B::sync(&device).expect("device sync");
    let before = client.memory_usage().expect("memory usage");
    for _ in 0..3 {
        step();
    }
    let mut times: Vec<f64> = (0..10)
        .map(|_| {
            let start = Instant::now();
            step();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let grad = step();
    let after = client.memory_usage().expect("memory usage");
    drop(grad);
    let mib = |x: u64| x as f64 / (1u64 << 20) as f64;
    println!(
        "{{\"bench\":\"linear_cross_entropy_fwd_bwd\",\"impl\":\"fastlora_chunked_fused_ce\",\"dtype\":\"bf16\",\"tokens\":{tokens},\"vocab\":{vocab},\"hidden\":{width},\"chunk_tokens\":{chunk},\"ms\":{:.3},\"in_use_after_mib\":{:.1},\"reserved_growth_mib\":{:.1},\"inputs_mib\":{:.1}}}",
        times[times.len() / 2],
        mib(after.bytes_in_use),
        mib(after.bytes_reserved.saturating_sub(before.bytes_reserved)),
        mib(before.bytes_in_use),
    );
}
