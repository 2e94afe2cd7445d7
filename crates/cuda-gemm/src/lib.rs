//! cuBLAS-class GEMM for Burn's CUDA tensors.
//!
//! Burn 0.21's own matmul reaches about 93 TFLOP/s (Fusion-wrapped `Cuda`) to 203 TFLOP/s (plain
//! `CubeBackend<CudaRuntime>`) at bf16 8192³ on an H200; cuBLAS does close to 800. This crate runs
//! cuBLASLt (`cublasLtMatmul`, or cuBLAS's `cublasGemmEx` as [`Engine::Legacy`]) directly on the
//! device memory of Burn's CUDA tensors and returns a tensor Burn owns.
//!
//! Everything is behind the `cuda` feature (off by default, so `cargo test --workspace` stays
//! CPU-only): `cargo build -p fastlora-cuda-gemm --release --features cuda`. No CUDA toolkit is
//! needed to build; the driver, cuBLAS and cuBLASLt (`libcuda.so`, `libcublas.so.13`,
//! `libcublasLt.so.13`) are loaded when the first GEMM runs.
//!
//! # API
//!
//! - [`gemm`]`(a, b, c, `[`GemmOp`]`)`: `D = α·op(A)·op(B) + β·C` on
//!   [`CudaTensor`] (= `CubeTensor<CudaRuntime>`, the float primitive of
//!   `CubeBackend<CudaRuntime, F, I, BT>`), rank 2 or 3 (batched; batch 1 broadcasts), f32, f16
//!   or bf16 with f32 accumulation, output in the input dtype. TF32 for f32 only on request
//!   ([`GemmOp::allow_tf32`]).
//! - [`matmul_nt`]`(x, w)`: `x·wᵀ` with `w: [N, K]`, the `nn.Linear` / LoRA layout.
//! - [`gemm_tensor`], [`matmul_nt_tensor`]: the same on `burn::Tensor<CubeBackend<CudaRuntime, F,
//!   I, BT>, D>` (via `into_primitive` / `from_primitive`).
//! - [`copy_to_host`], [`copy_to_device`], [`prefetch_latest_offload`]: a tensor to pinned host
//!   memory and back on a copy stream beside CubeCL's, ordered with it by events, the way back
//!   prefetched (the checkpoint offload; module `host_copy`).
//! - [`sdpa_forward`], [`sdpa_backward`]: cuDNN's fused causal flash attention (f16/bf16,
//!   grouped-query; over whole rows, or over the runs of packed rows as sequences of their own,
//!   [`SdpaRuns`]), on the same stream and with the same machinery (module `sdpa`, on a small
//!   builder over cuDNN's backend graph API, module `cudnn`; `libcudnn.so.9` is loaded at run
//!   time).
//! - [`with_persistent_allocation`]: a scope whose buffers CubeCL allocates at their exact
//!   size (a model's frozen weights).
//!
//! Row-major ↔ column-major: `D = op(A)·op(B)` is computed as the column-major `Dᵀ =
//! op(B)ᵀ·op(A)ᵀ` on the same memory, no copies. Row-pitched tensors (CubeCL's optimized layout)
//! and transposed views (`strides [1, ld]`) are read in place; only other stride patterns are
//! first made contiguous.
//!
//! # Context and stream: how the GEMM is ordered with CubeCL
//!
//! CubeCL 0.10's CUDA server (`cubecl-cuda-0.10.0/src/compute/server.rs`) owns one CUDA context,
//! the device's **primary context** (`cuDevicePrimaryCtxRetain`, `runtime.rs`), and a pool of
//! **non-blocking streams** (`stream.rs`: `cuStreamCreate(CU_STREAM_NON_BLOCKING)`), one per
//! calling thread (`StreamId::current() % max_streams`), which it keeps private. Its server lives
//! on a device-runner thread; `ComputeClient` sends it closures.
//!
//! The provider:
//!
//! 1. **Same context.** cuBLAS and cuBLASLt run on the CUDA runtime, which uses the device's
//!    primary context — the very context CubeCL retained — and CubeCL makes it current on its
//!    runner thread before each request, where the GEMM is issued.
//! 2. **Same stream, no events.** The GEMM is issued from inside the server: a closure submitted
//!    through `cubecl::device_handle::DeviceHandle::<CudaServer>`, which runs it on CubeCL's
//!    device-runner thread with exclusive access to the server, in FIFO order with the calling
//!    thread's earlier CubeCL work. The first GEMM of each configuration (shapes, layouts,
//!    dtype) waits for the runner (`submit_blocking`) and returns its errors; later ones are
//!    handed over without waiting (`submit`), so the host keeps issuing work while the runner
//!    launches what came before — a failure there is returned by the next call (module
//!    `deferred`; `FASTLORA_GPU_WAIT=1` makes every call wait). cuDNN attention does the same. There it calls `ComputeServer::get_resource` for every operand on the caller's
//!    stream id (which makes the context current, aligns that stream with the streams that
//!    produced the operands, and returns the device pointers with the memory pinned), then
//!    enqueues cuBLAS **on CubeCL's own `CUstream` for that id** (`cublasLtMatmul(.., stream)` /
//!    `cublasSetStream`). Stream order then places the GEMM after the kernels that wrote its
//!    inputs and before any kernel issued later: no host synchronisation, no events.
//! 3. **Finding that `CUstream`.** CubeCL 0.10 exposes no accessor, but `CudaServer` derives
//!    `Debug`, which prints its `StreamPool` slots with each `Stream { sys: 0x… }`. The pointer of
//!    the caller's slot is parsed once per slot (`stream_debug.rs`), checked with the driver
//!    (`cuStreamGetCtx` must return the current context, `cuStreamGetFlags` must say
//!    non-blocking) and cached. If anything in that chain fails (a future CubeCL changing its
//!    layout), the provider falls back to **host synchronisation**: wait for CubeCL's stream
//!    (`server.sync`), run on a private stream, wait for it; correct but blocking.
//!    [`stream_ordering`] reports which mode a device uses.
//! 4. **Lifetimes.** The bindings (`get_resource`'s `ManagedResource`s) are held until cuBLAS has
//!    enqueued; afterwards the memory may return to CubeCL's pool, which is safe because any reuse
//!    is issued on the same stream, after the GEMM. An operand produced on another thread's stream
//!    could be reused there, unordered with ours, so in that (rare) case the call waits for the
//!    GEMM before returning. Outputs are allocated with `client.empty(bytes)` on the caller's
//!    stream and wrapped with `CubeTensor::new_contiguous`, so Burn owns and frees them.
//!
//! # cudarc version
//!
//! cubecl-cuda 0.10 depends on `cudarc` 0.19 (`driver`, `nvrtc`, `nccl`, with dynamic loading and
//! `cuda-version-from-build-system` + `fallback-latest`). This crate uses that same crate (one
//! `cudarc` 0.19 in the graph), adding `cublas` + `cublaslt` and pinning `cuda-13000`, so both
//! see the same driver library and the same `CUstream`/`CUcontext` types: a pointer CubeCL created
//! is passed to cuBLAS as is. Pinning the CUDA 13.0 ABI (instead of the build machine's `nvcc`,
//! absent here, or the `fallback-latest` 13.4) suits every CUDA 13.x driver and
//! `libcublas.so.13`. cudarc's safe `CudaStream`/`CudaContext` wrappers cannot adopt a foreign
//! stream, so the raw `result`/`sys` layers are used.
//!
//! # Measured
//!
//! `bash stage/gpu/run-all.sh` (from `cargo xtask gpu-test`) on an H200 (driver 580.159.04,
//! `libcublasLt.so.13`): all correctness and ordering checks pass, ordering mode
//! [`StreamOrdering::CubeclStream`]; bf16, median per call:
//!
//! | product | provider (cuBLASLt) | Burn `CubeBackend` matmul (default strategy) |
//! | --- | --- | --- |
//! | 8192³ NN | 692.6 TFLOP/s (cuBLAS `gemm_ex`: 676.2) | 91.8 TFLOP/s |
//! | `x[8192,4096]·w[4096,4096]ᵀ` | 789.3 TFLOP/s | 100.9 TFLOP/s |
//! | `x[8192,4096]·w[14336,4096]ᵀ` | 797.3 TFLOP/s | 109.6 TFLOP/s |
//! | `x[8192,4096]·A[16,4096]ᵀ` (LoRA A) | 0.027 ms | 0.201 ms |
//! | `x[8192,16]·B[4096,16]ᵀ` (LoRA B) | 0.029 ms | 0.070 ms |
//! | 64³ (host cost per call) | 24.1 µs | 20.6 µs |
//!
//! # Binary
//!
//! `gemm-check` (`src/bin/gemm-check.rs`) checks correctness against Burn's matmul and a host
//! reference, checks ordering with CubeCL kernels, and benchmarks bf16 8192³;
//! `cargo xtask gpu-test` stages it in `stage/gpu/` with a run script.

// The crate is an FFI layer over cuBLAS/cuBLASLt and the CUDA driver (raw handles, device
// pointers, C attribute buffers): those calls are `unsafe` by nature. Every unsafe block states
// its invariants in a `// SAFETY:` comment.
#![allow(unsafe_code)]

#[cfg(feature = "cuda")]
mod cublas;
#[cfg(feature = "cuda")]
mod cudnn;
#[cfg(feature = "cuda")]
mod deferred;
#[cfg(feature = "cuda")]
mod error;
#[cfg(feature = "cuda")]
mod gemm;
#[cfg(feature = "cuda")]
mod host_copy;
// Pure shape/stride and text logic, unit-tested on the CPU without the `cuda` feature.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod layout;
#[cfg(feature = "cuda")]
mod persistent;
#[cfg(feature = "cuda")]
mod sdpa;
#[cfg(feature = "cuda")]
mod stream;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod stream_debug;

#[cfg(feature = "cuda")]
pub use error::GemmError;
#[cfg(feature = "cuda")]
pub use gemm::{
    CudaBackend, CudaTensor, Engine, GemmOp, gemm, gemm_into, gemm_tensor, matmul_nt,
    matmul_nt_tensor, stream_ordering,
};
#[cfg(feature = "cuda")]
pub use host_copy::{HostCopy, copy_to_device, copy_to_host, prefetch_latest_offload};
#[cfg(feature = "cuda")]
pub use persistent::with_persistent_allocation;
#[cfg(feature = "cuda")]
pub use sdpa::{SdpaRuns, SdpaSaved, cudnn_version, sdpa_backward, sdpa_calls, sdpa_forward};
#[cfg(feature = "cuda")]
pub use stream::StreamOrdering;
