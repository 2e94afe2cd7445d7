//! The op's traits and its forward and backward passes on primitives, written once over
//! [`AttentionKernels`] (the two softmax steps) and `FusedMlpKernels::gemm` (every product).
// The block loop is reached only through the CubeCL backends (feature `cubecl`); without
// one the helpers below have no caller.
#![cfg_attr(not(feature = "cubecl"), allow(dead_code))]

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::ops::FloatTensor;
use fused_mlp::{FusedMlpKernels, Trans};

use crate::segments::{SegmentRuns, Segments};

/// Bytes the transient score tile of one query block may take, counted at 4 bytes per score
/// (`b·kvh·(block_q·g)·s`): the default block size keeps each block's `S` (and, in backward,
/// `dP`) under this.
pub const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// The problem's sizes, in the op's layout (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Batch `b`.
    pub batch: usize,
    /// Key/value heads `kvh`.
    pub kv_heads: usize,
    /// Query heads per KV head, `g = h / kvh`.
    pub groups: usize,
    /// Sequence length `s` (queries and keys).
    pub seq: usize,
    /// Head width `d`.
    pub head_dim: usize,
    /// Query positions per block.
    pub block_q: usize,
}

impl Geometry {
    /// The geometry, with `block_q` defaulted from [`SCORE_BUDGET_BYTES`] and clamped to `[1, s]`.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        groups: usize,
        seq: usize,
        head_dim: usize,
        block_q: Option<usize>,
    ) -> Self {
        let per_position = (batch * kv_heads * groups * seq * 4).max(1);
        let block_q = block_q
            .unwrap_or(SCORE_BUDGET_BYTES / per_position)
            .clamp(1, seq.max(1));
        Self {
            batch,
            kv_heads,
            groups,
            seq,
            head_dim,
            block_q,
        }
    }

    /// GEMM batch entries, `b·kvh`.
    pub fn entries(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// The softmax scale `1/√d`.
    pub fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// The query blocks `[i0, i1)`, in order.
    pub fn blocks(&self) -> Vec<(usize, usize)> {
        (0..self.seq)
            .step_by(self.block_q)
            .map(|i0| (i0, (i0 + self.block_q).min(self.seq)))
            .collect()
    }
}

/// Where a score block sits: its first query position and the head grouping, which fix every
/// row's query position (`q0 + r / groups`) and batch row (`entry / kv_heads`) for the masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockAt {
    /// First query position of the block.
    pub q0: usize,
    /// Query heads per KV head.
    pub groups: usize,
    /// KV heads (batch entry `e` is batch row `e / kv_heads`).
    pub kv_heads: usize,
}

/// The softmax steps of the op on a backend; with `FusedMlpKernels::gemm`, all the op needs.
///
/// Shapes: a score block is `[b·kvh, R, i1]` (`R = (i1 − q0)·g` rows, keys `[0, i1)`), in the
/// activation dtype; LSE and D blocks are `[b·kvh, R]` f32; the segments are `[b, s]` f32.
/// Masked scores (key after the row's query position, or a key in another segment than the
/// query's: see [`crate::attention_segments`]) count as absent.
pub trait AttentionKernels: FusedMlpKernels {
    /// From scores `S` (scale applied): `(P, LSE)` with `LSE = log Σ_unmasked exp(S)` (f32;
    /// a row's own key is never masked) and `P = exp(S − LSE)`, 0 where masked,
    /// in `S`'s dtype (may reuse `S`'s buffer).
    fn softmax_forward(
        s: FloatTensor<Self>,
        segments: Option<FloatTensor<Self>>,
        at: BlockAt,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// From recomputed scores `S`, `dP = dO·Vᵀ`, the block's LSE and `D = rowsum(dO∘O)`:
    /// `(P, dS)` with `P = exp(S − LSE)` masked and `dS = scale·P∘(dP − D)`, both in `S`'s dtype
    /// (may reuse `S`'s and `dP`'s buffers).
    fn softmax_backward(
        s: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        segments: Option<FloatTensor<Self>>,
        at: BlockAt,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The whole causal attention as one fused kernel (cuDNN's flash attention on CUDA,
    /// f16/bf16) over whole rows, or with `runs` over each run as a sequence of its own:
    /// `(o, lse)` from `q` `[b, h, s, d]` and `k`, `v` `[b, kvh, s, d]`, with `o` `[b, s, h·d]`
    /// and `lse` `[b, h, s]` f32 (with runs, `lse` is the kernel's own layout, read only by
    /// [`Self::fused_backward`]). `Err` gives the inputs back where the backend has no such
    /// kernel for them (the default); the caller then runs the block-wise op.
    fn fused_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        geometry: Geometry,
        runs: Option<&SegmentRuns>,
    ) -> FusedForward<Self> {
        let _ = (geometry, runs);
        Err([q, k, v])
    }

    /// The fused kernel's backward: `(dq, dk, dv)` in the shapes of `q`, `k`, `v` from `d_o`
    /// `[b, s, h·d]`, or `None` when it cannot run (the caller then runs the block-wise backward
    /// on the same saved tensors).
    fn fused_backward(
        saved: &FusedSaved<FloatTensor<Self>>,
        d_o: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>)> {
        let _ = (saved, d_o);
        None
    }
}

/// `Ok((o, lse))` from the fused kernel, or the inputs `[q, k, v]` back.
pub type FusedForward<B> = Result<(FloatTensor<B>, FloatTensor<B>), [FloatTensor<B>; 3]>;

/// What the fused kernel's backward needs, in its layouts (see
/// [`AttentionKernels::fused_forward`]): all linear in `s`.
#[derive(Debug, Clone)]
pub struct FusedSaved<T> {
    /// `[b, h, s, d]`.
    pub q: T,
    /// `[b, kvh, s, d]`.
    pub k: T,
    /// `[b, kvh, s, d]`.
    pub v: T,
    /// `[b, s, h·d]`.
    pub o: T,
    /// Row log-sum-exp of the scaled scores, `[b, h, s]` f32 (with runs, in the fused kernel's
    /// own layout).
    pub lse: T,
    /// The problem's sizes.
    pub geometry: Geometry,
    /// The runs each attending as a sequence of its own, if the forward had them.
    pub runs: Option<Arc<SegmentRuns>>,
}

/// A backend that runs causal GQA attention as one operation, memory linear in `s`.
///
/// Implemented for `CubeBackend<R, ..>` (feature `cubecl`; forward only) and for `Autodiff`
/// over any [`AttentionKernels`] backend (the hand-written backward).
pub trait FlashAttentionBackend: Backend {
    /// `q` `[b·kvh, s·g, d]`, `k`, `v` `[b·kvh, s, d]` (same dtype), `segments` `[b, s]` f32
    /// (query `i` sees key `j ≤ i` only in its own segment; [`crate::attention_segments`]);
    /// returns `o` `[b·kvh, s·g, d]`. Gradients flow to `q`, `k`, `v`.
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: Option<FloatTensor<Self>>,
        geometry: Geometry,
    ) -> FloatTensor<Self>;

    /// Causal attention through [`AttentionKernels::fused_forward`] where the backend has that
    /// kernel, over whole rows or, with `runs`, over each run alone: `q` `[b, h, s, d]`, `k`,
    /// `v` `[b, kvh, s, d]` → `o` `[b, s, h·d]`; gradients flow to `q`, `k`, `v`. `Err` gives
    /// the inputs back (no fused kernel for them).
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        geometry: Geometry,
        runs: Option<Arc<SegmentRuns>>,
    ) -> Result<FloatTensor<Self>, [FloatTensor<Self>; 3]>;
}

/// What the backward needs: all linear in `s`.
#[derive(Debug, Clone)]
pub(crate) struct Saved<T> {
    pub q: T,
    pub k: T,
    pub v: T,
    pub o: T,
    pub lse: T,
    pub segments: Option<T>,
    pub geometry: Geometry,
}

fn wrap<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Rows `[r0, r1)` of every batch entry of a `[n, rows, cols]` tensor (a view).
fn rows<B: Backend>(t: &Tensor<B, 3>, r0: usize, r1: usize) -> Tensor<B, 3> {
    let [n, _, c] = t.dims();
    t.clone().slice([0..n, r0..r1, 0..c])
}

/// Columns `[c0, c1)` of every batch entry of a `[n, cols]` tensor (a view).
fn cols<B: Backend>(t: &Tensor<B, 2>, c0: usize, c1: usize) -> Tensor<B, 2> {
    let [n, _] = t.dims();
    t.clone().slice([0..n, c0..c1])
}

/// The forward pass: `o` and what the backward needs.
pub(crate) fn forward<B: AttentionKernels>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    segments: Option<FloatTensor<B>>,
    geometry: Geometry,
) -> (FloatTensor<B>, Saved<FloatTensor<B>>) {
    use Trans::{N, T};
    let g = geometry.groups;
    let (qt, kt, vt) = (wrap::<B, 3>(q), wrap::<B, 3>(k), wrap::<B, 3>(v));
    let mut o_blocks = Vec::new();
    let mut lse_blocks = Vec::new();
    for (i0, i1) in geometry.blocks() {
        let q_blk = prim(rows(&qt, i0 * g, i1 * g));
        let s = B::gemm(q_blk, N, prim(rows(&kt, 0, i1)), T, geometry.scale(), None);
        let at = BlockAt {
            q0: i0,
            groups: g,
            kv_heads: geometry.kv_heads,
        };
        let (p, lse) = B::softmax_forward(s, segments.clone(), at);
        o_blocks.push(wrap::<B, 3>(B::gemm(
            p,
            N,
            prim(rows(&vt, 0, i1)),
            N,
            1.0,
            None,
        )));
        lse_blocks.push(wrap::<B, 2>(lse));
    }
    let o = prim(Tensor::cat(o_blocks, 1));
    let lse = prim(Tensor::cat(lse_blocks, 1));
    let saved = Saved {
        q: prim(qt),
        k: prim(kt),
        v: prim(vt),
        o: o.clone(),
        lse,
        segments,
        geometry,
    };
    (o, saved)
}

/// The backward pass: `(dq, dk, dv)` from `do_` `[b·kvh, s·g, d]`.
pub(crate) fn backward<B: AttentionKernels>(
    d_o: FloatTensor<B>,
    saved: Saved<FloatTensor<B>>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    use Trans::{N, T};
    let Saved {
        q,
        k,
        v,
        o,
        lse,
        segments,
        geometry,
    } = saved;
    let g = geometry.groups;
    let (n, s, d) = (geometry.entries(), geometry.seq, geometry.head_dim);
    let f32_ = burn::tensor::DType::F32;
    let (qt, kt, vt) = (wrap::<B, 3>(q), wrap::<B, 3>(k), wrap::<B, 3>(v));
    let dot = wrap::<B, 3>(d_o);
    let dtype = qt.dtype();
    let dot = if dot.dtype() == dtype {
        dot
    } else {
        dot.cast(dtype)
    };
    // D_r = Σ_c dO[r, c]·O[r, c], in f32: [n, s·g].
    let delta = (wrap::<B, 3>(o).cast(f32_) * dot.clone().cast(f32_))
        .sum_dim(2)
        .reshape([n, s * g]);
    let lse = wrap::<B, 2>(lse);

    let (mut dk, mut dv): (Option<Tensor<B, 3>>, Option<Tensor<B, 3>>) = (None, None);
    let mut dq_blocks = Vec::new();
    // Last block first: its keys are all of [0, s), so it creates full-size dK and dV, which
    // the earlier (shorter) blocks then accumulate into, prefix by prefix.
    for (i0, i1) in geometry.blocks().into_iter().rev() {
        let (r0, r1) = (i0 * g, i1 * g);
        let q_blk = rows(&qt, r0, r1);
        let do_blk = rows(&dot, r0, r1);
        let k_pre = rows(&kt, 0, i1);
        let v_pre = rows(&vt, 0, i1);
        let s_blk = B::gemm(
            prim(q_blk.clone()),
            N,
            prim(k_pre.clone()),
            T,
            geometry.scale(),
            None,
        );
        let dp = B::gemm(prim(do_blk.clone()), N, prim(v_pre), T, 1.0, None);
        let at = BlockAt {
            q0: i0,
            groups: g,
            kv_heads: geometry.kv_heads,
        };
        let (p, ds) = B::softmax_backward(
            s_blk,
            dp,
            prim(cols(&lse, r0, r1)),
            prim(cols(&delta, r0, r1)),
            segments.clone(),
            at,
            geometry.scale(),
        );
        // dV[:i1] += Pᵀ·dO_blk; dK[:i1] += dSᵀ·Q_blk (β = 1 onto the running prefix).
        let accumulate = |full: Option<Tensor<B, 3>>, a: FloatTensor<B>, b: Tensor<B, 3>| {
            let acc = full.as_ref().map(|t| prim(rows(t, 0, i1)));
            let part = wrap::<B, 3>(B::gemm(a, T, prim(b), N, 1.0, acc));
            match full {
                Some(full) if i1 < s => full.slice_assign([0..n, 0..i1, 0..d], part),
                _ => part,
            }
        };
        dv = Some(accumulate(dv, p, do_blk));
        dq_blocks.push(wrap::<B, 3>(B::gemm(
            ds.clone(),
            N,
            prim(k_pre),
            N,
            1.0,
            None,
        )));
        dk = Some(accumulate(dk, ds, q_blk));
    }
    dq_blocks.reverse();
    let dq = prim(Tensor::cat(dq_blocks, 1));
    let zeros = || Tensor::<B, 3>::zeros([n, s, d], (&qt.device(), dtype));
    (
        dq,
        prim(dk.unwrap_or_else(zeros)),
        prim(dv.unwrap_or_else(zeros)),
    )
}

/// The block-wise backward on what the fused forward saved (its layouts converted): the
/// fallback when [`AttentionKernels::fused_backward`] cannot run. With runs, whose LSE is in the
/// fused kernel's own layout, the block-wise forward recomputes `o` and the LSE first. Returns
/// `(dq, dk, dv)` in the shapes of `q`, `k`, `v`.
pub(crate) fn backward_from_fused<B: AttentionKernels>(
    saved: FusedSaved<FloatTensor<B>>,
    d_o: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let geometry = saved.geometry;
    let (b, kvh, g, s, d) = (
        geometry.batch,
        geometry.kv_heads,
        geometry.groups,
        geometry.seq,
        geometry.head_dim,
    );
    // [b, h, s, d] = [b, kvh, g, s, d] -> [b, kvh, s, g, d] -> [b·kvh, s·g, d]
    let q = wrap::<B, 4>(saved.q)
        .reshape([b, kvh, g, s, d])
        .swap_dims(2, 3)
        .reshape([b * kvh, s * g, d]);
    let k = prim(wrap::<B, 4>(saved.k).reshape([b * kvh, s, d]));
    let v = prim(wrap::<B, 4>(saved.v).reshape([b * kvh, s, d]));
    // [b, s, h·d] = [b, s, kvh, g, d] -> [b, kvh, s, g, d] -> [b·kvh, s·g, d]
    let rows_layout = |t: FloatTensor<B>| {
        wrap::<B, 3>(t)
            .reshape([b, s, kvh, g, d])
            .swap_dims(1, 2)
            .reshape([b * kvh, s * g, d])
    };
    let block_saved = match saved.runs {
        Some(runs) => {
            let segments = Segments::<B>::from_runs(runs, &q.device()).into_parts().0;
            forward::<B>(prim(q), k, v, Some(prim(segments)), geometry).1
        }
        None => {
            // [b, h, s] = [b, kvh, g, s] -> [b, kvh, s, g] -> [b·kvh, s·g]
            let lse = wrap::<B, 3>(saved.lse)
                .reshape([b, kvh, g, s])
                .swap_dims(2, 3)
                .reshape([b * kvh, s * g]);
            Saved {
                q: prim(q),
                k,
                v,
                o: prim(rows_layout(saved.o)),
                lse: prim(lse),
                segments: None,
                geometry,
            }
        }
    };
    let (dq, dk, dv) = backward::<B>(prim(rows_layout(d_o)), block_saved);
    let dq = wrap::<B, 3>(dq)
        .reshape([b, kvh, s, g, d])
        .swap_dims(2, 3)
        .reshape([b, kvh * g, s, d]);
    let kv_shape = |t: FloatTensor<B>| prim(wrap::<B, 3>(t).reshape([b, kvh, s, d]));
    (prim(dq), kv_shape(dk), kv_shape(dv))
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::Autodiff;
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use fused_mlp::{WgpuBackend, vulkan_test_device};

    use super::*;
    use crate::materialised_attention;

    type B = WgpuBackend;
    type AB = Autodiff<B>;

    fn values<BK: Backend, const R: usize>(t: Tensor<BK, R>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn assert_close<const R: usize>(what: &str, got: Tensor<B, R>, want: Tensor<B, R>) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes");
        let (got, want) = (values(got), values(want));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(err <= 1e-4 * scale, "{what}: {err:e} of {scale:e}");
    }

    /// The fused node's fallback backward (the block-wise backward on the fused layouts,
    /// converted) against the materialised attention's autodiff, from `o` and the LSE computed
    /// independently in the fused layouts: the conversions of `q`, `o`, `dO`, the LSE and the
    /// gradients are right.
    #[test]
    fn backward_from_fused_matches_the_materialised_gradients() {
        let Some(device) = vulkan_test_device() else {
            return;
        };
        let (b, kvh, g, s, d) = (2, 2, 3, 37, 16);
        let h = kvh * g;
        let geometry = Geometry::new(b, kvh, g, s, d, Some(10));
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<AB, 4>::random([b, h, s, d], normal, &device).require_grad();
        let k = Tensor::<AB, 4>::random([b, kvh, s, d], normal, &device).require_grad();
        let v = Tensor::<AB, 4>::random([b, kvh, s, d], normal, &device).require_grad();
        let d_o = Tensor::<AB, 3>::random([b, s, h * d], normal, &device);

        // Reference: o, gradients, and the LSE of the scaled causal scores, [b, h, s].
        let o = materialised_attention(q.clone(), k.clone(), v.clone(), None);
        let grads = (o.clone() * d_o.clone()).sum().backward();
        let repeat = |t: Tensor<AB, 4>| {
            t.unsqueeze_dim::<5>(2)
                .repeat_dim(2, g)
                .reshape([b, h, s, d])
        };
        let scores = q.clone().matmul(repeat(k.clone()).swap_dims(2, 3)) * geometry.scale();
        let positions = || Tensor::<AB, 1, Int>::arange(0..s as i64, &device);
        let keep = positions()
            .reshape([s, 1])
            .greater_equal(positions().reshape([1, s]));
        let scores = scores.mask_fill(keep.bool_not().unsqueeze::<4>(), f32::NEG_INFINITY);
        let max = scores.clone().max_dim(3);
        let lse = ((scores - max.clone()).exp().sum_dim(3).log() + max).reshape([b, h, s]);

        let inner = |t: Tensor<AB, 4>| t.inner().into_primitive().tensor();
        let fused = FusedSaved {
            q: inner(q.clone()),
            k: inner(k.clone()),
            v: inner(v.clone()),
            o: o.inner().into_primitive().tensor(),
            lse: lse.inner().into_primitive().tensor(),
            geometry,
            runs: None,
        };
        let (dq, dk, dv) = backward_from_fused::<B>(fused, d_o.inner().into_primitive().tensor());
        assert_close("dq", wrap::<B, 4>(dq), q.grad(&grads).expect("dq"));
        assert_close("dk", wrap::<B, 4>(dk), k.grad(&grads).expect("dk"));
        assert_close("dv", wrap::<B, 4>(dv), v.grad(&grads).expect("dv"));
    }

    /// With runs, the fallback backward ignores the fused kernel's LSE (its layout is the
    /// kernel's own) and recomputes it block-wise: its gradients equal the materialised
    /// attention's under the runs' segments, with the saved LSE poisoned.
    #[test]
    fn backward_from_fused_with_runs_recomputes_and_matches() {
        let Some(device) = vulkan_test_device() else {
            return;
        };
        let (b, kvh, g, s, d) = (2, 1, 4, 37, 16);
        let h = kvh * g;
        let geometry = Geometry::new(b, kvh, g, s, d, Some(8));
        let mut labels = Vec::new();
        for (label, len) in [(3, 10), (1, 20), (3, 7), (0, 37)] {
            labels.extend(std::iter::repeat_n(label as i64, len));
        }
        let runs = Arc::new(SegmentRuns::from_labels(&labels, [b, s]));
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<AB, 4>::random([b, h, s, d], normal, &device).require_grad();
        let k = Tensor::<AB, 4>::random([b, kvh, s, d], normal, &device).require_grad();
        let v = Tensor::<AB, 4>::random([b, kvh, s, d], normal, &device).require_grad();
        let d_o = Tensor::<AB, 3>::random([b, s, h * d], normal, &device);
        let documents =
            Tensor::<AB, 2, Int>::from_data(TensorData::new(runs.ids(), [b, s]), &device);
        let segments = crate::attention_segments(None, Some(documents));
        let o = materialised_attention(q.clone(), k.clone(), v.clone(), segments);
        let grads = (o.clone() * d_o.clone()).sum().backward();

        let inner = |t: Tensor<AB, 4>| t.inner().into_primitive().tensor();
        let poisoned_lse = Tensor::<B, 3>::full([b, h, s], f32::NAN, &device);
        let fused = FusedSaved {
            q: inner(q.clone()),
            k: inner(k.clone()),
            v: inner(v.clone()),
            o: o.inner().into_primitive().tensor(),
            lse: poisoned_lse.into_primitive().tensor(),
            geometry,
            runs: Some(runs),
        };
        let (dq, dk, dv) = backward_from_fused::<B>(fused, d_o.inner().into_primitive().tensor());
        assert_close("dq", wrap::<B, 4>(dq), q.grad(&grads).expect("dq"));
        assert_close("dk", wrap::<B, 4>(dk), k.grad(&grads).expect("dk"));
        assert_close("dv", wrap::<B, 4>(dv), v.grad(&grads).expect("dv"));
    }
}
