//! The op on `CubeBackend<R, F, I, BT>`, any CubeCL runtime `R` (CUDA, wgpu); plain
//! `CubeBackend`, no Fusion wrapper (as fused-mlp).

use std::sync::Arc;

use burn::tensor::ops::FloatTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::op::{AttentionKernels, BlockAt, FlashAttentionBackend, Geometry, forward};
use crate::segments::SegmentRuns;
use crate::{block, kernels, kernels_enabled};

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AttentionKernels
    for CubeBackend<R, F, I, BT>
{
    fn softmax_forward(
        s: FloatTensor<Self>,
        segments: Option<FloatTensor<Self>>,
        at: BlockAt,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if kernels_enabled() {
            kernels::softmax_forward::launch(s, segments, at)
        } else {
            block::softmax_forward::<Self>(s, segments, at)
        }
    }

    fn softmax_backward(
        s: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        segments: Option<FloatTensor<Self>>,
        at: BlockAt,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if kernels_enabled() {
            kernels::softmax_backward::launch(s, dp, lse, delta, segments, at, scale)
        } else {
            block::softmax_backward::<Self>(s, dp, lse, delta, segments, at, scale)
        }
    }

    // Without CUDA the trait's defaults (no fused kernel) apply.
    #[cfg(feature = "cuda")]
    fn fused_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        geometry: Geometry,
        runs: Option<&SegmentRuns>,
    ) -> crate::op::FusedForward<Self> {
        crate::cudnn::forward::<Self>(q, k, v, geometry, runs)
    }

    #[cfg(feature = "cuda")]
    fn fused_backward(
        saved: &crate::op::FusedSaved<FloatTensor<Self>>,
        d_o: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>)> {
        crate::cudnn::backward::<Self>(saved, d_o)
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FlashAttentionBackend
    for CubeBackend<R, F, I, BT>
{
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: Option<FloatTensor<Self>>,
        geometry: Geometry,
    ) -> FloatTensor<Self> {
        forward::<Self>(q, k, v, segments, geometry).0
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        geometry: Geometry,
        runs: Option<Arc<SegmentRuns>>,
    ) -> Result<FloatTensor<Self>, [FloatTensor<Self>; 3]> {
        Self::fused_forward(q, k, v, geometry, runs.as_deref()).map(|(o, _lse)| o)
    }
}
