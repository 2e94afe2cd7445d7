//! Rotary position embedding as one op: one CubeCL kernel forward and the same kernel, with the
//! rotation transposed, backward (`kernels::rope`), in place of the portable path's slices,
//! negation, concatenation and two products (each a kernel, and each kept by autodiff).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;

/// The RoPE kernel on a backend's primitives.
pub trait RopeKernels: Backend {
    /// `x` rotated by the tables (`sign = 1`), or the transposed rotation (`sign = −1`, the
    /// backward: `dx` from `dy`).
    ///
    /// # Shapes
    /// - x: `[b, h, s, d]` (any strides); cos, sin: `[1, s, d]` or `[b, s, d]` f32
    /// - returns `[b, h, s, d]` in `x`'s dtype
    fn rope_rotate(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        sign: f32,
    ) -> FloatTensor<Self>;
}

/// RoPE over `[b, h, s, d]` as one op (autodiff: one graph node, which keeps only the tables).
pub trait RopeBackend: Backend {
    /// `x·cos + rotate_half(x)·sin`.
    ///
    /// # Shapes
    /// - x: `[b, h, s, d]`; cos, sin: `[1, s, d]` or `[b, s, d]` f32 (no gradient)
    /// - returns `[b, h, s, d]`
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

#[cfg(feature = "cubecl")]
mod cube {
    use burn::tensor::ops::{FloatTensor, FloatTensorOps};
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use super::{RopeBackend, RopeKernels};
    use crate::kernels::rope;

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RopeKernels
        for CubeBackend<R, F, I, BT>
    {
        fn rope_rotate(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            sign: f32,
        ) -> FloatTensor<Self> {
            // The kernel writes [b, s, h, d]; the op's output is its [b, h, s, d] view.
            Self::float_swap_dims(rope::launch(&x, &cos, &sin, sign), 1, 2)
        }
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RopeBackend
        for CubeBackend<R, F, I, BT>
    {
        fn rope(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            Self::rope_rotate(x, cos, sin, 1.0)
        }
    }
}

/// The graph node's backward step. Parent: `x` (the tables are constants).
#[derive(Debug)]
struct RopeBackward;

impl<B: RopeKernels> Backward<B, 1> for RopeBackward {
    /// The tables `(cos, sin)`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let (cos, sin) = ops.state;
            grads.register::<B>(node.id, B::rope_rotate(dy, cos, sin, -1.0));
        }
    }
}

impl<B: RopeKernels, C: CheckpointStrategy> RopeBackend for Autodiff<B, C> {
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (cos, sin) = (cos.primitive, sin.primitive);
        match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::rope_rotate(x.primitive, cos.clone(), sin.clone(), 1.0);
                prep.finish((cos, sin), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope_rotate(x.primitive, cos, sin, 1.0)),
        }
    }
}

/// The portable RoPE (transformers' `apply_rotary_pos_emb` with `rotate_half`): the op's oracle
/// and the path on every other backend. The tables are cast to `x`'s dtype first, as
/// transformers does.
///
/// # Shapes
/// - x: `[b, h, s, d]`; cos, sin: `[1, s, d]` (every row at the same positions) or `[b, s, d]`
/// - returns `[b, h, s, d]`
pub fn rope_portable<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
) -> Tensor<B, 4> {
    let [_, _, _, head_dim] = x.dims();
    let dtype = x.dtype();
    // [tb, s, d] -> [tb, 1, s, d]: broadcast over the heads.
    let cos = cos.cast(dtype).unsqueeze_dim::<4>(1);
    let sin = sin.cast(dtype).unsqueeze_dim::<4>(1);
    let half = head_dim / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}
