//! Layer-level gradient checkpointing: a decoder layer keeps only its input for backward and is
//! recomputed there (Unsloth's `use_gradient_checkpointing`).
//!
//! **Status:** this crate holds the API the model calls around every decoder layer. Only
//! [`CheckpointMode::Off`] is implemented; asking for another mode is reported by
//! [`CheckpointMode::is_implemented`], and the layer then runs without checkpointing (identical
//! gradients, more activation memory). The recomputing autodiff op and the host offload come
//! with the checkpointing issue.

use burn::prelude::*;

/// What a decoder layer keeps for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointMode {
    /// Keep every activation (`use_gradient_checkpointing=False`).
    #[default]
    Off,
    /// Keep the layer input on the device and recompute the layer in backward (`True`).
    Recompute,
    /// Keep the layer input in pinned host memory, copied asynchronously, and recompute
    /// (`"unsloth"`).
    HostOffload,
}

impl CheckpointMode {
    /// Whether this build carries out the mode (otherwise layers run as with [`Self::Off`]).
    pub fn is_implemented(self) -> bool {
        matches!(self, Self::Off)
    }
}

/// Runs one layer, `layer(input)`, under `mode`.
///
/// # Shapes
/// - input: `[batch, seq, hidden]`
/// - output: `[batch, seq, hidden]`
pub fn checkpoint<B: Backend>(
    mode: CheckpointMode,
    input: Tensor<B, 3>,
    layer: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, 3> {
    // Every mode runs the layer directly until the recomputing op exists (see the crate docs).
    let _ = mode;
    layer(input)
}
