//! Choosing the fast op for a model generic over `B: Backend`, as `fused_mlp::mlp` does: `B` is
//! compared at run time (`TypeId`) with the concrete backends the op is compiled for (features
//! `cuda`, `wgpu`), and the tensors are moved into that type through `Any` (a no-op move).

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use burn::prelude::*;

use crate::segments::Segments;

/// Runs `$body` with `$FB` bound to the fast backend type equal to `$B`, if any; else `None`.
macro_rules! for_fast_backends {
    ($B:ty, |$FB:ident| $body:expr) => {{
        #[allow(unused_mut)]
        let mut result = None;
        let id = std::any::TypeId::of::<$B>();
        #[cfg(feature = "cuda")]
        {
            type Cuda32 = fused_mlp::CudaBackend<f32>;
            type Cuda16 = fused_mlp::CudaBackend<burn::tensor::bf16>;
            type CudaAd32 = burn::backend::Autodiff<Cuda32>;
            type CudaAd16 = burn::backend::Autodiff<Cuda16>;
            if result.is_none() && id == std::any::TypeId::of::<CudaAd32>() {
                type $FB = CudaAd32;
                result = $body;
            }
            if result.is_none() && id == std::any::TypeId::of::<CudaAd16>() {
                type $FB = CudaAd16;
                result = $body;
            }
            if result.is_none() && id == std::any::TypeId::of::<Cuda32>() {
                type $FB = Cuda32;
                result = $body;
            }
            if result.is_none() && id == std::any::TypeId::of::<Cuda16>() {
                type $FB = Cuda16;
                result = $body;
            }
        }
        #[cfg(feature = "wgpu")]
        {
            type Wgpu32 = fused_mlp::WgpuBackend<f32>;
            type WgpuAd32 = burn::backend::Autodiff<Wgpu32>;
            if result.is_none() && id == std::any::TypeId::of::<WgpuAd32>() {
                type $FB = WgpuAd32;
                result = $body;
            }
            if result.is_none() && id == std::any::TypeId::of::<Wgpu32>() {
                type $FB = Wgpu32;
                result = $body;
            }
        }
        let _ = id;
        result
    }};
}

static FLASH_ENABLED: AtomicBool = AtomicBool::new(true);
static KERNELS_ENABLED: AtomicBool = AtomicBool::new(true);

/// Allows or forbids the fast attention process-wide (allowed by default). The model also
/// falls back when `fused_mlp::set_fused_enabled(false)` is in force.
pub fn set_flash_enabled(enabled: bool) {
    FLASH_ENABLED.store(enabled, Ordering::SeqCst);
}

/// Whether the fast attention is allowed (see [`set_flash_enabled`]).
pub fn flash_enabled() -> bool {
    FLASH_ENABLED.load(Ordering::SeqCst)
}

/// Chooses the CubeCL kernels (default) or the plain Burn-ops version ([`crate::block`]) for
/// the op's softmax steps, process-wide; the same results either way.
pub fn set_kernels_enabled(enabled: bool) {
    KERNELS_ENABLED.store(enabled, Ordering::SeqCst);
}

/// Whether the softmax steps run as CubeCL kernels (see [`set_kernels_enabled`]).
pub fn kernels_enabled() -> bool {
    KERNELS_ENABLED.load(Ordering::SeqCst)
}

/// 0: not set (the environment decides), 1: forbidden, 2: allowed.
static CUDNN_CHOICE: AtomicU8 = AtomicU8::new(0);

/// Allows or forbids cuDNN's fused attention process-wide, overriding the environment;
/// forbidden, CUDA runs the block-wise op.
pub fn set_cudnn_enabled(enabled: bool) {
    CUDNN_CHOICE.store(if enabled { 2 } else { 1 }, Ordering::SeqCst);
}

/// Whether cuDNN's fused attention may run: as [`set_cudnn_enabled`] last said, else unless
/// the environment sets `FASTLORA_CUDNN=0`. On by default: on the H200 its outputs and
/// gradients match the materialised attention (`attention-bench check-bf16`) and it runs the
/// forward and backward 3.3–5.2× faster than the block-wise op (`attention-bench time`).
pub fn cudnn_enabled() -> bool {
    match CUDNN_CHOICE.load(Ordering::SeqCst) {
        1 => false,
        2 => true,
        _ => {
            static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *FROM_ENV.get_or_init(|| std::env::var("FASTLORA_CUDNN").as_deref() != Ok("0"))
        }
    }
}

/// How many cuDNN attention forwards and backwards this process has run (both 0 in a build
/// without the `cuda` feature): tells a caller that the fused kernel ran rather than the
/// block-wise op.
pub fn cudnn_calls() -> (usize, usize) {
    #[cfg(feature = "cuda")]
    {
        fastlora_cuda_gemm::sdpa_calls()
    }
    #[cfg(not(feature = "cuda"))]
    {
        (0, 0)
    }
}

/// Sequence lengths that keep the attention on cuDNN on backend `B` are multiples of this; 1
/// where no length matters (no cuDNN path on `B`, or cuDNN turned off).
///
/// cuDNN up to 9.15 runs its causal flash attention only on sequences of a multiple of 128
/// (`fastlora_cuda_gemm::sdpa_forward` declines the rest, which then take the block-wise op, 3–5×
/// slower). A trainer can pad right-padded batches up to this length: the extra positions are
/// later than every real token, so under causal attention no real token sees them, and the loss
/// reads none of them.
pub fn fused_sequence_multiple<B: Backend>() -> usize {
    if cudnn_first::<B>() { 128 } else { 1 }
}

/// Whether [`attention`] on `B` offers unmasked problems to cuDNN's fused attention first: a
/// CUDA backend in bf16 (cuDNN has no f32 kernel), [`flash_available`], and [`cudnn_enabled`].
pub fn cudnn_first<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    {
        type Cuda16 = fused_mlp::CudaBackend<burn::tensor::bf16>;
        let id = std::any::TypeId::of::<B>();
        let cuda_bf16 = id == std::any::TypeId::of::<Cuda16>()
            || id == std::any::TypeId::of::<burn::backend::Autodiff<Cuda16>>();
        cuda_bf16 && cudnn_enabled() && flash_available::<B>()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Whether backend `B` is one the op is compiled for in this build.
pub fn fast_backend<B: Backend>() -> bool {
    let probe: Option<()> = for_fast_backends!(B, |_FB| Some(()));
    probe.is_some()
}

/// Whether [`attention`] takes the fast op on `B` now: a compiled backend, and both
/// [`flash_enabled`] and `fused_mlp::fused_enabled()`.
pub fn flash_available<B: Backend>() -> bool {
    flash_enabled() && fused_mlp::fused_enabled() && fast_backend::<B>()
}

/// Causal GQA attention through the fast op ([`crate::flash_attention`], default block size)
/// when [`flash_available`] on `B`; `None` otherwise (the inputs are then dropped: check
/// [`flash_available`] first and run the materialised attention instead).
///
/// # Shapes
/// - q: `[b, h, s, d]`; k, v: `[b, kvh, s, d]`; segments: `[b, s]` ([`crate::Segments`])
/// - output: `[b, s, h·d]`
#[cfg_attr(
    not(any(feature = "cuda", feature = "wgpu")),
    allow(unused_mut, unused)
)]
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segments: Option<Segments<B>>,
) -> Option<Tensor<B, 3>> {
    if !flash_enabled() || !fused_mlp::fused_enabled() {
        return None;
    }
    let mut inputs = Some((q, k, v, segments));
    for_fast_backends!(B, |FB| {
        let (q, k, v, segments) = inputs.take().expect("taken once");
        let out = crate::flash_attention::<FB>(
            cast(q),
            cast(k),
            cast(v),
            segments.map(cast::<Segments<B>, Segments<FB>>),
            None,
        );
        Some(cast::<Tensor<FB, 3>, Tensor<B, 3>>(out))
    })
}

/// Moves `value` into the type `U`, which the caller has checked is `T` itself.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<U>()
        .unwrap_or_else(|_| unreachable!("TypeId checked before the cast"))
}
