//! How a CUDA run allocates device memory.
//!
//! CubeCL's default pools give each allocation a slice of a page of its size class, with pages of
//! 34 MB up to a quarter of the device; a single buffer just above a class's largest slice (a
//! 100 MB logits chunk on a 141 GB H200) reserves a page of 2.2 GB. Training repeats the same
//! shapes every step, so buffers of their exact size, each reused by the next request of that
//! size (CubeCL's persistent pool), hold far less: measured on the H200 with `fastlora bench`,
//! SmolLM2-135M b8 × 2048 reserves 1.43 GiB instead of 3.55, the Llama rows 2–4 % less, at the
//! same step time (BENCHMARKS.md, session 11).

use burn::prelude::Backend;
use serde::Deserialize;

/// How CubeCL allocates a CUDA run's device memory; the CPU ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CudaMemory {
    /// Every buffer at its exact size, reused by later requests of that size. A new batch
    /// shape needs new sizes: the trainer then releases the buffers no tensor holds.
    #[default]
    Exact,
    /// CubeCL's paged pools: an allocation takes a slice of a page of its size class, so one
    /// odd-sized buffer can reserve a whole page.
    Pools,
}

impl CudaMemory {
    /// The flag's value, as printed in benchmark lines.
    pub fn name(self) -> &'static str {
        match self {
            CudaMemory::Exact => "exact",
            CudaMemory::Pools => "pools",
        }
    }

    /// Runs `f` with this allocation on `device`'s stream of the calling thread (a CUDA device;
    /// elsewhere `f` runs unchanged).
    pub fn run<B: Backend, T>(self, device: &B::Device, f: impl FnOnce() -> T) -> T {
        match self {
            CudaMemory::Exact => fused_mlp::with_persistent_memory::<B, _>(device, f),
            CudaMemory::Pools => f(),
        }
    }
}
