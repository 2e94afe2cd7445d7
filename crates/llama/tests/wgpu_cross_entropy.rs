//! The chunked linear cross-entropy with its CubeCL kernel (wgpu f32 on lavapipe) against the
//! Burn-ops path in f64 on the CPU: loss and the gradients of the hidden states and of a trained
//! head, over ragged chunks with ignored targets.

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use fastlora_llama::{IGNORE_INDEX, linear_cross_entropy_sum};
use fused_mlp::{WgpuBackend, vulkan_test_device};

type Gpu = Autodiff<WgpuBackend<f32>>;
type Cpu = Autodiff<NdArray<f64>>;

/// Loss sum, ∂/∂hidden and ∂/∂weight as f64 vectors.
fn run<B: burn::tensor::backend::AutodiffBackend>(
    hidden: &TensorData,
    weight: &TensorData,
    targets: &[i64],
    chunk: usize,
    device: &B::Device,
) -> (f64, Vec<f64>, Vec<f64>) {
    let h = Tensor::<B, 2>::from_data(hidden.clone(), device).require_grad();
    let w = Tensor::<B, 2>::from_data(weight.clone(), device).require_grad();
    let t =
        Tensor::<B, 1, Int>::from_data(TensorData::new(targets.to_vec(), [targets.len()]), device);
    let (sum, counted) = linear_cross_entropy_sum(h.clone(), w.clone(), None, t, chunk);
    assert_eq!(
        counted,
        targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    );
    let grads = sum.clone().backward();
    let vec =
        |t: Tensor<B::InnerBackend, 2>| t.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    (
        sum.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0],
        vec(h.grad(&grads).expect("hidden gets a gradient")),
        vec(w.grad(&grads).expect("the trained head gets a gradient")),
    )
}

#[test]
fn kernel_path_matches_the_f64_burn_path() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let (tokens, width, vocab) = (37, 24, 1000);
    let hidden = Tensor::<NdArray<f32>, 2>::random(
        [tokens, width],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    )
    .into_data();
    let weight = Tensor::<NdArray<f32>, 2>::random(
        [vocab, width],
        Distribution::Normal(0.0, 0.3),
        &Default::default(),
    )
    .into_data();
    let targets: Vec<i64> = (0..tokens as i64)
        .map(|k| {
            if k % 7 == 3 {
                IGNORE_INDEX
            } else {
                (k * 271 + 5) % vocab as i64
            }
        })
        .collect();
    // 16-token chunks: three chunks, the last one ragged.
    let (loss, dh, dw) = run::<Gpu>(&hidden, &weight, &targets, 16, &device);
    let (want_loss, want_dh, want_dw) = run::<Cpu>(
        &hidden.clone().convert::<f64>(),
        &weight.clone().convert::<f64>(),
        &targets,
        16,
        &Default::default(),
    );
    assert!(
        (loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
        "loss {loss} vs {want_loss}"
    );
    for (what, got, want) in [("hidden", dh, want_dh), ("weight", dw, want_dw)] {
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-5 * scale,
            "∂/∂{what}: off by {worst} (largest {scale})"
        );
    }
}
