//! The fused MLP on `CubeBackend<R, F, I, BT>`, any CubeCL runtime `R` (CUDA, wgpu, ...).
//!
//! Plain `CubeBackend` only, no `Fusion<..>` wrapper: custom ops are simplest there (a Fusion
//! custom op needs its own IR registration). Burn's `Wgpu`/`Cuda` aliases are Fusion-wrapped
//! when burn's `fusion` feature is on (this workspace leaves it off); name the backend as
//! `CubeBackend<Runtime, f32, i32, u32>` (`crate::WgpuBackend`, `crate::CudaBackend`) to be sure.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::kernels::{cast_group, spare_room, swiglu_forward, swiglu_lora_backward};
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

    fn swiglu_forward(
        e: FloatTensor<Self>,
        g: FloatTensor<Self>,
        spare_columns: usize,
    ) -> FloatTensor<Self> {
        let [n, i] = e.meta.shape().dims::<2>();
        let h = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
            e.client.clone(),
            e.device.clone(),
            [n, i + spare_columns].into(),
            e.dtype,
        );
        let h = spare_room::spare_view(h, n, i).expect("a new contiguous buffer");
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

    fn cast_group_with_stack(
        tensors: Vec<FloatTensor<Self>>,
        stacked: Vec<FloatTensor<Self>>,
        dtype: DType,
    ) -> (Vec<FloatTensor<Self>>, FloatTensor<Self>) {
        cast_group::launch_with_stack(tensors, stacked, dtype)
    }

    fn spare_columns(weight: &FloatTensor<Self>) -> usize {
        spare_room::spare_columns(weight)
    }

    fn spare_rows(weight: &FloatTensor<Self>) -> usize {
        spare_room::spare_rows(weight)
    }

    fn with_spare_columns(x: &FloatTensor<Self>, width: usize) -> FloatTensor<Self> {
        spare_room::with_spare_columns(x, width)
    }

    fn gemm_into_columns(
        a: FloatTensor<Self>,
        trans_a: Trans,
        b: FloatTensor<Self>,
        trans_b: Trans,
        alpha: f64,
        out: &FloatTensor<Self>,
        col0: usize,
    ) {
        #[cfg(feature = "cuda")]
        let (a, b) = match crate::gemm::cublas::try_gemm_into_columns::<Self>(
            a, trans_a, b, trans_b, alpha, out, col0,
        ) {
            Ok(()) => return,
            Err(operands) => operands,
        };
        let product = Self::gemm(a, trans_a, b, trans_b, alpha, None);
        spare_room::write_columns(out, &product, col0);
    }

    fn widen(
        weight: &FloatTensor<Self>,
        factor: FloatTensor<Self>,
        at: usize,
        width: usize,
    ) -> FloatTensor<Self> {
        spare_room::widen(weight, &factor, at, width)
    }

    fn lengthen(
        weight: &FloatTensor<Self>,
        factor: FloatTensor<Self>,
        at: usize,
        height: usize,
    ) -> FloatTensor<Self> {
        spare_room::lengthen(weight, &factor, at, height)
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
