//! One AdamW step of one or more parameter tensors in one launch, the whole of Burn's
//! `AdamW::step` (no AMSGrad, no cautious weight decay) in one pass per element, in f32 whatever
//! the storage type `F` is:
//!
//! ```text
//! first step (no moments yet):  m' = (1−β₁)·g              v' = (1−β₂)·g²
//! later steps:                  m' = β₁·m + (1−β₁)·g       v' = β₂·v + (1−β₂)·g²
//! m̂ = m' / (1−β₁ᵗ)    v̂ = v' / (1−β₂ᵗ)      (t: the step count after this step, from 1)
//! δ  = m̂ / (√v̂ + ε)
//! p' = p·(1 − lr·wd) − lr·δ                 (no decay product at all when lr·wd = 0)
//! ```
//!
//! The host computes the scalars exactly as Burn does: `1 − β` and `1 − βᵗ` in f32 (`powi`),
//! `1 − lr·wd` in f64 then rounded to f32, `lr` rounded to f32. The order of the operations
//! is Burn's (`m·β₁ + g·(1−β₁)`, ...), so on f32 the result differs from Burn's chain of
//! element-wise kernels by at most the rounding of a fused multiply-add the GPU compiler may
//! contract.
//!
//! A LoRA model has hundreds of small adapter tensors; one launch each leaves a GPU waiting on the
//! host that issues them. So the tensors of a group are the kernel's bindings (a comptime-sized
//! `Sequence` of each operand), cube row `y` of the grid works on tensor `y`, and the new
//! parameters and moments are written into three buffers shared by the group (one allocation
//! each), every tensor getting its own aligned row-major view. One tensor is a group of one.
//!
//! Reads `p`, `g`, `m`, `v`; never writes them (they may be shared with other tensors).

use burn::tensor::Shape;
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

use super::{address_type, contiguous};

/// The most tensors one launch takes (seven bindings each), where the runtime allows as many
/// bindings ([`capacity`]).
pub const GROUP: usize = 16;

/// Bindings each member of a group uses: four inputs, three outputs.
const BINDINGS_PER_MEMBER: u32 = 7;

/// How many tensors one launch on `client`'s device takes: [`GROUP`], or fewer where the runtime
/// allows fewer storage bindings per kernel (wgpu: often 32, one of them CubeCL's metadata).
pub fn capacity<R: CubeRuntime>(client: &ComputeClient<R>) -> usize {
    let bindings = client.properties().hardware.max_bindings;
    (bindings.saturating_sub(1) / BINDINGS_PER_MEMBER).clamp(1, GROUP as u32) as usize
}

/// Units per cube.
const CUBE: u32 = 256;

/// The most cubes along x: a unit then loops over the rest of its tensor.
const MAX_CUBES_X: usize = 64;

/// Byte alignment of each view in the shared output buffers (wide enough for any vector load
/// and for cuBLAS's preferred operand alignment).
const VIEW_ALIGN: usize = 256;

#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn adamw_step_kernel<F: Float>(
    params: &Sequence<Array<F>>,
    grads: &Sequence<Array<F>>,
    moments_1: &Sequence<Array<F>>,
    moments_2: &Sequence<Array<F>>,
    params_out: &mut Sequence<Array<F>>,
    moments_1_out: &mut Sequence<Array<F>>,
    moments_2_out: &mut Sequence<Array<F>>,
    beta_1: f32,
    factor_1: f32,
    beta_2: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    decay: f32,
    lr: f32,
    #[comptime] first: bool,
    #[comptime] decayed: bool,
    #[define(F)] _dtype: StorageType,
) {
    let count = comptime![params.len()];
    let step = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    #[unroll]
    for t in 0..count {
        if CUBE_POS_Y as usize == t {
            let param = params.index(t);
            let grad = grads.index(t);
            let moment_1 = moments_1.index(t);
            let moment_2 = moments_2.index(t);
            let param_out = params_out.index_mut(t);
            let moment_1_out = moments_1_out.index_mut(t);
            let moment_2_out = moments_2_out.index_mut(t);
            let n = param_out.len();
            let mut i = ABSOLUTE_POS_X as usize;
            while i < n {
                let g = f32::cast_from(grad[i]);
                let mut m = g * factor_1;
                let mut v = g * g * factor_2;
                if !first {
                    // Burn: `m·β₁ + g·(1−β₁)`; IEEE addition commutes, so this is the same sum.
                    m += f32::cast_from(moment_1[i]) * beta_1;
                    v += f32::cast_from(moment_2[i]) * beta_2;
                }
                let m_hat = m / correction_1;
                let v_hat = v / correction_2;
                let delta = m_hat / (f32::sqrt(v_hat) + epsilon);
                let mut p = f32::cast_from(param[i]);
                if decayed {
                    p *= decay;
                }
                param_out[i] = F::cast_from(p - delta * lr);
                moment_1_out[i] = F::cast_from(m);
                moment_2_out[i] = F::cast_from(v);
                i += step;
            }
        }
    }
}

/// The hyper-parameters of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScalars {
    /// β₁, the first moment's decay.
    pub beta_1: f32,
    /// β₂, the second moment's decay.
    pub beta_2: f32,
    /// ε, added to √v̂.
    pub epsilon: f32,
    /// The decoupled weight decay `wd` (the parameter is scaled by `1 − lr·wd`).
    pub weight_decay: f32,
    /// The learning rate of this step.
    pub lr: f64,
    /// The step count after this step (1 on the first step), the `t` of the bias corrections.
    pub time: usize,
}

/// The result of one step: the new parameter and moments, each in a new row-major buffer.
#[derive(Debug, Clone)]
pub struct StepOutput<R: CubeRuntime> {
    /// `p'`.
    pub param: CubeTensor<R>,
    /// `m'`, the first moment.
    pub moment_1: CubeTensor<R>,
    /// `v'`, the second moment.
    pub moment_2: CubeTensor<R>,
}

/// One tensor of a group: its parameter, gradient and moments (`None` on the first step).
#[derive(Debug, Clone)]
pub struct GroupMember<R: CubeRuntime> {
    /// `p`.
    pub param: CubeTensor<R>,
    /// `g`, same shape and dtype.
    pub grad: CubeTensor<R>,
    /// `(m, v)` of the previous steps.
    pub moments: Option<(CubeTensor<R>, CubeTensor<R>)>,
}

/// Launches one AdamW step (see the module's math) of every member of `group` (all with the
/// same dtype, all on their first step or none; at most [`capacity`] of them), returning each
/// member's new `(p', m', v')` in order. The outputs are row-major views into three buffers
/// shared by the group.
///
/// # Panics
/// On an empty group or one larger than [`capacity`], members of mixed dtypes or devices, mixed
/// first/later steps, a gradient or moment whose shape differs from its parameter's, or
/// `time == 0`.
pub fn launch<R: CubeRuntime>(
    group: Vec<GroupMember<R>>,
    scalars: &StepScalars,
) -> Vec<StepOutput<R>> {
    assert!(scalars.time > 0, "adamw_step: the step count starts at 1");
    assert!(!group.is_empty(), "adamw_step: no tensors");
    let client = group[0].param.client.clone();
    assert!(
        group.len() <= capacity(&client),
        "adamw_step: {} tensors (at most {} here)",
        group.len(),
        capacity(&client)
    );
    let first = group[0].moments.is_none();
    let dtype = group[0].param.dtype;
    let device = group[0].param.device.clone();
    for (k, member) in group.iter().enumerate() {
        let shape = member.param.meta.shape();
        assert_eq!(
            member.param.dtype, dtype,
            "adamw_step: tensor {k} dtype differs"
        );
        assert_eq!(
            member.moments.is_none(),
            first,
            "adamw_step: tensor {k} mixes first and later steps"
        );
        let mut others = vec![("grad", &member.grad)];
        if let Some((m, v)) = &member.moments {
            others.extend([("moment_1", m), ("moment_2", v)]);
        }
        for (name, t) in others {
            assert_eq!(
                t.meta.shape(),
                shape,
                "adamw_step: tensor {k} `{name}` shape differs from the parameter's"
            );
            assert_eq!(t.dtype, dtype, "adamw_step: tensor {k} `{name}` dtype");
            member.param.assert_is_on_same_device(t);
        }
    }

    // One buffer per output kind, each member a view starting on a VIEW_ALIGN boundary.
    let elem = dtype.size();
    let mut offsets = Vec::with_capacity(group.len());
    let mut total = 0usize;
    for member in &group {
        offsets.push(total);
        let bytes = member.param.meta.shape().num_elements() * elem;
        total += bytes.div_ceil(VIEW_ALIGN).max(1) * VIEW_ALIGN;
    }
    let buffer = || client.empty(total);
    let views = |handle: cubecl::server::Handle| -> Vec<CubeTensor<R>> {
        group
            .iter()
            .zip(&offsets)
            .map(|(member, &offset)| {
                let shape: Shape = member.param.meta.shape().clone();
                let bytes = shape.num_elements() * elem;
                let view = handle
                    .clone()
                    .offset_start(offset as u64)
                    .offset_end((total - offset - bytes) as u64);
                CubeTensor::new_contiguous(client.clone(), device.clone(), shape, view, dtype)
            })
            .collect()
    };
    let params_out = views(buffer());
    let moments_1_out = views(buffer());
    let moments_2_out = views(buffer());

    let mut inputs: [Vec<CubeTensor<R>>; 4] = Default::default();
    for member in group {
        let grad = contiguous(member.grad);
        // On the first step the kernel reads no moments: the gradient stands in for them.
        let (m, v) = match member.moments {
            Some((m, v)) => (contiguous(m), contiguous(v)),
            None => (grad.clone(), grad.clone()),
        };
        inputs[0].push(contiguous(member.param));
        inputs[1].push(grad);
        inputs[2].push(m);
        inputs[3].push(v);
    }
    let largest = params_out
        .iter()
        .map(|t| t.meta.shape().num_elements())
        .max()
        .unwrap_or(0);
    let outputs = params_out
        .iter()
        .zip(&moments_1_out)
        .zip(&moments_2_out)
        .map(|((p, m), v)| StepOutput {
            param: p.clone(),
            moment_1: m.clone(),
            moment_2: v.clone(),
        })
        .collect();
    if largest == 0 {
        return outputs;
    }

    let all: Vec<&CubeTensor<R>> = inputs
        .iter()
        .flatten()
        .chain(&params_out)
        .chain(&moments_1_out)
        .chain(&moments_2_out)
        .collect();
    let address = address_type(&all);
    let [params, grads, moments_1, moments_2] = inputs;
    let cubes_x = largest.div_ceil(CUBE as usize).min(MAX_CUBES_X) as u32;
    let count = params.len() as u32;
    // Burn: `mul_scalar(1 − β)`, `div_scalar(1 − βᵗ)` with f32 β and `powi`.
    let time = i32::try_from(scalars.time).expect("adamw_step: step count overflows i32");
    let correction_1 = 1f32 - scalars.beta_1.powi(time);
    let correction_2 = 1f32 - scalars.beta_2.powi(time);
    // Burn: `decay_rate = lr · wd` in f64, `mul_scalar(1 − decay_rate)`, skipped when 0.
    let decay_rate = scalars.lr * f64::from(scalars.weight_decay);
    adamw_step_kernel::launch::<R>(
        &client,
        CubeCount::Static(cubes_x, count, 1),
        CubeDim::new_1d(CUBE),
        address,
        params.into_iter().map(|t| t.into_array_arg()).collect(),
        grads.into_iter().map(|t| t.into_array_arg()).collect(),
        moments_1.into_iter().map(|t| t.into_array_arg()).collect(),
        moments_2.into_iter().map(|t| t.into_array_arg()).collect(),
        params_out.into_iter().map(|t| t.into_array_arg()).collect(),
        moments_1_out
            .into_iter()
            .map(|t| t.into_array_arg())
            .collect(),
        moments_2_out
            .into_iter()
            .map(|t| t.into_array_arg())
            .collect(),
        scalars.beta_1,
        1.0 - scalars.beta_1,
        scalars.beta_2,
        1.0 - scalars.beta_2,
        correction_1,
        correction_2,
        scalars.epsilon,
        (1.0 - decay_rate) as f32,
        scalars.lr as f32,
        first,
        decay_rate != 0.0,
        dtype.into(),
    );
    outputs
}
