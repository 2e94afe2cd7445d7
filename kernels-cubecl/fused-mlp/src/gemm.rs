//! The GEMM every matrix product of the fused MLP goes through (via [`FusedMlpKernels::gemm`]).
//!
//! Today: Burn's matmul on the same backend, then the scale and the accumulate as separate ops.
//! A vendor GEMM (cuBLAS, `C = α·op(A)·op(B) + β·C` in one call) replaces this body; the
//! callers already pass the transposes, `α` (the LoRA scaling) and the accumulator.
//!
//! [`FusedMlpKernels::gemm`]: crate::FusedMlpKernels::gemm

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use crate::op::Trans;

/// `alpha·op(a)·op(b) + acc`.
pub(crate) fn gemm<B: Backend>(
    a: FloatTensor<B>,
    trans_a: Trans,
    b: FloatTensor<B>,
    trans_b: Trans,
    alpha: f64,
    acc: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let op = |t, trans| match trans {
        Trans::N => t,
        Trans::T => B::float_transpose(t),
    };
    let mut c = B::float_matmul(op(a, trans_a), op(b, trans_b));
    if alpha != 1.0 {
        c = B::float_mul_scalar(c, alpha.into());
    }
    match acc {
        Some(acc) => B::float_add(acc, c),
        None => c,
    }
}
