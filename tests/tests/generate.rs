//! Generation with a KV cache: cached logits equal the uncached forward pass, greedy decoding
//! equals an independent uncached decoder, merged and unmerged adapters decode alike, sampling
//! is deterministic per seed, stop tokens and context limits are honoured.

mod common;

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use common::{B, assert_close, fixture, values};
use fastlora::llama::{KvCache, LlamaForCausalLm};
use fastlora::{FastLanguageModel, GenerationConfig, GenerationError, PeftModel, generate};

const PROMPT: [u32; 7] = [11, 250, 3, 77, 140, 9, 301];

fn base(dir: &str) -> FastLanguageModel<B> {
    FastLanguageModel::from_pretrained(fixture(dir).to_str().unwrap(), &Default::default())
        .unwrap_or_else(|e| panic!("loading {dir}: {e}"))
}

fn with_adapter(dir: &str, adapter: &str) -> PeftModel<B> {
    PeftModel::from_pretrained(base(dir), fixture(adapter).to_str().unwrap())
        .unwrap_or_else(|e| panic!("loading {adapter}: {e}"))
        .for_inference()
}

fn ids(tokens: &[u32]) -> Tensor<B, 2, Int> {
    let tokens: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let len = tokens.len();
    Tensor::from_data(TensorData::new(tokens, [1, len]), &Default::default())
}

/// The logits of `tokens` fed in `chunks` (lengths summing to `tokens.len()`) through one cache,
/// concatenated along the sequence.
fn cached_logits(model: &LlamaForCausalLm<B>, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = KvCache::new(model.num_layers());
    let mut start = 0;
    let mut out = Vec::new();
    for &len in chunks {
        out.extend(values(
            model.forward_cached(ids(&tokens[start..start + len]), &mut cache),
        ));
        start += len;
        assert_eq!(cache.len(), start);
    }
    assert_eq!(start, tokens.len());
    out
}

fn check_cached_logits_match_forward(model: &LlamaForCausalLm<B>, what: &str) {
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 320).collect();
    let reference = values(model.forward(ids(&tokens), None));
    let one_by_one = vec![1; tokens.len()];
    for chunks in [&[20][..], &one_by_one, &[7, 1, 5, 1, 6]] {
        let got = cached_logits(model, &tokens, chunks);
        assert_close(
            &format!("{what}, chunks {chunks:?}"),
            &got,
            &reference,
            1e-5,
        );
    }
}

#[test]
fn cached_logits_match_forward_on_llama() {
    check_cached_logits_match_forward(&base("llama-tiny").model, "llama-tiny");
}

#[test]
fn cached_logits_match_forward_on_qwen2_with_biases_and_tied_head() {
    check_cached_logits_match_forward(&base("qwen2-tiny").model, "qwen2-tiny");
}

#[test]
fn cached_logits_match_forward_with_a_lora_adapter() {
    let peft = with_adapter("llama-tiny", "llama-tiny-lora");
    check_cached_logits_match_forward(peft.model(), "llama-tiny + lora");
}

/// Greedy decoding by re-running the uncached forward pass over the whole growing sequence.
fn greedy_without_cache(model: &LlamaForCausalLm<B>, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    for _ in 0..steps {
        let logits = model.forward(ids(&tokens), None);
        let [_, seq, vocab] = logits.dims();
        let last = values(logits.narrow(1, seq - 1, 1));
        assert_eq!(last.len(), vocab);
        let best = last
            .iter()
            .enumerate()
            .fold(0, |best, (id, &l)| if l > last[best] { id } else { best });
        tokens.push(best as u32);
    }
    tokens.split_off(prompt.len())
}

#[test]
fn greedy_generation_equals_uncached_greedy_decoding() {
    for dir in ["llama-tiny", "qwen2-tiny"] {
        let model = base(dir).model;
        let got = generate(&model, &PROMPT, &GenerationConfig::new(20)).unwrap();
        assert_eq!(got, greedy_without_cache(&model, &PROMPT, 20), "{dir}");
    }
}

#[test]
fn merged_adapter_generates_what_the_unmerged_one_does() {
    let peft = with_adapter("llama-tiny", "llama-tiny-lora");
    let config = GenerationConfig::new(20);
    let unmerged = generate(peft.model(), &PROMPT, &config).unwrap();
    let merged = peft.clone().merge_and_unload();
    assert_eq!(generate(&merged.model, &PROMPT, &config).unwrap(), unmerged);
    assert_eq!(unmerged.len(), 20);
}

#[test]
fn sampling_is_deterministic_per_seed() {
    let model = base("llama-tiny").model;
    let sampled = |seed| {
        let config = GenerationConfig::new(24)
            .with_temperature(1.5)
            .with_top_k(Some(50))
            .with_top_p(Some(0.95))
            .with_seed(seed);
        generate(&model, &PROMPT, &config).unwrap()
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2), "different seeds, same 24 tokens");
}

#[test]
fn vanishing_temperature_samples_the_greedy_tokens() {
    let model = base("qwen2-tiny").model;
    let greedy = generate(&model, &PROMPT, &GenerationConfig::new(16)).unwrap();
    let cold = GenerationConfig::new(16)
        .with_temperature(1e-6)
        .with_seed(3);
    assert_eq!(generate(&model, &PROMPT, &cold).unwrap(), greedy);
}

#[test]
fn top_k_of_one_samples_the_greedy_tokens() {
    let model = base("llama-tiny").model;
    let greedy = generate(&model, &PROMPT, &GenerationConfig::new(16)).unwrap();
    let top1 = GenerationConfig::new(16)
        .with_temperature(2.0)
        .with_top_k(Some(1))
        .with_seed(9);
    assert_eq!(generate(&model, &PROMPT, &top1).unwrap(), greedy);
}

#[test]
fn generation_stops_before_the_first_stop_token() {
    let model = base("llama-tiny").model;
    let free = generate(&model, &PROMPT, &GenerationConfig::new(20)).unwrap();
    let stop = free[5];
    let first = free.iter().position(|&t| t == stop).unwrap();
    let stopped = generate(
        &model,
        &PROMPT,
        &GenerationConfig::new(20).with_stop_token_ids(vec![stop]),
    )
    .unwrap();
    assert_eq!(stopped, free[..first]);
}

#[test]
fn eos_token_ids_come_from_the_config() {
    let model = base("llama-tiny");
    assert_eq!(fastlora::eos_token_ids(&model), model.config.eos_token_ids);
    assert!(!fastlora::eos_token_ids(&model).is_empty());
}

#[test]
fn context_limit_is_an_error_not_a_panic() {
    let model = base("llama-tiny").model; // max_position_embeddings = 128
    let prompt = vec![5; 100];
    // 100 prompt tokens + 28 new ones: the last new token is never fed, so 127 positions fit.
    assert_eq!(
        generate(&model, &prompt, &GenerationConfig::new(28))
            .unwrap()
            .len(),
        28
    );
    match generate(&model, &prompt, &GenerationConfig::new(30)) {
        Err(GenerationError::ContextTooLong {
            needed: 129,
            max_positions: 128,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_prompts_are_errors() {
    let model = base("llama-tiny").model;
    let config = GenerationConfig::new(4);
    assert_eq!(
        generate(&model, &[], &config),
        Err(GenerationError::EmptyPrompt)
    );
    assert_eq!(
        generate(&model, &[1, 320], &config),
        Err(GenerationError::TokenOutOfVocabulary {
            index: 1,
            id: 320,
            vocab_size: 320
        })
    );
}
