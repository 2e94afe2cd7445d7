//! Bad input never panics: each case returns an error that names the file, tensor or field.

mod common;

use common::{B, RawTensor, copy_fixture, fixture, read_raw, write_raw};
use fastlora::{FastLanguageModel, LoraConfig, PeftModel};

fn load(dir: &std::path::Path) -> String {
    match FastLanguageModel::<B>::from_pretrained(dir.to_str().unwrap(), &Default::default()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error `{message}` does not mention `{part}`"
        );
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (_tmp, dir) = copy_fixture("llama-tiny");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load(&dir), &["model.safetensors"]);
}

#[test]
fn corrupt_header_names_the_file() {
    let (_tmp, dir) = copy_fixture("llama-tiny");
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&file, &bytes).unwrap();
    assert_mentions(&load(&dir), &["model.safetensors"]);
    // A header length larger than the file.
    std::fs::write(&file, u64::MAX.to_le_bytes()).unwrap();
    assert_mentions(&load(&dir), &["model.safetensors"]);
}

fn alter(dir: &std::path::Path, f: impl Fn(&mut Vec<RawTensor>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = read_raw(&file);
    f(&mut tensors);
    write_raw(&file, &tensors);
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let (_tmp, dir) = copy_fixture("llama-tiny");
    alter(&dir, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "model.layers.1.self_attn.k_proj.weight")
            .unwrap();
        t.shape = vec![64, 32];
    });
    assert_mentions(
        &load(&dir),
        &["model.layers.1.self_attn.k_proj.weight", "32", "64"],
    );
}

#[test]
fn wrong_dtype_names_tensor() {
    let (_tmp, dir) = copy_fixture("llama-tiny");
    alter(&dir, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "model.norm.weight")
            .unwrap();
        t.dtype = safetensors::Dtype::I32;
    });
    assert_mentions(&load(&dir), &["model.norm.weight"]);
}

#[test]
fn missing_tensor_names_it() {
    let (_tmp, dir) = copy_fixture("llama-tiny");
    alter(&dir, |ts| {
        ts.retain(|t| t.name != "model.layers.2.mlp.down_proj.weight")
    });
    assert_mentions(&load(&dir), &["model.layers.2.mlp.down_proj.weight"]);
}

#[test]
fn missing_shard_names_it() {
    let (_tmp, dir) = copy_fixture("llama-tiny-sharded-bf16");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    assert_mentions(&load(&dir), &["model-00002-of-00003.safetensors"]);
}

#[test]
fn malformed_config_json_names_file_and_line() {
    let (_tmp, dir) = copy_fixture("llama-tiny");
    std::fs::write(
        dir.join("config.json"),
        "{\n  \"model_type\": \"llama\",\n  \"hidden_size\": 64,,\n}",
    )
    .unwrap();
    assert_mentions(&load(&dir), &["config.json", ":3:"]);
}

#[test]
fn missing_config_field_names_it() {
    let (_tmp, dir) = copy_fixture("llama-tiny");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    assert_mentions(&load(&dir), &["config.json", "num_hidden_layers"]);
}

fn base() -> FastLanguageModel<B> {
    FastLanguageModel::from_pretrained(fixture("llama-tiny").to_str().unwrap(), &Default::default())
        .unwrap()
}

#[test]
fn invalid_lora_values_name_the_field_and_what_is_allowed() {
    let unknown = LoraConfig::builder()
        .target_modules(["q_proj", "qkv_proj"])
        .build()
        .unwrap();
    let err = base().get_peft_model(unknown).unwrap_err().to_string();
    assert_mentions(&err, &["qkv_proj", "q_proj", "down_proj"]);
    let out_of_range = LoraConfig::builder()
        .layers_to_transform([0, 3])
        .build()
        .unwrap();
    let err = base().get_peft_model(out_of_range).unwrap_err().to_string();
    assert_mentions(&err, &["layers_to_transform", "3"]);
    let bad_save = LoraConfig {
        modules_to_save: Some(vec!["norm".into()]),
        ..LoraConfig::default()
    };
    let err = base().get_peft_model(bad_save).unwrap_err().to_string();
    assert_mentions(
        &err,
        &["modules_to_save", "norm", "embed_tokens", "lm_head"],
    );
    let zero_rank = LoraConfig {
        r: 0,
        ..LoraConfig::default()
    };
    assert_mentions(
        &base().get_peft_model(zero_rank).unwrap_err().to_string(),
        &["r"],
    );
    let bad_alpha = LoraConfig {
        lora_alpha: -1.0,
        ..LoraConfig::default()
    };
    assert_mentions(
        &base().get_peft_model(bad_alpha).unwrap_err().to_string(),
        &["lora_alpha"],
    );
    let bad_dropout = LoraConfig {
        lora_dropout: 1.0,
        ..LoraConfig::default()
    };
    assert_mentions(
        &base().get_peft_model(bad_dropout).unwrap_err().to_string(),
        &["lora_dropout"],
    );
}

fn load_adapter(dir: &std::path::Path) -> String {
    match PeftModel::from_pretrained(base(), dir) {
        Ok(_) => panic!("adapter {} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn adapter_missing_or_unexpected_or_misshapen_tensor() {
    let key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    let (_tmp, dir) = copy_fixture("llama-tiny-lora");
    let file = dir.join("adapter_model.safetensors");
    let original = read_raw(&file);

    let mut tensors = read_raw(&file);
    tensors.retain(|t| t.name != key);
    write_raw(&file, &tensors);
    assert_mentions(&load_adapter(&dir), &["adapter_model.safetensors", key]);

    let mut tensors = read_raw(&fixture("llama-tiny-lora/adapter_model.safetensors"));
    let t = tensors.iter_mut().find(|t| t.name == key).unwrap();
    t.shape = vec![88, 16];
    write_raw(&file, &tensors);
    assert_mentions(&load_adapter(&dir), &[key, "88"]);

    let mut tensors = original;
    tensors.push(RawTensor {
        name: "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight".into(),
        dtype: safetensors::Dtype::F32,
        shape: vec![1],
        bytes: vec![0; 4],
    });
    write_raw(&file, &tensors);
    assert_mentions(&load_adapter(&dir), &["unexpected", "rotary"]);
}

#[test]
fn malformed_adapter_config_names_file() {
    let (_tmp, dir) = copy_fixture("llama-tiny-lora");
    std::fs::write(
        dir.join("adapter_config.json"),
        "{\"r\": 8, \"peft_type\": \"LORA\"",
    )
    .unwrap();
    assert_mentions(&load_adapter(&dir), &["adapter_config.json"]);
    std::fs::write(
        dir.join("adapter_config.json"),
        "{\"r\": \"eight\", \"peft_type\": \"LORA\"}",
    )
    .unwrap();
    assert_mentions(&load_adapter(&dir), &["adapter_config.json", "r"]);
}

#[test]
fn bad_input_ids_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("ids.safetensors");
    let out = tmp.path().join("out.safetensors");
    let run = |tensors: &[RawTensor]| {
        write_raw(&input, tensors);
        fastlora::logits_command::<B>(
            fixture("llama-tiny").to_str().unwrap(),
            None,
            &input,
            &out,
            &Default::default(),
        )
        .unwrap_err()
        .to_string()
    };
    let ids = |name: &str, dtype, shape: Vec<usize>, values: &[i64]| RawTensor {
        name: name.into(),
        dtype,
        shape,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let err = run(&[ids(
        "tokens",
        safetensors::Dtype::I64,
        vec![1, 3],
        &[1, 2, 3],
    )]);
    assert_mentions(&err, &["ids.safetensors", "input_ids"]);
    let err = run(&[ids(
        "input_ids",
        safetensors::Dtype::I64,
        vec![1, 3],
        &[1, 2, 999],
    )]);
    assert_mentions(&err, &["ids.safetensors", "999", "320"]);
    let err = run(&[ids(
        "input_ids",
        safetensors::Dtype::I64,
        vec![3],
        &[1, 2, 3],
    )]);
    assert_mentions(&err, &["ids.safetensors", "[batch, seq]"]);
    let err = run(&[ids(
        "input_ids",
        safetensors::Dtype::F64,
        vec![1, 3],
        &[1, 2, 3],
    )]);
    assert_mentions(&err, &["input_ids"]);
    assert!(!out.exists(), "no output is written on bad input");
}
