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
/// striding over the elements. Arrays, not tensors: a tensor's shape and strides reach a CUDA
/// kernel through a host-to-device copy queued before each launch, an array's length as a
/// launch parameter.
#[cube(launch, address_type = "dynamic")]
fn cast_group_kernel<I: Float, O: Float>(
    inputs: &Sequence<Array<I>>,
    outputs: &mut Sequence<Array<O>>,
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

/// [`cast_group_kernel`] whose first `stacked` inputs are written one after another into
/// `stack` (each at the sum of the earlier ones' lengths: matrices of one width stacked along
/// rows) and the rest into `outputs`. One buffer with running offsets rather than a view per
/// member: a view's offset into a buffer must be aligned on wgpu, a row block need not be.
#[cube(launch, address_type = "dynamic")]
fn cast_stack_kernel<I: Float, O: Float>(
    inputs: &Sequence<Array<I>>,
    outputs: &mut Sequence<Array<O>>,
    stack: &mut Array<O>,
    #[comptime] stacked: usize,
    #[define(I, O)] _dtypes: [StorageType; 2],
) {
    let count = comptime![inputs.len()];
    let step = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut offset = 0usize;
    #[unroll]
    for t in 0..count {
        let input = inputs.index(t);
        if CUBE_POS_Y as usize == t {
            let n = input.len();
            let mut i = ABSOLUTE_POS_X as usize;
            if comptime![t < stacked] {
                while i < n {
                    stack[offset + i] = O::cast_from(input[i]);
                    i += step;
                }
            } else {
                let output = outputs.index_mut(comptime![t - stacked]);
                while i < n {
                    output[i] = O::cast_from(input[i]);
                    i += step;
                }
            }
        }
        offset += input.len();
    }
}

/// Casts every tensor to `dtype`: a tensor already of that dtype is returned as it is; the
/// others, by runs of one input dtype, in launches of up to [`MAX_GROUP`] tensors, each into a
/// new contiguous tensor of its shape. Non-contiguous inputs are made contiguous first.
///
/// # Panics
/// If the tensors are not all on one device.
pub fn launch<R: CubeRuntime>(tensors: Vec<CubeTensor<R>>, dtype: DType) -> Vec<CubeTensor<R>> {
    let (out, casts) = outputs_in(tensors, dtype);
    cast_runs(casts);
    out
}

/// Each tensor as it is when already in `dtype`, else a new contiguous output for it; and the
/// casts `(input, output)` that fill those outputs (inputs made contiguous).
#[allow(clippy::type_complexity)]
fn outputs_in<R: CubeRuntime>(
    tensors: Vec<CubeTensor<R>>,
    dtype: DType,
) -> (Vec<CubeTensor<R>>, Vec<(CubeTensor<R>, CubeTensor<R>)>) {
    let mut out = Vec::with_capacity(tensors.len());
    let mut casts = Vec::new();
    for tensor in tensors {
        if tensor.dtype == dtype {
            out.push(tensor);
        } else {
            let output = new_like(&tensor, tensor.meta.shape().clone(), dtype);
            casts.push((contiguous(tensor), output.clone()));
            out.push(output);
        }
    }
    (out, casts)
}

/// [`launch`] for `tensors`, and `stacked` (matrices of one width) cast and written one under
/// another into one new `[Σ rows, width]` buffer: the fused QKV op's three `A` factors as one
/// GEMM operand without a concatenation (one copy kernel per factor). One launch when every
/// tensor that needs a cast and every stacked one share an input dtype and fit a group (the
/// fused ops' case: f32 factors), else the rest cast first. `stacked` members are copied even
/// when already in `dtype`.
///
/// # Panics
/// If `stacked` is empty, its members are not matrices of one width, or the tensors are not all
/// on one device.
pub fn launch_with_stack<R: CubeRuntime>(
    tensors: Vec<CubeTensor<R>>,
    stacked: Vec<CubeTensor<R>>,
    dtype: DType,
) -> (Vec<CubeTensor<R>>, CubeTensor<R>) {
    let first = stacked.first().expect("at least one matrix to stack");
    let width = first.meta.shape()[1];
    let rows: usize = stacked
        .iter()
        .map(|t| {
            let &[r, w] = t.meta.shape().as_slice() else {
                panic!("stacked tensors must be matrices, got {:?}", t.meta.shape());
            };
            assert_eq!(w, width, "stacked matrices must share one width");
            first.assert_is_on_same_device(t);
            r
        })
        .sum();
    let input_dtype = first.dtype;
    let one_launch = stacked.iter().all(|t| t.dtype == input_dtype)
        && tensors
            .iter()
            .all(|t| t.dtype == dtype || t.dtype == input_dtype)
        && stacked.len() + tensors.iter().filter(|t| t.dtype != dtype).count() <= MAX_GROUP;
    let stack = new_like(first, [rows, width].into(), dtype);
    if !one_launch {
        // The rest on their own, the stacked ones brought to `dtype` first (then copied).
        let tensors = launch(tensors, dtype);
        let stacked = launch(stacked, dtype).into_iter().map(contiguous).collect();
        launch_stack(stacked, Vec::new(), &stack);
        return (tensors, stack);
    }
    let (out, casts) = outputs_in(tensors, dtype);
    launch_stack(stacked.into_iter().map(contiguous).collect(), casts, &stack);
    (out, stack)
}

/// One [`cast_stack_kernel`] launch: `stacked` (contiguous, one input dtype) into `stack`, each
/// `(input, output)` of `casts` (contiguous, the same input dtype) into its output.
fn launch_stack<R: CubeRuntime>(
    stacked: Vec<CubeTensor<R>>,
    casts: Vec<(CubeTensor<R>, CubeTensor<R>)>,
    stack: &CubeTensor<R>,
) {
    let first = &stacked[0];
    let largest = stacked
        .iter()
        .chain(casts.iter().map(|(input, _)| input))
        .map(|t| t.meta.shape().num_elements())
        .max()
        .unwrap_or(0);
    if largest == 0 {
        return;
    }
    let members = stacked.len() + casts.len();
    let all: Vec<&CubeTensor<R>> = stacked
        .iter()
        .chain(casts.iter().flat_map(|(i, o)| [i, o]))
        .chain([stack])
        .collect();
    let cubes_x = largest.div_ceil(CUBE as usize).min(MAX_CUBES_X) as u32;
    cast_stack_kernel::launch::<R>(
        &first.client,
        CubeCount::Static(cubes_x, members as u32, 1),
        CubeDim::new_1d(CUBE),
        address_type(&all),
        stacked
            .iter()
            .chain(casts.iter().map(|(input, _)| input))
            .map(|t| t.clone().into_array_arg())
            .collect(),
        casts
            .iter()
            .map(|(_, output)| output.clone().into_array_arg())
            .collect(),
        stack.clone().into_array_arg(),
        stacked.len(),
        [first.dtype.into(), stack.dtype.into()],
    );
}

/// `tensor`, or a contiguous copy of it.
fn contiguous<R: CubeRuntime>(tensor: CubeTensor<R>) -> CubeTensor<R> {
    if tensor.is_contiguous() {
        tensor
    } else {
        burn_cubecl::kernel::into_contiguous(tensor)
    }
}

/// A new contiguous tensor on `like`'s device.
fn new_like<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: burn::tensor::Shape,
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// Runs the casts `input → output` (contiguous, each output of its input's shape), grouped by
/// runs of one input dtype into launches of up to [`MAX_GROUP`].
fn cast_runs<R: CubeRuntime>(casts: Vec<(CubeTensor<R>, CubeTensor<R>)>) {
    let mut rest = casts.as_slice();
    while let Some((first, _)) = rest.first() {
        let run = rest
            .iter()
            .take(MAX_GROUP)
            .take_while(|(t, _)| t.dtype == first.dtype)
            .count();
        let (group, tail) = rest.split_at(run);
        cast_run(group);
        rest = tail;
    }
}

/// One launch over `group` (one input dtype, contiguous inputs and outputs).
fn cast_run<R: CubeRuntime>(group: &[(CubeTensor<R>, CubeTensor<R>)]) {
    let first = &group[0].0;
    for (input, output) in group {
        first.assert_is_on_same_device(input);
        first.assert_is_on_same_device(output);
    }
    let largest = group
        .iter()
        .map(|(_, t)| t.meta.shape().num_elements())
        .max()
        .unwrap_or(0);
    if largest == 0 {
        return;
    }
    let all: Vec<&CubeTensor<R>> = group.iter().flat_map(|(i, o)| [i, o]).collect();
    let cubes_x = largest.div_ceil(CUBE as usize).min(MAX_CUBES_X) as u32;
    cast_group_kernel::launch::<R>(
        &first.client,
        CubeCount::Static(cubes_x, group.len() as u32, 1),
        CubeDim::new_1d(CUBE),
        address_type(&all),
        group
            .iter()
            .map(|(t, _)| t.clone().into_array_arg())
            .collect(),
        group
            .iter()
            .map(|(_, t)| t.clone().into_array_arg())
            .collect(),
        [first.dtype.into(), group[0].1.dtype.into()],
    );
}
