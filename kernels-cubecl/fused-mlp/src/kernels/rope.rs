//! Rotary position embedding in transformers' `rotate_half` convention over `[b, h, s, d]`
//! (any strides), one unit per pair `(i, i + d/2)` of a row, math in f32 whatever the storage
//! type `F` is, tables `cos`/`sin` `[tb, s, d]` f32 (repeated over the two halves; `tb = 1`:
//! every batch row at the same positions, `tb = b`: one row of positions per batch row, as
//! packed documents that each start at position 0 need):
//!
//! ```text
//! y_i       = x_i·cos_i       − σ·x_{i+d/2}·sin_i
//! y_{i+d/2} = x_{i+d/2}·cos_i + σ·x_i·sin_i
//! ```
//!
//! σ = +1 is the forward. The rotation is orthogonal per pair, so its transpose (σ = −1) maps
//! the upstream gradient `dy` to `dx`: the backward is the same kernel.
//!
//! The output is written row-major in `[b, s, h, d]` order (returned as the `[b, h, s, d]` view
//! of it): the layout the projections produce and the attention reads, with consecutive units
//! writing consecutive elements.

use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{address_type, elementwise_launch};

#[cube(launch, address_type = "dynamic")]
fn rope_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<f32>,
    sin: &Tensor<f32>,
    y: &mut Tensor<F>,
    sign: f32,
    #[define(F)] _dtype: StorageType,
) {
    let heads = x.shape(1);
    let seq = x.shape(2);
    let half = x.shape(3) / 2;
    if ABSOLUTE_POS >= x.shape(0) * seq * heads * half {
        terminate!();
    }
    let i = ABSOLUTE_POS % half;
    let row = ABSOLUTE_POS / half;
    let head = row % heads;
    let position = (row / heads) % seq;
    let batch = row / (heads * seq);

    let base = batch * x.stride(0) + head * x.stride(1) + position * x.stride(2);
    let first = f32::cast_from(x[base + i * x.stride(3)]);
    let second = f32::cast_from(x[base + (i + half) * x.stride(3)]);
    let mut table_row = 0;
    if cos.shape(0) > 1 {
        table_row = batch;
    }
    let c = cos[table_row * cos.stride(0) + position * cos.stride(1) + i * cos.stride(2)];
    let s = sign * sin[table_row * sin.stride(0) + position * sin.stride(1) + i * sin.stride(2)];

    let out = ((batch * seq + position) * heads + head) * (2 * half);
    y[out + i] = F::cast_from(first * c - second * s);
    y[out + i + half] = F::cast_from(second * c + first * s);
}

/// The same math with `x`'s rows contiguous (last stride 1), one unit per vector of `N` pairs:
/// a bf16 unit moves 16 bytes per access where the kernel above moves 2, and its index
/// arithmetic (four divisions) is shared by `N` pairs. The scalar kernel ran at ≈ 100 µs for a
/// 1B model's q (`[4, 32, 2048, 64]` bf16) on the H200, five times its memory traffic. The
/// tables are read as `N` scalars from the same row (they are small and stay in cache).
///
/// Arrays and scalar sizes rather than tensors: a tensor's shape and strides reach a CUDA
/// kernel through a host-to-device copy queued before each launch, scalars as launch
/// parameters. `x_strides` are `x`'s first three strides; a table's batch stride is 0 when one
/// table row serves every batch row.
#[cube(launch, address_type = "dynamic")]
fn rope_rows_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    y: &mut Array<Vector<F, N>>,
    sizes: RopeSizes,
    sign: f32,
    #[define(F)] _dtype: StorageType,
) {
    let width = x.vector_size();
    let heads = sizes.heads;
    let seq = sizes.seq;
    let half = sizes.head_dim / 2 / width;
    if ABSOLUTE_POS >= sizes.batch * seq * heads * half {
        terminate!();
    }
    let i = ABSOLUTE_POS % half;
    let row = ABSOLUTE_POS / half;
    let head = row % heads;
    let position = (row / heads) % seq;
    let batch = row / (heads * seq);

    let base = (batch * sizes.x_batch + head * sizes.x_head + position * sizes.x_position) / width;
    let first: Vector<f32, N> = Vector::cast_from(x[base + i]);
    let second: Vector<f32, N> = Vector::cast_from(x[base + i + half]);
    let cos_at =
        batch * sizes.cos_batch + position * sizes.cos_position + i * width * sizes.cos_column;
    let sin_at =
        batch * sizes.sin_batch + position * sizes.sin_position + i * width * sizes.sin_column;
    let mut c = Vector::<f32, N>::new(0.0);
    let mut s = Vector::<f32, N>::new(0.0);
    #[unroll]
    for k in 0..width {
        c[k] = cos[cos_at + k * sizes.cos_column];
        s[k] = sign * sin[sin_at + k * sizes.sin_column];
    }

    let out = ((batch * seq + position) * heads + head) * (2 * half);
    y[out + i] = Vector::cast_from(first * c - second * s);
    y[out + i + half] = Vector::cast_from(second * c + first * s);
}

/// The sizes and strides [`rope_rows_kernel`] indexes with, passed by value.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct RopeSizes {
    batch: usize,
    heads: usize,
    seq: usize,
    head_dim: usize,
    x_batch: usize,
    x_head: usize,
    x_position: usize,
    cos_batch: usize,
    cos_position: usize,
    cos_column: usize,
    sin_batch: usize,
    sin_position: usize,
    sin_column: usize,
}

/// The widest vector the rows kernel can use on `x` `[b, h, s, d]`: a load width of the device
/// that divides `d / 2` and `x`'s first three strides, with `x`'s last stride 1; `None` when
/// only the scalar kernel fits.
fn pair_vector_size<R: CubeRuntime>(x: &CubeTensor<R>) -> Option<VectorSize> {
    let strides = x.meta.strides();
    let half = x.meta.shape()[3] / 2;
    if strides[3] != 1 {
        return None;
    }
    x.client
        .io_optimized_vector_sizes(x.dtype.size())
        .filter(|&w| {
            w > 1 && half.is_multiple_of(w) && strides[..3].iter().all(|s| s.is_multiple_of(w))
        })
        .max()
}

/// [`RopeSizes`] of `x` `[b, h, s, d]` and its tables `[1 or b, s, d]`.
fn rope_sizes<R: CubeRuntime>(
    x: &CubeTensor<R>,
    cos: &CubeTensor<R>,
    sin: &CubeTensor<R>,
) -> RopeSizesLaunch<R> {
    let (shape, xs) = (x.meta.shape(), x.meta.strides());
    let table = |t: &CubeTensor<R>| {
        let st = t.meta.strides();
        let batch = if t.meta.shape()[0] > 1 { st[0] } else { 0 };
        (batch, st[1], st[2])
    };
    let (cos_batch, cos_position, cos_column) = table(cos);
    let (sin_batch, sin_position, sin_column) = table(sin);
    RopeSizesLaunch::new(
        shape[0],
        shape[1],
        shape[2],
        shape[3],
        xs[0],
        xs[1],
        xs[2],
        cos_batch,
        cos_position,
        cos_column,
        sin_batch,
        sin_position,
        sin_column,
    )
}

/// Launches the rotation of `x` (`σ = sign`, see the module docs): returns a new row-major
/// `[b, s, h, d]` tensor in `x`'s dtype (the caller views it as `[b, h, s, d]`).
///
/// # Panics
/// If `x` is not rank 4 with an even last dimension, or the tables are not f32 `[1, s, d]` or
/// `[b, s, d]` on `x`'s device.
pub fn launch<R: CubeRuntime>(
    x: &CubeTensor<R>,
    cos: &CubeTensor<R>,
    sin: &CubeTensor<R>,
    sign: f32,
) -> CubeTensor<R> {
    let dims = x.meta.shape().as_slice();
    let &[b, h, s, d] = dims else {
        panic!("rope: x must be [b, h, s, d], got shape {dims:?}");
    };
    assert!(d % 2 == 0, "rope: the head width {d} is odd");
    for (name, table) in [("cos", cos), ("sin", sin)] {
        let dims = table.meta.shape().as_slice();
        assert!(
            matches!(dims, &[tb, ts, td] if (tb == 1 || tb == b) && ts == s && td == d),
            "rope: the {name} table must be [1 or {b}, {s}, {d}], got {dims:?}"
        );
        assert_eq!(
            table.dtype,
            burn::tensor::DType::F32,
            "rope: the {name} table must be f32"
        );
        x.assert_is_on_same_device(table);
    }
    let y = empty_device_contiguous_dtype::<R>(
        x.client.clone(),
        x.device.clone(),
        vec![b, s, h, d].into(),
        x.dtype,
    );
    if let Some(width) = pair_vector_size(x) {
        if let Some((client, cube_count, cube_dim)) =
            elementwise_launch(&y, b * s * h * (d / 2) / width)
        {
            rope_rows_kernel::launch::<R>(
                &client,
                cube_count,
                cube_dim,
                address_type(&[x, cos, sin, &y]),
                width,
                x.clone().into_array_arg(),
                cos.clone().into_array_arg(),
                sin.clone().into_array_arg(),
                y.clone().into_array_arg(),
                rope_sizes(x, cos, sin),
                sign,
                x.dtype.into(),
            );
        }
    } else if let Some((client, cube_count, cube_dim)) = elementwise_launch(&y, b * s * h * (d / 2))
    {
        rope_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type(&[x, cos, sin, &y]),
            x.clone().into_tensor_arg(),
            cos.clone().into_tensor_arg(),
            sin.clone().into_tensor_arg(),
            y.clone().into_tensor_arg(),
            sign,
            x.dtype.into(),
        );
    }
    y
}
