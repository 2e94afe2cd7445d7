//! The kernel: one cube per row of the chunk (a vector form for contiguous rows, a scalar form
//! for any strides).
//!
//! ```text
//! m, l  = online max / Σ exp(z_j − m) over the row   (each unit a strided share, then a tree
//!                                                      of halvings in shared memory)
//! lse   = m + ln l
//! nll   = lse − z_t,      d_j = exp(z_j − lse) − [j = t]      (both 0 when t < 0)
//! ```
//!
//! f32 arithmetic whatever the storage type `F` of `z`/`d`; `d` is written over `z`.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Units per cube (a power of two): a row of a 128k vocabulary is 1,000 elements a unit.
const CUBE: u32 = 256;

/// Units per cube of the vector kernel: a chunk has few rows (512 at a 128k vocabulary), so more
/// units per row keep more loads in flight (with 256 it ran at ≈ 267 µs per 512 × 128,256 bf16
/// chunk on the H200, 2.7× its memory traffic).
const VECTOR_CUBE: u32 = 1024;

/// The log-sum-exp of a row from every unit's online pair `(m, l)` (its share's max and
/// `Σ exp(z − m)`) over a 1-D cube of `cube` units (a power of two: the launch's cube size),
/// merged by a tree of halvings in shared memory and returned to all units.
#[cube]
fn cube_log_sum_exp(m: f32, l: f32, #[comptime] cube: u32) -> f32 {
    let unit = UNIT_POS_X as usize;
    let mut sm = SharedMemory::<f32>::new(cube as usize);
    let mut sl = SharedMemory::<f32>::new(cube as usize);
    sm[unit] = m;
    sl[unit] = l;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            let m1 = sm[unit];
            let m2 = sm[unit + half];
            let mut mm = m2;
            if m1 > m2 {
                mm = m1;
            }
            sl[unit] = sl[unit] * f32::exp(m1 - mm) + sl[unit + half] * f32::exp(m2 - mm);
            sm[unit] = mm;
        }
        sync_cube();
        half /= 2;
    }
    sm[0] + f32::ln(sl[0])
}

#[cube(launch, address_type = "dynamic")]
fn cross_entropy_rows_kernel<F: Float, I: Int, L: Float>(
    z: &mut Tensor<F>,
    targets: &Tensor<I>,
    nll: &mut Tensor<L>,
    #[comptime] cube: u32,
    #[define(F, I, L)] _dtypes: [StorageType; 3],
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= z.shape(0) {
        terminate!();
    }
    let vocab = z.shape(1);
    let base = row * z.stride(0);
    let cs = z.stride(1);
    let unit = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let target = i32::cast_from(targets[row * targets.stride(0)]);
    let kept = target >= 0;

    let mut m = f32::new(-3.0e38);
    let mut l = 0.0f32;
    let mut j = unit;
    while j < vocab {
        let x = f32::cast_from(z[base + j * cs]);
        if x > m {
            l = l * f32::exp(m - x) + 1.0f32;
            m = x;
        } else {
            l += f32::exp(x - m);
        }
        j += step;
    }
    let lse = cube_log_sum_exp(m, l, cube);
    let t = target as usize;
    if unit == 0 {
        let mut loss = 0.0f32;
        if kept {
            loss = lse - f32::cast_from(z[base + t * cs]);
        }
        nll[row * nll.stride(0)] = L::cast_from(loss);
    }
    // Every unit has read its share of z above and the target logit is read before the
    // barrier below releases the writers.
    sync_cube();

    let mut j = unit;
    while j < vocab {
        let mut d = 0.0f32;
        if kept {
            d = f32::exp(f32::cast_from(z[base + j * cs]) - lse);
            if j == t {
                d -= 1.0f32;
            }
        }
        z[base + j * cs] = F::cast_from(d);
        j += step;
    }
}

/// The same math for rows stored contiguously (column stride 1, row length and stride multiples
/// of `N`), one vector of `N` elements per load: a bf16 unit loads 16 bytes at once where the
/// kernel above loads 2. The scalar kernel's single chain of dependent loads per unit took
/// ≈ 0.6 ms per 512 × 128,256 chunk on the H200, several times its memory traffic.
///
/// Each unit keeps one online pair `(m, l)`: a vector moves `m` only when its largest lane
/// exceeds it (one rescaling exponential, rare after a row's first vectors), then adds its `N`
/// exponentials, so the first pass costs one exponential per element where a pair per lane,
/// rescaled on every vector, costs two. Exponentials and the final logarithm take the fast
/// hardware forms (`__expf`, `__logf` in CUDA: relative error ≈ 1e-6 at these magnitudes, far
/// below the bf16 logits' own rounding).
///
/// The second pass walks each unit's share of the row backwards: the cubes in flight read more
/// rows than the L2 cache holds (a 128k-vocabulary bf16 row is 256 KB), so a second pass in the
/// first one's order finds the row's start evicted, where the backward walk begins with what
/// was read last. Arrays and scalar sizes rather than tensors: a tensor's shape and strides
/// reach a CUDA kernel through a host-to-device copy queued before each launch, scalars as
/// launch parameters.
#[cube(
    launch,
    address_type = "dynamic",
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
fn cross_entropy_rows_vector_kernel<F: Float, I: Int, L: Float, N: Size>(
    z: &mut Array<Vector<F, N>>,
    targets: &Array<I>,
    nll: &mut Array<L>,
    layout: RowsLayout,
    #[comptime] cube: u32,
    #[define(F, I, L)] _dtypes: [StorageType; 3],
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= layout.rows {
        terminate!();
    }
    let width = z.vector_size();
    let vectors = layout.cols / width;
    let base = row * layout.row_stride / width;
    let unit = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let target = i32::cast_from(targets[row * layout.target_stride]);
    let kept = target >= 0;

    let mut m = f32::new(-3.0e38);
    let mut l = 0.0f32;
    let mut j = unit;
    while j < vectors {
        let x: Vector<f32, N> = Vector::cast_from(z[base + j]);
        let mut top = x[0];
        #[unroll]
        for k in 1..width {
            if x[k] > top {
                top = x[k];
            }
        }
        if top > m {
            l *= f32::exp(m - top);
            m = top;
        }
        let e = Vector::exp(x - Vector::new(m));
        #[unroll]
        for k in 0..width {
            l += e[k];
        }
        j += step;
    }
    let lse = cube_log_sum_exp(m, l, cube);
    let t = target as usize;
    if unit == 0 {
        let mut loss = 0.0f32;
        if kept {
            loss = lse - f32::cast_from(z[base + t / width][t % width]);
        }
        nll[row * layout.nll_stride] = L::cast_from(loss);
    }
    // As in the scalar kernel: every read of z above happens before the writes below.
    sync_cube();

    let lse = Vector::<f32, N>::new(lse);
    // This unit's vectors are `unit + k·step` for `k < share`; walked from the last.
    let share = (vectors + step - 1 - unit) / step;
    let mut k = share;
    while k > 0 {
        k -= 1;
        let j = unit + k * step;
        let mut d = Vector::<f32, N>::new(0.0);
        if kept {
            d = Vector::exp(Vector::cast_from(z[base + j]) - lse);
            if j == t / width {
                d[t % width] -= 1.0f32;
            }
        }
        z[base + j] = Vector::cast_from(d);
    }
}

/// The chunk's sizes and strides, passed to [`cross_entropy_rows_vector_kernel`] by value.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct RowsLayout {
    rows: usize,
    cols: usize,
    row_stride: usize,
    target_stride: usize,
    nll_stride: usize,
}

/// The widest vector (elements per load) the device loads at once that divides the row length
/// and the row stride of `logits`, or `None` when its columns are not contiguous.
fn row_vector_size<R: CubeRuntime>(logits: &CubeTensor<R>) -> Option<VectorSize> {
    if logits.meta.strides().get(1) != Some(&1) {
        return None;
    }
    let widths = logits.client.io_optimized_vector_sizes(logits.dtype.size());
    Some(cubecl::tensor_vector_size_parallel(
        widths,
        logits.meta.shape(),
        logits.meta.strides(),
        1,
    ))
}

/// Launches the kernel on `logits` `[rows, vocab]` (overwritten with `softmax − onehot`, copied
/// first if its buffer is shared) with `targets` `[rows]` (ints; negative = ignored). Returns
/// `(nll, d_logits)`, `nll` a new `[rows]` f32 tensor.
///
/// # Panics
/// On shapes that disagree, a non-integer `targets`, or sizes beyond `u32`.
pub fn launch<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let dims = logits.meta.shape().as_slice().to_vec();
    let [rows, vocab] = dims[..] else {
        panic!("cross_entropy_rows: logits must be [rows, vocab], got {dims:?}");
    };
    assert_eq!(
        targets.meta.shape().as_slice(),
        &[rows],
        "cross_entropy_rows: targets must be [rows] = [{rows}]"
    );
    assert!(
        matches!(
            targets.dtype,
            DType::I32 | DType::I64 | DType::U32 | DType::I16 | DType::I8
        ),
        "cross_entropy_rows: targets must be integers, got {:?}",
        targets.dtype
    );
    logits.assert_is_on_same_device(&targets);
    let logits = if logits.can_mut() && logits.is_nonoverlapping() {
        logits
    } else {
        logits.copy()
    };
    let nll = empty_device_dtype::<R>(
        logits.client.clone(),
        logits.device.clone(),
        Shape::new([rows]),
        DType::F32,
    );
    if rows > 0 && vocab > 0 {
        let x = rows.min(65_535);
        let y = rows.div_ceil(x);
        let count = |v: usize| u32::try_from(v).expect("cube count fits u32");
        let address = [&logits, &targets, &nll]
            .iter()
            .map(|t| t.required_address_type())
            .max()
            .unwrap_or_default();
        let cubes = CubeCount::Static(count(x), count(y), 1);
        let dtypes = [logits.dtype.into(), targets.dtype.into(), DType::F32.into()];
        match row_vector_size(&logits) {
            Some(width) if width > 1 => cross_entropy_rows_vector_kernel::launch::<R>(
                &logits.client,
                cubes,
                CubeDim::new_1d(VECTOR_CUBE),
                address,
                width,
                logits.clone().into_array_arg(),
                targets.clone().into_array_arg(),
                nll.clone().into_array_arg(),
                RowsLayoutLaunch::new(
                    rows,
                    vocab,
                    logits.meta.strides()[0],
                    targets.meta.strides()[0],
                    nll.meta.strides()[0],
                ),
                VECTOR_CUBE,
                dtypes,
            ),
            _ => cross_entropy_rows_kernel::launch::<R>(
                &logits.client,
                cubes,
                CubeDim::new_1d(CUBE),
                address,
                logits.clone().into_tensor_arg(),
                targets.clone().into_tensor_arg(),
                nll.clone().into_tensor_arg(),
                CUBE,
                dtypes,
            ),
        }
    }
    (nll, logits)
}
