//! The fused kernel on CUDA: cuDNN's flash attention (`fastlora_cuda_gemm::sdpa_forward` /
//! `sdpa_backward`) for `CubeBackend<CudaRuntime, ..>` float tensors in f16/bf16.
//!
//! cuDNN runs the forward and the backward each as one kernel (scores never leave the chip),
//! where the block-wise op writes every score block to memory between cuBLAS GEMMs and the
//! softmax kernels. Anything cuDNN declines (f32, a head width it has no kernel for, no
//! `libcudnn` on the machine, no engine for the graph) falls back to the block-wise op, with one
//! warning per process. Runs when [`crate::cudnn_enabled`] (by default).

use std::any::{Any, TypeId};
use std::sync::Once;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use fastlora_cuda_gemm::{CudaTensor, SdpaRuns, SdpaSaved, sdpa_backward, sdpa_forward};

use crate::cudnn_enabled;
use crate::op::{FusedForward, FusedSaved, Geometry};
use crate::segments::SegmentRuns;

fn sdpa_runs(runs: &SegmentRuns) -> SdpaRuns<'_> {
    SdpaRuns {
        seq: runs.dims()[1],
        starts: runs.starts(),
        lengths: runs.lengths(),
    }
}

fn as_cuda<T: 'static>(t: &T) -> &CudaTensor {
    (t as &dyn Any)
        .downcast_ref::<CudaTensor>()
        .unwrap_or_else(|| unreachable!("TypeId checked"))
}

fn from_cuda<T: 'static>(t: CudaTensor) -> T {
    *(Box::new(t) as Box<dyn Any>)
        .downcast::<T>()
        .unwrap_or_else(|_| unreachable!("TypeId checked"))
}

fn warn_once(what: &str, error: &fastlora_cuda_gemm::GemmError) {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!("cuDNN attention {what} unavailable, using the block-wise op: {error}");
    });
}

/// `(o [b, s, h·d], lse)` through cuDNN (over each of `runs` alone, if given), or the inputs
/// back.
pub(crate) fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    geometry: Geometry,
    runs: Option<&SegmentRuns>,
) -> FusedForward<B> {
    if TypeId::of::<FloatTensor<B>>() != TypeId::of::<CudaTensor>() || !cudnn_enabled() {
        return Err([q, k, v]);
    }
    match sdpa_forward(
        as_cuda(&q),
        as_cuda(&k),
        as_cuda(&v),
        geometry.scale() as f32,
        runs.map(sdpa_runs),
    ) {
        Ok((o, lse)) => Ok((from_cuda(o), from_cuda(lse))),
        Err(error) => {
            warn_once("forward", &error);
            Err([q, k, v])
        }
    }
}

/// `(dq, dk, dv)` through cuDNN, or `None` (the caller runs the block-wise backward).
pub(crate) fn backward<B: Backend>(
    saved: &FusedSaved<FloatTensor<B>>,
    d_o: FloatTensor<B>,
) -> Option<(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>)> {
    if TypeId::of::<FloatTensor<B>>() != TypeId::of::<CudaTensor>() {
        return None;
    }
    let cuda = SdpaSaved {
        q: as_cuda(&saved.q),
        k: as_cuda(&saved.k),
        v: as_cuda(&saved.v),
        o: as_cuda(&saved.o),
        lse: as_cuda(&saved.lse),
        runs: saved.runs.as_deref().map(sdpa_runs),
    };
    match sdpa_backward(&cuda, as_cuda(&d_o), saved.geometry.scale() as f32) {
        Ok((dq, dk, dv)) => Some((from_cuda(dq), from_cuda(dk), from_cuda(dv))),
        Err(error) => {
            warn_once("backward", &error);
            None
        }
    }
}
