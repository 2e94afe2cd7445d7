//! The backward softmax of one score block, elementwise over `[n, rows, keys]`:
//!
//! ```text
//! visible(r, j) = j ≤ i  and  seg[e / kvh, j] = seg[e / kvh, i],   i = q0 + r/g   (e: batch entry)
//! P_rj  = exp(S_rj − LSE_r) if visible, else 0        (S recomputed; written over S)
//! dS_rj = scale · P_rj · (dP_rj − D_r)                 (D = rowsum(dO∘O); written over dP)
//! ```
//!
//! f32 math whatever the storage type `F` (bf16 on GPUs); LSE and D are f32.

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

use super::{address_type, arg, block_dims, check_rows, check_segments, exclusive};
use crate::op::BlockAt;

#[cube(launch, address_type = "dynamic")]
// `has_segments` is comptime, `visible` runtime: the two `if`s stay apart.
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
fn softmax_backward_kernel<F: Float, L: Float>(
    s: &mut Tensor<F>,
    dp: &mut Tensor<F>,
    lse: &Tensor<L>,
    delta: &Tensor<L>,
    segments: &Tensor<L>,
    q0: u32,
    groups: u32,
    kv_heads: u32,
    scale: f32,
    #[comptime] has_segments: bool,
    #[define(F, L)] _dtypes: [StorageType; 2],
) {
    let rows = s.shape(1);
    let keys = s.shape(2);
    if ABSOLUTE_POS >= s.shape(0) * rows * keys {
        terminate!();
    }
    let j = ABSOLUTE_POS % keys;
    let row = ABSOLUTE_POS / keys;
    let r = row % rows;
    let e = row / rows;
    let i = q0 as usize + r / groups as usize;
    let mut visible = j <= i;
    if has_segments {
        if visible {
            let at = (e / kv_heads as usize) * segments.stride(0);
            let step = segments.stride(1);
            visible =
                f32::cast_from(segments[at + j * step]) == f32::cast_from(segments[at + i * step]);
        }
    }
    let s_at = e * s.stride(0) + r * s.stride(1) + j * s.stride(2);
    let dp_at = e * dp.stride(0) + r * dp.stride(1) + j * dp.stride(2);
    let mut p = 0.0f32;
    if visible {
        let row_lse = f32::cast_from(lse[e * lse.stride(0) + r * lse.stride(1)]);
        p = f32::exp(f32::cast_from(s[s_at]) - row_lse);
    }
    let d = f32::cast_from(delta[e * delta.stride(0) + r * delta.stride(1)]);
    let dpf = f32::cast_from(dp[dp_at]);
    s[s_at] = F::cast_from(p);
    dp[dp_at] = F::cast_from(scale * p * (dpf - d));
}

/// Launches the backward softmax: `s` (recomputed scores) and `dp` `[n, rows, keys]`, `lse`
/// and `delta` `[n, rows]` f32 (views are fine); returns `(P, dS)` in `s`'s and `dp`'s buffers
/// (copied first if shared).
///
/// # Panics
/// On mismatched shapes or dtypes.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: CubeRuntime>(
    s: CubeTensor<R>,
    dp: CubeTensor<R>,
    lse: CubeTensor<R>,
    delta: CubeTensor<R>,
    segments: Option<CubeTensor<R>>,
    at: BlockAt,
    scale: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [n, rows, keys] = block_dims(&s);
    assert_eq!(
        dp.meta.shape().as_slice(),
        s.meta.shape().as_slice(),
        "dP and S shapes differ"
    );
    assert_eq!(dp.dtype, s.dtype, "dP and S dtypes differ");
    check_rows("lse", &lse, n, rows);
    check_rows("delta", &delta, n, rows);
    if let Some(segments) = &segments {
        check_segments(segments, n, keys, at);
    }
    let (s, dp) = (exclusive(s), exclusive(dp));
    let units = n * rows * keys;
    if units > 0 {
        let client = s.client.clone();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let has_segments = segments.is_some();
        let segments = segments.unwrap_or_else(|| lse.clone());
        softmax_backward_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type(&[&s, &dp, &lse, &delta, &segments]),
            s.clone().into_tensor_arg(),
            dp.clone().into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            segments.into_tensor_arg(),
            arg(at.q0, "q0"),
            arg(at.groups, "groups"),
            arg(at.kv_heads, "kv_heads"),
            scale as f32,
            has_segments,
            [s.dtype.into(), DType::F32.into()],
        );
    }
    (s, dp)
}
