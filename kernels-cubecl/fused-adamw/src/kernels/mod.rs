//! The CubeCL kernels, one per file, each `#[cube]` function next to its host-side launch. They
//! run on any CubeCL runtime (CUDA, wgpu, ...) through `CubeTensor<R>`.

pub mod adamw_step;
pub mod squared_norm;

use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// The tensor itself when it is row-major, else a row-major copy.
fn contiguous<R: CubeRuntime>(tensor: CubeTensor<R>) -> CubeTensor<R> {
    if tensor.is_contiguous() {
        tensor
    } else {
        into_contiguous(tensor)
    }
}

/// The widest address type any of the tensors needs.
fn address_type<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> AddressType {
    tensors
        .iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default()
}
