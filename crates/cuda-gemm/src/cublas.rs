//! The cuBLASLt and cuBLAS calls for a planned GEMM.

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublas::sys as blas;
use cudarc::cublaslt::result as lt_result;
use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys as drv;

use crate::error::GemmError;
use crate::layout::{CublasMatrix, Plan};
use crate::stream::{AlgoKey, CachedAlgo, StreamState};

/// Element types the provider handles (all with f32 accumulation and f32 α/β).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Dt {
    F32,
    F16,
    BF16,
}

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::F16 | Dt::BF16 => 2,
        }
    }

    fn lt(self) -> lt::cudaDataType {
        match self {
            Dt::F32 => lt::cudaDataType::CUDA_R_32F,
            Dt::F16 => lt::cudaDataType::CUDA_R_16F,
            Dt::BF16 => lt::cudaDataType::CUDA_R_16BF,
        }
    }

    fn blas(self) -> blas::cudaDataType {
        match self {
            Dt::F32 => blas::cudaDataType::CUDA_R_32F,
            Dt::F16 => blas::cudaDataType::CUDA_R_16F,
            Dt::BF16 => blas::cudaDataType::CUDA_R_16BF,
        }
    }
}

/// Device pointers of one GEMM, in the caller's (row-major) naming.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ptrs {
    pub a: u64,
    pub b: u64,
    pub c: Option<u64>,
    pub d: u64,
}

/// Scalars and flags of one GEMM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'a> {
    pub plan: &'a Plan,
    pub dt: Dt,
    pub alpha: f32,
    pub beta: f32,
    pub tf32: bool,
    pub desc: &'a str,
}

/// Largest power of two (at most 256) dividing a device address: the alignment cuBLASLt's
/// heuristic must assume (its default assumption is 256 bytes).
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

struct Desc(lt::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_desc` and destroyed exactly once, here.
        let _ = unsafe { lt_result::destroy_matmul_desc(self.0) };
    }
}

struct Layout(lt::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout` and destroyed exactly once, here.
        let _ = unsafe { lt_result::destroy_matrix_layout(self.0) };
    }
}

struct Pref(lt::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref` and destroyed exactly once, here.
        let _ = unsafe { lt_result::destroy_matmul_pref(self.0) };
    }
}

/// A cuBLASLt layout for a column-major `[rows, cols]` matrix with `ld`, batched if `batch > 1`.
fn layout(
    dt: Dt,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
    stride: usize,
    desc: &str,
) -> Result<Layout, GemmError> {
    let err = |call, e: lt_result::CublasError| GemmError::cublas(call, e.0, desc.to_string());
    let handle = lt_result::create_matrix_layout(dt.lt(), rows as u64, cols as u64, ld as i64)
        .map_err(|e| err("cublasLtMatrixLayoutCreate", e))?;
    let layout = Layout(handle);
    if batch > 1 {
        let count = i32::try_from(batch).map_err(|_| GemmError::TooLarge {
            desc: desc.to_string(),
            what: "batch",
            value: batch,
            limit: i32::MAX as usize,
        })?;
        let stride = stride as i64;
        // SAFETY: `layout.0` is live; the attribute types (int32 count, int64 offset) match
        // cuBLASLt's documented types and the pointers are to live locals of those sizes.
        unsafe {
            lt_result::set_matrix_layout_attribute(
                layout.0,
                lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const i32).cast(),
                size_of::<i32>(),
            )
            .map_err(|e| err("cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)", e))?;
            lt_result::set_matrix_layout_attribute(
                layout.0,
                lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                (&stride as *const i64).cast(),
                size_of::<i64>(),
            )
            .map_err(|e| err("cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)", e))?;
        }
    }
    Ok(layout)
}

fn operand_layout(dt: Dt, m: &CublasMatrix, batch: usize, desc: &str) -> Result<Layout, GemmError> {
    layout(dt, m.rows, m.cols, m.ld, batch, m.batch_stride, desc)
}

fn lt_op(trans: bool) -> i32 {
    if trans {
        blas::cublasOperation_t::CUBLAS_OP_T as i32
    } else {
        blas::cublasOperation_t::CUBLAS_OP_N as i32
    }
}

/// What [`lt_matmul`] did.
pub(crate) enum LtOutcome {
    /// The GEMM is enqueued.
    Done,
    /// cuBLASLt's heuristic offered no algorithm for this problem; nothing was enqueued.
    NoAlgorithm,
}

/// Enqueues `D = α·op(A)·op(B) + β·C` through `cublasLtMatmul` on `state.stream`.
pub(crate) fn lt_matmul(
    state: &mut StreamState,
    call: &Call<'_>,
    p: &Ptrs,
) -> Result<LtOutcome, GemmError> {
    let plan = call.plan;
    let desc = call.desc;
    let err = |name, e: lt_result::CublasError| GemmError::cublas(name, e.0, desc.to_string());
    let compute = if call.dt == Dt::F32 && call.tf32 {
        lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        lt::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let matmul = Desc(
        lt_result::create_matmul_desc(compute, lt::cudaDataType::CUDA_R_32F)
            .map_err(|e| err("cublasLtMatmulDescCreate", e))?,
    );
    let (trans_a, trans_b) = (lt_op(plan.a.trans), lt_op(plan.b.trans));
    // SAFETY: `matmul.0` is live; TRANSA/TRANSB are int32 (`cublasOperation_t`) attributes and
    // the pointers are to live i32 locals.
    unsafe {
        lt_result::set_matmul_desc_attribute(
            matmul.0,
            lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            (&trans_a as *const i32).cast(),
            size_of::<i32>(),
        )
        .map_err(|e| err("cublasLtMatmulDescSetAttribute(TRANSA)", e))?;
        lt_result::set_matmul_desc_attribute(
            matmul.0,
            lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            (&trans_b as *const i32).cast(),
            size_of::<i32>(),
        )
        .map_err(|e| err("cublasLtMatmulDescSetAttribute(TRANSB)", e))?;
    }

    let a_layout = operand_layout(call.dt, &plan.a, plan.batch, desc)?;
    let b_layout = operand_layout(call.dt, &plan.b, plan.batch, desc)?;
    let d_layout = layout(
        call.dt,
        plan.m,
        plan.n,
        plan.d_ld,
        plan.batch,
        plan.d_batch_stride,
        desc,
    )?;
    let c_layout = match p.c {
        Some(_) => Some(layout(
            call.dt,
            plan.m,
            plan.n,
            plan.c_ld,
            plan.batch,
            plan.c_batch_stride,
            desc,
        )?),
        None => None,
    };
    // Without C (β = 0) cuBLASLt reads nothing from C; D's pointer and layout stand in.
    let c_ptr = p.c.unwrap_or(p.d);
    let c_layout_handle = c_layout.as_ref().map_or(d_layout.0, |l| l.0);

    // cuBLAS's A is our B and cuBLAS's B is our A (row-major ↔ column-major, see `layout`).
    let key = AlgoKey {
        plan: *plan,
        dtype: call.dt.lt() as u32,
        compute: compute as u32,
        align: [
            alignment(p.b),
            alignment(p.a),
            alignment(c_ptr),
            alignment(p.d),
        ],
    };
    let cached = match state.algos.get(&key) {
        Some(found) => *found,
        None => {
            let pref = Pref(
                lt_result::create_matmul_pref()
                    .map_err(|e| err("cublasLtMatmulPreferenceCreate", e))?,
            );
            let max_ws = state.workspace_size as u64;
            // SAFETY: `pref.0` is live; MAX_WORKSPACE_BYTES is uint64 and the MIN_ALIGNMENT_*
            // attributes are uint32, matching the live locals pointed to.
            unsafe {
                lt_result::set_matmul_pref_attribute(
                    pref.0,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&max_ws as *const u64).cast(),
                    size_of::<u64>(),
                )
                .map_err(|e| err("cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)", e))?;
                let attrs = [
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ];
                for (attr, align) in attrs.into_iter().zip(key.align) {
                    lt_result::set_matmul_pref_attribute(
                        pref.0,
                        attr,
                        (&align as *const u32).cast(),
                        size_of::<u32>(),
                    )
                    .map_err(|e| err("cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)", e))?;
                }
            }
            // SAFETY: every descriptor passed is live for the call.
            let heuristic = unsafe {
                lt_result::get_matmul_algo_heuristic(
                    state.lt,
                    matmul.0,
                    a_layout.0,
                    b_layout.0,
                    c_layout_handle,
                    d_layout.0,
                    pref.0,
                )
            };
            match heuristic {
                Ok(result) => {
                    let found = CachedAlgo {
                        algo: result.algo,
                        workspace: result.workspaceSize,
                    };
                    state.algos.insert(key, found);
                    found
                }
                Err(lt_result::CublasError(lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                    return Ok(LtOutcome::NoAlgorithm);
                }
                Err(e) => return Err(err("cublasLtMatmulAlgoGetHeuristic", e)),
            }
        }
    };

    let (alpha, beta) = (call.alpha, if p.c.is_some() { call.beta } else { 0.0 });
    // SAFETY: the device pointers come from CubeCL resources that the caller keeps alive until
    // this call has been enqueued (and CubeCL's stream order keeps the memory from being reused
    // before the GEMM runs); their extents were checked against the layouts. α/β are host f32
    // (the default pointer mode, scale type CUDA_R_32F). The workspace is ours, sized as
    // declared, and only used on this stream.
    unsafe {
        lt_result::matmul(
            state.lt,
            matmul.0,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            p.b as *const c_void,
            a_layout.0,
            p.a as *const c_void,
            b_layout.0,
            c_ptr as *const c_void,
            c_layout_handle,
            p.d as *mut c_void,
            d_layout.0,
            &cached.algo,
            state.workspace as *mut c_void,
            cached.workspace.min(state.workspace_size),
            state.stream as lt::cudaStream_t,
        )
        .map_err(|e| err("cublasLtMatmul", e))?;
    }
    Ok(LtOutcome::Done)
}

fn blas_op(trans: bool) -> blas::cublasOperation_t {
    if trans {
        blas::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas::cublasOperation_t::CUBLAS_OP_N
    }
}

fn int(value: usize, what: &'static str, desc: &str) -> Result<i32, GemmError> {
    i32::try_from(value).map_err(|_| GemmError::TooLarge {
        desc: desc.to_string(),
        what,
        value,
        limit: i32::MAX as usize,
    })
}

/// Copies C into D (row-major `[M, N]` per batch entry, row strides `c_ld` → `d_ld`) on the
/// stream, so that the in-place cuBLAS GEMM can accumulate into D.
fn copy_c_to_d(state: &StreamState, call: &Call<'_>, c: u64, d: u64) -> Result<(), GemmError> {
    let plan = call.plan;
    let elem = call.dt.size();
    // Row-major [M, N]: cuBLAS's column-major [m, n] = [N, M], so N elements per row, M rows.
    let (width, height) = (plan.m * elem, plan.n);
    for batch in 0..plan.batch {
        let copy = drv::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: drv::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: c + (batch * plan.c_batch_stride * elem) as u64,
            srcArray: std::ptr::null_mut(),
            srcPitch: plan.c_ld * elem,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: drv::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: d + (batch * plan.d_batch_stride * elem) as u64,
            dstArray: std::ptr::null_mut(),
            dstPitch: plan.d_ld * elem,
            WidthInBytes: width,
            Height: height,
        };
        // SAFETY: both regions lie inside the C and D resources (extents checked by the caller)
        // and stay alive until the copy is enqueued; it is ordered on the GEMM's stream.
        unsafe { drv::cuMemcpy2DAsync_v2(&copy, state.stream) }
            .result()
            .map_err(|e| GemmError::driver("cuMemcpy2DAsync", e))?;
    }
    Ok(())
}

/// Enqueues the GEMM through `cublasGemmEx` / `cublasGemmStridedBatchedEx` on `state.stream`.
/// With β and C, C is first copied into D (cuBLAS's classic API accumulates in place).
pub(crate) fn legacy_gemm(
    state: &mut StreamState,
    call: &Call<'_>,
    p: &Ptrs,
) -> Result<(), GemmError> {
    let plan = call.plan;
    let desc = call.desc;
    let handle = state.blas_handle()?;
    let beta = match p.c {
        Some(c) if call.beta != 0.0 => {
            copy_c_to_d(state, call, c, p.d)?;
            call.beta
        }
        _ => 0.0,
    };
    let compute = if call.dt == Dt::F32 && call.tf32 {
        blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        blas::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let (m, n, k) = (
        int(plan.m, "m", desc)?,
        int(plan.n, "n", desc)?,
        int(plan.k, "k", desc)?,
    );
    let (lda, ldb, ldd) = (
        int(plan.a.ld, "lda", desc)?,
        int(plan.b.ld, "ldb", desc)?,
        int(plan.d_ld, "ldd", desc)?,
    );
    let batch = int(plan.batch, "batch", desc)?;
    let alpha = call.alpha;
    let dt = call.dt.blas();
    // SAFETY: as for `lt_matmul`: live, extent-checked device pointers, host f32 scalars
    // matching the f32 compute type, and a handle bound to this stream and workspace.
    let status = unsafe {
        if plan.batch == 1 {
            blas::cublasGemmEx(
                handle,
                blas_op(plan.a.trans),
                blas_op(plan.b.trans),
                m,
                n,
                k,
                (&alpha as *const f32).cast(),
                p.b as *const c_void,
                dt,
                lda,
                p.a as *const c_void,
                dt,
                ldb,
                (&beta as *const f32).cast(),
                p.d as *mut c_void,
                dt,
                ldd,
                compute,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        } else {
            blas::cublasGemmStridedBatchedEx(
                handle,
                blas_op(plan.a.trans),
                blas_op(plan.b.trans),
                m,
                n,
                k,
                (&alpha as *const f32).cast(),
                p.b as *const c_void,
                dt,
                lda,
                plan.a.batch_stride as i64,
                p.a as *const c_void,
                dt,
                ldb,
                plan.b.batch_stride as i64,
                (&beta as *const f32).cast(),
                p.d as *mut c_void,
                dt,
                ldd,
                plan.d_batch_stride as i64,
                batch,
                compute,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
    };
    status.result().map_err(|e| {
        GemmError::cublas(
            if plan.batch == 1 {
                "cublasGemmEx"
            } else {
                "cublasGemmStridedBatchedEx"
            },
            e.0,
            desc.to_string(),
        )
    })
}
