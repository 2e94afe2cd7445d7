//! The RMSNorm kernels and their autodiff op on Burn's wgpu backend (lavapipe on a machine
//! without a GPU), f32, against the portable path and its autodiff, and against an f64 host
//! computation of the forward. Skipped with a message without a Vulkan adapter unless
//! `FASTLORA_REQUIRE_WGPU=1` (CI).

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::Distribution;
use fused_mlp::{WgpuBackend, rms_norm, rms_norm_portable, set_fused_enabled, vulkan_test_device};

type B = WgpuBackend;
type AB = Autodiff<B>;

/// `max|got − want| / max|want|`.
fn relative(got: Vec<f32>, want: Vec<f32>) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    err / scale
}

fn values<BK: Backend, const R: usize>(t: Tensor<BK, R>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Forward against f64 on the host and against the portable path, and `dx` against the
/// portable path's autodiff, for ragged shapes: hidden sizes under, at and over one cube's 256
/// units, rows that are no multiple of anything, a rank-3 input.
#[test]
fn fused_rms_norm_matches_the_portable_path_and_f64() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let eps = 1e-5;
    // 33 and 9 are not multiples of a load width (the scalar kernel); the others are (vectors).
    for (rows, hidden) in [(37, 100), (5, 256), (19, 576), (3, 1000), (4, 33), (6, 9)] {
        let x =
            Tensor::<AB, 3>::random([1, rows, hidden], Distribution::Uniform(-2.0, 2.0), &device);
        let weight = Tensor::<AB, 1>::random([hidden], Distribution::Uniform(0.5, 1.5), &device);
        let upstream = Tensor::<AB, 3>::random([1, rows, hidden], Distribution::Default, &device);

        // f64 forward on the host.
        let (xs, ws) = (values(x.clone()), values(weight.clone()));
        let host: Vec<f32> = xs
            .chunks(hidden)
            .flat_map(|row| {
                let mean = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / hidden as f64;
                let r = 1.0 / (mean + eps).sqrt();
                row.iter()
                    .zip(&ws)
                    .map(move |(v, w)| (f64::from(*v) * r * f64::from(*w)) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();

        let run = |fused: bool| {
            set_fused_enabled(fused);
            let x = x.clone().detach().require_grad();
            let y = rms_norm(x.clone(), weight.clone(), eps);
            let grads = (y.clone() * upstream.clone()).sum().backward();
            set_fused_enabled(true);
            (
                values(y),
                values(x.grad(&grads).expect("x gets a gradient")),
            )
        };
        let (y_fused, dx_fused) = run(true);
        let (y_portable, dx_portable) = run(false);
        let what = format!("[{rows}, {hidden}]");
        let vs_host = relative(y_fused.clone(), host);
        let vs_portable = relative(y_fused, y_portable);
        let dx = relative(dx_fused, dx_portable);
        assert!(vs_host <= 1e-6, "{what} y vs f64: {vs_host:e}");
        assert!(vs_portable <= 1e-6, "{what} y vs portable: {vs_portable:e}");
        assert!(dx <= 1e-5, "{what} dx vs portable autodiff: {dx:e}");
    }
}

/// A gain that requires grad (a norm in `modules_to_save`) takes the portable path, whose
/// autodiff gives the gain its gradient.
#[test]
fn a_trainable_gain_gets_its_gradient() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let x = Tensor::<AB, 2>::random([7, 33], Distribution::Default, &device);
    let weight = Tensor::<AB, 1>::ones([33], &device).require_grad();
    let y = rms_norm(x.clone(), weight.clone(), 1e-6);
    let grads = y.sum().backward();
    let want = values(rms_norm_portable(x, Tensor::<AB, 1>::ones([33], &device), 1e-6).sum_dim(0));
    let got = values(weight.grad(&grads).expect("the gain gets a gradient"));
    assert!(relative(got, want) <= 1e-6);
}

/// The non-autodiff backend runs the kernel forward alone, also with more rows than one grid
/// dimension holds on wgpu (65,535 cubes).
#[test]
fn inference_backend_runs_the_kernel() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    for (rows, hidden) in [(9, 300), (70_000, 4)] {
        let x = Tensor::<B, 2>::random([rows, hidden], Distribution::Default, &device);
        let weight = Tensor::<B, 1>::random([hidden], Distribution::Default, &device);
        let fused = values(rms_norm(x.clone(), weight.clone(), 1e-6));
        let portable = values(rms_norm_portable(x, weight, 1e-6));
        let err = relative(fused, portable);
        assert!(err <= 1e-6, "[{rows}, {hidden}]: {err:e}");
    }
}
