//! Layer-level gradient checkpointing: a decoder layer keeps only its input for backward and is
//! recomputed there (Unsloth's `use_gradient_checkpointing`).
//!
//! [`checkpoint`] runs one layer under a [`CheckpointMode`]. Under [`CheckpointMode::Recompute`]
//! and [`CheckpointMode::HostOffload`] the layer's forward records no autodiff graph (none of its
//! activations outlives the call); one graph node stands for the layer and keeps its input. In
//! backward that node recomputes the layer with a graph and back-propagates the incoming
//! gradient through it, giving the gradient of the input and of every parameter of the layer
//! that requires grad (the LoRA factors; frozen weights get none, as without checkpointing).
//! The recompute runs the same operations on the same values, so on the CPU the gradients are
//! bitwise those of [`CheckpointMode::Off`].
//!
//! # Dropout
//!
//! Burn's backends keep their RNG state private (Burn 0.21 can set a seed but not read one), so
//! the state before a layer cannot be saved and restored. Instead every [`checkpoint`] call on an
//! autodiff backend, in every mode including `Off`, reseeds the backend with the next value of a
//! per-thread stream of layer seeds before running the layer, and the recompute sets the same
//! seed again: dropout masks are identical in the forward, in the recompute, and across the three
//! modes. [`seed_layers`] restarts the stream (the same seed gives the same masks). A side effect
//! is that the backend RNG, after a training forward, is a function of that stream rather than of
//! an earlier `Backend::seed`.
//!
//! # Backends
//!
//! The op needs the concrete `Autodiff<I, C>` type; the generic model reaches it by comparing
//! `TypeId`s with the autodiff backends this build knows ([`is_supported`]): the CPU default
//! `Autodiff<NdArray<f32>>` always, CUDA (f32, bf16, f16) with the feature `cuda`, wgpu (f32)
//! with `wgpu`. On any other autodiff backend the layer runs without checkpointing (identical
//! gradients, all activations kept) and a warning is logged once. On a backend without autodiff
//! there is nothing to keep and the layer simply runs.
//!
//! # Status
//!
//! Recompute and host offload work and are tested on the CPU (gradients and losses bitwise equal
//! to `Off`, with and without dropout) and run on CUDA (`fastlora bench`). On CUDA (feature
//! `cuda`) the offload copies the layer input into pinned host memory and back with
//! `cuMemcpy*Async` on a copy stream beside the compute stream, ordered with it by events
//! (`fastlora_cuda_gemm::copy_to_host` / `copy_to_device`): no host waits, the copies overlap
//! the kernels, and each layer's backward starts bringing back the previous layer's input
//! (double buffering: one layer input ahead). Elsewhere it is Burn's `into_data` / `from_data`
//! round trip, which blocks (on the CPU the tensor simply stays in host memory). The last
//! decoder layer ([`CheckpointMode::for_last_layer`]) and inputs under [`OFFLOAD_MIN_BYTES`] are
//! not offloaded.
//! The recompute runs on a helper thread that issues its work on the caller's CubeCL stream.
//! Parameters shared between layers get correct but not bitwise-identical gradients (their
//! contributions are summed in another order).

mod dispatch;
mod op;

use std::cell::Cell;
use std::sync::Once;

use burn::module::Module;
use burn::prelude::*;

/// What a decoder layer keeps for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointMode {
    /// Keep every activation (`use_gradient_checkpointing=False`).
    #[default]
    Off,
    /// Keep the layer input on the device and recompute the layer in backward (`True`).
    Recompute,
    /// Keep the layer input in host memory and recompute the layer in backward (`"unsloth"`).
    /// Inputs smaller than [`OFFLOAD_MIN_BYTES`] stay on the device (see the crate docs for how
    /// the copies run).
    HostOffload,
}

/// Layer inputs smaller than this stay on the device under [`CheckpointMode::HostOffload`]: the
/// round trip would cost more than the memory is worth (Unsloth skips small tensors too).
pub const OFFLOAD_MIN_BYTES: usize = 1 << 20;

impl CheckpointMode {
    /// The mode for the last decoder layer: [`CheckpointMode::HostOffload`] becomes
    /// [`CheckpointMode::Recompute`], since the backward reaches that layer's input right after
    /// the forward ends and a host round trip would only add the copies (as Unsloth does).
    pub fn for_last_layer(self) -> Self {
        match self {
            Self::HostOffload => Self::Recompute,
            mode => mode,
        }
    }
}

/// Whether [`checkpoint`] carries out [`CheckpointMode::Recompute`] and
/// [`CheckpointMode::HostOffload`] on backend `B` in this build (see the crate docs); elsewhere
/// layers run as with [`CheckpointMode::Off`].
pub fn is_supported<B: Backend>() -> bool {
    dispatch::supported::<B>()
}

thread_local! {
    /// The state of this thread's stream of layer seeds.
    static LAYER_SEEDS: Cell<u64> = const { Cell::new(0) };
    /// Whether this thread is running a checkpoint's recompute.
    static RECOMPUTING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling code runs inside a checkpoint's recompute (the backward of
/// [`CheckpointMode::Recompute`] or [`CheckpointMode::HostOffload`]).
///
/// There the layer's output value is never read: the incoming gradient is attached to its
/// graph and the output dropped. A layer may then skip computing values that reach its output
/// through additions only (the decoder layer's MLP: `h + mlp(norm(h))`), as long as every
/// value its backward reads is still computed.
pub fn recomputing() -> bool {
    RECOMPUTING.get()
}

/// Runs `f` with [`recomputing`] true on this thread.
fn as_recompute<T>(f: impl FnOnce() -> T) -> T {
    let outer = RECOMPUTING.replace(true);
    let result = f();
    RECOMPUTING.set(outer);
    result
}

/// Restarts this thread's stream of layer seeds: the [`checkpoint`] calls that follow reseed the
/// backend with the same values, so dropout draws the same masks (see the crate docs).
pub fn seed_layers(seed: u64) {
    LAYER_SEEDS.set(seed);
}

/// The next layer seed: SplitMix64 over a Weyl sequence.
fn next_layer_seed() -> u64 {
    let state = LAYER_SEEDS.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
    LAYER_SEEDS.set(state);
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs one layer, `forward(layer, input)`, under `mode`.
///
/// `forward` must be a pure function of the layer's parameters and `input`, apart from backend
/// RNG draws (which are replayed): it is called again in backward. Tensors it captures get no
/// gradient and must not require grad; trainable tensors belong in `layer`, whose float
/// parameters are all visited.
///
/// # Shapes
/// - input: `[batch, seq, hidden]` for a decoder layer (any rank `D`)
/// - output: the shape `forward` gives
///
/// # Panics
/// Under `Recompute` or `HostOffload` on a supported autodiff backend: if `forward` captures a
/// tensor that requires grad; in backward, if the recompute panics (its message is printed by the
/// thread `checkpoint-recompute`).
pub fn checkpoint<B, M, F, const D: usize>(
    mode: CheckpointMode,
    input: Tensor<B, D>,
    layer: &M,
    forward: F,
) -> Tensor<B, D>
where
    B: Backend,
    M: Module<B> + 'static,
    F: Fn(&M, Tensor<B, D>) -> Tensor<B, D> + Send + 'static,
{
    let device = input.device();
    if !B::ad_enabled(&device) {
        return forward(layer, input);
    }
    let seed = next_layer_seed();
    B::seed(&device, seed);
    if mode == CheckpointMode::Off {
        return forward(layer, input);
    }
    match dispatch::checkpointed(mode, input, layer, forward, seed) {
        Ok(output) => output,
        Err((input, forward)) => {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "gradient checkpointing ({mode:?}) is not available on backend {}; layers \
                     keep their activations",
                    B::name(&device)
                );
            });
            forward(layer, input)
        }
    }
}
