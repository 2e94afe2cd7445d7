//! Several tensors cast to one float dtype in one launch: `out_t[i] = cast(in_t[i])`.
//!
//! The LoRA factors stay in f32 (the optimizer's precision) and every pass uses them in the
//! activations' dtype (Unsloth's rule), so each fused op casts its factors on the way in and their
//! gradients on the way out. One launch per op instead of one per factor: a decoder layer's seven
//! projections have fourteen factors, each cast a ~3 µs kernel of its own.

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::address_type;

/// Units per cube.
const CUBE: u32 = 256;

/// Cubes along a tensor: enough to fill a GPU for the factor sizes of 8B models, few enough
/// that a small factor does not launch idle cubes by the thousand.
const MAX_CUBES_X: usize = 64;

/// Tensors per launch: two bindings each, and wgpu allows 32 storage bindings.
pub const MAX_GROUP: usize = 12;

/// Cube row `y` casts tensor `y` (a comptime-sized sequence of bindings, unrolled), its units
/// striding over the elements.
#[cube(launch, address_type = "dynamic")]
fn cast_group_kernel<I: Float, O: Float>(
    inputs: &Sequence<Tensor<I>>,
    outputs: &mut Sequence<Tensor<O>>,
    #[define(I, O)] _dtypes: [StorageType; 2],
) {
    let count = comptime![inputs.len()];
    let step = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    #[unroll]
    for t in 0..count {
        if CUBE_POS_Y as usize == t {
            let input = inputs.index(t);
            let output = outputs.index_mut(t);
            let n = output.len();
            let mut i = ABSOLUTE_POS_X as usize;
            while i < n {
                output[i] = O::cast_from(input[i]);
                i += step;
            }
        }
    }
}

/// Casts every tensor to `dtype`: a tensor already of that dtype is returned as it is; the
/// others, by runs of one input dtype, in launches of up to [`MAX_GROUP`] tensors, each into a
/// new contiguous tensor of its shape. Non-contiguous inputs are made contiguous first.
///
/// # Panics
/// If the tensors are not all on one device.
pub fn launch<R: CubeRuntime>(tensors: Vec<CubeTensor<R>>, dtype: DType) -> Vec<CubeTensor<R>> {
    let mut out: Vec<Option<CubeTensor<R>>> = Vec::with_capacity(tensors.len());
    let mut pending: Vec<(usize, CubeTensor<R>)> = Vec::new();
    for (k, tensor) in tensors.into_iter().enumerate() {
        if tensor.dtype == dtype {
            out.push(Some(tensor));
        } else {
            out.push(None);
            let tensor = if tensor.is_contiguous() {
                tensor
            } else {
                burn_cubecl::kernel::into_contiguous(tensor)
            };
            pending.push((k, tensor));
        }
    }
    let mut rest = pending.as_slice();
    while let Some((_, first)) = rest.first() {
        let run = rest
            .iter()
            .take(MAX_GROUP)
            .take_while(|(_, t)| t.dtype == first.dtype)
            .count();
        let (group, tail) = rest.split_at(run);
        for (k, cast) in group.iter().map(|(k, _)| *k).zip(cast_run(group, dtype)) {
            out[k] = Some(cast);
        }
        rest = tail;
    }
    out.into_iter()
        .map(|t| t.expect("every tensor passed through or cast"))
        .collect()
}

/// One launch over `group` (one input dtype, contiguous), returning the cast tensors in order.
fn cast_run<R: CubeRuntime>(group: &[(usize, CubeTensor<R>)], dtype: DType) -> Vec<CubeTensor<R>> {
    let first = &group[0].1;
    for (_, t) in group {
        first.assert_is_on_same_device(t);
    }
    let outputs: Vec<CubeTensor<R>> = group
        .iter()
        .map(|(_, t)| {
            empty_device_contiguous_dtype(
                t.client.clone(),
                t.device.clone(),
                t.meta.shape().clone(),
                dtype,
            )
        })
        .collect();
    let largest = outputs
        .iter()
        .map(|t| t.meta.shape().num_elements())
        .max()
        .unwrap_or(0);
    if largest == 0 {
        return outputs;
    }
    let all: Vec<&CubeTensor<R>> = group.iter().map(|(_, t)| t).chain(&outputs).collect();
    let cubes_x = largest.div_ceil(CUBE as usize).min(MAX_CUBES_X) as u32;
    cast_group_kernel::launch::<R>(
        &first.client,
        CubeCount::Static(cubes_x, group.len() as u32, 1),
        CubeDim::new_1d(CUBE),
        address_type(&all),
        group
            .iter()
            .map(|(_, t)| t.clone().into_tensor_arg())
            .collect(),
        outputs
            .iter()
            .map(|t| t.clone().into_tensor_arg())
            .collect(),
        [first.dtype.into(), dtype.into()],
    );
    outputs
}
