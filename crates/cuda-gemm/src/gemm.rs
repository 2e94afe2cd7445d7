//! The public GEMM entry points on Burn's CUDA tensors.

use burn::tensor::{Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{mul_scalar, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::device::Device;
use cubecl::device_handle::DeviceHandle;
use cubecl::prelude::InputScalar;
use cubecl::server::{Binding, ComputeServer};
use cubecl::stream_id::StreamId;

use std::collections::HashSet;
use std::sync::Mutex;

use burn::tensor::DType;

use crate::cublas::{self, Call, Dt, LtOutcome, Ptrs};
use crate::deferred;
use crate::error::GemmError;
use crate::layout::{self, Accumulator, Operand};
use crate::stream::{self, CudaServer, StreamOrdering};

/// A float tensor primitive of `CubeBackend<CudaRuntime, F, I, BT>` (what Burn's CUDA backend
/// stores without fusion).
pub type CudaTensor = CubeTensor<CudaRuntime>;

/// The Burn backend these wrappers accept: plain (unfused) CubeCL on CUDA.
pub type CudaBackend<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

/// Which cuBLAS entry point runs the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Engine {
    /// `cublasLtMatmul`: separate C and D (β without a copy), heuristic algorithm cached per
    /// problem. Falls back to [`Engine::Legacy`] when the heuristic offers no algorithm.
    #[default]
    Lt,
    /// `cublasGemmEx` / `cublasGemmStridedBatchedEx` (with β, C is first copied into D).
    Legacy,
}

/// The operation `D = α·op(A)·op(B) + β·C`, with `op(X)` = `Xᵀ` when the flag is set.
///
/// Accumulation and α/β are f32 for every dtype. For f32 operands TF32 tensor cores are used
/// only when `allow_tf32` is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmOp {
    /// Use `Aᵀ` (A stored `[K, M]`).
    pub trans_a: bool,
    /// Use `Bᵀ` (B stored `[N, K]`, the `nn.Linear` weight layout).
    pub trans_b: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of C; must be 0 when no C is given.
    pub beta: f32,
    /// Let f32 GEMMs round inputs to TF32 (about 10 mantissa bits). Off by default.
    pub allow_tf32: bool,
    /// The cuBLAS entry point.
    pub engine: Engine,
}

impl Default for GemmOp {
    fn default() -> Self {
        Self {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            allow_tf32: false,
            engine: Engine::Lt,
        }
    }
}

impl GemmOp {
    /// `A·B`: α = 1, β = 0, no TF32, cuBLASLt.
    ///
    /// # Shapes
    ///
    /// `A: [M, K]`, `B: [K, N]` (see [`gemm`]).
    ///
    /// # Errors
    ///
    /// None.
    ///
    /// # Panics
    ///
    /// Never.
    pub fn nn() -> Self {
        Self::default()
    }

    /// `A·Bᵀ` (`x·wᵀ` with `w` in `nn.Linear` layout `[out, in]`): α = 1, β = 0, cuBLASLt.
    ///
    /// # Shapes
    ///
    /// `A: [M, K]`, `B: [N, K]` (see [`gemm`]).
    ///
    /// # Errors
    ///
    /// None.
    ///
    /// # Panics
    ///
    /// Never.
    pub fn nt() -> Self {
        Self {
            trans_b: true,
            ..Self::default()
        }
    }
}

fn dt_of(operand: &'static str, t: &CudaTensor) -> Result<Dt, GemmError> {
    if t.qparams.is_some() {
        return Err(GemmError::DType {
            operand,
            dtype: format!("{:?} (quantized)", t.dtype),
        });
    }
    match t.dtype {
        DType::F32 => Ok(Dt::F32),
        DType::F16 => Ok(Dt::F16),
        DType::BF16 => Ok(Dt::BF16),
        other => Err(GemmError::DType {
            operand,
            dtype: format!("{other:?}"),
        }),
    }
}

/// `(batch, rows, cols, batch_stride, row_stride, col_stride)` of a rank-2/3 tensor.
fn dims(
    operand: &'static str,
    t: &CudaTensor,
) -> Result<(usize, usize, usize, usize, usize, usize), GemmError> {
    let shape = t.meta.shape();
    let strides = t.meta.strides();
    match shape.len() {
        2 => Ok((1, shape[0], shape[1], 0, strides[0], strides[1])),
        3 => Ok((
            shape[0], shape[1], shape[2], strides[0], strides[1], strides[2],
        )),
        rank => Err(GemmError::Rank {
            operand,
            shape: shape.to_vec(),
            rank,
        }),
    }
}

/// Reads `t` as a GEMM operand, copying it to a contiguous tensor (a CubeCL kernel on the
/// caller's stream) only when cuBLAS cannot read its strides in place.
fn operand(
    name: &'static str,
    t: &CudaTensor,
    trans: bool,
) -> Result<(CudaTensor, Operand), GemmError> {
    // The operand as cuBLAS sees it, or `None` when its strides are no BLAS layout.
    let read = |t: CudaTensor| -> Result<Option<(CudaTensor, Operand)>, GemmError> {
        let (batch, rows, cols, batch_stride, rs, cs) = dims(name, &t)?;
        Ok(layout::classify(rows, cols, rs, cs).map(|storage| {
            let operand = Operand {
                batch,
                rows,
                cols,
                batch_stride,
                storage,
                trans,
            };
            (t, operand)
        }))
    };
    if let Some(found) = read(t.clone())? {
        return Ok(found);
    }
    Ok(read(into_contiguous(t.clone()))?
        .expect("a contiguous non-empty matrix is row-major with ld = cols"))
}

/// Reads C as a row-major accumulator, copying it when its rows are not unit-stride.
fn accumulator(t: &CudaTensor) -> Result<(CudaTensor, Accumulator), GemmError> {
    let (batch, rows, cols, batch_stride, rs, cs) = dims("C", t)?;
    if let Some(layout::Storage::RowMajor { ld }) = layout::classify(rows, cols, rs, cs) {
        return Ok((
            t.clone(),
            Accumulator {
                batch,
                rows,
                cols,
                ld,
                batch_stride,
            },
        ));
    }
    let copy = into_contiguous(t.clone());
    let (batch, rows, cols, batch_stride, _, _) = dims("C", &copy)?;
    Ok((
        copy,
        Accumulator {
            batch,
            rows,
            cols,
            ld: cols,
            batch_stride,
        },
    ))
}

fn describe(a: &CudaTensor, b: &CudaTensor, c: Option<&CudaTensor>, op: &GemmOp) -> String {
    let t = |flag: bool| if flag { "ᵀ" } else { "" };
    let mut s = format!(
        "[{:?} A{:?}{} · B{:?}{}",
        a.dtype,
        a.meta.shape().to_vec(),
        t(op.trans_a),
        b.meta.shape().to_vec(),
        t(op.trans_b)
    );
    if let Some(c) = c {
        s.push_str(&format!(" + {}·C{:?}", op.beta, c.meta.shape().to_vec()));
    }
    if op.alpha != 1.0 {
        s.push_str(&format!(", α {}", op.alpha));
    }
    s.push_str(&format!(", {:?}]", op.engine));
    s
}

/// `D = α·op(A)·op(B) + β·C` with cuBLASLt (or cuBLAS), into a new tensor Burn owns.
///
/// Runs on CubeCL's own CUDA stream for the calling thread, in CubeCL's context, so it is
/// ordered after every CubeCL kernel already issued and before every later one, with no host
/// synchronisation (see the crate docs; [`stream_ordering`](crate::stream_ordering) reports the
/// mode in use). Operands are read where they lie: row-major with any row pitch, or transposed
/// views (`strides [1, ld]`, e.g. from `transpose()`); other layouts are first made contiguous.
///
/// # Shapes
///
/// - `a`: `[M, K]` (`[K, M]` with `trans_a`), or `[batch, ·, ·]`.
/// - `b`: `[K, N]` (`[N, K]` with `trans_b`), or `[batch, ·, ·]`; a batch of 1 (or rank 2)
///   broadcasts over the other operand's batch.
/// - `c`: `[M, N]` or `[batch, M, N]`, the output's shape.
/// - returns `[M, N]`, or `[batch, M, N]` when any operand is rank 3; contiguous, in the
///   operands' dtype.
///
/// # Errors
///
/// [`GemmError`] for ranks other than 2/3, mismatched shapes, dtypes other than f32/f16/bf16 or
/// differing between operands, operands on different devices, `beta != 0` without `c`,
/// dimensions beyond cuBLAS's limits, and failures reported by CubeCL, cuBLAS or the driver.
///
/// # Panics
///
/// Only if CubeCL's device runner thread has died (its channel panics), as every CubeCL call
/// would.
pub fn gemm(
    a: &CudaTensor,
    b: &CudaTensor,
    c: Option<&CudaTensor>,
    op: GemmOp,
) -> Result<CudaTensor, GemmError> {
    gemm_to(a, b, c, op, None)
}

/// `D = α·op(A)·op(B)` written into `out`, a `[M, N]` matrix stored row by row with any row
/// pitch (unit column stride), e.g. a block of columns of a wider buffer: a product placed
/// beside other data without a concatenation. Ordered as [`gemm`]. Returns `out`.
///
/// # Shapes
/// As [`gemm`], rank 2 only; `out`: `[M, N]`.
///
/// # Errors
/// As [`gemm`], and [`GemmError::Shape`] when `out` is not `[M, N]` or not stored row by row.
pub fn gemm_into(
    a: &CudaTensor,
    b: &CudaTensor,
    out: &CudaTensor,
    op: GemmOp,
) -> Result<CudaTensor, GemmError> {
    gemm_to(a, b, None, GemmOp { beta: 0.0, ..op }, Some(out))
}

/// [`gemm`] into a new tensor, or into `out` (β = 0, rank 2) when given.
fn gemm_to(
    a: &CudaTensor,
    b: &CudaTensor,
    c: Option<&CudaTensor>,
    op: GemmOp,
    out: Option<&CudaTensor>,
) -> Result<CudaTensor, GemmError> {
    let dt = dt_of("A", a)?;
    let dtypes_match = dt_of("B", b)? == dt
        && c.map(|c| dt_of("C", c))
            .transpose()?
            .is_none_or(|c| c == dt);
    if !dtypes_match {
        return Err(GemmError::DTypeMismatch {
            dtypes: format!(
                "A {:?}, B {:?}, C {:?}",
                a.dtype,
                b.dtype,
                c.map(|c| c.dtype)
            ),
        });
    }
    if a.device != b.device || c.is_some_and(|c| c.device != a.device) {
        return Err(GemmError::Device {
            devices: format!(
                "A {:?}, B {:?}, C {:?}",
                a.device,
                b.device,
                c.map(|c| c.device.clone())
            ),
        });
    }
    let desc = describe(a, b, c, &op);
    if op.beta != 0.0 && c.is_none() {
        return Err(GemmError::BetaWithoutC {
            desc,
            beta: op.beta,
        });
    }

    // Shapes first (no copies yet), to reject mismatches and handle empty products.
    let (a_batch, a_rows, a_cols, ..) = dims("A", a)?;
    let (b_batch, b_rows, b_cols, ..) = dims("B", b)?;
    let (m, k) = if op.trans_a {
        (a_cols, a_rows)
    } else {
        (a_rows, a_cols)
    };
    let (k_b, n) = if op.trans_b {
        (b_cols, b_rows)
    } else {
        (b_rows, b_cols)
    };
    let batched_output = a.meta.shape().len() == 3
        || b.meta.shape().len() == 3
        || c.is_some_and(|c| c.meta.shape().len() == 3);
    let shape_err = |reason: String| GemmError::Shape {
        desc: desc.clone(),
        reason,
    };
    if k != k_b {
        return Err(shape_err(
            layout::PlanError::InnerDim {
                a: (m, k),
                b: (k_b, n),
            }
            .to_string(),
        ));
    }
    let batch = match (a_batch, b_batch) {
        (x, y) if x == y => x,
        (1, y) => y,
        (x, 1) => x,
        (x, y) => {
            return Err(shape_err(
                layout::PlanError::Batch {
                    a: x,
                    b: y,
                    c: None,
                }
                .to_string(),
            ));
        }
    };
    let out_shape: Vec<usize> = if batched_output {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    if let Some(c) = c {
        let c_shape = c.meta.shape().to_vec();
        let c_full = if c_shape.len() == 2 {
            vec![1, c_shape[0], c_shape[1]]
        } else {
            c_shape.clone()
        };
        if c_full != [batch, m, n] {
            return Err(shape_err(format!(
                "C is {c_shape:?}, the output is {out_shape:?}"
            )));
        }
    }
    if m == 0 || n == 0 || k == 0 || batch == 0 {
        return match out {
            None => Ok(empty_product(a, c, op.beta, out_shape)),
            Some(out) if m == 0 || n == 0 => Ok(out.clone()),
            Some(_) => Err(shape_err(
                "a product over an empty inner dimension into an output block".into(),
            )),
        };
    }

    let (a_t, a_op) = operand("A", a, op.trans_a)?;
    let (b_t, b_op) = operand("B", b, op.trans_b)?;
    let (c_t, c_acc) = match c {
        Some(c) => {
            let (t, acc) = accumulator(c)?;
            (Some(t), Some(acc))
        }
        None => (None, None),
    };
    let mut plan = layout::plan(&a_op, &b_op, c_acc.as_ref(), batched_output)
        .map_err(|e| shape_err(e.to_string()))?;

    let elem = dt.size();
    let (out, out_bytes) = match out {
        Some(out) => {
            let into_err = |reason: String| Err(shape_err(format!("output block: {reason}")));
            if out.dtype != a.dtype || out.device != a.device {
                return into_err(format!("{:?} on {:?}", out.dtype, out.device));
            }
            if batched_output || out.meta.shape().as_slice() != [m, n] {
                return into_err(format!("{:?} for a [{m}, {n}] product", out.meta.shape()));
            }
            let strides = out.meta.strides();
            let Some(layout::Storage::RowMajor { ld }) =
                layout::classify(m, n, strides[0], strides[1])
            else {
                return into_err(format!("strides {strides:?} are not row by row"));
            };
            plan.d_ld = ld;
            (out.clone(), ((m - 1) * ld + n) * elem)
        }
        None => {
            // Allocated through CubeCL on the caller's stream, so Burn owns it.
            let client = a.client.clone();
            let out_bytes = batch * m * n * elem;
            let out_handle = client.empty(out_bytes);
            let out = CubeTensor::new_contiguous(
                client,
                a.device.clone(),
                out_shape.into(),
                out_handle,
                a.dtype,
            );
            (out, out_bytes)
        }
    };

    let spans = [
        (
            "A",
            a_t.handle.clone().binding(),
            (a_op.span() * elem) as u64,
        ),
        (
            "B",
            b_t.handle.clone().binding(),
            (b_op.span() * elem) as u64,
        ),
        ("D", out.handle.clone().binding(), out_bytes as u64),
    ];
    let c_span = c_t.as_ref().zip(c_acc.as_ref()).map(|(t, acc)| {
        let span = if acc.batch > 1 {
            (acc.batch - 1) * acc.batch_stride
        } else {
            0
        } + (acc.rows - 1) * acc.ld
            + acc.cols;
        (t.handle.clone().binding(), (span * elem) as u64)
    });
    let call = CallOwned {
        plan,
        dt,
        alpha: op.alpha,
        beta: op.beta,
        tf32: op.allow_tf32,
        engine: op.engine,
        desc,
    };
    enqueue(&a.device, spans, c_span, call)?;
    // `a_t`, `b_t`, `c_t` (possibly fresh contiguous copies) may drop now: their memory goes back
    // to the pool of the stream the GEMM was enqueued on, so stream order protects it.
    drop((a_t, b_t, c_t));
    Ok(out)
}

/// The result of a product with an empty dimension: zeros, or `β·C` when K is 0.
fn empty_product(
    a: &CudaTensor,
    c: Option<&CudaTensor>,
    beta: f32,
    out_shape: Vec<usize>,
) -> CudaTensor {
    match c {
        Some(c) if beta != 0.0 && out_shape.iter().all(|&d| d > 0) => {
            let c = into_contiguous(c.clone());
            let c = if c.meta.shape().to_vec() == out_shape {
                c
            } else {
                // Rank-2 C for a rank-3 output of batch 1: same elements, new shape.
                CubeTensor::new_contiguous(
                    c.client.clone(),
                    c.device.clone(),
                    out_shape.into(),
                    c.handle.clone(),
                    c.dtype,
                )
            };
            let dtype = c.dtype;
            mul_scalar(c, InputScalar::new(beta, dtype))
        }
        _ => zeros_client(
            a.client.clone(),
            a.device.clone(),
            out_shape.into(),
            a.dtype,
        ),
    }
}

struct CallOwned {
    plan: layout::Plan,
    dt: Dt,
    alpha: f32,
    beta: f32,
    tf32: bool,
    engine: Engine,
    desc: String,
}

/// What decides whether a GEMM can be enqueued without waiting: the same product (shapes,
/// layouts, dtype, entry point) has run on the device before, so cuBLASLt's algorithm is cached
/// and any error specific to the problem has already been reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Configuration {
    device_index: usize,
    plan: layout::Plan,
    dt: Dt,
    tf32: bool,
    engine: Engine,
}

/// The configurations that have run once (see [`Configuration`]).
static RAN: Mutex<Option<HashSet<Configuration>>> = Mutex::new(None);

/// Runs the GEMM inside CubeCL's device runner with exclusive access to the CUDA server.
///
/// The first call of a [`Configuration`] waits for the runner and returns its error, if any;
/// later calls are handed to the runner and return at once (their failure, if any, is returned
/// by the next call: [`crate::deferred`]). Either way the runner executes the GEMM in FIFO order
/// with the calling thread's earlier CubeCL work.
fn enqueue(
    device: &CudaDevice,
    spans: [(&'static str, Binding, u64); 3],
    c_span: Option<(Binding, u64)>,
    call: CallOwned,
) -> Result<(), GemmError> {
    deferred::take()?;
    // The caller's stream: what `ComputeClient` uses for every op issued from this thread.
    let stream_id = StreamId::current();
    let device_index = device.index;
    let configuration = Configuration {
        device_index,
        plan: call.plan,
        dt: call.dt,
        tf32: call.tf32,
        engine: call.engine,
    };
    let ran_before = !deferred::always_wait()
        && RAN
            .lock()
            .map_err(|_| GemmError::Poisoned)?
            .as_ref()
            .is_some_and(|ran| ran.contains(&configuration));
    if ran_before {
        deferred::hand_over(device, move |server| {
            run_on_server(server, device_index, stream_id, spans, c_span, &call)
        });
        return Ok(());
    }
    let desc = call.desc.clone();
    DeviceHandle::<CudaServer>::new(device.to_id())
        .submit_blocking(move |server: &mut CudaServer| {
            run_on_server(server, device_index, stream_id, spans, c_span, &call)
        })
        .map_err(|e| GemmError::Server {
            desc,
            reason: format!("device channel: {e:?}"),
        })??;
    RAN.lock()
        .map_err(|_| GemmError::Poisoned)?
        .get_or_insert_with(HashSet::new)
        .insert(configuration);
    Ok(())
}

/// The GEMM itself, on the runner thread with the server: operand pointers on the caller's
/// stream, then cuBLASLt (or cuBLAS) enqueued on that stream.
fn run_on_server(
    server: &mut CudaServer,
    device_index: usize,
    stream_id: StreamId,
    spans: [(&'static str, Binding, u64); 3],
    c_span: Option<(Binding, u64)>,
    call: &CallOwned,
) -> Result<(), GemmError> {
    let server_err = |e: cubecl::server::ServerError| GemmError::Server {
        desc: call.desc.clone(),
        reason: e.to_string(),
    };
    // `get_resource` (1) makes CubeCL's context current, (2) creates the caller's stream if
    // needed and makes it wait for the streams that produced each operand, and (3) pins the
    // memory until the returned resource drops, at the end of this function, after the GEMM is
    // enqueued.
    let mut foreign = false;
    let mut resources = Vec::with_capacity(4);
    for (name, binding, needed) in spans.into_iter().chain(c_span.map(|(b, s)| ("C", b, s))) {
        foreign |= binding.stream != stream_id;
        let resource = server
            .get_resource(binding, stream_id)
            .map_err(server_err)?;
        let available = resource.resource().size;
        if needed > available {
            return Err(GemmError::Buffer {
                desc: call.desc.clone(),
                operand: name,
                needed,
                available,
            });
        }
        resources.push(resource);
    }
    let ptr = |i: usize| resources[i].resource().ptr;
    let ptrs = Ptrs {
        a: ptr(0),
        b: ptr(1),
        d: ptr(2),
        c: (resources.len() > 3).then(|| ptr(3)),
    };
    let lt_call = Call {
        plan: &call.plan,
        dt: call.dt,
        alpha: call.alpha,
        beta: call.beta,
        tf32: call.tf32,
        desc: &call.desc,
    };

    stream::with_stream(server, device_index, stream_id, |state, server| {
        let host_sync = matches!(state.ordering, StreamOrdering::HostSync { .. });
        if host_sync {
            // Fallback: wait on the host for everything CubeCL issued on this stream.
            cubecl::future::block_on(server.sync(stream_id)).map_err(server_err)?;
        }
        let done = match call.engine {
            Engine::Lt => matches!(cublas::lt_matmul(state, &lt_call, &ptrs)?, LtOutcome::Done),
            Engine::Legacy => false,
        };
        if !done {
            cublas::legacy_gemm(state, &lt_call, &ptrs)?;
        }
        if host_sync || foreign {
            // Fallback, or an operand owned by another thread's stream (which could reuse its
            // memory as soon as it is dropped, unordered with this stream): wait for the GEMM.
            // SAFETY: `state.stream` is a live stream of the current context.
            unsafe { cudarc::driver::result::stream::synchronize(state.stream) }
                .map_err(|e| GemmError::driver("cuStreamSynchronize", e))?;
        }
        Ok(())
    })?;
    drop(resources);
    Ok(())
}

/// `x·wᵀ` with `w` in `nn.Linear` layout: the LoRA/Linear forward product.
///
/// # Shapes
///
/// - `x`: `[M, K]` or `[batch, M, K]` (a contiguous batch is folded into one `[batch·M, K]` GEMM).
/// - `w`: `[N, K]`.
/// - returns `[M, N]` or `[batch, M, N]`.
///
/// # Errors
///
/// As [`gemm`].
///
/// # Panics
///
/// As [`gemm`].
pub fn matmul_nt(x: &CudaTensor, w: &CudaTensor) -> Result<CudaTensor, GemmError> {
    gemm(x, w, None, GemmOp::nt())
}

/// [`gemm`] on Burn tensors of the plain CUDA backend (`CubeBackend<CudaRuntime, F, I, BT>`).
///
/// # Shapes
///
/// As [`gemm`], with `D` = 2 or 3 for every operand.
///
/// # Errors
///
/// As [`gemm`]; also for quantized tensors.
///
/// # Panics
///
/// As [`gemm`].
pub fn gemm_tensor<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    a: Tensor<CudaBackend<F, I, BT>, D>,
    b: Tensor<CudaBackend<F, I, BT>, D>,
    c: Option<Tensor<CudaBackend<F, I, BT>, D>>,
    op: GemmOp,
) -> Result<Tensor<CudaBackend<F, I, BT>, D>, GemmError> {
    let prim = |t: Tensor<CudaBackend<F, I, BT>, D>| match t.into_primitive() {
        TensorPrimitive::Float(t) => t,
        TensorPrimitive::QFloat(t) => t,
    };
    let (a, b, c) = (prim(a), prim(b), c.map(prim));
    let out = gemm(&a, &b, c.as_ref(), op)?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// [`matmul_nt`] on Burn tensors: `x·wᵀ` for `x` of any rank ≥ 2 (leading dimensions are
/// flattened into M) and `w: [N, K]`.
///
/// # Shapes
///
/// - `x`: `[..., K]` (rank `D` ≥ 2).
/// - `w`: `[N, K]`.
/// - returns `[..., N]`.
///
/// # Errors
///
/// As [`gemm`].
///
/// # Panics
///
/// As [`gemm`].
pub fn matmul_nt_tensor<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    x: Tensor<CudaBackend<F, I, BT>, D>,
    w: Tensor<CudaBackend<F, I, BT>, 2>,
) -> Result<Tensor<CudaBackend<F, I, BT>, D>, GemmError> {
    let dims = x.dims();
    let k = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    let x2: Tensor<CudaBackend<F, I, BT>, 2> = x.reshape([rows, k]);
    let out = gemm_tensor(x2, w, None, GemmOp::nt())?;
    let n = out.dims()[1];
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    Ok(out.reshape(out_dims))
}

/// How GEMMs on `device` are ordered with CubeCL: the mode of the most recent GEMM there, `None`
/// before the first.
///
/// # Shapes
///
/// None (no tensors).
///
/// # Errors
///
/// None.
///
/// # Panics
///
/// Never.
pub fn stream_ordering(device: &CudaDevice) -> Option<StreamOrdering> {
    stream::stream_ordering(device.index)
}
