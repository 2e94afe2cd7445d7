//! The linear-memory attention op on Burn's wgpu backend (f32) against the materialised
//! attention on the same backend, outputs and `dq`, `dk`, `dv`; and its two CubeCL kernels
//! against their Burn-ops versions.
//!
//! On a machine without a GPU this runs on Mesa's software Vulkan (lavapipe). Without any
//! Vulkan adapter the tests are skipped with a message, unless `FASTLORA_REQUIRE_WGPU=1`.

use burn::backend::Autodiff;
use burn::backend::wgpu::WgpuDevice;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use flash_attention::{BlockAt, Geometry, block, flash_attention, kernels, materialised_attention};
use fused_mlp::{WgpuBackend, vulkan_test_device};

type B = WgpuBackend;
type AB = Autodiff<B>;

/// Relative tolerance: `max|got − want| / max|want|`.
const TOL: f32 = 1e-4;

/// A deterministic uniform(-1, 1) stream (SplitMix64), so every run draws the same inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn tensor<BK: Backend, const R: usize>(
        &mut self,
        shape: [usize; R],
        scale: f32,
        device: &BK::Device,
    ) -> Tensor<BK, R> {
        let len = shape.iter().product();
        let values: Vec<f32> = (0..len).map(|_| self.next() * scale).collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

fn values<BK: Backend, const R: usize>(t: Tensor<BK, R>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// The relative error `max|got − want| / max|want|`, after checking shapes and finiteness.
#[track_caller]
fn rel_error<BK: Backend, const R: usize>(
    what: &str,
    got: Tensor<BK, R>,
    want: Tensor<BK, R>,
) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (got, want) = (values(got), values(want));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    let mut worst = 0f32;
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.is_finite(), "{what}[{k}] = {g}");
        worst = worst.max((g - w).abs());
    }
    worst / scale
}

#[track_caller]
fn assert_close<BK: Backend, const R: usize>(what: &str, got: Tensor<BK, R>, want: Tensor<BK, R>) {
    let rel = rel_error(what, got, want);
    eprintln!("{what}: relative error {rel:.2e}");
    assert!(rel <= TOL, "{what}: relative error {rel:e} > {TOL:e}");
}

/// Padding of one batch row: `left` pad tokens first, `right` last.
#[derive(Debug, Clone, Copy)]
struct Pad {
    left: usize,
    right: usize,
}

struct Case {
    batch: usize,
    kv_heads: usize,
    groups: usize,
    seq: usize,
    head_dim: usize,
    block_q: Option<usize>,
    /// One entry per batch row, or none for no key mask.
    padding: Vec<Pad>,
}

impl Case {
    /// `[b, s]`: 1 = token, 0 = padding.
    fn key_mask(&self) -> Option<Vec<f32>> {
        (!self.padding.is_empty()).then(|| {
            self.padding
                .iter()
                .flat_map(|p| {
                    (0..self.seq).map(move |j| f32::from(j >= p.left && j < self.seq - p.right))
                })
                .collect()
        })
    }

    /// `[b, s]`: 1 where query `i` sees at least one key (not a left-padding position).
    fn live_rows(&self) -> Vec<f32> {
        match self.key_mask() {
            None => vec![1.0; self.batch * self.seq],
            Some(mask) => mask
                .chunks(self.seq)
                .flat_map(|row| {
                    let mut seen = false;
                    row.iter()
                        .map(|&m| {
                            seen |= m != 0.0;
                            f32::from(seen)
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
        }
    }

    fn run(&self, device: &WgpuDevice, seed: u64) {
        let (b, kvh, g, s, d) = (
            self.batch,
            self.kv_heads,
            self.groups,
            self.seq,
            self.head_dim,
        );
        let h = kvh * g;
        let geometry = Geometry::new(b, kvh, g, s, d, self.block_q);
        let label = format!(
            "b{b} h{h} kvh{kvh} s{s} d{d} block {} ({} blocks) pad {:?}",
            geometry.block_q,
            geometry.blocks().len(),
            self.padding
        );
        eprintln!("case {label}");
        let mut rng = Rng(seed);
        // Scores of a few units so the softmax is far from uniform.
        let q = rng.tensor::<AB, 4>([b, h, s, d], 2.0, device);
        let k = rng.tensor::<AB, 4>([b, kvh, s, d], 2.0, device);
        let v = rng.tensor::<AB, 4>([b, kvh, s, d], 1.0, device);
        let live = Tensor::<AB, 2>::from_data(TensorData::new(self.live_rows(), [b, s]), device)
            .reshape([b, s, 1]);
        // The cotangent: zero on rows that see no key (their outputs differ by design).
        let cot = rng.tensor::<AB, 3>([b, s, h * d], 1.0, device) * live.clone();
        let mask = self
            .key_mask()
            .map(|m| Tensor::<AB, 2>::from_data(TensorData::new(m, [b, s]), device));

        let grads_of = |fast: bool| {
            let (q, k, v) = (
                q.clone().require_grad(),
                k.clone().require_grad(),
                v.clone().require_grad(),
            );
            let out = if fast {
                flash_attention(q.clone(), k.clone(), v.clone(), mask.clone(), self.block_q)
            } else {
                materialised_attention(q.clone(), k.clone(), v.clone(), mask.clone())
            };
            let grads = (out.clone() * cot.clone()).sum().backward();
            let out = out * live.clone();
            (
                out.inner(),
                q.grad(&grads).expect("dq"),
                k.grad(&grads).expect("dk"),
                v.grad(&grads).expect("dv"),
            )
        };
        let (o, dq, dk, dv) = grads_of(true);
        let (o_ref, dq_ref, dk_ref, dv_ref) = grads_of(false);
        assert_close(&format!("{label}: o"), o, o_ref);
        assert_close(&format!("{label}: dq"), dq, dq_ref);
        assert_close(&format!("{label}: dk"), dk, dk_ref);
        assert_close(&format!("{label}: dv"), dv, dv_ref);
    }
}

#[test]
fn no_gqa_d64_ragged_several_blocks() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    Case {
        batch: 1,
        kv_heads: 2,
        groups: 1,
        seq: 37,
        head_dim: 64,
        block_q: Some(16),
        padding: vec![],
    }
    .run(&device, 1);
}

#[test]
fn gqa3_d64_left_and_right_padding() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    Case {
        batch: 2,
        kv_heads: 1,
        groups: 3,
        seq: 37,
        head_dim: 64,
        block_q: Some(8),
        padding: vec![Pad { left: 5, right: 0 }, Pad { left: 0, right: 4 }],
    }
    .run(&device, 2);
}

#[test]
fn gqa4_d128_seq100() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    Case {
        batch: 1,
        kv_heads: 2,
        groups: 4,
        seq: 100,
        head_dim: 128,
        block_q: Some(32),
        padding: vec![],
    }
    .run(&device, 3);
}

#[test]
fn gqa4_d64_seq100_padding_one_block() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    Case {
        batch: 2,
        kv_heads: 1,
        groups: 4,
        seq: 100,
        head_dim: 64,
        block_q: None,
        padding: vec![Pad { left: 0, right: 0 }, Pad { left: 17, right: 3 }],
    }
    .run(&device, 4);
}

#[test]
fn gqa8_d128_left_padding() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    Case {
        batch: 2,
        kv_heads: 1,
        groups: 8,
        seq: 37,
        head_dim: 128,
        block_q: Some(16),
        padding: vec![Pad { left: 9, right: 0 }, Pad { left: 1, right: 2 }],
    }
    .run(&device, 5);
}

fn prim<const R: usize>(
    t: Tensor<B, R>,
) -> burn_cubecl::tensor::CubeTensor<cubecl::wgpu::WgpuRuntime> {
    t.into_primitive().tensor()
}

fn wrap<const R: usize>(
    p: burn_cubecl::tensor::CubeTensor<cubecl::wgpu::WgpuRuntime>,
) -> Tensor<B, R> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Both kernels against their Burn-ops versions ([`block`]) on one block: a middle block
/// (q0 > 0), GQA 3, a key mask with a fully masked row, scores large enough to need the max
/// shift; then the backward from strided LSE/D views.
#[test]
fn kernels_match_burn_ops() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let (kvh, g, q0, q1, seq) = (2, 3, 10, 23, 40);
    let rows = (q1 - q0) * g;
    let n = 2 * kvh;
    let at = BlockAt {
        q0,
        groups: g,
        kv_heads: kvh,
    };
    let mut rng = Rng(7);
    let s = rng.tensor::<B, 3>([n, rows, q1], 30.0, &device);
    // Batch row 0: keys 0..12 padding (queries 10, 11 see nothing); row 1: a few holes.
    let mask_values: Vec<f32> = (0..2 * seq)
        .map(|i| {
            let (row, j) = (i / seq, i % seq);
            f32::from(if row == 0 { j >= 12 } else { j % 7 != 3 })
        })
        .collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask_values, [2, seq]), &device);
    for mask in [None, Some(mask)] {
        let what = if mask.is_some() { "masked" } else { "causal" };
        let (p_ref, lse_ref) =
            block::softmax_forward::<B>(prim(s.clone()), mask.clone().map(prim), at);
        let (p, lse) =
            kernels::softmax_forward::launch(prim(s.clone()), mask.clone().map(prim), at);
        assert_close(&format!("{what} forward P"), wrap::<3>(p), wrap::<3>(p_ref));
        let (lse, lse_ref) = (wrap::<2>(lse), wrap::<2>(lse_ref));
        assert_eq!(lse.dtype(), DType::F32);
        // Rows that see no key carry the 1e30 marker in both; compare the others.
        let empty = lse_ref.clone().greater_elem(1e29);
        assert_eq!(
            values(lse.clone().greater_elem(1e29).float()),
            values(empty.clone().float())
        );
        assert_eq!(
            mask.is_some(),
            values(empty.clone().float()).iter().any(|&e| e != 0.0)
        );
        assert_close(
            &format!("{what} forward LSE"),
            lse.clone().mask_fill(empty.clone(), 0.0),
            lse_ref.mask_fill(empty, 0.0),
        );

        // LSE and D as column views of wider [n, 2·rows] tensors, as the op passes them.
        let wide = Tensor::cat(vec![lse.clone(), lse], 1);
        let lse_view = wide.slice([0..n, rows..2 * rows]);
        let delta = rng
            .tensor::<B, 2>([n, 2 * rows], 1.0, &device)
            .slice([0..n, 3..3 + rows]);
        let dp = rng.tensor::<B, 3>([n, rows, q1], 1.0, &device);
        let scale = 0.125;
        let (p_ref, ds_ref) = block::softmax_backward::<B>(
            prim(s.clone()),
            prim(dp.clone()),
            prim(lse_view.clone()),
            prim(delta.clone()),
            mask.clone().map(prim),
            at,
            scale,
        );
        let (p, ds) = kernels::softmax_backward::launch(
            prim(s.clone()),
            prim(dp.clone()),
            prim(lse_view),
            prim(delta),
            mask.map(prim),
            at,
            scale,
        );
        assert_close(
            &format!("{what} backward P"),
            wrap::<3>(p),
            wrap::<3>(p_ref),
        );
        assert_close(
            &format!("{what} backward dS"),
            wrap::<3>(ds),
            wrap::<3>(ds_ref),
        );
    }
    // The inputs are untouched when shared (the kernels copy before writing).
    assert!(values(s).iter().all(|v| v.is_finite()));
}

#[test]
fn default_block_fits_the_budget() {
    let g = Geometry::new(4, 8, 4, 2048, 64, None);
    assert_eq!(g.block_q, 256);
    assert_eq!(g.blocks().len(), 8);
    let g = Geometry::new(1, 1, 1, 37, 64, Some(16));
    assert_eq!(g.blocks(), vec![(0, 16), (16, 32), (32, 37)]);
    assert_eq!(Geometry::new(1, 1, 1, 10, 64, Some(100)).block_q, 10);
}
