//! The LoRA SwiGLU MLP as one operation: `y = down(silu(gate(x)) · up(x))` where each projection
//! may carry a LoRA adapter, following Unsloth's `LoRA_MLP` math:
//!
//! - `e = x·W_gᵀ + s_g·(x·A_gᵀ)·B_gᵀ`, `g = x·W_uᵀ + s_u·(x·A_uᵀ)·B_uᵀ`
//! - `h = silu(e)·g`
//! - `y = h·W_dᵀ + s_d·(h·A_dᵀ)·B_dᵀ`
//!
//! Two paths compute it:
//!
//! - **portable** ([`lora_mlp`]): plain Burn ops, every backend, autodiff by Burn. It is the
//!   oracle for the fused path.
//! - **fused** ([`fused_lora_mlp`], [`fused_lora_mlp_2d`], on a [`FusedMlpBackend`]): each
//!   projection one GEMM over a longer inner dimension, `[x | s·x·Aᵀ]·[W | B]ᵀ`, when its base
//!   weight has spare room for `B` beside it (the model loader stores the MLP's weights so:
//!   [`weight_with_spare_columns`]); else the rank-r product `s·(x·Aᵀ)·Bᵀ` written first and
//!   the base GEMM β-accumulated onto it (one more pass over `[N, I]`). `ΔW` is never formed.
//!   Then one CubeCL kernel for SwiGLU, then the down projection the same way. Its backward is hand-written as
//!   Unsloth's: only `x`, `e`, `g` are saved; a second kernel recomputes `h` and forms `δe`, `δg`
//!   in place; the LoRA gradients are GEMMs in activation space (`ΔW` is never formed).
//!   Every GEMM goes through [`FusedMlpKernels::gemm`], the hook for a vendor GEMM.
//!
//! The fused op is implemented (feature `cubecl`, turned on by `wgpu` or `cuda`) for plain
//! `CubeBackend<R, F, I, BT>` over any CubeCL runtime `R`, and for `Autodiff` over it. There is
//! deliberately no `Fusion<CubeBackend<..>>` implementation (the project's decision: custom ops
//! are simplest on the plain backend); Burn's `Wgpu`/`Cuda` aliases are Fusion-wrapped when
//! burn's `fusion` feature is on, so name the backend explicitly (`WgpuBackend`, `CudaBackend`).
//!
//! [`mlp`] picks the path for a model generic over any backend: fused on the backends it is
//! compiled for (features `cuda`, `wgpu`) when [`check_fusable`] allows, else portable.
//!
//! The attention's projections take the same route: [`qkv`] runs q, k and v of one input as
//! one op (Unsloth's `LoRA_QKV`, [`FusedQkvBackend`]) when [`check_qkv_fusable`] allows, and
//! [`linear`] runs any other projection as one op (Unsloth's `LoRA_W`, [`FusedLinearBackend`]);
//! both put every product on [`FusedMlpKernels::gemm`] with a hand-written backward.
//!
//! [`rms_norm`] is the decoder's RMSNorm (frozen gain) the same way: one kernel forward and one
//! backward on those backends, [`rms_norm_portable`] elsewhere; [`rope`] is the rotary
//! position embedding the same way (one kernel, run with the rotation transposed for the
//! backward), [`rope_portable`] elsewhere.
//!
//! [`check_fusable`] is Unsloth's rule for when the fused path may take over; the kernels are in
//! `kernels` (feature `cubecl`; one per file, the `#[cube]` function next to its launch).

use burn::prelude::*;
use burn::tensor::activation::silu;
use lora_layers::LoraLinear;

mod autodiff;
mod cast;
#[cfg(feature = "cubecl")]
mod cube;
mod dispatch;
#[cfg(feature = "cubecl")]
mod gemm;
#[cfg(feature = "cubecl")]
pub mod kernels;
mod linear;
mod matmul;
mod memory;
mod norm;
mod op;
mod qkv;
mod read;
mod rope;
mod spare;
#[cfg(feature = "wgpu")]
mod vulkan;

pub use dispatch::{
    fused_backend, fused_enabled, linear, mlp, mlp_input_room, qkv, rms_norm, rms_norm_with_room,
    rope, set_fused_enabled, set_graph_only_enabled, switch_lock,
};
pub use linear::{FusedLinearBackend, fused_linear_nd};
pub use matmul::matmul;
pub use memory::with_persistent_memory;
pub use norm::{RmsNormBackend, RmsNormKernels, rms_norm_portable};
pub use op::{
    FusedMlpBackend, FusedMlpKernels, LoraProj, MlpWeights, OutputUse, SwigluLoraBackward, Trans,
    fused_lora_mlp_2d,
};
pub use qkv::{FusedQkvBackend, QkvWeights, fused_lora_qkv_nd};
pub use read::{PendingRead, start_read};
pub use rope::{RopeBackend, RopeKernels, rope_portable};
pub use spare::{
    set_spare_lora_columns, spare_lora_columns, weight_with_spare_columns,
    weight_with_spare_rows_and_columns,
};
#[cfg(feature = "wgpu")]
pub use vulkan::vulkan_test_device;

/// The wgpu backend the fused op is implemented for: plain `CubeBackend`, no Fusion (f32).
#[cfg(feature = "wgpu")]
pub type WgpuBackend<F = f32> = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, F, i32, u32>;

/// The CUDA backend the fused op is implemented for: plain `CubeBackend`, no Fusion.
#[cfg(feature = "cuda")]
pub type CudaBackend<F = f32> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;

/// Why an MLP (or q/k/v) cannot take a fused op (it then runs the portable path, same result).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotFusable {
    /// A projection has no LoRA adapter.
    #[error("`{0}` carries no LoRA adapter")]
    NoAdapter(&'static str),
    /// A projection's adapter uses dropout, which the fused kernel does not apply.
    #[error("`{0}` has LoRA dropout {1} (the fused path needs 0)")]
    Dropout(&'static str, f64),
    /// A projection has a base bias, which the fused kernel does not add.
    #[error("`{0}` has a base bias")]
    BaseBias(&'static str),
    /// A projection's adapter is merged into its base weight (the fused path would add it twice).
    #[error("`{0}` has its adapter merged into the base weight")]
    Merged(&'static str),
}

/// Checks Unsloth's patch rule for the MLP: all three projections carry LoRA with dropout 0
/// and no base bias (and, here, an unmerged adapter).
///
/// # Errors
/// The first [`NotFusable`] reason found, in gate, up, down order.
pub fn check_fusable<B: Backend>(
    gate: &LoraLinear<B>,
    up: &LoraLinear<B>,
    down: &LoraLinear<B>,
) -> Result<(), NotFusable> {
    check_projections(&[("gate_proj", gate), ("up_proj", up), ("down_proj", down)])
}

/// Checks the same rule for the fused QKV op ([`qkv`]): q, k and v all carry an unmerged LoRA
/// adapter with dropout 0 and have no base bias.
///
/// # Errors
/// The first [`NotFusable`] reason found, in q, k, v order.
pub fn check_qkv_fusable<B: Backend>(
    q: &LoraLinear<B>,
    k: &LoraLinear<B>,
    v: &LoraLinear<B>,
) -> Result<(), NotFusable> {
    check_projections(&[("q_proj", q), ("k_proj", k), ("v_proj", v)])
}

fn check_projections<B: Backend>(
    projections: &[(&'static str, &LoraLinear<B>)],
) -> Result<(), NotFusable> {
    for &(name, proj) in projections {
        let adapter = proj.adapter.as_ref().ok_or(NotFusable::NoAdapter(name))?;
        if adapter.dropout.prob != 0.0 {
            return Err(NotFusable::Dropout(name, adapter.dropout.prob));
        }
        if proj.bias.is_some() {
            return Err(NotFusable::BaseBias(name));
        }
        if adapter.merged {
            return Err(NotFusable::Merged(name));
        }
    }
    Ok(())
}

/// The fused LoRA SwiGLU MLP on [`LoraLinear`] projections: the same result as [`lora_mlp`],
/// computed by [`FusedMlpBackend::fused_lora_mlp`] (unspecified values under
/// [`OutputUse::GraphOnly`]).
///
/// # Shapes
/// - x: `[..., hidden]` (rank 2 passes through as it is: a strided matrix, such as a norm's
///   output with room beside its rows, keeps its layout, where Burn's reshape of a strided
///   `[batch, seq, hidden]` into rows copies it)
/// - output: `[..., hidden]`
///
/// # Errors
/// [`NotFusable`] when [`check_fusable`] rejects the projections (then use [`lora_mlp`]).
pub fn fused_lora_mlp<B: FusedMlpBackend, const D: usize>(
    x: Tensor<B, D>,
    gate: &LoraLinear<B>,
    up: &LoraLinear<B>,
    down: &LoraLinear<B>,
    output: OutputUse,
) -> Result<Tensor<B, D>, NotFusable> {
    check_fusable(gate, up, down)?;
    let weights = MlpWeights {
        gate: lora_proj(gate),
        up: lora_proj(up),
        down: lora_proj(down),
    };
    let dims = x.dims();
    let hidden = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = fused_lora_mlp_2d(x.reshape([rows, hidden]), weights, output);
    Ok(y.reshape(dims))
}

/// A projection's base weight and LoRA factors as the fused ops take them.
///
/// # Panics
/// If the projection has no adapter (the fused ops' patch rules check that first).
pub(crate) fn lora_proj<B: Backend>(p: &LoraLinear<B>) -> LoraProj<Tensor<B, 2>> {
    let adapter = p.adapter.as_ref().expect("checked by the patch rule");
    LoraProj {
        weight: p.base_weight(),
        lora_a: adapter.lora_a.val(),
        lora_b: adapter.lora_b.val(),
        scaling: adapter.scaling,
    }
}

/// The portable LoRA SwiGLU MLP.
///
/// # Shapes
/// - x: `[..., hidden]`
/// - output: `[..., hidden]`
pub fn lora_mlp<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gate: &LoraLinear<B>,
    up: &LoraLinear<B>,
    down: &LoraLinear<B>,
) -> Tensor<B, D> {
    let e = gate.forward(x.clone());
    let g = up.forward(x);
    down.forward(silu(e) * g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use lora_layers::{LoraAdapterConfig, LoraInit, LoraLinearConfig};

    type B = NdArray<f32>;

    fn projections(bias: bool, dropout: f64) -> [LoraLinear<B>; 3] {
        let device = Default::default();
        let adapter = LoraAdapterConfig::new(2, 0.5).with_dropout(dropout);
        [(6, 10), (6, 10), (10, 6)].map(|(d_in, d_out)| {
            LoraLinearConfig::new(d_in, d_out)
                .with_bias(bias)
                .init::<B>(&device)
                .init_adapter(&adapter, LoraInit::Random, d_in as u64, "m")
                .unwrap()
        })
    }

    #[test]
    fn portable_path_is_swiglu_in_float64() {
        let [gate, up, down] = projections(false, 0.0);
        let device = Default::default();
        let x = Tensor::<B, 3>::random([1, 2, 6], burn::tensor::Distribution::Default, &device);
        let got: Vec<f32> = lora_mlp(x.clone(), &gate, &up, &down)
            .into_data()
            .to_vec()
            .unwrap();
        let vec = |t: Tensor<B, 3>| -> Vec<f64> {
            t.into_data()
                .to_vec::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        let (e, g) = (vec(gate.forward(x.clone())), vec(up.forward(x)));
        let h: Vec<f32> = e
            .iter()
            .zip(&g)
            .map(|(e, g)| (e / (1.0 + (-e).exp()) * g) as f32)
            .collect();
        let want = down.forward(Tensor::<B, 3>::from_data(
            TensorData::new(h, [1, 2, 10]),
            &device,
        ));
        for (p, q) in got.iter().zip(want.into_data().to_vec::<f32>().unwrap()) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }

    #[test]
    fn patch_rule_names_the_blocking_projection() {
        let [gate, up, down] = projections(false, 0.0);
        assert_eq!(check_fusable(&gate, &up, &down), Ok(()));
        let plain_up = LoraLinear::from_weights(up.base_weight(), None);
        assert_eq!(
            check_fusable(&gate, &plain_up, &down),
            Err(NotFusable::NoAdapter("up_proj"))
        );
        let [gate, up, down] = projections(true, 0.0);
        assert_eq!(
            check_fusable(&gate, &up, &down),
            Err(NotFusable::BaseBias("gate_proj"))
        );
        let [gate, up, down] = projections(false, 0.1);
        assert_eq!(
            check_fusable(&gate, &up, &down),
            Err(NotFusable::Dropout("gate_proj", 0.1))
        );
        let [gate, up, down] = projections(false, 0.0);
        assert_eq!(
            check_fusable(&gate, &up, &down.merge()),
            Err(NotFusable::Merged("down_proj"))
        );
    }

    #[test]
    fn qkv_patch_rule_names_the_blocking_projection() {
        let [q, k, v] = projections(false, 0.0);
        assert_eq!(check_qkv_fusable(&q, &k, &v), Ok(()));
        let plain_k = LoraLinear::from_weights(k.base_weight(), None);
        assert_eq!(
            check_qkv_fusable(&q, &plain_k, &v),
            Err(NotFusable::NoAdapter("k_proj"))
        );
        let [q, k, v] = projections(false, 0.1);
        assert_eq!(
            check_qkv_fusable(&q, &k, &v),
            Err(NotFusable::Dropout("q_proj", 0.1))
        );
        let [q, k, v] = projections(true, 0.0);
        assert_eq!(
            check_qkv_fusable(&q, &k, &v),
            Err(NotFusable::BaseBias("q_proj"))
        );
        let [q, k, v] = projections(false, 0.0);
        assert_eq!(
            check_qkv_fusable(&q, &k, &v.merge()),
            Err(NotFusable::Merged("v_proj"))
        );
    }
}
