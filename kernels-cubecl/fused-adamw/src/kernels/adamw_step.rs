//! One AdamW step of one parameter tensor, the whole of Burn's `AdamW::step` (no AMSGrad, no
//! cautious weight decay) in one pass, in f32 whatever the storage type `F` is:
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
//! Reads `p`, `g`, `m`, `v`; writes `p'`, `m'`, `v'` into new buffers (never in place: the
//! inputs may be shared with other tensors, and new buffers cost no extra launch).

use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::{address_type, contiguous};

/// One unit per element; every tensor is row-major without gaps and has the same shape, so
/// the linear index addresses the same element in all of them.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn adamw_step_kernel<F: Float>(
    param: &Tensor<F>,
    grad: &Tensor<F>,
    moment_1: &Tensor<F>,
    moment_2: &Tensor<F>,
    param_out: &mut Tensor<F>,
    moment_1_out: &mut Tensor<F>,
    moment_2_out: &mut Tensor<F>,
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
    let i = ABSOLUTE_POS;
    if i >= param_out.len() {
        terminate!();
    }
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

/// Launches one AdamW step (see the module's math) of `param` with gradient `grad` and the
/// moments `(m, v)` of the previous steps (`None` on the first step).
///
/// Strided inputs are made row-major first (one copy launch each; parameters and gradients
/// normally are row-major already). The inputs are only read.
///
/// # Panics
/// On mismatched shapes, dtypes or devices, or `time == 0`.
pub fn launch<R: CubeRuntime>(
    param: CubeTensor<R>,
    grad: CubeTensor<R>,
    moments: Option<(CubeTensor<R>, CubeTensor<R>)>,
    scalars: &StepScalars,
) -> StepOutput<R> {
    assert!(scalars.time > 0, "adamw_step: the step count starts at 1");
    let shape = param.meta.shape().clone();
    let mut inputs = vec![("grad", &grad)];
    if let Some((m, v)) = &moments {
        inputs.extend([("moment_1", m), ("moment_2", v)]);
    }
    for (name, t) in inputs {
        assert_eq!(
            t.meta.shape(),
            &shape,
            "adamw_step: `{name}` shape differs from the parameter's"
        );
        assert_eq!(
            t.dtype, param.dtype,
            "adamw_step: `{name}` dtype differs from the parameter's"
        );
        param.assert_is_on_same_device(t);
    }
    let first = moments.is_none();
    let param = contiguous(param);
    let grad = contiguous(grad);
    // On the first step the kernel reads no moments: the gradient stands in for them.
    let (moment_1, moment_2) = match moments {
        Some((m, v)) => (contiguous(m), contiguous(v)),
        None => (grad.clone(), grad.clone()),
    };
    // Row-major without gaps, as the kernel indexes linearly: CubeCL's default layout pads the
    // rows of some shapes on CUDA ("pitched").
    let new = || {
        empty_device_contiguous_dtype::<R>(
            param.client.clone(),
            param.device.clone(),
            shape.clone(),
            param.dtype,
        )
    };
    let (param_out, moment_1_out, moment_2_out) = (new(), new(), new());

    let units = shape.num_elements();
    if units > 0 {
        let client = param.client.clone();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        // Burn: `mul_scalar(1 − β)`, `div_scalar(1 − βᵗ)` with f32 β and `powi`.
        let time = i32::try_from(scalars.time).expect("adamw_step: step count overflows i32");
        let correction_1 = 1f32 - scalars.beta_1.powi(time);
        let correction_2 = 1f32 - scalars.beta_2.powi(time);
        // Burn: `decay_rate = lr · wd` in f64, `mul_scalar(1 − decay_rate)`, skipped when 0.
        let decay_rate = scalars.lr * f64::from(scalars.weight_decay);
        let address = address_type(&[
            &param,
            &grad,
            &moment_1,
            &moment_2,
            &param_out,
            &moment_1_out,
            &moment_2_out,
        ]);
        adamw_step_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address,
            param.into_tensor_arg(),
            grad.into_tensor_arg(),
            moment_1.into_tensor_arg(),
            moment_2.into_tensor_arg(),
            param_out.clone().into_tensor_arg(),
            moment_1_out.clone().into_tensor_arg(),
            moment_2_out.clone().into_tensor_arg(),
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
            param_out.dtype.into(),
        );
    }
    StepOutput {
        param: param_out,
        moment_1: moment_1_out,
        moment_2: moment_2_out,
    }
}
