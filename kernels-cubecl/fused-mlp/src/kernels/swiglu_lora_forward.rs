//! Kernel 1 of the fused LoRA SwiGLU MLP: the gate and up projections' LoRA-B products and the
//! SwiGLU, in one pass over `[N, I]`.
//!
//! The base GEMMs `e0 = x·W_gᵀ`, `g0 = x·W_uᵀ` and the rank-r LoRA activations
//! `xa_g = x·A_gᵀ`, `xa_u = x·A_uᵀ` (`[N, r]`) come in; for every row `n` and intermediate
//! column `i` the kernel computes
//!
//! ```text
//! e[n,i] = e0[n,i] + s_g · Σ_k xa_g[n,k] · B_g[i,k]     (written over e0)
//! g[n,i] = g0[n,i] + s_u · Σ_k xa_u[n,k] · B_u[i,k]     (written over g0)
//! h[n,i] = silu(e[n,i]) · g[n,i],   silu(e) = e · σ(e)
//! ```
//!
//! so the LoRA-B products are length-r dots per element and no extra `N×I` GEMM runs. The dots,
//! the sigmoid and the product run in f32 whatever the storage type `F` is (bf16 on GPUs); `h`
//! uses `e` and `g` as stored (rounded to `F`), so the backward kernel recomputes exactly this `h`.

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{address_type, check_matrix, elementwise_launch, exclusive};
use crate::SwigluLoraForward;

/// One unit per `(n, i)`, bounds-checked against `h`'s shape (ragged `N` and `I` are fine).
/// Every tensor is indexed through its own strides.
#[cube(launch, address_type = "dynamic")]
fn swiglu_lora_forward_kernel<F: Float>(
    e: &mut Tensor<F>,
    g: &mut Tensor<F>,
    h: &mut Tensor<F>,
    xa_g: &Tensor<F>,
    b_g: &Tensor<F>,
    xa_u: &Tensor<F>,
    b_u: &Tensor<F>,
    s_g: f32,
    s_u: f32,
    #[define(F)] _dtype: StorageType,
) {
    let cols = h.shape(1);
    if ABSOLUTE_POS >= h.shape(0) * cols {
        terminate!();
    }
    let n = ABSOLUTE_POS / cols;
    let i = ABSOLUTE_POS % cols;

    let mut dot_g = 0.0f32;
    let xg_row = n * xa_g.stride(0);
    let bg_row = i * b_g.stride(0);
    for k in 0..xa_g.shape(1) {
        dot_g += f32::cast_from(xa_g[xg_row + k * xa_g.stride(1)])
            * f32::cast_from(b_g[bg_row + k * b_g.stride(1)]);
    }
    let mut dot_u = 0.0f32;
    let xu_row = n * xa_u.stride(0);
    let bu_row = i * b_u.stride(0);
    for k in 0..xa_u.shape(1) {
        dot_u += f32::cast_from(xa_u[xu_row + k * xa_u.stride(1)])
            * f32::cast_from(b_u[bu_row + k * b_u.stride(1)]);
    }

    let e_at = n * e.stride(0) + i * e.stride(1);
    let g_at = n * g.stride(0) + i * g.stride(1);
    let e_val = F::cast_from(f32::cast_from(e[e_at]) + s_g * dot_g);
    let g_val = F::cast_from(f32::cast_from(g[g_at]) + s_u * dot_u);
    e[e_at] = e_val;
    g[g_at] = g_val;

    let ef = f32::cast_from(e_val);
    let silu = ef / (1.0f32 + f32::exp(-ef));
    h[n * h.stride(0) + i * h.stride(1)] = F::cast_from(silu * f32::cast_from(g_val));
}

/// Launches kernel 1 (see the module docs for the math).
///
/// - `e0`, `g0`: `[N, I]`, the base GEMM results; overwritten with `e` and `g` (copied first if
///   their buffers are shared, so no other tensor sees the write).
/// - `xa_g`, `xa_u`: `[N, r_g]`, `[N, r_u]`; `b_g`, `b_u`: `[I, r_g]`, `[I, r_u]`.
/// - `h`: `[N, I]`, the output buffer (any contents; every element is written).
///
/// Returns `e`, `g`, `h`.
///
/// # Panics
/// On mismatched shapes, dtypes or devices.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: CubeRuntime>(
    e0: CubeTensor<R>,
    g0: CubeTensor<R>,
    xa_g: CubeTensor<R>,
    b_g: CubeTensor<R>,
    s_g: f32,
    xa_u: CubeTensor<R>,
    b_u: CubeTensor<R>,
    s_u: f32,
    h: CubeTensor<R>,
) -> SwigluLoraForward<CubeTensor<R>> {
    let [n, i] = check_matrix("e0", &e0, None, None);
    check_matrix("g0", &g0, Some(n), Some(i));
    check_matrix("h", &h, Some(n), Some(i));
    let [_, r_g] = check_matrix("xa_g", &xa_g, Some(n), None);
    check_matrix("b_g", &b_g, Some(i), Some(r_g));
    let [_, r_u] = check_matrix("xa_u", &xa_u, Some(n), None);
    check_matrix("b_u", &b_u, Some(i), Some(r_u));
    for (name, t) in [
        ("g0", &g0),
        ("h", &h),
        ("xa_g", &xa_g),
        ("b_g", &b_g),
        ("xa_u", &xa_u),
        ("b_u", &b_u),
    ] {
        assert_eq!(
            t.dtype, e0.dtype,
            "swiglu_lora_forward: `{name}` dtype differs from e0's"
        );
        e0.assert_is_on_same_device(t);
    }

    let (e, g, h) = (exclusive(e0), exclusive(g0), exclusive(h));
    if let Some((client, cube_count, cube_dim)) = elementwise_launch(&h, n * i) {
        swiglu_lora_forward_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type(&[&e, &g, &h, &xa_g, &b_g, &xa_u, &b_u]),
            e.clone().into_tensor_arg(),
            g.clone().into_tensor_arg(),
            h.clone().into_tensor_arg(),
            xa_g.into_tensor_arg(),
            b_g.into_tensor_arg(),
            xa_u.into_tensor_arg(),
            b_u.into_tensor_arg(),
            s_g,
            s_u,
            e.dtype.into(),
        );
    }
    SwigluLoraForward { e, g, h }
}
