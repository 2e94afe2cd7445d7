//! Per-stream CUDA state: CubeCL's `CUstream`, cuBLAS handles, workspace, algorithm cache.
//!
//! Everything here runs inside a closure that CubeCL's device handle executes with exclusive
//! access to the `CudaServer` (see [`crate::gemm`]), right after a `get_resource` call has made
//! CubeCL's (primary) context current and aligned the caller's stream with the operands' streams.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr;
use std::sync::Mutex;

use cubecl::Runtime;
use cubecl::cuda::CudaRuntime;
use cubecl::stream_id::StreamId;
use cudarc::cublas::sys as blas;
use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys as drv;

use crate::error::GemmError;
use crate::stream_debug;

/// CubeCL 0.10's CUDA server (`cubecl_cuda::compute::CudaServer`, reachable only through the
/// runtime's associated type).
pub(crate) type CudaServer = <CudaRuntime as Runtime>::Server;

/// cuBLASLt's recommended workspace on Hopper (32 MiB; 4 MiB suffices before sm_90).
const WORKSPACE_BYTES: usize = 32 << 20;

/// The cuBLASLt workspace: [`WORKSPACE_BYTES`], or `FASTLORA_CUBLASLT_WORKSPACE_MIB` MiB. An
/// experiment's knob: the heuristic only offers algorithms whose workspace fits, and on the
/// H100 ≈ 450 of a 1B step's GEMMs (and cuDNN's attention) are preceded by a 4-byte memset of
/// the library's own, which costs ≈ 6 µs of device time each (BENCHMARKS.md, session 17).
fn workspace_bytes() -> usize {
    std::env::var("FASTLORA_CUBLASLT_WORKSPACE_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(WORKSPACE_BYTES, |mib| mib << 20)
}

/// How GEMMs on a device are ordered with CubeCL's kernels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOrdering {
    /// cuBLAS runs on CubeCL's own `CUstream` for the calling thread: stream order alone orders
    /// it after the kernels that wrote its inputs and before those that read its output; no
    /// host synchronisation.
    CubeclStream,
    /// CubeCL's stream could not be identified (the reason is given); each GEMM waits on the host
    /// for CubeCL's stream, runs on a private stream and waits for that stream before returning.
    /// Correct, but serialises the host with the GPU.
    HostSync {
        /// Why the CubeCL stream was not used.
        reason: String,
    },
}

/// Key of the cuBLASLt algorithm cache: everything the heuristic depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AlgoKey {
    pub plan: crate::layout::Plan,
    pub dtype: u32,
    pub compute: u32,
    /// Pointer alignments (bytes, power of two, at most 256) of A', B', C', D'.
    pub align: [u32; 4],
}

/// A cached cuBLASLt algorithm with the workspace it needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedAlgo {
    pub algo: lt::cublasLtMatmulAlgo_t,
    pub workspace: usize,
}

/// The CUDA objects for one stream. Handles and the workspace live for the whole process (CubeCL
/// never destroys its streams either).
pub(crate) struct StreamState {
    /// The stream GEMMs are enqueued on.
    pub stream: drv::CUstream,
    /// Whether `stream` is CubeCL's own stream or a private one needing host synchronisation.
    pub ordering: StreamOrdering,
    /// cuBLASLt handle.
    pub lt: lt::cublasLtHandle_t,
    /// cuBLAS handle, created on first use of [`crate::Engine::Legacy`].
    pub blas: Option<blas::cublasHandle_t>,
    /// Device workspace shared by cuBLASLt and cuBLAS (stream-ordered, so never concurrently).
    pub workspace: drv::CUdeviceptr,
    pub workspace_size: usize,
    pub algos: HashMap<AlgoKey, CachedAlgo>,
    /// cuDNN handle bound to `stream`, created on the first fused attention.
    pub cudnn: Option<crate::cudnn::Handle>,
    /// The stream host offload copies run on beside `stream`, created on the first one.
    copy: Option<drv::CUstream>,
}

// SAFETY: the raw pointers are CUDA handles (stream, cuBLAS handles, device memory) that CUDA
// allows any thread to use; all access goes through the `REGISTRY` mutex, so one thread at a time.
unsafe impl Send for StreamState {}

impl StreamState {
    fn new(stream: drv::CUstream, ordering: StreamOrdering) -> Result<Self, GemmError> {
        let lt = cudarc::cublaslt::result::create_handle()
            .map_err(|e| GemmError::cublas("cublasLtCreate", e.0, String::new()))?;
        let bytes = workspace_bytes();
        let (workspace, workspace_size) = match bytes {
            0 => (0, 0),
            // SAFETY: plain allocation in the current (CubeCL's primary) context; the pointer is
            // kept for the process lifetime and only handed to cuBLAS as workspace.
            _ => match unsafe { cudarc::driver::result::malloc_sync(bytes) } {
                Ok(ptr) => (ptr, bytes),
                Err(_) => (0, 0),
            },
        };
        Ok(Self {
            stream,
            ordering,
            lt,
            blas: None,
            workspace,
            workspace_size,
            algos: HashMap::new(),
            cudnn: None,
            copy: None,
        })
    }

    /// The copy stream paired with this stream (non-blocking, created on first use, kept for the
    /// process like CubeCL's own streams). Must run with CubeCL's context current.
    pub fn copy_stream(&mut self) -> Result<drv::CUstream, GemmError> {
        if let Some(stream) = self.copy {
            return Ok(stream);
        }
        let stream = cudarc::driver::result::stream::create(
            cudarc::driver::result::stream::StreamKind::NonBlocking,
        )
        .map_err(|e| GemmError::driver("cuStreamCreate", e))?;
        self.copy = Some(stream);
        Ok(stream)
    }

    /// The cuBLAS (legacy API) handle bound to this stream and workspace.
    pub fn blas_handle(&mut self) -> Result<blas::cublasHandle_t, GemmError> {
        if let Some(handle) = self.blas {
            return Ok(handle);
        }
        let handle = cudarc::cublas::result::create_handle()
            .map_err(|e| GemmError::cublas("cublasCreate", e.0, String::new()))?;
        // SAFETY: `handle` was just created; the stream and workspace outlive it (process
        // lifetime); cuBLAS only records them.
        unsafe {
            blas::cublasSetStream_v2(handle, self.stream as blas::cudaStream_t)
                .result()
                .map_err(|e| GemmError::cublas("cublasSetStream", e.0, String::new()))?;
            if self.workspace_size > 0 {
                blas::cublasSetWorkspace_v2(
                    handle,
                    self.workspace as *mut c_void,
                    self.workspace_size,
                )
                .result()
                .map_err(|e| GemmError::cublas("cublasSetWorkspace", e.0, String::new()))?;
            }
        }
        self.blas = Some(handle);
        Ok(handle)
    }
}

/// Per-device registry of stream states, keyed by CubeCL stream-pool slot.
#[derive(Default)]
struct DeviceState {
    /// Regular slots of CubeCL's stream pool (`max_streams`), once known.
    max_streams: Option<usize>,
    streams: HashMap<usize, StreamState>,
    /// Set once discovery failed; then every GEMM on the device uses `fallback`.
    fallback: Option<StreamState>,
    /// The ordering of the most recent GEMM, for [`stream_ordering`].
    last: Option<StreamOrdering>,
}

static REGISTRY: Mutex<Option<HashMap<usize, DeviceState>>> = Mutex::new(None);

/// How the most recent GEMM on CUDA device `device_index` was ordered with CubeCL.
pub(crate) fn stream_ordering(device_index: usize) -> Option<StreamOrdering> {
    let guard = REGISTRY.lock().ok()?;
    guard.as_ref()?.get(&device_index)?.last.clone()
}

/// Checks with the driver that `ptr` is a live, non-blocking stream of the current context.
fn validate_stream(ptr: u64) -> Result<drv::CUstream, String> {
    let stream = ptr as drv::CUstream;
    let current = cudarc::driver::result::ctx::get_current()
        .map_err(|e| format!("cuCtxGetCurrent: {e:?}"))?
        .ok_or("no current CUDA context")?;
    let mut ctx: drv::CUcontext = ptr::null_mut();
    let mut flags: std::ffi::c_uint = 0;
    // SAFETY: `stream` comes from the pointer CubeCL's server printed for one of its live
    // streams (streams are never destroyed); the driver validates the handle and returns an error
    // code rather than faulting for a stale handle. Out-pointers are valid locals.
    unsafe {
        drv::cuStreamGetCtx(stream, &mut ctx)
            .result()
            .map_err(|e| format!("cuStreamGetCtx({ptr:#x}): {e:?}"))?;
        drv::cuStreamGetFlags(stream, &mut flags)
            .result()
            .map_err(|e| format!("cuStreamGetFlags({ptr:#x}): {e:?}"))?;
    }
    if ctx != current {
        return Err(format!("stream {ptr:#x} belongs to another context"));
    }
    if flags & drv::CUstream_flags::CU_STREAM_NON_BLOCKING as std::ffi::c_uint == 0 {
        return Err(format!(
            "stream {ptr:#x} is not CubeCL's non-blocking stream"
        ));
    }
    Ok(stream)
}

/// Runs `f` with the state of CubeCL's stream for `stream_id` on `device_index`, discovering and
/// caching it on first use, or with the host-synchronised fallback if discovery fails.
///
/// Must be called inside the server closure, after a `get_resource` on `stream_id` (which
/// creates CubeCL's stream for the id and makes CubeCL's context current).
pub(crate) fn with_stream<R>(
    server: &mut CudaServer,
    device_index: usize,
    stream_id: StreamId,
    f: impl FnOnce(&mut StreamState, &mut CudaServer) -> Result<R, GemmError>,
) -> Result<R, GemmError> {
    let stream_id_value = stream_id.value;
    let mut guard = REGISTRY.lock().map_err(|_| GemmError::Poisoned)?;
    let device = guard
        .get_or_insert_with(HashMap::new)
        .entry(device_index)
        .or_default();

    if device.fallback.is_none() {
        let known = device
            .max_streams
            .map(|max| (stream_id_value % max as u64) as usize)
            .filter(|slot| device.streams.contains_key(slot));
        let slot = match known {
            Some(slot) => Ok(slot),
            None => discover(server, stream_id_value).and_then(|(ptr, slot, max)| {
                let stream = validate_stream(ptr)?;
                device.max_streams = Some(max);
                let state = StreamState::new(stream, StreamOrdering::CubeclStream)
                    .map_err(|e| e.to_string())?;
                device.streams.insert(slot, state);
                Ok(slot)
            }),
        };
        match slot {
            Ok(slot) => {
                let state = device.streams.get_mut(&slot).ok_or(GemmError::Poisoned)?;
                device.last = Some(StreamOrdering::CubeclStream);
                return f(state, server);
            }
            Err(reason) => {
                let stream = cudarc::driver::result::stream::create(
                    cudarc::driver::result::stream::StreamKind::NonBlocking,
                )
                .map_err(|e| GemmError::driver("cuStreamCreate", e))?;
                device.fallback = Some(StreamState::new(
                    stream,
                    StreamOrdering::HostSync { reason },
                )?);
            }
        }
    }
    let state = device.fallback.as_mut().ok_or(GemmError::Poisoned)?;
    device.last = Some(state.ordering.clone());
    f(state, server)
}

fn discover(server: &CudaServer, stream_id_value: u64) -> Result<(u64, usize, usize), String> {
    let text = format!("{server:?}");
    stream_debug::find_stream(&text, stream_id_value).map_err(|e| e.to_string())
}
