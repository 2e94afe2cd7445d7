//! Kernel 2 with the LoRA terms folded in: from the base products `δh₀ = G·W_d`, `e = x·W_gᵀ`,
//! `g = x·W_uᵀ` and the rank-r factors `xa_g`, `xa_u` (saved by the forward) and `gb = G·B_d`,
//! for every row `n` and intermediate column `i`:
//!
//! ```text
//! e'  = e  + s_g · Σ_k xa_g[n,k] · B_g[i,k]       (the forward's e', same arithmetic)
//! g'  = g  + s_u · Σ_k xa_u[n,k] · B_u[i,k]
//! δh  = δh₀ + s_d · Σ_k gb[n,k] · A_d[k,i]         (δh = G·W_d + s_d·(G·B_d)·A_d)
//! σ = sigmoid(e'),  silu = e' · σ
//! h  = silu · g'                                  (written over δh₀)
//! δg = δh · silu                                  (written over g)
//! δe = δh · g' · σ · (1 + e' · (1 − σ))            (written over e)
//! ```
//!
//! All in f32 whatever the storage type `F` is; the LoRA terms never touch memory (see
//! [`super::rank_r_term`]), where the unfolded form spends a pass over `[N, I]` on
//! `s_d·(G·B_d)·A_d` and, in the forward, two on the gate and up terms.

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::rank_r_term::{
    CUBE_X, ROWS_IN_FLIGHT, TILE_ROWS, check_factor, column_factors, folded_cubes, folded_width,
    rank_dot, stage_row_factors,
};
use super::{address_type, check_matrix, exclusive, row_vector_size};
use crate::SwigluLoraBackward;
use crate::op::{DownLoraTerm, FoldedLora};

/// The layout of the folded kernel 1: a cube per [`TILE_ROWS`] rows × [`CUBE_X`] column vectors,
/// a unit per column vector, [`ROWS_IN_FLIGHT`] rows loaded before the math.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn lora_swiglu_backward_kernel<F: Float, N: Size>(
    dh: &mut Tensor<Vector<F, N>>,
    e: &mut Tensor<Vector<F, N>>,
    g: &mut Tensor<Vector<F, N>>,
    xa_g: &Tensor<F>,
    xa_u: &Tensor<F>,
    gb_d: &Tensor<F>,
    b_g: &Tensor<F>,
    b_u: &Tensor<F>,
    a_d: &Tensor<F>,
    s_g: f32,
    s_u: f32,
    s_d: f32,
    #[comptime] rank_g: usize,
    #[comptime] rank_u: usize,
    #[comptime] rank_d: usize,
    #[define(F)] _dtype: StorageType,
) {
    let width = dh.vector_size();
    let rows = dh.shape(0);
    let cols = dh.shape(1);
    let vectors = cols / width;
    let row0 = CUBE_POS_Y as usize * TILE_ROWS;
    let staged_g = stage_row_factors(xa_g, s_g, row0, rank_g);
    let staged_u = stage_row_factors(xa_u, s_u, row0, rank_u);
    let staged_d = stage_row_factors(gb_d, s_d, row0, rank_d);
    sync_cube();

    let j = ABSOLUTE_POS_X as usize;
    if j >= vectors {
        terminate!();
    }
    let first = j * width;
    let bg = column_factors(
        b_g,
        first,
        cols,
        b_g.stride(0),
        b_g.stride(1),
        width,
        rank_g,
    );
    let bu = column_factors(
        b_u,
        first,
        cols,
        b_u.stride(0),
        b_u.stride(1),
        width,
        rank_u,
    );
    // A_d is [r, I]: column i of the term is A_d's column i.
    let ad = column_factors(
        a_d,
        first,
        cols,
        a_d.stride(1),
        a_d.stride(0),
        width,
        rank_d,
    );

    let end = min(rows - row0, TILE_ROWS);
    let mut m = 0;
    while m < end {
        let mut dhv = Array::<Vector<F, N>>::new(ROWS_IN_FLIGHT);
        let mut ev = Array::<Vector<F, N>>::new(ROWS_IN_FLIGHT);
        let mut gv = Array::<Vector<F, N>>::new(ROWS_IN_FLIGHT);
        #[unroll]
        for u in 0..ROWS_IN_FLIGHT {
            // Rows past the tile's end reload its last row; their results are not stored.
            let n = row0 + min(m + u, end - 1);
            dhv[u] = dh[n * dh.stride(0) / width + j];
            ev[u] = e[n * e.stride(0) / width + j];
            gv[u] = g[n * g.stride(0) / width + j];
        }
        #[unroll]
        for u in 0..ROWS_IN_FLIGHT {
            if m + u < end {
                let mut dhf: Vector<f32, N> = Vector::cast_from(dhv[u]);
                let mut ef: Vector<f32, N> = Vector::cast_from(ev[u]);
                let mut gf: Vector<f32, N> = Vector::cast_from(gv[u]);
                #[unroll]
                for c in 0..width {
                    ef[c] += rank_dot(&staged_g, m + u, &bg, c, rank_g);
                    gf[c] += rank_dot(&staged_u, m + u, &bu, c, rank_u);
                    dhf[c] += rank_dot(&staged_d, m + u, &ad, c, rank_d);
                }
                let one = Vector::new(1.0f32);
                let sig = one / (one + Vector::exp(Vector::new(0.0f32) - ef));
                let silu = ef * sig;
                let n = row0 + m + u;
                dh[n * dh.stride(0) / width + j] = Vector::cast_from(silu * gf);
                g[n * g.stride(0) / width + j] = Vector::cast_from(dhf * silu);
                e[n * e.stride(0) / width + j] =
                    Vector::cast_from(dhf * gf * sig * (one + ef * (one - sig)));
            }
        }
        m += ROWS_IN_FLIGHT;
    }
}

/// Launches the folded kernel 2 (see the module docs for the math).
///
/// - `dh`: `[N, I]`, `δh₀ = G·W_d`; overwritten with `h`.
/// - `e`, `g`: `[N, I]`, the forward's base projections; overwritten with `δe` and `δg`.
/// - `lora`: the gate and up factors the forward folded in; `down`: `G·B_d` `[N, r_d]`, `A_d`
///   `[r_d, I]` and `s_d`.
///
/// All three `[N, I]` buffers must be stored row by row; one shared with another tensor is
/// copied before it is written. Returns `h`, `δe`, `δg`.
///
/// # Panics
/// On mismatched shapes, dtypes or devices, a rank out of range, or an `[N, I]` operand not
/// stored row by row.
pub fn launch<R: CubeRuntime>(
    dh: CubeTensor<R>,
    e: CubeTensor<R>,
    g: CubeTensor<R>,
    lora: &FoldedLora<CubeTensor<R>>,
    down: &DownLoraTerm<CubeTensor<R>>,
) -> SwigluLoraBackward<CubeTensor<R>> {
    let [n, i] = check_matrix("dh", &dh, None, None);
    check_matrix("e", &e, Some(n), Some(i));
    check_matrix("g", &g, Some(n), Some(i));
    for (name, t) in [("e", &e), ("g", &g)] {
        assert_eq!(
            t.dtype, dh.dtype,
            "lora_swiglu_backward: `{name}` dtype differs from dh's"
        );
        dh.assert_is_on_same_device(t);
    }
    let rank_g = check_factor("xa_g", &lora.gate.xa, n, &dh);
    let rank_u = check_factor("xa_u", &lora.up.xa, n, &dh);
    let rank_d = check_factor("G·B_d", &down.gb, n, &dh);
    check_matrix("B_g", &lora.gate.b, Some(i), Some(rank_g));
    check_matrix("B_u", &lora.up.b, Some(i), Some(rank_u));
    check_matrix("A_d", &down.a, Some(rank_d), Some(i));

    let (dh, e, g) = (exclusive(dh), exclusive(e), exclusive(g));
    let row_width = row_vector_size(&[&dh, &e, &g])
        .expect("lora_swiglu_backward: dh, e and g must be stored row by row");
    let width = folded_width(rank_g + rank_u + rank_d, row_width);
    if n > 0 && i > 0 {
        let address = address_type(&[&dh, &e, &g, &lora.gate.xa, &lora.up.xa, &down.gb]);
        lora_swiglu_backward_kernel::launch::<R>(
            &dh.client,
            folded_cubes(n, i / width),
            CubeDim::new_1d(CUBE_X),
            address,
            width,
            dh.clone().into_tensor_arg(),
            e.clone().into_tensor_arg(),
            g.clone().into_tensor_arg(),
            lora.gate.xa.clone().into_tensor_arg(),
            lora.up.xa.clone().into_tensor_arg(),
            down.gb.clone().into_tensor_arg(),
            lora.gate.b.clone().into_tensor_arg(),
            lora.up.b.clone().into_tensor_arg(),
            down.a.clone().into_tensor_arg(),
            lora.gate.scaling as f32,
            lora.up.scaling as f32,
            down.scaling as f32,
            rank_g,
            rank_u,
            rank_d,
            dh.dtype.into(),
        );
    }
    SwigluLoraBackward {
        h: dh,
        de: e,
        dg: g,
    }
}
