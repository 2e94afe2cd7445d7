//! cuDNN's fused flash attention (causal, grouped-query, f16/bf16) on Burn's CUDA tensors,
//! forward and backward, ordered on CubeCL's own stream like the GEMMs (see the crate docs).
//!
//! The graphs are the ones cudnn-frontend builds for its SDPA node (`graphs` below); cuDNN's
//! runtime-fusion engine runs each as one kernel. Plans are built once per problem (shape,
//! strides, dtype) and stream, and cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::permute;
use burn_cubecl::tensor::CubeTensor;
use cubecl::Runtime;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::device::Device;
use cubecl::device_handle::DeviceHandle;
use cubecl::server::{Binding, ComputeServer, Handle as BufferHandle};
use cubecl::stream_id::StreamId;

use crate::cudnn::{self, DataType, Handle, Plan};
use crate::deferred;
use crate::error::GemmError;
use crate::gemm::CudaTensor;
use crate::stream::{self, CudaServer, StreamOrdering};

mod graphs;

/// What the backward reads, as the forward left it (see [`sdpa_forward`]).
#[derive(Debug, Clone, Copy)]
pub struct SdpaSaved<'a> {
    /// `[b, h, s, d]`.
    pub q: &'a CudaTensor,
    /// `[b, kvh, s, d]`.
    pub k: &'a CudaTensor,
    /// `[b, kvh, s, d]`.
    pub v: &'a CudaTensor,
    /// `[b, s, h·d]`, row-major.
    pub o: &'a CudaTensor,
    /// Log-sum-exp of each row of scaled scores, f32: `[b, h, s]` row-major, or with runs
    /// `[b, s, h]` row-major (token-major, as cuDNN's ragged layout keeps it).
    pub lse: &'a CudaTensor,
    /// The runs the forward attended over, if any.
    pub runs: Option<SdpaRuns<'a>>,
}

/// Variable-length sequences packed in the rows of a `[b, s]` batch: each run of consecutive
/// positions of one row attends as a sequence of its own (causal within it, nothing across).
/// The runs cover every position once, in order (no gaps: cuDNN leaves positions outside every
/// run unwritten).
#[derive(Debug, Clone, Copy)]
pub struct SdpaRuns<'a> {
    /// Row length `s`.
    pub seq: usize,
    /// Flat token index (`row·s + position`) where each run starts.
    pub starts: &'a [usize],
    /// Each run's length.
    pub lengths: &'a [usize],
}

impl SdpaRuns<'_> {
    /// Checks that the runs tile `batch` rows of `seq` positions, run after run, none crossing
    /// a row's end.
    fn check(&self, batch: usize, seq: usize) -> Result<(), GemmError> {
        let err = |reason: String| {
            Err(GemmError::Shape {
                desc: format!("sdpa runs over [{batch}, {seq}]"),
                reason,
            })
        };
        if self.seq != seq || self.starts.len() != self.lengths.len() {
            return err(format!(
                "runs for rows of {} positions, {} starts and {} lengths",
                self.seq,
                self.starts.len(),
                self.lengths.len()
            ));
        }
        let mut next = 0;
        for (&start, &length) in self.starts.iter().zip(self.lengths) {
            if start != next || length == 0 || start / seq != (start + length - 1) / seq {
                return err(format!(
                    "run at token {start} of {length} tokens (expected a start at {next},                      at least one token, within one row)"
                ));
            }
            next = start + length;
        }
        if next != batch * seq {
            return err(format!("the runs end at token {next}, not {}", batch * seq));
        }
        Ok(())
    }

    /// The ragged graph's bound on an entry's length: the longest run rounded up to a power
    /// of two (at least 128), at most the row length. cuDNN sizes its grid by the bound, so a
    /// bound near the runs' lengths keeps it from launching work for positions no run has.
    fn bound(&self) -> usize {
        let longest = self.lengths.iter().copied().max().unwrap_or(1);
        longest.next_power_of_two().max(128).min(self.seq)
    }

    /// Batch entries of the ragged graph: the number of runs rounded up to 32, a power of two
    /// up to 512, then a multiple of 512 (TransformerEngine's buckets), so that a plan serves
    /// batches of similar run counts; the extra entries are empty.
    fn entries(&self) -> usize {
        match self.starts.len() {
            n if n <= 32 => 32,
            n if n <= 512 => n.next_power_of_two(),
            n => n.div_ceil(512) * 512,
        }
    }
}

/// Which graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Pass {
    Forward = 0,
    Backward = 1,
}

/// Everything a plan depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Problem {
    pub pass: Pass,
    pub dtype: DataTypeKey,
    pub batch: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub seq: i64,
    pub head_dim: i64,
    /// Strides of q `[b, h, s, d]`, k and v `[b, kvh, s, d]` (elements).
    pub q_strides: [i64; 4],
    pub k_strides: [i64; 4],
    pub v_strides: [i64; 4],
    /// Strides of O and dO (`[b, s, h·d]` tensors) seen as `[b, h, s, d]`.
    pub o_strides: [i64; 4],
    pub d_o_strides: [i64; 4],
    /// Strides of the LSE (`[b, h, s]`) seen as `[b, h, s, 1]`.
    pub lse_strides: [i64; 4],
    /// `1/√d` as bits (a by-value scalar baked into the plan).
    pub scale_bits: u32,
    /// Ragged problems: the token count `T` the entries are packed in (then `batch` counts
    /// the graph's entries, `seq` bounds each entry's length, and every stored tensor is
    /// token-major).
    pub ragged: Option<i64>,
}

/// f16 or bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum DataTypeKey {
    Half,
    BFloat16,
}

impl DataTypeKey {
    fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F16 => Some(Self::Half),
            DType::BF16 => Some(Self::BFloat16),
            _ => None,
        }
    }

    pub(crate) fn cudnn(self) -> DataType {
        match self {
            Self::Half => DataType::CUDNN_DATA_HALF,
            Self::BFloat16 => DataType::CUDNN_DATA_BFLOAT16,
        }
    }
}

impl Problem {
    /// Strides of a `[b, s, h·d]` tensor (innermost stride 1) seen as `[b, h, s, d]`.
    fn heads_view(&self, t: &CudaTensor) -> [i64; 4] {
        let strides = t.meta.strides();
        [strides[0] as i64, self.head_dim, strides[1] as i64, 1]
    }

    /// Strides of a row-major `[b, h, s]` tensor seen as `[b, h, s, 1]`.
    pub(crate) fn rows_packed_strides(&self) -> [i64; 4] {
        [self.heads * self.seq, self.seq, 1, 1]
    }

    /// Strides of `[b, heads, s, d]` tensors the graphs write (dQ and its accumulator with the
    /// query heads, dK and dV with the KV heads): packed `[b, heads, s, d]`, or token-major
    /// `[b, s, heads, d]` for a ragged problem.
    fn grad_strides(&self, heads: i64) -> [i64; 4] {
        let (s, d) = (self.seq, self.head_dim);
        match self.ragged {
            Some(_) => [s * heads * d, d, heads * d, 1],
            None => [heads * s * d, s * d, d, 1],
        }
    }

    pub(crate) fn q_grad_strides(&self) -> [i64; 4] {
        self.grad_strides(self.heads)
    }

    pub(crate) fn kv_grad_strides(&self) -> [i64; 4] {
        self.grad_strides(self.kv_heads)
    }

    /// `(b, h, s, d)` as sizes.
    fn sizes(&self) -> (usize, usize, usize, usize) {
        let size = |v: i64| v as usize;
        (
            size(self.batch),
            size(self.heads),
            size(self.seq),
            size(self.head_dim),
        )
    }

    pub(crate) fn scale(&self) -> f32 {
        f32::from_bits(self.scale_bits)
    }

    fn describe(&self) -> String {
        let ragged = match self.ragged {
            Some(tokens) => format!(" ragged over {tokens} tokens"),
            None => String::new(),
        };
        format!(
            "{:?} b{} h{} kvh{} s{} d{} {:?}{ragged}",
            self.pass, self.batch, self.heads, self.kv_heads, self.seq, self.head_dim, self.dtype
        )
    }
}

/// Plans per (device, stream slot, problem), each with its workspace size.
type PlanCache = HashMap<(usize, u64, Problem), Plan>;

static PLANS: Mutex<Option<PlanCache>> = Mutex::new(None);
/// Executed plans, forward and backward (see [`sdpa_calls`]).
static CALLS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
/// Workspace bytes per (device, problem), so that a cached plan needs one trip to the server.
static WORKSPACE: Mutex<Option<HashMap<(usize, Problem), usize>>> = Mutex::new(None);
/// Problems cuDNN declined, with the reason: asked again, they are declined at once instead of
/// running the heuristics again on every call.
static DECLINED: Mutex<Option<HashMap<(usize, Problem), String>>> = Mutex::new(None);

fn strides4(t: &CudaTensor, name: &str) -> Result<[i64; 4], GemmError> {
    let strides = t.meta.strides();
    if strides.len() != 4 {
        return Err(GemmError::Shape {
            desc: "sdpa".into(),
            reason: format!("{name} has rank {}; expected 4", strides.len()),
        });
    }
    Ok([0, 1, 2, 3].map(|i| strides[i] as i64))
}

/// `t` itself when its innermost stride is 1 (cuDNN's requirement), else a row-major copy.
fn unit_inner(t: &CudaTensor) -> CudaTensor {
    if t.meta.strides().last() == Some(&1) {
        t.clone()
    } else {
        into_contiguous(t.clone())
    }
}

/// Strides of a row-major `[b, s, h·d]` tensor seen as `[b, h, s, d]`.
fn packed_heads_view(_b: usize, h: usize, s: usize, d: usize) -> [i64; 4] {
    let (h, s, d) = (h as i64, s as i64, d as i64);
    [s * h * d, d, h * d, 1]
}

/// `t`'s shape.
fn shape_of(t: &CudaTensor) -> Vec<usize> {
    t.meta.shape().to_vec()
}

fn problem(
    pass: Pass,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    scale: f32,
) -> Result<Problem, GemmError> {
    let (qd, kd, vd) = (shape_of(q), shape_of(k), shape_of(v));
    let shape_err = |reason: String| GemmError::Shape {
        desc: format!("sdpa q {qd:?} k {kd:?} v {vd:?}"),
        reason,
    };
    if qd.len() != 4 || kd.len() != 4 || kd != vd {
        return Err(shape_err(
            "expected q [b, h, s, d] and k, v [b, kvh, s, d]".into(),
        ));
    }
    if kd[0] != qd[0] || kd[2] != qd[2] || kd[3] != qd[3] || kd[1] == 0 || qd[1] % kd[1] != 0 {
        return Err(shape_err(
            "batch, sequence or head width differ, or h is not a multiple of kvh".into(),
        ));
    }
    let dtype = DataTypeKey::of(q.dtype).ok_or_else(|| GemmError::DType {
        operand: "q",
        dtype: format!("{:?} (cuDNN attention takes f16 or bf16)", q.dtype),
    })?;
    if k.dtype != q.dtype || v.dtype != q.dtype {
        return Err(GemmError::DTypeMismatch {
            dtypes: format!("q {:?}, k {:?}, v {:?}", q.dtype, k.dtype, v.dtype),
        });
    }
    Ok(Problem {
        pass,
        dtype,
        batch: qd[0] as i64,
        heads: qd[1] as i64,
        kv_heads: kd[1] as i64,
        seq: qd[2] as i64,
        head_dim: qd[3] as i64,
        q_strides: strides4(q, "q")?,
        k_strides: strides4(k, "k")?,
        v_strides: strides4(v, "v")?,
        // Row-major `[b, s, h·d]` until the caller sets the strides of the real tensors.
        o_strides: packed_heads_view(qd[0], qd[1], qd[2], qd[3]),
        d_o_strides: packed_heads_view(qd[0], qd[1], qd[2], qd[3]),
        lse_strides: [(qd[1] * qd[2]) as i64, qd[2] as i64, 1, 1],
        scale_bits: scale.to_bits(),
        ragged: None,
    })
}

/// Causal attention forward through cuDNN: `(o, lse)`, over whole rows or, with `runs`, over
/// each run as a sequence of its own.
///
/// Before the first forward of a problem, the backward plan is built too, so that a problem
/// whose backward cuDNN declines is declined here (the caller's fallback then covers both).
///
/// # Shapes
/// - q: `[b, h, s, d]`; k, v: `[b, kvh, s, d]` (`h` a multiple of `kvh`; any strides: a copy is
///   made when the innermost one is not 1, and with runs unless the tensor is token-major,
///   `[b, s, heads, d]` in memory)
/// - o: `[b, s, h·d]` (row-major, ready for `o_proj`); lse: `[b, h, s]` f32, or with runs
///   `[b, s, h]` (token-major)
///
/// # Errors
/// Shapes or dtypes cuDNN does not take (f16/bf16 only), runs that do not tile the rows, no
/// `libcudnn` or no engine for the graph ([`GemmError::CudnnUnavailable`]), or a failing cuDNN
/// or CubeCL call.
pub fn sdpa_forward(
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    scale: f32,
    runs: Option<SdpaRuns<'_>>,
) -> Result<(CudaTensor, CudaTensor), GemmError> {
    let (q, k, v) = (unit_inner(q), unit_inner(k), unit_inner(v));
    let p = problem(Pass::Forward, &q, &k, &v, scale)?;
    let (b, h, s, d) = p.sizes();
    let o = new_tensor(&q, vec![b, s, h * d], q.dtype);
    let (p, q, k, v, lse, run_buffers) = match runs {
        None => {
            let lse = new_tensor(&q, vec![b, h, s], DType::F32);
            (p, q, k, v, lse, None)
        }
        Some(runs) => {
            runs.check(b, s)?;
            let kvh = p.kv_heads as usize;
            let (q, k, v) = (
                token_major(&q, h),
                token_major(&k, kvh),
                token_major(&v, kvh),
            );
            let p = ragged_problem(p, &runs);
            let lse = new_tensor(&q, vec![b, s, h], DType::F32);
            let buffers = RunBuffers::upload(&q, &p, &runs);
            (p, q, k, v, lse, Some(buffers))
        }
    };
    let backward = Problem {
        pass: Pass::Backward,
        ..p.clone()
    };
    let mut bound = bindings(&[
        (graphs::uid::Q, &q),
        (graphs::uid::K, &k),
        (graphs::uid::V, &v),
        (graphs::uid::O, &o),
        (graphs::uid::LSE, &lse),
    ]);
    if let Some(buffers) = &run_buffers {
        bound.extend(buffers.bindings());
    }
    run(&q.device, &[p.clone(), backward], &p, bound)?;
    Ok((o, lse))
}

/// Causal attention backward through cuDNN: `(dq, dk, dv)` in the shapes of `q`, `k` and `v`
/// (row-major; with runs, token-major `[b, s, heads, d]` memory seen as `[b, heads, s, d]`).
///
/// # Shapes
/// As [`sdpa_forward`]; `d_o`: `[b, s, h·d]`.
///
/// # Errors
/// As [`sdpa_forward`].
pub fn sdpa_backward(
    saved: &SdpaSaved<'_>,
    d_o: &CudaTensor,
    scale: f32,
) -> Result<(CudaTensor, CudaTensor, CudaTensor), GemmError> {
    let (q, k, v) = (
        unit_inner(saved.q),
        unit_inner(saved.k),
        unit_inner(saved.v),
    );
    let p = problem(Pass::Backward, &q, &k, &v, scale)?;
    let (b, h, s, d) = p.sizes();
    let kvh = p.kv_heads as usize;
    let (o, lse, d_o) = (unit_inner(saved.o), unit_inner(saved.lse), unit_inner(d_o));
    let lse_shape = match saved.runs {
        Some(_) => vec![b, s, h],
        None => vec![b, h, s],
    };
    for (name, t, want) in [
        ("o", &o, vec![b, s, h * d]),
        ("d_o", &d_o, vec![b, s, h * d]),
        ("lse", &lse, lse_shape),
    ] {
        if shape_of(t) != want {
            return Err(GemmError::Shape {
                desc: format!("sdpa backward {}", p.describe()),
                reason: format!("{name} has shape {:?}; expected {want:?}", shape_of(t)),
            });
        }
    }
    if d_o.dtype != q.dtype || o.dtype != q.dtype {
        return Err(GemmError::DTypeMismatch {
            dtypes: format!("q {:?}, o {:?}, d_o {:?}", q.dtype, o.dtype, d_o.dtype),
        });
    }
    let (p, q, k, v, o, lse, d_o, run_buffers) = match saved.runs {
        None => {
            let p = Problem {
                o_strides: p.heads_view(&o),
                d_o_strides: p.heads_view(&d_o),
                lse_strides: {
                    let st = lse.meta.strides();
                    [st[0] as i64, st[1] as i64, 1, 1]
                },
                ..p
            };
            (p, q, k, v, o, lse, d_o, None)
        }
        Some(runs) => {
            runs.check(b, s)?;
            let (q, k, v) = (
                token_major(&q, h),
                token_major(&k, kvh),
                token_major(&v, kvh),
            );
            let contiguous = |t: CudaTensor| {
                if t.is_contiguous() {
                    t
                } else {
                    into_contiguous(t)
                }
            };
            let (o, lse, d_o) = (contiguous(o), contiguous(lse), contiguous(d_o));
            let p = ragged_problem(p, &runs);
            let buffers = RunBuffers::upload(&q, &p, &runs);
            (p, q, k, v, o, lse, d_o, Some(buffers))
        }
    };
    let ragged = run_buffers.is_some();
    // Buffers the graph writes and reads back (cuDNN's fused backward keeps them in memory):
    // the per-row Σ dO∘O and the dQ accumulator (f32), and for a ragged problem with grouped
    // queries dK and dV per query head.
    let (row_dot, dq_accum, dq, dk, dv) = if ragged {
        (
            new_tensor(&q, vec![b, s, h], DType::F32),
            new_tensor(&q, vec![b, s, h, d], DType::F32),
            permute(new_tensor(&q, vec![b, s, h, d], q.dtype), &[0, 2, 1, 3]),
            permute(new_tensor(&q, vec![b, s, kvh, d], q.dtype), &[0, 2, 1, 3]),
            permute(new_tensor(&q, vec![b, s, kvh, d], q.dtype), &[0, 2, 1, 3]),
        )
    } else {
        (
            new_tensor(&q, vec![b, h, s], DType::F32),
            new_tensor(&q, vec![b, h, s, d], DType::F32),
            new_tensor(&q, shape_of(&q), q.dtype),
            new_tensor(&q, shape_of(&k), q.dtype),
            new_tensor(&q, shape_of(&v), q.dtype),
        )
    };
    let mut bound = bindings(&[
        (graphs::uid::Q, &q),
        (graphs::uid::K, &k),
        (graphs::uid::V, &v),
        (graphs::uid::O, &o),
        (graphs::uid::LSE, &lse),
        (graphs::uid::D_O, &d_o),
        (graphs::uid::D_Q, &dq),
        (graphs::uid::D_K, &dk),
        (graphs::uid::D_V, &dv),
        (graphs::uid::ROW_DOT, &row_dot),
        (graphs::uid::D_Q_ACCUM, &dq_accum),
    ]);
    let mut full_heads = Vec::new();
    if let Some(buffers) = &run_buffers {
        bound.extend(buffers.bindings());
        if kvh != h {
            for uid in [graphs::uid::D_K_FULL, graphs::uid::D_V_FULL] {
                let full = new_tensor(&q, vec![b, s, h, d], q.dtype);
                bound.extend(bindings(&[(uid, &full)]));
                full_heads.push(full);
            }
        }
    }
    run(&q.device, std::slice::from_ref(&p), &p, bound)?;
    Ok((dq, dk, dv))
}

/// `p` as the ragged problem of `runs`: the graph's entries are the runs (bucketed, see
/// [`SdpaRuns::entries`]), each at most [`SdpaRuns::bound`] long, and every stored tensor
/// token-major.
fn ragged_problem(p: Problem, runs: &SdpaRuns<'_>) -> Problem {
    let (d, h, kvh) = (p.head_dim, p.heads, p.kv_heads);
    let bound = runs.bound() as i64;
    // The batch stride of a ragged tensor is unused (the offsets replace it).
    let token_major = |heads: i64| [bound * heads * d, d, heads * d, 1];
    Problem {
        ragged: Some(p.batch * p.seq),
        batch: runs.entries() as i64,
        seq: bound,
        q_strides: token_major(h),
        k_strides: token_major(kvh),
        v_strides: token_major(kvh),
        o_strides: token_major(h),
        d_o_strides: token_major(h),
        lse_strides: [bound * h, 1, h, 1],
        ..p
    }
}

/// `t` (`[b, heads, s, d]`) itself when its memory is token-major (`[b, s, heads, d]`
/// row-major), else a token-major copy.
fn token_major(t: &CudaTensor, heads: usize) -> CudaTensor {
    let shape = shape_of(t);
    let (s, d) = (shape[2], shape[3]);
    let want = [s * heads * d, d, heads * d, 1];
    let strides = &t.meta.strides()[..];
    // A single row's batch stride is never used.
    if strides == want || shape[0] == 1 && strides[1..] == want[1..] {
        return t.clone();
    }
    permute(
        into_contiguous(permute(t.clone(), &[0, 2, 1, 3])),
        &[0, 2, 1, 3],
    )
}

/// The per-call inputs of a ragged graph on the device: each entry's length (int32, the
/// bucket's extra entries 0) and where each entry starts in the token-major tensors (int64,
/// in elements: the run's first token times the elements per token of Q and O, of K and V, of
/// the LSE; the extra entries repeat the end).
struct RunBuffers {
    lengths: CudaTensor,
    q_offsets: CudaTensor,
    kv_offsets: CudaTensor,
    stats_offsets: CudaTensor,
}

impl RunBuffers {
    fn upload(like: &CudaTensor, p: &Problem, runs: &SdpaRuns<'_>) -> Self {
        let entries = p.batch as usize;
        let tokens = p.ragged.unwrap_or(0);
        let mut lengths: Vec<i32> = runs.lengths.iter().map(|&l| l as i32).collect();
        lengths.resize(entries, 0);
        let offsets = |per_token: i64| {
            let mut values: Vec<i64> = runs.starts.iter().map(|&t| t as i64 * per_token).collect();
            values.resize(entries + 1, tokens * per_token);
            values
        };
        let (h, kvh, d) = (p.heads, p.kv_heads, p.head_dim);
        Self {
            lengths: upload(like, lengths.len(), lengths_bytes(&lengths), DType::I32),
            q_offsets: upload_i64(like, offsets(h * d)),
            kv_offsets: upload_i64(like, offsets(kvh * d)),
            stats_offsets: upload_i64(like, offsets(h)),
        }
    }

    /// The graphs' UIDs for these buffers (the query and key lengths are the same here, as
    /// are the offsets of Q and O, and of K and V).
    fn bindings(&self) -> Vec<(i64, Binding)> {
        use graphs::uid;
        bindings(&[
            (uid::SEQ_LEN_Q, &self.lengths),
            (uid::SEQ_LEN_KV, &self.lengths),
            (uid::RAGGED_Q, &self.q_offsets),
            (uid::RAGGED_O, &self.q_offsets),
            (uid::RAGGED_K, &self.kv_offsets),
            (uid::RAGGED_V, &self.kv_offsets),
            (uid::RAGGED_STATS, &self.stats_offsets),
        ])
    }
}

fn lengths_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

fn upload_i64(like: &CudaTensor, values: Vec<i64>) -> CudaTensor {
    let bytes = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    upload(like, values.len(), bytes, DType::I64)
}

/// `len` values of `dtype` (their bytes) in a new 1-D tensor on `like`'s device.
fn upload(like: &CudaTensor, len: usize, bytes: Vec<u8>, dtype: DType) -> CudaTensor {
    let handle = like
        .client
        .create(cubecl::bytes::Bytes::from_bytes_vec(bytes));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        vec![len].into(),
        handle,
        dtype,
    )
}

/// The graph tensors' UIDs with their tensors' buffers.
fn bindings(tensors: &[(i64, &CudaTensor)]) -> Vec<(i64, Binding)> {
    tensors
        .iter()
        .map(|(uid, t)| (*uid, t.handle.clone().binding()))
        .collect()
}

/// A new row-major tensor on `like`'s device (contents undefined until the plan writes it).
fn new_tensor(like: &CudaTensor, shape: Vec<usize>, dtype: DType) -> CudaTensor {
    let bytes = shape.iter().product::<usize>() * dtype.size();
    let handle = like.client.empty(bytes);
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        handle,
        dtype,
    )
}

/// Ensures the plans for `prepare` exist on the caller's stream, then executes `exec` with the
/// device buffers `bound` (UID, buffer) and a workspace.
fn run(
    device: &CudaDevice,
    prepare: &[Problem],
    exec: &Problem,
    bound: Vec<(i64, Binding)>,
) -> Result<(), GemmError> {
    let device_index = device.index;
    {
        let declined = DECLINED.lock().map_err(|_| GemmError::Poisoned)?;
        if let Some(reason) = prepare
            .iter()
            .find_map(|p| declined.as_ref()?.get(&(device_index, p.clone())))
        {
            return Err(GemmError::CudnnUnavailable {
                reason: reason.clone(),
            });
        }
    }
    let known = WORKSPACE
        .lock()
        .map_err(|_| GemmError::Poisoned)?
        .as_ref()
        .and_then(|m| m.get(&(device_index, exec.clone())).copied());
    let workspace_bytes = match known {
        Some(bytes) => bytes,
        None => {
            let bytes = match submit(device, prepare.to_vec(), exec.clone(), None, bound.clone()) {
                Ok(bytes) => bytes,
                Err(error) => {
                    // A problem cuDNN cannot plan (no engine, or a descriptor it rejects) is
                    // remembered; other failures (the server, the driver) are not.
                    if matches!(
                        error,
                        GemmError::CudnnUnavailable { .. } | GemmError::Cudnn { .. }
                    ) {
                        let mut declined = DECLINED.lock().map_err(|_| GemmError::Poisoned)?;
                        let declined = declined.get_or_insert_with(HashMap::new);
                        for p in prepare {
                            declined.insert((device_index, p.clone()), error.to_string());
                        }
                    }
                    return Err(error);
                }
            };
            WORKSPACE
                .lock()
                .map_err(|_| GemmError::Poisoned)?
                .get_or_insert_with(HashMap::new)
                .insert((device_index, exec.clone()), bytes);
            bytes
        }
    };
    let client = CudaRuntime::client(device);
    let workspace: BufferHandle = client.empty(workspace_bytes.max(1));
    if known.is_some() && !deferred::always_wait() {
        // The plans exist and have run: hand the execution to the runner without waiting.
        submit_without_waiting(device, exec.clone(), workspace.binding(), bound)?;
    } else {
        submit(
            device,
            prepare.to_vec(),
            exec.clone(),
            Some(workspace.binding()),
            bound,
        )?;
    }
    CALLS[exec.pass as usize].fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// How many cuDNN attention forwards and backwards this process has enqueued: lets a caller
/// (the benchmarks, the GPU checks) tell that the fused kernel ran rather than a fallback.
pub fn sdpa_calls() -> (usize, usize) {
    (
        CALLS[Pass::Forward as usize].load(Ordering::Relaxed),
        CALLS[Pass::Backward as usize].load(Ordering::Relaxed),
    )
}

/// One trip to CubeCL's server, waiting for it: builds missing plans (on the caller's stream's
/// cuDNN handle) and, when `workspace` is given, executes `exec`. Returns `exec`'s workspace
/// size.
fn submit(
    device: &CudaDevice,
    prepare: Vec<Problem>,
    exec: Problem,
    workspace: Option<Binding>,
    bound: Vec<(i64, Binding)>,
) -> Result<usize, GemmError> {
    deferred::take()?;
    let stream_id = StreamId::current();
    let device_index = device.index;
    let desc = exec.describe();
    let handle = DeviceHandle::<CudaServer>::new(device.to_id());
    handle
        .submit_blocking(move |server: &mut CudaServer| {
            run_on_server(
                server,
                device_index,
                stream_id,
                &prepare,
                &exec,
                workspace,
                bound,
            )
        })
        .map_err(|e| GemmError::Server {
            desc: format!("sdpa {desc}"),
            reason: format!("device channel: {e:?}"),
        })?
}

/// Executes `exec`, whose plan exists on the caller's stream, on CubeCL's runner without waiting
/// for it; a failure there is returned by the next call ([`crate::deferred`]).
fn submit_without_waiting(
    device: &CudaDevice,
    exec: Problem,
    workspace: Binding,
    bound: Vec<(i64, Binding)>,
) -> Result<(), GemmError> {
    deferred::take()?;
    let stream_id = StreamId::current();
    let device_index = device.index;
    deferred::hand_over(device, move |server| {
        let prepare = [exec.clone()];
        run_on_server(
            server,
            device_index,
            stream_id,
            &prepare,
            &exec,
            Some(workspace),
            bound,
        )
    });
    Ok(())
}

/// The body of [`submit`], on the runner thread with the server.
fn run_on_server(
    server: &mut CudaServer,
    device_index: usize,
    stream_id: StreamId,
    prepare: &[Problem],
    exec: &Problem,
    workspace: Option<Binding>,
    bound: Vec<(i64, Binding)>,
) -> Result<usize, GemmError> {
    let server_err = |e: cubecl::server::ServerError| GemmError::Server {
        desc: format!("sdpa {}", exec.describe()),
        reason: e.to_string(),
    };
    // As for the GEMMs: makes CubeCL's context current, orders the caller's stream after the
    // producers of each buffer, and pins the buffers until the plan is enqueued.
    let mut foreign = false;
    let mut resources = Vec::with_capacity(bound.len() + 1);
    let mut pointers = Vec::with_capacity(bound.len());
    for (uid, binding) in bound {
        foreign |= binding.stream != stream_id;
        let resource = server
            .get_resource(binding, stream_id)
            .map_err(server_err)?;
        pointers.push((uid, resource.resource().ptr));
        resources.push(resource);
    }
    let workspace_ptr = match workspace {
        Some(binding) => {
            let resource = server
                .get_resource(binding, stream_id)
                .map_err(server_err)?;
            let ptr = resource.resource().ptr;
            resources.push(resource);
            Some(ptr)
        }
        None => None,
    };
    let result = stream::with_stream(server, device_index, stream_id, |state, server| {
        let host_sync = matches!(state.ordering, StreamOrdering::HostSync { .. });
        if state.cudnn.is_none() {
            state.cudnn = Some(Handle::new(state.stream)?);
        }
        let cudnn_handle = state.cudnn.as_ref().ok_or(GemmError::Poisoned)?;
        let mut plans = PLANS.lock().map_err(|_| GemmError::Poisoned)?;
        let plans = plans.get_or_insert_with(HashMap::new);
        let slot = state.stream as u64;
        for problem in prepare {
            let key = (device_index, slot, problem.clone());
            if let std::collections::hash_map::Entry::Vacant(slot) = plans.entry(key) {
                let version = cudnn::library_version()?;
                supported(problem, version)?;
                slot.insert(graphs::build(cudnn_handle, problem, version)?);
            }
        }
        let plan = plans
            .get(&(device_index, slot, exec.clone()))
            .ok_or(GemmError::Poisoned)?;
        let workspace_bytes = plan.workspace;
        if let Some(workspace_ptr) = workspace_ptr {
            if host_sync {
                cubecl::future::block_on(server.sync(stream_id)).map_err(server_err)?;
            }
            // SAFETY: every pointer is a live CubeCL buffer pinned by `resources` until the
            // plan is enqueued, allocated with the shape and layout its tensor declares (the
            // callers build them so); the workspace holds at least `plan.workspace` bytes.
            unsafe { plan.execute(cudnn_handle, &pointers, workspace_ptr)? };
            if host_sync || foreign {
                // SAFETY: a live stream of the current context.
                unsafe { cudarc::driver::result::stream::synchronize(state.stream) }
                    .map_err(|e| GemmError::driver("cuStreamSynchronize", e))?;
            }
        }
        Ok(workspace_bytes)
    });
    drop(resources);
    result
}

/// The limits cudnn-frontend applies to these graphs (its `sdpa_support_surface.h` and SDPA
/// node), checked before building so that an unsupported problem is declined with a reason.
fn supported(p: &Problem, version: usize) -> Result<(), GemmError> {
    let decline = |reason: String| {
        Err(GemmError::CudnnUnavailable {
            reason: format!("{} on cuDNN {version}: {reason}", p.describe()),
        })
    };
    if version < 90000 {
        return decline("needs cuDNN 9".into());
    }
    if (91000..91002).contains(&version) {
        return decline("cuDNN 9.10.0 and 9.10.1 have broken fused attention".into());
    }
    if p.head_dim % 8 != 0 || p.head_dim > 128 {
        return decline("head width must be a multiple of 8, at most 128".into());
    }
    if p.seq < 2 {
        return decline("sequence shorter than 2".into());
    }
    if p.ragged.is_some() && version < 90600 {
        return decline("ragged sequences with grouped queries need cuDNN 9.6".into());
    }
    if p.ragged.is_none() && version <= 91500 && p.seq % 128 != 0 {
        // Up to 9.15.0 the backward needs explicit sequence lengths (a padding mask) when s is
        // not a multiple of 128; these graphs do not carry one.
        return decline("sequence not a multiple of 128 (needs cuDNN > 9.15.0)".into());
    }
    Ok(())
}

/// Whether cuDNN can be loaded here, and its version (`major·10000 + minor·100 + patch` for
/// cuDNN 9).
///
/// # Errors
/// [`GemmError::CudnnUnavailable`] when `libcudnn.so.9` is not found.
pub fn cudnn_version() -> Result<usize, GemmError> {
    cudnn::library_version()
}
