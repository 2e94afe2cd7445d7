//! The op's two softmax steps on one score block in plain Burn ops (any backend): the simple
//! version, and the oracle for the CubeCL kernels (`kernels`), which compute the same thing.
//!
//! ```text
//! masked(r, j) = j > i  or  seg[e / kvh, j] ≠ seg[e / kvh, i],   i = q0 + r/g   (e: batch entry)
//! forward:  m = max_unmasked S,  l = Σ_unmasked exp(S − m),  LSE = m + ln l
//!           (every row sees at least its own key: l ≥ 1)
//!           P = exp(S − LSE), 0 where masked
//! backward: P as above from the saved LSE,  dS = scale·P∘(dP − D)
//! ```
//!
//! All of it in f32; `P` and `dS` are returned in the scores' dtype.

use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, Int, TensorPrimitive};

use crate::op::BlockAt;

/// Stands for `−∞` in masked scores (finite: some shader languages reject infinities).
pub const NEG: f32 = -1.0e30;

fn wrap<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `true` where row `r`'s query may not see key `j`, for a `[n, rows, keys]` block.
pub fn block_mask<B: Backend>(
    [n, rows, keys]: [usize; 3],
    segments: Option<Tensor<B, 2>>,
    at: BlockAt,
    device: &B::Device,
) -> Tensor<B, 3, Bool> {
    let query = Tensor::<B, 1, Int>::arange(0..rows as i64, device)
        .div_scalar(at.groups as i64)
        .add_scalar(at.q0 as i64);
    let key = Tensor::<B, 1, Int>::arange(0..keys as i64, device).reshape([1, 1, keys]);
    let mut masked = key
        .expand([n, rows, keys])
        .greater(query.clone().reshape([1, rows, 1]).expand([n, rows, keys]));
    if let Some(segments) = segments {
        let [batch, _] = segments.dims();
        let per_entry = |t: Tensor<B, 2>, width: usize| {
            t.reshape([batch, 1, 1, width])
                .expand([batch, at.kv_heads, 1, width])
                .reshape([n, 1, width])
        };
        let key_segment = per_entry(segments.clone().slice([0..batch, 0..keys]), keys);
        let query_segment = per_entry(segments.select(1, query), rows).swap_dims(1, 2);
        let elsewhere = key_segment
            .expand([n, rows, keys])
            .not_equal(query_segment.expand([n, rows, keys]));
        masked = masked.bool_or(elsewhere);
    }
    masked
}

/// [`crate::AttentionKernels::softmax_forward`] in Burn ops: `(P, LSE)`.
pub fn softmax_forward<B: Backend>(
    s: FloatTensor<B>,
    segments: Option<FloatTensor<B>>,
    at: BlockAt,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = wrap::<B, 3>(s);
    let dtype = s.dtype();
    let masked = block_mask(s.dims(), segments.map(wrap), at, &s.device());
    let s = s.cast(DType::F32).mask_fill(masked.clone(), NEG);
    let m = s.clone().max_dim(2);
    let l = (s.clone() - m.clone())
        .exp()
        .mask_fill(masked.clone(), 0.0)
        .sum_dim(2);
    let lse = m + l.log();
    let p = (s - lse.clone()).exp().mask_fill(masked, 0.0).cast(dtype);
    let [n, rows, _] = p.dims();
    (
        p.into_primitive().tensor(),
        lse.reshape([n, rows]).into_primitive().tensor(),
    )
}

/// [`crate::AttentionKernels::softmax_backward`] in Burn ops: `(P, dS)`.
pub fn softmax_backward<B: Backend>(
    s: FloatTensor<B>,
    dp: FloatTensor<B>,
    lse: FloatTensor<B>,
    delta: FloatTensor<B>,
    segments: Option<FloatTensor<B>>,
    at: BlockAt,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = wrap::<B, 3>(s);
    let dtype = s.dtype();
    let dims = s.dims();
    let [n, rows, _] = dims;
    let masked = block_mask(dims, segments.map(wrap), at, &s.device());
    let lse = wrap::<B, 2>(lse).cast(DType::F32).reshape([n, rows, 1]);
    let delta = wrap::<B, 2>(delta).cast(DType::F32).reshape([n, rows, 1]);
    let p = (s.cast(DType::F32).mask_fill(masked.clone(), NEG) - lse)
        .exp()
        .mask_fill(masked, 0.0);
    let ds = (p.clone() * (wrap::<B, 3>(dp).cast(DType::F32) - delta)).mul_scalar(scale);
    (
        p.cast(dtype).into_primitive().tensor(),
        ds.cast(dtype).into_primitive().tensor(),
    )
}
