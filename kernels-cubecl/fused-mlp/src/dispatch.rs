//! Choosing the fused or the portable MLP for a model generic over `B: Backend`.
//!
//! The model crates are generic over any Burn backend and must stay so (the CPU default has no
//! CubeCL). Burn 0.21 has no backend-extension dispatch and Rust has no specialization, so a
//! `B: FusedMlpBackend` bound would have to spread through every generic function of the
//! facade. Instead [`mlp`] compares `B` at run time (`TypeId`) with the concrete backends the
//! fused op is compiled for (the features `cuda` and `wgpu` add them), moves the tensors and
//! projections into that type through `Any` (a no-op move, never a copy or a conversion), runs
//! the fused op, and moves the result back. Every other backend, and every MLP that
//! [`check_fusable`] rejects, runs [`lora_mlp`].

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::*;
use lora_layers::LoraLinear;

use crate::{OutputUse, check_fusable, lora_mlp};

/// Runs `$body` with `$FB` bound to the fused backend type equal to `$B`, if any; else `None`.
macro_rules! for_fused_backends {
    ($B:ty, |$FB:ident| $body:expr) => {{
        #[allow(unused_mut)]
        let mut result = None;
        let id = std::any::TypeId::of::<$B>();
        #[cfg(feature = "cuda")]
        {
            type Cuda32 = crate::CudaBackend<f32>;
            type Cuda16 = crate::CudaBackend<burn::tensor::bf16>;
            type CudaAd32 = burn::backend::Autodiff<Cuda32>;
            type CudaAd16 = burn::backend::Autodiff<Cuda16>;
            if result.is_none() && id == std::any::TypeId::of::<CudaAd32>() {
                type $FB = CudaAd32;
                result = $body;
            }
            if result.is_none() && id == std::any::TypeId::of::<CudaAd16>() {
                type $FB = CudaAd16;
                result = $body;
            }
            if result.is_none() && id == std::any::TypeId::of::<Cuda32>() {
                type $FB = Cuda32;
                result = $body;
            }
            if result.is_none() && id == std::any::TypeId::of::<Cuda16>() {
                type $FB = Cuda16;
                result = $body;
            }
        }
        #[cfg(feature = "wgpu")]
        {
            type Wgpu32 = crate::WgpuBackend<f32>;
            type WgpuAd32 = burn::backend::Autodiff<Wgpu32>;
            if result.is_none() && id == std::any::TypeId::of::<WgpuAd32>() {
                type $FB = WgpuAd32;
                result = $body;
            }
            if result.is_none() && id == std::any::TypeId::of::<Wgpu32>() {
                type $FB = Wgpu32;
                result = $body;
            }
        }
        let _ = id;
        result
    }};
}

/// Whether [`mlp`] may take the fused path (on by default). Tests and benchmarks switch it off
/// to run the portable path on the same backend, as the oracle or the baseline.
static FUSED_ENABLED: AtomicBool = AtomicBool::new(true);

/// Allows or forbids the fused path process-wide (it is allowed by default).
pub fn set_fused_enabled(enabled: bool) {
    FUSED_ENABLED.store(enabled, Ordering::SeqCst);
}

/// Whether the fused path is allowed (see [`set_fused_enabled`]).
pub fn fused_enabled() -> bool {
    FUSED_ENABLED.load(Ordering::SeqCst)
}

/// A process-wide lock for code that flips the switches ([`set_fused_enabled`],
/// [`set_graph_only_enabled`], flash-attention's) and for code that must not run while they are
/// flipped: the tests of one test binary run on parallel threads, and a test that turns fusing
/// off for its reference run would change the path a concurrent test takes (a concurrent
/// checkpoint recompute would find the fast attention its forward chose switched off). Each such
/// test holds it for its whole run.
pub fn switch_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that panicked while holding it left the switches as they were; the lock itself
    // protects no data.
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether [`mlp`] honours [`OutputUse::GraphOnly`] (on by default). Benchmarks switch it off to
/// time the full recompute Unsloth runs.
static GRAPH_ONLY_ENABLED: AtomicBool = AtomicBool::new(true);

/// Allows or forbids skipping unread MLP outputs process-wide (allowed by default): when
/// forbidden, [`mlp`] computes the values under [`OutputUse::GraphOnly`] too.
pub fn set_graph_only_enabled(enabled: bool) {
    GRAPH_ONLY_ENABLED.store(enabled, Ordering::SeqCst);
}

/// Whether backend `B` is one the fused ops are compiled for in this build.
pub fn fused_backend<B: Backend>() -> bool {
    let probe: Option<()> = for_fused_backends!(B, |_FB| Some(()));
    probe.is_some()
}

/// The LoRA SwiGLU MLP, fused when the backend and the projections allow it, else portable;
/// the same result either way (within the backend's float rounding). `output` says whether the
/// caller reads the output's values: under [`OutputUse::GraphOnly`] the fused op skips the down
/// projection and its output holds unspecified values (the portable path computes them anyway).
///
/// # Shapes
/// - x: `[..., hidden]` (rows `[tokens, hidden]` keep a strided layout, see
///   [`crate::fused_lora_mlp`]: the decoder layer passes its norm's output with room as rows)
/// - output: `[..., hidden]`
// Without a fused backend compiled in (no `cuda`/`wgpu` feature) the dispatch has no arm.
#[cfg_attr(
    not(any(feature = "cuda", feature = "wgpu")),
    allow(unused_mut, unused_variables)
)]
pub fn mlp<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gate: &LoraLinear<B>,
    up: &LoraLinear<B>,
    down: &LoraLinear<B>,
    output: OutputUse,
) -> Tensor<B, D> {
    if !fused_enabled() || check_fusable(gate, up, down).is_err() {
        return lora_mlp(x, gate, up, down);
    }
    let output = match GRAPH_ONLY_ENABLED.load(Ordering::SeqCst) {
        true => output,
        false => OutputUse::Values,
    };
    let mut x = Some(x);
    let fused: Option<Tensor<B, D>> = for_fused_backends!(B, |FB| {
        let x: Tensor<FB, D> = cast(x.take().expect("taken once"));
        let gate: &LoraLinear<FB> = cast_ref(gate);
        let up: &LoraLinear<FB> = cast_ref(up);
        let down: &LoraLinear<FB> = cast_ref(down);
        let y = crate::fused_lora_mlp::<FB, D>(x, gate, up, down, output)
            .expect("checked by check_fusable");
        Some(cast::<Tensor<FB, D>, Tensor<B, D>>(y))
    });
    match fused {
        Some(y) => y,
        None => lora_mlp(x.expect("not taken"), gate, up, down),
    }
}

/// The spare columns [`mlp`]'s input should carry ([`rms_norm_with_room`]) for the fused op to
/// place its gate and up `x·Aᵀ` terms beside `x`: `r_gate + r_up` when the fused path will run
/// (see [`mlp`]), else 0.
pub fn mlp_input_room<B: Backend>(
    gate: &LoraLinear<B>,
    up: &LoraLinear<B>,
    down: &LoraLinear<B>,
) -> usize {
    if !fused_enabled() || !fused_backend::<B>() || check_fusable(gate, up, down).is_err() {
        return 0;
    }
    [gate, up]
        .iter()
        .filter_map(|p| p.adapter.as_ref())
        .map(|a| a.lora_a.dims()[0])
        .sum()
}

/// A [`LoraLinear`] projection through [`crate::FusedLinearBackend`] (cuBLAS GEMMs on CUDA, a
/// hand-written backward) on the backends it is compiled for, else [`LoraLinear::forward`]; the
/// same result either way (within the backend's float rounding).
///
/// The portable path is taken when fusing is switched off ([`set_fused_enabled`]) or the
/// adapter applies dropout (the op has no dropout). A merged adapter is inside the base weight,
/// and a base bias is added after the op.
///
/// # Shapes
/// - x: `[..., d_input]`
/// - output: `[..., d_output]`
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_mut))]
pub fn linear<B: Backend, const D: usize>(x: Tensor<B, D>, proj: &LoraLinear<B>) -> Tensor<B, D> {
    let live_adapter = proj.adapter.as_ref().filter(|a| !a.merged);
    if !fused_enabled() || live_adapter.is_some_and(|a| a.dropout.prob != 0.0) {
        return proj.forward(x);
    }
    let mut x = Some(x);
    let fused: Option<Tensor<B, D>> = for_fused_backends!(B, |FB| {
        let x: Tensor<FB, D> = cast(x.take().expect("taken once"));
        let proj: &LoraLinear<FB> = cast_ref(proj);
        let lora = proj
            .adapter
            .as_ref()
            .filter(|a| !a.merged)
            .map(|a| (a.lora_a.val(), a.lora_b.val(), a.scaling));
        let mut y = crate::fused_linear_nd::<FB, D>(x, proj.base_weight(), lora);
        if let Some(bias) = &proj.bias {
            let bias = bias.val();
            let bias = if bias.dtype() == y.dtype() {
                bias
            } else {
                bias.cast(y.dtype())
            };
            y = y + bias.unsqueeze();
        }
        Some(cast::<Tensor<FB, D>, Tensor<B, D>>(y))
    });
    match fused {
        Some(y) => y,
        None => proj.forward(x.expect("not taken")),
    }
}

/// The q, k and v projections of `x`: one op ([`crate::FusedQkvBackend`], cuBLAS GEMMs on
/// CUDA, a backward that accumulates `dx` once) on the backends it is compiled for when
/// [`crate::check_qkv_fusable`] allows, else one [`linear`] per projection; the same result
/// either way (within the backend's float rounding).
///
/// # Shapes
/// - x: `[..., d_input]`
/// - returns `[..., d_q]`, `[..., d_k]`, `[..., d_v]`
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_mut))]
pub fn qkv<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    q: &LoraLinear<B>,
    k: &LoraLinear<B>,
    v: &LoraLinear<B>,
) -> [Tensor<B, D>; 3] {
    let separate = |x: Tensor<B, D>| [q, k, v].map(|p| linear(x.clone(), p));
    if !fused_enabled() || crate::check_qkv_fusable(q, k, v).is_err() {
        return separate(x);
    }
    let mut x = Some(x);
    let fused: Option<[Tensor<B, D>; 3]> = for_fused_backends!(B, |FB| {
        let x: Tensor<FB, D> = cast(x.take().expect("taken once"));
        let proj = |p: &LoraLinear<B>| crate::lora_proj(cast_ref::<_, LoraLinear<FB>>(p));
        let weights = crate::QkvWeights {
            q: proj(q),
            k: proj(k),
            v: proj(v),
        };
        let ys = crate::fused_lora_qkv_nd::<FB, D>(x, weights);
        Some(ys.map(cast::<Tensor<FB, D>, Tensor<B, D>>))
    });
    match fused {
        Some(ys) => ys,
        None => separate(x.expect("not taken")),
    }
}

/// RMSNorm over the last dimension with a frozen gain: one kernel forward and one backward
/// ([`crate::RmsNormBackend`]) on the backends the fused ops are compiled for, else
/// [`crate::rms_norm_portable`]; the same result either way (within float rounding).
///
/// The portable path is taken when fusing is switched off, the gain requires grad (a norm in
/// `modules_to_save`) or its dtype differs from `x`'s.
///
/// # Shapes
/// - x: `[..., H]`; weight: `[H]`
/// - output: `[..., H]`
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    rms_norm_with_room(x, weight, eps, 0)
}

/// [`rms_norm`] whose output, on the fused path, is stored with `spare_columns` columns of room
/// after each row for the fused MLP it feeds ([`mlp_input_room`]): the MLP then writes its
/// `s·x·Aᵀ` terms there and runs gate and up over `[x | s_u·x·A_uᵀ | s_g·x·A_gᵀ]` without
/// copying `x`. The values are those of [`rms_norm`]; the portable path ignores the room.
///
/// # Shapes
/// As [`rms_norm`].
#[cfg_attr(
    not(any(feature = "cuda", feature = "wgpu")),
    allow(unused_mut, unused_variables)
)]
pub fn rms_norm_with_room<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
    spare_columns: usize,
) -> Tensor<B, D> {
    if !fused_enabled() || weight.is_require_grad() || weight.dtype() != x.dtype() {
        return crate::rms_norm_portable(x, weight, eps);
    }
    let mut inputs = Some((x, weight));
    let fused: Option<Tensor<B, D>> = for_fused_backends!(B, |FB| {
        let (x, weight) = inputs.take().expect("taken once");
        let dims = x.dims();
        let hidden = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let x: Tensor<FB, D> = cast(x);
        let weight: Tensor<FB, 1> = cast(weight);
        let x = x.reshape([rows, hidden]).into_primitive().tensor();
        let weight = weight.into_primitive().tensor();
        let y = <FB as crate::RmsNormBackend>::rms_norm(x, weight, eps, spare_columns);
        let y = Tensor::<FB, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(y));
        Some(cast::<Tensor<FB, D>, Tensor<B, D>>(y.reshape(dims)))
    });
    match fused {
        Some(y) => y,
        None => {
            let (x, weight) = inputs.expect("not taken");
            crate::rms_norm_portable(x, weight, eps)
        }
    }
}

/// Rotary position embedding of `x` with the tables `cos`/`sin` (rows = positions of `x`, one
/// set shared by the batch or one per batch row): the fused op ([`crate::RopeBackend`], one
/// kernel each way) on the backends it is compiled for while [`fused_enabled`], else
/// [`crate::rope_portable`].
///
/// # Shapes
/// - x: `[b, h, s, d]`; cos, sin: `[1, s, d]` or `[b, s, d]` (any float dtype; the kernel reads
///   them as f32)
/// - returns `[b, h, s, d]`
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_mut))]
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>) -> Tensor<B, 4> {
    if !fused_enabled() {
        return crate::rope_portable(x, cos, sin);
    }
    let mut inputs = Some((x, cos, sin));
    let fused: Option<Tensor<B, 4>> = for_fused_backends!(B, |FB| {
        let (x, cos, sin) = inputs.take().expect("taken once");
        let table = |t: Tensor<B, 3>| {
            cast::<Tensor<B, 3>, Tensor<FB, 3>>(t.cast(burn::tensor::DType::F32))
                .into_primitive()
                .tensor()
        };
        let (cos, sin) = (table(cos), table(sin));
        let x: Tensor<FB, 4> = cast(x);
        let y = <FB as crate::RopeBackend>::rope(x.into_primitive().tensor(), cos, sin);
        let y = Tensor::<FB, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(y));
        Some(cast::<Tensor<FB, 4>, Tensor<B, 4>>(y))
    });
    match fused {
        Some(y) => y,
        None => {
            let (x, cos, sin) = inputs.expect("not taken");
            crate::rope_portable(x, cos, sin)
        }
    }
}

/// Moves `value` into the type `U`, which the caller has checked is `T` itself.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<U>()
        .unwrap_or_else(|_| unreachable!("TypeId checked before the cast"))
}

/// Views `value` as `&U`, which the caller has checked is `T` itself.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn cast_ref<T: 'static, U: 'static>(value: &T) -> &U {
    (value as &dyn Any)
        .downcast_ref::<U>()
        .unwrap_or_else(|| unreachable!("TypeId checked before the cast"))
}
