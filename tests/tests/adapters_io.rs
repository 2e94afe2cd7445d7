//! PEFT adapter directories: byte-level round trips, seeded initialisation, re-application,
//! parameter counts, and merged-model export.

mod common;

use common::{B, Reference, assert_close, fixture, input_ids, read_raw, values};
use fastlora::llama::FloatDtype;
use fastlora::lora_config::{Bias, InitLoraWeights};
use fastlora::{FastLanguageModel, LoraConfig, PeftModel};

/// The PEFT-made fixture adapters and the base each belongs to.
const PEFT_ADAPTERS: [(&str, &str); 4] = [
    ("llama-tiny", "llama-tiny-lora"),
    ("llama-tiny", "llama-tiny-rslora"),
    ("llama-tiny", "llama-tiny-mts"),
    ("qwen2-tiny", "qwen2-tiny-lora"),
];

fn base(dir: &str) -> FastLanguageModel<B> {
    FastLanguageModel::from_pretrained(fixture(dir).to_str().unwrap(), &Default::default()).unwrap()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// PEFT writes `target_modules` (a Python set) in arbitrary order: compare it as a set.
fn sorted_targets(mut config: serde_json::Value) -> serde_json::Value {
    if let Some(list) = config["target_modules"].as_array_mut() {
        list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
    config
}

#[test]
fn peft_adapters_round_trip_unchanged() {
    for (model, adapter) in PEFT_ADAPTERS {
        let peft = PeftModel::from_pretrained(base(model), fixture(adapter)).unwrap();
        let out = tempfile::tempdir().unwrap();
        peft.save_pretrained(out.path()).unwrap();
        let ours = read_raw(&out.path().join("adapter_model.safetensors"));
        let theirs = read_raw(&fixture(adapter).join("adapter_model.safetensors"));
        assert_eq!(ours.len(), theirs.len(), "{adapter}: tensor count");
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(
                (&a.name, &a.shape, a.dtype),
                (&b.name, &b.shape, b.dtype),
                "{adapter}"
            );
            assert_eq!(a.bytes, b.bytes, "{adapter}: values of {}", a.name);
        }
        let ours = json(&out.path().join("adapter_config.json"));
        let theirs = sorted_targets(json(&fixture(adapter).join("adapter_config.json")));
        assert_eq!(ours, theirs, "{adapter}: adapter_config.json");
        let bytes = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
    }
}

#[test]
fn fresh_adapter_saves_and_loads_to_identical_logits() {
    let config = LoraConfig {
        init_lora_weights: InitLoraWeights::Random,
        modules_to_save: Some(vec!["lm_head".into()]),
        bias: Bias::All,
        ..LoraConfig::default()
    };
    let peft = base("qwen2-tiny").get_peft_model(config).unwrap();
    let ids = input_ids(&Default::default());
    let before = values(peft.model().forward(ids.clone(), None));
    let out = tempfile::tempdir().unwrap();
    peft.save_pretrained(out.path()).unwrap();
    let names: Vec<String> = read_raw(&out.path().join("adapter_model.safetensors"))
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(names.contains(&"base_model.model.lm_head.weight".to_string()));
    assert!(
        names.contains(
            &"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias".to_string()
        )
    );
    let loaded = PeftModel::from_pretrained(base("qwen2-tiny"), out.path()).unwrap();
    assert_eq!(values(loaded.model().forward(ids, None)), before);
}

#[test]
fn same_random_state_gives_the_same_adapter() {
    let draw = |seed: u64| {
        let config = LoraConfig {
            random_state: seed,
            init_lora_weights: InitLoraWeights::Random,
            ..LoraConfig::default()
        };
        base("llama-tiny")
            .get_peft_model(config)
            .unwrap()
            .adapter_tensors()
    };
    let (a, b, c) = (draw(3407), draw(3407), draw(1));
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(va, vb, "{ka}");
    }
    assert_ne!(a[0].1, c[0].1);
}

#[test]
fn reapplying_get_peft_model() {
    let config = LoraConfig::default();
    let peft = base("llama-tiny").get_peft_model(config.clone()).unwrap();
    let again = peft.clone().get_peft_model(config).unwrap();
    assert!(
        again
            .report
            .notices
            .iter()
            .any(|n| n.contains("Already have LoRA adapters"))
    );
    let err = peft
        .get_peft_model(LoraConfig {
            r: 32,
            ..LoraConfig::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("differ") && err.contains("`r`: requested 32, existing 16"),
        "{err}"
    );
}

#[test]
fn trainable_parameter_counts_match_peft() {
    // `n_params` in summary.json is PEFT's trainable count for each fixture adapter.
    let summary = json(&fixture("summary.json"));
    for (model, adapter) in PEFT_ADAPTERS {
        let peft = PeftModel::from_pretrained(base(model), fixture(adapter)).unwrap();
        let counts = peft.parameter_counts();
        assert_eq!(
            counts.trainable as u64,
            summary[adapter]["n_params"].as_u64().unwrap(),
            "{adapter}"
        );
    }
}

#[test]
fn embed_tokens_target_moves_to_modules_to_save() {
    let config = LoraConfig::builder()
        .target_modules(["q_proj", "embed_tokens"])
        .build()
        .unwrap();
    let peft = base("llama-tiny").get_peft_model(config).unwrap();
    assert_eq!(
        peft.lora_config.modules_to_save.as_deref(),
        Some(&["embed_tokens".to_string()][..])
    );
    assert!(
        peft.report
            .notices
            .iter()
            .any(|n| n.contains("embed_tokens"))
    );
    assert_eq!(peft.report.adapted_modules.len(), 3);
}

#[test]
fn merged_model_folder_reloads_with_merged_logits() {
    let peft = PeftModel::from_pretrained(base("qwen2-tiny"), fixture("qwen2-tiny-lora")).unwrap();
    let out = tempfile::tempdir().unwrap();
    peft.merge_and_unload()
        .save_pretrained(out.path(), FloatDtype::F32)
        .unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.path().join(file).is_file(), "{file} written");
    }
    let merged =
        FastLanguageModel::<B>::from_pretrained(out.path().to_str().unwrap(), &Default::default())
            .unwrap();
    let reference = Reference::open("qwen2-tiny-lora/reference.safetensors");
    let logits = values(merged.model.forward(input_ids(&Default::default()), None));
    assert_close(
        "reloaded merged logits",
        &logits,
        &reference.f32("merged_logits").0,
        1e-5,
    );
}

#[test]
fn print_trainable_parameters_is_peft_line() {
    // Lines printed by PEFT 0.21 on the GPU machine (tests/scripts/check_with_peft.py).
    let report = json(&fixture("fastlora-made/peft_check.json"));
    let mut checked = 0;
    for (model, adapter) in [
        ("llama-tiny", "llama-tiny-lora"),
        ("llama-tiny", "llama-tiny-rslora"),
        ("llama-tiny", "llama-tiny-mts"),
        ("qwen2-tiny", "qwen2-tiny-lora"),
        ("llama-tiny", "fastlora-made/llama-tiny-unsloth-defaults"),
        ("qwen2-tiny", "fastlora-made/qwen2-tiny-rslora-bias-mts"),
    ] {
        let name = adapter.trim_start_matches("fastlora-made/");
        let want = report["trainable_lines"][name].as_str().unwrap();
        let peft = PeftModel::from_pretrained(base(model), fixture(adapter)).unwrap();
        assert_eq!(peft.print_trainable_parameters(), want, "{adapter}");
        checked += 1;
    }
    assert_eq!(
        checked,
        report["trainable_lines"].as_object().unwrap().len()
    );
}

#[test]
fn peft_loaded_fastlora_adapters_and_they_are_still_what_fastlora_makes() {
    // check_with_peft.py loaded these fastlora-saved adapters in PEFT and got fastlora's
    // logits (and transformers loaded `fastlora merge` output): see the fixtures README.
    let report = json(&fixture("fastlora-made/peft_check.json"));
    for (name, _, _) in fastlora_tests::fastlora_made_adapters() {
        assert_eq!(report["fastlora_made"][name]["ok"], true, "{name}");
    }
    assert!(
        report["merged"]
            .as_object()
            .unwrap()
            .values()
            .all(|m| m["ok"] == true)
    );
    // The committed files must still be what fastlora makes today, or the record is stale.
    let out = tempfile::tempdir().unwrap();
    fastlora_tests::make_fastlora_adapters(out.path()).unwrap();
    for (name, _, _) in fastlora_tests::fastlora_made_adapters() {
        // Adapters are drawn on the host from a seeded stream: byte-identical everywhere.
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let fresh = std::fs::read(out.path().join(name).join(file)).unwrap();
            let committed = std::fs::read(fixture("fastlora-made").join(name).join(file)).unwrap();
            assert!(
                fresh == committed,
                "{name}/{file} differs from the committed fixture: rerun the example and the PEFT check"
            );
        }
        // Logits go through the CPU's matmul kernels, whose summation order may vary by machine.
        let fresh = read_raw(&out.path().join(name).join("logits.safetensors"));
        let committed = read_raw(
            &fixture("fastlora-made")
                .join(name)
                .join("logits.safetensors"),
        );
        let floats = |t: &common::RawTensor| -> Vec<f32> {
            t.bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        for (a, b) in fresh.iter().zip(&committed) {
            assert_close(&format!("{name}/{}", a.name), &floats(a), &floats(b), 1e-6);
        }
    }
}

#[test]
fn for_inference_turns_lora_dropout_off_and_for_training_back_on() {
    let config = LoraConfig {
        lora_dropout: 0.5,
        init_lora_weights: InitLoraWeights::Random,
        ..LoraConfig::default()
    };
    let peft = base("llama-tiny").get_peft_model(config).unwrap();
    let ids = input_ids(&Default::default());
    // Dropout on the autodiff backend draws new masks each call: two training passes differ.
    let train_a = values(peft.model().forward(ids.clone(), None));
    let train_b = values(peft.model().forward(ids.clone(), None));
    assert_ne!(train_a, train_b);
    let inference = peft.for_inference();
    assert!(!inference.is_training());
    let a = values(inference.model().forward(ids.clone(), None));
    assert_eq!(a, values(inference.model().forward(ids.clone(), None)));
    let training = inference.for_training();
    assert_ne!(values(training.model().forward(ids.clone(), None)), a);
}

#[test]
fn tied_embeddings_untie_for_a_trained_head_unless_ensure_weight_tying() {
    let ids = input_ids(&Default::default());
    let head_only = LoraConfig {
        modules_to_save: Some(vec!["lm_head".into()]),
        ..LoraConfig::default()
    };
    let peft = base("qwen2-tiny")
        .get_peft_model(head_only.clone())
        .unwrap();
    assert!(
        peft.model().lm_head.is_some(),
        "the trained head gets its own copy"
    );
    assert!(
        peft.report
            .notices
            .iter()
            .any(|n| n.contains("tied embeddings"))
    );
    let names: Vec<String> = peft.adapter_tensors().into_iter().map(|(k, _)| k).collect();
    assert!(names.contains(&"base_model.model.lm_head.weight".to_string()));

    let tied = LoraConfig {
        ensure_weight_tying: true,
        ..head_only
    };
    let peft = base("qwen2-tiny").get_peft_model(tied).unwrap();
    assert!(
        peft.model().lm_head.is_none(),
        "ensure_weight_tying keeps one matrix"
    );
    // The shared matrix is the trainable one: the loss reaches it through the head.
    let loss = fastlora::llama::causal_lm_loss(peft.model().forward(ids.clone(), None), ids);
    let grads = loss.backward();
    assert!(
        peft.model()
            .embed_tokens
            .weight
            .val()
            .grad(&grads)
            .is_some()
    );
}
