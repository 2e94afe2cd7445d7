//! CubeCL's persistent allocation for a scope of work on this thread's CUDA stream.

use burn::backend::cuda::CudaDevice;
use cubecl::MemoryAllocationMode;
use cubecl::Runtime;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::ComputeClient;

/// Puts the stream back to automatic allocation when dropped, also when the scope panics.
struct Restore(ComputeClient<CudaRuntime>);

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: as in `with_persistent_allocation`, for this thread's stream only.
        unsafe { self.0.allocation_mode(MemoryAllocationMode::Auto) };
    }
}

/// Runs `f` with CubeCL's persistent allocation on this thread's stream of `device`: every
/// buffer `f` allocates there gets its exact size, outside CubeCL's paged pools, and once freed
/// goes only to later requests of the same size (CubeCL's policy for that pool).
pub fn with_persistent_allocation<T>(device: &CudaDevice, f: impl FnOnce() -> T) -> T {
    let client = CudaRuntime::client(device);
    // SAFETY: CubeCL keeps the mode per stream, and this thread's stream is the one `f`
    // allocates on; `Restore` sets it back to `Auto` before this thread issues anything else.
    // CubeCL's warning ("might create memory leaks") is that pool's policy: freed buffers stay
    // reserved for requests of their size.
    unsafe { client.allocation_mode(MemoryAllocationMode::Persistent) };
    let _restore = Restore(client);
    f()
}
