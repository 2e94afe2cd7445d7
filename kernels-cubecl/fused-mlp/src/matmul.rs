//! Plain (non-LoRA) matrix products through the GEMM provider the fused ops use: cuBLASLt on
//! CUDA, so the loss's chunked LM-head products run at vendor-GEMM speed like every projection
//! of the model; Burn's matmul on every other backend.

use burn::prelude::*;

use crate::op::Trans;

/// Runs `$body` with `$KB` bound to the plain (non-autodiff) CubeCL backend equal to `$B`, if
/// any; else `None`. The inner-backend counterpart of `for_fused_backends!`.
macro_rules! for_kernel_backends {
    ($B:ty, |$KB:ident| $body:expr) => {{
        #[allow(unused_mut)]
        let mut result = None;
        let id = std::any::TypeId::of::<$B>();
        #[cfg(feature = "cuda")]
        {
            if result.is_none() && id == std::any::TypeId::of::<crate::CudaBackend<f32>>() {
                type $KB = crate::CudaBackend<f32>;
                result = $body;
            }
            type Cuda16 = crate::CudaBackend<burn::tensor::bf16>;
            if result.is_none() && id == std::any::TypeId::of::<Cuda16>() {
                type $KB = Cuda16;
                result = $body;
            }
        }
        #[cfg(feature = "wgpu")]
        {
            if result.is_none() && id == std::any::TypeId::of::<crate::WgpuBackend<f32>>() {
                type $KB = crate::WgpuBackend<f32>;
                result = $body;
            }
        }
        let _ = id;
        result
    }};
}

/// `op(a)·op(b)` with `op` the identity or the transpose, outside autodiff (the inner backend
/// of a hand-written backward, e.g. the chunked cross-entropy's).
///
/// # Shapes
/// - a: `[M, K]` (`[K, M]` with [`Trans::T`])
/// - b: `[K, N]` (`[N, K]` with [`Trans::T`])
/// - output: `[M, N]`
///
/// # Panics
/// If the inner dimensions differ (as Burn's `matmul`).
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_mut))]
pub fn matmul<B: Backend>(
    a: Tensor<B, 2>,
    trans_a: Trans,
    b: Tensor<B, 2>,
    trans_b: Trans,
) -> Tensor<B, 2> {
    let mut operands = Some((a, b));
    let product: Option<Tensor<B, 2>> = for_kernel_backends!(B, |KB| {
        use burn::tensor::TensorPrimitive;
        let (a, b) = operands.take().expect("taken once");
        let a: Tensor<KB, 2> = crate::dispatch::cast(a);
        let b: Tensor<KB, 2> = crate::dispatch::cast(b);
        let c = <KB as crate::FusedMlpKernels>::gemm(
            a.into_primitive().tensor(),
            trans_a,
            b.into_primitive().tensor(),
            trans_b,
            1.0,
            None,
        );
        let c = Tensor::<KB, 2>::from_primitive(TensorPrimitive::Float(c));
        Some(crate::dispatch::cast::<Tensor<KB, 2>, Tensor<B, 2>>(c))
    });
    product.unwrap_or_else(|| {
        let (a, b) = operands.take().expect("not taken");
        let op = |t: Tensor<B, 2>, trans| match trans {
            Trans::N => t,
            Trans::T => t.transpose(),
        };
        op(a, trans_a).matmul(op(b, trans_b))
    })
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;
    use crate::WgpuBackend;

    #[test]
    fn matches_burn_matmul_for_every_transpose() {
        let Some(device) = crate::vulkan_test_device() else {
            return;
        };
        let normal = || burn::tensor::Distribution::Normal(0.0, 1.0);
        // a and b, and their transposes stored as such.
        let a_t = Tensor::<WgpuBackend<f32>, 2>::random([19, 37], normal(), &device);
        let b_t = Tensor::<WgpuBackend<f32>, 2>::random([23, 19], normal(), &device);
        let a = Tensor::from_data(a_t.to_data(), &device).transpose();
        let b = Tensor::from_data(b_t.to_data(), &device).transpose();
        let want: Tensor<WgpuBackend<f32>, 2> = a.clone().matmul(b.clone());
        let cases = [
            (a.clone(), Trans::N, b.clone(), Trans::N),
            (a_t.clone(), Trans::T, b.clone(), Trans::N),
            (a.clone(), Trans::N, b_t.clone(), Trans::T),
            (a_t, Trans::T, b_t, Trans::T),
        ];
        for (x, tx, y, ty) in cases {
            let got = matmul(x, tx, y, ty);
            let diff: f32 = (got - want.clone()).abs().max().into_scalar();
            assert!(diff < 1e-4, "{tx:?}{ty:?}: {diff}");
        }
    }
}
