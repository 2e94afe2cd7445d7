//! The model's attention wiring on Burn's wgpu backend (f32, lavapipe in CPU CI): a small random
//! GQA Llama gives the same hidden states and input gradients with the linear-memory attention
//! as with the materialised one, with left and right padding and with packed documents (which
//! also compute what each document computes alone); the cached (generation) pass keeps the
//! materialised attention and agrees with the uncached logits; checkpointed layers give the
//! gradients of plain ones.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::prelude::*;
use checkpointing::CheckpointMode;
use fastlora_llama::{
    KvCache, LlamaConfig, LlamaForCausalLm, ModelError, PackedDocuments, WeightSource, build_model,
};
use fused_mlp::{WgpuBackend, vulkan_test_device};
use lora_layers::LoraAdapter;

type AB = Autodiff<WgpuBackend>;

const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 64,
  "intermediate_size": 96,
  "num_attention_heads": 6,
  "num_key_value_heads": 2,
  "head_dim": 16,
  "num_hidden_layers": 2,
  "vocab_size": 50,
  "max_position_embeddings": 64,
  "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false
}"#;

/// A deterministic uniform(-1, 1) stream (SplitMix64).
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
}

impl WeightSource for Rng {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>, ModelError> {
        let len = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(Some(vec![1.0; len]));
        }
        Ok(Some((0..len).map(|_| self.next() * 0.15).collect()))
    }

    fn location(&self) -> PathBuf {
        PathBuf::from("<test random weights>")
    }
}

fn values<const R: usize>(t: Tensor<WgpuBackend, R>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn rel_error(what: &str, got: Vec<f32>, want: Vec<f32>) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "{what}: non-finite value");
            (g - w).abs()
        })
        .fold(0f32, f32::max);
    let rel = worst / scale;
    eprintln!("{what}: relative error {rel:.2e}");
    rel
}

/// The decoder layers and final norm over `x` on the linear-memory attention (`flash`) or the
/// materialised one: the hidden states at the unpadded positions (`live`), and `x`'s gradient
/// under the cotangent `cot`.
fn hidden_and_input_grad(
    model: &LlamaForCausalLm<AB>,
    x: &Tensor<AB, 3>,
    mask: Option<&Tensor<AB, 2, Int>>,
    documents: Option<&PackedDocuments<AB>>,
    (cot, live): (&Tensor<AB, 3>, &Tensor<AB, 3>),
    flash: bool,
) -> (Tensor<WgpuBackend, 3>, Vec<f32>) {
    flash_attention::set_flash_enabled(flash);
    let x = x.clone().require_grad();
    let ctx = model.context(&x, mask.cloned(), documents, 0);
    assert_eq!(ctx.mask.is_none(), flash, "the context picks the path");
    // Documents without a padding mask reach the fast op as runs known on the host.
    let runs_known = ctx.segments.as_ref().is_some_and(|s| s.runs().is_some());
    assert_eq!(runs_known, flash && mask.is_none() && documents.is_some());
    let mut h = x.clone();
    for layer in &model.layers {
        h = layer.forward(h, &ctx);
    }
    let h = model.norm.forward(h);
    let grads = (h.clone() * cot.clone()).sum().backward();
    let dx = x.grad(&grads).expect("dx");
    ((h * live.clone()).inner(), values(dx))
}

#[test]
fn model_attention_paths_agree() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let config = LlamaConfig::from_json_str(CONFIG, Path::new("test-config.json")).unwrap();
    let mut rng = Rng(11);
    let model = build_model::<AB>(&config, &mut rng, &device).unwrap();
    let (b, s, hidden) = (2, 23, config.hidden_size);
    let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next()).collect() };
    let x = Tensor::<AB, 3>::from_data(
        TensorData::new(draw(b * s * hidden), [b, s, hidden]),
        &device,
    );
    let cot = Tensor::<AB, 3>::from_data(
        TensorData::new(draw(b * s * hidden), [b, s, hidden]),
        &device,
    );
    // Row 0: 4 left-padding tokens; row 1: 3 right-padding tokens. Outputs at padding positions
    // differ by design (the fast op lets a padding query see only itself, the materialised path
    // every unpadded earlier key, or all keys where there is none), and nothing reads them.
    let mask: Vec<i64> = (0..b * s)
        .map(|i| {
            let (row, j) = (i / s, i % s);
            i64::from(if row == 0 { j >= 4 } else { j < s - 3 })
        })
        .collect();
    let mask = Tensor::<AB, 2, Int>::from_data(TensorData::new(mask, [b, s]), &device);
    let live = mask.clone().float().reshape([b, s, 1]);
    let cot = cot * live.clone();

    let run = |flash| hidden_and_input_grad(&model, &x, Some(&mask), None, (&cot, &live), flash);
    let (h_fast, dx_fast) = run(true);
    let (h_ref, dx_ref) = run(false);
    assert!(rel_error("hidden states", values(h_fast), values(h_ref)) <= 1e-4);
    assert!(rel_error("input gradient", dx_fast, dx_ref) <= 1e-4);

    // Generation: the cached pass keeps the materialised mask, and its logits for a sequence fed
    // in two pieces match the uncached (fast) pass.
    flash_attention::set_flash_enabled(true);
    let ids: Vec<i64> = (0..s as i64).map(|i| (i * 7 + 3) % 50).collect();
    let ids = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids, [1, s]), &device);
    let full = model.forward(ids.clone(), None).inner();
    let mut cache = KvCache::new(model.num_layers());
    let first = model.forward_cached(ids.clone().slice([0..1, 0..10]), &mut cache);
    let second = model.forward_cached(ids.slice([0..1, 10..s]), &mut cache);
    let pieces = Tensor::cat(vec![first.inner(), second.inner()], 1);
    assert!(rel_error("cached vs uncached logits", values(pieces), values(full)) <= 1e-4);
}

/// Two packed rows (documents of 9, 1 and 13 tokens; 15 tokens and 8 of right padding): the
/// fast path's hidden states and input gradient match the materialised path's, also without
/// the padding mask (the padding then one more document, the documents' runs known on the
/// host: the trainer's packed batches), and each document's hidden states are those of the
/// document alone.
#[test]
fn packed_documents_agree_across_paths_and_with_each_alone() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let config = LlamaConfig::from_json_str(CONFIG, Path::new("test-config.json")).unwrap();
    let mut rng = Rng(12);
    let model = build_model::<AB>(&config, &mut rng, &device).unwrap();
    let (b, s, hidden) = (2, 23, config.hidden_size);
    let ids: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 11 + 5) % 50).collect();
    let labels: Vec<i64> = (0..b * s)
        .map(|i| match (i / s, i % s) {
            (0, j) if j < 9 => 0,
            (0, 9) => 1,
            (0, _) => 2,
            (_, j) if j < 15 => 3,
            _ => 4,
        })
        .collect();
    let mask: Vec<i64> = (0..b * s)
        .map(|i| i64::from(i / s == 0 || i % s < 15))
        .collect();
    let int = |values: &[i64], shape: [usize; 2]| {
        Tensor::<AB, 2, Int>::from_data(TensorData::new(values.to_vec(), shape), &device)
    };
    let documents = PackedDocuments::<AB>::from_labels(&labels, [b, s], &device);
    let mask = int(&mask, [b, s]);
    let live = mask.clone().float().reshape([b, s, 1]);

    let x = model.embed_tokens.forward(int(&ids, [b, s])).detach();
    let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next()).collect() };
    let cot = Tensor::<AB, 3>::from_data(
        TensorData::new(draw(b * s * hidden), [b, s, hidden]),
        &device,
    ) * live.clone();
    let run = |flash, mask| {
        let documents = Some(&documents);
        hidden_and_input_grad(&model, &x, mask, documents, (&cot, &live), flash)
    };
    let (h_fast, dx_fast) = run(true, Some(&mask));
    let (h_ref, dx_ref) = run(false, Some(&mask));
    let (h_runs, dx_runs) = run(true, None);
    assert!(
        rel_error(
            "packed hidden states over runs",
            values(h_runs),
            values(h_ref.clone())
        ) <= 1e-4
    );
    assert!(rel_error("packed input gradient over runs", dx_runs, dx_ref.clone()) <= 1e-4);
    assert!(
        rel_error(
            "packed hidden states",
            values(h_fast.clone()),
            values(h_ref)
        ) <= 1e-4
    );
    assert!(rel_error("packed input gradient", dx_fast, dx_ref) <= 1e-4);

    flash_attention::set_flash_enabled(true);
    for (row, start, len) in [(0, 0, 9), (0, 9, 1), (0, 10, 13), (1, 0, 15)] {
        let doc = &ids[row * s + start..row * s + start + len];
        let alone = model.hidden_states(int(doc, [1, len]), None).inner();
        let packed = h_fast
            .clone()
            .slice([row..row + 1, start..start + len, 0..hidden]);
        let what = format!("document at row {row}, {start}..{}", start + len);
        assert!(rel_error(&what, values(packed), values(alone)) <= 1e-4);
    }
}

/// Gradient checkpointing through the model with every projection carrying LoRA, so the MLP
/// takes the fused op: the recompute in backward (where the MLP skips its output's values,
/// [`checkpointing::recomputing`]) gives the LoRA gradients of layers run without checkpointing,
/// and the forward's hidden states are unchanged.
#[test]
fn checkpointed_layers_give_the_gradients_of_plain_layers() {
    let _switches = fused_mlp::switch_lock();
    let Some(device) = vulkan_test_device() else {
        return;
    };
    assert!(checkpointing::is_supported::<AB>() && fused_mlp::fused_backend::<AB>());
    let config = LlamaConfig::from_json_str(CONFIG, Path::new("test-config.json")).unwrap();
    let mut rng = Rng(13);
    let mut model = build_model::<AB>(&config, &mut rng, &device).unwrap();
    let rank = 4;
    let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next() * 0.3).collect() };
    for layer in &mut model.layers {
        for proj in layer.projections_mut() {
            let (d_in, d_out) = (proj.d_input(), proj.d_output());
            let factor = |values: Vec<f32>, shape: [usize; 2]| {
                Tensor::<AB, 2>::from_data(TensorData::new(values, shape), &device)
            };
            let a = factor(draw(rank * d_in), [rank, d_in]);
            let b = factor(draw(d_out * rank), [d_out, rank]);
            *proj = proj.clone().with_adapter(LoraAdapter::new(a, b, 2.0, 0.0));
        }
    }
    let (b, s, hidden) = (2, 19, config.hidden_size);
    let ids: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 13 + 1) % 50).collect();
    let ids = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
    let cot = Tensor::<AB, 3>::from_data(
        TensorData::new(draw(b * s * hidden), [b, s, hidden]),
        &device,
    );

    let run = |mode: CheckpointMode| {
        let mut model = model.clone();
        model.checkpointing = mode;
        let h = model.hidden_states(ids.clone(), None);
        let grads = (h.clone() * cot.clone()).sum().backward();
        let lora_grads: Vec<Vec<f32>> = model
            .layers
            .iter()
            .flat_map(|layer| layer.projections())
            .flat_map(|proj| {
                let adapter = proj.adapter.as_ref().expect("attached above");
                [adapter.lora_a.val(), adapter.lora_b.val()]
            })
            .map(|t| values(t.grad(&grads).expect("a LoRA gradient")))
            .collect();
        (values(h.inner()), lora_grads)
    };
    let (h_off, grads_off) = run(CheckpointMode::Off);
    for mode in [CheckpointMode::Recompute, CheckpointMode::HostOffload] {
        let (h, grads) = run(mode);
        assert!(rel_error(&format!("{mode:?} hidden states"), h, h_off.clone()) <= 1e-5);
        for (k, (got, want)) in grads.into_iter().zip(&grads_off).enumerate() {
            let what = format!("{mode:?} LoRA gradient {k}");
            assert!(rel_error(&what, got, want.clone()) <= 1e-5);
        }
    }
}
