//! RMSNorm forward over the rows of `[N, H]`, one cube per row (a vector form for contiguous
//! rows, a scalar form for any strides), in f32 whatever the storage
//! type `F` is (transformers' `LlamaRMSNorm`, as the portable `RmsNorm::forward` computes it):
//!
//! ```text
//! r   = 1 / √(Σ_c x_c² / H + ε)          (f32; kept for the backward)
//! y_c = F(x_c · r) · w_c                  (the normalised row rounded to F, then the gain in F)
//! ```

use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{address_type, check_matrix, gain_row_vector_size, row_cubes, row_sum};

/// Units per cube (a power of two): each strides over its row.
pub(crate) const ROW_CUBE: u32 = 256;

#[cube(launch, address_type = "dynamic")]
fn rms_norm_forward_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    y: &mut Tensor<F>,
    rstd: &mut Tensor<f32>,
    eps: f32,
    #[comptime] cube: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= x.shape(0) {
        terminate!();
    }
    let unit = UNIT_POS_X as usize;
    let cols = x.shape(1);
    let mut squares = 0.0f32;
    let mut c = UNIT_POS_X as usize;
    while c < cols {
        let v = f32::cast_from(x[row * x.stride(0) + c * x.stride(1)]);
        squares += v * v;
        c += CUBE_DIM_X as usize;
    }
    let total = row_sum(squares, cube);
    let r = 1.0f32 / f32::sqrt(total / f32::cast_from(cols) + eps);
    if unit == 0 {
        rstd[row] = r;
    }
    let mut c = UNIT_POS_X as usize;
    while c < cols {
        let v = f32::cast_from(x[row * x.stride(0) + c * x.stride(1)]);
        y[row * y.stride(0) + c] = F::cast_from(v * r) * weight[c * weight.stride(0)];
        c += CUBE_DIM_X as usize;
    }
}

/// The same math on contiguous rows, one vector of `N` elements per access (16 bytes in bf16
/// where the kernel above moves 2; that one ran at ≈ 64 µs per `[8192, 2048]` bf16 on the
/// H200, three times its memory traffic). Arrays and scalar sizes rather than tensors: a
/// tensor's shape and strides reach a CUDA kernel through a host-to-device copy queued before
/// each launch (≈ 5 µs of device time a launch on the H100), scalars as launch parameters.
#[cube(launch, address_type = "dynamic")]
fn rms_norm_forward_rows_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    y: &mut Array<Vector<F, N>>,
    rstd: &mut Array<f32>,
    rows: usize,
    cols: usize,
    x_row_stride: usize,
    y_row_stride: usize,
    eps: f32,
    #[comptime] cube: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let width = x.vector_size();
    let vectors = cols / width;
    let base = row * x_row_stride / width;
    let mut squares = Vector::<f32, N>::new(0.0);
    let mut c = UNIT_POS_X as usize;
    while c < vectors {
        let v: Vector<f32, N> = Vector::cast_from(x[base + c]);
        squares += v * v;
        c += CUBE_DIM_X as usize;
    }
    let mut own = 0.0f32;
    #[unroll]
    for k in 0..width {
        own += squares[k];
    }
    let total = row_sum(own, cube);
    let r = 1.0f32 / f32::sqrt(total / f32::cast_from(cols) + eps);
    if UNIT_POS_X == 0 {
        rstd[row] = r;
    }
    let r = Vector::<f32, N>::new(r);
    let mut c = UNIT_POS_X as usize;
    while c < vectors {
        let v: Vector<f32, N> = Vector::cast_from(x[base + c]);
        let normed: Vector<F, N> = Vector::cast_from(v * r);
        y[row * y_row_stride / width + c] = normed * weight[c];
        c += CUBE_DIM_X as usize;
    }
}

/// Launches the forward: returns `y` (`[N, H]`, rows stored one after another, `x`'s dtype) and
/// `rstd` (`[N]`, f32). With `spare_columns > 0`, `y` is the `[N, H]` view of a new
/// `[N, H + spare_columns]` buffer: room beside each row for a consumer's own columns (the fused
/// MLP's `x·Aᵀ` terms, see [`super::spare_room`]).
///
/// # Panics
/// If `x` is not a matrix, `weight` not an `[H]` vector of `x`'s dtype, or they are on different
/// devices.
pub fn launch<R: CubeRuntime>(
    x: &CubeTensor<R>,
    weight: &CubeTensor<R>,
    eps: f32,
    spare_columns: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [n, h] = check_matrix("x", x, None, None);
    assert_eq!(
        weight.meta.shape().as_slice(),
        &[h],
        "rms_norm: the weight must be [{h}]"
    );
    assert_eq!(
        weight.dtype, x.dtype,
        "rms_norm: weight dtype differs from x's"
    );
    x.assert_is_on_same_device(weight);
    let new = |shape: Vec<usize>, dtype| {
        empty_device_contiguous_dtype::<R>(x.client.clone(), x.device.clone(), shape.into(), dtype)
    };
    let y = super::spare_room::spare_view(new(vec![n, h + spare_columns], x.dtype), n, h)
        .expect("a new contiguous buffer");
    let rstd = new(vec![n], burn::tensor::DType::F32);
    if n > 0 && h > 0 {
        let address = address_type(&[x, weight, &y, &rstd]);
        if let Some(width) = gain_row_vector_size(&[x, &y], weight) {
            rms_norm_forward_rows_kernel::launch::<R>(
                &x.client,
                row_cubes(n),
                CubeDim::new_1d(ROW_CUBE),
                address,
                width,
                x.clone().into_array_arg(),
                weight.clone().into_array_arg(),
                y.clone().into_array_arg(),
                rstd.clone().into_array_arg(),
                n,
                h,
                x.meta.strides()[0],
                y.meta.strides()[0],
                eps,
                ROW_CUBE,
                x.dtype.into(),
            );
            return (y, rstd);
        }
        rms_norm_forward_kernel::launch::<R>(
            &x.client,
            row_cubes(n),
            CubeDim::new_1d(ROW_CUBE),
            address,
            x.clone().into_tensor_arg(),
            weight.clone().into_tensor_arg(),
            y.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            eps,
            ROW_CUBE,
            x.dtype.into(),
        );
    }
    (y, rstd)
}
