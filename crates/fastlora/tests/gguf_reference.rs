//! fastlora's GGUF import against transformers' own GGUF loading of the same file
//! (SmolLM2-135M-Instruct.Q4_1.gguf): tokenizer encodings, decodings and the chat template, and
//! the model's f32 logits on a chat prompt. The references were made on the GPU machine's CPU by
//! `tests/scripts/gguf_transformers_reference.py` (transformers 5.17 + gguf 0.19) and are
//! committed in `tests/fixtures/gguf/`. Skipped when the GGUF file is absent
//! (`tests/scripts/fetch_smollm2_gguf.sh` fetches it; CI does).

use std::path::PathBuf;

use burn::prelude::*;
use fastlora::llama::Checkpoint;
use fastlora::{ChatMessage, ChatTemplate, FastLanguageModel};
use serde_json::Value;

type B = burn::backend::NdArray<f32>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gguf_path() -> PathBuf {
    root().join(".cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn smollm2() -> Option<FastLanguageModel<B>> {
    let path = gguf_path();
    if !path.is_file() {
        eprintln!(
            "skipping: {} is absent (tests/scripts/fetch_smollm2_gguf.sh fetches it)",
            path.display()
        );
        return None;
    }
    Some(FastLanguageModel::from_pretrained(path.to_str().unwrap(), &Default::default()).unwrap())
}

fn reference() -> Value {
    let path = root().join("tests/fixtures/gguf/smollm2_tokenizer.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_matches_transformers_gguf_tokenizer() {
    let Some(model) = smollm2() else { return };
    let tokenizer = model.tokenizer.as_ref().unwrap();
    let reference = reference();
    let encodings = reference["encodings"].as_array().unwrap();
    assert!(encodings.len() >= 8);
    for case in encodings {
        let text = case["text"].as_str().unwrap();
        let plain = ids(&case["ids"]);
        assert_eq!(tokenizer.encode(text, false).unwrap(), plain, "{text:?}");
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            ids(&case["ids_with_special_tokens"]),
            "{text:?} with special tokens"
        );
        assert_eq!(
            tokenizer.decode(&plain, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode {text:?}"
        );
        assert_eq!(
            tokenizer.decode(&plain, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode {text:?} skipping special tokens"
        );
    }
    assert_eq!(
        tokenizer.vocab_size() as u64,
        reference["len"].as_u64().unwrap()
    );
    // transformers 5.17 reads this file's BOS as GGUF says (1) but reports EOS 1 and no pad
    // token, while the file's metadata (and the original HF tokenizer) say EOS = pad = 2,
    // `<|im_end|>`: fastlora follows the file.
    assert_eq!(
        tokenizer.bos_id().map(u64::from),
        reference["bos_token_id"].as_u64()
    );
    let file = fastlora::llama::open_gguf(&gguf_path()).unwrap();
    for (ours, key) in [
        (tokenizer.eos_id(), "tokenizer.ggml.eos_token_id"),
        (tokenizer.pad_id(), "tokenizer.ggml.padding_token_id"),
    ] {
        assert_eq!(ours, Some(file.get_u32(key).unwrap()), "{key}");
    }
    let chat = &reference["chat"];
    let template = ChatTemplate::from_tokenizer(tokenizer).unwrap().unwrap();
    let question = chat["messages"][0]["content"].as_str().unwrap();
    let rendered = template
        .render(&[ChatMessage::user(question)], true)
        .unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
}

#[test]
fn logits_match_transformers_gguf_loading() {
    let Some(model) = smollm2() else { return };
    let fixture = root().join("tests/fixtures/gguf/smollm2_logits.safetensors");
    let checkpoint = Checkpoint::open(&fixture).unwrap();
    let read = |name: &str| {
        let shape = checkpoint.shape(name).unwrap();
        (checkpoint.read_f32(name, &shape).unwrap(), shape)
    };
    let ids_shape = checkpoint.shape("input_ids").unwrap();
    let input_ids = checkpoint.read_i64("input_ids", &ids_shape).unwrap();
    // The fixture keeps every position's first `head` vocabulary columns and the last position's
    // whole row (the full [1, 37, 49152] would be 7 MB).
    let (head_logits, head_shape) = read("logits_head");
    let (last_logits, _) = read("logits_last");
    let device = Default::default();
    let seq = input_ids.len();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(input_ids, [1, seq]), &device);
    let logits = model.model.forward(ids, None);
    let vocab = logits.dims()[2];
    let head = head_shape[2];
    let ours_head = logits.clone().slice([0..1, 0..seq, 0..head]);
    let ours_last = logits.slice([0..1, seq - 1..seq, 0..vocab]);
    let to_vec = |t: Tensor<B, 3>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let ours: Vec<f32> = [to_vec(ours_head), to_vec(ours_last)].concat();
    let expected: Vec<f32> = [head_logits, last_logits].concat();
    assert_eq!(ours.len(), expected.len());
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("max |Δ| {worst:e}, max |logit| {scale}");
    assert!(
        worst <= 1e-4 * scale,
        "logits differ from transformers' by {worst} (> 1e-4 × {scale})"
    );
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |best, (i, &v)| if v > best.1 { (i, v) } else { best },
            )
            .0
    };
    assert_eq!(
        argmax(&ours[ours.len() - vocab..]),
        argmax(&expected[expected.len() - vocab..]),
        "next-token argmax"
    );
}

#[test]
fn export_writes_an_hf_folder_that_reloads_identically() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    model
        .save_pretrained(dir.path(), fastlora::llama::FloatDtype::F32)
        .unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    let reloaded =
        FastLanguageModel::<B>::from_pretrained(dir.path().to_str().unwrap(), &Default::default())
            .unwrap();
    let (ours, theirs) = (
        model.tokenizer.as_ref().unwrap(),
        reloaded.tokenizer.as_ref().unwrap(),
    );
    for case in reference()["encodings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            theirs.encode(text, true).unwrap(),
            ours.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(theirs.chat_template(), ours.chat_template());
    assert_eq!(
        (theirs.bos_id(), theirs.eos_id(), theirs.pad_id()),
        (ours.bos_id(), ours.eos_id(), ours.pad_id())
    );
    let device = Default::default();
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 9690, 28, 2], [1, 4]), &device);
    let a = model.model.forward(ids.clone(), None).into_data();
    let b = reloaded.model.forward(ids, None).into_data();
    assert_eq!(a, b, "f32 export must reload bit for bit");
}
