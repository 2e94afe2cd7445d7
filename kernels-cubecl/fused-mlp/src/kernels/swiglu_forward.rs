//! Kernel 1 of the fused LoRA SwiGLU MLP: the SwiGLU of the gate and up projections,
//!
//! ```text
//! h[n,i] = silu(e[n,i]) · g[n,i],   silu(e) = e · σ(e)
//! ```
//!
//! in one pass over `[N, I]`, in f32 whatever the storage type `F` is (bf16 on GPUs). `e` and
//! `g` arrive complete, LoRA terms included: the rank-r products `s·(x·Aᵀ)·Bᵀ` are β-accumulated
//! into the base GEMMs' outputs by the GEMM provider. (A first version added them here as
//! length-r dots per element; on the H200 that took 2.7 ms at 8192 × 8192, r = 16, against
//! ~0.1 ms for the two rank-r GEMMs: 64 scalar loads per element, B's rows read uncoalesced. A
//! tiled second version, measured on the H100 in session 15 — each cube's `x·Aᵀ` rows staged in
//! shared memory, each unit's `B` rows in registers — took 0.39 ms here and 0.79 ms in kernel 2
//! with the down projection's term too, against 0.17 + 0.19 ms and 0.31 + 0.07 ms for the plain
//! kernels plus the passes the rank-r GEMMs spend on the terms: 32–48 FMAs and the factor loads
//! per element put these memory-bound kernels past their instruction budget. BENCHMARKS.md,
//! session 15.)
//! The backward kernel recomputes exactly this `h` from the stored `e` and `g`.

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{RowStrides3, address_type, check_matrix, elementwise_launch, row_vector_size};

/// One unit per `(n, i)`, bounds-checked against `h`'s shape (ragged `N` and `I` are fine).
/// Every tensor is indexed through its own strides.
#[cube(launch, address_type = "dynamic")]
fn swiglu_forward_kernel<F: Float>(
    e: &Tensor<F>,
    g: &Tensor<F>,
    h: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let cols = h.shape(1);
    if ABSOLUTE_POS >= h.shape(0) * cols {
        terminate!();
    }
    let n = ABSOLUTE_POS / cols;
    let i = ABSOLUTE_POS % cols;
    let ef = f32::cast_from(e[n * e.stride(0) + i * e.stride(1)]);
    let gf = f32::cast_from(g[n * g.stride(0) + i * g.stride(1)]);
    let silu = ef / (1.0f32 + f32::exp(-ef));
    h[n * h.stride(0) + i * h.stride(1)] = F::cast_from(silu * gf);
}

/// The same math for tensors stored row by row (column stride 1), one unit per vector of `N`
/// elements of a row: a bf16 unit loads 16 bytes at once where the scalar kernel above loads 2
/// (that kernel moved ≈ 1 TB/s on the H200: 0.40 ms at 8192 × 8192 in bf16).
/// Arrays and scalar row strides rather than tensors: a tensor's shape and strides reach a
/// CUDA kernel through a host-to-device copy queued before each launch, scalars as launch
/// parameters.
#[cube(launch, address_type = "dynamic")]
fn swiglu_forward_rows_kernel<F: Float, N: Size>(
    e: &Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    h: &mut Array<Vector<F, N>>,
    rows: usize,
    cols: usize,
    row_strides: RowStrides3,
    #[define(F)] _dtype: StorageType,
) {
    let width = h.vector_size();
    let row_vectors = cols / width;
    if ABSOLUTE_POS >= rows * row_vectors {
        terminate!();
    }
    let n = ABSOLUTE_POS / row_vectors;
    let j = ABSOLUTE_POS % row_vectors;
    let ef: Vector<f32, N> = Vector::cast_from(e[n * row_strides.first / width + j]);
    let gf: Vector<f32, N> = Vector::cast_from(g[n * row_strides.second / width + j]);
    let one = Vector::new(1.0f32);
    let silu = ef / (one + Vector::exp(Vector::new(0.0f32) - ef));
    h[n * row_strides.third / width + j] = Vector::cast_from(silu * gf);
}

/// Launches kernel 1: `h = silu(e)·g` into `h`.
///
/// - `e`, `g`: `[N, I]`, the gate and up projections (read only).
/// - `h`: `[N, I]`, the output buffer (any contents; every element is written).
///
/// Returns `h`.
///
/// # Panics
/// On mismatched shapes, dtypes or devices.
pub fn launch<R: CubeRuntime>(
    e: &CubeTensor<R>,
    g: &CubeTensor<R>,
    h: CubeTensor<R>,
) -> CubeTensor<R> {
    let [n, i] = check_matrix("e", e, None, None);
    check_matrix("g", g, Some(n), Some(i));
    check_matrix("h", &h, Some(n), Some(i));
    for (name, t) in [("g", g), ("h", &h)] {
        assert_eq!(
            t.dtype, e.dtype,
            "swiglu_forward: `{name}` dtype differs from e's"
        );
        e.assert_is_on_same_device(t);
    }
    if let Some(width) = row_vector_size(&[e, g, &h]) {
        if let Some((client, cube_count, cube_dim)) = elementwise_launch(&h, n * i / width) {
            swiglu_forward_rows_kernel::launch::<R>(
                &client,
                cube_count,
                cube_dim,
                address_type(&[e, g, &h]),
                width,
                e.clone().into_array_arg(),
                g.clone().into_array_arg(),
                h.clone().into_array_arg(),
                n,
                i,
                RowStrides3::of([e, g, &h]),
                e.dtype.into(),
            );
        }
    } else if let Some((client, cube_count, cube_dim)) = elementwise_launch(&h, n * i) {
        swiglu_forward_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type(&[e, g, &h]),
            e.clone().into_tensor_arg(),
            g.clone().into_tensor_arg(),
            h.clone().into_tensor_arg(),
            e.dtype.into(),
        );
    }
    h
}
