//! Burn's AdamW step as one CubeCL kernel launch per group of up to 16 parameters (or per
//! parameter), and the squared L2 norm of many gradients with one launch per tensor and one
//! device read.
//!
//! Burn 0.21's `AdamW` (a `SimpleOptimizer`) runs ~15 element-wise tensor operations per
//! parameter, each its own kernel launch; on a GPU a LoRA model's hundreds of small adapter
//! tensors make the optimizer step launch-bound. Summing the gradients' squares for global norm
//! clipping costs a cast, a square, a sum and an add per tensor, plus a read when each is
//! turned into a number.
//!
//! - [`FusedAdamW`] is a `SimpleOptimizer<B>` for every Burn backend `B` with Burn's own state
//!   type ([`burn::optim::AdamWState`]), so an `OptimizerAdaptor<AdamW, M, B>` record (a
//!   checkpoint) loads into an `OptimizerAdaptor<FusedAdamW, M, B>` and continues. On a CubeCL
//!   backend of a runtime compiled in (features `cuda`, `wgpu`; see [`fused_backend`]) a step
//!   is one launch of `kernels::adamw_step` (module `kernels`: feature `cubecl`); on any other
//!   backend (NdArray, ...) it is Burn's `AdamW` with the same hyper-parameters, bit for bit.
//! - [`GroupedAdamW`] is a whole-module `Optimizer<M, B>` (the trainer's): on those backends it
//!   steps every parameter with a gradient in groups of up to 16 tensors, one launch of the same
//!   kernel per group, so a LoRA model's hundreds of adapters cost tens of launches; elsewhere it
//!   is `FusedAdamW` through Burn's adaptor. Its record is the adaptor's, so checkpoints load
//!   either way.
//! - [`SquaredNorm`] / [`squared_norm`]: one launch of `kernels::squared_norm` per tensor on
//!   those backends, plain Burn ops elsewhere; one device read at the end either way.
//!
//! The kernels compute in f32 whatever the storage dtype (f32, f16, bf16).

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, AdamWState, LearningRate, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

#[cfg(feature = "cubecl")]
mod cube;
mod dispatch;
mod grouped;
#[cfg(feature = "cubecl")]
pub mod kernels;
mod norm;
#[cfg(feature = "wgpu")]
mod vulkan;

pub use dispatch::{fused_backend, set_kernels_enabled};
pub use grouped::{GroupedAdamW, GroupedAdamWRecord};
pub use norm::{SquaredNorm, squared_norm};
#[cfg(feature = "wgpu")]
pub use vulkan::vulkan_test_device;

/// The wgpu backend the kernels run on in tests: plain `CubeBackend`, no Fusion (f32).
#[cfg(feature = "wgpu")]
pub type WgpuBackend<F = f32> = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, F, i32, u32>;

/// The CUDA backend: plain `CubeBackend`, no Fusion.
#[cfg(feature = "cuda")]
pub type CudaBackend<F = f32> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;

/// [`FusedAdamW`]'s configuration: the hyper-parameters of Burn's `AdamWConfig` without AMSGrad
/// and cautious weight decay, with the same defaults. The learning rate is given per step.
#[derive(Config, Debug)]
pub struct FusedAdamWConfig {
    /// β₁, the first moment's decay.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// β₂, the second moment's decay.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// ε, added to √v̂ for numerical stability.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Decoupled weight decay: each step scales the parameter by `1 − lr·weight_decay`.
    #[config(default = 1e-4)]
    pub weight_decay: f32,
    /// Burn's per-parameter gradient clipping, applied by the `OptimizerAdaptor` before each
    /// step (as `AdamWConfig::grad_clipping`); `None` for none.
    pub grad_clipping: Option<burn::grad_clipping::GradientClippingConfig>,
}

impl FusedAdamWConfig {
    /// Builds the [`FusedAdamW`] step.
    pub fn build(&self) -> FusedAdamW {
        FusedAdamW {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            reference: AdamWConfig::new()
                .with_beta_1(self.beta_1)
                .with_beta_2(self.beta_2)
                .with_epsilon(self.epsilon)
                .with_weight_decay(self.weight_decay)
                .with_amsgrad(false)
                .with_cautious_weight_decay(false)
                .build(),
        }
    }

    /// The optimizer for module `M` on autodiff backend `B`, as `AdamWConfig::init` builds
    /// Burn's (with the per-parameter gradient clipping of [`Self::grad_clipping`], if any).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
    ) -> OptimizerAdaptor<FusedAdamW, M, B> {
        let mut optim = OptimizerAdaptor::from(self.build());
        if let Some(config) = &self.grad_clipping {
            optim = optim.with_grad_clipping(config.init());
        }
        optim
    }
}

/// Burn's AdamW step (no AMSGrad, no cautious weight decay) with Burn's state type, fused into
/// one kernel launch per parameter on the CubeCL backends compiled in (see the crate docs).
///
/// The math, per element, with `t` the step count after this step (1 on the first):
///
/// ```text
/// m = β₁·m + (1−β₁)·g          (first step: (1−β₁)·g)
/// v = β₂·v + (1−β₂)·g²         (first step: (1−β₂)·g²)
/// p = p·(1 − lr·wd) − lr · (m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)
/// ```
///
/// Built by [`FusedAdamWConfig::build`] or [`FusedAdamWConfig::init`].
#[derive(Clone)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// Burn's AdamW with the same hyper-parameters: the step on every other backend.
    reference: AdamW,
}

impl std::fmt::Debug for FusedAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedAdamW")
            .field("beta_1", &self.beta_1)
            .field("beta_2", &self.beta_2)
            .field("epsilon", &self.epsilon)
            .field("weight_decay", &self.weight_decay)
            .finish()
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        #[cfg(feature = "cubecl")]
        let (tensor, grad, state) = {
            use dispatch::CubeRuntimeKind;
            let fused = match dispatch::cube_runtime::<B>() {
                #[cfg(feature = "cuda")]
                Some(CubeRuntimeKind::Cuda) => {
                    cube::step::<B, cubecl::cuda::CudaRuntime, D>(self, lr, tensor, grad, state)
                }
                #[cfg(feature = "wgpu")]
                Some(CubeRuntimeKind::Wgpu) => {
                    cube::step::<B, cubecl::wgpu::WgpuRuntime, D>(self, lr, tensor, grad, state)
                }
                #[allow(unreachable_patterns)]
                _ => Err((tensor, grad, state)),
            };
            match fused {
                Ok(done) => return done,
                Err(inputs) => inputs,
            }
        };
        self.reference.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}
