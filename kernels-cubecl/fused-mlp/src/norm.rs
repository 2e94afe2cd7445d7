//! RMSNorm with a frozen gain as one op: one CubeCL kernel forward (keeping only the per-row
//! `1/rms`, f32) and one backward (`kernels::rms_norm_forward` / `rms_norm_backward`), in place
//! of the portable path's chain of element-wise ops, whose autodiff graph keeps f32 copies of
//! the activation.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;

/// The two RMSNorm kernels on a backend's primitives.
pub trait RmsNormKernels: Backend {
    /// `y = F(x·r)·w` and `r = 1/√(mean(x²) + ε)` per row; `y` with `spare_columns` spare
    /// columns (see [`RmsNormBackend::rms_norm`]).
    ///
    /// # Shapes
    /// - x: `[N, H]`; weight: `[H]` (x's dtype)
    /// - returns y `[N, H]` and r `[N]` (f32)
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        spare_columns: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `dx` for the upstream gradient `dy` (see `kernels::rms_norm_backward`).
    ///
    /// # Shapes
    /// - dy, x: `[N, H]`; weight: `[H]`; rstd: `[N]`
    /// - returns dx `[N, H]`
    fn rms_norm_backward(
        dy: FloatTensor<Self>,
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// RMSNorm over the last dimension of `[N, H]` as one op (autodiff: one graph node).
pub trait RmsNormBackend: Backend {
    /// The normalised rows times the frozen `weight`, stored with `spare_columns` columns of
    /// room after each row that only the fused MLP writes (its `x·Aᵀ` terms beside `x`, see
    /// [`crate::FusedMlpKernels::spare_columns`]); the values are the same either way.
    ///
    /// # Shapes
    /// - x: `[N, H]`; weight: `[H]`
    /// - returns `[N, H]`
    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        spare_columns: usize,
    ) -> FloatTensor<Self>;
}

#[cfg(feature = "cubecl")]
mod cube {
    use burn::tensor::ops::FloatTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use super::{RmsNormBackend, RmsNormKernels};
    use crate::kernels::{rms_norm_backward, rms_norm_forward};

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RmsNormKernels
        for CubeBackend<R, F, I, BT>
    {
        fn rms_norm_forward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            eps: f64,
            spare_columns: usize,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            rms_norm_forward::launch(&x, &weight, eps as f32, spare_columns)
        }

        fn rms_norm_backward(
            dy: FloatTensor<Self>,
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            rstd: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            rms_norm_backward::launch(&dy, &x, &weight, &rstd)
        }
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RmsNormBackend
        for CubeBackend<R, F, I, BT>
    {
        fn rms_norm(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            eps: f64,
            spare_columns: usize,
        ) -> FloatTensor<Self> {
            Self::rms_norm_forward(x, weight, eps, spare_columns).0
        }
    }
}

/// The graph node's backward step. Parent: `x` (the gain is frozen).
#[derive(Debug)]
struct RmsNormBackward;

/// What the backward reads: the input, the gain and the per-row `1/rms`.
#[derive(Debug, Clone)]
struct Saved<T> {
    x: T,
    weight: T,
    rstd: T,
}

impl<B: RmsNormKernels> Backward<B, 1> for RmsNormBackward {
    type State = Saved<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let Saved { x, weight, rstd } = ops.state;
            grads.register::<B>(node.id, B::rms_norm_backward(dy, x, weight, rstd));
        }
    }
}

impl<B: RmsNormKernels, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        spare_columns: usize,
    ) -> FloatTensor<Self> {
        assert!(
            !weight.is_tracked(),
            "rms_norm: the fused op has no gradient for the gain; a trainable norm takes the \
             portable path"
        );
        // Memory-bound and cheap: keeping x (which the layer keeps anyway) and [N] f32 beats
        // recomputing under Burn's checkpointing.
        let prep = RmsNormBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful();
        let weight = weight.primitive;
        match prep {
            OpsKind::Tracked(prep) => {
                let (y, rstd) =
                    B::rms_norm_forward(x.primitive.clone(), weight.clone(), eps, spare_columns);
                let saved = Saved {
                    x: x.primitive,
                    weight,
                    rstd,
                };
                prep.finish(saved, y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::rms_norm_forward(x.primitive, weight, eps, spare_columns).0)
            }
        }
    }
}

/// The portable RMSNorm (transformers' `LlamaRMSNorm`): the op's oracle and the path on every
/// other backend.
///
/// # Shapes
/// - x: `[..., H]`; weight: `[H]`
/// - returns `[..., H]`
pub fn rms_norm_portable<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(burn::tensor::DType::F32);
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    let normed = x * (variance + eps).sqrt().recip();
    normed.cast(dtype) * weight.unsqueeze()
}
