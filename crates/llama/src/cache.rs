//! [`KvCache`]: the keys and values of the tokens a model has already seen, so that decoding a
//! new token costs one token's forward pass instead of the whole sequence's.

use burn::prelude::*;

/// Keys (after RoPE) and values of every decoder layer for the tokens processed so far, for
/// [`crate::LlamaForCausalLm::forward_cached`].
///
/// The cache grows by concatenation along the sequence axis: each pass copies the cached
/// tensors once, which costs O(cached length) per decoded token but needs no maximum length up
/// front and keeps the attention over exactly the tokens seen (no masked-out slack). The
/// tensors are detached from any autodiff graph, so a long generation does not keep every
/// step's graph alive; gradients do not flow through the cache.
///
/// # Shapes
/// - per layer, keys and values: `[batch, kv_heads, len, head_dim]`
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerKv<B>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model of `num_layers` decoder layers
    /// ([`crate::LlamaForCausalLm::num_layers`]).
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
        }
    }

    /// Tokens cached: the position the next token takes.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    /// Whether no token has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decoder layers the cache was made for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn layers_mut(&mut self) -> &mut [LayerKv<B>] {
        &mut self.layers
    }
}

/// One layer's cached keys and values; `None` until the first pass.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv<B: Backend> {
    keys_values: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

// Derived `Default` would require `B: Default`.
impl<B: Backend> Default for LayerKv<B> {
    fn default() -> Self {
        Self { keys_values: None }
    }
}

impl<B: Backend> LayerKv<B> {
    fn len(&self) -> usize {
        self.keys_values
            .as_ref()
            .map_or(0, |(keys, _)| keys.dims()[2])
    }

    /// Appends this pass's keys and values and returns all of them, cached ones first.
    ///
    /// # Shapes
    /// - keys, values: `[batch, kv_heads, seq, head_dim]`
    /// - returned: `[batch, kv_heads, cached + seq, head_dim]`
    pub(crate) fn append(
        &mut self,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (keys, values) = match self.keys_values.take() {
            None => (keys, values),
            Some((past_keys, past_values)) => (
                Tensor::cat(vec![past_keys, keys], 2),
                Tensor::cat(vec![past_values, values], 2),
            ),
        };
        self.keys_values = Some((keys.clone().detach(), values.clone().detach()));
        (keys, values)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use burn::backend::NdArray;
    use burn::tensor::{Int, TensorData};

    use super::*;
    use crate::{Checkpoint, LlamaConfig, LlamaForCausalLm, build_model};

    type B = NdArray<f32>;

    fn llama_tiny() -> (LlamaConfig, LlamaForCausalLm<B>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama-tiny");
        let config = LlamaConfig::load(&dir.join("config.json")).unwrap();
        let mut checkpoint = Checkpoint::open(&dir).unwrap();
        let model = build_model(&config, &mut checkpoint, &Default::default()).unwrap();
        (config, model)
    }

    fn ids(values: &[i64]) -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [1, values.len()]),
            &Default::default(),
        )
    }

    #[test]
    fn cache_holds_kv_heads_for_every_token_seen() {
        let (config, model) = llama_tiny();
        let mut cache = KvCache::new(model.num_layers());
        assert!(cache.is_empty());
        model.forward_cached(ids(&[5, 9, 17]), &mut cache);
        model.forward_cached(ids(&[42]), &mut cache);
        assert_eq!(cache.len(), 4);
        for layer in &cache.layers {
            let (keys, values) = layer.keys_values.as_ref().unwrap();
            let expected = [1, config.num_key_value_heads, 4, config.head_dim];
            assert_eq!(keys.dims(), expected);
            assert_eq!(values.dims(), expected);
        }
    }

    #[test]
    fn mask_after_cached_tokens_lets_query_i_see_keys_up_to_start_plus_i() {
        let (config, model) = llama_tiny();
        let x = Tensor::<B, 3>::zeros([1, 2, config.hidden_size], &Default::default());
        let ctx = model.context(&x, None, None, 3);
        let blocked: Vec<bool> = ctx
            .mask
            .expect("a cached pass builds the materialised mask")
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&score| score < 0.0)
            .collect();
        #[rustfmt::skip]
        let expected = [
            false, false, false, false, true,
            false, false, false, false, false,
        ];
        assert_eq!(blocked, expected);
    }

    #[test]
    #[should_panic(expected = "exceeds max_position_embeddings = 128")]
    fn cached_pass_past_the_rotary_tables_panics() {
        let (_, model) = llama_tiny();
        let mut cache = KvCache::new(model.num_layers());
        model.forward_cached(ids(&[1; 100]), &mut cache);
        model.forward_cached(ids(&[1; 29]), &mut cache);
    }
}
