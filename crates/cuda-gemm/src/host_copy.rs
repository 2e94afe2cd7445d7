//! Copies of Burn's CUDA tensors to pinned host memory and back, enqueued on CubeCL's own
//! stream: the host offload of gradient checkpointing (`use_gradient_checkpointing="unsloth"`).
//!
//! Burn 0.21's `into_data` / `float_from_data` round trip blocks the host on every read, and its
//! upload copies the bytes twice on the host and then from pageable memory (measured on the
//! H200: 51 ms to bring back one 32 MiB layer input). Here both directions are one
//! `cuMemcpy*Async` between the tensor's device memory and a pinned block, on the same
//! `CUstream` CubeCL issues the caller's kernels on (found as for the GEMMs, see the crate
//! docs), so neither copy waits on the host:
//!
//! - [`copy_to_host`] enqueues device → host after the kernels that wrote the tensor and drops
//!   the device tensor at once; CubeCL may hand its memory to a later allocation, whose kernels
//!   are issued on the same stream, after the copy.
//! - [`copy_to_device`] allocates a device tensor and enqueues host → device before any kernel
//!   that reads it, then returns the block to the pool: the block's next user is another copy
//!   on that stream, ordered after this one.
//!
//! Pinned blocks come from a process-wide pool and are never freed (`cuMemFreeHost`
//! synchronises the whole device): a training step offloads the same layer sizes every step.
//! When CubeCL's stream cannot be identified, or the tensor was produced on another thread's
//! stream, each copy waits for its stream before returning (correct, not overlapped).

use std::sync::Mutex;

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::Runtime;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::device::Device;
use cubecl::device_handle::DeviceHandle;
use cubecl::server::{Binding, ComputeServer};
use cubecl::stream_id::StreamId;

use crate::error::GemmError;
use crate::gemm::CudaTensor;
use crate::stream::{self, CudaServer, StreamOrdering};

/// A page-locked host allocation (`cuMemHostAlloc`).
struct PinnedBlock {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the block is plain host memory; CUDA copies into or out of it are stream-ordered and
// the pool hands a block to one owner at a time.
unsafe impl Send for PinnedBlock {}

/// Free pinned blocks, reused by the smallest that fits.
static POOL: Mutex<Vec<PinnedBlock>> = Mutex::new(Vec::new());

impl PinnedBlock {
    /// A free block of at least `bytes` from the pool, or a new one. Must run with CubeCL's
    /// context current (inside the server closure).
    fn take(bytes: usize) -> Result<Self, GemmError> {
        let mut pool = POOL.lock().map_err(|_| GemmError::Poisoned)?;
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, block)| block.bytes >= bytes)
            .min_by_key(|(_, block)| block.bytes)
            .map(|(index, _)| index);
        if let Some(index) = best {
            return Ok(pool.swap_remove(index));
        }
        drop(pool);
        // SAFETY: a plain allocation in the current context; the memory is only ever the source
        // or destination of copies of at most `bytes` bytes.
        let ptr = unsafe { cudarc::driver::result::malloc_host(bytes.max(1), 0) }
            .map_err(|e| GemmError::driver("cuMemHostAlloc", e))?;
        Ok(Self {
            ptr: ptr.cast(),
            bytes,
        })
    }

    /// Back to the pool (see the module docs for why no wait is needed).
    fn give_back(self) {
        if let Ok(mut pool) = POOL.lock() {
            pool.push(self);
        }
        // A poisoned pool leaks the block: a panic elsewhere already ended training.
    }
}

/// A CUDA tensor's contents in pinned host memory, made by [`copy_to_host`]. The copy may still
/// be in flight; only [`copy_to_device`] (on the same stream) reads it.
pub struct HostCopy {
    block: Option<PinnedBlock>,
    bytes: usize,
    shape: Shape,
    dtype: DType,
    device: CudaDevice,
}

impl std::fmt::Debug for HostCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCopy")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            block.give_back();
        }
    }
}

/// Which way a copy goes.
#[derive(Clone, Copy)]
enum Direction {
    ToHost,
    ToDevice,
}

/// Enqueues a copy of `tensor` into pinned host memory on CubeCL's stream for this thread and
/// releases the device tensor (strided tensors are made row-major first, on the device).
///
/// # Errors
/// A CUDA driver failure (allocating pinned memory, enqueuing the copy) or CubeCL's server
/// refusing the buffer.
pub fn copy_to_host(tensor: CudaTensor) -> Result<HostCopy, GemmError> {
    let tensor = if tensor.is_contiguous() {
        tensor
    } else {
        into_contiguous(tensor)
    };
    let shape = tensor.meta.shape().clone();
    let bytes = shape.num_elements() * tensor.dtype.size();
    let device = tensor.device.clone();
    let binding = tensor.handle.clone().binding();
    let block = enqueue(&device, binding, bytes, None, Direction::ToHost)?;
    Ok(HostCopy {
        block: Some(block),
        bytes,
        shape,
        dtype: tensor.dtype,
        device,
    })
}

/// Enqueues the copy of `copy` into a new device tensor on CubeCL's stream for this thread and
/// returns that tensor (row-major, the shape and dtype of the original).
///
/// # Errors
/// A CUDA driver failure enqueuing the copy or CubeCL's server refusing the new buffer.
pub fn copy_to_device(mut copy: HostCopy) -> Result<CudaTensor, GemmError> {
    let client = CudaRuntime::client(&copy.device);
    let handle = client.empty(copy.bytes);
    let tensor = CubeTensor::new_contiguous(
        client,
        copy.device.clone(),
        copy.shape.clone(),
        handle,
        copy.dtype,
    );
    let block = copy
        .block
        .take()
        .expect("a host copy holds its block until restored");
    let binding = tensor.handle.clone().binding();
    // The block's next user is a copy on the same stream, ordered after this one (module docs).
    enqueue(
        &copy.device,
        binding,
        copy.bytes,
        Some(block),
        Direction::ToDevice,
    )?
    .give_back();
    Ok(tensor)
}

/// Runs one copy between `binding` and `block` (a new pooled one when `None`) inside CubeCL's
/// device runner, on the caller's stream (see [`crate::gemm`] for how the stream is found), and
/// returns the block.
fn enqueue(
    device: &CudaDevice,
    binding: Binding,
    bytes: usize,
    block: Option<PinnedBlock>,
    direction: Direction,
) -> Result<PinnedBlock, GemmError> {
    let stream_id = StreamId::current();
    let device_index = device.index;
    let handle = DeviceHandle::<CudaServer>::new(device.to_id());
    let result = handle.submit_blocking(move |server: &mut CudaServer| {
        let server_err = |e: cubecl::server::ServerError| GemmError::Server {
            desc: "host copy".to_string(),
            reason: e.to_string(),
        };
        let foreign = binding.stream != stream_id;
        let resource = server
            .get_resource(binding, stream_id)
            .map_err(server_err)?;
        let available = resource.resource().size;
        if (bytes as u64) > available {
            return Err(GemmError::Buffer {
                desc: "host copy".to_string(),
                operand: "tensor",
                needed: bytes as u64,
                available,
            });
        }
        let device_ptr = resource.resource().ptr;
        let block = match block {
            Some(block) => block,
            None => PinnedBlock::take(bytes)?,
        };
        stream::with_stream(server, device_index, stream_id, |state, server| {
            let host_sync = matches!(state.ordering, StreamOrdering::HostSync { .. });
            if host_sync {
                cubecl::future::block_on(server.sync(stream_id)).map_err(server_err)?;
            }
            // SAFETY: `block` holds at least `bytes` bytes and stays alive (pooled, never freed)
            // until a later copy on this stream; `device_ptr` is pinned by `resource` until the
            // copy is enqueued, and CubeCL reuses the memory only for work issued after it on
            // this stream (or we wait below).
            unsafe {
                let host = std::slice::from_raw_parts_mut(block.ptr, bytes);
                match direction {
                    Direction::ToHost => {
                        cudarc::driver::result::memcpy_dtoh_async(host, device_ptr, state.stream)
                            .map_err(|e| GemmError::driver("cuMemcpyDtoHAsync", e))?
                    }
                    Direction::ToDevice => {
                        cudarc::driver::result::memcpy_htod_async(device_ptr, host, state.stream)
                            .map_err(|e| GemmError::driver("cuMemcpyHtoDAsync", e))?
                    }
                }
                if host_sync || foreign {
                    cudarc::driver::result::stream::synchronize(state.stream)
                        .map_err(|e| GemmError::driver("cuStreamSynchronize", e))?;
                }
            }
            Ok(())
        })?;
        drop(resource);
        Ok(block)
    });
    result.map_err(|e| GemmError::Server {
        desc: "host copy".to_string(),
        reason: format!("device channel: {e:?}"),
    })?
}
