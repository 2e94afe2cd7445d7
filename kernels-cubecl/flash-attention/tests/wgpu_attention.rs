//! The linear-memory attention op on Burn's wgpu backend (f32) against the materialised
//! attention on the same backend, outputs and `dq`, `dk`, `dv`; and its two CubeCL kernels
//! against their Burn-ops versions.
//!
//! On a machine without a GPU this runs on Mesa's software Vulkan (lavapipe). Without any
//! Vulkan adapter the tests are skipped with a message, unless `FASTLORA_REQUIRE_WGPU=1`.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::wgpu::WgpuDevice;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use flash_attention::{
    BlockAt, Geometry, SegmentRuns, Segments, attention_segments, block, flash_attention, kernels,
    materialised_attention,
};
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
    /// Lengths of the packed documents of each row (the rest of a row: one more document), or
    /// none for rows of one document.
    documents: Vec<Vec<usize>>,
}

impl Case {
    /// `[b, s]`: 1 = token, 0 = padding.
    fn key_mask(&self) -> Option<Vec<i64>> {
        (!self.padding.is_empty()).then(|| {
            self.padding
                .iter()
                .flat_map(|p| {
                    (0..self.seq).map(move |j| i64::from(j >= p.left && j < self.seq - p.right))
                })
                .collect()
        })
    }

    /// `[b, s]`: each token's document index in its row.
    fn document_ids(&self) -> Option<Vec<i64>> {
        (!self.documents.is_empty()).then(|| {
            self.documents
                .iter()
                .flat_map(|lengths| {
                    let mut ids = Vec::with_capacity(self.seq);
                    for (id, &len) in lengths.iter().enumerate() {
                        ids.extend(std::iter::repeat_n(id as i64, len));
                    }
                    let rest = self.seq - ids.len();
                    ids.extend(std::iter::repeat_n(lengths.len() as i64, rest));
                    ids
                })
                .collect()
        })
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
            "b{b} h{h} kvh{kvh} s{s} d{d} block {} ({} blocks) pad {:?} documents {:?}",
            geometry.block_q,
            geometry.blocks().len(),
            self.padding,
            self.documents
        );
        eprintln!("case {label}");
        let mut rng = Rng(seed);
        // Scores of a few units so the softmax is far from uniform.
        let q = rng.tensor::<AB, 4>([b, h, s, d], 2.0, device);
        let k = rng.tensor::<AB, 4>([b, kvh, s, d], 2.0, device);
        let v = rng.tensor::<AB, 4>([b, kvh, s, d], 1.0, device);
        let cot = rng.tensor::<AB, 3>([b, s, h * d], 1.0, device);
        let int = |values: Vec<i64>| {
            Tensor::<AB, 2, Int>::from_data(TensorData::new(values, [b, s]), device)
        };
        let segments = attention_segments(self.key_mask().map(int), self.document_ids().map(int));
        assert_eq!(
            segments.is_some(),
            !self.padding.is_empty() || !self.documents.is_empty()
        );
        // Documents without padding go to the fast op as runs known on the host (what the model
        // passes), which a backend without a fused kernel turns back into segments.
        let fast_segments = match (self.key_mask(), self.document_ids()) {
            (None, Some(ids)) => Some(Segments::from_runs(
                Arc::new(SegmentRuns::from_labels(&ids, [b, s])),
                device,
            )),
            _ => segments.clone().map(Segments::from_ids),
        };

        let grads_of = |fast: bool| {
            let (q, k, v) = (
                q.clone().require_grad(),
                k.clone().require_grad(),
                v.clone().require_grad(),
            );
            let out = if fast {
                flash_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    fast_segments.clone(),
                    self.block_q,
                )
            } else {
                materialised_attention(q.clone(), k.clone(), v.clone(), segments.clone())
            };
            let grads = (out.clone() * cot.clone()).sum().backward();
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
        documents: vec![],
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
        documents: vec![],
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
        documents: vec![],
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
        documents: vec![],
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
        documents: vec![],
    }
    .run(&device, 5);
}

/// Packed rows: documents of 1 to 30 tokens, boundaries inside and between query blocks.
#[test]
fn gqa3_d64_packed_documents_several_blocks() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    Case {
        batch: 2,
        kv_heads: 2,
        groups: 3,
        seq: 45,
        head_dim: 64,
        block_q: Some(16),
        padding: vec![],
        documents: vec![vec![7, 20, 1], vec![30]],
    }
    .run(&device, 6);
}

/// Packed documents in a right-padded row (the last packed row of an epoch) beside a
/// left-padded one, GQA 4, d 128, one block.
#[test]
fn gqa4_d128_documents_and_padding() {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    Case {
        batch: 2,
        kv_heads: 1,
        groups: 4,
        seq: 40,
        head_dim: 128,
        block_q: None,
        padding: vec![Pad { left: 0, right: 6 }, Pad { left: 3, right: 0 }],
        documents: vec![vec![10, 12], vec![5, 5]],
    }
    .run(&device, 7);
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
/// (q0 > 0), GQA 3, segments with padding and packed documents, scores large enough to need the
/// max shift; then the backward from strided LSE/D views.
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
    // Batch row 0: keys 0..12 padding (queries 10, 11 see only themselves), then one document;
    // row 1: documents starting at 0, 5, 14 and 17, and a padding hole at 20.
    let mask: Vec<i64> = (0..2 * seq)
        .map(|i| {
            let (row, j) = (i / seq, i % seq);
            i64::from(if row == 0 { j >= 12 } else { j != 20 })
        })
        .collect();
    let documents: Vec<i64> = (0..2 * seq)
        .map(|i| {
            let (row, j) = (i / seq, i % seq);
            if row == 0 {
                0
            } else {
                [0, 5, 14, 17].iter().filter(|&&start| j >= start).count() as i64
            }
        })
        .collect();
    let int = |values: Vec<i64>| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(values, [2, seq]), &device)
    };
    let segments = attention_segments(Some(int(mask)), Some(int(documents)));
    for segments in [None, segments] {
        let what = if segments.is_some() {
            "segments"
        } else {
            "causal"
        };
        let (p_ref, lse_ref) =
            block::softmax_forward::<B>(prim(s.clone()), segments.clone().map(prim), at);
        let (p, lse) =
            kernels::softmax_forward::launch(prim(s.clone()), segments.clone().map(prim), at);
        assert_close(&format!("{what} forward P"), wrap::<3>(p), wrap::<3>(p_ref));
        let (lse, lse_ref) = (wrap::<2>(lse), wrap::<2>(lse_ref));
        assert_eq!(lse.dtype(), DType::F32);
        assert_close(&format!("{what} forward LSE"), lse.clone(), lse_ref);

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
            segments.clone().map(prim),
            at,
            scale,
        );
        let (p, ds) = kernels::softmax_backward::launch(
            prim(s.clone()),
            prim(dp.clone()),
            prim(lse_view),
            prim(delta),
            segments.map(prim),
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
