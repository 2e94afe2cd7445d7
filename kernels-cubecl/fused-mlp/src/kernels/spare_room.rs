//! Base weights with spare room beside them, and the kernel that writes a LoRA factor there:
//!
//! ```text
//! W⁺[i, d + j] = B[i, j - at]   for at ≤ j < at + r       (spare columns: [W | B])
//! W⁺[d + i, j] = A[i - at, j]   for at ≤ i < at + r       (spare rows:    [W ; A])
//! ```
//!
//! and zeros in the rest of the block written. A projection's output `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` is
//! one GEMM over a longer inner dimension, `[x | s·x·Aᵀ]·[W | B]ᵀ`, when `W`'s rows have room for
//! `B` beside them, and its input gradient `G·W + s·(G·B)·A` is `[G | s·G·B]·[W ; A]` when
//! there is room for `A` below: the LoRA term then costs `r` more steps of the GEMM's inner
//! dimension (under 1 % at r = 16, D = 2048) instead of a rank-r product written over the
//! output and read back by the base GEMM (a write and a read of `[N, I]` for each of gate and up
//! every forward and every recompute, and for the down projection's `δh`).
//!
//! The model loader gives such weights a buffer of `[d_out + spare_rows, d_in + spare_columns]`
//! and the model a `[d_out, d_in]` view of it ([`spare_view`]): row stride
//! `d_in + spare_columns`, over the buffer's whole range. [`spare_columns`] and [`spare_rows`]
//! recognise that signature: a view whose handle's range holds whole rows of its stride past
//! its last row. (A Burn slice's range ends at its last element, so a slice that narrows a wider
//! or taller matrix never shows room; a fresh tensor's range is its own rows, CUDA's row pitch
//! included, which nothing else reads.) The fused MLP writes its factors there before each
//! product that uses them.

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{address_type, check_matrix, elementwise_launch};

/// One unit per `(i, j)` of the `[rows, cols]` block at `(row0, col0)` of the whole buffer
/// `weight`: `factor[i − at_row, j − at_col]` where that is inside `factor`, else 0. Arrays and
/// scalar sizes rather than tensors: a tensor's shape and strides reach a CUDA kernel through a
/// host-to-device copy queued before each launch, scalars as launch parameters.
#[cube(launch, address_type = "dynamic")]
fn write_block_kernel<F: Float>(
    factor: &Array<F>,
    weight: &mut Array<F>,
    factor_layout: FactorLayout,
    weight_row_stride: usize,
    block: BlockPlace,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS >= block.units {
        terminate!();
    }
    let i = ABSOLUTE_POS / block.cols;
    let j = ABSOLUTE_POS % block.cols;
    let mut value = F::new(0.0);
    let inside_rows = i >= block.at_row && i < block.at_row + factor_layout.rows;
    if inside_rows && j >= block.at_col && j < block.at_col + factor_layout.cols {
        value = factor[(i - block.at_row) * factor_layout.row_stride
            + (j - block.at_col) * factor_layout.col_stride];
    }
    weight[(block.row0 + i) * weight_row_stride + block.col0 + j] = value;
}

/// A factor's shape and strides, passed to [`write_block_kernel`] by value.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct FactorLayout {
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// Where [`write_block_kernel`]'s block sits in the buffer and its factor in the block.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct BlockPlace {
    row0: usize,
    col0: usize,
    cols: usize,
    at_row: usize,
    at_col: usize,
    units: usize,
}

/// `[rows, cols, row_stride]` of a matrix stored row by row from the start of its handle's
/// range, else `None`.
fn unshifted_rows<R: CubeRuntime>(weight: &CubeTensor<R>) -> Option<[usize; 3]> {
    let (shape, strides) = (weight.meta.shape().as_slice(), weight.meta.strides());
    let ([rows, cols], 2) = (shape, strides.len()) else {
        return None;
    };
    let unshifted = weight.handle.offset_start.unwrap_or(0) == 0;
    (unshifted && strides[1] == 1 && strides[0] >= *cols).then_some([*rows, *cols, strides[0]])
}

/// Whole rows of `row_stride` elements in the range of `weight`'s handle. A Burn slice's range
/// ends at its last element, so a slice that narrows the columns or the rows of a larger
/// matrix never covers the room past its last row.
fn buffer_rows<R: CubeRuntime>(weight: &CubeTensor<R>, row_stride: usize) -> usize {
    weight.handle.size_in_used() as usize / (row_stride * weight.dtype.size()).max(1)
}

/// Spare columns past each row of `weight` that belong to its buffer alone (`row stride − d_in`
/// for a view made by [`spare_view`]), 0 for any other tensor.
pub fn spare_columns<R: CubeRuntime>(weight: &CubeTensor<R>) -> usize {
    match unshifted_rows(weight) {
        Some([rows, cols, stride]) if buffer_rows(weight, stride) >= rows => stride - cols,
        _ => 0,
    }
}

/// Spare rows below `weight` that belong to its buffer alone (full rows of its row stride, as
/// a [`spare_view`] has them), 0 for any other tensor.
pub fn spare_rows<R: CubeRuntime>(weight: &CubeTensor<R>) -> usize {
    match unshifted_rows(weight) {
        Some([rows, _, stride]) => buffer_rows(weight, stride).saturating_sub(rows),
        None => 0,
    }
}

/// The top-left `[rows, cols]` view of a matrix stored row by row in a buffer of its own
/// (`wide`, at least that large; CUDA may pitch its rows), which [`spare_columns`] and
/// [`spare_rows`] recognise; `None` for a matrix stored otherwise.
///
/// # Panics
/// If `wide` is not a matrix or is smaller than `[rows, cols]`.
pub fn spare_view<R: CubeRuntime>(
    wide: CubeTensor<R>,
    rows: usize,
    cols: usize,
) -> Option<CubeTensor<R>> {
    let [height, width] = check_matrix("wide", &wide, None, None);
    assert!(
        rows <= height && cols <= width,
        "a [{rows}, {cols}] view of a [{height}, {width}] buffer"
    );
    unshifted_rows(&wide)?;
    Some(reshaped(wide, rows, cols))
}

/// `t`'s buffer as a `[rows, cols]` matrix with `t`'s row stride (unit column stride).
fn reshaped<R: CubeRuntime>(mut t: CubeTensor<R>, rows: usize, cols: usize) -> CubeTensor<R> {
    let row_stride = t.meta.strides()[0];
    *t.meta.shape_mut() = [rows, cols].into();
    *t.meta.strides_mut() = [row_stride, 1].into();
    t
}

/// Writes `factor` at `(at_row, at_col)` of the `[rows, cols]` block at `(row0, col0)` of the
/// buffer of `weight`, zeros in the rest of the block.
fn write_block<R: CubeRuntime>(
    weight: &CubeTensor<R>,
    factor: &CubeTensor<R>,
    [row0, col0]: [usize; 2],
    [rows, cols]: [usize; 2],
    [at_row, at_col]: [usize; 2],
) {
    assert_eq!(weight.dtype, factor.dtype, "weight and factor dtypes");
    weight.assert_is_on_same_device(factor);
    let stride = weight.meta.strides()[0];
    let whole = reshaped(weight.clone(), buffer_rows(weight, stride), stride);
    if let Some((client, cube_count, cube_dim)) = elementwise_launch(weight, rows * cols) {
        write_block_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type(&[factor, &whole]),
            factor.clone().into_array_arg(),
            whole.into_array_arg(),
            {
                let (shape, st) = (factor.meta.shape(), factor.meta.strides());
                FactorLayoutLaunch::new(shape[0], shape[1], st[0], st[1])
            },
            stride,
            BlockPlaceLaunch::new(row0, col0, cols, at_row, at_col, rows * cols),
            weight.dtype.into(),
        );
    }
}

/// `x` (`[rows, d]`, at least `width` [spare columns](spare_columns)) seen as
/// `[rows, d + width]`, nothing written.
///
/// # Panics
/// If `x` has fewer than `width` spare columns.
pub fn with_spare_columns<R: CubeRuntime>(x: &CubeTensor<R>, width: usize) -> CubeTensor<R> {
    let [rows, d] = check_matrix("x", x, None, None);
    let spare = spare_columns(x);
    assert!(
        width <= spare,
        "{width} columns beside a matrix with {spare} spare columns"
    );
    reshaped(x.clone(), rows, d + width)
}

/// Writes `block` (`[rows, n]`) into columns `col0..col0 + n` of `out` (`[rows, ≥ col0 + n]`,
/// unit column stride, from the start of its buffer), in place whoever else holds the buffer.
///
/// # Panics
/// If the shapes, dtypes or devices disagree.
pub fn write_columns<R: CubeRuntime>(out: &CubeTensor<R>, block: &CubeTensor<R>, col0: usize) {
    let [rows, cols] = check_matrix("out", out, None, None);
    let [_, n] = check_matrix("block", block, Some(rows), None);
    assert!(col0 + n <= cols, "columns {col0}..{} of {cols}", col0 + n);
    write_block(out, block, [0, col0], [rows, n], [0, 0]);
}

/// `weight` (`[d_out, d_in]`, a [`spare_view`]) seen as `[d_out, d_in + width]`, after writing
/// `factor` (`[d_out, r]`) into its spare columns `at..at + r` and zeros into the rest of the
/// first `width`: `[W | 0 | B | 0]`.
///
/// # Panics
/// If `weight` has fewer than `width` spare columns, `at + r > width`, or the shapes, dtypes or
/// devices disagree.
pub fn widen<R: CubeRuntime>(
    weight: &CubeTensor<R>,
    factor: &CubeTensor<R>,
    at: usize,
    width: usize,
) -> CubeTensor<R> {
    let [rows, d] = check_matrix("weight", weight, None, None);
    let [_, r] = check_matrix("factor", factor, Some(rows), None);
    let spare = spare_columns(weight);
    assert!(
        width <= spare && at + r <= width,
        "LoRA factor of rank {r} at column {at} of {width}: the weight has {spare} spare columns"
    );
    write_block(weight, factor, [0, d], [rows, width], [0, at]);
    reshaped(weight.clone(), rows, d + width)
}

/// `weight` (`[d_out, d_in]`, a [`spare_view`]) seen as `[d_out + height, d_in]`, after writing
/// `factor` (`[r, d_in]`) into its spare rows `at..at + r` and zeros into the rest of the first
/// `height`: `[W ; 0 ; A ; 0]`.
///
/// # Panics
/// If `weight` has fewer than `height` spare rows, `at + r > height`, or the shapes, dtypes or
/// devices disagree.
pub fn lengthen<R: CubeRuntime>(
    weight: &CubeTensor<R>,
    factor: &CubeTensor<R>,
    at: usize,
    height: usize,
) -> CubeTensor<R> {
    let [rows, d] = check_matrix("weight", weight, None, None);
    let [r, _] = check_matrix("factor", factor, None, Some(d));
    let spare = spare_rows(weight);
    assert!(
        height <= spare && at + r <= height,
        "LoRA factor of rank {r} at row {at} of {height}: the weight has {spare} spare rows"
    );
    write_block(weight, factor, [rows, 0], [height, d], [at, 0]);
    reshaped(weight.clone(), rows + height, d)
}
