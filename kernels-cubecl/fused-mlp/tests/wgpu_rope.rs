//! The RoPE kernel and its autodiff op on Burn's wgpu backend (lavapipe on a machine without a
//! GPU), f32, against an f64 host computation of the rotation, the portable path, and the
//! portable path's autodiff. Skipped with a message without a Vulkan adapter unless
//! `FASTLORA_REQUIRE_WGPU=1` (CI).

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::Distribution;
use fused_mlp::{WgpuBackend, rope, rope_portable, set_fused_enabled, vulkan_test_device};

type B = WgpuBackend;
type AB = Autodiff<B>;

/// `max|got − want| / max|want|`.
fn relative(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    err / scale
}

fn values<BK: Backend, const R: usize>(t: Tensor<BK, R>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Llama's tables for one row of positions per table row (`[tb, s, d]`): `cos`/`sin` of
/// `p·θ^(−2i/d)`, repeated over both halves; also the angles in f64 (`[tb, s, d/2]`) for the host
/// reference.
fn tables<BK: Backend>(
    positions: &[Vec<usize>],
    d: usize,
    device: &BK::Device,
) -> (Tensor<BK, 3>, Tensor<BK, 3>, Vec<f64>) {
    let half = d / 2;
    let (rows, seq) = (positions.len(), positions[0].len());
    let angles: Vec<f64> = positions
        .iter()
        .flatten()
        .flat_map(|&p| {
            (0..half).map(move |i| p as f64 * 10_000f64.powf(-2.0 * i as f64 / d as f64))
        })
        .collect();
    let repeat = |f: fn(f64) -> f64| -> Vec<f32> {
        angles
            .chunks(half)
            .flat_map(|row| {
                let row: Vec<f32> = row.iter().map(|&a| f(a) as f32).collect();
                [row.clone(), row].concat()
            })
            .collect()
    };
    let cos = Tensor::from_data(TensorData::new(repeat(f64::cos), [rows, seq, d]), device);
    let sin = Tensor::from_data(TensorData::new(repeat(f64::sin), [rows, seq, d]), device);
    (cos, sin, angles)
}

/// Positions `start..start + seq`, shared by the batch.
fn shared(start: usize, seq: usize) -> Vec<Vec<usize>> {
    vec![(start..start + seq).collect()]
}

/// The rotation in f64 on the host, `x` row-major `[b, h, s, d]`, angles `[tb, s, d/2]`.
fn host_rope(x: &[f32], [b, h, s, d]: [usize; 4], angles: &[f64]) -> Vec<f32> {
    let half = d / 2;
    let per_row = angles.len() == b * s * half && b > 1;
    let mut y = vec![0f32; x.len()];
    for row in 0..b * h * s {
        let table_row = if per_row { row / (h * s) } else { 0 };
        let at = (table_row * s + row % s) * half;
        for i in 0..half {
            let (a, c) = (angles[at + i].sin(), angles[at + i].cos());
            let (x1, x2) = (f64::from(x[row * d + i]), f64::from(x[row * d + i + half]));
            y[row * d + i] = (x1 * c - x2 * a) as f32;
            y[row * d + i + half] = (x2 * c + x1 * a) as f32;
        }
    }
    y
}

/// Forward against f64 and the portable path, `dx` against the portable autodiff, for inputs
/// laid out as the model makes them (`[b, s, h, d]` memory viewed as `[b, h, s, d]`) and
/// row-major, with ragged sizes, a start offset, and per-row positions that restart where a
/// packed document starts.
#[test]
fn fused_rope_matches_f64_and_the_portable_autodiff() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let packed = vec![
        vec![0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        (3..20).collect(),
    ];
    for ([b, h, s, d], positions, projected) in [
        ([2, 3, 17, 8], shared(0, 17), true),
        ([1, 4, 33, 64], shared(5, 33), true),
        ([2, 2, 5, 128], shared(100, 5), false),
        ([3, 1, 1, 2], shared(7, 1), false),
        ([2, 3, 17, 64], packed.clone(), true),
        ([2, 2, 17, 8], packed.clone(), false),
    ] {
        let x = if projected {
            Tensor::<AB, 4>::random([b, s, h, d], Distribution::Uniform(-2.0, 2.0), &device)
                .swap_dims(1, 2)
        } else {
            Tensor::<AB, 4>::random([b, h, s, d], Distribution::Uniform(-2.0, 2.0), &device)
        };
        let upstream = Tensor::<AB, 4>::random([b, h, s, d], Distribution::Default, &device);
        let (cos, sin, angles) = tables::<AB>(&positions, d, &device);
        let host = host_rope(&values(x.clone()), [b, h, s, d], &angles);

        let run = |fused: bool| {
            set_fused_enabled(fused);
            let x = x.clone().detach().require_grad();
            let y = rope(x.clone(), cos.clone(), sin.clone());
            let grads = (y.clone() * upstream.clone()).sum().backward();
            set_fused_enabled(true);
            (
                values(y),
                values(x.grad(&grads).expect("x gets a gradient")),
            )
        };
        let (y_fused, dx_fused) = run(true);
        let (y_portable, dx_portable) = run(false);
        let what = format!("[{b}, {h}, {s}, {d}] at {:?}", &positions[0][..2.min(s)]);
        let vs_host = relative(&y_fused, &host);
        let vs_portable = relative(&y_fused, &y_portable);
        let dx = relative(&dx_fused, &dx_portable);
        assert!(vs_host <= 1e-6, "{what} y vs f64: {vs_host:e}");
        assert!(vs_portable <= 1e-6, "{what} y vs portable: {vs_portable:e}");
        assert!(dx <= 1e-6, "{what} dx vs portable autodiff: {dx:e}");
    }
}

/// The backward is the inverse rotation: rotating, then applying the op's gradient map to the
/// result gives the input back (the rotation is orthogonal), here through autodiff with
/// `upstream = y`: `d(½|y|²)/dx = Rᵀy = x`.
#[test]
fn the_gradient_of_half_the_squared_norm_is_the_input() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let [b, h, s, d] = [2, 3, 9, 16];
    let x = Tensor::<AB, 4>::random([b, h, s, d], Distribution::Default, &device).require_grad();
    let (cos, sin, _) = tables::<AB>(&shared(3, s), d, &device);
    let y = rope(x.clone(), cos, sin);
    let grads = (y.clone() * y).sum().mul_scalar(0.5).backward();
    let got = values(x.grad(&grads).expect("x gets a gradient"));
    let err = relative(&got, &values(x));
    assert!(err <= 1e-6, "Rᵀ(Rx) vs x: {err:e}");
}

/// The non-autodiff backend runs the kernel alone.
#[test]
fn inference_backend_runs_the_kernel() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let [b, h, s, d] = [1, 5, 300, 64];
    let x = Tensor::<B, 4>::random([b, s, h, d], Distribution::Default, &device).swap_dims(1, 2);
    let (cos, sin, _) = tables::<B>(&shared(0, s), d, &device);
    let fused = values(rope(x.clone(), cos.clone(), sin.clone()));
    let portable = values(rope_portable(x, cos, sin));
    let err = relative(&fused, &portable);
    assert!(err <= 1e-6, "{err:e}");
}
