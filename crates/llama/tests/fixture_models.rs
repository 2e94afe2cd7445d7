//! Every fixture model resolves, and its config, checkpoint and tokenizer agree.

use std::path::PathBuf;

use fastlora_llama::{Checkpoint, LlamaConfig, LlamaTokenizer, resolve_model};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The tensors HF stores for `config`, with their shapes.
fn expected_tensors(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let hidden = config.hidden_size;
    let q_width = config.num_attention_heads * config.head_dim;
    let kv_width = config.num_key_value_heads * config.head_dim;
    let intermediate = config.intermediate_size;
    let mut tensors = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![config.vocab_size, hidden],
        ),
        ("model.norm.weight".to_string(), vec![hidden]),
    ];
    if !config.tie_word_embeddings {
        tensors.push((
            "lm_head.weight".to_string(),
            vec![config.vocab_size, hidden],
        ));
    }
    for layer in 0..config.num_hidden_layers {
        let mut push = |name: &str, shape: Vec<usize>| {
            tensors.push((format!("model.layers.{layer}.{name}"), shape));
        };
        let projections = [
            ("self_attn.q_proj", hidden, q_width, config.qkv_bias),
            ("self_attn.k_proj", hidden, kv_width, config.qkv_bias),
            ("self_attn.v_proj", hidden, kv_width, config.qkv_bias),
            ("self_attn.o_proj", q_width, hidden, config.o_bias),
            ("mlp.gate_proj", hidden, intermediate, config.mlp_bias),
            ("mlp.up_proj", hidden, intermediate, config.mlp_bias),
            ("mlp.down_proj", intermediate, hidden, config.mlp_bias),
        ];
        for (name, inputs, outputs, bias) in projections {
            push(&format!("{name}.weight"), vec![outputs, inputs]);
            if bias {
                push(&format!("{name}.bias"), vec![outputs]);
            }
        }
        push("input_layernorm.weight", vec![hidden]);
        push("post_attention_layernorm.weight", vec![hidden]);
    }
    tensors
}

#[test]
fn fixture_models_load_consistently() {
    for name in [
        "llama-tiny",
        "llama-tiny-sharded-bf16",
        "qwen2-tiny",
        "qwen2-tiny-f16",
    ] {
        let dir = resolve_model(fixture(name).to_str().unwrap()).unwrap();
        let config = LlamaConfig::load(&dir).unwrap();
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let expected = expected_tensors(&config);
        let mut expected_names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        expected_names.sort_unstable();
        assert_eq!(
            checkpoint.names().collect::<Vec<_>>(),
            expected_names,
            "{name}"
        );
        let mut stored = 0;
        for (tensor, shape) in &expected {
            stored += checkpoint.read_f32(tensor, shape).unwrap().len();
        }
        assert_eq!(stored, config.num_parameters(), "{name}");

        let tokenizer = LlamaTokenizer::load(&dir).unwrap();
        assert!(tokenizer.vocab_size() <= config.vocab_size, "{name}");
        assert_eq!(tokenizer.pad_id(), config.pad_token_id, "{name}");
        assert_eq!(
            tokenizer.eos_id().into_iter().collect::<Vec<_>>(),
            config.eos_token_ids
        );
    }
}
