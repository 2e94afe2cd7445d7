//! Kernel 2 of the fused LoRA SwiGLU MLP: the SwiGLU backward, in place over `[N, I]`.
//!
//! With `δh = dL/dh` (from `G·W_d + s_d·(G·B_d)·A_d`) and the saved `e`, `g`, for every row `n`
//! and intermediate column `i`:
//!
//! ```text
//! σ  = sigmoid(e),  silu = e · σ
//! h  = silu · g                                 (written over δh: the down projection's grads need it)
//! δg = δh · silu                                (written over g)
//! δe = δh · g · σ · (1 + e · (1 − σ))           (written over e;  silu'(e) = σ·(1 + e·(1 − σ)))
//! ```
//!
//! All of it runs in f32 whatever the storage type `F` is. `h` is computed exactly as kernel 1
//! computed it, so the recomputed `h` equals the forward's.

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{
    RowStrides3, address_type, check_matrix, elementwise_launch, exclusive, row_vector_size,
};
use crate::SwigluLoraBackward;

/// One unit per `(n, i)`, bounds-checked against `dh`'s shape (ragged `N` and `I` are fine).
/// Every tensor is indexed through its own strides.
#[cube(launch, address_type = "dynamic")]
fn swiglu_lora_backward_kernel<F: Float>(
    dh: &mut Tensor<F>,
    e: &mut Tensor<F>,
    g: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let cols = dh.shape(1);
    if ABSOLUTE_POS >= dh.shape(0) * cols {
        terminate!();
    }
    let n = ABSOLUTE_POS / cols;
    let i = ABSOLUTE_POS % cols;

    let dh_at = n * dh.stride(0) + i * dh.stride(1);
    let e_at = n * e.stride(0) + i * e.stride(1);
    let g_at = n * g.stride(0) + i * g.stride(1);
    let dhf = f32::cast_from(dh[dh_at]);
    let ef = f32::cast_from(e[e_at]);
    let gf = f32::cast_from(g[g_at]);

    let sig = 1.0f32 / (1.0f32 + f32::exp(-ef));
    let silu = ef * sig;
    dh[dh_at] = F::cast_from(silu * gf);
    g[g_at] = F::cast_from(dhf * silu);
    e[e_at] = F::cast_from(dhf * gf * sig * (1.0f32 + ef * (1.0f32 - sig)));
}

/// The same math for tensors stored row by row (column stride 1), one unit per vector of `N`
/// elements of a row (see kernel 1's vector form for why).
/// Arrays and scalar row strides rather than tensors, as kernel 1's vector form.
#[cube(launch, address_type = "dynamic")]
fn swiglu_lora_backward_rows_kernel<F: Float, N: Size>(
    dh: &mut Array<Vector<F, N>>,
    e: &mut Array<Vector<F, N>>,
    g: &mut Array<Vector<F, N>>,
    rows: usize,
    cols: usize,
    row_strides: RowStrides3,
    #[define(F)] _dtype: StorageType,
) {
    let width = dh.vector_size();
    let row_vectors = cols / width;
    if ABSOLUTE_POS >= rows * row_vectors {
        terminate!();
    }
    let n = ABSOLUTE_POS / row_vectors;
    let j = ABSOLUTE_POS % row_vectors;

    let dh_at = n * row_strides.first / width + j;
    let e_at = n * row_strides.second / width + j;
    let g_at = n * row_strides.third / width + j;
    let dhf: Vector<f32, N> = Vector::cast_from(dh[dh_at]);
    let ef: Vector<f32, N> = Vector::cast_from(e[e_at]);
    let gf: Vector<f32, N> = Vector::cast_from(g[g_at]);

    let one = Vector::new(1.0f32);
    let sig = one / (one + Vector::exp(Vector::new(0.0f32) - ef));
    let silu = ef * sig;
    dh[dh_at] = Vector::cast_from(silu * gf);
    g[g_at] = Vector::cast_from(dhf * silu);
    e[e_at] = Vector::cast_from(dhf * gf * sig * (one + ef * (one - sig)));
}

/// Launches kernel 2 (see the module docs for the math).
///
/// - `dh`: `[N, I]`, `δh`; overwritten with `h`.
/// - `e`, `g`: `[N, I]`, the forward's saved `e` and `g`; overwritten with `δe` and `δg`.
///
/// A buffer shared with another tensor is copied before it is written, so no other tensor sees
/// the write. Returns `h`, `δe`, `δg`.
///
/// # Panics
/// On mismatched shapes, dtypes or devices.
pub fn launch<R: CubeRuntime>(
    dh: CubeTensor<R>,
    e: CubeTensor<R>,
    g: CubeTensor<R>,
) -> SwigluLoraBackward<CubeTensor<R>> {
    let [n, i] = check_matrix("dh", &dh, None, None);
    check_matrix("e", &e, Some(n), Some(i));
    check_matrix("g", &g, Some(n), Some(i));
    for (name, t) in [("e", &e), ("g", &g)] {
        assert_eq!(
            t.dtype, dh.dtype,
            "swiglu_lora_backward: `{name}` dtype differs from dh's"
        );
        dh.assert_is_on_same_device(t);
    }

    let (dh, e, g) = (exclusive(dh), exclusive(e), exclusive(g));
    if let Some(width) = row_vector_size(&[&dh, &e, &g]) {
        if let Some((client, cube_count, cube_dim)) = elementwise_launch(&dh, n * i / width) {
            swiglu_lora_backward_rows_kernel::launch::<R>(
                &client,
                cube_count,
                cube_dim,
                address_type(&[&dh, &e, &g]),
                width,
                dh.clone().into_array_arg(),
                e.clone().into_array_arg(),
                g.clone().into_array_arg(),
                n,
                i,
                RowStrides3::of([&dh, &e, &g]),
                dh.dtype.into(),
            );
        }
    } else if let Some((client, cube_count, cube_dim)) = elementwise_launch(&dh, n * i) {
        swiglu_lora_backward_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type(&[&dh, &e, &g]),
            dh.clone().into_tensor_arg(),
            e.clone().into_tensor_arg(),
            g.clone().into_tensor_arg(),
            dh.dtype.into(),
        );
    }
    SwigluLoraBackward {
        h: dh,
        de: e,
        dg: g,
    }
}
