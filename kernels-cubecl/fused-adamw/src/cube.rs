//! The optimizer step and the squared-norm accumulation on `CubeTensor<R>` primitives: moving
//! `B`'s tensors (whose primitive [`crate::dispatch`] found to be `CubeTensor<R>`) into the
//! kernels' launches and back.

use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate};
use burn::prelude::*;
use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::zeros_client;
use burn_cubecl::tensor::CubeTensor;

use crate::FusedAdamW;
use crate::dispatch::{from_prim, into_prim};
use crate::kernels::{adamw_step, squared_norm};

/// The float dtypes the kernels read and write (as the kernels' generic float type).
pub(crate) fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Whether the kernel can step `tensor`: a dtype it handles, and the gradient and moments of the
/// same dtype, shape and device.
pub(crate) fn kernel_takes<B: Backend, const D: usize>(
    tensor: &Tensor<B, D>,
    grad: &Tensor<B, D>,
    state: Option<&AdamWState<B, D>>,
) -> bool {
    let (dtype, dims, device) = (tensor.dtype(), tensor.dims(), tensor.device());
    let same = |t: &Tensor<B, D>| t.dtype() == dtype && t.dims() == dims && t.device() == device;
    kernel_dtype(dtype)
        && same(grad)
        && state.is_none_or(|s| same(&s.momentum.moment_1) && same(&s.momentum.moment_2))
}

/// What [`step`] returns: the new parameter and state, or its inputs back when the kernel
/// cannot take them (mixed dtypes or shapes, a dtype the kernel does not handle).
pub(crate) type StepResult<B, const D: usize> = Result<
    (Tensor<B, D>, Option<AdamWState<B, D>>),
    (Tensor<B, D>, Tensor<B, D>, Option<AdamWState<B, D>>),
>;

/// One AdamW step as one kernel launch (a group of one). `B`'s float primitive must be
/// `CubeTensor<R>`.
pub(crate) fn step<B: Backend, R: CubeRuntime, const D: usize>(
    optim: &FusedAdamW,
    lr: LearningRate,
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    state: Option<AdamWState<B, D>>,
) -> StepResult<B, D> {
    if !kernel_takes(&tensor, &grad, state.as_ref()) {
        return Err((tensor, grad, state));
    }
    let (time, moments, max_moment_2) = match state {
        Some(AdamWState { momentum }) => (
            momentum.time + 1,
            Some((
                into_prim::<B, CubeTensor<R>, D>(momentum.moment_1),
                into_prim::<B, CubeTensor<R>, D>(momentum.moment_2),
            )),
            // Never read or changed without AMSGrad (Burn's AdamW keeps it as it is too).
            momentum.max_moment_2,
        ),
        None => (1, None, None),
    };
    let member = adamw_step::GroupMember {
        param: into_prim::<B, CubeTensor<R>, D>(tensor),
        grad: into_prim::<B, CubeTensor<R>, D>(grad),
        moments,
    };
    let scalars = adamw_step::StepScalars {
        beta_1: optim.beta_1,
        beta_2: optim.beta_2,
        epsilon: optim.epsilon,
        weight_decay: optim.weight_decay,
        lr,
        time,
    };
    let out = adamw_step::launch::<R>(vec![member], &scalars)
        .pop()
        .expect("one output per member");
    let state = AdamWState {
        momentum: AdaptiveMomentumState {
            time,
            moment_1: from_prim::<B, CubeTensor<R>, D>(out.moment_1),
            moment_2: from_prim::<B, CubeTensor<R>, D>(out.moment_2),
            max_moment_2,
        },
    };
    Ok((from_prim::<B, CubeTensor<R>, D>(out.param), Some(state)))
}

/// Adds the squares of `grad`'s elements into `slots` (an f32 `[SLOTS]` tensor, created zeroed
/// on `grad`'s device when `None`) with one kernel launch; returns the slots.
/// `B`'s float primitive must be `CubeTensor<R>` and `grad`'s dtype one [`kernel_dtype`] takes.
pub(crate) fn add_squares<B: Backend, R: CubeRuntime, const D: usize>(
    slots: Option<Tensor<B, 1>>,
    grad: Tensor<B, D>,
) -> Tensor<B, 1> {
    let grad = into_prim::<B, CubeTensor<R>, D>(grad);
    let slots = match slots {
        Some(slots) => into_prim::<B, CubeTensor<R>, 1>(slots),
        None => zeros_client::<R>(
            grad.client.clone(),
            grad.device.clone(),
            burn::tensor::Shape::new([squared_norm::SLOTS]),
            DType::F32,
        ),
    };
    squared_norm::launch::<R>(grad, &slots);
    from_prim::<B, CubeTensor<R>, 1>(slots)
}
