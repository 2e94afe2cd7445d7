//! Kernel 1 with the gate and up LoRA terms folded in: from the base projections `e = x·W_gᵀ`,
//! `g = x·W_uᵀ` and the rank-r factors `xa_g = x·A_gᵀ`, `xa_u = x·A_uᵀ`,
//!
//! ```text
//! e'[n,i] = e[n,i] + s_g · Σ_k xa_g[n,k] · B_g[i,k]
//! g'[n,i] = g[n,i] + s_u · Σ_k xa_u[n,k] · B_u[i,k]
//! h[n,i]  = silu(e'[n,i]) · g'[n,i],   silu(e) = e · σ(e)
//! ```
//!
//! in one pass over `[N, I]`, in f32 whatever the storage type `F` is. The LoRA terms never
//! touch memory (see [`super::rank_r_term`]); the unfolded form instead writes `s·xa·Bᵀ` as an
//! `[N, I]` product and lets the base GEMM accumulate onto it, two passes over `[N, I]` per
//! projection. The backward kernel recomputes `e'`, `g'` and `h` with the same arithmetic in the
//! same order, so the recomputed `h` is this `h`.

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::rank_r_term::{
    CUBE_X, ROWS_IN_FLIGHT, TILE_ROWS, check_factor, column_factors, folded_cubes, folded_width,
    rank_dot, stage_row_factors,
};
use super::{address_type, check_matrix, row_vector_size};
use crate::op::FoldedLora;

/// A cube per [`TILE_ROWS`] rows × [`CUBE_X`] column vectors; a unit per column vector, looping
/// over the tile's rows [`ROWS_IN_FLIGHT`] at a time (loads first, then the math).
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn lora_swiglu_forward_kernel<F: Float, N: Size>(
    e: &Tensor<Vector<F, N>>,
    g: &Tensor<Vector<F, N>>,
    xa_g: &Tensor<F>,
    xa_u: &Tensor<F>,
    b_g: &Tensor<F>,
    b_u: &Tensor<F>,
    h: &mut Tensor<Vector<F, N>>,
    s_g: f32,
    s_u: f32,
    #[comptime] rank_g: usize,
    #[comptime] rank_u: usize,
    #[define(F)] _dtype: StorageType,
) {
    let width = h.vector_size();
    let rows = h.shape(0);
    let cols = h.shape(1);
    let vectors = cols / width;
    let row0 = CUBE_POS_Y as usize * TILE_ROWS;
    let staged_g = stage_row_factors(xa_g, s_g, row0, rank_g);
    let staged_u = stage_row_factors(xa_u, s_u, row0, rank_u);
    sync_cube();

    let j = ABSOLUTE_POS_X as usize;
    if j >= vectors {
        terminate!();
    }
    let bg = column_factors(
        b_g,
        j * width,
        cols,
        b_g.stride(0),
        b_g.stride(1),
        width,
        rank_g,
    );
    let bu = column_factors(
        b_u,
        j * width,
        cols,
        b_u.stride(0),
        b_u.stride(1),
        width,
        rank_u,
    );

    let end = min(rows - row0, TILE_ROWS);
    let mut m = 0;
    while m < end {
        let mut ev = Array::<Vector<F, N>>::new(ROWS_IN_FLIGHT);
        let mut gv = Array::<Vector<F, N>>::new(ROWS_IN_FLIGHT);
        #[unroll]
        for u in 0..ROWS_IN_FLIGHT {
            // Rows past the tile's end reload its last row; their results are not stored.
            let n = row0 + min(m + u, end - 1);
            ev[u] = e[n * e.stride(0) / width + j];
            gv[u] = g[n * g.stride(0) / width + j];
        }
        #[unroll]
        for u in 0..ROWS_IN_FLIGHT {
            if m + u < end {
                let mut ef: Vector<f32, N> = Vector::cast_from(ev[u]);
                let mut gf: Vector<f32, N> = Vector::cast_from(gv[u]);
                #[unroll]
                for c in 0..width {
                    ef[c] += rank_dot(&staged_g, m + u, &bg, c, rank_g);
                    gf[c] += rank_dot(&staged_u, m + u, &bu, c, rank_u);
                }
                let one = Vector::new(1.0f32);
                let silu = ef / (one + Vector::exp(Vector::new(0.0f32) - ef));
                let n = row0 + m + u;
                h[n * h.stride(0) / width + j] = Vector::cast_from(silu * gf);
            }
        }
        m += ROWS_IN_FLIGHT;
    }
}

/// Launches the folded kernel 1: `h = silu(e')·g'` (see the module docs) into a new `[N, I]`.
///
/// - `e`, `g`: `[N, I]` base projections, stored row by row (read only).
/// - `lora`: the gate and up factors (`xa` `[N, r]`, `B` `[I, r]`, ranks up to
///   [`super::rank_r_term::MAX_FOLDED_RANK`]).
///
/// # Panics
/// On mismatched shapes, dtypes or devices, a rank out of range, or `e`/`g` not stored row by
/// row.
pub fn launch<R: CubeRuntime>(
    e: &CubeTensor<R>,
    g: &CubeTensor<R>,
    lora: &FoldedLora<CubeTensor<R>>,
) -> CubeTensor<R> {
    let [n, i] = check_matrix("e", e, None, None);
    check_matrix("g", g, Some(n), Some(i));
    assert_eq!(
        g.dtype, e.dtype,
        "lora_swiglu_forward: `g` dtype differs from e's"
    );
    e.assert_is_on_same_device(g);
    let rank_g = check_factor("xa_g", &lora.gate.xa, n, e);
    let rank_u = check_factor("xa_u", &lora.up.xa, n, e);
    check_matrix("B_g", &lora.gate.b, Some(i), Some(rank_g));
    check_matrix("B_u", &lora.up.b, Some(i), Some(rank_u));
    let h = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        e.client.clone(),
        e.device.clone(),
        [n, i].into(),
        e.dtype,
    );
    let row_width = row_vector_size(&[e, g, &h])
        .expect("lora_swiglu_forward: e and g must be stored row by row");
    let width = folded_width(rank_g + rank_u, row_width);
    if n == 0 || i == 0 {
        return h;
    }
    let address = address_type(&[e, g, &h, &lora.gate.xa, &lora.up.xa]);
    lora_swiglu_forward_kernel::launch::<R>(
        &e.client,
        folded_cubes(n, i / width),
        CubeDim::new_1d(CUBE_X),
        address,
        width,
        e.clone().into_tensor_arg(),
        g.clone().into_tensor_arg(),
        lora.gate.xa.clone().into_tensor_arg(),
        lora.up.xa.clone().into_tensor_arg(),
        lora.gate.b.clone().into_tensor_arg(),
        lora.up.b.clone().into_tensor_arg(),
        h.clone().into_tensor_arg(),
        lora.gate.scaling as f32,
        lora.up.scaling as f32,
        rank_g,
        rank_u,
        e.dtype.into(),
    );
    h
}
