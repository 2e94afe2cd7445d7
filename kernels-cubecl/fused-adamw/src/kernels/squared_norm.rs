//! The sum of squares of one tensor's elements, added into a buffer of f32 partial sums:
//!
//! ```text
//! slots[c] += Σ_{i handled by cube c} f32(g[i])²       for each cube c < cubes ≤ SLOTS
//! ```
//!
//! Each unit sums the squares (in f32, whatever the storage type `F` is) of a grid-strided share
//! of the elements, the cube adds its units' sums in shared memory (a tree of halvings), and
//! its first unit adds the cube's sum into `slots[c]`. No atomics: within one launch each slot
//! belongs to one cube, and launches on one stream/queue run in order, so many tensors can add
//! into the same slots one launch each; the result is deterministic. The caller sums the slots
//! once at the end (one reduction and one device read for all tensors).

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{address_type, contiguous};

/// Units per cube (a power of two).
const CUBE: u32 = 256;

/// The most cubes one launch uses, and so the number of slots the buffer needs.
pub const SLOTS: usize = 1024;

#[cube(launch, address_type = "dynamic")]
fn squared_norm_kernel<F: Float>(
    grad: &Tensor<F>,
    slots: &mut Tensor<f32>,
    #[comptime] cube: u32,
    #[define(F)] _dtype: StorageType,
) {
    let n = grad.len();
    let unit = UNIT_POS_X as usize;
    let step = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut i = CUBE_POS_X as usize * CUBE_DIM_X as usize + unit;
    let mut acc = 0.0f32;
    while i < n {
        let x = f32::cast_from(grad[i]);
        acc += x * x;
        i += step;
    }
    let mut shared = SharedMemory::<f32>::new(cube as usize);
    shared[unit] = acc;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            shared[unit] = shared[unit] + shared[unit + half];
        }
        sync_cube();
        half /= 2;
    }
    if unit == 0 {
        let c = CUBE_POS_X as usize;
        slots[c] = slots[c] + shared[0];
    }
}

/// Launches the kernel: adds the squares of `grad`'s elements into `slots` (an f32 buffer of
/// [`SLOTS`] elements, updated in place; the caller owns it and zeroes it once).
///
/// `grad` may have any shape and float dtype; a strided view is read as stored when it covers
/// its buffer exactly once (a permutation), else it is made row-major first.
///
/// # Panics
/// If `slots` is not a row-major f32 buffer of [`SLOTS`] elements, or is on another device.
pub fn launch<R: CubeRuntime>(grad: CubeTensor<R>, slots: &CubeTensor<R>) {
    assert_eq!(
        slots.dtype,
        burn::tensor::DType::F32,
        "squared_norm: slots must be f32"
    );
    assert_eq!(
        slots.meta.shape().as_slice(),
        &[SLOTS],
        "squared_norm: slots must hold {SLOTS} elements"
    );
    assert!(
        slots.is_contiguous(),
        "squared_norm: slots must be row-major"
    );
    grad.assert_is_on_same_device(slots);
    let n = grad.meta.shape().num_elements();
    if n == 0 {
        return;
    }
    // The order of the elements does not matter: a permuted view covering its buffer exactly
    // once is read as stored.
    let grad = if grad.is_contiguous() || (grad.is_contiguous_buffer() && grad.is_nonoverlapping())
    {
        grad
    } else {
        contiguous(grad)
    };
    let cubes = n.div_ceil(CUBE as usize).min(SLOTS);
    let client = grad.client.clone();
    let dtype = grad.dtype;
    let address = address_type(&[&grad, slots]);
    squared_norm_kernel::launch::<R>(
        &client,
        CubeCount::Static(cubes as u32, 1, 1),
        CubeDim::new_1d(CUBE),
        address,
        grad.into_tensor_arg(),
        slots.clone().into_tensor_arg(),
        CUBE,
        dtype.into(),
    );
}
