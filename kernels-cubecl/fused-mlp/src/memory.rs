//! Where CubeCL puts a model's frozen weights on CUDA (and, by default, a whole training run's
//! buffers).
//!
//! CubeCL's default pools carve allocations out of pages of fixed sizes (on an H200: 8.6 MB up
//! to 8.8 GB, and 35 GB, a page size per range of allocation sizes): a 1 GB embedding table
//! reserves an 8.8 GB page, and weights the size of the step's activations share their pages,
//! so freed activations fragment the pages the weights pin. The persistent pool instead gives
//! each allocation a buffer of exactly its size and hands freed buffers only to requests of the
//! same size. Weights never change size, so [`with_persistent_memory`] puts them there; a
//! training step repeats its shapes too, so fastlora's CUDA runs put everything there
//! (`fastlora::CudaMemory`). Scopes nest.

use burn::prelude::*;

/// Runs `f` with CubeCL's persistent allocation on this thread's stream when `device` is a
/// CUDA device (feature `cuda`), so the tensors `f` creates get buffers of their exact size
/// outside the pools of the training step; elsewhere `f` runs unchanged.
///
/// Meant for building a model's frozen weights, or for a whole run of fixed shapes. CubeCL hands
/// a freed persistent buffer to any later request of the same size; buffers of sizes no longer
/// requested stay reserved until `Backend::memory_cleanup`.
pub fn with_persistent_memory<B: Backend, T>(device: &B::Device, f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "cuda")]
    if let Some(device) =
        (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>()
    {
        return fastlora_cuda_gemm::with_persistent_allocation(device, f);
    }
    let _ = device;
    f()
}
