//! Finding the concrete `Autodiff<I, C>` behind a model's generic `B: Backend`.
//!
//! The recomputing op needs the autodiff graph (node ids, a custom backward step), which only the
//! concrete `Autodiff<I, C>` type exposes; Burn 0.21 has no trait giving it for a generic
//! backend, and the model crates must stay generic without new bounds. So [`checkpointed`]
//! compares `B` at run time (`TypeId`) with the autodiff backends this build knows (the CPU
//! default always; CUDA and wgpu with the crate features `cuda` and `wgpu`), as
//! `fused_mlp::dispatch` does, and moves tensors between the two names of the same type through
//! `Any` (a move, never a copy or a conversion).

use std::any::{Any, TypeId};

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::prelude::*;

use crate::CheckpointMode;
use crate::op;

/// Runs `$body` with `$I` bound to the inner backend and `$C` to the checkpoint strategy of the
/// known autodiff backend equal to `$B`, if any; else `None`.
macro_rules! for_checkpoint_backends {
    ($B:ty, |$I:ident, $C:ident| $body:expr) => {{
        #[allow(unused_mut)]
        let mut result = None;
        let id = TypeId::of::<$B>();
        type $C = burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
        {
            type $I = NdArray<f32>;
            if result.is_none() && id == TypeId::of::<Autodiff<$I, $C>>() {
                result = $body;
            }
        }
        #[cfg(feature = "cuda")]
        {
            type Cuda<F> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;
            {
                type $I = Cuda<f32>;
                if result.is_none() && id == TypeId::of::<Autodiff<$I, $C>>() {
                    result = $body;
                }
            }
            {
                type $I = Cuda<burn::tensor::bf16>;
                if result.is_none() && id == TypeId::of::<Autodiff<$I, $C>>() {
                    result = $body;
                }
            }
            {
                type $I = Cuda<burn::tensor::f16>;
                if result.is_none() && id == TypeId::of::<Autodiff<$I, $C>>() {
                    result = $body;
                }
            }
        }
        #[cfg(feature = "wgpu")]
        {
            type $I = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
            if result.is_none() && id == TypeId::of::<Autodiff<$I, $C>>() {
                result = $body;
            }
        }
        result
    }};
}

/// Whether the recomputing op exists for backend `B` in this build.
pub(crate) fn supported<B: Backend>() -> bool {
    let probe: Option<()> = for_checkpoint_backends!(B, |I, C| Some(()));
    probe.is_some()
}

/// Runs `forward(layer, input)` through the recomputing op when `B` is a known autodiff
/// backend; gives the arguments back untouched otherwise.
pub(crate) fn checkpointed<B, M, F, const D: usize>(
    mode: CheckpointMode,
    input: Tensor<B, D>,
    layer: &M,
    forward: F,
    seed: u64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, F)>
where
    B: Backend,
    M: Module<B> + 'static,
    F: Fn(&M, Tensor<B, D>) -> Tensor<B, D> + Send + 'static,
{
    let mut args = Some((input, forward));
    let output = for_checkpoint_backends!(B, |I, C| {
        let (input, forward) = args.take().expect("taken once");
        // NdArray's "device" is host memory: offloading would only copy.
        let offload = mode == CheckpointMode::HostOffload
            && TypeId::of::<I>() != TypeId::of::<NdArray<f32>>();
        Some(op::checkpointed::<B, I, C, M, F, D>(
            offload, input, layer, forward, seed,
        ))
    });
    match output {
        Some(output) => Ok(output),
        None => Err(args.expect("not taken")),
    }
}

/// Moves `value` into the type `U`, which the caller has checked is `T` itself.
pub(crate) fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<U>()
        .unwrap_or_else(|_| unreachable!("TypeId checked before the cast"))
}
