//! A small builder over cuDNN 9's backend (graph) API: tensors, pointwise / matmul / reduction
//! operations, an operation graph, the engine the heuristics choose, and its execution.
//!
//! cuDNN's fused attention has no single entry point in the backend API: a caller describes the
//! attention as a graph of matmuls, pointwise ops and reductions, and cuDNN's runtime-fusion
//! engines recognise the pattern and run one flash-attention kernel for it (this is what the C++
//! `cudnn-frontend` does for its SDPA node). [`crate::sdpa`] builds those graphs with this module.
//!
//! Every descriptor is owned by a [`Descriptor`] (destroyed on drop); a finalized [`Plan`] keeps
//! the descriptors it was built from, its tensors' UIDs, and the host values of by-value scalars,
//! so that [`Plan::execute`] only binds device pointers.

use std::ffi::{CStr, c_void};
use std::ptr;

use cudarc::cudnn::sys;
use sys::cudnnBackendAttributeName_t as Attr;
use sys::cudnnBackendAttributeType_t as Ty;
use sys::cudnnBackendDescriptorType_t as Kind;

use crate::error::GemmError;

pub(crate) use sys::cudnnDataType_t as DataType;
pub(crate) use sys::cudnnPointwiseMode_t as PointwiseMode;
pub(crate) use sys::cudnnReduceTensorOp_t as ReduceOp;

/// The failure of `call`, with cuDNN's own last error message.
fn cudnn_error(call: String, status: sys::cudnnStatus_t) -> GemmError {
    let mut message = [0 as std::ffi::c_char; 1024];
    // SAFETY: cuDNN writes at most `max_size` bytes, NUL-terminated, into the buffer.
    unsafe { sys::cudnnGetLastErrorString(message.as_mut_ptr(), message.len()) };
    // SAFETY: the buffer is NUL-terminated (zeroed, and cuDNN terminates what it writes).
    let text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy();
    GemmError::Cudnn {
        call,
        status: format!("{status:?}"),
        detail: if text.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", text.trim())
        },
    }
}

fn check(status: sys::cudnnStatus_t, call: impl FnOnce() -> String) -> Result<(), GemmError> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(cudnn_error(call(), status))
    }
}

/// Whether `libcudnn.so.9` (or another name cudarc looks for) can be loaded, and its version.
pub(crate) fn library_version() -> Result<usize, GemmError> {
    // SAFETY: only tries to open the library; no cuDNN function runs before it is found.
    if !unsafe { sys::is_culib_present() } {
        return Err(GemmError::CudnnUnavailable {
            reason: "libcudnn.so.9 not found (add its directory, e.g. the nvidia-cudnn wheel's \
                     lib/, to LD_LIBRARY_PATH)"
                .to_string(),
        });
    }
    // SAFETY: the library is present; cudnnGetVersion has no preconditions.
    Ok(unsafe { sys::cudnnGetVersion() })
}

/// A cuDNN handle bound to one stream; created in the current (CubeCL's) context.
pub(crate) struct Handle(pub(crate) sys::cudnnHandle_t);

impl Handle {
    pub(crate) fn new(stream: cudarc::driver::sys::CUstream) -> Result<Self, GemmError> {
        library_version()?;
        let mut handle = ptr::null_mut();
        // SAFETY: out-pointer to a local; the stream is a live stream of the current context,
        // which outlives the handle (CubeCL never destroys its streams).
        unsafe {
            check(sys::cudnnCreate(&mut handle), || "cudnnCreate".into())?;
            check(
                sys::cudnnSetStream(handle, stream as sys::cudaStream_t),
                || "cudnnSetStream".into(),
            )?;
        }
        Ok(Self(handle))
    }
}

/// A backend descriptor, destroyed on drop.
pub(crate) struct Descriptor {
    raw: sys::cudnnBackendDescriptor_t,
    kind: Kind,
}

// SAFETY: a descriptor is an opaque host object; cuDNN allows using it from any thread as long
// as calls on it do not race, which the owners (`Plan` behind a mutex) guarantee.
unsafe impl Send for Descriptor {}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by cudnnBackendCreateDescriptor and is destroyed once.
        unsafe { sys::cudnnBackendDestroyDescriptor(self.raw) };
    }
}

impl Descriptor {
    pub(crate) fn new(kind: Kind) -> Result<Self, GemmError> {
        let mut raw = ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check(
            unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut raw) },
            || format!("cudnnBackendCreateDescriptor({kind:?})"),
        )?;
        Ok(Self { raw, kind })
    }

    /// Sets attribute `name` to `values`, whose element type cuDNN reads as `ty`.
    ///
    /// `T` must be the C type of `ty` (i64 for INT64, f32 for FLOAT, bool for BOOLEAN, the enum
    /// for DATA_TYPE / POINTWISE_MODE / …, a descriptor pointer for BACKEND_DESCRIPTOR).
    fn set_raw<T>(&mut self, name: Attr, ty: Ty, values: &[T]) -> Result<&mut Self, GemmError> {
        // SAFETY: `values` holds `values.len()` elements of the C type `ty` names (the typed
        // setters below pair them); cuDNN copies them before returning.
        let status = unsafe {
            sys::cudnnBackendSetAttribute(
                self.raw,
                name,
                ty,
                values.len() as i64,
                values.as_ptr().cast::<c_void>(),
            )
        };
        let kind = self.kind;
        check(status, || format!("set {name:?} on {kind:?}"))?;
        Ok(self)
    }

    pub(crate) fn set_i64s(&mut self, name: Attr, values: &[i64]) -> Result<&mut Self, GemmError> {
        self.set_raw(name, Ty::CUDNN_TYPE_INT64, values)
    }

    pub(crate) fn set_bool(&mut self, name: Attr, value: bool) -> Result<&mut Self, GemmError> {
        self.set_raw(name, Ty::CUDNN_TYPE_BOOLEAN, &[value])
    }

    pub(crate) fn set_f32(&mut self, name: Attr, value: f32) -> Result<&mut Self, GemmError> {
        self.set_raw(name, Ty::CUDNN_TYPE_FLOAT, &[value])
    }

    pub(crate) fn set_data_type(
        &mut self,
        name: Attr,
        value: DataType,
    ) -> Result<&mut Self, GemmError> {
        self.set_raw(name, Ty::CUDNN_TYPE_DATA_TYPE, &[value])
    }

    pub(crate) fn set_descriptors(
        &mut self,
        name: Attr,
        values: &[&Descriptor],
    ) -> Result<&mut Self, GemmError> {
        let raws: Vec<sys::cudnnBackendDescriptor_t> = values.iter().map(|d| d.raw).collect();
        self.set_raw(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raws)
    }

    pub(crate) fn set_handle(
        &mut self,
        name: Attr,
        handle: &Handle,
    ) -> Result<&mut Self, GemmError> {
        self.set_raw(name, Ty::CUDNN_TYPE_HANDLE, &[handle.0])
    }

    pub(crate) fn set_typed<T: Copy>(
        &mut self,
        name: Attr,
        ty: Ty,
        value: T,
    ) -> Result<&mut Self, GemmError> {
        self.set_raw(name, ty, &[value])
    }

    pub(crate) fn finalize(&mut self) -> Result<&mut Self, GemmError> {
        let kind = self.kind;
        // SAFETY: a live descriptor.
        check(unsafe { sys::cudnnBackendFinalize(self.raw) }, || {
            format!("cudnnBackendFinalize({kind:?})")
        })?;
        Ok(self)
    }

    fn get_i64(&self, name: Attr) -> Result<i64, GemmError> {
        let mut value = 0i64;
        let mut count = 0i64;
        // SAFETY: room for one INT64; out-pointers to locals.
        let status = unsafe {
            sys::cudnnBackendGetAttribute(
                self.raw,
                name,
                Ty::CUDNN_TYPE_INT64,
                1,
                &mut count,
                (&mut value as *mut i64).cast(),
            )
        };
        check(status, || format!("get {name:?}"))?;
        Ok(value)
    }
}

/// Where a tensor of the graph lives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Storage {
    /// Device memory bound at execution.
    Device,
    /// An intermediate inside the fused kernel; never in memory.
    Virtual,
    /// A host scalar passed by value (the bytes of an f32).
    ScalarF32(f32),
}

/// A tensor of the graph (its descriptor's place in the builder).
pub(crate) struct TensorRef {
    index: usize,
}

/// An operation graph under construction.
pub(crate) struct GraphBuilder {
    version: usize,
    tensors: Vec<Descriptor>,
    ops: Vec<Descriptor>,
    /// Sub-descriptors (pointwise/matmul/reduction descriptors) the ops point to.
    parts: Vec<Descriptor>,
    scalars: Vec<(i64, Box<[u8; 8]>)>,
    next_virtual_uid: i64,
}

/// Contiguous row-major strides of `dims`.
pub(crate) fn packed_strides(dims: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

impl GraphBuilder {
    /// Virtual tensors get UIDs from `first_virtual_uid` up (keep real UIDs below it);
    /// `version` is the loaded cuDNN's (`cudnnGetVersion`).
    pub(crate) fn new(first_virtual_uid: i64, version: usize) -> Self {
        Self {
            version,
            tensors: Vec::new(),
            ops: Vec::new(),
            parts: Vec::new(),
            scalars: Vec::new(),
            next_virtual_uid: first_virtual_uid,
        }
    }

    /// A tensor descriptor. `uid` is used for device and scalar tensors (virtual ones number
    /// themselves).
    pub(crate) fn tensor(
        &mut self,
        uid: Option<i64>,
        dims: &[i64],
        strides: &[i64],
        dtype: DataType,
        storage: Storage,
    ) -> Result<TensorRef, GemmError> {
        self.ragged_tensor(uid, dims, strides, dtype, storage, None)
    }

    /// [`Self::tensor`], with `offsets` (a `[batch + 1, 1, 1, 1]` integer tensor of this
    /// builder) giving where each batch entry starts, in elements from the tensor's base: the
    /// entries of a ragged (variable-length) batch, whose batch stride is then unused.
    pub(crate) fn ragged_tensor(
        &mut self,
        uid: Option<i64>,
        dims: &[i64],
        strides: &[i64],
        dtype: DataType,
        storage: Storage,
        offsets: Option<&TensorRef>,
    ) -> Result<TensorRef, GemmError> {
        let uid = match uid {
            Some(uid) => uid,
            None => {
                self.next_virtual_uid += 1;
                self.next_virtual_uid
            }
        };
        let mut t = Descriptor::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
        t.set_data_type(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, dtype)?
            .set_i64s(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, dims)?
            .set_i64s(Attr::CUDNN_ATTR_TENSOR_STRIDES, strides)?
            .set_i64s(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[uid])?
            .set_i64s(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[16])?;
        match storage {
            Storage::Device => {}
            Storage::Virtual => {
                t.set_bool(Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL, true)?;
            }
            Storage::ScalarF32(value) => {
                t.set_bool(Attr::CUDNN_ATTR_TENSOR_IS_BY_VALUE, true)?;
                let mut bytes = Box::new([0u8; 8]);
                bytes[..4].copy_from_slice(&value.to_ne_bytes());
                self.scalars.push((uid, bytes));
            }
        }
        if let Some(offsets) = offsets {
            // After every other attribute, as cudnn-frontend sets it.
            t.set_descriptors(
                Attr::CUDNN_ATTR_TENSOR_RAGGED_OFFSET_DESC,
                &[&self.tensors[offsets.index]],
            )?;
        }
        t.finalize()?;
        self.tensors.push(t);
        Ok(TensorRef {
            index: self.tensors.len() - 1,
        })
    }

    /// A virtual f32 tensor of `dims`, packed strides.
    pub(crate) fn virtual_f32(&mut self, dims: &[i64]) -> Result<TensorRef, GemmError> {
        self.tensor(
            None,
            dims,
            &packed_strides(dims),
            DataType::CUDNN_DATA_FLOAT,
            Storage::Virtual,
        )
    }

    /// A virtual tensor of `dims` and `dtype`, packed strides.
    pub(crate) fn virtual_of(
        &mut self,
        dims: &[i64],
        dtype: DataType,
    ) -> Result<TensorRef, GemmError> {
        self.tensor(None, dims, &packed_strides(dims), dtype, Storage::Virtual)
    }

    /// A by-value f32 scalar (dims and strides all 1, rank 4).
    pub(crate) fn scalar_f32(&mut self, uid: i64, value: f32) -> Result<TensorRef, GemmError> {
        self.tensor(
            Some(uid),
            &[1, 1, 1, 1],
            &[1, 1, 1, 1],
            DataType::CUDNN_DATA_FLOAT,
            Storage::ScalarF32(value),
        )
    }

    fn t(&self, r: &TensorRef) -> &Descriptor {
        &self.tensors[r.index]
    }

    /// `y = mode(x[, b][, t])` as cuDNN defines each mode (BINARY_SELECT: `y = t ? x : b`), with
    /// math in `math` (f32, or BOOLEAN for comparisons); `axis` for GEN_INDEX.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pointwise(
        &mut self,
        mode: PointwiseMode,
        math: DataType,
        x: &TensorRef,
        b: Option<&TensorRef>,
        t: Option<&TensorRef>,
        y: &TensorRef,
        axis: Option<i64>,
    ) -> Result<(), GemmError> {
        let mut pw = Descriptor::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
        pw.set_typed(
            Attr::CUDNN_ATTR_POINTWISE_MODE,
            Ty::CUDNN_TYPE_POINTWISE_MODE,
            mode,
        )?
        .set_data_type(Attr::CUDNN_ATTR_POINTWISE_MATH_PREC, math)?;
        if let Some(axis) = axis {
            pw.set_i64s(Attr::CUDNN_ATTR_POINTWISE_AXIS, &[axis])?;
        }
        pw.finalize()?;
        let mut op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?
            .set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[self.t(x)])?;
        if let Some(b) = b {
            op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[self.t(b)])?;
        }
        if let Some(t) = t {
            op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_TDESC, &[self.t(t)])?;
        }
        // cudnn-frontend always sets both alphas (1.0); the fusion patterns are matched on
        // graphs built that way.
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[self.t(y)])?
            .set_f32(Attr::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, 1.0)?
            .set_f32(Attr::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, 1.0)?
            .finalize()?;
        self.parts.push(pw);
        self.ops.push(op);
        Ok(())
    }

    /// `c = a·b` (batched over the leading dims, broadcast where a batch dim is 1), f32
    /// compute; with per-batch-entry sizes `[m, n, k]` where given: `[batch, 1, 1, 1]` int32
    /// tensors of this builder overriding the product's dimensions entry by entry
    /// (variable-length sequences).
    pub(crate) fn matmul(
        &mut self,
        a: &TensorRef,
        b: &TensorRef,
        c: &TensorRef,
        [m, n, k]: [Option<&TensorRef>; 3],
    ) -> Result<(), GemmError> {
        let mut mm = Descriptor::new(Kind::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
        mm.set_data_type(
            Attr::CUDNN_ATTR_MATMUL_COMP_TYPE,
            DataType::CUDNN_DATA_FLOAT,
        )?
        .finalize()?;
        let mut op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR)?;
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_ADESC, &[self.t(a)])?
            .set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_BDESC, &[self.t(b)])?
            .set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_CDESC, &[self.t(c)])?
            .set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_DESC, &[&mm])?;
        for (name, size) in [
            (Attr::CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, m),
            (Attr::CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, n),
            (Attr::CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, k),
        ] {
            if let Some(size) = size {
                op.set_descriptors(name, &[&self.tensors[size.index]])?;
            }
        }
        op.finalize()?;
        self.parts.push(mm);
        self.ops.push(op);
        Ok(())
    }

    /// `y = reduce(x)` over the dims where `y` is 1, f32 compute.
    pub(crate) fn reduction(
        &mut self,
        reduce: ReduceOp,
        x: &TensorRef,
        y: &TensorRef,
    ) -> Result<(), GemmError> {
        let mut red = Descriptor::new(Kind::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
        red.set_typed(
            Attr::CUDNN_ATTR_REDUCTION_OPERATOR,
            Ty::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE,
            reduce,
        )?
        .set_data_type(
            Attr::CUDNN_ATTR_REDUCTION_COMP_TYPE,
            DataType::CUDNN_DATA_FLOAT,
        )?;
        if self.version >= 91100 {
            red.set_bool(Attr::CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC, false)?;
        }
        red.finalize()?;
        let mut op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR)?;
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, &[self.t(x)])?
            .set_descriptors(Attr::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, &[self.t(y)])?
            .set_descriptors(Attr::CUDNN_ATTR_OPERATION_REDUCTION_DESC, &[&red])?
            .finalize()?;
        self.parts.push(red);
        self.ops.push(op);
        Ok(())
    }

    /// `y` = `x` seen with `y`'s dims, strides and dtype (a transposed view, a cast).
    pub(crate) fn reshape(&mut self, x: &TensorRef, y: &TensorRef) -> Result<(), GemmError> {
        let mut op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR)?;
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_RESHAPE_XDESC, &[self.t(x)])?
            .set_descriptors(Attr::CUDNN_ATTR_OPERATION_RESHAPE_YDESC, &[self.t(y)])?
            .finalize()?;
        self.ops.push(op);
        Ok(())
    }

    /// Finalizes the operation graph, asks the heuristics for engine configurations and keeps the
    /// first whose execution plan finalizes. `what` names the graph in errors.
    pub(crate) fn build(self, handle: &Handle, what: &str) -> Result<Plan, GemmError> {
        let mut graph = Descriptor::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        let ops: Vec<&Descriptor> = self.ops.iter().collect();
        graph
            .set_descriptors(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &ops)?
            .set_handle(Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, handle)?
            .finalize()?;

        let mut configs = Vec::new();
        let mut failures = Vec::new();
        for mode in [
            sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
            sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
        ] {
            match heuristic_configs(&graph, mode) {
                Ok(found) => configs.extend(found),
                Err(e) => failures.push(format!("{mode:?}: {e}")),
            }
        }
        for config in configs {
            let mut plan = Descriptor::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
            let built = plan
                .set_handle(Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, handle)
                .and_then(|p| {
                    p.set_descriptors(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&config])
                })
                .and_then(|p| p.finalize().map(|_| ()));
            match built {
                Ok(()) => {
                    let workspace = plan
                        .get_i64(Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)?
                        .max(0) as usize;
                    return Ok(Plan {
                        plan,
                        workspace,
                        scalars: self.scalars,
                        _keep: (graph, config, self.tensors, self.ops, self.parts),
                    });
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(GemmError::CudnnUnavailable {
            reason: format!(
                "no cuDNN engine runs the {what} graph ({})",
                if failures.is_empty() {
                    "the heuristics returned no configuration".to_string()
                } else {
                    failures.join("; ")
                }
            ),
        })
    }
}

/// The engine configurations the heuristics in `mode` propose for `graph`, best first.
fn heuristic_configs(
    graph: &Descriptor,
    mode: sys::cudnnBackendHeurMode_t,
) -> Result<Vec<Descriptor>, GemmError> {
    let mut heur = Descriptor::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heur.set_descriptors(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?
        .set_typed(
            Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
            Ty::CUDNN_TYPE_HEUR_MODE,
            mode,
        )?
        .finalize()?;
    let mut count = 0i64;
    // SAFETY: a count query (no elements requested); out-pointer to a local.
    let status = unsafe {
        sys::cudnnBackendGetAttribute(
            heur.raw,
            Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            0,
            &mut count,
            ptr::null_mut(),
        )
    };
    check(status, || "count CUDNN_ATTR_ENGINEHEUR_RESULTS".into())?;
    let configs: Vec<Descriptor> = (0..count.max(0))
        .map(|_| Descriptor::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<Result<_, _>>()?;
    let mut raws: Vec<sys::cudnnBackendDescriptor_t> = configs.iter().map(|c| c.raw).collect();
    let mut returned = 0i64;
    // SAFETY: `raws` holds `count` created ENGINECFG descriptors for cuDNN to fill.
    let status = unsafe {
        sys::cudnnBackendGetAttribute(
            heur.raw,
            Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            count,
            &mut returned,
            raws.as_mut_ptr().cast(),
        )
    };
    check(status, || "get CUDNN_ATTR_ENGINEHEUR_RESULTS".into())?;
    let mut configs = configs;
    configs.truncate(returned.max(0) as usize);
    Ok(configs)
}

/// A finalized execution plan and everything it refers to.
pub(crate) struct Plan {
    plan: Descriptor,
    /// Device workspace bytes [`Plan::execute`] needs.
    pub(crate) workspace: usize,
    scalars: Vec<(i64, Box<[u8; 8]>)>,
    /// Descriptors the plan was built from (graph, engine config, tensors, ops, sub-descriptors),
    /// kept alive with it.
    #[allow(clippy::type_complexity)]
    _keep: (
        Descriptor,
        Descriptor,
        Vec<Descriptor>,
        Vec<Descriptor>,
        Vec<Descriptor>,
    ),
}

impl Plan {
    /// Enqueues the plan on `handle`'s stream with the device tensors `bound` (UID, pointer) and
    /// a workspace of at least [`Plan::workspace`] bytes.
    ///
    /// # Safety
    /// Every pointer must address device memory of the size and layout its tensor was declared
    /// with, kept alive (or reused only by later work on the same stream) until the plan has run.
    pub(crate) unsafe fn execute(
        &self,
        handle: &Handle,
        bound: &[(i64, u64)],
        workspace: u64,
    ) -> Result<(), GemmError> {
        let mut uids: Vec<i64> = bound.iter().map(|(uid, _)| *uid).collect();
        let mut pointers: Vec<*mut c_void> = bound
            .iter()
            .map(|(_, p)| *p as usize as *mut c_void)
            .collect();
        for (uid, bytes) in &self.scalars {
            uids.push(*uid);
            pointers.push(bytes.as_ptr() as *mut c_void);
        }
        let mut pack = Descriptor::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set_i64s(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, &uids)?
            .set_raw(
                Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                Ty::CUDNN_TYPE_VOID_PTR,
                &pointers,
            )?
            .set_raw(
                Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
                Ty::CUDNN_TYPE_VOID_PTR,
                &[workspace as usize as *mut c_void],
            )?
            .finalize()?;
        // SAFETY: the caller guarantees the bound pointers; the scalars live in `self`.
        check(
            unsafe { sys::cudnnBackendExecute(handle.0, self.plan.raw, pack.raw) },
            || "cudnnBackendExecute".into(),
        )
    }
}
