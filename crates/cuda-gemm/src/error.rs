//! Errors of the GEMM provider.

use std::fmt::Debug;

/// Why a GEMM was rejected or failed. Messages name the operation (`gemm` with its shapes,
/// transposes and dtype) and the failing call.
#[derive(Debug, thiserror::Error)]
pub enum GemmError {
    /// An operand is not a matrix or a batch of matrices.
    #[error(
        "gemm: {operand} has shape {shape:?} (rank {rank}); expected rank 2 [rows, cols] or 3 [batch, rows, cols]"
    )]
    Rank {
        /// `"A"`, `"B"` or `"C"`.
        operand: &'static str,
        /// The operand's shape.
        shape: Vec<usize>,
        /// Its rank.
        rank: usize,
    },
    /// Shapes that do not multiply (inner dimensions, batch sizes, or C's shape).
    #[error("gemm {desc}: {reason}")]
    Shape {
        /// The GEMM (shapes, transposes, dtype).
        desc: String,
        /// What does not fit.
        reason: String,
    },
    /// A dtype other than f32, f16 and bf16, or quantized tensors.
    #[error("gemm: {operand} has dtype {dtype}; supported are f32, f16 and bf16 (not quantized)")]
    DType {
        /// `"A"`, `"B"` or `"C"`.
        operand: &'static str,
        /// The offending dtype.
        dtype: String,
    },
    /// Operands of different dtypes.
    #[error("gemm: dtypes differ: {dtypes}; all operands must share one dtype")]
    DTypeMismatch {
        /// The operands' dtypes.
        dtypes: String,
    },
    /// Operands on different devices.
    #[error("gemm: operands are on different devices: {devices}")]
    Device {
        /// The operands' devices.
        devices: String,
    },
    /// `beta != 0` without a C to accumulate.
    #[error("gemm {desc}: beta = {beta} needs a C operand")]
    BetaWithoutC {
        /// The GEMM.
        desc: String,
        /// The β given.
        beta: f32,
    },
    /// A dimension beyond what the selected cuBLAS entry point accepts.
    #[error("gemm {desc}: {what} = {value} exceeds cuBLAS's limit {limit}")]
    TooLarge {
        /// The GEMM.
        desc: String,
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: usize,
        /// The limit.
        limit: usize,
    },
    /// An operand's memory is smaller than its shape and strides address.
    #[error("gemm {desc}: {operand} addresses {needed} bytes but its buffer holds {available}")]
    Buffer {
        /// The GEMM.
        desc: String,
        /// `"A"`, `"B"`, `"C"` or `"D"`.
        operand: &'static str,
        /// Bytes addressed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// CubeCL's server refused a request (e.g. a resource lookup).
    #[error("gemm {desc}: CubeCL server: {reason}")]
    Server {
        /// The GEMM.
        desc: String,
        /// The server's message.
        reason: String,
    },
    /// A cuBLAS or cuBLASLt call failed.
    #[error("gemm {desc}: {call} failed with {status}")]
    Cublas {
        /// The failing call.
        call: &'static str,
        /// The cuBLAS status.
        status: String,
        /// The GEMM (may be empty for set-up calls).
        desc: String,
    },
    /// A CUDA driver call failed.
    #[error("gemm: CUDA driver {call} failed: {status}")]
    Driver {
        /// The failing call.
        call: &'static str,
        /// The driver's status.
        status: String,
    },
    /// A cuDNN call failed (`detail`: cuDNN's own last error message, when it gave one).
    #[error("cuDNN {call} failed with {status}{detail}")]
    Cudnn {
        /// The failing call (with the descriptor or operation it was building).
        call: String,
        /// The cuDNN status.
        status: String,
        /// `": "` and cuDNN's message, or empty.
        detail: String,
    },
    /// cuDNN cannot run here: the library is not found, or no engine takes the graph.
    #[error("cuDNN unavailable: {reason}")]
    CudnnUnavailable {
        /// Why.
        reason: String,
    },
    /// A GEMM or attention enqueued earlier without waiting (its configuration had run before)
    /// failed on CubeCL's device runner; reported by the next call. The results of that earlier
    /// call are undefined.
    #[error("an earlier GPU call enqueued without waiting failed: {0}")]
    Deferred(Box<GemmError>),
    /// The provider's internal registry lock was poisoned by a panic elsewhere.
    #[error("gemm: the stream registry is poisoned (an earlier GEMM panicked)")]
    Poisoned,
}

impl GemmError {
    pub(crate) fn cublas(call: &'static str, status: impl Debug, desc: String) -> Self {
        GemmError::Cublas {
            call,
            status: format!("{status:?}"),
            desc,
        }
    }

    pub(crate) fn driver(call: &'static str, status: impl Debug) -> Self {
        GemmError::Driver {
            call,
            status: format!("{status:?}"),
        }
    }
}
