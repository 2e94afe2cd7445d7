//! The model's attention wiring on Burn's wgpu backend (f32, lavapipe in CPU CI): a small random
//! GQA Llama gives the same hidden states and input gradients with the linear-memory attention
//! as with the materialised one, with left and right padding; the cached (generation) pass keeps
//! the materialised attention and agrees with the uncached logits.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::prelude::*;
use fastlora_llama::{KvCache, LlamaConfig, ModelError, WeightSource, build_model};
use fused_mlp::{WgpuBackend, vulkan_test_device};

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

#[test]
fn model_attention_paths_agree() {
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
    // Row 0: 4 left-padding tokens (those queries see no key); row 1: 3 right-padding tokens.
    let mask: Vec<i64> = (0..b * s)
        .map(|i| {
            let (row, j) = (i / s, i % s);
            i64::from(if row == 0 { j >= 4 } else { j < s - 3 })
        })
        .collect();
    let live: Vec<f32> = (0..b * s)
        .map(|i| f32::from(!(i / s == 0 && i % s < 4)))
        .collect();
    let live = Tensor::<AB, 3>::from_data(TensorData::new(live, [b, s, 1]), &device);
    let mask = Tensor::<AB, 2, Int>::from_data(TensorData::new(mask, [b, s]), &device);
    let cot = cot * live.clone();

    let run = |flash: bool| {
        flash_attention::set_flash_enabled(flash);
        let x = x.clone().require_grad();
        let ctx = model.context(&x, Some(mask.clone()), 0);
        assert_eq!(ctx.mask.is_none(), flash, "the context picks the path");
        let mut h = x.clone();
        for layer in &model.layers {
            h = layer.forward(h, &model.rope, &ctx);
        }
        let h = model.norm.forward(h);
        let grads = (h.clone() * cot.clone()).sum().backward();
        let dx = x.grad(&grads).expect("dx");
        (values((h * live.clone()).inner()), values(dx))
    };
    let (h_fast, dx_fast) = run(true);
    let (h_ref, dx_ref) = run(false);
    assert!(rel_error("hidden states", h_fast, h_ref) <= 1e-4);
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
