//! The cross-entropy of one chunk of LM-head logits in a single CubeCL kernel, for the chunked
//! (fused) linear cross-entropy of `fastlora-llama`.
//!
//! For each row `z` (one token's logits over the vocabulary) with target `t`:
//!
//! ```text
//! lse = m + ln Σ_j exp(z_j − m),  m = max_j z_j
//! nll = lse − z_t                          (0 when t = IGNORE_INDEX, i.e. negative)
//! d_j = exp(z_j − lse) − [j = t]           (0 on ignored rows), written over z
//! ```
//!
//! `d` is `∂nll/∂z`. In Burn ops this is about ten passes over the chunk in f32 (cast, max,
//! subtract, exp, sum, gather, scatter, cast back); the kernel reads the chunk twice and writes
//! it once in its storage type (bf16 on GPUs), with all arithmetic in f32.
//!
//! [`cross_entropy_rows`] runs it on the CubeCL backends compiled in (features `cuda`, `wgpu`)
//! and returns `None` on every other backend, where the caller keeps its Burn-ops path.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::*;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Allows or forbids the kernel process-wide (allowed by default); forbidden,
/// [`cross_entropy_rows`] hands every call back to the caller's Burn-ops path.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::SeqCst);
}

#[cfg(feature = "cubecl")]
pub mod kernel;

/// The CUDA backend the kernel runs on: plain `CubeBackend`, no Fusion.
#[cfg(feature = "cuda")]
pub type CudaBackend<F> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;

/// The wgpu backend the kernel runs on: plain `CubeBackend`, no Fusion.
#[cfg(feature = "wgpu")]
pub type WgpuBackend<F> = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, F, i32, u32>;

/// What [`cross_entropy_rows`] gives: per-row NLL `[rows]` and `softmax − onehot`
/// `[rows, vocab]`.
pub type RowsLoss<B> = (Tensor<B, 1>, Tensor<B, 2>);

/// What [`cross_entropy_rows`] hands back when it cannot run: the logits and the targets.
pub type RowsOperands<B> = (Tensor<B, 2>, Tensor<B, 1, Int>);

/// Per-row NLL (`[rows]`, f32) and `softmax − onehot` (`[rows, vocab]`, `logits`' dtype, in
/// `logits`' buffer when it is not shared) of a chunk, both zero on rows whose target is
/// negative (ignored).
///
/// # Errors
/// The operands back, untouched, when `B` is not a backend the kernel is compiled for.
///
/// # Shapes
/// - logits: `[rows, vocab]`
/// - targets: `[rows]`, class indices in `0..vocab` or negative (ignored)
///
/// # Panics
/// If the shapes disagree.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_mut))]
pub fn cross_entropy_rows<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Result<RowsLoss<B>, RowsOperands<B>> {
    if !ENABLED.load(Ordering::Relaxed) {
        return Err((logits, targets));
    }
    let mut operands = Some((logits, targets));
    let mut result = None;
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    macro_rules! run_on {
        ($KB:ty) => {
            if result.is_none() && std::any::TypeId::of::<B>() == std::any::TypeId::of::<$KB>() {
                use burn::tensor::TensorPrimitive;
                let (logits, targets) = operands.take().expect("taken once");
                let logits: Tensor<$KB, 2> = cast(logits);
                let targets: Tensor<$KB, 1, Int> = cast(targets);
                let (nll, grad) =
                    kernel::launch(logits.into_primitive().tensor(), targets.into_primitive());
                let nll = Tensor::<$KB, 1>::from_primitive(TensorPrimitive::Float(nll));
                let grad = Tensor::<$KB, 2>::from_primitive(TensorPrimitive::Float(grad));
                result = Some((cast(nll), cast(grad)));
            }
        };
    }
    #[cfg(feature = "cuda")]
    {
        run_on!(CudaBackend<f32>);
        run_on!(CudaBackend<burn::tensor::bf16>);
        run_on!(CudaBackend<burn::tensor::f16>);
    }
    #[cfg(feature = "wgpu")]
    {
        run_on!(WgpuBackend<f32>);
    }
    result.ok_or_else(|| operands.take().expect("operands are taken only on success"))
}

/// Moves `value` into the type `U`, which the caller has checked is `T` itself.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn std::any::Any>)
        .downcast::<U>()
        .unwrap_or_else(|_| unreachable!("TypeId checked before the cast"))
}
