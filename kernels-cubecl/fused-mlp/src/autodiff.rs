//! [`FusedMlpBackend`] for `Autodiff<B>`: the fused forward on the inner backend registered as
//! one graph node, with a hand-written backward (Unsloth's `LoRA_MLP.backward`).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};

use crate::op::{
    FusedMlpBackend, FusedMlpKernels, MlpWeights, OutputUse, Saved, backward, forward, weights_in,
};

/// The graph node's backward step. Parents, in order: `x`, then the nine weights in
/// [`MlpWeights::into_array`] order.
#[derive(Debug)]
struct FusedLoraMlpBackward;

impl<B: FusedMlpKernels> Backward<B, 10> for FusedLoraMlpBackward {
    /// What the backward needs, and the parents' dtypes (each gradient is returned in its
    /// parent's).
    type State = (Saved<FloatTensor<B>>, [DType; 10]);

    fn backward(self, ops: Ops<Self::State, 10>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let need = ops.parents.each_ref().map(Option::is_some);
        let (saved, dtypes) = ops.state;
        let out = crate::cast::each_in::<B, 10>(backward::<B>(dy, saved, need), dtypes);
        for (parent, grad) in ops.parents.into_iter().zip(out) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FusedMlpKernels, C: CheckpointStrategy> FusedMlpBackend for Autodiff<B, C> {
    fn fused_lora_mlp(
        x: FloatTensor<Self>,
        weights: MlpWeights<FloatTensor<Self>>,
        output: OutputUse,
    ) -> FloatTensor<Self> {
        let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = weights.as_ref().into_array();
        let nodes = [&x, w0, w1, w2, w3, w4, w5, w6, w7, w8].map(|t| t.node.clone());

        // Compute-bound: the state (x, e, g and the weights, all buffers that exist anyway
        // except e and g) is kept rather than the op being recomputed under checkpointing.
        let prep = FusedLoraMlpBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful();
        let dtypes = [&x, w0, w1, w2, w3, w4, w5, w6, w7, w8].map(|t| t.primitive.dtype());
        let inner = weights_in::<B>(weights.map(|w| w.primitive), dtypes[0]);
        match prep {
            OpsKind::Tracked(prep) => {
                let (y, saved) = forward::<B>(x.primitive, inner, output);
                prep.finish((saved, dtypes), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::<B>(x.primitive, inner, output).0),
        }
    }
}
