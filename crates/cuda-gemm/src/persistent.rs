//! CubeCL's persistent allocation for a scope of work on this thread's CUDA stream.

use std::cell::Cell;

use burn::backend::cuda::CudaDevice;
use cubecl::MemoryAllocationMode;
use cubecl::Runtime;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::ComputeClient;

thread_local! {
    /// How many persistent scopes this thread is inside: only the outermost one sets the mode
    /// back (CubeCL offers no way to read the mode, so an inner scope cannot restore it).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Leaves a persistent scope when dropped, also when the scope panics; the outermost one puts
/// the stream back to automatic allocation.
struct Restore(ComputeClient<CudaRuntime>);

impl Drop for Restore {
    fn drop(&mut self) {
        let depth = DEPTH.with(|d| {
            d.set(d.get() - 1);
            d.get()
        });
        if depth == 0 {
            // SAFETY: as in `with_persistent_allocation`, for this thread's stream only.
            unsafe { self.0.allocation_mode(MemoryAllocationMode::Auto) };
        }
    }
}

/// Runs `f` with CubeCL's persistent allocation on this thread's stream of `device`: every
/// buffer `f` allocates there gets its exact size, outside CubeCL's paged pools, and once freed
/// goes only to later requests of the same size (CubeCL's policy for that pool). Scopes nest:
/// the stream returns to CubeCL's paged pools when the outermost one ends.
pub fn with_persistent_allocation<T>(device: &CudaDevice, f: impl FnOnce() -> T) -> T {
    let client = CudaRuntime::client(device);
    // SAFETY: CubeCL keeps the mode per stream, and this thread's stream is the one `f`
    // allocates on; `Restore` sets it back to `Auto` before this thread issues anything else.
    // CubeCL's warning ("might create memory leaks") is that pool's policy: freed buffers stay
    // reserved for requests of their size.
    unsafe { client.allocation_mode(MemoryAllocationMode::Persistent) };
    DEPTH.with(|d| d.set(d.get() + 1));
    let _restore = Restore(client);
    f()
}
