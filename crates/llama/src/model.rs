//! The Llama-family decoder: RMSNorm, RoPE (with llama3 scaling), grouped-query attention,
//! SwiGLU MLP, optional q/k/v biases (Qwen2) and tied embeddings.
//!
//! Every projection is a [`LoraLinear`], so `get_peft_model` attaches adapters in place and a
//! fused kernel can take over a whole [`Mlp`] or [`Attention`] projection group. The order of
//! operations follows transformers' `modeling_llama.py` so f32 logits agree to the last digits.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Int};
use checkpointing::{CheckpointMode, checkpoint};
use flash_attention::Segments;
use fused_mlp::OutputUse;
use lora_layers::{LoraLinear, PackedWeight};

use std::path::PathBuf;
use std::sync::Arc;

use crate::cache::{KvCache, LayerKv};
use crate::checkpoint::Checkpoint;
use crate::config::LlamaConfig;
use crate::documents::PackedDocuments;
use crate::error::ModelError;

/// Added to masked attention scores: finite, so a fully masked row (a left-padding query)
/// gives a uniform softmax instead of NaN, as transformers' `finfo.min` does.
const MASKED_SCORE: f32 = -1.0e9;

/// [`MASKED_SCORE`] where the scores' dtype holds it; f16's most negative finite value (its
/// `finfo.min`) in f16, where -1e9 would be -inf.
fn masked_score(dtype: burn::tensor::DType) -> f32 {
    match dtype {
        burn::tensor::DType::F16 => burn::tensor::f16::MIN.to_f32(),
        _ => MASKED_SCORE,
    }
}

/// Root-mean-square layer norm, `y = w · x / √(mean(x²) + ε)`, computed in f32.
///
/// # Shapes
/// - input: `[..., hidden]`
/// - output: `[..., hidden]`
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel gain, `[hidden]`, frozen.
    pub weight: Param<Tensor<B, 1>>,
    /// ε added to the mean square.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm with the given gain, frozen.
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight).set_require_grad(false),
            eps,
        }
    }

    /// Normalises over the last dimension.
    /// On the backends the fused kernels are compiled for, one kernel each way
    /// ([`fused_mlp::rms_norm`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        fused_mlp::rms_norm(x, self.weight.val(), self.eps)
    }

    /// [`forward`](Self::forward) with `spare_columns` columns of room after each output row
    /// for the fused MLP it feeds ([`fused_mlp::rms_norm_with_room`]); the same values.
    pub fn forward_with_room<const D: usize>(
        &self,
        x: Tensor<B, D>,
        spare_columns: usize,
    ) -> Tensor<B, D> {
        fused_mlp::rms_norm_with_room(x, self.weight.val(), self.eps, spare_columns)
    }
}

/// Rotary position embedding tables, `cos`/`sin` of `position · inv_freq`, duplicated over both
/// halves of the head as transformers' `rotate_half` convention expects.
///
/// # Shapes
/// - `cos`, `sin`: `[max_positions, head_dim]`
#[derive(Module, Debug)]
pub struct RotaryEmbedding<B: Backend> {
    /// `cos(p·f)`, `[max_positions, head_dim]`.
    pub cos: Tensor<B, 2>,
    /// `sin(p·f)`, `[max_positions, head_dim]`.
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> RotaryEmbedding<B> {
    /// Tables for positions `0..max_positions` from the inverse frequencies (`head_dim/2`).
    pub fn new(inv_freq: &[f64], max_positions: usize, device: &B::Device) -> Self {
        let half = inv_freq.len();
        let head_dim = 2 * half;
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        // transformers multiplies positions by the f32 frequencies in f32; do the same so the
        // angles (up to thousands of radians) round identically.
        let inv_freq_f32: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        for pos in 0..max_positions {
            let angles: Vec<f32> = inv_freq_f32.iter().map(|&f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|&a| f64::from(a).cos() as f32));
                sin.extend(angles.iter().map(|&a| f64::from(a).sin() as f32));
            }
        }
        let shape = [max_positions, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// Rotates `x` at positions `start..start + seq` ([`fused_mlp::rope`]: one kernel each way
    /// on the fused backends, transformers' `apply_rotary_pos_emb` elsewhere).
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, head_dim]`
    pub fn apply(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let [_, _, seq, _] = x.dims();
        let (cos, sin) = self.tables(start, seq);
        fused_mlp::rope(x, cos, sin)
    }

    /// The `(cos, sin)` rows of positions `start..start + seq`, shared by every row of a batch.
    ///
    /// # Shapes
    /// - cos, sin: `[1, seq, head_dim]`
    ///
    /// # Panics
    /// If `start + seq` exceeds [`Self::max_positions`].
    pub fn tables(&self, start: usize, seq: usize) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let rows = |table: &Tensor<B, 2>| table.clone().narrow(0, start, seq).unsqueeze::<3>();
        (rows(&self.cos), rows(&self.sin))
    }

    /// The `(cos, sin)` rows of each token's own position, for rows whose positions do not run
    /// `0, 1, ..` (packed documents, each from 0).
    ///
    /// # Shapes
    /// - positions: `[batch, seq]`
    /// - cos, sin: `[batch, seq, head_dim]`
    ///
    /// # Panics
    /// If a position is beyond the tables (checked by the gather).
    pub fn tables_at(&self, positions: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [batch, seq] = positions.dims();
        let head_dim = self.cos.dims()[1];
        let flat = positions.reshape([batch * seq]);
        let rows = |table: &Tensor<B, 2>| {
            table
                .clone()
                .select(0, flat.clone())
                .reshape([batch, seq, head_dim])
        };
        (rows(&self.cos), rows(&self.sin))
    }

    /// Positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// What every decoder layer of one forward pass shares: the positions and the attention mask,
/// in the form the chosen attention path takes.
#[derive(Debug, Clone)]
pub struct LayerContext<B: Backend> {
    /// Position of the first token of this pass (non-zero when decoding with a cache).
    pub start_pos: usize,
    /// Additive mask for the materialised attention, `[batch, 1, seq_q, seq_k]`
    /// (`seq_k = start_pos + seq_q`): 0 where attending, a large negative score (-1e9)
    /// elsewhere. `None` when the pass takes the linear-memory attention
    /// ([`flash_attention::attention`]), which masks causally itself: this mask is quadratic in
    /// the sequence length, so it is not built then.
    pub mask: Option<Tensor<B, 4>>,
    /// The segments `[batch, seq]` for the linear-memory attention
    /// ([`flash_attention::Segments`]: padding and packed documents, the documents' runs known
    /// on the host when there is no padding mask); `None` without either, or on the
    /// materialised path.
    pub segments: Option<Segments<B>>,
    /// RoPE tables `(cos, sin)` at this pass's positions: `[1, seq, head_dim]` for positions
    /// `start_pos..start_pos + seq` in every row ([`RotaryEmbedding::tables`]), `[batch, seq,
    /// head_dim]` where packed documents restart them ([`RotaryEmbedding::tables_at`]).
    pub rope_tables: (Tensor<B, 3>, Tensor<B, 3>),
}

/// Multi-head attention with grouped K/V heads (GQA) and RoPE.
///
/// # Shapes
/// - input: `[batch, seq, hidden]`
/// - output: `[batch, seq, hidden]`
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection, `hidden → heads·head_dim`.
    pub q_proj: LoraLinear<B>,
    /// Key projection, `hidden → kv_heads·head_dim`.
    pub k_proj: LoraLinear<B>,
    /// Value projection, `hidden → kv_heads·head_dim`.
    pub v_proj: LoraLinear<B>,
    /// Output projection, `heads·head_dim → hidden`.
    pub o_proj: LoraLinear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; `num_heads` is a multiple of it.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// Causal self-attention over `x`, keys and values from this pass only.
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LayerContext<B>) -> Tensor<B, 3> {
        let device = x.device();
        let (q, k, v) = phase_timing::phase::<B, _>("attention: q/k/v + RoPE", &device, || {
            self.rotated_qkv(x, ctx)
        });
        match &ctx.mask {
            Some(mask) => self.attend(q, k, v, mask),
            None => {
                // `LlamaForCausalLm::context` leaves the mask out only where the fast op runs
                // (a backend it is compiled for, start_pos 0, fusing allowed).
                let out =
                    phase_timing::phase::<B, _>("attention: softmax(QKᵀ)V", &device, || {
                        flash_attention::attention(q, k, v, ctx.segments.clone()).expect(
                            "the context chose the linear-memory attention for this backend",
                        )
                    });
                phase_timing::phase::<B, _>("attention: o_proj", &device, || {
                    fused_mlp::linear(out, &self.o_proj)
                })
            }
        }
    }

    /// Causal self-attention of `x` over the keys and values `past` holds and its own, which it
    /// then appends to `past`.
    pub(crate) fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<B>,
        past: &mut LayerKv<B>,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.rotated_qkv(x, ctx);
        let (k, v) = past.append(k, v);
        let mask = ctx
            .mask
            .as_ref()
            .expect("the cached pass's context holds the materialised mask");
        self.attend(q, k, v, mask)
    }

    /// Projects `x` to per-head queries, keys and values, with RoPE at the context's positions
    /// on queries and keys.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - q: `[batch, heads, seq, head_dim]`; k, v: `[batch, kv_heads, seq, head_dim]`
    fn rotated_qkv(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, seq, _] = x.dims();
        let heads =
            |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2);
        let [q, k, v] = fused_mlp::qkv(x, &self.q_proj, &self.k_proj, &self.v_proj);
        let q = heads(q, self.num_heads);
        let k = heads(k, self.num_kv_heads);
        let v = heads(v, self.num_kv_heads);
        let (cos, sin) = &ctx.rope_tables;
        let rotate = |t| fused_mlp::rope(t, cos.clone(), sin.clone());
        (rotate(q), rotate(k), v)
    }

    /// Softmax attention of `q` over `k`/`v` under the additive `mask`, then `o_proj`.
    ///
    /// # Shapes
    /// - q: `[batch, heads, seq_q, head_dim]`; k, v: `[batch, kv_heads, seq_k, head_dim]`
    /// - mask: `[batch, 1, seq_q, seq_k]`
    /// - output: `[batch, seq_q, hidden]`
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: &Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let [batch, _, seq, _] = q.dims();
        let k = self.repeat_kv(k);
        let v = self.repeat_kv(v);
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale) + mask.clone();
        let probs = softmax(scores.cast(burn::tensor::DType::F32), 3).cast(v.dtype());
        let out =
            probs
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([batch, seq, self.num_heads * self.head_dim]);
        fused_mlp::linear(out, &self.o_proj)
    }

    /// Shares each K/V head across its group of query heads.
    fn repeat_kv(&self, t: Tensor<B, 4>) -> Tensor<B, 4> {
        let groups = self.num_heads / self.num_kv_heads;
        if groups == 1 {
            return t;
        }
        let [batch, kv, seq, dim] = t.dims();
        t.unsqueeze_dim::<5>(2)
            .expand([batch, kv, groups, seq, dim])
            .reshape([batch, kv * groups, seq, dim])
    }
}

/// The SwiGLU feed-forward block, `down(silu(gate(x)) · up(x))`.
///
/// # Shapes
/// - input: `[batch, seq, hidden]`
/// - output: `[batch, seq, hidden]`
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection, `hidden → intermediate`.
    pub gate_proj: LoraLinear<B>,
    /// Up projection, `hidden → intermediate`.
    pub up_proj: LoraLinear<B>,
    /// Down projection, `intermediate → hidden`.
    pub down_proj: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    /// Applies the block: the fused SwiGLU+LoRA op where the backend has it and the
    /// projections qualify ([`fused_mlp::mlp`]), else the portable path. Under
    /// [`OutputUse::GraphOnly`] the output's values may be unspecified (only its graph is
    /// valid).
    ///
    /// # Shapes
    /// - x: `[..., hidden]`
    /// - output: `[..., hidden]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, output: OutputUse) -> Tensor<B, D> {
        fused_mlp::mlp(x, &self.gate_proj, &self.up_proj, &self.down_proj, output)
    }
}

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
///
/// # Shapes
/// - input: `[batch, seq, hidden]`
/// - output: `[batch, seq, hidden]`
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Feed-forward block.
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Runs the layer; a pure function of its input given `ctx` (positions and mask), which is
    /// what lets a checkpointing op recompute it in backward.
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LayerContext<B>) -> Tensor<B, 3> {
        self.around_attention(x, |h| self.self_attn.forward(h, ctx))
    }

    /// Runs the layer on new tokens after those `past` holds, appending theirs to `past`.
    pub(crate) fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<B>,
        past: &mut LayerKv<B>,
    ) -> Tensor<B, 3> {
        self.around_attention(x, |h| self.self_attn.forward_cached(h, ctx, past))
    }

    /// The residual blocks around `attention`, one definition for the cached and uncached pass.
    fn around_attention(
        &self,
        x: Tensor<B, 3>,
        attention: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let device = x.device();
        let phase = |name, f: &mut dyn FnMut() -> Tensor<B, 3>| {
            phase_timing::phase::<B, _>(name, &device, f)
        };
        let normed = phase("model.norm (attention)", &mut || {
            self.input_layernorm.forward(x.clone())
        });
        let mut attention = Some(attention);
        let mut normed = Some(normed);
        let attended = phase("model.attention", &mut || {
            let attention = attention.take().expect("phase runs once");
            attention(normed.take().expect("phase runs once"))
        });
        let h = x + attended;
        let mlp = &self.mlp;
        let room = fused_mlp::mlp_input_room(&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj);
        // The norm and the MLP on rows: the norm's output keeps its room only as a matrix
        // (Burn copies a strided `[batch, seq, hidden]` when it is reshaped into rows).
        let [batch, seq, hidden] = h.dims();
        let rows = |t: Tensor<B, 3>| t.reshape([batch * seq, hidden]);
        let normed = phase_timing::phase::<B, _>("model.norm (mlp)", &device, || {
            self.post_attention_layernorm
                .forward_with_room(rows(h.clone()), room)
        });
        // In a checkpoint's recompute the layer output's value is never read, and the MLP's
        // output reaches it through the residual addition only.
        let output = match checkpointing::recomputing() {
            true => OutputUse::GraphOnly,
            false => OutputUse::Values,
        };
        let out = phase("model.mlp", &mut || {
            self.mlp
                .forward(normed.clone(), output)
                .reshape([batch, seq, hidden])
        });
        h + out
    }
}

/// The token embedding table.
///
/// # Shapes
/// - input: `[batch, seq]` token ids
/// - output: `[batch, seq, hidden]`
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, hidden]`; frozen unless it is in `modules_to_save`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    /// Looks the ids up.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.weight.val(), ids)
    }
}

/// A Llama-family causal language model: embeddings, decoder layers, final norm and LM head.
///
/// # Shapes
/// - input: `[batch, seq]` token ids (+ optional `[batch, seq]` attention mask of 1/0)
/// - output: `[batch, seq, vocab]` logits
#[derive(Module, Debug)]
pub struct LlamaForCausalLm<B: Backend> {
    /// Token embeddings.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// The output projection; `None` when tied to `embed_tokens`.
    pub lm_head: Option<LoraLinear<B>>,
    /// Rotary tables.
    pub rope: RotaryEmbedding<B>,
    /// How decoder layers keep activations for backward.
    #[module(skip)]
    pub checkpointing: CheckpointMode,
}

impl<B: Backend> LlamaForCausalLm<B> {
    /// Logits for `input_ids`, optionally with a key-padding `attention_mask` (1 = token,
    /// 0 = padding).
    ///
    /// # Panics
    /// If the sequence is longer than the rotary tables (`max_position_embeddings`).
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let hidden = self.hidden_states(input_ids, attention_mask);
        self.logits(hidden)
    }

    /// The final-normed hidden states, before the LM head.
    ///
    /// # Shapes
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_states(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        self.hidden_states_packed(input_ids, attention_mask, None)
    }

    /// [`Self::hidden_states`] of rows that may pack several documents: with `documents`, each
    /// token attends only to the earlier tokens of its own document and takes RoPE's position
    /// within it, so every document's hidden states are those it would have alone.
    ///
    /// # Shapes
    /// - input_ids, attention_mask: `[batch, seq]`; documents: `[batch, seq]` each
    /// - output: `[batch, seq, hidden]`
    ///
    /// # Panics
    /// As [`Self::forward`], and if the documents' shape is not the ids'.
    pub fn hidden_states_packed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        documents: Option<&PackedDocuments<B>>,
    ) -> Tensor<B, 3> {
        let mut x = self.embed_tokens.forward(input_ids);
        let ctx = self.context(&x, attention_mask, documents, 0);
        let last = self.layers.len().saturating_sub(1);
        for (index, layer) in self.layers.iter().enumerate() {
            let mode = match index == last {
                true => self.checkpointing.for_last_layer(),
                false => self.checkpointing,
            };
            // The recompute runs in backward, after this call: the closure owns what it reads.
            let ctx = ctx.clone();
            x = checkpoint(mode, x, layer, move |layer, x| layer.forward(x, &ctx));
        }
        self.norm.forward(x)
    }

    /// Applies the LM head (or the tied embedding) to hidden states.
    ///
    /// # Shapes
    /// - input: `[batch, seq, hidden]`
    /// - output: `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => fused_mlp::linear(hidden, head),
            None => burn::tensor::module::linear(
                hidden,
                self.embed_tokens.weight.val().transpose(),
                None,
            ),
        }
    }

    /// Logits for `input_ids` following the tokens `cache` holds, which it then appends to
    /// `cache`: processing a sequence in one call or in pieces gives the logits [`Self::forward`]
    /// gives for the whole sequence.
    ///
    /// The new tokens take positions `cache.len()..cache.len() + seq` and attend to every cached
    /// token and, causally, to each other. There is no padding mask: every row of the batch is
    /// as long as the others. Gradient checkpointing does not apply (the cache is for inference).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    ///
    /// # Panics
    /// If `cache.len() + seq` exceeds `max_position_embeddings`, if `cache` was made for another
    /// number of layers, or if `batch` differs from the batch the cache holds.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let hidden = self.hidden_states_cached(input_ids, cache);
        self.logits(hidden)
    }

    /// The final-normed hidden states of [`Self::forward_cached`], before the LM head (so a
    /// decoder can apply the head to the last position only).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    ///
    /// # Panics
    /// As [`Self::forward_cached`].
    pub fn hidden_states_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        assert_eq!(
            cache.num_layers(),
            self.layers.len(),
            "KV cache made for {} layers, model has {}",
            cache.num_layers(),
            self.layers.len()
        );
        let mut x = self.embed_tokens.forward(input_ids);
        let ctx = self.layer_context(&x, None, None, cache.len(), false);
        for (layer, past) in self.layers.iter().zip(cache.layers_mut()) {
            x = layer.forward_cached(x, &ctx, past);
        }
        self.norm.forward(x)
    }

    /// The mask and positions every layer of a pass over `x` shares, `x` being the tokens at
    /// positions `start_pos..start_pos + seq`; `attention_mask` (1 = token, 0 = padding) covers
    /// every key, the `start_pos` earlier ones (from a cache) included. With `documents` (packed
    /// rows; `start_pos` 0), a query sees only keys of its own document, and positions are those
    /// within each document.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - attention_mask: `[batch, start_pos + seq]`; documents: `[batch, seq]` each
    /// - mask of the context: `[batch, 1, seq, start_pos + seq]`
    ///
    /// With `start_pos` 0 on a backend where the linear-memory attention is compiled and
    /// allowed ([`flash_attention::flash_available`]), the context holds the `[batch, seq]`
    /// segments ([`flash_attention::attention_segments`]) instead, and [`Attention::forward`]
    /// takes that op.
    ///
    /// # Panics
    /// If `start_pos + seq` exceeds `max_position_embeddings`, or documents come with a
    /// `start_pos` other than 0 or in another shape than `[batch, seq]`.
    pub fn context(
        &self,
        x: &Tensor<B, 3>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        documents: Option<&PackedDocuments<B>>,
        start_pos: usize,
    ) -> LayerContext<B> {
        self.layer_context(x, attention_mask, documents, start_pos, true)
    }

    /// [`Self::context`], the linear-memory attention allowed or not (the cached pass, whose
    /// keys outnumber its queries, always takes the materialised one).
    fn layer_context(
        &self,
        x: &Tensor<B, 3>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        documents: Option<&PackedDocuments<B>>,
        start_pos: usize,
        allow_flash: bool,
    ) -> LayerContext<B> {
        let [batch, seq, _] = x.dims();
        let keys = start_pos + seq;
        let device = x.device();
        assert!(
            keys <= self.rope.max_positions(),
            "sequence of {keys} tokens exceeds max_position_embeddings = {}",
            self.rope.max_positions()
        );
        if let Some(documents) = documents {
            assert!(
                start_pos == 0,
                "packed documents in a pass from position {start_pos}"
            );
            assert_eq!(
                documents.ids.dims(),
                [batch, seq],
                "packed documents' shape against the batch"
            );
        }
        let rope_tables = match documents {
            Some(documents) => self.rope.tables_at(documents.positions.clone()),
            None => self.rope.tables(start_pos, seq),
        };
        // The fused RoPE kernel reads f32 tables: cast the pass's rows once here, not in each
        // of the layers' q and k rotations (a no-op where the model is f32; the values are the
        // model dtype's, so nothing else changes).
        let rope_tables = (
            rope_tables.0.cast(burn::tensor::DType::F32),
            rope_tables.1.cast(burn::tensor::DType::F32),
        );
        if allow_flash && start_pos == 0 && flash_attention::flash_available::<B>() {
            let segments = match (attention_mask, documents) {
                (None, Some(documents)) => {
                    Some(Segments::from_runs(documents.runs.clone(), &device))
                }
                (mask, documents) => {
                    flash_attention::attention_segments(mask, documents.map(|d| d.ids.clone()))
                        .map(Segments::from_ids)
                }
            };
            return LayerContext {
                start_pos,
                mask: None,
                segments,
                rope_tables,
            };
        }
        // Query i (at position start_pos + i) may see key j iff j ≤ start_pos + i (causal) and
        // key j is not padding. Burn's `tril_mask` with offset `start_pos` is true exactly where
        // j > i + start_pos, i.e. on the future keys.
        let future: Tensor<B, 2, Bool> = Tensor::tril_mask([seq, keys], start_pos as i64, &device);
        let mut blocked = future.unsqueeze::<4>().expand([batch, 1, seq, keys]);
        if let Some(mask) = attention_mask {
            let padding = mask
                .equal_elem(0)
                .reshape([batch, 1, 1, keys])
                .expand([batch, 1, seq, keys]);
            blocked = blocked.bool_or(padding);
        }
        if let Some(documents) = documents {
            // Another document's key: its id differs from the query's (start_pos is 0 here).
            let ids = |shape: [usize; 4]| documents.ids.clone().reshape(shape);
            let elsewhere = ids([batch, 1, 1, seq])
                .expand([batch, 1, seq, seq])
                .not_equal(ids([batch, 1, seq, 1]).expand([batch, 1, seq, seq]));
            blocked = blocked.bool_or(elsewhere);
        }
        let mask = Tensor::<B, 4>::zeros([batch, 1, seq, keys], (&device, x.dtype()))
            .mask_fill(blocked, masked_score(x.dtype()));
        LayerContext {
            start_pos,
            mask: Some(mask),
            segments: None,
            rope_tables,
        }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// Where [`build_model`] reads weights from: a checkpoint, or random values for a built-in model.
pub trait WeightSource {
    /// The f32 values of the HF-named tensor `name` (e.g. `model.layers.0.mlp.up_proj.weight`),
    /// checked against `shape`; `Ok(None)` when the source does not have it.
    ///
    /// # Errors
    /// A present tensor that cannot be read or has another shape.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>, ModelError>;

    /// The packed (e.g. quantized) form of weight `name`, `[d_output, d_input]` once unpacked,
    /// for a source that keeps it packed; `Ok(None)` (the default) has [`build_model`] read it
    /// dense through [`WeightSource::tensor`]. Asked only for the seven projection weights of
    /// each decoder layer ([`LAYER_PROJECTIONS`]).
    ///
    /// # Errors
    /// A present tensor that cannot be read or has another shape.
    fn packed(
        &mut self,
        name: &str,
        shape: [usize; 2],
    ) -> Result<Option<Arc<dyn PackedWeight>>, ModelError> {
        let _ = (name, shape);
        Ok(None)
    }

    /// Where the weights come from, for error messages (a directory or file path).
    fn location(&self) -> PathBuf;
}

/// Builds the module tree for `config` from `source`, every base weight frozen; the layer
/// projections the source keeps packed ([`WeightSource::packed`]) stay packed.
///
/// # Errors
/// [`ModelError::MissingTensor`] for an absent tensor (only a tied `lm_head` may be absent), or
/// whatever the source returns.
pub fn build_model<B: Backend>(
    config: &LlamaConfig,
    source: &mut dyn WeightSource,
    device: &B::Device,
) -> Result<LlamaForCausalLm<B>, ModelError> {
    // The weights get buffers of their own size, outside the pools of the training step.
    fused_mlp::with_persistent_memory::<B, _>(device, || build_layers(config, source, device))
}

/// [`build_model`]'s body.
fn build_layers<B: Backend>(
    config: &LlamaConfig,
    source: &mut dyn WeightSource,
    device: &B::Device,
) -> Result<LlamaForCausalLm<B>, ModelError> {
    let mut loader = Loader { source, device };
    let (hidden, inter, vocab) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q_out = config.num_attention_heads * config.head_dim;
    let kv_out = config.num_key_value_heads * config.head_dim;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let self_attn = Attention {
            q_proj: loader.linear(
                &format!("{p}.self_attn.q_proj"),
                hidden,
                q_out,
                config.qkv_bias,
            )?,
            k_proj: loader.linear(
                &format!("{p}.self_attn.k_proj"),
                hidden,
                kv_out,
                config.qkv_bias,
            )?,
            v_proj: loader.linear(
                &format!("{p}.self_attn.v_proj"),
                hidden,
                kv_out,
                config.qkv_bias,
            )?,
            o_proj: loader.linear(
                &format!("{p}.self_attn.o_proj"),
                q_out,
                hidden,
                config.o_bias,
            )?,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        let mlp = Mlp {
            gate_proj: loader.linear_with_room(
                &format!("{p}.mlp.gate_proj"),
                hidden,
                inter,
                config.mlp_bias,
                SpareRoom::Columns,
            )?,
            up_proj: loader.linear_with_room(
                &format!("{p}.mlp.up_proj"),
                hidden,
                inter,
                config.mlp_bias,
                SpareRoom::Columns,
            )?,
            down_proj: loader.linear_with_room(
                &format!("{p}.mlp.down_proj"),
                inter,
                hidden,
                config.mlp_bias,
                SpareRoom::RowsAndColumns,
            )?,
        };
        layers.push(DecoderLayer {
            input_layernorm: loader.norm(
                &format!("{p}.input_layernorm"),
                hidden,
                config.rms_norm_eps,
            )?,
            self_attn,
            post_attention_layernorm: loader.norm(
                &format!("{p}.post_attention_layernorm"),
                hidden,
                config.rms_norm_eps,
            )?,
            mlp,
        });
    }
    let embed = loader.matrix("model.embed_tokens.weight", vocab, hidden)?;
    let norm = loader.norm("model.norm", hidden, config.rms_norm_eps)?;
    // Some tied checkpoints still store lm_head.weight (a copy); the config decides.
    let lm_head = match config.tie_word_embeddings {
        true => None,
        false => Some(LoraLinear::from_weights(
            loader.matrix("lm_head.weight", vocab, hidden)?,
            None,
        )),
    };
    Ok(LlamaForCausalLm {
        embed_tokens: Embedding {
            weight: Param::from_tensor(embed).set_require_grad(false),
        },
        layers,
        norm,
        lm_head,
        rope: RotaryEmbedding::new(&config.inv_freq(), config.max_position_embeddings, device),
        checkpointing: CheckpointMode::Off,
    })
}

impl WeightSource for Checkpoint {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>, ModelError> {
        match self.contains(name) {
            true => self.read_f32(name, shape).map(Some),
            false => Ok(None),
        }
    }

    fn location(&self) -> PathBuf {
        self.path().to_path_buf()
    }
}

struct Loader<'a, B: Backend> {
    source: &'a mut dyn WeightSource,
    device: &'a B::Device,
}

impl<B: Backend> Loader<'_, B> {
    fn required(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        self.source
            .tensor(name, shape)?
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.source.location(),
                name: name.to_string(),
            })
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor<B, 1>, ModelError> {
        let values = self.required(name, &[len])?;
        Ok(Tensor::from_data(
            TensorData::new(values, [len]),
            self.device,
        ))
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Tensor<B, 2>, ModelError> {
        let values = self.required(name, &[rows, cols])?;
        Ok(Tensor::from_data(
            TensorData::new(values, [rows, cols]),
            self.device,
        ))
    }

    fn linear(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<LoraLinear<B>, ModelError> {
        self.linear_with_room(name, d_in, d_out, bias, SpareRoom::None)
    }

    /// A projection whose dense base weight gets `room` for its LoRA factors beside it (see
    /// [`SpareRoom`]): the MLP's, whose LoRA terms the fused MLP then folds into the base GEMMs.
    fn linear_with_room(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        room: SpareRoom,
    ) -> Result<LoraLinear<B>, ModelError> {
        let weight = format!("{name}.weight");
        let bias = match bias {
            true => Some(self.vector(&format!("{name}.bias"), d_out)?),
            false => None,
        };
        if let Some(packed) = self.source.packed(&weight, [d_out, d_in])? {
            return Ok(LoraLinear::from_packed(packed, bias, self.device));
        }
        let shape = [d_out, d_in];
        let weight = match room {
            SpareRoom::None => self.matrix(&weight, d_out, d_in)?,
            SpareRoom::Columns => {
                let values = self.required(&weight, &shape)?;
                fused_mlp::weight_with_spare_columns(values, shape, self.device)
            }
            SpareRoom::RowsAndColumns => {
                let values = self.required(&weight, &shape)?;
                fused_mlp::weight_with_spare_rows_and_columns(values, shape, self.device)
            }
        };
        Ok(LoraLinear::from_weights(weight, bias))
    }

    fn norm(&mut self, name: &str, hidden: usize, eps: f64) -> Result<RmsNorm<B>, ModelError> {
        Ok(RmsNorm::new(
            self.vector(&format!("{name}.weight"), hidden)?,
            eps,
        ))
    }
}

/// Room a dense base weight gets beside it for its LoRA factors, on the backends the fused ops
/// run on ([`fused_mlp::weight_with_spare_columns`]; elsewhere every weight is a plain tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpareRoom {
    /// None: the attention's projections (the LoRA linear and QKV ops accumulate their terms).
    None,
    /// Columns for `B` beside it: gate and up, whose forward takes its LoRA term so.
    Columns,
    /// Columns for `B` and rows for `A` below: down, whose forward and input gradient take
    /// their LoRA terms so.
    RowsAndColumns,
}

/// The projections of a decoder layer with their names inside the layer, in HF module order.
pub const LAYER_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl<B: Backend> DecoderLayer<B> {
    /// The layer's projections in [`LAYER_PROJECTIONS`] order.
    pub fn projections(&self) -> [&LoraLinear<B>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// The layer's projections in [`LAYER_PROJECTIONS`] order, mutably.
    pub fn projections_mut(&mut self) -> [&mut LoraLinear<B>; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }
}

impl<B: Backend> LlamaForCausalLm<B> {
    /// Every linear projection by HF module name (`model.layers.0.self_attn.q_proj`), in module
    /// order, then `lm_head` when it is not tied.
    pub fn projections(&self) -> Vec<(String, &LoraLinear<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, proj) in LAYER_PROJECTIONS.iter().zip(layer.projections()) {
                out.push((format!("model.layers.{i}.{name}"), proj));
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// [`Self::projections`], mutably.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, proj) in LAYER_PROJECTIONS.iter().zip(layer.projections_mut()) {
                out.push((format!("model.layers.{i}.{name}"), proj));
            }
        }
        if let Some(head) = self.lm_head.as_mut() {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// Every base tensor by its HF checkpoint name, in checkpoint order, as it is now (merged
    /// adapters included, unmerged ones not); `lm_head.weight` only when not tied. Packed
    /// projection weights are dequantized.
    pub fn base_tensors(&self) -> Vec<(String, TensorData)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.weight.val().into_data(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.weight.val().into_data(),
            ));
            for (name, proj) in LAYER_PROJECTIONS.iter().zip(layer.projections()) {
                out.push((format!("{p}.{name}.weight"), proj.base_weight().into_data()));
                if let Some(bias) = &proj.bias {
                    out.push((format!("{p}.{name}.bias"), bias.val().into_data()));
                }
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.val().into_data(),
            ));
        }
        out.push((
            "model.norm.weight".to_string(),
            self.norm.weight.val().into_data(),
        ));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.base_weight().into_data()));
        }
        out
    }
}
