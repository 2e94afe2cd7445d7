//! The forward and backward attention graphs, op for op as cudnn-frontend's composite SDPA
//! nodes lower them for cuDNN 9 (the pattern cuDNN's fused-attention engine recognises):
//!
//! ```text
//! forward:  S = Q·Kᵀ (f32) → S·scale → causal select(row ≥ col ? S : −∞)
//!           → M = max_row, E = exp(S − M), Z = Σ_row E, LSE = M + log Z (stored),
//!           P = E / Z (in the input dtype) → O = P·V (stored)
//! backward: D = Σ_d dO∘O (stored, f32); P = exp(masked(scale·Q·Kᵀ − LSE));
//!           dV = Pᵀ·dO; dP = dO·Vᵀ; dS = P∘(dP − D)·scale; dK = dSᵀ·Q;
//!           dQ = dS·K accumulated in f32 (stored), then cast
//! ```
//!
//! The details (which intermediates are f32, which are in the input dtype, which buffers are
//! real, the `1.0` scalar, the odd strides of `dO∘O`) follow the frontend exactly: cuDNN's
//! engines match these graphs as patterns. `docs/cudnn-sdpa-graphs.md` (in this crate) lists
//! every tensor and operation with the frontend source it comes from, the version limits, and
//! cuDNN's logging switches for when a graph is declined.
//!
//! Grouped-query attention is expressed by K and V having fewer heads than Q (the matmuls
//! broadcast over heads); in backward, dK and dV are computed per query head and summed over
//! each group by a reduction.
//!
//! Ragged problems (variable-length sequences packed token after token, [`Problem::ragged`])
//! add what the frontend adds for its padding mask and ragged offsets: per-entry sequence
//! lengths overriding every product's sizes, a select of `−∞` on scores past an entry's length
//! (after the scale, before the causal mask — in backward before subtracting the LSE), and on
//! every stored tensor the offsets where each entry starts. The LSE, `Σ dO∘O` and the dQ
//! accumulator are then token-major like the data, and with grouped queries the per-query-head
//! dK and dV are real buffers (the frontend's storage for ragged problems).

use crate::cudnn::{
    DataType, GraphBuilder, Handle, Plan, PointwiseMode, ReduceOp, Storage, TensorRef,
};
use crate::error::GemmError;

use super::{Pass, Problem};

/// UIDs of the tensors bound at execution (virtual tensors number themselves above 1000).
pub(crate) mod uid {
    pub const Q: i64 = 1;
    pub const K: i64 = 2;
    pub const V: i64 = 3;
    pub const O: i64 = 4;
    pub const LSE: i64 = 5;
    pub const D_O: i64 = 6;
    pub const D_Q: i64 = 7;
    pub const D_K: i64 = 8;
    pub const D_V: i64 = 9;
    pub const SCALE: i64 = 10;
    pub const ONE: i64 = 11;
    pub const NEG_INF: i64 = 12;
    /// Backward: `Σ_d dO∘O` per row, f32 `[b, h, s, 1]` (a real buffer).
    pub const ROW_DOT: i64 = 13;
    /// Backward: dQ accumulated in f32, `[b, h, s, d]` row-major (a real buffer).
    pub const D_Q_ACCUM: i64 = 14;
    /// Ragged problems: per-entry query and key lengths, int32 `[B, 1, 1, 1]`.
    pub const SEQ_LEN_Q: i64 = 15;
    pub const SEQ_LEN_KV: i64 = 16;
    /// Ragged problems: the `−∞` of the length mask (its own scalar, as in the frontend).
    pub const NEG_INF_PAD: i64 = 17;
    /// Ragged problems: where each entry starts in Q (and dQ, the dQ accumulator), K (dK),
    /// V (dV), O (dO) and the LSE (`Σ dO∘O`), int64 `[B + 1, 1, 1, 1]`, in elements.
    pub const RAGGED_Q: i64 = 18;
    pub const RAGGED_K: i64 = 19;
    pub const RAGGED_V: i64 = 20;
    pub const RAGGED_O: i64 = 21;
    pub const RAGGED_STATS: i64 = 22;
    /// Ragged problems with grouped queries: dK and dV per query head, before the sum over
    /// each group (real buffers, `[T, h, d]` in the input dtype).
    pub const D_K_FULL: i64 = 23;
    pub const D_V_FULL: i64 = 24;
    pub const FIRST_VIRTUAL: i64 = 1000;
}

const F32: DataType = DataType::CUDNN_DATA_FLOAT;

/// The plan of `problem`'s pass, for cuDNN `version`.
pub(crate) fn build(handle: &Handle, problem: &Problem, version: usize) -> Result<Plan, GemmError> {
    let mut g = GraphBuilder::new(uid::FIRST_VIRTUAL, version);
    match problem.pass {
        Pass::Forward => forward(&mut g, problem)?,
        Pass::Backward => backward(&mut g, problem)?,
    }
    g.build(handle, &problem.describe())
}

fn swap_last(mut v: [i64; 4]) -> [i64; 4] {
    v.swap(2, 3);
    v
}

/// `y = select(row ≥ col ? x : −∞)` over `[b, h, s, s]` scores: the causal (top-left) mask.
fn causal_mask(g: &mut GraphBuilder, p: &Problem, x: &TensorRef) -> Result<TensorRef, GemmError> {
    let scores = [p.batch, p.heads, p.seq, p.seq];
    let row = score_index(g, &scores, x, F32, 2)?;
    let col = score_index(g, &scores, x, F32, 3)?;
    let visible = score_test(
        g,
        &scores,
        PointwiseMode::CUDNN_POINTWISE_CMP_GE,
        &row,
        &col,
    )?;
    keep_or_neg_inf(g, &scores, x, &visible, uid::NEG_INF)
}

/// A virtual int32 tensor of `scores`' shape holding each score's row (`axis` 2) or column
/// (`axis` 3) index, generated with `math` as the compute type.
fn score_index(
    g: &mut GraphBuilder,
    scores: &[i64; 4],
    x: &TensorRef,
    math: DataType,
    axis: i64,
) -> Result<TensorRef, GemmError> {
    let y = g.virtual_of(scores, DataType::CUDNN_DATA_INT32)?;
    let mode = PointwiseMode::CUDNN_POINTWISE_GEN_INDEX;
    g.pointwise(mode, math, x, None, None, &y, Some(axis))?;
    Ok(y)
}

/// A virtual boolean tensor of `scores`' shape, `mode(a, b)`.
fn score_test(
    g: &mut GraphBuilder,
    scores: &[i64; 4],
    mode: PointwiseMode,
    a: &TensorRef,
    b: &TensorRef,
) -> Result<TensorRef, GemmError> {
    let boolean = DataType::CUDNN_DATA_BOOLEAN;
    let y = g.virtual_of(scores, boolean)?;
    g.pointwise(mode, boolean, a, Some(b), None, &y, None)?;
    Ok(y)
}

/// `y = keep ? x : −∞` into a new virtual f32 tensor of `scores`' shape, the −∞ a by-value
/// scalar of uid `neg_inf`.
fn keep_or_neg_inf(
    g: &mut GraphBuilder,
    scores: &[i64; 4],
    x: &TensorRef,
    keep: &TensorRef,
    neg_inf: i64,
) -> Result<TensorRef, GemmError> {
    let neg_inf = g.scalar_f32(neg_inf, f32::NEG_INFINITY)?;
    let masked = g.virtual_f32(scores)?;
    // BINARY_SELECT: y = t ? x : b.
    let select = PointwiseMode::CUDNN_POINTWISE_BINARY_SELECT;
    g.pointwise(select, F32, x, Some(&neg_inf), Some(keep), &masked, None)?;
    Ok(masked)
}

/// `y = mode(x, b)` in f32 into a new virtual f32 tensor of `dims`.
fn binary(
    g: &mut GraphBuilder,
    mode: PointwiseMode,
    x: &TensorRef,
    b: &TensorRef,
    dims: &[i64],
) -> Result<TensorRef, GemmError> {
    let y = g.virtual_f32(dims)?;
    g.pointwise(mode, F32, x, Some(b), None, &y, None)?;
    Ok(y)
}

/// `y = mode(x)` in f32 into a new virtual f32 tensor of `dims`.
fn unary(
    g: &mut GraphBuilder,
    mode: PointwiseMode,
    x: &TensorRef,
    dims: &[i64],
) -> Result<TensorRef, GemmError> {
    let y = g.virtual_f32(dims)?;
    g.pointwise(mode, F32, x, None, None, &y, None)?;
    Ok(y)
}

fn device(
    g: &mut GraphBuilder,
    uid: i64,
    dims: [i64; 4],
    strides: [i64; 4],
    dtype: DataType,
) -> Result<TensorRef, GemmError> {
    g.tensor(Some(uid), &dims, &strides, dtype, Storage::Device)
}

/// What a ragged problem adds to its graphs: the sequence lengths and the entries' offsets.
struct Ragged {
    seq_q: TensorRef,
    seq_kv: TensorRef,
    q: TensorRef,
    k: TensorRef,
    v: TensorRef,
    o: TensorRef,
    stats: TensorRef,
}

impl Ragged {
    /// The lengths and offsets of a ragged `p`; `None` for whole rows.
    fn of(g: &mut GraphBuilder, p: &Problem) -> Result<Option<Self>, GemmError> {
        if p.ragged.is_none() {
            return Ok(None);
        }
        let b = p.batch;
        let lengths = |g: &mut GraphBuilder, uid| {
            device(
                g,
                uid,
                [b, 1, 1, 1],
                [1, 1, 1, 1],
                DataType::CUDNN_DATA_INT32,
            )
        };
        let (seq_q, seq_kv) = (lengths(g, uid::SEQ_LEN_Q)?, lengths(g, uid::SEQ_LEN_KV)?);
        let offsets = |g: &mut GraphBuilder, uid| {
            device(
                g,
                uid,
                [b + 1, 1, 1, 1],
                [1, 1, 1, 1],
                DataType::CUDNN_DATA_INT64,
            )
        };
        Ok(Some(Self {
            seq_q,
            seq_kv,
            q: offsets(g, uid::RAGGED_Q)?,
            k: offsets(g, uid::RAGGED_K)?,
            v: offsets(g, uid::RAGGED_V)?,
            o: offsets(g, uid::RAGGED_O)?,
            stats: offsets(g, uid::RAGGED_STATS)?,
        }))
    }
}

/// A device tensor, at `offsets` of `ragged` (picked by `pick`) when the problem is ragged.
fn stored(
    g: &mut GraphBuilder,
    uid: i64,
    (dims, strides): ([i64; 4], [i64; 4]),
    dtype: DataType,
    ragged: Option<&Ragged>,
    pick: fn(&Ragged) -> &TensorRef,
) -> Result<TensorRef, GemmError> {
    g.ragged_tensor(
        Some(uid),
        &dims,
        &strides,
        dtype,
        Storage::Device,
        ragged.map(pick),
    )
}

/// `[m, n, k]` size overrides of a product, from the ragged problem's lengths: `m`, `n`, `k`
/// each the query length (`Q`), the key length (`K`) or not overridden.
fn sizes(ragged: Option<&Ragged>, mnk: [Side; 3]) -> [Option<&TensorRef>; 3] {
    mnk.map(|side| {
        ragged.and_then(|r| match side {
            Side::Q => Some(&r.seq_q),
            Side::K => Some(&r.seq_kv),
            Side::None => None,
        })
    })
}

/// Which sequence length sizes a product's dimension.
#[derive(Clone, Copy)]
enum Side {
    Q,
    K,
    None,
}

/// `y = select(row < len_q ∧ col < len_kv ? x : −∞)` over `[b, h, s, s]` scores: the
/// frontend's padding mask for ragged entries.
fn length_mask(
    g: &mut GraphBuilder,
    p: &Problem,
    x: &TensorRef,
    ragged: &Ragged,
) -> Result<TensorRef, GemmError> {
    let scores = [p.batch, p.heads, p.seq, p.seq];
    let int32 = DataType::CUDNN_DATA_INT32;
    let row = score_index(g, &scores, x, int32, 2)?;
    let col = score_index(g, &scores, x, int32, 3)?;
    let less = PointwiseMode::CUDNN_POINTWISE_CMP_LT;
    let row_in = score_test(g, &scores, less, &row, &ragged.seq_q)?;
    let col_in = score_test(g, &scores, less, &col, &ragged.seq_kv)?;
    let and = PointwiseMode::CUDNN_POINTWISE_LOGICAL_AND;
    let inside = score_test(g, &scores, and, &row_in, &col_in)?;
    keep_or_neg_inf(g, &scores, x, &inside, uid::NEG_INF_PAD)
}

fn forward(g: &mut GraphBuilder, p: &Problem) -> Result<(), GemmError> {
    let dt = p.dtype.cudnn();
    let (b, h, kvh, s, d) = (p.batch, p.heads, p.kv_heads, p.seq, p.head_dim);
    let scores = [b, h, s, s];
    let rows = [b, h, s, 1];
    let ragged = Ragged::of(g, p)?;
    let r = ragged.as_ref();
    let q = stored(g, uid::Q, ([b, h, s, d], p.q_strides), dt, r, |r| &r.q)?;
    // The first product takes Kᵀ: the same memory seen as [b, kvh, d, s].
    let kt = stored(
        g,
        uid::K,
        ([b, kvh, d, s], swap_last(p.k_strides)),
        dt,
        r,
        |r| &r.k,
    )?;
    let v = stored(g, uid::V, ([b, kvh, s, d], p.v_strides), dt, r, |r| &r.v)?;

    let raw = g.virtual_f32(&scores)?;
    g.matmul(&q, &kt, &raw, sizes(r, [Side::Q, Side::K, Side::None]))?;
    let scale = g.scalar_f32(uid::SCALE, p.scale())?;
    let scaled = binary(g, PointwiseMode::CUDNN_POINTWISE_MUL, &raw, &scale, &scores)?;
    let scaled = match r {
        Some(r) => length_mask(g, p, &scaled, r)?,
        None => scaled,
    };
    let masked = causal_mask(g, p, &scaled)?;

    let max = g.virtual_f32(&rows)?;
    g.reduction(ReduceOp::CUDNN_REDUCE_TENSOR_MAX, &masked, &max)?;
    let shifted = binary(
        g,
        PointwiseMode::CUDNN_POINTWISE_SUB,
        &masked,
        &max,
        &scores,
    )?;
    let exp = unary(g, PointwiseMode::CUDNN_POINTWISE_EXP, &shifted, &scores)?;
    let sum = g.virtual_f32(&rows)?;
    g.reduction(ReduceOp::CUDNN_REDUCE_TENSOR_ADD, &exp, &sum)?;
    let log_sum = unary(g, PointwiseMode::CUDNN_POINTWISE_LOG, &sum, &rows)?;
    let lse = stored(g, uid::LSE, (rows, p.lse_strides), F32, r, |r| &r.stats)?;
    g.pointwise(
        PointwiseMode::CUDNN_POINTWISE_ADD,
        F32,
        &max,
        Some(&log_sum),
        None,
        &lse,
        None,
    )?;
    // The probabilities feed the second product in the input dtype.
    let probs = g.virtual_of(&scores, dt)?;
    g.pointwise(
        PointwiseMode::CUDNN_POINTWISE_DIV,
        F32,
        &exp,
        Some(&sum),
        None,
        &probs,
        None,
    )?;

    let o = stored(g, uid::O, ([b, h, s, d], p.o_strides), dt, r, |r| &r.o)?;
    g.matmul(&probs, &v, &o, sizes(r, [Side::Q, Side::None, Side::K]))
}

fn backward(g: &mut GraphBuilder, p: &Problem) -> Result<(), GemmError> {
    let dt = p.dtype.cudnn();
    let (b, h, kvh, s, d) = (p.batch, p.heads, p.kv_heads, p.seq, p.head_dim);
    let scores = [b, h, s, s];
    let rows = [b, h, s, 1];
    let heads_full = [b, h, s, d];
    let ragged = Ragged::of(g, p)?;
    let r = ragged.as_ref();
    let q = stored(g, uid::Q, (heads_full, p.q_strides), dt, r, |r| &r.q)?;
    let kt = stored(
        g,
        uid::K,
        ([b, kvh, d, s], swap_last(p.k_strides)),
        dt,
        r,
        |r| &r.k,
    )?;
    let vt = stored(
        g,
        uid::V,
        ([b, kvh, d, s], swap_last(p.v_strides)),
        dt,
        r,
        |r| &r.v,
    )?;
    let o = stored(g, uid::O, (heads_full, p.o_strides), dt, r, |r| &r.o)?;
    let lse = stored(g, uid::LSE, (rows, p.lse_strides), F32, r, |r| &r.stats)?;
    let d_o = stored(g, uid::D_O, (heads_full, p.d_o_strides), dt, r, |r| &r.o)?;
    let scale = g.scalar_f32(uid::SCALE, p.scale())?;
    let one = g.scalar_f32(uid::ONE, 1.0)?;

    // D = Σ_d dO∘O (the frontend's odd strides for this virtual product kept as they are).
    let d_o_o = g.tensor(
        None,
        &heads_full,
        &[h * s * d, s * d, h * d, 1],
        F32,
        Storage::Virtual,
    )?;
    g.pointwise(
        PointwiseMode::CUDNN_POINTWISE_MUL,
        F32,
        &d_o,
        Some(&o),
        None,
        &d_o_o,
        None,
    )?;
    let row_dot = g.virtual_f32(&rows)?;
    g.reduction(ReduceOp::CUDNN_REDUCE_TENSOR_ADD, &d_o_o, &row_dot)?;
    // Ragged: token-major like the LSE; otherwise packed [b, h, s].
    let row_dot_strides = match r {
        Some(_) => p.lse_strides,
        None => p.rows_packed_strides(),
    };
    let row_dot_stored = stored(g, uid::ROW_DOT, (rows, row_dot_strides), F32, r, |r| {
        &r.stats
    })?;
    g.pointwise(
        PointwiseMode::CUDNN_POINTWISE_MUL,
        F32,
        &row_dot,
        Some(&one),
        None,
        &row_dot_stored,
        None,
    )?;

    // P = exp(mask(scale·Q·Kᵀ − LSE)).
    let raw = g.virtual_f32(&scores)?;
    g.matmul(&q, &kt, &raw, sizes(r, [Side::Q, Side::K, Side::None]))?;
    let scaled = binary(g, PointwiseMode::CUDNN_POINTWISE_MUL, &raw, &scale, &scores)?;
    let scaled = match r {
        Some(r) => length_mask(g, p, &scaled, r)?,
        None => scaled,
    };
    let centred = binary(
        g,
        PointwiseMode::CUDNN_POINTWISE_SUB,
        &scaled,
        &lse,
        &scores,
    )?;
    let masked = causal_mask(g, p, &centred)?;
    let probs = unary(g, PointwiseMode::CUDNN_POINTWISE_EXP, &masked, &scores)?;

    // dV = Pᵀ·dO (per query head, then summed over each group).
    let transposed = [b, h, s, s];
    let transposed_strides = [h * s * s, s * s, 1, s];
    let probs_t = g.tensor(None, &transposed, &transposed_strides, dt, Storage::Virtual)?;
    g.reshape(&probs, &probs_t)?;
    let d_v = stored(
        g,
        uid::D_V,
        ([b, kvh, s, d], p.kv_grad_strides()),
        dt,
        r,
        |r| &r.v,
    )?;
    let key_sized = sizes(r, [Side::K, Side::None, Side::Q]);
    head_summed_product(g, p, [&probs_t, &d_o, &d_v], key_sized, Full::V, r)?;

    // dS = P∘(dO·Vᵀ − D)·scale.
    let d_p = g.virtual_f32(&scores)?;
    g.matmul(&d_o, &vt, &d_p, sizes(r, [Side::Q, Side::K, Side::None]))?;
    let d_p_centred = binary(
        g,
        PointwiseMode::CUDNN_POINTWISE_SUB,
        &d_p,
        &row_dot_stored,
        &scores,
    )?;
    let d_p_probs = binary(
        g,
        PointwiseMode::CUDNN_POINTWISE_MUL,
        &d_p_centred,
        &probs,
        &scores,
    )?;
    let d_s = binary(
        g,
        PointwiseMode::CUDNN_POINTWISE_MUL,
        &d_p_probs,
        &scale,
        &scores,
    )?;

    // dK = dSᵀ·Q (per query head, then summed over each group).
    let d_s_t = g.tensor(None, &transposed, &transposed_strides, dt, Storage::Virtual)?;
    g.reshape(&d_s, &d_s_t)?;
    let d_k = stored(
        g,
        uid::D_K,
        ([b, kvh, s, d], p.kv_grad_strides()),
        dt,
        r,
        |r| &r.k,
    )?;
    head_summed_product(g, p, [&d_s_t, &q, &d_k], key_sized, Full::K, r)?;

    // dQ = dS·K, accumulated in f32, then cast.
    let k = g.ragged_tensor(
        None,
        &[b, kvh, s, d],
        &p.k_strides,
        dt,
        Storage::Virtual,
        r.map(|r| &r.k),
    )?;
    g.reshape(&kt, &k)?;
    let d_q_accum = stored(
        g,
        uid::D_Q_ACCUM,
        (heads_full, p.q_grad_strides()),
        F32,
        r,
        |r| &r.q,
    )?;
    g.matmul(
        &d_s,
        &k,
        &d_q_accum,
        sizes(r, [Side::Q, Side::None, Side::K]),
    )?;
    let d_q = stored(g, uid::D_Q, (heads_full, p.q_grad_strides()), dt, r, |r| {
        &r.q
    })?;
    g.pointwise(
        PointwiseMode::CUDNN_POINTWISE_IDENTITY,
        F32,
        &d_q_accum,
        None,
        None,
        &d_q,
        None,
    )
}

/// Which gradient a per-query-head product computes.
#[derive(Clone, Copy)]
enum Full {
    K,
    V,
}

/// `out = a·b` where `a·b` has the query heads and `out` the KV heads: with grouped-query
/// attention the product goes to a per-query-head tensor (input dtype) summed over each group
/// of heads — virtual, or for a ragged problem a real buffer at the KV tensor's offsets (which
/// cuDNN scales by the group size) — otherwise straight to `out`.
fn head_summed_product(
    g: &mut GraphBuilder,
    p: &Problem,
    [a, b, out]: [&TensorRef; 3],
    sizes: [Option<&TensorRef>; 3],
    which: Full,
    ragged: Option<&Ragged>,
) -> Result<(), GemmError> {
    if p.kv_heads == p.heads {
        return g.matmul(a, b, out, sizes);
    }
    let dims = [p.batch, p.heads, p.seq, p.head_dim];
    let full = match ragged {
        Some(r) => {
            let (uid, offsets) = match which {
                Full::K => (uid::D_K_FULL, &r.k),
                Full::V => (uid::D_V_FULL, &r.v),
            };
            g.ragged_tensor(
                Some(uid),
                &dims,
                &p.q_grad_strides(),
                p.dtype.cudnn(),
                Storage::Device,
                Some(offsets),
            )?
        }
        None => g.virtual_of(&dims, p.dtype.cudnn())?,
    };
    g.matmul(a, b, &full, sizes)?;
    g.reduction(ReduceOp::CUDNN_REDUCE_TENSOR_ADD, &full, out)
}
