//! Recognising, for a backend `B` known only as `B: Backend`, whether its float tensors are
//! `CubeTensor<R>` of a CubeCL runtime compiled into this build, and moving tensors between the
//! two names of that one type.
//!
//! Burn 0.21 has no backend-extension dispatch and Rust has no specialization, so the optimizer
//! (a `SimpleOptimizer<B>` for every `B`) compares `B::FloatTensorPrimitive` at run time
//! (`TypeId`) with `CubeTensor<R>` for the runtimes the features `cuda` and `wgpu` add. That
//! covers every `CubeBackend<R, F, I, BT>` of those runtimes, whatever its element types (the
//! storage dtype travels in the tensor), and nothing else (Fusion-wrapped backends, NdArray, ...
//! take the portable path).

use std::any::{Any, TypeId};

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::backend::BackendTypes;

/// A CubeCL runtime compiled into this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CubeRuntimeKind {
    /// `cubecl::cuda::CudaRuntime`.
    #[cfg(feature = "cuda")]
    Cuda,
    /// `cubecl::wgpu::WgpuRuntime`.
    #[cfg(feature = "wgpu")]
    Wgpu,
}

static KERNELS_ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Allows or forbids the kernels process-wide (allowed by default): forbidden, every backend
/// takes Burn's AdamW and plain Burn ops, e.g. to bisect a numerical difference.
pub fn set_kernels_enabled(enabled: bool) {
    KERNELS_ENABLED.store(enabled, std::sync::atomic::Ordering::SeqCst);
}

/// The runtime whose `CubeTensor` is `B`'s float tensor primitive, if it is compiled in.
pub(crate) fn cube_runtime<B: Backend>() -> Option<CubeRuntimeKind> {
    if !KERNELS_ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let id = TypeId::of::<<B as BackendTypes>::FloatTensorPrimitive>();
    #[cfg(feature = "cuda")]
    if id == TypeId::of::<burn_cubecl::tensor::CubeTensor<cubecl::cuda::CudaRuntime>>() {
        return Some(CubeRuntimeKind::Cuda);
    }
    #[cfg(feature = "wgpu")]
    if id == TypeId::of::<burn_cubecl::tensor::CubeTensor<cubecl::wgpu::WgpuRuntime>>() {
        return Some(CubeRuntimeKind::Wgpu);
    }
    let _ = id;
    None
}

/// Whether `B`'s optimizer steps and squared norms run the CubeCL kernels in this build (else
/// they run Burn's AdamW and plain Burn ops).
pub fn fused_backend<B: Backend>() -> bool {
    cube_runtime::<B>().is_some()
}

/// Moves `value` into the type `U`, which the caller has checked is `T` itself.
#[cfg_attr(not(feature = "cubecl"), allow(dead_code))]
pub(crate) fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<U>()
        .unwrap_or_else(|_| unreachable!("TypeId checked before the cast"))
}

/// `tensor`'s primitive as the type `P` (`CubeTensor<R>`, checked by the caller).
#[cfg_attr(not(feature = "cubecl"), allow(dead_code))]
pub(crate) fn into_prim<B: Backend, P: 'static, const D: usize>(tensor: Tensor<B, D>) -> P {
    cast(tensor.into_primitive().tensor())
}

/// The tensor of primitive `prim` (a `CubeTensor<R>` that is `B`'s float primitive).
#[cfg_attr(not(feature = "cubecl"), allow(dead_code))]
pub(crate) fn from_prim<B: Backend, P: 'static, const D: usize>(prim: P) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(cast(prim)))
}
