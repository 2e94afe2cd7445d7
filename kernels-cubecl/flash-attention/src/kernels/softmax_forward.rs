//! The forward softmax of one score block, one cube per row (`R·n` rows of `keys` scores):
//!
//! ```text
//! visible(r, j) = j ≤ q0 + r/g  and  key_mask[e / kvh, j] ≠ 0          (e: batch entry)
//! LSE_r = m + ln Σ_visible exp(S_rj − m),   m = max_visible S_rj       (1e30 if none visible)
//! P_rj  = exp(S_rj − LSE_r) if visible, else 0                         (written over S)
//! ```
//!
//! Each unit runs an online max/sum over a strided share of the row, the cube combines the
//! `(m, l)` pairs in shared memory (tree of halvings), then every unit writes its share of `P`.
//! Masked scores stand at `-1e30` and an empty row's LSE at `1e30` ([`crate::block::NEG`],
//! [`crate::block::EMPTY_ROW_LSE`]). f32 throughout whatever the storage type `F` of `S`/`P` (bf16 on GPUs); LSE is f32.

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{address_type, arg, block_dims, check_mask, exclusive};
use crate::op::BlockAt;

/// Units per cube (a power of two): long rows are shared by many units.
const CUBE: u32 = 128;

#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn softmax_forward_kernel<F: Float, L: Float>(
    s: &mut Tensor<F>,
    lse: &mut Tensor<L>,
    key_mask: &Tensor<L>,
    q0: u32,
    groups: u32,
    kv_heads: u32,
    #[comptime] has_mask: bool,
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
    // Keys [0, end) may be visible: causal, the row's query position is q0 + r / g.
    let mut end = q0 as usize + r / groups as usize + 1;
    if end > keys {
        end = keys;
    }
    let b = e / kv_heads as usize;
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
        if has_mask {
            visible =
                f32::cast_from(key_mask[b * key_mask.stride(0) + j * key_mask.stride(1)]) != 0.0f32;
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
    let total = sl[0];
    let mut row_lse = 1.0e30f32;
    if total > 0.0f32 {
        row_lse = sm[0] + f32::ln(total);
    }
    if unit == 0 {
        lse[e * lse.stride(0) + r * lse.stride(1)] = L::cast_from(row_lse);
    }

    let mut j = unit;
    while j < keys {
        let mut p = 0.0f32;
        if j < end {
            let mut visible = true;
            if has_mask {
                visible = f32::cast_from(key_mask[b * key_mask.stride(0) + j * key_mask.stride(1)])
                    != 0.0f32;
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
/// On a malformed block or mask.
pub fn launch<R: CubeRuntime>(
    s: CubeTensor<R>,
    key_mask: Option<CubeTensor<R>>,
    at: BlockAt,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [n, rows, keys] = block_dims(&s);
    if let Some(mask) = &key_mask {
        check_mask(mask, n, keys, at);
        s.assert_is_on_same_device(mask);
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
        let has_mask = key_mask.is_some();
        let mask = key_mask.unwrap_or_else(|| lse.clone());
        softmax_forward_kernel::launch::<R>(
            &client,
            cube_count,
            CubeDim::new_1d(CUBE),
            address_type(&[&s, &lse, &mask]),
            s.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            mask.into_tensor_arg(),
            arg(at.q0, "q0"),
            arg(at.groups, "groups"),
            arg(at.kv_heads, "kv_heads"),
            has_mask,
            CUBE,
            [s.dtype.into(), DType::F32.into()],
        );
    }
    (s, lse)
}
