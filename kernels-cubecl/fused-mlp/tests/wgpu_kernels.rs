//! The CubeCL kernels and the fused autodiff op on Burn's wgpu backend, checked against plain
//! Burn math and against autodiff of the portable path, f32.
//!
//! On a machine without a GPU this runs on Mesa's software Vulkan (lavapipe, Debian/Ubuntu
//! package `mesa-vulkan-drivers`). Without any Vulkan adapter they are skipped with a message,
//! so `cargo test --workspace` passes on a fresh machine; CI installs lavapipe and sets
//! `FASTLORA_REQUIRE_WGPU=1`, which turns a missing adapter into a failure.

use burn::backend::Autodiff;
use burn::backend::wgpu::WgpuDevice;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::{Distribution, TensorPrimitive};
use fused_mlp::kernels::{swiglu_forward, swiglu_lora_backward};
use fused_mlp::{
    FusedMlpBackend, LoraProj, MlpWeights, OutputUse, SwigluLoraBackward, WgpuBackend,
    fused_lora_mlp, fused_lora_mlp_2d, lora_mlp, vulkan_test_device,
};
use lora_layers::{LoraAdapterConfig, LoraInit, LoraLinear, LoraLinearConfig};

type B = WgpuBackend;
type AB = Autodiff<B>;

/// Rows: ragged on purpose (not a multiple of 8, 32 or 64).
const N: usize = 37;
const D: usize = 24;
const I: usize = 40;
/// Relative tolerance: `max|got − want| / max|want|`.
const TOL: f32 = 1e-4;

fn random<BK: Backend, const R: usize>(shape: [usize; R], device: &BK::Device) -> Tensor<BK, R> {
    Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), device)
}

fn values<BK: Backend, const R: usize>(t: Tensor<BK, R>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Same values, fresh tensor (a buffer no one else holds).
fn fresh<const R: usize>(t: &Tensor<B, R>) -> Tensor<B, R> {
    Tensor::from_data(t.to_data(), &t.device())
}

fn prim<const R: usize>(
    t: Tensor<B, R>,
) -> burn_cubecl::tensor::CubeTensor<cubecl::wgpu::WgpuRuntime> {
    t.into_primitive().tensor()
}

fn tensor2(p: burn_cubecl::tensor::CubeTensor<cubecl::wgpu::WgpuRuntime>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

#[track_caller]
fn assert_close<BK: Backend, const R: usize>(what: &str, got: Tensor<BK, R>, want: Tensor<BK, R>) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (got, want) = (values(got), values(want));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    let mut worst = (0usize, 0f32);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.is_finite(), "{what}[{k}] = {g} (output not written?)");
        let err = (g - w).abs();
        if err > worst.1 {
            worst = (k, err);
        }
    }
    let rel = worst.1 / scale;
    assert!(
        rel <= TOL,
        "{what}: relative error {rel:e} at {} (got {}, want {})",
        worst.0,
        got[worst.0],
        want[worst.0]
    );
}

fn silu<BK: Backend, const R: usize>(t: Tensor<BK, R>) -> Tensor<BK, R> {
    burn::tensor::activation::silu(t)
}

/// Kernel 1 (`h = silu(e)·g`) against plain Burn, with `g` arriving transposed (strided: the
/// scalar kernel indexes through strides), then stored row by row (the vector kernel), into a
/// NaN-poisoned output buffer.
#[test]
fn kernel1_matches_plain_burn() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let e = random::<B, 2>([N, I], &device);
    let g_t = random::<B, 2>([I, N], &device);
    let h = silu(e.clone()) * g_t.clone().transpose();
    let (e_before, g_before) = (values(e.clone()), values(g_t.clone()));
    let poison = Tensor::<B, 2>::full([N, I], f32::NAN, &device);
    let got = swiglu_forward::launch(
        &prim(e.clone()),
        &prim(g_t.clone().transpose()),
        prim(poison),
    );
    assert_close("kernel 1 h", tensor2(got), h.clone());
    // e and g are read, never written.
    assert_eq!(values(e.clone()), e_before);
    assert_eq!(values(g_t.clone()), g_before);

    // Both stored row by row: the vector form of the kernel (4 f32 per load on lavapipe).
    let g = fresh(&g_t.transpose());
    let poison = Tensor::<B, 2>::full([N, I], f32::NAN, &device);
    let got = swiglu_forward::launch(&prim(e), &prim(g), prim(poison));
    assert_close("kernel 1 h (rows)", tensor2(got), h);
}

#[test]
fn kernel2_matches_plain_burn() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    // Larger pre-activations than U(-1, 1) to exercise the sigmoid's tails.
    let e = random::<B, 2>([N, I], &device).mul_scalar(6.0);
    let g = random::<B, 2>([N, I], &device);
    let dh = random::<B, 2>([N, I], &device);

    let sig = burn::tensor::activation::sigmoid(e.clone());
    let silu_e = e.clone() * sig.clone();
    let want_h = silu_e.clone() * g.clone();
    let want_dg = dh.clone() * silu_e;
    let one = Tensor::<B, 2>::ones([N, I], &device);
    let want_de = dh.clone() * g.clone() * sig.clone() * (one.clone() + e.clone() * (one - sig));

    // All three buffers handed over alone: written in place.
    let SwigluLoraBackward { h, de, dg } =
        swiglu_lora_backward::launch(prim(fresh(&dh)), prim(fresh(&e)), prim(fresh(&g)));
    assert_close("kernel 2 h", tensor2(h), want_h.clone());
    assert_close("kernel 2 δe", tensor2(de), want_de.clone());
    assert_close("kernel 2 δg", tensor2(dg), want_dg.clone());

    // Shared buffers are copied, never written.
    let before = values(e.clone());
    let _ = swiglu_lora_backward::launch(prim(dh.clone()), prim(e.clone()), prim(g.clone()));
    assert_eq!(values(e.clone()), before);

    // δh arriving transposed (strided): the scalar kernel.
    let dh_t = fresh(&dh.clone().transpose()).transpose();
    let SwigluLoraBackward { h, de, dg } =
        swiglu_lora_backward::launch(prim(dh_t), prim(fresh(&e)), prim(fresh(&g)));
    assert_close("kernel 2 h (strided)", tensor2(h), want_h);
    assert_close("kernel 2 δe (strided)", tensor2(de), want_de);
    assert_close("kernel 2 δg (strided)", tensor2(dg), want_dg);
}

/// gate, up, down on the autodiff backend, PEFT-style: frozen base, random nonzero A and B.
fn projections(rank: usize, device: &WgpuDevice) -> [LoraLinear<AB>; 3] {
    let scalings = [0.5, 2.0, 1.5];
    let shapes = [(D, I), (D, I), (I, D)];
    let names = ["gate_proj", "up_proj", "down_proj"];
    std::array::from_fn(|k| {
        let (d_in, d_out) = shapes[k];
        LoraLinearConfig::new(d_in, d_out)
            .init::<AB>(device)
            .init_adapter(
                &LoraAdapterConfig::new(rank, scalings[k]),
                LoraInit::Random,
                k as u64 + 7,
                names[k],
            )
            .unwrap()
    })
}

fn fused_op_matches_portable_autodiff(rank: usize) {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let [gate, up, down] = projections(rank, &device);
    let x = random::<AB, 3>([1, N, D], &device).require_grad();
    // A fixed random cotangent, so dL/dy is not uniform.
    let cot = random::<AB, 3>([1, N, D], &device);

    let y_ref = lora_mlp(x.clone(), &gate, &up, &down);
    let grads_ref = (y_ref.clone() * cot.clone()).sum().backward();
    let y = fused_lora_mlp(x.clone(), &gate, &up, &down, OutputUse::Values).expect("fusable");
    let grads = (y.clone() * cot).sum().backward();

    assert_close("y", y.inner(), y_ref.inner());
    assert_close(
        "dx",
        x.grad(&grads).expect("dx"),
        x.grad(&grads_ref).expect("dx ref"),
    );
    for (name, proj) in [("gate", &gate), ("up", &up), ("down", &down)] {
        let adapter = proj.adapter.as_ref().unwrap();
        for (factor, param) in [("A", &adapter.lora_a), ("B", &adapter.lora_b)] {
            let t = param.val();
            assert_close(
                &format!("d{factor}_{name}"),
                t.grad(&grads).expect("LoRA grad"),
                t.grad(&grads_ref).expect("LoRA grad ref"),
            );
        }
        assert!(
            proj.base_weight().grad(&grads).is_none(),
            "frozen {name} base weight got a gradient"
        );
    }
}

#[test]
fn fused_op_matches_portable_autodiff_rank4() {
    let _switches = fused_mlp::switch_lock();
    fused_op_matches_portable_autodiff(4);
}

#[test]
fn fused_op_matches_portable_autodiff_rank8() {
    let _switches = fused_mlp::switch_lock();
    fused_op_matches_portable_autodiff(8);
}

/// Every one of the ten inputs tracked (base weights too), on `[N, D]` through
/// `fused_lora_mlp_2d` (values and graph-only outputs), against autodiff of the same math
/// written with plain Burn ops.
#[test]
fn all_ten_gradients_match_when_everything_is_tracked() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let rank = 8;
    let proj = |d_in: usize, d_out: usize, scaling: f64| LoraProj {
        weight: random::<AB, 2>([d_out, d_in], &device).require_grad(),
        lora_a: random::<AB, 2>([rank, d_in], &device).require_grad(),
        lora_b: random::<AB, 2>([d_out, rank], &device).require_grad(),
        scaling,
    };
    let w = MlpWeights {
        gate: proj(D, I, 0.5),
        up: proj(D, I, 2.0),
        down: proj(I, D, 1.5),
    };
    let x = random::<AB, 2>([N, D], &device).require_grad();
    let cot = random::<AB, 2>([N, D], &device);

    let lin = |x: Tensor<AB, 2>, p: &LoraProj<Tensor<AB, 2>>| {
        x.clone().matmul(p.weight.clone().transpose())
            + x.matmul(p.lora_a.clone().transpose())
                .matmul(p.lora_b.clone().transpose())
                .mul_scalar(p.scaling)
    };
    let h = silu(lin(x.clone(), &w.gate)) * lin(x.clone(), &w.up);
    let y_ref = lin(h, &w.down);
    let grads_ref = (y_ref.clone() * cot.clone()).sum().backward();

    // The gradient of `(y·c).sum()` never reads `y`, so a graph-only output (the down
    // projection skipped, `y` unspecified) must give the same ten gradients.
    for output in [OutputUse::Values, OutputUse::GraphOnly] {
        let y = fused_lora_mlp_2d(x.clone(), w.clone(), output);
        let grads = (y.clone() * cot.clone()).sum().backward();
        if output == OutputUse::Values {
            assert_close("y", y.inner(), y_ref.clone().inner());
        }
        let dx = x.grad(&grads).unwrap();
        assert_close(&format!("{output:?} dx"), dx, x.grad(&grads_ref).unwrap());
        let names = [
            "W_g", "A_g", "B_g", "W_u", "A_u", "B_u", "W_d", "A_d", "B_d",
        ];
        for (name, t) in names.into_iter().zip(w.clone().into_array()) {
            assert_close(
                &format!("{output:?} d{name}"),
                t.grad(&grads).expect("grad"),
                t.grad(&grads_ref).expect("grad ref"),
            );
        }
    }
}

/// The inner backend (no autodiff) and an autodiff forward with nothing tracked give the same
/// output as the portable path.
#[test]
fn untracked_forwards_match_portable() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let [gate, up, down] = projections(4, &device);
    let x = random::<AB, 3>([2, 19, D], &device);
    let want = lora_mlp(x.clone(), &gate, &up, &down).inner();

    let got = fused_lora_mlp(x.clone(), &gate, &up, &down, OutputUse::Values).unwrap();
    assert_close("autodiff, untracked", got.inner(), want.clone());

    let [gate, up, down] = [gate.valid(), up.valid(), down.valid()];
    let got = fused_lora_mlp::<B, 3>(x.inner(), &gate, &up, &down, OutputUse::Values).unwrap();
    assert_close("inner backend", got, want);
}

/// The trait is what a model is generic over.
#[test]
fn both_backends_implement_the_trait() {
    let _switches = fused_mlp::switch_lock();
    fn is_fused<T: FusedMlpBackend>() {}
    is_fused::<B>();
    is_fused::<AB>();
}

/// The model's entry point picks the fused op on this backend, and it agrees with the portable
/// path in output and in the gradients a trainer reads.
#[test]
fn model_entry_point_dispatches_to_the_fused_op() {
    let _switches = fused_mlp::switch_lock();
    assert!(fused_mlp::fused_backend::<AB>() && fused_mlp::fused_backend::<B>());
    assert!(!fused_mlp::fused_backend::<burn::backend::NdArray<f32>>());
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let [gate, up, down] = projections(8, &device);
    let x = random::<AB, 3>([2, 17, D], &device).require_grad();
    let cot = random::<AB, 3>([2, 17, D], &device);
    let y_ref = lora_mlp(x.clone(), &gate, &up, &down);
    let grads_ref = (y_ref.clone() * cot.clone()).sum().backward();
    let y = fused_mlp::mlp(x.clone(), &gate, &up, &down, OutputUse::Values);
    let grads = (y.clone() * cot).sum().backward();
    assert_close("y", y.inner(), y_ref.inner());
    let a = gate.adapter.as_ref().unwrap().lora_a.val();
    assert_close(
        "dA_gate",
        a.grad(&grads).expect("grad"),
        a.grad(&grads_ref).expect("grad ref"),
    );
}

/// The fused op on wgpu against the portable path on the CPU (ndarray, plain f32): the same
/// oracle the GPU matrix uses for f32, so a harness bug shows up here without a GPU.
#[test]
fn fused_on_wgpu_matches_portable_on_the_cpu() {
    let _switches = fused_mlp::switch_lock();
    type Cpu = Autodiff<burn::backend::NdArray<f32>>;
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let cpu = Default::default();
    let cpu_projections: [LoraLinear<Cpu>; 3] = {
        let shapes = [(D, I), (D, I), (I, D)];
        std::array::from_fn(|k| {
            let (d_in, d_out) = shapes[k];
            LoraLinearConfig::new(d_in, d_out)
                .init::<Cpu>(&cpu)
                .init_adapter(
                    &LoraAdapterConfig::new(8, [0.5, 2.0, 1.5][k]),
                    LoraInit::Random,
                    k as u64 + 11,
                    "m",
                )
                .unwrap()
        })
    };
    let to_gpu = |p: &LoraLinear<Cpu>| {
        let copy = |t: Tensor<Cpu, 2>| Tensor::<AB, 2>::from_data(t.into_data(), &device);
        let adapter = p.adapter.as_ref().unwrap();
        let mut linear = LoraLinear::<AB>::from_weights(copy(p.base_weight()), None);
        linear.adapter = Some(lora_layers::LoraAdapter {
            lora_a: burn::module::Param::from_tensor(copy(adapter.lora_a.val())),
            lora_b: burn::module::Param::from_tensor(copy(adapter.lora_b.val())),
            scaling: adapter.scaling,
            dropout: adapter.dropout.clone(),
            merged: false,
        });
        linear
    };
    let gpu_projections = cpu_projections.each_ref().map(to_gpu);
    let x_cpu = random::<Cpu, 3>([1, N, D], &cpu).require_grad();
    let cot_cpu = random::<Cpu, 3>([1, N, D], &cpu);
    let x_gpu =
        Tensor::<AB, 3>::from_data(x_cpu.clone().inner().into_data(), &device).require_grad();
    let cot_gpu = Tensor::<AB, 3>::from_data(cot_cpu.clone().into_data(), &device);

    let [g, u, d] = &cpu_projections;
    let y_cpu = lora_mlp(x_cpu.clone(), g, u, d);
    let grads_cpu = (y_cpu.clone() * cot_cpu).sum().backward();
    let [g, u, d] = &gpu_projections;
    let y_gpu = fused_lora_mlp(x_gpu.clone(), g, u, d, OutputUse::Values).expect("fusable");
    let grads_gpu = (y_gpu.clone() * cot_gpu).sum().backward();

    let back = |t: Tensor<burn::backend::NdArray<f32>, 3>| {
        Tensor::<B, 3>::from_data(t.into_data(), &device)
    };
    assert_close("y", y_gpu.inner(), back(y_cpu.inner()));
    assert_close(
        "dx",
        x_gpu.grad(&grads_gpu).unwrap(),
        back(x_cpu.grad(&grads_cpu).unwrap()),
    );
}

/// The LoRA projection op (`fused_mlp::linear`: GEMMs and a hand-written backward) against
/// Burn's autodiff of `LoraLinear::forward` on the same backend: output, dx, dA, dB, with a
/// base bias, on 3-D input; and, with every weight tracked, dW too.
fn check_linear_op(bias: bool, train_base: bool) {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let mut proj = LoraLinearConfig::new(D, I)
        .with_bias(bias)
        .init::<AB>(&device)
        .init_adapter(
            &LoraAdapterConfig::new(8, 1.5),
            LoraInit::Random,
            5,
            "q_proj",
        )
        .unwrap();
    if train_base {
        // `Param::from_tensor` makes a trainable parameter (the base is normally frozen).
        let w = burn::module::Param::from_tensor(proj.base_weight());
        proj.weight = lora_layers::BaseWeight::Dense(w);
    }
    let x = random::<AB, 3>([2, N, D], &device).require_grad();
    let cot = random::<AB, 3>([2, N, I], &device);
    fused_mlp::set_fused_enabled(false);
    let y_ref = fused_mlp::linear(x.clone(), &proj);
    fused_mlp::set_fused_enabled(true);
    let grads_ref = (y_ref.clone() * cot.clone()).sum().backward();
    let y = fused_mlp::linear(x.clone(), &proj);
    let grads = (y.clone() * cot).sum().backward();

    assert_close("y", y.inner(), y_ref.inner());
    assert_close(
        "dx",
        x.grad(&grads).expect("dx"),
        x.grad(&grads_ref).expect("dx ref"),
    );
    let adapter = proj.adapter.as_ref().unwrap();
    for (factor, param) in [("A", &adapter.lora_a), ("B", &adapter.lora_b)] {
        let t = param.val();
        assert_close(
            &format!("d{factor}"),
            t.grad(&grads).expect("LoRA grad"),
            t.grad(&grads_ref).expect("LoRA grad ref"),
        );
    }
    let w = proj.base_weight();
    match (w.grad(&grads), w.grad(&grads_ref)) {
        (Some(got), Some(want)) => assert_close("dW", got, want),
        (None, None) => assert!(!train_base, "a trained base weight got no gradient"),
        (got, want) => panic!(
            "dW present: fused {}, portable {}",
            got.is_some(),
            want.is_some()
        ),
    }
}

#[test]
fn linear_op_matches_portable() {
    let _switches = fused_mlp::switch_lock();
    check_linear_op(false, false);
}

#[test]
fn linear_op_with_bias_matches_portable() {
    let _switches = fused_mlp::switch_lock();
    check_linear_op(true, false);
}

#[test]
fn linear_op_with_trained_base_matches_portable() {
    let _switches = fused_mlp::switch_lock();
    check_linear_op(false, true);
}

/// A projection without an adapter (a frozen LM head) through the plain op, against
/// `LoraLinear::forward`: output and dx.
#[test]
fn plain_linear_op_matches_portable() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let proj = LoraLinearConfig::new(D, I).init::<AB>(&device);
    let x = random::<AB, 3>([1, N, D], &device).require_grad();
    let cot = random::<AB, 3>([1, N, I], &device);
    let y_ref = proj.forward(x.clone());
    let grads_ref = (y_ref.clone() * cot.clone()).sum().backward();
    let y = fused_mlp::linear(x.clone(), &proj);
    let grads = (y.clone() * cot).sum().backward();
    assert_close("y", y.inner(), y_ref.inner());
    assert_close(
        "dx",
        x.grad(&grads).expect("dx"),
        x.grad(&grads_ref).expect("dx ref"),
    );
}

/// The q, k, v projections (ranks 8, 4, 6 and three scalings, as a `rank_pattern` gives) on
/// 3-D input, and a loss that reads the outputs in `used`.
struct QkvCase {
    projections: [LoraLinear<AB>; 3],
    x: Tensor<AB, 3>,
    cotangents: [Tensor<AB, 3>; 3],
}

impl QkvCase {
    fn new(device: &WgpuDevice, train_base: bool) -> Self {
        let dims = [(32, 8, 2.0), (16, 4, 0.5), (16, 6, 1.25)];
        let projections = dims.map(|(d_out, rank, scaling)| {
            let mut proj = LoraLinearConfig::new(D, d_out)
                .init::<AB>(device)
                .init_adapter(
                    &LoraAdapterConfig::new(rank, scaling),
                    LoraInit::Random,
                    d_out as u64 + rank as u64,
                    "q_proj",
                )
                .unwrap();
            if train_base {
                let w = burn::module::Param::from_tensor(proj.base_weight());
                proj.weight = lora_layers::BaseWeight::Dense(w);
            }
            proj
        });
        let x = random::<AB, 3>([2, N, D], device).require_grad();
        let cotangents = dims.map(|(d_out, _, _)| random::<AB, 3>([2, N, d_out], device));
        Self {
            projections,
            x,
            cotangents,
        }
    }

    /// Outputs and gradients through `fused_mlp::qkv`, fused or (switched off) separate
    /// `LoraLinear::forward` calls.
    fn run(
        &self,
        fused: bool,
        used: [bool; 3],
    ) -> (
        [Tensor<AB, 3>; 3],
        <AB as burn::tensor::backend::AutodiffBackend>::Gradients,
    ) {
        let [q, k, v] = &self.projections;
        fused_mlp::set_fused_enabled(fused);
        let ys = fused_mlp::qkv(self.x.clone(), q, k, v);
        fused_mlp::set_fused_enabled(true);
        let loss = ys
            .iter()
            .zip(&self.cotangents)
            .zip(used)
            .filter(|(_, used)| *used)
            .map(|((y, c), _)| (y.clone() * c.clone()).sum())
            .reduce(|a, b| a + b)
            .expect("one output used");
        (ys, loss.backward())
    }
}

/// The fused QKV op against autodiff of three `LoraLinear::forward` calls on the same backend:
/// the three outputs, dx, and every LoRA factor's gradient (and dW with a trained base); an
/// output left out of the loss leaves its factors without gradient in both.
fn check_qkv_op(train_base: bool, used: [bool; 3]) {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let case = QkvCase::new(&device, train_base);
    let (ys_ref, grads_ref) = case.run(false, used);
    let (ys, grads) = case.run(true, used);
    for ((name, y), y_ref) in ["q", "k", "v"].iter().zip(ys).zip(ys_ref) {
        assert_close(&format!("y_{name}"), y.inner(), y_ref.inner());
    }
    assert_close(
        "dx",
        case.x.grad(&grads).expect("dx"),
        case.x.grad(&grads_ref).expect("dx ref"),
    );
    for (name, proj) in ["q", "k", "v"].iter().zip(&case.projections) {
        let adapter = proj.adapter.as_ref().unwrap();
        let base = proj.base_weight();
        for (what, t) in [
            ("A", adapter.lora_a.val()),
            ("B", adapter.lora_b.val()),
            ("W", base),
        ] {
            match (t.grad(&grads), t.grad(&grads_ref)) {
                (Some(got), Some(want)) => assert_close(&format!("d{what}_{name}"), got, want),
                (None, None) => {}
                (got, want) => panic!(
                    "d{what}_{name} present: fused {}, separate {}",
                    got.is_some(),
                    want.is_some()
                ),
            }
        }
    }
}

#[test]
fn qkv_op_matches_separate_projections() {
    let _switches = fused_mlp::switch_lock();
    check_qkv_op(false, [true; 3]);
}

#[test]
fn qkv_op_with_trained_bases_matches_separate_projections() {
    let _switches = fused_mlp::switch_lock();
    check_qkv_op(true, [true; 3]);
}

#[test]
fn qkv_op_with_an_output_left_out_of_the_loss_matches_separate_projections() {
    let _switches = fused_mlp::switch_lock();
    check_qkv_op(false, [true, false, true]);
    check_qkv_op(false, [false, true, false]);
}

/// With nothing tracked (inference), the op's outputs equal the separate projections'.
#[test]
fn untracked_qkv_op_matches_separate_projections() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let case = QkvCase::new(&device, false);
    let projections = case.projections.clone().map(|p| p.valid());
    let [q, k, v] = &projections;
    let x = case.x.clone().inner();
    let ys = fused_mlp::qkv(x.clone(), q, k, v);
    for ((name, y), p) in ["q", "k", "v"].iter().zip(ys).zip(&projections) {
        assert_close(&format!("y_{name}"), y, p.forward(x.clone()));
    }
}

/// `cast_group` against Burn's own cast, f32 → f16: more tensors than one launch takes, one
/// arriving transposed (made contiguous first), one already f16 (returned as it is), one empty.
#[test]
fn cast_group_matches_burn_casts() {
    let _switches = fused_mlp::switch_lock();
    use burn::tensor::DType;
    use fused_mlp::kernels::cast_group::{self, MAX_GROUP};
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let mut tensors: Vec<Tensor<B, 2>> = (0..MAX_GROUP + 3)
        .map(|k| random::<B, 2>([3 + k, 17 + 5 * k], &device).mul_scalar(100.0))
        .collect();
    tensors[1] = random::<B, 2>([40, 9], &device).transpose();
    tensors[2] = random::<B, 2>([6, 5], &device).cast(DType::F16);
    tensors[4] = Tensor::<B, 2>::zeros([0, 7], &device);
    let want: Vec<Tensor<B, 2>> = tensors.iter().map(|t| t.clone().cast(DType::F16)).collect();
    let got = cast_group::launch(tensors.iter().cloned().map(prim).collect(), DType::F16);
    assert_eq!(got.len(), want.len());
    for (k, (got, want)) in got.into_iter().zip(want).enumerate() {
        let got = tensor2(got);
        assert_eq!(got.dtype(), DType::F16, "tensor {k}");
        assert_eq!(got.dims(), want.dims(), "tensor {k}");
        // Round to nearest even either way: the same f16 values.
        assert_eq!(values(got), values(want), "tensor {k}");
    }
}

/// `cast_group::launch_with_stack` against Burn's casts and concatenation: three factors of one
/// width stacked along rows (one arriving transposed) beside tensors cast on their own or
/// passed through, in one launch; then with a stacked member of another dtype (the path that
/// casts first); then into the dtype the factors already have (a copy).
#[test]
fn cast_group_with_stack_matches_burn_cast_and_cat() {
    let _switches = fused_mlp::switch_lock();
    use burn::tensor::DType;
    use fused_mlp::kernels::cast_group;
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let big = |shape: [usize; 2]| random::<B, 2>(shape, &device).mul_scalar(100.0);
    let stacked = vec![big([3, 24]), big([24, 5]).transpose(), big([2, 24])];
    let others = [big([7, 9]), big([4, 4]).cast(DType::F16), big([1, 30])];
    for (case, stacked, dtype) in [
        ("one launch", stacked.clone(), DType::F16),
        (
            "a stacked member in f16",
            vec![
                stacked[0].clone(),
                stacked[1].clone().cast(DType::F16),
                stacked[2].clone(),
            ],
            DType::F16,
        ),
        ("already f32", stacked.clone(), DType::F32),
    ] {
        let want_stack = Tensor::cat(stacked.iter().map(|t| t.clone().cast(dtype)).collect(), 0);
        let want: Vec<Tensor<B, 2>> = others.iter().map(|t| t.clone().cast(dtype)).collect();
        let (got, stack) = cast_group::launch_with_stack(
            others.iter().cloned().map(prim).collect(),
            stacked.into_iter().map(prim).collect(),
            dtype,
        );
        let stack = tensor2(stack);
        assert_eq!(stack.dtype(), dtype, "{case}: stack dtype");
        assert_eq!(stack.dims(), [10, 24], "{case}: stack shape");
        assert_eq!(values(stack), values(want_stack), "{case}: stack");
        for (k, (got, want)) in got.into_iter().zip(want).enumerate() {
            let got = tensor2(got);
            assert_eq!(got.dtype(), dtype, "{case}: tensor {k}");
            assert_eq!(values(got), values(want), "{case}: tensor {k}");
        }
    }
}

/// `gemm_into_columns` (its portable path here: the product, then a copy kernel into the block)
/// writes `α·op(a)·op(b)` into its columns of a wider buffer and leaves every other element.
#[test]
fn gemm_into_columns_writes_only_its_block() {
    use fused_mlp::{FusedMlpKernels, Trans};
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let wide = random::<B, 2>([N, 20], &device);
    let before = values(wide.clone());
    let (a, b) = (
        random::<B, 2>([N, D], &device),
        random::<B, 2>([6, D], &device),
    );
    let out = prim(wide.clone());
    B::gemm_into_columns(
        prim(a.clone()),
        Trans::N,
        prim(b.clone()),
        Trans::T,
        0.5,
        &out,
        9,
    );
    let got = values(tensor2(out));
    let product = values(a.matmul(b.transpose()).mul_scalar(0.5));
    for row in 0..N {
        for col in 0..20 {
            let at = row * 20 + col;
            match col {
                9..15 => {
                    let want = product[row * 6 + col - 9];
                    assert!(
                        (got[at] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "({row}, {col})"
                    );
                }
                _ => assert_eq!(got[at], before[at], "({row}, {col}) changed"),
            }
        }
    }
}

/// The MLP's base weights stored as the model loader stores them on these backends: gate and up
/// with spare columns, down with spare rows and columns. The op writes the LoRA factors beside
/// them and runs each projection's forward, and the down projection's `δh`, as one GEMM over a
/// longer inner dimension. Output and the gradients of x and of every LoRA factor against
/// autodiff of plain Burn math, for two rank sets on the same base weights (the second call
/// must overwrite the first one's factors and zeros); the base weights read back unchanged.
#[test]
fn spare_room_weights_match_plain_math() {
    use fused_mlp::{
        FusedMlpKernels, weight_with_spare_columns, weight_with_spare_rows_and_columns,
    };
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let base = |d_out: usize, d_in: usize| values(random::<AB, 2>([d_out, d_in], &device));
    let (w_g, w_u, w_d) = (base(I, D), base(I, D), base(D, I));
    let columns = |v: &Vec<f32>| weight_with_spare_columns::<AB>(v.clone(), [I, D], &device);
    let (gate_w, up_w) = (columns(&w_g), columns(&w_u));
    let down_w = weight_with_spare_rows_and_columns::<AB>(w_d.clone(), [D, I], &device);
    let room = |t: &Tensor<AB, 2>| {
        let p = t.clone().inner().into_primitive().tensor();
        [B::spare_rows(&p), B::spare_columns(&p)]
    };
    let spare = fused_mlp::spare_lora_columns();
    assert_eq!(room(&gate_w), [0, spare]);
    assert_eq!(room(&down_w), [spare, spare]);
    // A plain tensor and Burn slices of a larger one have no spare room.
    let plain = random::<AB, 2>([I + 8, D + 8], &device);
    assert_eq!(room(&plain), [0, 0]);
    assert_eq!(room(&plain.clone().slice([0..I, 0..D])), [0, 0]);
    assert_eq!(room(&plain.slice([0..I, 0..D + 8])), [0, 0]);

    for (r_g, r_u, r_d) in [(5, 3, 4), (2, 6, 7)] {
        let proj = |weight: Tensor<AB, 2>, d_in: usize, d_out: usize, rank, scaling| LoraProj {
            weight,
            lora_a: random::<AB, 2>([rank, d_in], &device).require_grad(),
            lora_b: random::<AB, 2>([d_out, rank], &device).require_grad(),
            scaling,
        };
        let w = MlpWeights {
            gate: proj(gate_w.clone(), D, I, r_g, 0.5),
            up: proj(up_w.clone(), D, I, r_u, 2.0),
            down: proj(down_w.clone(), I, D, r_d, 1.5),
        };
        for input_room in [false, true] {
            let x_in = random::<AB, 2>([N, D], &device).require_grad();
            let gain = random::<AB, 1>([D], &device);
            // The input as the decoder layer makes it: the norm's output, with room for the gate
            // and up `x·Aᵀ` terms beside it or without.
            let room_width = if input_room { r_g + r_u } else { 0 };
            let x = fused_mlp::rms_norm_with_room(x_in.clone(), gain.clone(), 1e-5, room_width);
            assert_eq!(room(&x), [0, room_width], "the norm's output room");
            let cot = random::<AB, 2>([N, D], &device);
            let plain = |v: &Vec<f32>, shape: [usize; 2]| {
                Tensor::<AB, 2>::from_data(TensorData::new(v.clone(), shape), &device)
            };
            let lin = |x: Tensor<AB, 2>, p: &LoraProj<Tensor<AB, 2>>, weight: Tensor<AB, 2>| {
                x.clone().matmul(weight.transpose())
                    + x.matmul(p.lora_a.clone().transpose())
                        .matmul(p.lora_b.clone().transpose())
                        .mul_scalar(p.scaling)
            };
            let x_ref = fused_mlp::rms_norm_portable(x_in.clone(), gain, 1e-5);
            let h = silu(lin(x_ref.clone(), &w.gate, plain(&w_g, [I, D])))
                * lin(x_ref.clone(), &w.up, plain(&w_u, [I, D]));
            let y_ref = lin(h, &w.down, plain(&w_d, [D, I]));
            let grads_ref = (y_ref.clone() * cot.clone()).sum().backward();

            let y = fused_lora_mlp_2d(x.clone(), w.clone(), OutputUse::Values);
            let grads = (y.clone() * cot).sum().backward();
            let case = format!("ranks {r_g}, {r_u}, {r_d}, input room {input_room}");
            assert_close(&format!("{case}: y"), y.inner(), y_ref.inner());
            assert_close(&format!("{case}: x"), x.inner(), x_ref.inner());
            assert_close(
                &format!("{case}: dx"),
                x_in.grad(&grads).unwrap(),
                x_in.grad(&grads_ref).unwrap(),
            );
            for (name, p) in [("gate", &w.gate), ("up", &w.up), ("down", &w.down)] {
                for (factor, t) in [("A", &p.lora_a), ("B", &p.lora_b)] {
                    assert_close(
                        &format!("{case}: d{factor}_{name}"),
                        t.grad(&grads).expect("grad"),
                        t.grad(&grads_ref).expect("grad ref"),
                    );
                }
            }
        }
    }
    assert_eq!(values(gate_w), w_g, "gate weight changed");
    assert_eq!(values(up_w), w_u, "up weight changed");
    assert_eq!(values(down_w), w_d, "down weight changed");
}
