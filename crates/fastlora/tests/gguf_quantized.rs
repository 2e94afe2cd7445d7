//! A GGUF model with its quantized base kept packed (`LoadOptions::quantized_base`): the same
//! logits and LoRA gradients as the dense load, in a fraction of the memory; and GGUF failures
//! as `ModelError::Gguf` naming the file.
//!
//! The SmolLM2 test is skipped when `.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf` is absent.

use std::path::PathBuf;

use burn::prelude::*;
use fastlora::lora_config::InitLoraWeights;
use fastlora::{
    CpuBackend, FastLanguageModel, FastLoraError, LoadOptions, LoraConfig, PeftModel,
    llama::{ModelError, causal_lm_loss},
};

type B = CpuBackend;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> Option<PathBuf> {
    let path = repo_root().join(".cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("skipping: {} is absent", path.display());
        None
    }
}

/// `a` and `b` agree to 1e-6 relative (of the larger magnitude, at least 1).
fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let scale = x.abs().max(y.abs()).max(1.0);
        assert!((x - y).abs() <= 1e-6 * scale, "{what}[{i}]: {x} vs {y}");
    }
}

fn values<const D: usize, Bk: Backend>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Every LoRA factor's gradient after one backward of the causal-LM loss on `ids`.
fn lora_gradients(peft: &PeftModel<B>, ids: &Tensor<B, 2, Int>) -> Vec<(String, Vec<f32>)> {
    let model = peft.model();
    let loss = causal_lm_loss(model.forward(ids.clone(), None), ids.clone());
    let grads = loss.backward();
    let mut out = Vec::new();
    for (name, proj) in model.projections() {
        let adapter = proj.adapter.as_ref().expect("every projection is a target");
        for (factor, param) in [("lora_A", &adapter.lora_a), ("lora_B", &adapter.lora_b)] {
            let grad = param
                .val()
                .grad(&grads)
                .expect("a LoRA factor gets a gradient");
            out.push((format!("{name}.{factor}"), values(grad)));
        }
    }
    out
}

#[test]
fn smollm2_quantized_base_matches_the_dense_model() {
    let Some(path) = smollm2() else { return };
    let path = path.to_str().unwrap();
    let device = Default::default();
    let dense = FastLanguageModel::<B>::from_pretrained(path, &device).unwrap();
    let quantized = FastLanguageModel::<B>::from_pretrained_with(
        path,
        LoadOptions {
            quantized_base: true,
        },
        &device,
    )
    .unwrap();

    let report = quantized.base_memory_report();
    eprintln!("{report}");
    assert_eq!(report.packed_tensors, 30 * 7);
    assert_eq!(report.formats, ["Q4_1"]);
    assert!(report.saved_fraction() > 0.75, "{report}");
    assert_eq!(dense.base_memory_report().packed_tensors, 0);

    let tokenizer = quantized.tokenizer.as_ref().unwrap();
    let prompt = tokenizer.encode("The capital of France is", false).unwrap();
    let ids: Vec<i64> = prompt.iter().map(|&id| i64::from(id)).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, prompt.len()]), &device);
    let logits = |model: &FastLanguageModel<B>| values(model.model.forward(ids.clone(), None));
    let (want, got) = (logits(&dense), logits(&quantized));
    eprintln!("logits bit-identical: {}", want == got);
    assert_close(&want, &got, "logits");

    // One LoRA training step's gradients: random A and B so that both factors get some.
    let config = || {
        LoraConfig::builder()
            .r(4)
            .lora_alpha(8.0)
            .target_all_linear()
            .init_lora_weights(InitLoraWeights::Random)
            .build()
            .unwrap()
    };
    let dense = dense.get_peft_model(config()).unwrap();
    let quantized = quantized.get_peft_model(config()).unwrap();
    let (want, got) = (
        lora_gradients(&dense, &ids),
        lora_gradients(&quantized, &ids),
    );
    assert_eq!(want.len(), 30 * 7 * 2);
    for ((name, want), (_, got)) in want.iter().zip(&got) {
        assert!(want.iter().all(|g| g.is_finite()), "{name}: non-finite");
        assert!(want.iter().any(|&g| g != 0.0), "{name}: all zero");
        assert_close(want, got, name);
    }
}

#[test]
fn quantized_base_needs_a_gguf_file() {
    let folder = repo_root().join("tests/fixtures/llama-tiny");
    let options = LoadOptions {
        quantized_base: true,
    };
    let error = FastLanguageModel::<B>::from_pretrained_with(
        folder.to_str().unwrap(),
        options,
        &Default::default(),
    )
    .unwrap_err();
    match &error {
        FastLoraError::Model(ModelError::Unsupported { path, .. }) => assert_eq!(path, &folder),
        other => panic!("expected Unsupported, got {other}"),
    }
    assert!(
        error.to_string().contains("GGUF") || error.to_string().contains(".gguf"),
        "{error}"
    );
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A small valid GGUF v3 file: two metadata keys and one 2×32 F32 tensor.
fn small_gguf() -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes()); // tensors
    out.extend(2u64.to_le_bytes()); // metadata keys
    write_str(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // STRING
    write_str(&mut out, "llama");
    write_str(&mut out, "llama.block_count");
    out.extend(4u32.to_le_bytes()); // UINT32
    out.extend(1u32.to_le_bytes());
    write_str(&mut out, "token_embd.weight");
    out.extend(2u32.to_le_bytes()); // dims, fastest first
    out.extend(32u64.to_le_bytes());
    out.extend(2u64.to_le_bytes());
    out.extend(0u32.to_le_bytes()); // F32
    out.extend(0u64.to_le_bytes()); // offset in the data section
    out.resize(out.len().next_multiple_of(32), 0);
    out.extend((0..64).flat_map(|i| (i as f32 * 0.5).to_le_bytes()));
    out
}

#[test]
fn truncated_gguf_is_a_gguf_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_gguf();
    let whole = dir.path().join("whole.gguf");
    std::fs::write(&whole, &bytes).unwrap();
    fastlora::llama::open_gguf(&whole).expect("the untruncated file is valid");
    // Cut in the header, the metadata, the tensor info and the tensor data.
    for cut in [3, 20, 60, 110, bytes.len() - 1] {
        let path = dir.path().join(format!("cut-{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let error =
            FastLanguageModel::<B>::from_pretrained(path.to_str().unwrap(), &Default::default())
                .unwrap_err();
        let text = error.to_string();
        match error {
            FastLoraError::Model(ModelError::Gguf { path: at, .. }) => assert_eq!(at, path),
            other => panic!("cut at {cut}: expected a GGUF error, got {other}"),
        }
        assert!(
            text.starts_with(&format!("{}: GGUF: ", path.display())),
            "{text}"
        );
    }
}
