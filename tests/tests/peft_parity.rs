//! f32 CPU parity with transformers + PEFT: base logits and loss, adapter logits, LoRA and
//! `modules_to_save` gradients, merged logits. References: `tests/fixtures` (see its README).

mod common;

use common::{B, Reference, assert_close, fixture, input_ids, values};
use fastlora::llama::causal_lm_loss;
use fastlora::{FastLanguageModel, PeftModel};

fn base(dir: &str) -> FastLanguageModel<B> {
    FastLanguageModel::from_pretrained(fixture(dir).to_str().unwrap(), &Default::default())
        .unwrap_or_else(|e| panic!("loading {dir}: {e}"))
}

fn check_base(dir: &str) {
    let model = base(dir);
    let reference = Reference::open(&format!("{dir}/reference.safetensors"));
    let ids = input_ids(&Default::default());
    let logits = model.model.forward(ids.clone(), None);
    assert_close(
        &format!("{dir} logits"),
        &values(logits.clone()),
        &reference.f32("logits").0,
        1e-5,
    );
    let loss = causal_lm_loss(logits, ids);
    assert_close(
        &format!("{dir} loss"),
        &values(loss),
        &reference.f32("loss").0,
        1e-5,
    );
}

#[test]
fn llama_base_logits_match_transformers() {
    check_base("llama-tiny");
}

#[test]
fn llama_hidden_states_match_layer_by_layer() {
    let model = base("llama-tiny");
    let reference = Reference::open("llama-tiny/reference.safetensors");
    let ids = input_ids(&Default::default());
    let mut x = model.model.embed_tokens.forward(ids);
    assert_close(
        "hidden.0",
        &values(x.clone()),
        &reference.f32("hidden.0").0,
        1e-6,
    );
    let ctx = model.model.context(&x, None, None, 0);
    for (i, layer) in model.model.layers.iter().enumerate() {
        x = layer.forward(x, &ctx);
        assert_close(
            &format!("hidden.{}", i + 1),
            &values(x.clone()),
            &reference.f32(&format!("hidden.{}", i + 1)).0,
            1e-5,
        );
    }
}

#[test]
fn qwen2_base_with_biases_and_tied_embeddings_matches() {
    check_base("qwen2-tiny");
}

#[test]
fn sharded_bf16_checkpoint_loads_exactly() {
    check_base("llama-tiny-sharded-bf16");
}

#[test]
fn f16_checkpoint_loads_exactly() {
    check_base("qwen2-tiny-f16");
}

/// Loads `adapter` onto `base_dir`, then checks logits, loss, every gradient in the reference,
/// and the merged model's logits.
fn check_adapter(base_dir: &str, adapter: &str) {
    let peft = PeftModel::from_pretrained(base(base_dir), fixture(adapter)).unwrap();
    let reference = Reference::open(&format!("{adapter}/reference.safetensors"));
    let ids = input_ids(&Default::default());
    let logits = peft.model().forward(ids.clone(), None);
    assert_close(
        &format!("{adapter} logits"),
        &values(logits.clone()),
        &reference.f32("logits").0,
        1e-5,
    );
    let loss = causal_lm_loss(logits, ids.clone());
    assert_close(
        &format!("{adapter} loss"),
        &values(loss.clone()),
        &reference.f32("loss").0,
        1e-5,
    );

    let grads = loss.backward();
    let mut checked = 0;
    for (key, param) in peft.adapter_parameters() {
        let want = reference.f32(&format!("grad.{key}")).0;
        let got = param
            .grad(&grads)
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        assert_close(
            &format!("grad.{key}"),
            &got.to_vec::<f32>().unwrap(),
            &want,
            1e-4,
        );
        checked += 1;
    }
    let expected = reference
        .names()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .count();
    assert_eq!(checked, expected, "every reference gradient is checked");

    let merged = peft.merge_and_unload();
    let merged_logits = merged.model.forward(ids, None);
    assert_close(
        &format!("{adapter} merged"),
        &values(merged_logits.clone()),
        &reference.f32("merged_logits").0,
        1e-5,
    );
    assert_close(
        &format!("{adapter} merged vs unmerged"),
        &values(merged_logits),
        &reference.f32("logits").0,
        1e-5,
    );
}

#[test]
fn lora_all_projections_matches_peft() {
    check_adapter("llama-tiny", "llama-tiny-lora");
}

#[test]
fn rslora_with_layer_selection_and_patterns_matches_peft() {
    check_adapter("llama-tiny", "llama-tiny-rslora");
}

#[test]
fn modules_to_save_matches_peft() {
    check_adapter("llama-tiny", "llama-tiny-mts");
}

#[test]
fn qwen2_lora_matches_peft() {
    check_adapter("qwen2-tiny", "qwen2-tiny-lora");
}
