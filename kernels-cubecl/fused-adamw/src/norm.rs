//! The squared L2 norm of many gradient tensors, for global gradient-norm clipping: one kernel
//! launch per tensor on the CubeCL backends, one device read in all.

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::dispatch::cube_runtime;

/// Sums the squares of every element of the tensors [`add`](Self::add)ed to it, and reads the
/// total once, in [`finish`](Self::finish).
///
/// On a CubeCL backend compiled into this build (see [`crate::fused_backend`]) each `add` is
/// one kernel launch that adds per-cube partial sums (f32) into a shared buffer of
/// `kernels::squared_norm::SLOTS` slots, created zeroed by the first `add` (one more
/// launch); `finish` sums the slots and reads the one value. Elsewhere (and for dtypes the
/// kernel does not take) each `add` is Burn's `cast(f32) · square · sum`, summed on the device.
///
/// Squares are computed and summed in f32 whatever the gradients' dtype.
///
/// Works as the body of a `ModuleVisitor` that looks each parameter's gradient up:
///
/// ```rust
/// use burn::backend::NdArray;
/// use burn::prelude::*;
/// use fused_adamw::SquaredNorm;
///
/// let device = Default::default();
/// let mut norm = SquaredNorm::<NdArray>::new();
/// norm.add(Tensor::<NdArray, 2>::from_floats([[1.0, 2.0], [2.0, 0.0]], &device));
/// norm.add(Tensor::<NdArray, 1>::from_floats([4.0], &device));
/// assert_eq!(norm.finish(), 25.0);
/// ```
pub struct SquaredNorm<B: Backend> {
    /// The kernel's f32 partial sums, `[SLOTS]`.
    slots: Option<Tensor<B, 1>>,
    /// The portable path's running f32 sum, `[1]`.
    sum: Option<Tensor<B, 1>>,
}

impl<B: Backend> Default for SquaredNorm<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> std::fmt::Debug for SquaredNorm<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SquaredNorm")
            .field("kernel", &self.slots.is_some())
            .field("portable", &self.sum.is_some())
            .finish()
    }
}

impl<B: Backend> SquaredNorm<B> {
    /// An empty sum (0).
    pub fn new() -> Self {
        Self {
            slots: None,
            sum: None,
        }
    }

    /// Adds the squares of `grad`'s elements (any shape, any float dtype); reads nothing back.
    ///
    /// # Panics
    /// If `grad` is on another device than the tensors added before.
    pub fn add<const D: usize>(&mut self, grad: Tensor<B, D>) {
        #[cfg(feature = "cubecl")]
        if crate::cube::kernel_dtype(grad.dtype()) {
            use crate::dispatch::CubeRuntimeKind;
            match cube_runtime::<B>() {
                #[cfg(feature = "cuda")]
                Some(CubeRuntimeKind::Cuda) => {
                    let slots = self.slots.take();
                    self.slots = Some(crate::cube::add_squares::<B, cubecl::cuda::CudaRuntime, D>(
                        slots, grad,
                    ));
                    return;
                }
                #[cfg(feature = "wgpu")]
                Some(CubeRuntimeKind::Wgpu) => {
                    let slots = self.slots.take();
                    self.slots = Some(crate::cube::add_squares::<B, cubecl::wgpu::WgpuRuntime, D>(
                        slots, grad,
                    ));
                    return;
                }
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        let _ = cube_runtime::<B>;
        let grad = if grad.dtype() == DType::F32 {
            grad
        } else {
            grad.cast(FloatDType::F32)
        };
        let squares = grad.square().sum();
        self.sum = Some(match self.sum.take() {
            Some(sum) => sum + squares,
            None => squares,
        });
    }

    /// The sum of squares of every element added, read from the device once (0 when nothing
    /// was added).
    pub fn finish(self) -> f32 {
        let total = match (self.slots.map(|s| s.sum()), self.sum) {
            (Some(a), Some(b)) => a + b,
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return 0.0,
        };
        total
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("an f32 scalar")[0]
    }
}

/// The sum of squares of every element of `grads`, as [`SquaredNorm`] computes it (one kernel
/// launch per tensor on the CubeCL backends, one device read).
pub fn squared_norm<B: Backend, const D: usize>(
    grads: impl IntoIterator<Item = Tensor<B, D>>,
) -> f32 {
    let mut norm = SquaredNorm::new();
    for grad in grads {
        norm.add(grad);
    }
    norm.finish()
}
