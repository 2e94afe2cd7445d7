//! The CubeCL kernels of the fused LoRA SwiGLU MLP, one per file, each `#[cube]` function next
//! to its host-side launch. They run on any CubeCL runtime (CUDA, wgpu, ...) through
//! `CubeTensor<R>`.

pub mod cast_group;
pub mod rms_norm_backward;
pub mod rms_norm_forward;
pub mod rope;
pub mod spare_room;
pub mod swiglu_forward;
pub mod swiglu_lora_backward;

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, client::ComputeClient};

/// The tensor itself when its buffer is ours alone and safe to write, else a copy.
fn exclusive<R: CubeRuntime>(tensor: CubeTensor<R>) -> CubeTensor<R> {
    if tensor.can_mut() && tensor.is_nonoverlapping() {
        tensor
    } else {
        tensor.copy()
    }
}

/// Checks that `tensor` is a matrix with the expected rows/columns; returns its dims.
fn check_matrix<R: CubeRuntime>(
    name: &str,
    tensor: &CubeTensor<R>,
    rows: Option<usize>,
    cols: Option<usize>,
) -> [usize; 2] {
    let dims = tensor.meta.shape().as_slice();
    let [r, c] = dims else {
        panic!("`{name}` must be a matrix, got shape {dims:?}");
    };
    if let Some(rows) = rows {
        assert_eq!(*r, rows, "`{name}` has {r} rows, expected {rows}");
    }
    if let Some(cols) = cols {
        assert_eq!(*c, cols, "`{name}` has {c} columns, expected {cols}");
    }
    [*r, *c]
}

/// The widest address type any of the tensors needs.
fn address_type<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> AddressType {
    tensors
        .iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default()
}

/// The widest vector (elements per load) the row-wise kernels can use on all of `tensors`, or
/// `None` when one of them is not stored row by row (a column stride other than 1): then they
/// take their strided kernel. Rows must start on a vector boundary, so it is the largest width
/// the device loads at once that divides every tensor's row length and row stride.
fn row_vector_size<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> Option<VectorSize> {
    let mut size = VectorSize::MAX;
    for tensor in tensors {
        if tensor.meta.strides().get(1) != Some(&1) {
            return None;
        }
        let widths = tensor.client.io_optimized_vector_sizes(tensor.dtype.size());
        size = size.min(cubecl::tensor_vector_size_parallel(
            widths,
            tensor.meta.shape(),
            tensor.meta.strides(),
            1,
        ));
    }
    Some(size)
}

/// The vector width for the row-wise RMSNorm kernels: [`row_vector_size`] of the `[N, H]`
/// operands, when the `[H]` gain is contiguous too and the width is above 1.
fn gain_row_vector_size<R: CubeRuntime>(
    rows: &[&CubeTensor<R>],
    gain: &CubeTensor<R>,
) -> Option<VectorSize> {
    let width = row_vector_size(rows)?;
    (width > 1 && gain.meta.strides().len() == 1 && gain.meta.strides()[0] == 1).then_some(width)
}

/// Client, cube count and cube dim for `units` one-element units; `None` when there is no work.
fn elementwise_launch<R: CubeRuntime>(
    reference: &CubeTensor<R>,
    units: usize,
) -> Option<(ComputeClient<R>, CubeCount, CubeDim)> {
    (units > 0).then(|| {
        let client = reference.client.clone();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        (client, cube_count, cube_dim)
    })
}

/// The sum of every unit's `value` over a 1-D cube of `cube` units (a power of two; the
/// launch's cube size), returned to all of them (a tree of halvings in shared memory).
#[cube]
fn row_sum(value: f32, #[comptime] cube: u32) -> f32 {
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(cube as usize);
    shared[unit] = value;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            shared[unit] = shared[unit] + shared[unit + half];
        }
        sync_cube();
        half /= 2;
    }
    shared[0]
}

/// The row strides of three matrices, passed to a kernel by value (see
/// [`swiglu_forward`]'s vector kernel for why not as tensors).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct RowStrides3 {
    first: usize,
    second: usize,
    third: usize,
}

impl RowStrides3 {
    /// The row strides of `matrices`, in order.
    fn of<R: CubeRuntime>(matrices: [&CubeTensor<R>; 3]) -> RowStrides3Launch<R> {
        let [a, b, c] = matrices.map(|m| m.meta.strides()[0]);
        RowStrides3Launch::new(a, b, c)
    }
}

/// One cube per row for `rows` rows, spread over two grid dimensions when there are more than
/// a dimension holds (65,535 on wgpu); kernels take `CUBE_POS` as the row and skip the excess.
fn row_cubes(rows: usize) -> CubeCount {
    const MAX: usize = 65_535;
    let x = rows.clamp(1, MAX);
    CubeCount::Static(x as u32, rows.div_ceil(x) as u32, 1)
}
