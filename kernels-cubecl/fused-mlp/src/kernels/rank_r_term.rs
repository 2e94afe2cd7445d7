//! A LoRA term `s·(u·vᵀ)[n, i] = s·Σ_k u[n, k]·v[i, k]` evaluated per element inside an
//! elementwise kernel over `[N, I]`, for a small rank `r` (the `k` range), so it never costs a
//! pass over an `[N, I]` buffer of its own.
//!
//! The layout that makes this cheap: a cube covers [`TILE_ROWS`] rows and `CUBE_X` column
//! vectors. Its `u` rows are staged once in shared memory, scaled by `s`, in f32; every unit then
//! reads the same row at the same time (a broadcast, no bank conflicts). Each unit keeps the `v`
//! rows of its own columns in registers for the whole tile, loaded once. Per element the term is
//! `r` register FMAs with no memory traffic. (A first version without tiles read `v` from global
//! memory per element: 64 scalar loads an element, 2.7 ms at 8192 × 8192 on the H200.)

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Rows of `[N, I]` one cube covers: the `v` registers are loaded once per cube, so more rows
/// amortise them better; fewer give more cubes for short `N`.
pub const TILE_ROWS: usize = 64;

/// Rows each unit loads before it computes on them, so that several loads per unit are in
/// flight (the kernels are bound by memory, and each unit holds few bytes per row).
pub const ROWS_IN_FLIGHT: usize = 4;

/// Units per cube, along the columns.
pub const CUBE_X: u32 = 256;

/// The largest rank the kernels fold in: above it the per-unit registers (`width · Σ r` floats)
/// would spill, and the rank-r GEMMs take the term instead.
pub const MAX_FOLDED_RANK: usize = 32;

/// `v` factors a unit may hold in registers (all the kernel's terms together): the vector
/// width is chosen so that `width · Σ r` stays within it.
const REGISTER_FACTORS: usize = 64;

/// Stages `s·u[row0 + m, k]` for `m < TILE_ROWS`, `k < rank` in shared memory (f32, index
/// `m·rank + k`); rows past the end of `u` are zeros. Every unit of the cube takes part; the
/// caller syncs before reading.
#[cube]
pub(super) fn stage_row_factors<F: Float>(
    u: &Tensor<F>,
    scale: f32,
    row0: usize,
    #[comptime] rank: usize,
) -> SharedMemory<f32> {
    let mut staged = SharedMemory::<f32>::new(TILE_ROWS * rank);
    let rows = u.shape(0);
    let mut at = UNIT_POS_X as usize;
    while at < TILE_ROWS * rank {
        let n = row0 + at / rank;
        let k = at % rank;
        let mut value = 0.0f32;
        if n < rows {
            value = f32::cast_from(u[n * u.stride(0) + k * u.stride(1)]) * scale;
        }
        staged[at] = value;
        at += CUBE_DIM_X as usize;
    }
    staged
}

/// `v[first + c, k]` for `c < width`, `k < rank` in registers (index `c·rank + k`), where
/// `v[i, k]` is at `i·col_stride + k·rank_stride` (`B` `[I, r]` and `A` `[r, I]` alike); columns
/// at or past `cols` are zeros.
#[cube]
pub(super) fn column_factors<F: Float>(
    v: &Tensor<F>,
    first: usize,
    cols: usize,
    col_stride: usize,
    rank_stride: usize,
    #[comptime] width: usize,
    #[comptime] rank: usize,
) -> Array<f32> {
    let mut regs = Array::<f32>::new(width * rank);
    #[unroll]
    for c in 0..width {
        let i = first + c;
        #[unroll]
        for k in 0..rank {
            let mut value = 0.0f32;
            if i < cols {
                value = f32::cast_from(v[i * col_stride + k * rank_stride]);
            }
            regs[c * rank + k] = value;
        }
    }
    regs
}

/// `Σ_k staged[m·rank + k] · regs[c·rank + k]`: the term at tile row `m`, column `c` of the
/// unit's vector.
#[cube]
pub(super) fn rank_dot(
    staged: &SharedMemory<f32>,
    m: usize,
    regs: &Array<f32>,
    #[comptime] c: usize,
    #[comptime] rank: usize,
) -> f32 {
    let mut sum = 0.0f32;
    #[unroll]
    for k in 0..rank {
        sum += staged[m * rank + k] * regs[c * rank + k];
    }
    sum
}

/// Whether the kernels fold terms of these ranks in (each at most [`MAX_FOLDED_RANK`]).
pub fn folds(ranks: &[usize]) -> bool {
    if std::env::var_os("FASTLORA_NO_FOLD").is_some() {
        return false;
    }
    ranks.iter().all(|&r| (1..=MAX_FOLDED_RANK).contains(&r))
}

/// The vector width for terms of total rank `ranks`: the widest power of two that divides
/// `row_width` (the widest the rows allow) and keeps `width · ranks` within the register budget;
/// at least 1.
pub(super) fn folded_width(ranks: usize, row_width: usize) -> usize {
    let budget = std::env::var("FASTLORA_FOLD_REGISTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(REGISTER_FACTORS);
    let mut width = row_width.max(1);
    while width > 1 && width * ranks > budget {
        width /= 2;
    }
    width
}

/// Cube count for a folded kernel over `[rows, vectors]` (vectors of the chosen width).
pub(super) fn folded_cubes(rows: usize, vectors: usize) -> CubeCount {
    CubeCount::Static(
        vectors.div_ceil(CUBE_X as usize) as u32,
        rows.div_ceil(TILE_ROWS) as u32,
        1,
    )
}

/// Checks a `[rows, rank]` row-factor matrix (`x·Aᵀ`) against the elementwise operands.
pub(super) fn check_factor<R: CubeRuntime>(
    name: &str,
    factor: &CubeTensor<R>,
    rows: usize,
    reference: &CubeTensor<R>,
) -> usize {
    let [r, k] = super::check_matrix(name, factor, Some(rows), None);
    debug_assert_eq!(r, rows);
    assert_eq!(factor.dtype, reference.dtype, "`{name}` dtype differs");
    reference.assert_is_on_same_device(factor);
    assert!(
        (1..=MAX_FOLDED_RANK).contains(&k),
        "`{name}` has rank {k}; the folded kernels take 1..={MAX_FOLDED_RANK}"
    );
    k
}
