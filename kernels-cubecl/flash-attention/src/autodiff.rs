//! [`FlashAttentionBackend`] for `Autodiff<B>`: the forward on the inner backend registered as
//! one graph node that keeps only `q`, `k`, `v`, `o` and the f32 LSE, with the hand-written
//! block-wise backward.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;

use crate::op::{AttentionKernels, FlashAttentionBackend, Geometry, Saved, backward, forward};

/// The graph node's backward step. Parents: `q`, `k`, `v`.
#[derive(Debug)]
struct FlashAttentionBackward;

impl<B: AttentionKernels> Backward<B, 3> for FlashAttentionBackward {
    type State = Saved<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<B>(&ops.node);
        let (dq, dk, dv) = backward::<B>(d_o, ops.state);
        for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: AttentionKernels, C: CheckpointStrategy> FlashAttentionBackend for Autodiff<B, C> {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_mask: Option<FloatTensor<Self>>,
        geometry: Geometry,
    ) -> FloatTensor<Self> {
        let nodes = [&q, &k, &v].map(|t| t.node.clone());
        // The mask is data, not a parent: no gradient flows to it.
        let key_mask = key_mask.map(|m| m.primitive);
        let (q, k, v) = (q.primitive, k.primitive, v.primitive);
        match FlashAttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (o, saved) = forward::<B>(q, k, v, key_mask, geometry);
                prep.finish(saved, o)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::<B>(q, k, v, key_mask, geometry).0),
        }
    }
}
