//! Copies of Burn's CUDA tensors to pinned host memory and back, overlapped with compute: the
//! host offload of gradient checkpointing (`use_gradient_checkpointing="unsloth"`).
//!
//! Burn 0.21's `into_data` / `float_from_data` round trip blocks the host on every read, and its
//! upload copies the bytes twice on the host and then from pageable memory (measured on the
//! H200: 51 ms to bring back one 32 MiB layer input). Here each direction is one
//! `cuMemcpy*Async` between the tensor's device memory and a pinned block, enqueued on a copy
//! stream of our own beside the `CUstream` CubeCL issues the caller's kernels on (found as for
//! the GEMMs, see the crate docs), ordered with it by events, so the copies run while the
//! kernels do and neither direction waits on the host:
//!
//! - [`copy_to_host`]: the copy stream waits for the kernels enqueued so far on the compute
//!   stream (those that wrote the tensor), then copies device → host. The device tensor is kept
//!   until the copy's event has completed (checked on every later copy call), then released to
//!   CubeCL's pool; the compute stream never waits for it.
//! - [`copy_to_device`]: returns the input brought back by an earlier prefetch (the compute
//!   stream waits on that copy's event, which has usually long completed), or copies it now on
//!   the copy stream with the compute stream waiting for it. Then it **prefetches** the newest
//!   input still on the host: backward visits checkpointed layers in reverse, so that is the
//!   input the next layer's backward asks for, and its copy runs during this layer's recompute
//!   and backward (double buffering: at most one layer input ahead on the device).
//!   [`prefetch_latest_offload`] starts the same prefetch from a layer that kept its input on the
//!   device (the last one).
//!
//! Every copy that touches a pinned block runs on the copy stream, so a block handed back to the
//! pool is next used by a copy ordered after the last one that used it. Blocks come from a
//! process-wide pool and are never freed (`cuMemFreeHost` synchronises the whole device): a
//! training step offloads the same layer sizes every step. When CubeCL's stream cannot be
//! identified each copy runs on the fallback stream and waits for it before returning (correct,
//! not overlapped, no prefetch); a tensor produced on another thread's stream is copied and
//! then waited for.

use std::sync::{Arc, Mutex, Weak};

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::Runtime;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::device::Device;
use cubecl::device_handle::DeviceHandle;
use cubecl::server::{Binding, ComputeServer};
use cubecl::stream_id::StreamId;
use cudarc::driver::sys as drv;

use crate::error::GemmError;
use crate::gemm::CudaTensor;
use crate::stream::{self, CudaServer, StreamOrdering, StreamState};

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

/// A CUDA event without timing, created and destroyed with CubeCL's context current (inside
/// the server closure).
struct Event(drv::CUevent);

// SAFETY: a CUDA event handle may be used from any thread; we use it only inside the server
// closure, one thread at a time.
unsafe impl Send for Event {}

impl Event {
    /// A new event recorded on `stream`: it completes when the work enqueued there so far does.
    fn record(stream: drv::CUstream) -> Result<Self, GemmError> {
        let event =
            cudarc::driver::result::event::create(drv::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| GemmError::driver("cuEventCreate", e))?;
        let event = Self(event);
        // SAFETY: both handles are live (the stream for the process, the event just created).
        unsafe { cudarc::driver::result::event::record(event.0, stream) }
            .map_err(|e| GemmError::driver("cuEventRecord", e))?;
        Ok(event)
    }

    /// Makes `stream` wait (on the device) until the event completes.
    fn make_wait(&self, stream: drv::CUstream) -> Result<(), GemmError> {
        // SAFETY: both handles are live.
        unsafe {
            cudarc::driver::result::stream::wait_event(
                stream,
                self.0,
                drv::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| GemmError::driver("cuStreamWaitEvent", e))
    }

    /// Blocks the calling thread until the work before the event has finished.
    fn wait(&self) -> Result<(), GemmError> {
        // SAFETY: the event is live.
        unsafe { cudarc::driver::result::event::synchronize(self.0) }
            .map_err(|e| GemmError::driver("cuEventSynchronize", e))
    }

    /// Whether the work before the event has finished.
    fn completed(&self) -> bool {
        // SAFETY: the event is live.
        unsafe { cudarc::driver::result::event::query(self.0) }.is_ok()
    }

    /// Frees the event; waits already enqueued on it still hold (CUDA defers the release).
    fn destroy(self) {
        // SAFETY: the event is live and not used again.
        let _ = unsafe { cudarc::driver::result::event::destroy(self.0) };
    }
}

/// Where an offloaded tensor's contents are.
enum Placement {
    /// In a pinned block (the copy into it may still run on the copy stream).
    Host(PinnedBlock),
    /// Back on the device by a prefetch; `ready` (absent when the copy was waited for) completes
    /// with that copy.
    Prefetched {
        tensor: Box<CudaTensor>,
        ready: Option<Event>,
    },
    /// Handed out by [`copy_to_device`], or lost to a failed copy.
    Taken,
}

/// One offloaded tensor: what it was and where it is.
struct Offload {
    bytes: usize,
    shape: Shape,
    dtype: DType,
    device: CudaDevice,
    placement: Mutex<Placement>,
}

/// Process-wide bookkeeping of the overlapped copies.
struct Offloads {
    /// Offloaded tensors in the order they left the device; entries that were brought back or
    /// dropped are skipped and pruned.
    on_host: Vec<Weak<Offload>>,
    /// Device tensors whose copy to the host may still run, with the event that ends it.
    draining: Vec<(Event, CudaTensor)>,
}

static OFFLOADS: Mutex<Offloads> = Mutex::new(Offloads {
    on_host: Vec::new(),
    draining: Vec::new(),
});

/// A CUDA tensor's contents in pinned host memory, made by [`copy_to_host`]. The copy may still
/// be in flight; only [`copy_to_device`] (ordered after it) reads it.
pub struct HostCopy {
    offload: Arc<Offload>,
}

impl std::fmt::Debug for HostCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCopy")
            .field("shape", &self.offload.shape)
            .field("dtype", &self.offload.dtype)
            .field("bytes", &self.offload.bytes)
            .finish_non_exhaustive()
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // The placement's lock is released before the registry's is taken (lock order:
        // placement, then registry — never the reverse).
        let placement = match self.offload.placement.lock() {
            Ok(mut placement) => std::mem::replace(&mut *placement, Placement::Taken),
            Err(_) => return,
        };
        match placement {
            Placement::Host(block) => block.give_back(),
            // The prefetch may still be writing into the tensor: keep it until its copy is done.
            Placement::Prefetched {
                tensor,
                ready: Some(ready),
            } => {
                if let Ok(mut offloads) = OFFLOADS.lock() {
                    offloads.draining.push((ready, *tensor));
                }
            }
            Placement::Prefetched { ready: None, .. } | Placement::Taken => {}
        }
    }
}

/// Which way a copy goes.
#[derive(Clone, Copy)]
enum Direction {
    ToHost,
    ToDevice,
}

/// Enqueues a copy of `tensor` into pinned host memory (on the copy stream, after the kernels
/// enqueued so far on CubeCL's stream for this thread) and releases the device tensor once that
/// copy is done (strided tensors are made row-major first, on the device).
///
/// # Errors
/// A CUDA driver failure (allocating pinned memory, events, enqueuing the copy) or CubeCL's
/// server refusing the buffer.
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
    let (block, copied) = on_device(&device, binding, bytes, move |streams, device_ptr| {
        let block = PinnedBlock::take(bytes)?;
        let copied = streams.copy(block.ptr, device_ptr, bytes, Direction::ToHost)?;
        Ok((block, copied))
    })?;
    let offload = Arc::new(Offload {
        bytes,
        shape,
        dtype: tensor.dtype,
        device,
        placement: Mutex::new(Placement::Host(block)),
    });
    let mut offloads = OFFLOADS.lock().map_err(|_| GemmError::Poisoned)?;
    if let Some(copied) = copied {
        offloads.draining.push((copied, tensor));
        offloads.on_host.retain(|entry| entry.strong_count() > 0);
        offloads.on_host.push(Arc::downgrade(&offload));
    }
    Ok(HostCopy { offload })
}

/// Returns `copy` as a device tensor (row-major, the shape and dtype of the original) on CubeCL's
/// stream for this thread — from an earlier prefetch, or copied now — and starts the prefetch
/// of the newest tensor still on the host (see the module docs).
///
/// # Errors
/// A CUDA driver failure enqueuing a copy or an event, or CubeCL's server refusing a buffer.
pub fn copy_to_device(copy: HostCopy) -> Result<CudaTensor, GemmError> {
    let offload = Arc::clone(&copy.offload);
    let placement = {
        let mut placement = offload.placement.lock().map_err(|_| GemmError::Poisoned)?;
        std::mem::replace(&mut *placement, Placement::Taken)
    };
    drop(copy);
    let tensor = match placement {
        Placement::Prefetched { tensor, ready } => {
            if let Some(ready) = ready {
                let binding = tensor.handle.clone().binding();
                on_device(
                    &offload.device,
                    binding,
                    offload.bytes,
                    move |streams, _| {
                        ready.make_wait(streams.compute())?;
                        ready.destroy();
                        Ok(())
                    },
                )?;
            }
            *tensor
        }
        Placement::Host(block) => bring_back(&offload, block, true)?.0,
        Placement::Taken => unreachable!("a HostCopy is brought back once, by value"),
    };
    prefetch_latest_offload()?;
    Ok(tensor)
}

/// Starts copying back the newest offloaded tensor still on the host, on the copy stream, so
/// that a later [`copy_to_device`] of it finds it on the device (see the module docs). Does
/// nothing when every offloaded tensor is on the device already or copies are not overlapped.
///
/// # Errors
/// As [`copy_to_device`].
pub fn prefetch_latest_offload() -> Result<(), GemmError> {
    loop {
        let newest = {
            let mut offloads = OFFLOADS.lock().map_err(|_| GemmError::Poisoned)?;
            offloads.on_host.pop()
        };
        let Some(newest) = newest else {
            return Ok(());
        };
        // Entries dropped or already brought back are discarded on the way.
        let Some(offload) = newest.upgrade() else {
            continue;
        };
        let mut placement = offload.placement.lock().map_err(|_| GemmError::Poisoned)?;
        let Placement::Host(block) = std::mem::replace(&mut *placement, Placement::Taken) else {
            continue;
        };
        let (tensor, ready) = bring_back(&offload, block, false)?;
        *placement = Placement::Prefetched {
            tensor: Box::new(tensor),
            ready,
        };
        return Ok(());
    }
}

/// Allocates a device tensor for `offload` and enqueues the copy of `block` into it on the copy
/// stream; returns the tensor and the event ending the copy, or, with `wait`, makes CubeCL's
/// stream wait for the copy and returns no event (so does a copy that was waited for on the
/// host).
fn bring_back(
    offload: &Offload,
    block: PinnedBlock,
    wait: bool,
) -> Result<(CudaTensor, Option<Event>), GemmError> {
    let client = CudaRuntime::client(&offload.device);
    let handle = client.empty(offload.bytes);
    let tensor = CubeTensor::new_contiguous(
        client,
        offload.device.clone(),
        offload.shape.clone(),
        handle,
        offload.dtype,
    );
    let binding = tensor.handle.clone().binding();
    let bytes = offload.bytes;
    let ready = on_device(
        &offload.device,
        binding,
        bytes,
        move |streams, device_ptr| {
            let ready = streams.copy(block.ptr, device_ptr, bytes, Direction::ToDevice)?;
            // The block's next user is a copy ordered after this one (module docs).
            block.give_back();
            match ready {
                Some(ready) if wait => {
                    ready.make_wait(streams.compute())?;
                    ready.destroy();
                    Ok(None)
                }
                ready => Ok(ready),
            }
        },
    )?;
    Ok((tensor, ready))
}

/// The streams a copy is ordered with, inside the server closure.
struct Streams<'a> {
    /// The caller's CubeCL stream (or the fallback stream) with its copy stream.
    state: &'a mut StreamState,
    /// The tensor was produced on another thread's stream.
    foreign: bool,
}

impl Streams<'_> {
    /// The caller's CubeCL stream (or the fallback stream).
    fn compute(&self) -> drv::CUstream {
        self.state.stream
    }

    /// Enqueues one copy of `bytes` between `host` and `device_ptr`: on the copy stream after the
    /// work enqueued so far on the compute stream, returning the event that ends it; or, when the
    /// compute stream is the host-synchronised fallback, on it and waited for (`None`).
    fn copy(
        &mut self,
        host: *mut u8,
        device_ptr: u64,
        bytes: usize,
        direction: Direction,
    ) -> Result<Option<Event>, GemmError> {
        let overlapped = matches!(self.state.ordering, StreamOrdering::CubeclStream);
        let stream = if overlapped {
            let copy_stream = self.state.copy_stream()?;
            let after = Event::record(self.compute())?;
            after.make_wait(copy_stream)?;
            after.destroy();
            copy_stream
        } else {
            self.compute()
        };
        // SAFETY: `host` holds at least `bytes` bytes and stays alive (pooled, never freed);
        // `device_ptr` is a buffer of at least `bytes` bytes that its owner keeps until the copy
        // has completed (module docs); the stream waits for the compute stream's earlier work.
        unsafe {
            let host = std::slice::from_raw_parts_mut(host, bytes);
            match direction {
                Direction::ToHost => {
                    cudarc::driver::result::memcpy_dtoh_async(host, device_ptr, stream)
                        .map_err(|e| GemmError::driver("cuMemcpyDtoHAsync", e))?
                }
                Direction::ToDevice => {
                    cudarc::driver::result::memcpy_htod_async(device_ptr, host, stream)
                        .map_err(|e| GemmError::driver("cuMemcpyHtoDAsync", e))?
                }
            }
            if !overlapped || self.foreign {
                cudarc::driver::result::stream::synchronize(stream)
                    .map_err(|e| GemmError::driver("cuStreamSynchronize", e))?;
            }
        }
        if overlapped {
            Event::record(stream).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Runs `f` inside CubeCL's device runner with the streams of the caller's CubeCL stream and the
/// device pointer of `binding` (checked to hold `bytes`), after releasing the device tensors
/// whose copies to the host have completed.
fn on_device<R: Send + 'static>(
    device: &CudaDevice,
    binding: Binding,
    bytes: usize,
    f: impl FnOnce(&mut Streams<'_>, u64) -> Result<R, GemmError> + Send + 'static,
) -> Result<R, GemmError> {
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
        let output = stream::with_stream(server, device_index, stream_id, |state, server| {
            if matches!(state.ordering, StreamOrdering::HostSync { .. }) {
                cubecl::future::block_on(server.sync(stream_id)).map_err(server_err)?;
            }
            let mut streams = Streams { state, foreign };
            f(&mut streams, device_ptr)
        });
        drop(resource);
        // Dropped outside the runner: a tensor's release goes back through CubeCL.
        let released = drained();
        output.map(|output| (output, released))
    });
    let (output, released) = result.map_err(|e| GemmError::Server {
        desc: "host copy".to_string(),
        reason: format!("device channel: {e:?}"),
    })??;
    drop(released);
    Ok(output)
}

/// Copies to the host left in flight when the host issues another: beyond these, the host
/// waits for the oldest. Each keeps its device tensor (a layer input) alive until the device has
/// run it, and the host can run a whole forward ahead of the device (issuing a layer takes less
/// time than running it): unbounded, every layer's input would stay on the device until the
/// device caught up, and the pool would allocate anew for the layers issued in between
/// (measured: +0.3 GiB reserved on the 1B step, +0.66 GiB on the 8B one, once the host ran
/// 40 ms ahead).
const COPIES_IN_FLIGHT: usize = 2;

/// Takes the device tensors whose copies to the host have completed off the draining list,
/// first waiting for the oldest copies beyond [`COPIES_IN_FLIGHT`]. Runs with CubeCL's context
/// current.
fn drained() -> Vec<CudaTensor> {
    let draining = match OFFLOADS.lock() {
        Ok(mut offloads) => std::mem::take(&mut offloads.draining),
        Err(_) => return Vec::new(),
    };
    // Waited for without the registry's lock (a dropped copy may add to the list meanwhile).
    let excess = draining.len().saturating_sub(COPIES_IN_FLIGHT);
    let mut done = Vec::new();
    let mut pending = Vec::new();
    for (index, (event, tensor)) in draining.into_iter().enumerate() {
        // A copy that cannot be waited for stays pending (checked again on the next call).
        if (index < excess && event.wait().is_ok()) || event.completed() {
            done.push((event, tensor));
        } else {
            pending.push((event, tensor));
        }
    }
    // Pending tensors must stay listed whatever happened to the lock: dropping one would hand
    // its memory back while its copy may still read it.
    let mut offloads = OFFLOADS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    pending.append(&mut offloads.draining);
    offloads.draining = pending;
    drop(offloads);
    done.into_iter()
        .map(|(event, tensor)| {
            event.destroy();
            tensor
        })
        .collect()
}
