//! Causal grouped-query attention whose memory is linear in the sequence length, forward and
//! backward, as one custom autodiff op ("flash-style" at block granularity, the products on the
//! GEMM provider: cuBLASLt on CUDA).
//!
//! # Layout
//!
//! Queries arrive as `[b, h, s, d]` after RoPE, keys and values as `[b, kvh, s, d]` with
//! `h = kvh·g`. The op works on `Q` laid out as `[b·kvh, s·g, d]` (that is `[b, kvh, s, g, d]`,
//! one copy of `q`): the query block of positions `[i0, i1)` is the contiguous row range
//! `[i0·g, i1·g)` of every batch entry, and one batched GEMM over `b·kvh` covers the `g` query
//! heads of a KV head without repeating K/V. Row `r` of a block is query position `i0 + r/g`.
//! `O`, `dO` and `dQ` share the layout; `K`, `V` are `[b·kvh, s, d]` (views of the input).
//!
//! # Algorithm
//!
//! ```text
//! forward, per query block [i0, i1) (causal: keys [0, i1) only):
//!   S   = scale·Q_blk·K[:i1]ᵀ                                   GEMM
//!   LSE = log Σ_j exp(S_j)  over the unmasked keys (f32)         kernel `softmax_forward`
//!   P   = exp(S − LSE), 0 where masked                           (same kernel, over S)
//!   O_blk = P·V[:i1]                                            GEMM
//! saved: q, k, v, o, LSE (f32, [b·kvh, s·g]): nothing quadratic.
//! backward: D = rowsum(dO∘O) (f32); per block, last first:
//!   S = scale·Q_blk·K[:i1]ᵀ,  dP = dO_blk·V[:i1]ᵀ                GEMMs
//!   P = exp(S − LSE) masked,  dS = scale·P∘(dP − D)              kernel `softmax_backward`
//!   dV[:i1] += Pᵀ·dO_blk,  dK[:i1] += dSᵀ·Q_blk                  GEMMs, β-accumulated
//!   dQ_blk = dS·K[:i1]                                          GEMM
//! ```
//!
//! Masks: key `j` is visible from query position `i` iff `j ≤ i` and, with segments `[b, s]`,
//! `seg[j] = seg[i]` ([`attention_segments`]). Segments express both a key-padding mask and the
//! documents of packed rows: a document's tokens share its index (≥ 0), and padding position
//! `j` gets a segment of its own (`−1 − j`). So a token sees the earlier tokens of its own
//! document and never padding, and a padding query sees only itself: every row has a visible
//! key, and nothing reads the outputs of padding rows (a loss ignores them, and their keys are
//! in no other segment).
//!
//! # Paths
//!
//! - [`FlashAttentionBackend`] (feature `cubecl`): `CubeBackend<R, ..>` (forward only) and
//!   `Autodiff` over it (forward + the backward above), on top of [`AttentionKernels`] (the two
//!   softmax steps) and [`fused_mlp::FusedMlpKernels::gemm`].
//! - cuDNN's fused flash attention (feature `cuda`, module `cudnn`, through
//!   `fastlora_cuda_gemm::sdpa_forward` / `sdpa_backward`), in f16/bf16: the whole forward and
//!   the whole backward each as one cuDNN kernel, its own autodiff node
//!   ([`FlashAttentionBackend::fused_attention`]). Without segments, over whole rows; with
//!   segments whose [`SegmentRuns`] the caller knows on the host (packed documents), over each
//!   run as a sequence of its own (cuDNN's ragged layout: no copy, no work across documents).
//!   Anything cuDNN declines, and segments known only on the device (a key-padding mask), run
//!   the block-wise op. On by default ([`cudnn_enabled`]; `FASTLORA_CUDNN=0` or
//!   [`set_cudnn_enabled`] turn it off); checked on the H200 against the materialised attention
//!   by `attention-bench check-bf16`.
//! - [`materialised_attention`]: the `[b, h, s, s]` reference, every backend (the model's
//!   portable path computes the same thing; the tests' oracle).
//! - [`attention`]: dispatch for a model generic over `B: Backend`, by `TypeId`, like
//!   `fused_mlp::mlp`: the fast op on the backends compiled in (features `cuda`, `wgpu`) when
//!   [`flash_enabled`] and `fused_mlp::fused_enabled()`, else `None` (the caller runs its own
//!   materialised attention).
//!
//! The two softmax steps exist twice: CubeCL kernels (`kernels`, one per file) and plain Burn
//! ops (`block`), chosen by [`set_kernels_enabled`] (kernels by default); the Burn-ops version
//! is the kernels' oracle in the tests.

use burn::prelude::*;
use burn::tensor::TensorPrimitive;

#[cfg(feature = "cubecl")]
mod autodiff;
pub mod block;
#[cfg(feature = "cubecl")]
mod cube;
#[cfg(feature = "cuda")]
mod cudnn;
mod dispatch;
#[cfg(feature = "cubecl")]
pub mod kernels;
mod op;
mod reference;
mod segments;

pub use dispatch::{
    attention, cudnn_calls, cudnn_enabled, cudnn_first, fast_backend, flash_available,
    flash_enabled, fused_sequence_multiple, kernels_enabled, set_cudnn_enabled, set_flash_enabled,
    set_kernels_enabled,
};
pub use op::{
    AttentionKernels, BlockAt, FlashAttentionBackend, FusedForward, FusedSaved, Geometry,
    SCORE_BUDGET_BYTES,
};
pub use reference::materialised_attention;
pub use segments::{SegmentRuns, Segments, attention_segments};

/// Causal GQA attention through [`FlashAttentionBackend`], with memory linear in `s`.
///
/// The backend's fused kernel runs where it has one
/// ([`FlashAttentionBackend::fused_attention`]: cuDNN's flash attention on CUDA for f16/bf16,
/// when [`cudnn_enabled`]): without segments, or with segments whose [`SegmentRuns`] are known
/// (each run then attends as a sequence of its own); otherwise the block-wise op.
///
/// `block_q`: query positions per block; `None` picks the largest block whose score tile
/// `b·kvh·(block_q·g)·s` f32 values fits [`SCORE_BUDGET_BYTES`] (tests pass a small one to run
/// several blocks).
///
/// # Shapes
/// - q: `[b, h, s, d]`; k, v: `[b, kvh, s, d]` (`h` a multiple of `kvh`)
/// - segments: `[b, s]` ([`Segments`]): query `i` sees key `j ≤ i` iff `seg[j] = seg[i]`
/// - output: `[b, s, h·d]` (ready for `o_proj`), in `q`'s dtype
///
/// # Panics
/// On inconsistent shapes.
pub fn flash_attention<B: FlashAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segments: Option<Segments<B>>,
    block_q: Option<usize>,
) -> Tensor<B, 3> {
    let [b, h, s, d] = q.dims();
    let [bk, kvh, sk, dk] = k.dims();
    assert_eq!(k.dims(), v.dims(), "flash attention: k and v shapes differ");
    assert!(
        bk == b && sk == s && dk == d,
        "flash attention: q {:?} and k {:?} disagree",
        q.dims(),
        k.dims()
    );
    assert!(
        kvh > 0 && h % kvh == 0,
        "flash attention: {h} query heads are not a multiple of {kvh} kv heads"
    );
    assert!(s > 0 && d > 0, "flash attention: empty sequence or head");
    let (segments, runs) = match segments {
        Some(segments) => {
            assert_eq!(
                segments.ids().dims(),
                [b, s],
                "flash attention: segments shape"
            );
            let (ids, runs) = segments.into_parts();
            (Some(ids), runs)
        }
        None => (None, None),
    };
    if let Some(runs) = &runs {
        assert_eq!(runs.dims(), [b, s], "flash attention: segment runs shape");
    }
    let g = h / kvh;
    let dtype = q.dtype();
    let same = |t: Tensor<B, 4>| if t.dtype() == dtype { t } else { t.cast(dtype) };
    let (k, v) = (same(k), same(v));
    let geometry = Geometry::new(b, kvh, g, s, d, block_q);
    let (q, k, v) = if segments.is_none() || runs.is_some() {
        match B::fused_attention(
            q.into_primitive().tensor(),
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            geometry,
            runs,
        ) {
            Ok(o) => return Tensor::from_primitive(TensorPrimitive::Float(o)),
            Err([q, k, v]) => (
                Tensor::from_primitive(TensorPrimitive::Float(q)),
                Tensor::from_primitive(TensorPrimitive::Float(k)),
                Tensor::from_primitive(TensorPrimitive::Float(v)),
            ),
        }
    } else {
        (q, k, v)
    };
    // [b, h, s, d] = [b, kvh, g, s, d] -> [b, kvh, s, g, d] -> [b·kvh, s·g, d]: one copy.
    let q = q
        .reshape([b, kvh, g, s, d])
        .swap_dims(2, 3)
        .reshape([b * kvh, s * g, d]);
    let k = k.reshape([b * kvh, s, d]);
    let v = v.reshape([b * kvh, s, d]);
    let segments = segments.map(|m| m.into_primitive().tensor());
    let o = B::flash_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        segments,
        geometry,
    );
    // [b·kvh, s·g, d] = [b, kvh, s, g, d] -> [b, s, kvh, g, d] -> [b, s, h·d].
    Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(o))
        .reshape([b, kvh, s, g, d])
        .swap_dims(1, 2)
        .reshape([b, s, h * d])
}
