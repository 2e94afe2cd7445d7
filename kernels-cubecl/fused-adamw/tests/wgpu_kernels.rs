//! `FusedAdamW` against Burn's `AdamW`, and `squared_norm` against an f64 sum on the CPU.
//!
//! The kernels run on Burn's wgpu backend: on a machine without a GPU on Mesa's software Vulkan
//! (lavapipe, Debian/Ubuntu package `mesa-vulkan-drivers`). Without any Vulkan adapter the wgpu
//! tests are skipped with a message, so `cargo test --workspace` passes on a fresh machine; CI
//! installs lavapipe and sets `FASTLORA_REQUIRE_WGPU=1`, which turns a missing adapter into a
//! failure. The NdArray tests (the portable path: Burn's AdamW itself) always run.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, GradientsParams, LearningRate, Optimizer, SimpleOptimizer,
};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use fused_adamw::{
    FusedAdamW, FusedAdamWConfig, SquaredNorm, WgpuBackend, fused_backend, squared_norm,
    vulkan_test_device,
};

type W = WgpuBackend;
type Cpu = NdArray<f32>;

/// Relative tolerance of the kernel against Burn's chain of element-wise kernels on wgpu:
/// `max|got − want| ≤ TOL · max|want|`, per tensor.
const TOL: f32 = 1e-6;
/// Learning rates of consecutive steps (a schedule changes it every step).
const LRS: [LearningRate; 4] = [1e-2, 3e-3, 2e-2, 1e-3];

fn configs(weight_decay: f32) -> (AdamW, FusedAdamW) {
    // The trainer's settings (transformers' AdamW: ε = 1e-8).
    let burn = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(weight_decay)
        .build();
    let fused = fused_config(weight_decay).build();
    (burn, fused)
}

fn fused_config(weight_decay: f32) -> FusedAdamWConfig {
    FusedAdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(weight_decay)
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Same values, fresh tensor (a buffer no one else holds).
fn fresh<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_data(t.to_data(), &t.device())
}

/// `tol == 0`: bitwise equal; else `max|got − want| ≤ tol · max|want|`. Returns
/// `max|got − want| / max|want|`.
#[track_caller]
fn assert_close<B: Backend, const D: usize>(
    what: &str,
    got: Tensor<B, D>,
    want: Tensor<B, D>,
    tol: f32,
) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (got, want) = (values(got), values(want));
    if tol == 0.0 {
        let differ = got
            .iter()
            .zip(&want)
            .position(|(g, w)| g.to_bits() != w.to_bits());
        if let Some(k) = differ {
            panic!("{what}[{k}]: {} vs {} (bitwise)", got[k], want[k]);
        }
        return 0.0;
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    let (k, err) = got
        .iter()
        .zip(&want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "{what}: {g} (output not written?)");
            (g - w).abs()
        })
        .enumerate()
        .fold((0, 0f32), |a, b| if b.1 > a.1 { b } else { a });
    assert!(
        err <= tol * scale,
        "{what}: relative error {:e} at {k} (got {}, want {})",
        err / scale,
        got[k],
        want[k]
    );
    err / scale
}

#[track_caller]
fn assert_states_close<B: Backend, const D: usize>(
    what: &str,
    got: &AdamWState<B, D>,
    want: &AdamWState<B, D>,
    tol: f32,
) -> f32 {
    let (got, want) = (&got.momentum, &want.momentum);
    assert_eq!(got.time, want.time, "{what}: step counts differ");
    assert!(got.max_moment_2.is_none() && want.max_moment_2.is_none());
    let m = assert_close(
        &format!("{what} moment_1"),
        got.moment_1.clone(),
        want.moment_1.clone(),
        tol,
    );
    let v = assert_close(
        &format!("{what} moment_2"),
        got.moment_2.clone(),
        want.moment_2.clone(),
        tol,
    );
    m.max(v)
}

/// `LRS.len()` consecutive steps of both optimizers from the same parameter with the same
/// gradients (of different scales), compared after every step. The gradient of step 2 arrives
/// as a transposed view when the parameter is a matrix (the kernel's row-major copy path);
/// the parameter given to the fused step is also held elsewhere, and must stay unchanged.
fn compare_steps<B: Backend, const D: usize>(
    shape: [usize; D],
    weight_decay: f32,
    device: &B::Device,
    tol: f32,
) {
    let (burn, fused) = configs(weight_decay);
    let mut p_burn = Tensor::<B, D>::random(shape, Distribution::Uniform(-1.0, 1.0), device);
    let mut p_fused = fresh(&p_burn);
    let mut s_burn: Option<AdamWState<B, D>> = None;
    let mut s_fused: Option<AdamWState<B, D>> = None;
    let (mut worst_param, mut worst_moment) = (0f32, 0f32);
    for (step, lr) in LRS.into_iter().enumerate() {
        let scale = [1.0, 0.1, 3.0, 0.5][step];
        let grad = Tensor::<B, D>::random(shape, Distribution::Uniform(-scale, scale), device);
        let grad_fused = if step == 2 && D == 2 {
            let mut flipped = shape;
            flipped.swap(0, 1);
            let t: Tensor<B, D> = Tensor::from_data(grad.clone().swap_dims(0, 1).to_data(), device);
            assert_eq!(t.dims(), flipped);
            t.swap_dims(0, 1)
        } else {
            fresh(&grad)
        };
        let held = p_fused.clone();
        let before = values(held.clone());
        (p_burn, s_burn) = SimpleOptimizer::<B>::step(&burn, lr, p_burn, grad, s_burn);
        (p_fused, s_fused) = SimpleOptimizer::<B>::step(&fused, lr, p_fused, grad_fused, s_fused);
        let what = format!("{shape:?} wd {weight_decay} step {}", step + 1);
        assert_eq!(values(held), before, "{what}: input parameter changed");
        let param = assert_close(
            &format!("{what} param"),
            p_fused.clone(),
            p_burn.clone(),
            tol,
        );
        let moment = assert_states_close(
            &what,
            s_fused.as_ref().unwrap(),
            s_burn.as_ref().unwrap(),
            tol,
        );
        worst_param = worst_param.max(param);
        worst_moment = worst_moment.max(moment);
    }
    eprintln!(
        "{shape:?} wd {weight_decay}: worst relative error over {} steps: param {worst_param:e}, \
         moments {worst_moment:e}",
        LRS.len()
    );
}

#[test]
fn dispatch_recognises_the_backends() {
    assert!(fused_backend::<W>());
    assert!(!fused_backend::<Cpu>());
    assert!(!fused_backend::<Autodiff<W>>());
}

#[test]
fn fused_steps_match_burn_adamw_on_wgpu() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    for weight_decay in [0.01, 0.0] {
        compare_steps::<W, 2>([37, 19], weight_decay, &device, TOL);
        compare_steps::<W, 1>([53], weight_decay, &device, TOL);
    }
    compare_steps::<W, 3>([3, 5, 7], 0.1, &device, TOL);
}

#[test]
fn ndarray_steps_are_burn_adamw_bitwise() {
    let device = Default::default();
    for weight_decay in [0.01, 0.0] {
        compare_steps::<Cpu, 2>([37, 19], weight_decay, &device, 0.0);
        compare_steps::<Cpu, 1>([53], weight_decay, &device, 0.0);
    }
}

/// A module with a matrix and a vector parameter.
#[derive(Module, Debug)]
struct Toy<B: Backend> {
    w: Param<Tensor<B, 2>>,
    b: Param<Tensor<B, 1>>,
}

fn toy<B: Backend>(device: &B::Device) -> Toy<B> {
    Toy {
        w: Param::from_tensor(Tensor::random(
            [37, 19],
            Distribution::Uniform(-1.0, 1.0),
            device,
        )),
        b: Param::from_tensor(Tensor::random(
            [19],
            Distribution::Uniform(-1.0, 1.0),
            device,
        )),
    }
}

fn toy_grads<B: AutodiffBackend>(module: &Toy<B>, device: &B::Device) -> GradientsParams {
    let mut grads = GradientsParams::new();
    let w = Tensor::<B::InnerBackend, 2>::random([37, 19], Distribution::Default, device);
    let b = Tensor::<B::InnerBackend, 1>::random([19], Distribution::Default, device);
    grads.register(module.w.id, w);
    grads.register(module.b.id, b);
    grads
}

/// Two steps with Burn's `OptimizerAdaptor<AdamW, ..>`, its record saved as the trainer saves
/// checkpoints (named MessagePack, full precision), loaded into `FusedAdamWConfig::init`'s
/// adaptor; then two more steps of both from the same module with the same gradients.
fn record_continues<B: AutodiffBackend>(device: &B::Device, tol: f32) {
    let weight_decay = 0.01;
    let mut burn = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(weight_decay)
        .init::<B, Toy<B>>();
    let mut module = toy::<B>(device);
    for lr in &LRS[..2] {
        let grads = toy_grads(&module, device);
        module = burn.step(*lr, module, grads);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer");
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    Recorder::<B>::record(&recorder, burn.to_record(), path.clone()).unwrap();
    let record = Recorder::<B>::load(&recorder, path, device).unwrap();
    let mut fused = fused_config(weight_decay)
        .init::<B, Toy<B>>()
        .load_record(record);

    let mut module_burn = module.clone();
    let mut module_fused = module;
    for (step, lr) in LRS[2..].iter().enumerate() {
        let grads = toy_grads(&module_burn, device);
        let mut grads_fused = GradientsParams::new();
        grads_fused.register(
            module_fused.w.id,
            fresh(&grads.get::<B::InnerBackend, 2>(module_burn.w.id).unwrap()),
        );
        grads_fused.register(
            module_fused.b.id,
            fresh(&grads.get::<B::InnerBackend, 1>(module_burn.b.id).unwrap()),
        );
        module_burn = burn.step(*lr, module_burn, grads);
        module_fused = fused.step(*lr, module_fused, grads_fused);
        let what = format!("after the reload, step {}", step + 3);
        assert_close(
            &format!("{what} w"),
            module_fused.w.val(),
            module_burn.w.val(),
            tol,
        );
        assert_close(
            &format!("{what} b"),
            module_fused.b.val(),
            module_burn.b.val(),
            tol,
        );
    }
}

#[test]
fn burn_adamw_record_loads_and_continues_on_wgpu() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    record_continues::<Autodiff<W>>(&device, TOL);
}

#[test]
fn burn_adamw_record_loads_and_continues_on_ndarray() {
    record_continues::<Autodiff<Cpu>>(&Default::default(), 0.0);
}

/// Sum of squares in f64 on the CPU.
fn reference_squares<B: Backend, const D: usize>(t: &Tensor<B, D>) -> f64 {
    values(t.clone())
        .into_iter()
        .map(|x| f64::from(x) * f64::from(x))
        .sum()
}

/// Ragged sizes, one element, one larger than a launch's 1024 × 256 units (grid-strided), a
/// transposed view (read as stored) and a column slice (made row-major first).
fn check_squared_norm<B: Backend>(device: &B::Device) {
    let random =
        |shape: [usize; 2]| Tensor::<B, 2>::random(shape, Distribution::Uniform(-2.0, 2.0), device);
    let grads = [
        random([37, 19]),
        random([1, 53]),
        random([1, 1]),
        random([600, 600]),
        random([19, 37]).transpose(),
        random([40, 30]).slice([0..40, 3..17]),
    ];
    let want: f64 = grads.iter().map(reference_squares).sum();
    let got = squared_norm(grads.clone());
    let rel = (f64::from(got) - want).abs() / want;
    assert!(
        rel <= 1e-5,
        "squared norm {got} vs {want}: relative {rel:e}"
    );

    // Mixed ranks through the accumulator, and nothing at all.
    let mut norm = SquaredNorm::<B>::new();
    norm.add(grads[0].clone());
    norm.add(grads[1].clone().flatten::<1>(0, 1));
    norm.add(grads[1].clone().unsqueeze::<3>());
    let want = reference_squares(&grads[0]) + 2.0 * reference_squares(&grads[1]);
    let got = norm.finish();
    let rel = (f64::from(got) - want).abs() / want;
    assert!(
        rel <= 1e-5,
        "squared norm {got} vs {want}: relative {rel:e}"
    );
    assert_eq!(SquaredNorm::<B>::new().finish(), 0.0);
}

#[test]
fn squared_norm_matches_f64_on_wgpu() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    check_squared_norm::<W>(&device);
}

#[test]
fn squared_norm_matches_f64_on_ndarray() {
    check_squared_norm::<Cpu>(&Default::default());
}

/// More adapter-like tensors than one group takes (16), of ragged sizes (one larger than a
/// launch's 64 × 256 units per tensor, so units loop), a vector, and a frozen matrix that gets
/// no gradient.
#[derive(Module, Debug)]
struct Many<B: Backend> {
    matrices: Vec<Param<Tensor<B, 2>>>,
    vector: Param<Tensor<B, 1>>,
    frozen: Param<Tensor<B, 2>>,
}

const MANY_SHAPES: [[usize; 2]; 20] = [
    [16, 57],
    [57, 16],
    [16, 19],
    [19, 16],
    [3, 5],
    [1, 1],
    [300, 200],
    [16, 150],
    [150, 16],
    [7, 9],
    [16, 33],
    [33, 16],
    [2, 64],
    [64, 2],
    [16, 57],
    [57, 16],
    [16, 19],
    [19, 16],
    [31, 3],
    [1, 129],
];

fn many<B: Backend>(device: &B::Device) -> Many<B> {
    let random =
        |shape: [usize; 2]| Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), device);
    Many {
        matrices: MANY_SHAPES
            .iter()
            .map(|&shape| Param::from_tensor(random(shape)))
            .collect(),
        vector: Param::from_tensor(Tensor::random(
            [23],
            Distribution::Uniform(-1.0, 1.0),
            device,
        )),
        frozen: Param::from_tensor(random([4, 4])).set_require_grad(false),
    }
}

/// The same random gradients for two copies of a [`Many`] (fresh buffers for each).
fn many_grads<B: AutodiffBackend>(
    a: &Many<B>,
    b: &Many<B>,
    scale: f64,
    device: &B::Device,
) -> (GradientsParams, GradientsParams) {
    let (mut ga, mut gb) = (GradientsParams::new(), GradientsParams::new());
    for ((pa, pb), &shape) in a.matrices.iter().zip(&b.matrices).zip(&MANY_SHAPES) {
        let g = Tensor::<B::InnerBackend, 2>::random(
            shape,
            Distribution::Uniform(-scale, scale),
            device,
        );
        gb.register(pb.id, fresh(&g));
        ga.register(pa.id, g);
    }
    let g =
        Tensor::<B::InnerBackend, 1>::random([23], Distribution::Uniform(-scale, scale), device);
    gb.register(b.vector.id, fresh(&g));
    ga.register(a.vector.id, g);
    (ga, gb)
}

#[track_caller]
fn assert_many_close<B: AutodiffBackend>(what: &str, got: &Many<B>, want: &Many<B>, tol: f32) {
    for (k, (g, w)) in got.matrices.iter().zip(&want.matrices).enumerate() {
        assert_close(&format!("{what} matrix {k}"), g.val(), w.val(), tol);
    }
    assert_close(
        &format!("{what} vector"),
        got.vector.val(),
        want.vector.val(),
        tol,
    );
    assert_close(
        &format!("{what} frozen"),
        got.frozen.val(),
        want.frozen.val(),
        0.0,
    );
}

/// `GroupedAdamW` against Burn's `OptimizerAdaptor<AdamW, ..>` step by step on [`Many`], with
/// each optimizer's record saved and loaded into the other halfway (checkpoints are shared).
fn grouped_matches_burn<B: AutodiffBackend>(device: &B::Device, tol: f32) {
    let weight_decay = 0.01;
    let mut burn = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(weight_decay)
        .init::<B, Many<B>>();
    let mut grouped = fused_config(weight_decay).init_grouped::<B, Many<B>>();
    let mut module_burn = many::<B>(device);
    let mut module_grouped = module_burn.clone();
    let frozen_before = values(module_grouped.frozen.val());
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let dir = tempfile::tempdir().unwrap();
    for (step, lr) in LRS.into_iter().enumerate() {
        if step == 2 {
            // Swap the states through files: Burn's record into the grouped optimizer and back.
            let (to_grouped, to_burn) = (dir.path().join("burn"), dir.path().join("grouped"));
            Recorder::<B>::record(&recorder, burn.to_record(), to_grouped.clone()).unwrap();
            Recorder::<B>::record(&recorder, grouped.to_record(), to_burn.clone()).unwrap();
            grouped =
                grouped.load_record(Recorder::<B>::load(&recorder, to_grouped, device).unwrap());
            burn = burn.load_record(Recorder::<B>::load(&recorder, to_burn, device).unwrap());
        }
        let scale = [1.0, 0.1, 3.0, 0.5][step];
        let (grads_burn, grads_grouped) = many_grads(&module_burn, &module_grouped, scale, device);
        let held = module_grouped.matrices[0].val();
        let held_before = values(held.clone());
        module_burn = burn.step(lr, module_burn, grads_burn);
        module_grouped = grouped.step(lr, module_grouped, grads_grouped);
        assert_eq!(
            values(held),
            held_before,
            "step {}: input parameter changed",
            step + 1
        );
        assert_many_close(
            &format!("step {}", step + 1),
            &module_grouped,
            &module_burn,
            tol,
        );
        assert!(module_grouped.matrices[0].val().is_require_grad());
    }
    assert_eq!(values(module_grouped.frozen.val()), frozen_before);
    let record = grouped.to_record();
    assert_eq!(
        record.len(),
        MANY_SHAPES.len() + 1,
        "one state per trained tensor"
    );
    assert!(!record.contains_key(&module_grouped.frozen.id));
}

#[test]
fn grouped_steps_match_burn_adamw_on_wgpu() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    grouped_matches_burn::<Autodiff<W>>(&device, TOL);
}

#[test]
fn grouped_steps_are_burn_adamw_bitwise_on_ndarray() {
    grouped_matches_burn::<Autodiff<Cpu>>(&Default::default(), 0.0);
}
