//! The op's two softmax steps as CubeCL kernels, one per file, each `#[cube]` function next to
//! its host-side launch; any CubeCL runtime (CUDA, wgpu). [`crate::block`] computes the same
//! thing in Burn ops (the tests' oracle).

pub mod softmax_backward;
pub mod softmax_forward;

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::op::BlockAt;

/// The tensor itself when its buffer is ours alone and safe to write, else a copy.
fn exclusive<R: CubeRuntime>(tensor: CubeTensor<R>) -> CubeTensor<R> {
    if tensor.can_mut() && tensor.is_nonoverlapping() {
        tensor
    } else {
        tensor.copy()
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

/// `[n, rows, keys]` of a score block, checked against the other block operands.
fn block_dims<R: CubeRuntime>(s: &CubeTensor<R>) -> [usize; 3] {
    let dims = s.meta.shape().as_slice();
    let [n, rows, keys] = dims else {
        panic!("score block must be [entries, rows, keys], got {dims:?}");
    };
    [*n, *rows, *keys]
}

/// Checks a `[n, rows]` f32 row vector (LSE or D) of a block.
fn check_rows<R: CubeRuntime>(name: &str, t: &CubeTensor<R>, n: usize, rows: usize) {
    assert_eq!(
        t.meta.shape().as_slice(),
        &[n, rows],
        "`{name}` must be [entries, rows] = [{n}, {rows}]"
    );
    assert_eq!(t.dtype, burn::tensor::DType::F32, "`{name}` must be f32");
}

/// Checks the `[b, s]` f32 segments against a block at `at` with `n` entries and `keys` keys
/// (the block's last query position is `keys − 1`).
fn check_segments<R: CubeRuntime>(segments: &CubeTensor<R>, n: usize, keys: usize, at: BlockAt) {
    let dims = segments.meta.shape().as_slice();
    assert!(
        dims.len() == 2 && dims[0] * at.kv_heads == n && dims[1] >= keys,
        "segments {dims:?} do not cover {n} entries ({} kv heads) × {keys} keys",
        at.kv_heads
    );
    assert_eq!(
        segments.dtype,
        burn::tensor::DType::F32,
        "segments must be f32"
    );
}

/// `u32` kernel arguments.
fn arg(value: usize, what: &str) -> u32 {
    u32::try_from(value).unwrap_or_else(|_| panic!("{what} = {value} exceeds u32"))
}
