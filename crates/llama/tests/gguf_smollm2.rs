//! SmolLM2-135M-Instruct (Q4_1 GGUF): config, weights and tokenizer read from the GGUF file.
//! Skipped when `.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf` is absent.

use std::path::PathBuf;

use fastlora_llama::{
    GgufFile, GgufWeights, LlamaTokenizer, WeightSource, build_model, gguf_config, open_gguf,
};

fn model_path() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("skipping: {} is absent", path.display());
        None
    }
}

fn open() -> Option<GgufFile> {
    model_path().map(|p| open_gguf(&p).unwrap())
}

#[test]
fn config_comes_from_metadata() {
    let Some(file) = open() else { return };
    let config = gguf_config(&file).unwrap();
    assert_eq!(config.num_hidden_layers, 30);
    assert_eq!(config.hidden_size, 576);
    assert_eq!(config.intermediate_size, 1536);
    assert_eq!(config.num_attention_heads, 9);
    assert_eq!(config.num_key_value_heads, 3);
    assert_eq!(config.head_dim, 64);
    assert_eq!(config.vocab_size, 49152);
    assert_eq!(config.rope_theta, 100000.0);
    assert_eq!(config.rms_norm_eps, 1e-5);
    assert_eq!(config.max_position_embeddings, 8192);
    assert!(config.tie_word_embeddings);
    assert!(config.rope_scaling.is_none());
    assert!(!config.qkv_bias);
    assert_eq!(config.bos_token_id, Some(1));
    assert_eq!(config.eos_token_ids, vec![2]);
    assert_eq!(config.pad_token_id, Some(2));
    assert_eq!(config.raw["model_type"], "llama");
}

#[test]
fn every_tensor_maps_and_the_model_builds() {
    let Some(file) = open() else { return };
    let config = gguf_config(&file).unwrap();
    let n_tensors = file.tensors().len();
    let mut weights = GgufWeights::new(file, &config);
    // Tied: no lm_head.
    assert_eq!(
        weights.tensor("lm_head.weight", &[49152, 576]).unwrap(),
        None
    );
    // A wrong shape is an error naming the GGUF tensor.
    let error = weights
        .tensor("model.layers.0.self_attn.k_proj.weight", &[576, 576])
        .unwrap_err()
        .to_string();
    assert!(error.contains("blk.0.attn_k.weight"), "{error}");
    assert!(error.contains("SmolLM2-135M-Instruct.Q4_1.gguf"), "{error}");
    // 1 embedding + 1 final norm + 9 per layer.
    assert_eq!(n_tensors, 2 + 9 * 30);
    let model =
        build_model::<burn::backend::NdArray<f32>>(&config, &mut weights, &Default::default())
            .unwrap();
    assert_eq!(model.num_layers(), 30);
    assert!(model.lm_head.is_none());
}

#[test]
fn tokenizer_round_trips_and_knows_chatml_tokens() {
    let Some(file) = open() else { return };
    let tokenizer = LlamaTokenizer::from_gguf(&file).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(
        (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
        (Some(1), Some(2), Some(2))
    );
    assert_eq!(tokenizer.bos_token(), Some("<|im_start|>"));
    assert_eq!(tokenizer.eos_token(), Some("<|im_end|>"));
    assert!(tokenizer.chat_template().unwrap().contains("<|im_start|>"));

    let sample = "Hello, world! Größe naïve café — 東京は晴れ 🚀🦀 1234567\n\
                  fn main() {\n    println!(\"{}\", x + 42); // ok\n}\n\ttabs  and   spaces ";
    let ids = tokenizer.encode(sample, true).unwrap();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), sample);
    // SmolLM2 splits digits one by one.
    let digits = tokenizer.encode("2024", false).unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    // Known ids of the HF tokenizer.
    assert_eq!(tokenizer.encode("Hello", false).unwrap(), vec![19556]);
    assert_eq!(tokenizer.encode(" world", false).unwrap(), vec![905]);

    let start = tokenizer.encode("<|im_start|>", false).unwrap();
    let end = tokenizer.encode("<|im_end|>", false).unwrap();
    assert_eq!(start, vec![1]);
    assert_eq!(end, vec![2]);
    let chat = tokenizer
        .encode("<|im_start|>user\nHi<|im_end|>\n", false)
        .unwrap();
    assert_eq!(chat.first(), Some(&1));
    assert!(chat.contains(&2));
    assert_eq!(tokenizer.decode(&chat, true).unwrap(), "user\nHi\n");
}
