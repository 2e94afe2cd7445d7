//! Text generation with a KV cache: greedy decoding, or sampling with temperature, top-k and
//! top-p from a seeded ChaCha8 stream, so one seed always gives the same tokens.
//!
//! The prompt is processed in one cached forward pass, then each new token in one more; the
//! choice of the next token happens on the host in f64 from the last position's logits.

use burn::config::Config;
use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use fastlora_llama::{KvCache, LlamaForCausalLm};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::pretrained::FastLanguageModel;

/// How [`generate`] picks each token and when it stops.
///
/// ```
/// use fastlora::GenerationConfig;
///
/// let config = GenerationConfig::new(64)
///     .with_temperature(0.7)
///     .with_top_p(Some(0.9))
///     .with_seed(42)
///     .with_stop_token_ids(vec![2]);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy decoding (argmax, ties to the lowest id), where
    /// `top_k`, `top_p` and `seed` play no part.
    #[config(default = 0.0)]
    pub temperature: f64,
    /// Sample among the `k` most probable tokens only (ties broken towards lower ids).
    pub top_k: Option<usize>,
    /// Nucleus sampling: sample among the smallest set of most probable tokens whose
    /// probabilities add up to at least `p` (never fewer than one token); applied after `top_k`.
    pub top_p: Option<f64>,
    /// Seed of the ChaCha8 stream sampling draws from.
    #[config(default = 0)]
    pub seed: u64,
    /// Tokens that end generation; the stop token is not part of the output. Empty by default:
    /// pass [`eos_token_ids`] of the model to stop at its end-of-sequence tokens.
    #[config(default = "Vec::new()")]
    pub stop_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// Checks the sampling settings, so a command can fail before it loads a model.
    ///
    /// # Errors
    /// [`GenerationError::InvalidSetting`] for a negative or non-finite `temperature`,
    /// `top_k = 0`, or a `top_p` outside `(0, 1]`.
    pub fn validate(&self) -> Result<(), GenerationError> {
        let invalid = |field, value: String, expected| GenerationError::InvalidSetting {
            field,
            value,
            expected,
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(invalid(
                "temperature",
                self.temperature.to_string(),
                "a finite number ≥ 0 (0 = greedy)",
            ));
        }
        if self.top_k == Some(0) {
            return Err(invalid("top_k", "0".into(), "at least 1"));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(invalid("top_p", p.to_string(), "in (0, 1]"));
        }
        Ok(())
    }
}

/// Why [`generate`] refused to run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerationError {
    /// There is no token to continue from.
    #[error("the prompt is empty: generation continues at least one token")]
    EmptyPrompt,
    /// A prompt token the embedding table does not have.
    #[error(
        "prompt token {id} (at index {index}) is outside the vocabulary of {vocab_size} tokens"
    )]
    TokenOutOfVocabulary {
        /// Where in the prompt.
        index: usize,
        /// The token id.
        id: u32,
        /// Rows of the embedding table.
        vocab_size: usize,
    },
    /// The prompt and the tokens to generate do not fit the rotary tables.
    #[error(
        "a prompt of {prompt_len} tokens with max_new_tokens = {max_new_tokens} needs {needed} positions (the last new token is never fed back), but max_position_embeddings = {max_positions}"
    )]
    ContextTooLong {
        /// Prompt tokens.
        prompt_len: usize,
        /// [`GenerationConfig::max_new_tokens`].
        max_new_tokens: usize,
        /// Positions the model would see at most.
        needed: usize,
        /// The model's `max_position_embeddings`.
        max_positions: usize,
    },
    /// A [`GenerationConfig`] setting out of range.
    #[error("generation setting `{field}` = {value} is invalid: expected {expected}")]
    InvalidSetting {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
}

/// The end-of-sequence tokens of `model`: its config's `eos_token_id`s, then its tokenizer's
/// EOS token when that is another one. The usual [`GenerationConfig::stop_token_ids`].
pub fn eos_token_ids<B: Backend>(model: &FastLanguageModel<B>) -> Vec<u32> {
    let mut ids = model.config.eos_token_ids.clone();
    if let Some(id) = model.tokenizer.as_ref().and_then(|t| t.eos_id())
        && !ids.contains(&id)
    {
        ids.push(id);
    }
    ids
}

/// Continues `prompt_ids` with up to `config.max_new_tokens` tokens and returns the new ones,
/// ending before the first stop token (which is not included).
///
/// The prompt is prefilled in one cached forward pass; each further token costs one pass of a
/// single token. The model runs as given: call `for_inference` on a [`crate::PeftModel`] first,
/// or LoRA dropout stays on.
///
/// # Errors
/// An invalid `config` ([`GenerationConfig::validate`]), an empty prompt, a prompt token
/// outside the vocabulary, or a prompt plus `max_new_tokens` longer than the model's
/// `max_position_embeddings` ([`GenerationError::ContextTooLong`]); all checked before any
/// forward pass.
pub fn generate<B: Backend>(
    model: &LlamaForCausalLm<B>,
    prompt_ids: &[u32],
    config: &GenerationConfig,
) -> Result<Vec<u32>, GenerationError> {
    config.validate()?;
    check_prompt(model, prompt_ids, config.max_new_tokens)?;
    let mut sampler = Sampler::new(config);
    let mut cache = KvCache::new(model.num_layers());
    let mut generated = Vec::with_capacity(config.max_new_tokens);
    let mut next_input = prompt_ids.to_vec();
    while generated.len() < config.max_new_tokens {
        let logits = last_position_logits(model, &next_input, &mut cache);
        let token = sampler.next_token(&logits);
        if config.stop_token_ids.contains(&token) {
            break;
        }
        generated.push(token);
        next_input = vec![token];
    }
    Ok(generated)
}

fn check_prompt<B: Backend>(
    model: &LlamaForCausalLm<B>,
    prompt_ids: &[u32],
    max_new_tokens: usize,
) -> Result<(), GenerationError> {
    if prompt_ids.is_empty() {
        return Err(GenerationError::EmptyPrompt);
    }
    let vocab_size = model.embed_tokens.weight.val().dims()[0];
    if let Some((index, &id)) = prompt_ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab_size)
    {
        return Err(GenerationError::TokenOutOfVocabulary {
            index,
            id,
            vocab_size,
        });
    }
    let needed = prompt_ids.len() + max_new_tokens.saturating_sub(1);
    let max_positions = model.rope.max_positions();
    if needed > max_positions {
        return Err(GenerationError::ContextTooLong {
            prompt_len: prompt_ids.len(),
            max_new_tokens,
            needed,
            max_positions,
        });
    }
    Ok(())
}

/// Feeds `tokens` after those `cache` holds and returns the logits of the last one; the LM head
/// runs on that position only, which matters for long prompts and large vocabularies.
fn last_position_logits<B: Backend>(
    model: &LlamaForCausalLm<B>,
    tokens: &[u32],
    cache: &mut KvCache<B>,
) -> Vec<f64> {
    let device = model.embed_tokens.weight.val().device();
    let ids: Vec<i64> = tokens.iter().map(|&id| i64::from(id)).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &device);
    let hidden = model.hidden_states_cached(ids, cache);
    let last = hidden.narrow(1, tokens.len() - 1, 1);
    model.logits(last).into_data().iter::<f64>().collect()
}

/// Picks each next token from logits as a [`GenerationConfig`] says.
struct Sampler {
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    rng: ChaCha8Rng,
}

impl Sampler {
    fn new(config: &GenerationConfig) -> Self {
        Self {
            temperature: config.temperature,
            top_k: config.top_k,
            top_p: config.top_p,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
        }
    }

    fn next_token(&mut self, logits: &[f64]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let scaled: Vec<f64> = logits.iter().map(|l| l / self.temperature).collect();
        let mut candidates = ranked_probabilities(&scaled);
        if let Some(k) = self.top_k {
            candidates.truncate(k);
        }
        if let Some(p) = self.top_p {
            keep_nucleus(&mut candidates, p);
        }
        draw(&candidates, self.rng.random())
    }
}

/// The id of the largest logit, the lowest id among equals.
fn argmax(logits: &[f64]) -> u32 {
    let mut best = 0;
    for (id, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = id;
        }
    }
    best as u32
}

/// `(id, softmax probability)` pairs, most probable first, lower ids first among equals.
fn ranked_probabilities(logits: &[f64]) -> Vec<(u32, f64)> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut ranked: Vec<(u32, f64)> = weights
        .iter()
        .enumerate()
        .map(|(id, w)| (id as u32, w / total))
        .collect();
    // A stable sort keeps equal probabilities in id order.
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked
}

/// Keeps the smallest prefix of `ranked` (most probable first, possibly already cut by top-k and
/// so not summing to 1) whose share of the remaining probability reaches `p`.
fn keep_nucleus(ranked: &mut Vec<(u32, f64)>, p: f64) {
    let threshold = p * ranked.iter().map(|&(_, prob)| prob).sum::<f64>();
    let mut cumulative = 0.0;
    let kept = ranked
        .iter()
        .position(|&(_, prob)| {
            cumulative += prob;
            cumulative >= threshold
        })
        .map_or(ranked.len(), |last| last + 1);
    ranked.truncate(kept);
}

/// The candidate whose cumulative-probability interval holds `uniform · total`, `uniform` being
/// a draw from `[0, 1)`; the candidates need not be normalised.
fn draw(candidates: &[(u32, f64)], uniform: f64) -> u32 {
    let target = uniform * candidates.iter().map(|&(_, prob)| prob).sum::<f64>();
    let mut cumulative = 0.0;
    for &(id, prob) in candidates {
        cumulative += prob;
        if target < cumulative {
            return id;
        }
    }
    // Rounding can leave `target` a hair above the last boundary.
    candidates.last().map_or(0, |&(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits whose softmax is `probs`.
    fn logits_of(probs: &[f64]) -> Vec<f64> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn ids(ranked: &[(u32, f64)]) -> Vec<u32> {
        ranked.iter().map(|&(id, _)| id).collect()
    }

    #[test]
    fn argmax_breaks_ties_towards_the_lowest_id() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[2.0, 2.0]), 0);
    }

    #[test]
    fn ranking_recovers_the_distribution_in_decreasing_order() {
        let ranked = ranked_probabilities(&logits_of(&[0.1, 0.4, 0.2, 0.3]));
        assert_eq!(ids(&ranked), [1, 3, 2, 0]);
        for (&(_, got), want) in ranked.iter().zip([0.4, 0.3, 0.2, 0.1]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn ranking_keeps_equal_probabilities_in_id_order() {
        let ranked = ranked_probabilities(&[1.0, 5.0, 1.0, 5.0]);
        assert_eq!(ids(&ranked), [1, 3, 0, 2]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let ranked = ranked_probabilities(&logits_of(&[0.4, 0.3, 0.2, 0.1]));
        let nucleus = |p| {
            let mut kept = ranked.clone();
            keep_nucleus(&mut kept, p);
            ids(&kept)
        };
        assert_eq!(nucleus(0.5), [0, 1]);
        assert_eq!(nucleus(0.35), [0]);
        assert_eq!(nucleus(0.8), [0, 1, 2]);
        assert_eq!(nucleus(1e-9), [0], "always at least one token");
        assert_eq!(nucleus(1.0), [0, 1, 2, 3]);
    }

    #[test]
    fn top_p_after_top_k_is_relative_to_the_tokens_left() {
        // Top-2 of [0.4, 0.3, 0.2, 0.1] renormalises to [4/7, 3/7]: p = 0.6 needs both.
        let mut ranked = ranked_probabilities(&logits_of(&[0.4, 0.3, 0.2, 0.1]));
        ranked.truncate(2);
        keep_nucleus(&mut ranked, 0.6);
        assert_eq!(ids(&ranked), [0, 1]);
        keep_nucleus(&mut ranked, 0.5);
        assert_eq!(ids(&ranked), [0]);
    }

    #[test]
    fn draw_maps_uniform_draws_onto_cumulative_intervals() {
        let candidates = [(7, 0.5), (3, 0.25), (9, 0.25)];
        assert_eq!(draw(&candidates, 0.0), 7);
        assert_eq!(draw(&candidates, 0.49), 7);
        assert_eq!(draw(&candidates, 0.5), 3);
        assert_eq!(draw(&candidates, 0.74), 3);
        assert_eq!(draw(&candidates, 0.99), 9);
        // Unnormalised weights (after top-k) scale with their total.
        assert_eq!(draw(&[(1, 2.0), (2, 2.0)], 0.6), 2);
    }

    #[test]
    fn sampling_frequencies_follow_the_filtered_distribution() {
        let logits = logits_of(&[0.4, 0.3, 0.2, 0.1]);
        let config = GenerationConfig::new(1)
            .with_temperature(1.0)
            .with_top_k(Some(3))
            .with_seed(7);
        let mut sampler = Sampler::new(&config);
        let draws = 20_000;
        let mut counts = [0usize; 4];
        for _ in 0..draws {
            counts[sampler.next_token(&logits) as usize] += 1;
        }
        assert_eq!(counts[3], 0, "top-k = 3 removes the least probable token");
        for (id, want) in [(0, 4.0 / 9.0), (1, 3.0 / 9.0), (2, 2.0 / 9.0)] {
            let got = counts[id] as f64 / draws as f64;
            assert!((got - want).abs() < 0.015, "token {id}: {got} vs {want}");
        }
    }

    #[test]
    fn temperature_sharpens_or_flattens_the_distribution() {
        let logits = [1.0_f64, 0.0];
        let first = |temperature: f64| {
            let scaled: Vec<f64> = logits.iter().map(|l| l / temperature).collect();
            ranked_probabilities(&scaled)[0].1
        };
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        assert!((first(1.0) - sigmoid(1.0)).abs() < 1e-12);
        assert!((first(0.5) - sigmoid(2.0)).abs() < 1e-12);
        assert!((first(2.0) - sigmoid(0.5)).abs() < 1e-12);
    }

    #[test]
    fn out_of_range_settings_are_rejected() {
        let base = GenerationConfig::new(4);
        assert!(base.validate().is_ok());
        for (config, field) in [
            (base.clone().with_temperature(-0.1), "temperature"),
            (base.clone().with_temperature(f64::NAN), "temperature"),
            (base.clone().with_top_k(Some(0)), "top_k"),
            (base.clone().with_top_p(Some(0.0)), "top_p"),
            (base.clone().with_top_p(Some(1.5)), "top_p"),
        ] {
            match config.validate() {
                Err(GenerationError::InvalidSetting { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
