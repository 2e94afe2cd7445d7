//! The fused MLP on `CubeBackend<R, F, I, BT>`, any CubeCL runtime `R` (CUDA, wgpu, ...).
//!
//! Plain `CubeBackend` only, no `Fusion<..>` wrapper: custom ops are simplest there (a Fusion
//! custom op needs its own IR registration). Burn's `Wgpu`/`Cuda` aliases are Fusion-wrapped
//! when burn's `fusion` feature is on (this workspace leaves it off); name the backend as
//! `CubeBackend<Runtime, f32, i32, u32>` (`crate::WgpuBackend`, `crate::CudaBackend`) to be sure.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::kernels::{cast_group, swiglu_forward, swiglu_lora_backward};
use crate::op::{
    FusedMlpBackend, FusedMlpKernels, MlpWeights, OutputUse, SwigluLoraBackward, Trans, forward,
    weights_in,
};

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedMlpKernels
    for CubeBackend<R, F, I, BT>
{
    fn gemm(
        a: FloatTensor<Self>,
        trans_a: Trans,
        b: FloatTensor<Self>,
        trans_b: Trans,
        alpha: f64,
        acc: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        crate::gemm::gemm::<Self>(a, trans_a, b, trans_b, alpha, acc)
    }

    fn swiglu_forward(e: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        let h = burn_cubecl::ops::numeric::empty_device_dtype(
            e.client.clone(),
            e.device.clone(),
            e.meta.shape().clone(),
            e.dtype,
        );
        swiglu_forward::launch(&e, &g, h)
    }

    fn swiglu_lora_backward(
        dh: FloatTensor<Self>,
        e: FloatTensor<Self>,
        g: FloatTensor<Self>,
    ) -> SwigluLoraBackward<FloatTensor<Self>> {
        swiglu_lora_backward::launch(dh, e, g)
    }

    fn cast_group(tensors: Vec<FloatTensor<Self>>, dtype: DType) -> Vec<FloatTensor<Self>> {
        cast_group::launch(tensors, dtype)
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedMlpBackend
    for CubeBackend<R, F, I, BT>
{
    fn fused_lora_mlp(
        x: FloatTensor<Self>,
        weights: MlpWeights<FloatTensor<Self>>,
        output: OutputUse,
    ) -> FloatTensor<Self> {
        let weights = weights_in::<Self>(weights, x.dtype);
        forward::<Self>(x, weights, output).0
    }
}
