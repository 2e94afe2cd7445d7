//! Failures of work enqueued without waiting for CubeCL's device runner.
//!
//! Each GEMM or fused attention of a configuration that has already run once is handed to the
//! runner thread and the caller goes on (see [`crate::gemm`]): waiting for the runner at every
//! product would stall the host until it had issued all the kernels queued before, serialising
//! the two threads. A failure there (the configuration having worked before, in practice only a
//! CUDA fault) cannot be returned to the call that caused it; it is kept here and returned,
//! wrapped in [`GemmError::Deferred`], by the next GEMM or attention call of any thread. With
//! `FASTLORA_GPU_WAIT=1` every call waits instead ([`always_wait`]).

use std::sync::{Mutex, OnceLock};

use cubecl::cuda::CudaDevice;
use cubecl::device::Device;
use cubecl::device_handle::DeviceHandle;

use crate::error::GemmError;
use crate::stream::CudaServer;

/// Whether every call waits for the runner (`FASTLORA_GPU_WAIT=1`): each failure is then
/// returned by the call that caused it, at the cost of serialising the host with the runner.
pub(crate) fn always_wait() -> bool {
    static WAIT: OnceLock<bool> = OnceLock::new();
    *WAIT.get_or_init(|| std::env::var("FASTLORA_GPU_WAIT").is_ok_and(|v| v == "1"))
}

/// The first failure not yet reported.
static FAILED: Mutex<Option<GemmError>> = Mutex::new(None);

/// Keeps `error` for the next call, unless an earlier one is still waiting (the first failure is
/// the informative one).
pub(crate) fn record(error: GemmError) {
    let mut failed = FAILED.lock().unwrap_or_else(|e| e.into_inner());
    if failed.is_none() {
        *failed = Some(error);
    }
}

/// The kept failure, if any, as an error (and forgets it).
pub(crate) fn take() -> Result<(), GemmError> {
    let failed = FAILED.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failed {
        Some(error) => Err(GemmError::Deferred(Box::new(error))),
        None => Ok(()),
    }
}

/// Hands `task` to `device`'s CubeCL runner and returns at once. The runner runs it with the
/// server, in FIFO order after the calling thread's earlier CubeCL work; its failure is kept
/// for the next call to report ([`take`]).
pub(crate) fn hand_over<T>(
    device: &CudaDevice,
    task: impl FnOnce(&mut CudaServer) -> Result<T, GemmError> + Send + 'static,
) {
    DeviceHandle::<CudaServer>::new(device.to_id()).submit(move |server: &mut CudaServer| {
        if let Err(error) = task(server) {
            record(error);
        }
    });
}
