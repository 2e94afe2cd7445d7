//! The GEMM every matrix product of the fused MLP goes through (via [`FusedMlpKernels::gemm`]).
//!
//! On Burn's CUDA runtime (feature `cuda`) it is cuBLASLt through `fastlora-cuda-gemm`:
//! `α·op(A)·op(B) + 1·acc` in one call, on CubeCL's own stream, f32 accumulation, TF32 off (f32
//! results stay f32-exact enough for the 1e-4 oracle). Elsewhere, and if cuBLAS refuses the
//! problem, Burn's matmul on the same backend, then the scale and the accumulate as separate ops.
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
    #[cfg(feature = "cuda")]
    let (a, b, acc) = match cublas::try_gemm::<B>(a, trans_a, b, trans_b, alpha, acc) {
        Ok(c) => return c,
        Err(operands) => operands,
    };
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

/// cuBLASLt for `CubeTensor<CudaRuntime>` operands.
#[cfg(feature = "cuda")]
pub(crate) mod cublas {
    use std::any::{Any, TypeId};
    use std::sync::Once;

    use burn::tensor::backend::Backend;
    use burn::tensor::ops::FloatTensor;
    use fastlora_cuda_gemm::{CudaTensor, GemmOp, gemm, gemm_into};

    use crate::op::Trans;

    type Operands<B> = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>);

    /// The product through cuBLASLt when `B`'s float tensors are CUDA tensors; otherwise, or when
    /// cuBLAS rejects the problem (reported once), the operands back for the portable GEMM.
    pub(super) fn try_gemm<B: Backend>(
        a: FloatTensor<B>,
        trans_a: Trans,
        b: FloatTensor<B>,
        trans_b: Trans,
        alpha: f64,
        acc: Option<FloatTensor<B>>,
    ) -> Result<FloatTensor<B>, Operands<B>> {
        if TypeId::of::<FloatTensor<B>>() != TypeId::of::<CudaTensor>() || !cublas_enabled() {
            return Err((a, b, acc));
        }
        let (ca, cb): (&CudaTensor, &CudaTensor) = (as_cuda(&a), as_cuda(&b));
        let op = GemmOp {
            trans_a: trans_a == Trans::T,
            trans_b: trans_b == Trans::T,
            alpha: alpha as f32,
            beta: if acc.is_some() { 1.0 } else { 0.0 },
            ..GemmOp::default()
        };
        match gemm(ca, cb, acc.as_ref().map(as_cuda), op) {
            Ok(c) => Ok(*(Box::new(c) as Box<dyn Any>)
                .downcast::<FloatTensor<B>>()
                .unwrap_or_else(|_| unreachable!("TypeId checked"))),
            Err(error) => {
                static WARNED: Once = Once::new();
                WARNED.call_once(|| {
                    tracing::warn!("cuBLAS GEMM failed, using Burn's matmul instead: {error}");
                });
                Err((a, b, acc))
            }
        }
    }

    /// `alpha·op(a)·op(b)` written by cuBLASLt straight into columns `col0..` of `out` (see
    /// [`crate::FusedMlpKernels::gemm_into_columns`]): the block of columns as a view of `out`'s
    /// buffer (a byte offset CUDA takes as it is). When the tensors are not CUDA tensors, or
    /// cuBLAS refuses (reported once), the operands back for the caller's portable path.
    pub(crate) fn try_gemm_into_columns<B: Backend>(
        a: FloatTensor<B>,
        trans_a: Trans,
        b: FloatTensor<B>,
        trans_b: Trans,
        alpha: f64,
        out: &FloatTensor<B>,
        col0: usize,
    ) -> Result<(), (FloatTensor<B>, FloatTensor<B>)> {
        if TypeId::of::<FloatTensor<B>>() != TypeId::of::<CudaTensor>() || !cublas_enabled() {
            return Err((a, b));
        }
        let (ca, cb, whole) = (as_cuda(&a), as_cuda(&b), as_cuda(out));
        let rows = |t: &CudaTensor, trans: bool| t.meta.shape()[usize::from(trans)];
        let m = rows(ca, trans_a == Trans::T);
        let n = rows(cb, trans_b == Trans::N);
        let mut block = whole.clone();
        block.handle = block
            .handle
            .offset_start((col0 * whole.dtype.size()) as u64);
        let ld = whole.meta.strides()[0];
        *block.meta.shape_mut() = [m, n].into();
        *block.meta.strides_mut() = [ld, 1].into();
        let op = GemmOp {
            trans_a: trans_a == Trans::T,
            trans_b: trans_b == Trans::T,
            alpha: alpha as f32,
            ..GemmOp::default()
        };
        match gemm_into(ca, cb, &block, op) {
            Ok(_) => Ok(()),
            Err(error) => {
                static WARNED: Once = Once::new();
                WARNED.call_once(|| {
                    tracing::warn!("cuBLAS GEMM into a block failed, using Burn's matmul: {error}");
                });
                Err((a, b))
            }
        }
    }

    /// `FASTLORA_CUBLAS=0` turns the cuBLAS GEMMs off (Burn's matmul instead): an escape hatch
    /// and a way to tell a cuBLAS problem from a kernel problem on a GPU.
    fn cublas_enabled() -> bool {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ENABLED.get_or_init(|| std::env::var("FASTLORA_CUBLAS").map_or(true, |v| v != "0"))
    }

    fn as_cuda<T: 'static>(t: &T) -> &CudaTensor {
        (t as &dyn Any)
            .downcast_ref::<CudaTensor>()
            .unwrap_or_else(|| unreachable!("TypeId checked"))
    }
}
