//! One LoRA projection as one operation with a hand-written backward (Unsloth's `LoRA_W` /
//! `matmul_lora`): every product goes through [`FusedMlpKernels::gemm`], so on CUDA the
//! attention projections and the LM head run on cuBLAS instead of Burn's matmul.
//!
//! ```text
//! forward:  xa = x·Aᵀ             y = x·Wᵀ + s·xa·Bᵀ             (x·Wᵀ β-accumulated onto s·xa·Bᵀ)
//! backward: δxa = δy·B            dA = s·δxaᵀ·x      dB = s·δyᵀ·xa      dW = δyᵀ·x
//!           dx = δy·W + s·δxa·A
//! ```
//!
//! Saved for backward: `x` and `xa` (`[N, r]`), plus the weights. Without an adapter it is the
//! plain `y = x·Wᵀ` with `dx = δy·W` (and `dW` when the weight trains).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata, TensorPrimitive};

use crate::op::{FusedMlpKernels, Trans};

/// A backend that runs a (LoRA) projection as one operation.
///
/// Implemented for `CubeBackend<R, F, I, BT>` (feature `cubecl`; forward only) and for
/// `Autodiff` over any [`FusedMlpKernels`] backend (with the backward above).
pub trait FusedLinearBackend: Backend {
    /// `y = x·Wᵀ`, `x` `[N, d_in]`, `W` `[d_out, d_in]`; `y` in `x`'s dtype (a weight of another
    /// dtype is cast to it, and its gradient comes back in its own).
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, `A` `[r, d_in]`, `B` `[d_out, r]`; `y` in `x`'s dtype (weights
    /// of other dtypes cast to it in one group, their gradients returned in their own).
    fn fused_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
    ) -> FloatTensor<Self>;
}

fn plain_forward<B: FusedMlpKernels>(x: &FloatTensor<B>, w: &FloatTensor<B>) -> FloatTensor<B> {
    B::gemm(x.clone(), Trans::N, w.clone(), Trans::T, 1.0, None)
}

/// `(x·Wᵀ + s·xa·Bᵀ, xa)` with `xa = x·Aᵀ`: the LoRA projection's forward (the fused QKV op
/// runs it per projection).
pub(crate) fn lora_forward<B: FusedMlpKernels>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    s: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    use Trans::{N, T};
    let xa = B::gemm(x.clone(), N, a, T, 1.0, None);
    // The rank-r product first, the base GEMM accumulating onto it: the compute-bound GEMM
    // absorbs the read of its accumulator, where the rank-r one would have to read `[N, d_out]`
    // again for little arithmetic.
    let update = B::gemm(xa.clone(), N, b, T, s, None);
    (B::gemm(x, N, w, T, 1.0, Some(update)), xa)
}

#[cfg(feature = "cubecl")]
impl<R, F, I, BT> FusedLinearBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let [weight] = crate::cast::all_in::<Self, 1>([weight], x.dtype);
        plain_forward::<Self>(&x, &weight)
    }

    fn fused_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
    ) -> FloatTensor<Self> {
        let [w, a, b] = crate::cast::all_in::<Self, 3>([weight, lora_a, lora_b], x.dtype);
        lora_forward::<Self>(x, w, a, b, scaling).0
    }
}

/// Backward of the plain projection. Parents: `x`, `W`. State: `x` (for `dW`), `W` in `x`'s
/// dtype, and `W`'s own dtype (its gradient's).
#[derive(Debug)]
struct LinearBackward;

impl<B: FusedMlpKernels> Backward<B, 2> for LinearBackward {
    type State = (Option<FloatTensor<B>>, FloatTensor<B>, DType);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        use Trans::{N, T};
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, w_dtype) = ops.state;
        let [x_node, w_node] = ops.parents;
        if let (Some(node), Some(x)) = (w_node, x) {
            let dw = B::gemm(dy.clone(), T, x, N, 1.0, None);
            let [dw] = crate::cast::all_in::<B, 1>([dw], w_dtype);
            grads.register::<B>(node.id, dw);
        }
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::gemm(dy, N, w, N, 1.0, None));
        }
    }
}

/// What the LoRA projection's backward needs: `x`, `xa`, the weights in `x`'s dtype, and the
/// dtypes of the parents `x`, `W`, `A`, `B` (each gradient is returned in its parent's).
#[derive(Debug, Clone)]
struct LoraSaved<T> {
    x: T,
    xa: T,
    w: T,
    a: T,
    b: T,
    s: f64,
    dtypes: [DType; 4],
}

/// Backward of the LoRA projection. Parents: `x`, `W`, `A`, `B`.
#[derive(Debug)]
struct LoraLinearBackward;

impl<B: FusedMlpKernels> Backward<B, 4> for LoraLinearBackward {
    type State = LoraSaved<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        use Trans::{N, T};
        let dy = grads.consume::<B>(&ops.node);
        let LoraSaved {
            x,
            xa,
            w,
            a,
            b,
            s,
            dtypes,
        } = ops.state;
        let need = ops.parents.each_ref().map(Option::is_some);
        let [need_x, need_w, need_a, need_b] = need;
        let mut out: [Option<FloatTensor<B>>; 4] = Default::default();
        let dxa = (need_x || need_a).then(|| B::gemm(dy.clone(), N, b, N, 1.0, None));
        if need_b {
            out[3] = Some(B::gemm(dy.clone(), T, xa, N, s, None));
        }
        if need_a {
            let dxa = dxa.clone().expect("computed for A");
            out[2] = Some(B::gemm(dxa, T, x.clone(), N, s, None));
        }
        if need_w {
            out[1] = Some(B::gemm(dy.clone(), T, x, N, 1.0, None));
        }
        if need_x {
            // As in forward: the rank-r term first, accumulated into by the base product.
            let dxa = dxa.expect("computed for x");
            let update = B::gemm(dxa, N, a, N, s, None);
            out[0] = Some(B::gemm(dy, N, w, N, 1.0, Some(update)));
        }
        let out = crate::cast::each_in::<B, 4>(out, dtypes);
        for (parent, grad) in ops.parents.into_iter().zip(out) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FusedMlpKernels, C: CheckpointStrategy> FusedLinearBackend for Autodiff<B, C> {
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [x.node.clone(), weight.node.clone()];
        // x is kept only for a trainable weight's gradient.
        let keep_x = !weight.node.requirement.is_none();
        let w_dtype = weight.primitive.dtype();
        let [w] = crate::cast::all_in::<B, 1>([weight.primitive], x.primitive.dtype());
        match LinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = plain_forward::<B>(&x.primitive, &w);
                let x = keep_x.then_some(x.primitive);
                prep.finish((x, w, w_dtype), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(plain_forward::<B>(&x.primitive, &w)),
        }
    }

    fn fused_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
    ) -> FloatTensor<Self> {
        let nodes = [&x, &weight, &lora_a, &lora_b].map(|t| t.node.clone());
        let dtypes = [&x, &weight, &lora_a, &lora_b].map(|t| t.primitive.dtype());
        let x = x.primitive;
        let [w, a, b] = crate::cast::all_in::<B, 3>(
            [weight.primitive, lora_a.primitive, lora_b.primitive],
            dtypes[0],
        );
        match LoraLinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, xa) =
                    lora_forward::<B>(x.clone(), w.clone(), a.clone(), b.clone(), scaling);
                let saved = LoraSaved {
                    x,
                    xa,
                    w,
                    a,
                    b,
                    s: scaling,
                    dtypes,
                };
                prep.finish(saved, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(lora_forward::<B>(x, w, a, b, scaling).0),
        }
    }
}

/// `x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ)` on `[..., d_in]` activations through [`FusedLinearBackend`] (the op
/// uses the weights in `x`'s dtype and returns each weight's gradient in its own).
///
/// # Shapes
/// - x: `[..., d_in]`; weight: `[d_out, d_in]`; lora: `A` `[r, d_in]`, `B` `[d_out, r]`
/// - output: `[..., d_out]`
pub fn fused_linear_nd<B: FusedLinearBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    lora: Option<(Tensor<B, 2>, Tensor<B, 2>, f64)>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let d_out = weight.dims()[0];
    let rows = dims[..D - 1].iter().product();
    let prim = |t: Tensor<B, 2>| t.into_primitive().tensor();
    let x = x.reshape([rows, d_in]).into_primitive().tensor();
    let y = match lora {
        Some((a, b, s)) => B::fused_lora_linear(x, prim(weight), prim(a), prim(b), s),
        None => B::fused_linear(x, prim(weight)),
    };
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(out_dims)
}
