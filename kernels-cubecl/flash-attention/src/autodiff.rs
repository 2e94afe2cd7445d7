//! [`FlashAttentionBackend`] for `Autodiff<B>`: the forward on the inner backend registered as
//! one graph node that keeps only `q`, `k`, `v`, `o` and the f32 LSE, with the hand-written
//! block-wise backward; and the fused kernel's node (`q`, `k`, `v`, `o`, LSE in its layouts,
//! its own backward, the block-wise one as fallback).

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;

use crate::op::{
    AttentionKernels, FlashAttentionBackend, FusedSaved, Geometry, Saved, backward,
    backward_from_fused, forward,
};
use crate::segments::SegmentRuns;

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

/// The fused kernel's graph node. Parents: `q`, `k`, `v`.
#[derive(Debug)]
struct FusedAttentionBackward;

impl<B: AttentionKernels> Backward<B, 3> for FusedAttentionBackward {
    type State = FusedSaved<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<B>(&ops.node);
        let (dq, dk, dv) = match B::fused_backward(&ops.state, d_o.clone()) {
            Some(grads) => grads,
            None => backward_from_fused::<B>(ops.state, d_o),
        };
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
        segments: Option<FloatTensor<Self>>,
        geometry: Geometry,
    ) -> FloatTensor<Self> {
        let nodes = [&q, &k, &v].map(|t| t.node.clone());
        // The segments are data, not a parent: no gradient flows to it.
        let segments = segments.map(|m| m.primitive);
        let (q, k, v) = (q.primitive, k.primitive, v.primitive);
        match FlashAttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (o, saved) = forward::<B>(q, k, v, segments, geometry);
                prep.finish(saved, o)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::<B>(q, k, v, segments, geometry).0),
        }
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        geometry: Geometry,
        runs: Option<Arc<SegmentRuns>>,
    ) -> Result<FloatTensor<Self>, [FloatTensor<Self>; 3]> {
        // Clones of the primitives share their buffers; the autodiff tensors stay whole so that
        // they can be handed back when there is no fused kernel.
        let (o, lse) = match B::fused_forward(
            q.primitive.clone(),
            k.primitive.clone(),
            v.primitive.clone(),
            geometry,
            runs.as_deref(),
        ) {
            Ok(out) => out,
            Err(_) => return Err([q, k, v]),
        };
        let nodes = [&q, &k, &v].map(|t| t.node.clone());
        match FusedAttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let saved = FusedSaved {
                    q: q.primitive,
                    k: k.primitive,
                    v: v.primitive,
                    o: o.clone(),
                    lse,
                    geometry,
                    runs,
                };
                Ok(prep.finish(saved, o))
            }
            OpsKind::UnTracked(prep) => Ok(prep.finish(o)),
        }
    }
}
