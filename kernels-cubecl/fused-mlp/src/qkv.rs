//! The query, key and value LoRA projections of one input as one operation with a hand-written
//! backward (Unsloth's `LoRA_QKV`): every product goes through [`FusedMlpKernels::gemm`].
//!
//! ```text
//! forward:  [xa_q | xa_k | xa_v]ᵀ = [A_q; A_k; A_v]·xᵀ     y_p = x·W_pᵀ + s_p·xa_p·B_pᵀ     p ∈ {q, k, v}
//! backward: δxa_p = s_p·δy_p·B_p                 δxa = [δxa_q | δxa_k | δxa_v]   ([N, Σr])
//!           [dA_q; dA_k; dA_v] = δxaᵀ·x          dB_p = s_p·δy_pᵀ·xa_p           dW_p = δy_pᵀ·x
//!           dx = δxa·[A_q; A_k; A_v] + δy_q·W_q + δy_k·W_k + δy_v·W_v
//! ```
//!
//! What one op buys over three projection ops: the three `xa_p` come from one GEMM that reads `x`
//! once (computed transposed, `[Σr, N]`, so that each `xa_pᵀ` is a block of whole rows: a view,
//! where a block of columns of `[N, Σr]` is misaligned for a view and would be copied); in the
//! backward `dx` is one accumulator that the rank-Σr GEMM writes and the three base GEMMs add onto
//! (three projection ops write three `[N, d]` partial `dx` and autodiff adds them), and the three
//! `dA` come from one GEMM that reads `x` once.
//!
//! Burn's autodiff gives an operation one output. The op is therefore a graph node whose output
//! is an empty placeholder, and `q`, `k`, `v` are three nodes whose only parent is that node.
//! A node's backward runs after the backward of every node it is a parent of (the tape runs by
//! depth), so the three output nodes hand their `δy_p` over first, through a shared slot
//! ([`OutputGrads`]) rather than [`Gradients`] (the placeholder's gradient would need their
//! shapes); an output that took no part in the loss hands over nothing and counts as zero.

use std::sync::{Arc, Mutex};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Slice, TensorMetadata, TensorPrimitive};

use crate::op::{FusedMlpKernels, LoraProj, Trans};

/// The three projections of the fused QKV op, in PEFT's layouts (`D` input features).
#[derive(Debug, Clone)]
pub struct QkvWeights<T> {
    /// `q_proj`: `W_q` `[d_q, D]`, `A_q` `[r_q, D]`, `B_q` `[d_q, r_q]`.
    pub q: LoraProj<T>,
    /// `k_proj`: `W_k` `[d_k, D]`, `A_k` `[r_k, D]`, `B_k` `[d_k, r_k]`.
    pub k: LoraProj<T>,
    /// `v_proj`: `W_v` `[d_v, D]`, `A_v` `[r_v, D]`, `B_v` `[d_v, r_v]`.
    pub v: LoraProj<T>,
}

impl<T> QkvWeights<T> {
    /// Applies `f` to the nine tensors (q, k, v; each W, A, B), keeping the scalings.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> QkvWeights<U> {
        QkvWeights {
            q: self.q.map(&mut f),
            k: self.k.map(&mut f),
            v: self.v.map(&mut f),
        }
    }

    /// The same weights by reference.
    pub fn as_ref(&self) -> QkvWeights<&T> {
        QkvWeights {
            q: self.q.as_ref(),
            k: self.k.as_ref(),
            v: self.v.as_ref(),
        }
    }

    /// The nine tensors through `f` at once (in [`QkvWeights::into_array`] order), keeping the
    /// scalings.
    fn map_array<U>(self, f: impl FnOnce([T; 9]) -> [U; 9]) -> QkvWeights<U> {
        let scalings = [self.q.scaling, self.k.scaling, self.v.scaling];
        let [q, k, v] = LoraProj::three_from_array(f(self.into_array()), scalings);
        QkvWeights { q, k, v }
    }

    /// The nine tensors in q, k, v order, each as `[W, A, B]`.
    pub fn into_array(self) -> [T; 9] {
        let [q, k, v] = [self.q, self.k, self.v];
        [
            q.weight, q.lora_a, q.lora_b, k.weight, k.lora_a, k.lora_b, v.weight, v.lora_a,
            v.lora_b,
        ]
    }

    fn into_projections(self) -> [LoraProj<T>; 3] {
        [self.q, self.k, self.v]
    }
}

/// A backend that runs the q, k and v LoRA projections of one input as one operation.
///
/// Implemented for `CubeBackend<R, F, I, BT>` (feature `cubecl`; forward only) and for
/// `Autodiff` over any [`FusedMlpKernels`] backend (with the backward above).
pub trait FusedQkvBackend: Backend {
    /// `[y_q, y_k, y_v]` with `y_p = x·W_pᵀ + s_p·(x·A_pᵀ)·B_pᵀ`, `x` `[N, D]`, `y_p` `[N, d_p]`
    /// in `x`'s dtype. Weights of another dtype are cast to it in one group, and their gradients
    /// come back in their own dtype.
    fn fused_lora_qkv(
        x: FloatTensor<Self>,
        weights: QkvWeights<FloatTensor<Self>>,
    ) -> [FloatTensor<Self>; 3];
}

/// What the backward needs: `x`, the three `xa_pᵀ` (`[r_p, N]`), the stacked `[A_q; A_k; A_v]`
/// (`[Σr, D]`) and the weights.
#[derive(Debug, Clone)]
struct QkvSaved<T> {
    x: T,
    xa_t: [T; 3],
    a_stack: T,
    weights: QkvWeights<T>,
}

/// The forward on primitives, the weights of other dtypes than `x`'s cast to it first.
fn forward<B: FusedMlpKernels>(
    x: FloatTensor<B>,
    weights: QkvWeights<FloatTensor<B>>,
) -> ([FloatTensor<B>; 3], QkvSaved<FloatTensor<B>>) {
    use Trans::{N, T};
    let dtype = x.dtype();
    let mut a_stack = None;
    // The A factors are cast straight into their stack; the weights keep them in their own
    // dtype (only their shapes are read from there).
    let weights = weights.map_array(|[wq, aq, bq, wk, ak, bk, wv, av, bv]| {
        let (cast, stack) = B::cast_group_with_stack(
            vec![wq, bq, wk, bk, wv, bv],
            vec![aq.clone(), ak.clone(), av.clone()],
            dtype,
        );
        a_stack = Some(stack);
        let [wq, bq, wk, bk, wv, bv]: [FloatTensor<B>; 6] = cast
            .try_into()
            .unwrap_or_else(|_| unreachable!("one tensor per input"));
        [wq, aq, bq, wk, ak, bk, wv, av, bv]
    });
    let a_stack = a_stack.expect("set above");
    let projections = weights.as_ref().into_projections();
    let ranks = projections
        .each_ref()
        .map(|p| p.lora_a.shape().dims::<2>()[0]);
    let xa_t = rank_blocks::<B>(B::gemm(a_stack.clone(), N, x.clone(), T, 1.0, None), ranks);
    let outputs = std::array::from_fn(|index| {
        let p = &projections[index];
        // The rank-r product first, the base GEMM accumulating onto it (as `lora_forward`).
        let update = B::gemm(xa_t[index].clone(), T, p.lora_b.clone(), T, p.scaling, None);
        B::gemm(x.clone(), N, p.weight.clone(), T, 1.0, Some(update))
    });
    let saved = QkvSaved {
        x,
        xa_t,
        a_stack,
        weights,
    };
    (outputs, saved)
}

/// The row blocks of `stacked` (`[Σr, ·]`, stacked in q, k, v order) of ranks `ranks`,
/// `[r_p, ·]` each: views, no copies.
fn rank_blocks<B: FusedMlpKernels>(
    stacked: FloatTensor<B>,
    ranks: [usize; 3],
) -> [FloatTensor<B>; 3] {
    let cols = stacked.shape().dims::<2>()[1];
    let mut first = 0;
    ranks.map(|rank| {
        let rows = Slice::from(first..first + rank);
        first += rank;
        B::float_slice(stacked.clone(), &[rows, Slice::from(0..cols)])
    })
}

/// The backward on primitives. `dy[p]` is `None` for an output that took no part in the loss.
/// `need` flags, after `x`, the nine weights in [`QkvWeights::into_array`] order; the result
/// holds the gradients in the same order (`None` where not needed).
fn backward<B: FusedMlpKernels>(
    dy: [Option<FloatTensor<B>>; 3],
    saved: QkvSaved<FloatTensor<B>>,
    need: [bool; 10],
) -> [Option<FloatTensor<B>>; 10] {
    use Trans::{N, T};
    let QkvSaved {
        x,
        xa_t,
        a_stack,
        weights,
    } = saved;
    let projections = weights.into_projections();
    let ranks = projections
        .each_ref()
        .map(|p| p.lora_a.shape().dims::<2>()[0]);
    let mut out: [Option<FloatTensor<B>>; 10] = Default::default();
    let rows = x.shape().dims::<2>()[0];
    let device = B::float_device(&x);
    let dtype = FloatDType::from(x.dtype());
    let need_x = need[0];
    let need_any_a = (0..3).any(|p| need[2 + 3 * p]);

    // δxa_p = s_p·δy_p·B_p, the scaling folded in so that dA and dx take it unchanged; each
    // product written straight into its columns of one `[N, Σr]` buffer.
    let dxa = (need_x || need_any_a).then(|| {
        let shape = [rows, ranks.iter().sum::<usize>()].into();
        let dxa = match dy.iter().all(Option::is_some) {
            true => B::float_empty(shape, &device, dtype),
            false => B::float_zeros(shape, &device, dtype),
        };
        let mut col0 = 0;
        for ((p, dy), rank) in projections.iter().zip(&dy).zip(ranks) {
            if let Some(dy) = dy {
                let b = p.lora_b.clone();
                B::gemm_into_columns(dy.clone(), N, b, N, p.scaling, &dxa, col0);
            }
            col0 += rank;
        }
        dxa
    });

    if let (Some(dxa), true) = (&dxa, need_any_a) {
        let da = B::gemm(dxa.clone(), T, x.clone(), N, 1.0, None);
        for (index, da) in rank_blocks::<B>(da, ranks).into_iter().enumerate() {
            // An output that took no part in the loss leaves its A without a gradient, as
            // autodiff of the separate projections would.
            if need[2 + 3 * index] && dy[index].is_some() {
                out[2 + 3 * index] = Some(da);
            }
        }
    }
    for (index, ((p, dy), xa_t)) in projections.iter().zip(&dy).zip(xa_t).enumerate() {
        let Some(dy) = dy else { continue };
        if need[3 + 3 * index] {
            out[3 + 3 * index] = Some(B::gemm(dy.clone(), T, xa_t, T, p.scaling, None));
        }
        if need[1 + 3 * index] {
            out[1 + 3 * index] = Some(B::gemm(dy.clone(), T, x.clone(), N, 1.0, None));
        }
    }
    if need_x {
        let dxa = dxa.expect("computed for dx");
        // One accumulator: the rank-Σr term, then each base GEMM adds onto it.
        let mut dx = B::gemm(dxa, N, a_stack, N, 1.0, None);
        for (p, dy) in projections.iter().zip(dy) {
            if let Some(dy) = dy {
                dx = B::gemm(dy, N, p.weight.clone(), N, 1.0, Some(dx));
            }
        }
        out[0] = Some(dx);
    }
    out
}

#[cfg(feature = "cubecl")]
impl<R, F, I, BT> FusedQkvBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn fused_lora_qkv(
        x: FloatTensor<Self>,
        weights: QkvWeights<FloatTensor<Self>>,
    ) -> [FloatTensor<Self>; 3] {
        forward::<Self>(x, weights).0
    }
}

/// The gradients of the three outputs, handed by their nodes to the op's node.
#[derive(Debug)]
struct OutputGrads<T>(Mutex<[Option<T>; 3]>);

impl<T> OutputGrads<T> {
    fn put(&self, index: usize, grad: T) {
        self.0.lock().expect("no panic while held")[index] = Some(grad);
    }

    fn take(&self) -> [Option<T>; 3] {
        std::mem::take(&mut *self.0.lock().expect("no panic while held"))
    }
}

/// The op's node. Parents: `x`, then the nine weights in [`QkvWeights::into_array`] order.
#[derive(Debug)]
struct QkvBackward;

impl<B: FusedMlpKernels> Backward<B, 10> for QkvBackward {
    /// What the backward needs, the outputs' gradient slots, and the parents' dtypes (each
    /// gradient is returned in its parent's).
    type State = (
        QkvSaved<FloatTensor<B>>,
        Arc<OutputGrads<FloatTensor<B>>>,
        [DType; 10],
    );

    fn backward(self, ops: Ops<Self::State, 10>, grads: &mut Gradients, _: &mut Checkpointer) {
        // The node's own output is a placeholder that nothing reads: no gradient to consume.
        let (saved, slots, dtypes) = ops.state;
        let need = ops.parents.each_ref().map(Option::is_some);
        let out = crate::cast::each_in::<B, 10>(backward::<B>(slots.take(), saved, need), dtypes);
        for (parent, grad) in ops.parents.into_iter().zip(out) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The node of output `index` (q 0, k 1, v 2): passes its gradient on to the op's node.
#[derive(Debug)]
struct QkvOutputBackward {
    index: usize,
}

impl<B: FusedMlpKernels> Backward<B, 1> for QkvOutputBackward {
    type State = Arc<OutputGrads<FloatTensor<B>>>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        ops.state.put(self.index, grads.consume::<B>(&ops.node));
    }
}

impl<B: FusedMlpKernels, C: CheckpointStrategy> FusedQkvBackend for Autodiff<B, C> {
    fn fused_lora_qkv(
        x: FloatTensor<Self>,
        weights: QkvWeights<FloatTensor<Self>>,
    ) -> [FloatTensor<Self>; 3] {
        let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = weights.as_ref().into_array();
        let nodes = [&x, w0, w1, w2, w3, w4, w5, w6, w7, w8].map(|t| t.node.clone());
        let dtypes = [&x, w0, w1, w2, w3, w4, w5, w6, w7, w8].map(|t| t.primitive.dtype());
        let inner = weights.map(|w| w.primitive);
        match Backward::<B, 10>::prepare::<C>(QkvBackward, nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let device = B::float_device(&x.primitive);
                let dtype = FloatDType::from(x.primitive.dtype());
                let (outputs, saved) = forward::<B>(x.primitive, inner);
                let slots = Arc::new(OutputGrads(Mutex::new(Default::default())));
                let placeholder = B::float_empty([1].into(), &device, dtype);
                let op = prep.finish((saved, slots.clone(), dtypes), placeholder);
                let mut index = 0;
                outputs.map(|y| {
                    let node = QkvOutputBackward { index };
                    index += 1;
                    match Backward::<B, 1>::prepare::<C>(node, [op.node.clone()])
                        .compute_bound()
                        .stateful()
                    {
                        OpsKind::Tracked(prep) => prep.finish(slots.clone(), y),
                        OpsKind::UnTracked(prep) => prep.finish(y),
                    }
                })
            }
            OpsKind::UnTracked(_) => forward::<B>(x.primitive, inner).0.map(Self::from_inner),
        }
    }
}

/// The fused QKV op on `[..., D]` activations: [`FusedQkvBackend::fused_lora_qkv`] with shape
/// checks (the op uses the weights in `x`'s dtype and returns each weight's gradient in its own).
///
/// # Shapes
/// - x: `[..., D]`; weights as [`QkvWeights`]
/// - returns `[..., d_q]`, `[..., d_k]`, `[..., d_v]`
///
/// # Panics
/// If the shapes disagree (see [`QkvWeights`]).
pub fn fused_lora_qkv_nd<B: FusedQkvBackend, const D: usize>(
    x: Tensor<B, D>,
    weights: QkvWeights<Tensor<B, 2>>,
) -> [Tensor<B, D>; 3] {
    let dims = x.dims();
    let d_in = dims[D - 1];
    for (name, p) in ["q", "k", "v"]
        .iter()
        .zip(weights.as_ref().into_projections())
    {
        let [d_out, w_in] = p.weight.dims();
        let [rank, a_in] = p.lora_a.dims();
        assert_eq!(
            w_in, d_in,
            "fused QKV: `{name}.weight` takes {w_in} features, x has {d_in}"
        );
        assert_eq!(
            a_in, d_in,
            "fused QKV: `{name}.lora_a` takes {a_in} features, x has {d_in}"
        );
        assert_eq!(
            p.lora_b.dims(),
            [d_out, rank],
            "fused QKV: `{name}.lora_b` must be [{d_out}, {rank}]"
        );
    }
    let rows = dims[..D - 1].iter().product();
    let weights = weights.map(|t| t.into_primitive().tensor());
    let x = x.reshape([rows, d_in]).into_primitive().tensor();
    B::fused_lora_qkv(x, weights).map(|y| {
        let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y));
        let mut out_dims = dims;
        out_dims[D - 1] = y.dims()[1];
        y.reshape(out_dims)
    })
}
