//! The op's two softmax steps on one score block in plain Burn ops (any backend): the simple
//! version, and the oracle for the CubeCL kernels (`kernels`), which compute the same thing.
//!
//! ```text
//! masked(r, j) = j > q0 + r/g  or  key_mask[e / kvh, j] = 0        (e: batch entry, r: row)
//! forward:  m = max_unmasked S,  l = Σ_unmasked exp(S − m),  LSE = m + ln l  (1e30 when l = 0)
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
/// The LSE of a row with no unmasked key: `exp(S − LSE)` is 0 for every `S`.
pub const EMPTY_ROW_LSE: f32 = 1.0e30;

fn wrap<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `true` where row `r`'s query may not see key `j`, for a `[n, rows, keys]` block.
pub fn block_mask<B: Backend>(
    [n, rows, keys]: [usize; 3],
    key_mask: Option<Tensor<B, 2>>,
    at: BlockAt,
    device: &B::Device,
) -> Tensor<B, 3, Bool> {
    let query = Tensor::<B, 1, Int>::arange(0..rows as i64, device)
        .div_scalar(at.groups as i64)
        .add_scalar(at.q0 as i64)
        .reshape([1, rows, 1]);
    let key = Tensor::<B, 1, Int>::arange(0..keys as i64, device).reshape([1, 1, keys]);
    let mut masked = key
        .expand([n, rows, keys])
        .greater(query.expand([n, rows, keys]));
    if let Some(mask) = key_mask {
        let [batch, _] = mask.dims();
        let padding = mask
            .slice([0..batch, 0..keys])
            .equal_elem(0.0)
            .reshape([batch, 1, 1, keys])
            .expand([batch, at.kv_heads, rows, keys])
            .reshape([n, rows, keys]);
        masked = masked.bool_or(padding);
    }
    masked
}

/// [`crate::AttentionKernels::softmax_forward`] in Burn ops: `(P, LSE)`.
pub fn softmax_forward<B: Backend>(
    s: FloatTensor<B>,
    key_mask: Option<FloatTensor<B>>,
    at: BlockAt,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = wrap::<B, 3>(s);
    let dtype = s.dtype();
    let masked = block_mask(s.dims(), key_mask.map(wrap), at, &s.device());
    let s = s.cast(DType::F32).mask_fill(masked.clone(), NEG);
    let m = s.clone().max_dim(2);
    let l = (s.clone() - m.clone())
        .exp()
        .mask_fill(masked.clone(), 0.0)
        .sum_dim(2);
    let empty = l.clone().equal_elem(0.0);
    let lse = (m + l.mask_fill(empty.clone(), 1.0).log()).mask_fill(empty, EMPTY_ROW_LSE);
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
    key_mask: Option<FloatTensor<B>>,
    at: BlockAt,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = wrap::<B, 3>(s);
    let dtype = s.dtype();
    let dims = s.dims();
    let [n, rows, _] = dims;
    let masked = block_mask(dims, key_mask.map(wrap), at, &s.device());
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
