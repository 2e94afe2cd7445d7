//! The forward softmax of one score block, one cube per row (`R·n` rows of `keys` scores):
//!
//! ```text
//! visible(r, j) = j ≤ i  and  seg[e / kvh, j] = seg[e / kvh, i],   i = q0 + r/g   (e: batch entry)
//! LSE_r = m + ln Σ_visible exp(S_rj − m),   m = max_visible S_rj   (key i is always visible)
//! P_rj  = exp(S_rj − LSE_r) if visible, else 0                         (written over S)
//! ```
//!
//! Each unit runs an online max/sum over a strided share of the row, the cube combines the
//! `(m, l)` pairs in shared memory (tree of halvings), then every unit writes its share of `P`.
//! The running max starts at `-1e30` ([`crate::block::NEG`]). f32 throughout whatever the
//! storage type `F` of `S`/`P` (bf16 on GPUs); LSE is f32.

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{address_type, arg, block_dims, check_segments, exclusive};
use crate::op::BlockAt;

/// Units per cube (a power of two): long rows are shared by many units.
const CUBE: u32 = 128;

#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn softmax_forward_kernel<F: Float, L: Float>(
    s: &mut Tensor<F>,
    lse: &mut Tensor<L>,
    segments: &Tensor<L>,
    q0: u32,
    groups: u32,
    kv_heads: u32,
    #[comptime] has_segments: bool,
    #[comptime] cube: u32,
    #[define(F, L)] _dtypes: [StorageType; 2],
) {
    let rows = s.shape(1);
    let keys = s.shape(2);
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= s.shape(0) * rows {
        terminate!();
    }
    let e = row / rows;
    let r = row % rows;
    // Keys [0, end) may be visible: causal, the row's query position is i = q0 + r / g.
    let i = q0 as usize + r / groups as usize;
    let mut end = i + 1;
    if end > keys {
        end = keys;
    }
    let b = e / kv_heads as usize;
    let seg_row = b * segments.stride(0);
    let seg_step = segments.stride(1);
    let mut own = 0.0f32;
    if has_segments {
        own = f32::cast_from(segments[seg_row + i * seg_step]);
    }
    let base = e * s.stride(0) + r * s.stride(1);
    let ks = s.stride(2);
    let unit = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;

    let mut sm = SharedMemory::<f32>::new(cube as usize);
    let mut sl = SharedMemory::<f32>::new(cube as usize);
    let mut m = f32::new(-1.0e30);
    let mut l = 0.0f32;
    let mut j = unit;
    while j < end {
        let mut visible = true;
        if has_segments {
            visible = f32::cast_from(segments[seg_row + j * seg_step]) == own;
        }
        if visible {
            let x = f32::cast_from(s[base + j * ks]);
            if x > m {
                l = l * f32::exp(m - x) + 1.0f32;
                m = x;
            } else {
                l += f32::exp(x - m);
            }
        }
        j += step;
    }
    sm[unit] = m;
    sl[unit] = l;
    sync_cube();
    let mut half = step / 2;
    while half > 0 {
        if unit < half {
            let m1 = sm[unit];
            let m2 = sm[unit + half];
            let mut mm = m2;
            if m1 > m2 {
                mm = m1;
            }
            sl[unit] = sl[unit] * f32::exp(m1 - mm) + sl[unit + half] * f32::exp(m2 - mm);
            sm[unit] = mm;
        }
        sync_cube();
        half /= 2;
    }
    // The row's own key is visible, so the sum is at least 1.
    let row_lse = sm[0] + f32::ln(sl[0]);
    if unit == 0 {
        lse[e * lse.stride(0) + r * lse.stride(1)] = L::cast_from(row_lse);
    }

    let mut j = unit;
    while j < keys {
        let mut p = 0.0f32;
        if j < end {
            let mut visible = true;
            if has_segments {
                visible = f32::cast_from(segments[seg_row + j * seg_step]) == own;
            }
            if visible {
                p = f32::exp(f32::cast_from(s[base + j * ks]) - row_lse);
            }
        }
        s[base + j * ks] = F::cast_from(p);
        j += step;
    }
}

/// Launches the forward softmax on the score block `s` `[n, rows, keys]` (overwritten with `P`,
/// copied first if shared); returns `(P, LSE)`, LSE a new `[n, rows]` f32 tensor.
///
/// # Panics
/// On a malformed block or malformed segments.
pub fn launch<R: CubeRuntime>(
    s: CubeTensor<R>,
    segments: Option<CubeTensor<R>>,
    at: BlockAt,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [n, rows, keys] = block_dims(&s);
    if let Some(segments) = &segments {
        check_segments(segments, n, keys, at);
        s.assert_is_on_same_device(segments);
    }
    let s = exclusive(s);
    let lse = empty_device_dtype::<R>(
        s.client.clone(),
        s.device.clone(),
        burn::tensor::Shape::new([n, rows]),
        DType::F32,
    );
    let total = n * rows;
    if total > 0 && keys > 0 {
        let client = s.client.clone();
        let x = total.min(65_535);
        let y = total.div_ceil(x);
        let cube_count = CubeCount::Static(arg(x, "cubes"), arg(y, "cubes"), 1);
        let has_segments = segments.is_some();
        let segments = segments.unwrap_or_else(|| lse.clone());
        softmax_forward_kernel::launch::<R>(
            &client,
            cube_count,
            CubeDim::new_1d(CUBE),
            address_type(&[&s, &lse, &segments]),
            s.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            segments.into_tensor_arg(),
            arg(at.q0, "q0"),
            arg(at.groups, "groups"),
            arg(at.kv_heads, "kv_heads"),
            has_segments,
            CUBE,
            [s.dtype.into(), DType::F32.into()],
        );
    }
    (s, lse)
}
