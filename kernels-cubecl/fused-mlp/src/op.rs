//! The fused LoRA SwiGLU MLP as backend operations: the traits, the weights it takes, and the
//! forward and backward passes composed from GEMMs and the two kernels.

use burn::prelude::*;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata, TensorPrimitive};

/// Whether a GEMM operand is used as stored or transposed (BLAS's `N`/`T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trans {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// One projection of the MLP: frozen base weight plus LoRA factors, in PEFT's layouts.
#[derive(Debug, Clone)]
pub struct LoraProj<T> {
    /// Base weight `W`, `[d_out, d_in]`.
    pub weight: T,
    /// `lora_A`, `[r, d_in]`.
    pub lora_a: T,
    /// `lora_B`, `[d_out, r]`.
    pub lora_b: T,
    /// The LoRA scaling `s`.
    pub scaling: f64,
}

/// The three projections of the LoRA SwiGLU MLP (`D` hidden, `I` intermediate features).
#[derive(Debug, Clone)]
pub struct MlpWeights<T> {
    /// `gate_proj`: `W_g` `[I, D]`, `A_g` `[r, D]`, `B_g` `[I, r]`.
    pub gate: LoraProj<T>,
    /// `up_proj`: `W_u` `[I, D]`, `A_u` `[r, D]`, `B_u` `[I, r]`.
    pub up: LoraProj<T>,
    /// `down_proj`: `W_d` `[D, I]`, `A_d` `[r, I]`, `B_d` `[D, r]`.
    pub down: LoraProj<T>,
}

impl<T> LoraProj<T> {
    pub(crate) fn map<U>(self, mut f: impl FnMut(T) -> U) -> LoraProj<U> {
        LoraProj {
            weight: f(self.weight),
            lora_a: f(self.lora_a),
            lora_b: f(self.lora_b),
            scaling: self.scaling,
        }
    }

    /// Three projections from their nine tensors (each as `[W, A, B]`) and their scalings.
    pub(crate) fn three_from_array(tensors: [T; 9], scalings: [f64; 3]) -> [LoraProj<T>; 3] {
        let mut tensors = tensors.into_iter();
        scalings.map(|scaling| {
            let mut next = || tensors.next().expect("three tensors a projection");
            LoraProj {
                weight: next(),
                lora_a: next(),
                lora_b: next(),
                scaling,
            }
        })
    }

    pub(crate) fn as_ref(&self) -> LoraProj<&T> {
        LoraProj {
            weight: &self.weight,
            lora_a: &self.lora_a,
            lora_b: &self.lora_b,
            scaling: self.scaling,
        }
    }
}

impl<T> MlpWeights<T> {
    /// Applies `f` to the nine tensors (gate, up, down; each W, A, B), keeping the scalings.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> MlpWeights<U> {
        MlpWeights {
            gate: self.gate.map(&mut f),
            up: self.up.map(&mut f),
            down: self.down.map(&mut f),
        }
    }

    /// The same weights by reference.
    pub fn as_ref(&self) -> MlpWeights<&T> {
        MlpWeights {
            gate: self.gate.as_ref(),
            up: self.up.as_ref(),
            down: self.down.as_ref(),
        }
    }

    /// The nine tensors through `f` at once (in [`MlpWeights::into_array`] order), keeping the
    /// scalings.
    pub(crate) fn map_array<U>(self, f: impl FnOnce([T; 9]) -> [U; 9]) -> MlpWeights<U> {
        let scalings = [self.gate.scaling, self.up.scaling, self.down.scaling];
        let [gate, up, down] = LoraProj::three_from_array(f(self.into_array()), scalings);
        MlpWeights { gate, up, down }
    }

    /// The nine tensors in gate, up, down order, each as `[W, A, B]`.
    pub fn into_array(self) -> [T; 9] {
        let [g, u, d] = [self.gate, self.up, self.down];
        [
            g.weight, g.lora_a, g.lora_b, u.weight, u.lora_a, u.lora_b, d.weight, d.lora_a,
            d.lora_b,
        ]
    }
}

/// What the caller reads of the MLP's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputUse {
    /// Its values: every ordinary forward.
    #[default]
    Values,
    /// Only its place in the autodiff graph, never its values: a checkpoint's recompute, whose
    /// layer output is dropped once the incoming gradient has been attached to it, when the MLP
    /// output reaches the layer output through additions only. The op then skips the down
    /// projection (a third of the MLP's forward GEMMs), and the output holds unspecified values.
    /// Its backward is unchanged: it never reads the output.
    GraphOnly,
}

/// Kernel 2's outputs.
#[derive(Debug, Clone)]
pub struct SwigluLoraBackward<T> {
    /// `h = silu(e)·g` recomputed, `[N, I]`.
    pub h: T,
    /// `δe = δh·g·σ(e)·(1 + e·(1 − σ(e)))`, `[N, I]`.
    pub de: T,
    /// `δg = δh·silu(e)`, `[N, I]`.
    pub dg: T,
}

/// The building blocks of the fused MLP on a backend: the GEMM every matrix product goes
/// through, and the two elementwise kernels. Implemented for `CubeBackend<R, F, I, BT>` (feature
/// `cubecl`); the forward and backward passes are written once on top of these.
pub trait FusedMlpKernels: Backend {
    /// `alpha·op(a)·op(b) + acc` (`acc` absent: `+ 0`): the one GEMM entry point, so a vendor
    /// GEMM (cuBLAS) can replace Burn's matmul in one place.
    fn gemm(
        a: FloatTensor<Self>,
        trans_a: Trans,
        b: FloatTensor<Self>,
        trans_b: Trans,
        alpha: f64,
        acc: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self>;

    /// Kernel 1: `h = silu(e)·g`, `e` and `g` `[N, I]` (read only), `h` a new `[N, I]` with
    /// `spare_columns` [spare columns](Self::spare_columns) (for the down projection's
    /// `s·h·Aᵀ` beside it).
    fn swiglu_forward(
        e: FloatTensor<Self>,
        g: FloatTensor<Self>,
        spare_columns: usize,
    ) -> FloatTensor<Self>;

    /// Kernel 2: from `δh`, `e`, `g` (all `[N, I]`), `h` (into `δh`'s buffer), `δe` (into
    /// `e`'s), `δg` (into `g`'s), buffers reused when not shared.
    fn swiglu_lora_backward(
        dh: FloatTensor<Self>,
        e: FloatTensor<Self>,
        g: FloatTensor<Self>,
    ) -> SwigluLoraBackward<FloatTensor<Self>>;

    /// The tensors cast to `dtype` (those already in it returned as they are), in as few
    /// launches as the backend allows: the fused ops cast every LoRA factor on the way in and
    /// every factor's gradient on the way out.
    fn cast_group(tensors: Vec<FloatTensor<Self>>, dtype: DType) -> Vec<FloatTensor<Self>>;

    /// [`cast_group`](Self::cast_group) of `tensors`, and `stacked` (matrices of one width) in
    /// `dtype` one under another in one new matrix, written by the same launches (no
    /// concatenation kernels).
    fn cast_group_with_stack(
        tensors: Vec<FloatTensor<Self>>,
        stacked: Vec<FloatTensor<Self>>,
        dtype: DType,
    ) -> (Vec<FloatTensor<Self>>, FloatTensor<Self>);

    /// Columns past the end of each row of `weight` that its buffer holds for the fused ops
    /// alone: a base weight the model loader stored with room for a LoRA factor beside it
    /// (`kernels::spare_room`), else 0.
    fn spare_columns(weight: &FloatTensor<Self>) -> usize;

    /// Rows below `weight` that its buffer holds for the fused ops alone (as
    /// [`spare_columns`](Self::spare_columns)), else 0.
    fn spare_rows(weight: &FloatTensor<Self>) -> usize;

    /// `x` (`[N, D]`, at least `width` [spare columns](Self::spare_columns)) seen as
    /// `[N, D + width]`: the room's current contents included, nothing written.
    fn with_spare_columns(x: &FloatTensor<Self>, width: usize) -> FloatTensor<Self>;

    /// `alpha·op(a)·op(b)` (`[M, n]`) written into columns `col0..col0 + n` of `out` (`[M, ≥
    /// col0 + n]`, rows stored one after another, e.g. a [`with_spare_columns`] view), every
    /// other element of `out`'s buffer left as it was: a product placed beside other data
    /// without a concatenation.
    ///
    /// [`with_spare_columns`]: Self::with_spare_columns
    #[allow(clippy::too_many_arguments)]
    fn gemm_into_columns(
        a: FloatTensor<Self>,
        trans_a: Trans,
        b: FloatTensor<Self>,
        trans_b: Trans,
        alpha: f64,
        out: &FloatTensor<Self>,
        col0: usize,
    );

    /// `weight` (`[d_out, d_in]`, at least `width` [spare columns](Self::spare_columns)) seen
    /// as `[d_out, d_in + width]`, after writing `factor` (`[d_out, r]`) into the spare columns
    /// `at..at + r` and zeros into the rest of the first `width`.
    fn widen(
        weight: &FloatTensor<Self>,
        factor: FloatTensor<Self>,
        at: usize,
        width: usize,
    ) -> FloatTensor<Self>;

    /// `weight` (`[d_out, d_in]`, at least `height` [spare rows](Self::spare_rows)) seen as
    /// `[d_out + height, d_in]`, after writing `factor` (`[r, d_in]`) into the spare rows
    /// `at..at + r` and zeros into the rest of the first `height`.
    fn lengthen(
        weight: &FloatTensor<Self>,
        factor: FloatTensor<Self>,
        at: usize,
        height: usize,
    ) -> FloatTensor<Self>;
}

/// A backend that runs the LoRA SwiGLU MLP as one fused operation.
///
/// Implemented for `CubeBackend<R, F, I, BT>` (feature `cubecl`; forward only) and for
/// `Autodiff<B>` over any [`FusedMlpKernels`] backend (forward plus a hand-written backward that
/// saves only `x`, `e`, `g`).
pub trait FusedMlpBackend: Backend {
    /// `y = h·W_dᵀ + s_d·(h·A_dᵀ)·B_dᵀ` with `h = silu(e)·g`, `e`/`g` the gate/up LoRA
    /// projections of `x`.
    ///
    /// `x` is `[N, D]`, the output `[N, D]` in `x`'s dtype. Weights of another dtype (f32 LoRA
    /// factors under bf16 activations) are cast to `x`'s for the products, all in one group, and
    /// their gradients come back in their own dtype. Gradients flow to `x` and to every tracked
    /// weight (base weights are normally frozen and get none). With [`OutputUse::GraphOnly`]
    /// the output's values are unspecified.
    fn fused_lora_mlp(
        x: FloatTensor<Self>,
        weights: MlpWeights<FloatTensor<Self>>,
        output: OutputUse,
    ) -> FloatTensor<Self>;
}

/// What the backward pass needs from the forward: `x` and the pre-activations `e`, `g` (not `h`,
/// which kernel 2 recomputes), plus the weights.
#[derive(Debug, Clone)]
pub(crate) struct Saved<T> {
    pub x: T,
    pub e: T,
    pub g: T,
    pub weights: MlpWeights<T>,
}

/// The weights in `dtype`, the ones of other dtypes cast in one group.
pub(crate) fn weights_in<B: FusedMlpKernels>(
    w: MlpWeights<FloatTensor<B>>,
    dtype: DType,
) -> MlpWeights<FloatTensor<B>> {
    w.map_array(|all| crate::cast::all_in::<B, 9>(all, dtype))
}

/// The forward pass on primitives: `y` (unspecified values under [`OutputUse::GraphOnly`]) and
/// what the backward needs.
pub(crate) fn forward<B: FusedMlpKernels>(
    x: FloatTensor<B>,
    w: MlpWeights<FloatTensor<B>>,
    output: OutputUse,
) -> (FloatTensor<B>, Saved<FloatTensor<B>>) {
    use Trans::{N, T};
    let device = B::float_device(&x);
    let phase = |name, f: &mut dyn FnMut()| phase_timing::phase::<B, _>(name, &device, f);
    let (e, g) = match spare_column_width::<B>(&w) {
        Some(width) => gate_up_in_spare_columns::<B>(&x, &w, width, &phase),
        None => gate_up_accumulated::<B>(&x, &w, &phase),
    };
    let y = match output {
        OutputUse::GraphOnly => {
            let [n, _] = x.shape().dims();
            let hidden = w.down.weight.shape().dims::<2>()[0];
            B::float_empty([n, hidden].into(), &device, x.dtype().into())
        }
        OutputUse::Values => {
            let d = &w.down;
            // y = [h | s_d·h·A_dᵀ]·[W_d | B_d]ᵀ when W_d has room for B_d beside it (h then
            // gets room for its LoRA columns too), else the rank-r product accumulated.
            let r_d = rank::<B>(d);
            let fold = B::spare_columns(&d.weight) >= r_d;
            let mut h = None;
            phase("fwd 3 kernel 1 (SwiGLU)", &mut || {
                let spare = if fold { r_d } else { 0 };
                h = Some(B::swiglu_forward(e.clone(), g.clone(), spare));
            });
            let h = h.expect("set above");
            let mut y = None;
            phase("fwd 4 down GEMMs", &mut || {
                y = Some(match fold {
                    true => {
                        let i = h.shape().dims::<2>()[1];
                        let h_wide = B::with_spare_columns(&h, r_d);
                        let a_d = d.lora_a.clone();
                        B::gemm_into_columns(h.clone(), N, a_d, T, d.scaling, &h_wide, i);
                        let w_wide = B::widen(&d.weight, d.lora_b.clone(), 0, r_d);
                        B::gemm(h_wide, N, w_wide, T, 1.0, None)
                    }
                    false => {
                        let ha = B::gemm(h.clone(), N, d.lora_a.clone(), T, d.scaling, None);
                        let base = B::gemm(h.clone(), N, d.weight.clone(), T, 1.0, None);
                        B::gemm(ha, N, d.lora_b.clone(), T, 1.0, Some(base))
                    }
                });
            });
            y.expect("set above")
        }
    };
    let saved = Saved {
        x,
        e,
        g,
        weights: w,
    };
    (y, saved)
}

/// A projection's LoRA rank.
fn rank<B: Backend>(p: &LoraProj<FloatTensor<B>>) -> usize {
    p.lora_a.shape().dims::<2>()[0]
}

/// The spare columns both gate and up weights need for their LoRA factors side by side
/// (`r_g + r_u`), when both have that many ([`FusedMlpKernels::spare_columns`]).
fn spare_column_width<B: FusedMlpKernels>(w: &MlpWeights<FloatTensor<B>>) -> Option<usize> {
    let width = rank::<B>(&w.gate) + rank::<B>(&w.up);
    let room = B::spare_columns(&w.gate.weight).min(B::spare_columns(&w.up.weight));
    (room >= width).then_some(width)
}

/// `e`, `g` as one GEMM each over a longer inner dimension, the LoRA factors written into the
/// weights' spare columns:
///
/// ```text
/// x⁺ = [x | s_u·x·A_uᵀ | s_g·x·A_gᵀ]            [N, D + r_u + r_g]
/// e  = x⁺·[W_g | 0 | B_g]ᵀ,   g = x⁺·[W_u | B_u | 0]ᵀ
/// ```
///
/// A copy of `x` (`[N, D]`) replaces a write and a read of `[N, I]` for each of `e` and `g`.
fn gate_up_in_spare_columns<B: FusedMlpKernels>(
    x: &FloatTensor<B>,
    w: &MlpWeights<FloatTensor<B>>,
    width: usize,
    phase: &dyn Fn(&'static str, &mut dyn FnMut()),
) -> (FloatTensor<B>, FloatTensor<B>) {
    use Trans::{N, T};
    let (gate, up) = (&w.gate, &w.up);
    let r_u = rank::<B>(up);
    let mut x_wide = None;
    phase("fwd 1 gate/up x·Aᵀ", &mut || {
        x_wide = Some(match B::spare_columns(x) >= width {
            // The norm left room after each row of x: the two products go straight there.
            true => {
                let d = x.shape().dims::<2>()[1];
                let wide = B::with_spare_columns(x, width);
                let (a_u, a_g) = (up.lora_a.clone(), gate.lora_a.clone());
                B::gemm_into_columns(x.clone(), N, a_u, T, up.scaling, &wide, d);
                B::gemm_into_columns(x.clone(), N, a_g, T, gate.scaling, &wide, d + r_u);
                wide
            }
            false => {
                let xa_u = B::gemm(x.clone(), N, up.lora_a.clone(), T, up.scaling, None);
                let xa_g = B::gemm(x.clone(), N, gate.lora_a.clone(), T, gate.scaling, None);
                B::float_cat(vec![x.clone(), xa_u, xa_g], 1)
            }
        });
    });
    let x_wide = x_wide.expect("set above");
    let (mut e, mut g) = (None, None);
    phase("fwd 2 gate/up GEMMs (LoRA in spare columns)", &mut || {
        let w_g = B::widen(&gate.weight, gate.lora_b.clone(), r_u, width);
        let w_u = B::widen(&up.weight, up.lora_b.clone(), 0, width);
        e = Some(B::gemm(x_wide.clone(), N, w_g, T, 1.0, None));
        g = Some(B::gemm(x_wide.clone(), N, w_u, T, 1.0, None));
    });
    (e.expect("set above"), g.expect("set above"))
}

/// `e`, `g` with the rank-r products written first and the base GEMMs accumulating onto them
/// (β = 1): the LoRA term costs one pass over `[N, I]` and no extra buffer.
fn gate_up_accumulated<B: FusedMlpKernels>(
    x: &FloatTensor<B>,
    w: &MlpWeights<FloatTensor<B>>,
    phase: &dyn Fn(&'static str, &mut dyn FnMut()),
) -> (FloatTensor<B>, FloatTensor<B>) {
    use Trans::{N, T};
    let (mut xa_g, mut xa_u) = (None, None);
    phase("fwd 1 gate/up x·Aᵀ", &mut || {
        xa_g = Some(B::gemm(x.clone(), N, w.gate.lora_a.clone(), T, 1.0, None));
        xa_u = Some(B::gemm(x.clone(), N, w.up.lora_a.clone(), T, 1.0, None));
    });
    let (mut e, mut g) = (None, None);
    phase("fwd 2 gate/up GEMMs (LoRA-B, then base)", &mut || {
        let (gate, up) = (&w.gate, &w.up);
        let lora_e = B::gemm(
            xa_g.take().expect("set above"),
            N,
            gate.lora_b.clone(),
            T,
            gate.scaling,
            None,
        );
        e = Some(B::gemm(
            x.clone(),
            N,
            gate.weight.clone(),
            T,
            1.0,
            Some(lora_e),
        ));
        let lora_g = B::gemm(
            xa_u.take().expect("set above"),
            N,
            up.lora_b.clone(),
            T,
            up.scaling,
            None,
        );
        g = Some(B::gemm(
            x.clone(),
            N,
            up.weight.clone(),
            T,
            1.0,
            Some(lora_g),
        ));
    });
    (e.expect("set above"), g.expect("set above"))
}

/// The backward pass on primitives, given `dy = dL/dy` `[N, D]`.
///
/// `need` flags, in [`MlpWeights::into_array`] order after `x`, which gradients to compute; the
/// result holds them in the same order (`None` where not needed):
///
/// ```text
/// δh   = G·W_d + s_d·(G·B_d)·A_d
/// h, δe, δg = kernel 2 (δh, e, g)
/// dA_d = s_d·(G·B_d)ᵀ·h        dB_d = s_d·Gᵀ·(h·A_dᵀ)        dW_d = Gᵀ·h
/// dA_u = s_u·(δg·B_u)ᵀ·x       dB_u = s_u·δgᵀ·(x·A_uᵀ)       dW_u = δgᵀ·x
/// dA_g = s_g·(δe·B_g)ᵀ·x       dB_g = s_g·δeᵀ·(x·A_gᵀ)       dW_g = δeᵀ·x
/// dx   = δe·W_g + δg·W_u + s_g·(δe·B_g)·A_g + s_u·(δg·B_u)·A_u
/// ```
pub(crate) fn backward<B: FusedMlpKernels>(
    dy: FloatTensor<B>,
    saved: Saved<FloatTensor<B>>,
    need: [bool; 10],
) -> [Option<FloatTensor<B>>; 10] {
    use Trans::{N, T};
    let Saved { x, e, g, weights } = saved;
    let [need_x, ng0, ng1, ng2, nu0, nu1, nu2, nd0, nd1, nd2] = need;
    let MlpWeights { gate, up, down } = weights;
    let mut out: [Option<FloatTensor<B>>; 10] = Default::default();

    let device = B::float_device(&dy);
    let phase = |name, f: &mut dyn FnMut()| phase_timing::phase::<B, _>(name, &device, f);

    // δh = G·W_d + s_d·(G·B_d)·A_d, as [G | s_d·G·B_d]·[W_d ; A_d] when W_d has room for A_d
    // below it. gb_d = s_d·G·B_d either way.
    let (mut gb_d, mut dh) = (None, None);
    phase("bwd 1 δh GEMMs", &mut || {
        let gb = B::gemm(dy.clone(), N, down.lora_b.clone(), N, down.scaling, None);
        let r_d = rank::<B>(&down);
        dh = Some(match B::spare_rows(&down.weight) >= r_d {
            true => {
                let dy_wide = B::float_cat(vec![dy.clone(), gb.clone()], 1);
                let w_tall = B::lengthen(&down.weight, down.lora_a.clone(), 0, r_d);
                B::gemm(dy_wide, N, w_tall, N, 1.0, None)
            }
            false => {
                let base = B::gemm(dy.clone(), N, down.weight.clone(), N, 1.0, None);
                B::gemm(gb.clone(), N, down.lora_a.clone(), N, 1.0, Some(base))
            }
        });
        gb_d = Some(gb);
    });
    let gb_d = gb_d.expect("set above");
    let mut bwd = None;
    let (mut e, mut g) = (Some(e), Some(g));
    phase("bwd 2 kernel 2 (h, δe, δg)", &mut || {
        bwd = Some(B::swiglu_lora_backward(
            dh.take().expect("set above"),
            e.take().expect("moved once"),
            g.take().expect("moved once"),
        ))
    });
    let SwigluLoraBackward { h, de, dg } = bwd.expect("set above");

    phase("bwd 3 down_proj gradients", &mut || {
        if nd1 {
            out[8] = Some(B::gemm(gb_d.clone(), T, h.clone(), N, 1.0, None));
        }
        if nd2 {
            let ha = B::gemm(h.clone(), N, down.lora_a.clone(), T, 1.0, None);
            out[9] = Some(B::gemm(dy.clone(), T, ha, N, down.scaling, None));
        }
        if nd0 {
            out[7] = Some(B::gemm(dy.clone(), T, h.clone(), N, 1.0, None));
        }
    });

    // gate_proj with δe, up_proj with δg; dx accumulates over both.
    let mut dx = None;
    for (proj, delta, [need_w, need_a, need_b], first) in
        [(gate, de, [ng0, ng1, ng2], 1), (up, dg, [nu0, nu1, nu2], 4)]
    {
        let mut db = None;
        phase("bwd 4 gate/up LoRA gradients", &mut || {
            db = (need_a || need_x)
                .then(|| B::gemm(delta.clone(), N, proj.lora_b.clone(), N, 1.0, None));
            if need_a {
                let db = db.clone().expect("computed when needed");
                out[first + 1] = Some(B::gemm(db, T, x.clone(), N, proj.scaling, None));
            }
            if need_b {
                let xa = B::gemm(x.clone(), N, proj.lora_a.clone(), T, 1.0, None);
                out[first + 2] = Some(B::gemm(delta.clone(), T, xa, N, proj.scaling, None));
            }
            if need_w {
                out[first] = Some(B::gemm(delta.clone(), T, x.clone(), N, 1.0, None));
            }
        });
        if need_x {
            phase("bwd 5 dx GEMMs", &mut || {
                let acc = B::gemm(delta.clone(), N, proj.weight.clone(), N, 1.0, dx.take());
                let db = db.clone().expect("computed when needed");
                dx = Some(B::gemm(
                    db,
                    N,
                    proj.lora_a.clone(),
                    N,
                    proj.scaling,
                    Some(acc),
                ));
            });
        }
    }
    out[0] = dx;
    out
}

/// The fused LoRA SwiGLU MLP on `[N, D]` activations: [`FusedMlpBackend::fused_lora_mlp`] with
/// shape checks. The op uses the weights in `x`'s dtype as Unsloth does, and gives each weight's
/// gradient in that weight's own dtype. With [`OutputUse::GraphOnly`] the output's values are
/// unspecified.
///
/// # Panics
/// If the shapes disagree (see [`MlpWeights`]).
pub fn fused_lora_mlp_2d<B: FusedMlpBackend>(
    x: Tensor<B, 2>,
    weights: MlpWeights<Tensor<B, 2>>,
    output: OutputUse,
) -> Tensor<B, 2> {
    check_shapes(x.dims(), &weights.as_ref().map(|t| t.dims()));
    let weights = weights.map(|t| t.into_primitive().tensor());
    let y = B::fused_lora_mlp(x.into_primitive().tensor(), weights, output);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

fn check_shapes(x: [usize; 2], w: &MlpWeights<[usize; 2]>) {
    let [_, d] = x;
    let i = w.gate.weight[0];
    let expect = |name: &str, got: [usize; 2], want: [usize; 2]| {
        assert_eq!(
            got, want,
            "fused LoRA MLP: `{name}` has shape {got:?}, expected {want:?}"
        );
    };
    for (name, p, d_in, d_out) in [
        ("gate", &w.gate, d, i),
        ("up", &w.up, d, i),
        ("down", &w.down, i, d),
    ] {
        let r = p.lora_a[0];
        expect(&format!("{name}.weight"), p.weight, [d_out, d_in]);
        expect(&format!("{name}.lora_a"), p.lora_a, [r, d_in]);
        expect(&format!("{name}.lora_b"), p.lora_b, [d_out, r]);
    }
}
