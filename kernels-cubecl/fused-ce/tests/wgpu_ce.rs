//! The kernel on Burn's wgpu backend (lavapipe in CPU CI) against the same math in f64 on the
//! CPU.

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use fused_ce::{WgpuBackend, cross_entropy_rows};

type W = WgpuBackend<f32>;
type Cpu = NdArray<f64>;

/// NLL and softmax − onehot in f64 with plain Burn ops (0 on ignored rows).
fn reference(logits: &TensorData, targets: &[i64]) -> (Vec<f64>, Vec<f64>) {
    let device = Default::default();
    let z = Tensor::<Cpu, 2>::from_data(logits.clone().convert::<f64>(), &device);
    let [rows, vocab] = z.dims();
    let max = z.clone().max_dim(1);
    let exp = (z.clone() - max.clone()).exp();
    let lse = exp.clone().sum_dim(1).log() + max;
    let softmax = (z.clone() - lse.clone()).exp();
    let z = z.into_data().to_vec::<f64>().unwrap();
    let lse = lse.into_data().to_vec::<f64>().unwrap();
    let mut softmax = softmax.into_data().to_vec::<f64>().unwrap();
    let mut nll = vec![0.0; rows];
    for (r, &t) in targets.iter().enumerate() {
        let row = &mut softmax[r * vocab..(r + 1) * vocab];
        if t < 0 {
            row.iter_mut().for_each(|v| *v = 0.0);
        } else {
            nll[r] = lse[r] - z[r * vocab + t as usize];
            row[t as usize] -= 1.0;
        }
    }
    (nll, softmax)
}

fn check(rows: usize, vocab: usize, scale: f64, targets: Vec<i64>, grad_tol: f64) {
    let Some(device) = fused_mlp::vulkan_test_device() else {
        return;
    };
    let logits = Tensor::<W, 2>::random([rows, vocab], Distribution::Normal(0.0, scale), &device);
    let data = logits.to_data();
    let t = Tensor::<W, 1, Int>::from_data(TensorData::new(targets.clone(), [rows]), &device);
    let (nll, grad) = cross_entropy_rows(logits, t).expect("wgpu runs the kernel");
    let (want_nll, want_grad) = reference(&data, &targets);
    let got_nll = nll.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    let got_grad = grad.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    for (r, (g, w)) in got_nll.iter().zip(&want_nll).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
            "row {r} nll {g} vs {w}"
        );
    }
    let worst = got_grad
        .iter()
        .zip(&want_grad)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= grad_tol,
        "gradient off by {worst} ({rows}×{vocab})"
    );
}

#[test]
fn matches_f64_on_ragged_vocabularies_with_ignored_rows() {
    // Vocabularies that are not multiples of the cube width, targets at both ends, ignored
    // rows (-100) among kept ones. 1000 is a multiple of the device's load width (the vector
    // kernel); 4097 and 7 are not (the scalar kernel).
    check(5, 1000, 3.0, vec![0, 999, -100, 17, 512], 1e-6);
    check(3, 4097, 1.0, vec![4096, -100, 2048], 1e-6);
    check(2, 7, 1.0, vec![6, 0], 1e-6);
}

#[test]
fn large_logits_do_not_overflow() {
    // Scores around ±600 would overflow a naive exp; the online max keeps it finite. f32
    // rounds z − lse to ~600·2⁻²⁴ ≈ 4e-5, which bounds the gradient's agreement with f64.
    check(4, 3001, 200.0, vec![1, 3000, 1500, -100], 1e-4);
    // The same on rows the vector kernel takes (length a multiple of the load width).
    check(4, 3000, 200.0, vec![1, 2999, 1500, -100], 1e-4);
}

#[test]
fn long_rows_rescale_each_units_running_sum() {
    // 40,000 logits a row: every unit of the cube reads several vectors, so its running max
    // moves after its first one and the running sum is rescaled (a 128k vocabulary reads
    // about 16 vectors a unit). Random rows, and a rising row whose max moves at every vector.
    check(3, 40_000, 4.0, vec![39_999, 0, 20_000], 1e-6);
    let Some(device) = fused_mlp::vulkan_test_device() else {
        return;
    };
    let vocab = 40_000;
    let rising: Vec<f32> = (0..vocab).map(|j| j as f32 * 1e-3).collect();
    let logits = Tensor::<W, 2>::from_data(TensorData::new(rising.clone(), [1, vocab]), &device);
    let targets = Tensor::<W, 1, Int>::from_data(TensorData::new(vec![7i64], [1]), &device);
    let (nll, _) = cross_entropy_rows(logits, targets).expect("wgpu runs the kernel");
    let max = f64::from(rising[vocab - 1]);
    let lse = max
        + rising
            .iter()
            .map(|&z| (f64::from(z) - max).exp())
            .sum::<f64>()
            .ln();
    let got = nll.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0];
    let want = lse - f64::from(rising[7]);
    assert!((got - want).abs() <= 1e-5 * want, "nll {got} vs {want}");
}

#[test]
fn other_backends_get_their_operands_back() {
    let device = Default::default();
    let logits = Tensor::<NdArray<f32>, 2>::zeros([2, 3], &device);
    let targets =
        Tensor::<NdArray<f32>, 1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &device);
    let (logits, _) = cross_entropy_rows(logits, targets).expect_err("no kernel on NdArray");
    assert_eq!(logits.dims(), [2, 3]);
}
