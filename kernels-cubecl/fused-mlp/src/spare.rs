//! Base weights stored with spare room for the LoRA factors beside them (see
//! `kernels::spare_room`): on the backends the fused ops run on, the MLP's projections then take
//! their LoRA terms as a few more steps of their base GEMMs' inner dimension.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::*;

#[cfg(feature = "cubecl")]
use crate::dispatch::{cast, cast_ref};

/// Spare columns (and rows) the model loader gives the MLP's weights (see
/// [`set_spare_lora_columns`]).
static SPARE_LORA_COLUMNS: AtomicUsize = AtomicUsize::new(32);

/// Sets how many spare columns [`weight_with_spare_columns`] gives each row (and
/// [`weight_with_spare_rows_and_columns`] each row and column): the fused MLP folds the gate and
/// up LoRA terms into the base GEMMs when both projections' ranks fit (`r_gate + r_up ≤
/// spare`), and the down projection's when its rank does, and otherwise accumulates them as
/// separate rank-r products. The default, 32, fits rank 16; each column costs `d_out` elements
/// of device memory per projection (each row `d_in`). Set it before loading the model.
pub fn set_spare_lora_columns(spare: usize) {
    SPARE_LORA_COLUMNS.store(spare, Ordering::SeqCst);
}

/// See [`set_spare_lora_columns`].
pub fn spare_lora_columns() -> usize {
    SPARE_LORA_COLUMNS.load(Ordering::SeqCst)
}

/// A `[d_out, d_in]` base weight from row-major f32 `values`, stored with
/// [`spare_lora_columns`] spare columns after each row when `B` is a backend the fused ops run
/// on (a `[d_out, d_in]` view of a `[d_out, d_in + spare]` buffer), as a plain tensor elsewhere.
/// Either way the tensor holds exactly `values` and behaves as any `[d_out, d_in]` tensor. The
/// loader stores the gate and up projections so.
///
/// The fused MLP writes the LoRA factors of the call into the room before each product that
/// reads them, on the caller's stream: adapters that share one base model (clones of it) must
/// not run the MLP at the same time on different threads' streams.
///
/// # Shapes
/// - output: `[d_out, d_in]`
///
/// # Panics
/// If `values` does not hold `d_out · d_in` elements.
pub fn weight_with_spare_columns<B: Backend>(
    values: Vec<f32>,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2> {
    weight_with_spare::<B>(values, shape, false, device)
}

/// As [`weight_with_spare_columns`], with as many spare rows below the weight too (a view of a
/// `[d_out + spare, d_in + spare]` buffer): room for `B` beside it for the forward and for `A`
/// below it for the input gradient. The loader stores the down projection so.
///
/// # Shapes
/// - output: `[d_out, d_in]`
///
/// # Panics
/// If `values` does not hold `d_out · d_in` elements.
pub fn weight_with_spare_rows_and_columns<B: Backend>(
    values: Vec<f32>,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2> {
    weight_with_spare::<B>(values, shape, true, device)
}

#[cfg_attr(
    not(any(feature = "cuda", feature = "wgpu")),
    allow(unused_mut, unused_variables)
)]
fn weight_with_spare<B: Backend>(
    values: Vec<f32>,
    [d_out, d_in]: [usize; 2],
    spare_rows: bool,
    device: &B::Device,
) -> Tensor<B, 2> {
    assert_eq!(
        values.len(),
        d_out * d_in,
        "a [{d_out}, {d_in}] weight from {} values",
        values.len()
    );
    let spare = spare_lora_columns();
    let rows = if spare_rows { spare } else { 0 };
    let mut values = Some(values);
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    macro_rules! on {
        ($KB:ty) => {{
            use std::any::TypeId;
            type Ad = burn::backend::Autodiff<$KB>;
            let id = TypeId::of::<B>();
            if spare > 0 && (id == TypeId::of::<$KB>() || id == TypeId::of::<Ad>()) {
                let kernel_device = cast_ref(device);
                let values = values.take().expect("taken once");
                let view =
                    padded_upload::<$KB>(values, [d_out, d_in], [rows, spare], kernel_device);
                return match id == TypeId::of::<$KB>() {
                    true => cast(view),
                    false => cast(Tensor::<Ad, 2>::from_inner(view)),
                };
            }
        }};
    }
    #[cfg(feature = "cuda")]
    {
        on!(crate::CudaBackend<f32>);
        on!(crate::CudaBackend<burn::tensor::bf16>);
    }
    #[cfg(feature = "wgpu")]
    on!(crate::WgpuBackend<f32>);
    let values = values.take().expect("not taken");
    Tensor::from_data(TensorData::new(values, [d_out, d_in]), device)
}

/// Uploads `values` as `[d_out + spare_rows, d_in + spare_columns]` (zeros in the spare room)
/// and returns the `[d_out, d_in]` view.
#[cfg(feature = "cubecl")]
fn padded_upload<KB: Backend>(
    values: Vec<f32>,
    [d_out, d_in]: [usize; 2],
    [spare_rows, spare_columns]: [usize; 2],
    device: &KB::Device,
) -> Tensor<KB, 2>
where
    KB::FloatTensorPrimitive: IsCubeTensor,
{
    let width = d_in + spare_columns;
    let mut padded = vec![0.0f32; (d_out + spare_rows) * width];
    if d_in > 0 {
        for (row, chunk) in padded
            .chunks_exact_mut(width)
            .zip(values.chunks_exact(d_in))
        {
            row[..d_in].copy_from_slice(chunk);
        }
    }
    // Uploaded flat and reshaped: CUDA would pitch a matrix's rows to 256 bytes, which here
    // would add more room than asked for (128 columns a row in bf16, not 32).
    let len = padded.len();
    let padded = Tensor::<KB, 1>::from_data(TensorData::new(padded, [len]), device)
        .reshape([d_out + spare_rows, width]);
    let primitive = padded.clone().into_primitive().tensor();
    match primitive.top_left(d_out, d_in) {
        Some(view) => Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(view)),
        // Stored some other way: the plain weight (the fused ops then find no spare room).
        None => padded.slice([0..d_out, 0..d_in]),
    }
}

/// The CubeCL tensor primitives, whose buffers can be viewed with spare room.
#[cfg(feature = "cubecl")]
pub(crate) trait IsCubeTensor: Sized {
    /// The top-left `[rows, cols]` of a matrix stored row by row in a buffer of its own, as
    /// `kernels::spare_room` views it; `None` for one stored otherwise.
    fn top_left(self, rows: usize, cols: usize) -> Option<Self>;
}

#[cfg(feature = "cubecl")]
impl<R: burn_cubecl::CubeRuntime> IsCubeTensor for burn_cubecl::tensor::CubeTensor<R> {
    fn top_left(self, rows: usize, cols: usize) -> Option<Self> {
        crate::kernels::spare_room::spare_view(self, rows, cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a backend the fused ops do not run on, the weight is a plain tensor of the values.
    #[test]
    fn plain_elsewhere() {
        type Cpu = burn::backend::NdArray<f32>;
        let values: Vec<f32> = (0..12).map(|v| v as f32 - 5.5).collect();
        let device = Default::default();
        for weight in [
            weight_with_spare_columns::<Cpu>(values.clone(), [3, 4], &device),
            weight_with_spare_rows_and_columns::<Cpu>(values.clone(), [3, 4], &device),
        ] {
            assert_eq!(weight.dims(), [3, 4]);
            assert_eq!(weight.into_data().to_vec::<f32>().unwrap(), values);
        }
    }
}
