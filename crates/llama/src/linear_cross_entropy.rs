//! Fused linear cross-entropy: the LM head, log-softmax and next-token NLL computed chunk by
//! chunk of tokens, so `[tokens, vocab]` logits never exist beyond one chunk.
//!
//! A cross-entropy's gradient needs nothing the forward pass does not already have: for one
//! token with logits `z = W·h + b`, `∂nll/∂z = softmax(z) − onehot(target)`, so
//! `∂nll/∂h = Wᵀ·(softmax(z) − onehot)` and `∂nll/∂W = (softmax(z) − onehot)·hᵀ`. As Liger's
//! fused linear cross-entropy does, the forward pass therefore computes, per chunk and outside
//! the autodiff graph (on the inner backend), the chunk's logits, their log-sum-exp, the loss
//! and these gradients, and drops the chunk's logits before the next one. It then returns
//!
//! `loss + (s − detach(s))`, with `s = Σ h·dh + Σ W·dW + Σ b·db`
//!
//! in the autodiff graph, `dh`, `dW`, `db` being the precomputed gradients as constants: the
//! value is exactly `loss` (`s − s` is zero for finite `s`; a non-finite `s` makes the loss
//! NaN, so a trainer's NaN check still sees it) and the gradient that reaches `h`
//! (and `W`, `b`) is `upstream · dh` for any upstream scalar, so a caller may scale the loss, as
//! a trainer averaging over accumulated micro-batches does. Backward holds `dh` (`[tokens,
//! hidden]`) and, when the head trains, `dW` (`[vocab, hidden]`), never logits.
//!
//! Softmax, log-sum-exp, the loss and every gradient accumulate in f32 (f64 for f64 inputs);
//! the two GEMMs per chunk (three when the head trains) run in the hidden states' dtype, as
//! the model's own matmuls do, through [`fused_mlp::matmul`] (cuBLAS on CUDA).
//!
//! Every chunk has the same number of rows: when the tokens do not divide into whole chunks,
//! the last one starts early, over rows the previous chunk already counted, which it ignores.
//! With exact-size buffers (fastlora's CUDA default) a shorter last chunk reserves a second set
//! of chunk buffers (on the H200's memory log of a Llama-3.2-1B step, a 508-token last chunk held
//! 0.12 GiB beside the 512-token chunks'); the price is at most one chunk's worth of extra rows.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{IndexingUpdateOp, Int};
use fused_mlp::Trans::{N, T};
use fused_mlp::matmul;

use crate::loss::{IGNORE_INDEX, accumulation_dtype, causal_lm_loss_sum};
use crate::model::LlamaForCausalLm;

/// Bytes of f32 logits one chunk may hold under [`default_chunk_tokens`]: 256 MiB.
pub const CHUNK_LOGITS_BYTES: usize = 256 << 20;

/// Rows of a GEMM tile on the tensor cores: chunks of a multiple of it leave no tile part-empty.
const TILE_ROWS: usize = 128;

/// Tokens per chunk such that one chunk's f32 logits take at most [`CHUNK_LOGITS_BYTES`]
/// (at least one token), rounded down to a multiple of 128 where that leaves one: 512 tokens at
/// Llama 3's 128,256 vocabulary, 1,280 at SmolLM2's 49,152. The rounding keeps the head's GEMMs
/// in whole tiles (523-token chunks would fill their fifth 128-row tile with 11 rows).
pub fn default_chunk_tokens(vocab: usize) -> usize {
    let tokens = (CHUNK_LOGITS_BYTES / (4 * vocab.max(1))).max(1);
    if tokens >= TILE_ROWS {
        tokens / TILE_ROWS * TILE_ROWS
    } else {
        tokens
    }
}

/// Summed next-token cross-entropy of a causal LM from its final hidden states:
/// [`causal_lm_loss_sum`]'s sum for `model.logits(hidden)`, computed by
/// [`linear_cross_entropy_sum`] without materialising the logits. The number of positions that
/// count is not returned: counting them on the device would stall the host until the forward
/// ends (the trainer counts its labels on the host).
///
/// Position `t` predicts `labels[t + 1]`; [`IGNORE_INDEX`] labels carry no loss. The head is
/// `lm_head` (its base weight, dequantized if packed, and its bias) or, when tied, the embedding
/// matrix; gradients reach whichever of those trains (`modules_to_save`). An `lm_head` carrying
/// an unmerged LoRA adapter falls back to the materialised path ([`LlamaForCausalLm::logits`]
/// then [`causal_lm_loss_sum`]), which holds `[batch · seq, vocab]` f32 logits.
///
/// # Shapes
/// - hidden: `[batch, seq, hidden]`, from [`LlamaForCausalLm::hidden_states`]
/// - labels: `[batch, seq]`
/// - output: `[1]`
///
/// # Panics
/// If `chunk_tokens` is 0, if `seq` is below 2, or if the shapes disagree.
pub fn causal_lm_fused_loss_sum<B: AutodiffBackend>(
    model: &LlamaForCausalLm<B>,
    hidden: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
    chunk_tokens: usize,
) -> Tensor<B, 1> {
    let [batch, seq, width] = hidden.dims();
    assert!(
        seq >= 2,
        "next-token loss needs sequences of 2 tokens or more"
    );
    let (weight, bias) = match &model.lm_head {
        None => (model.embed_tokens.weight.val(), None),
        Some(head) if head.adapter.as_ref().is_some_and(|a| !a.merged) => {
            return causal_lm_loss_sum(model.logits(hidden), labels).0;
        }
        Some(head) => (head.base_weight(), head.bias.as_ref().map(|b| b.val())),
    };
    // Every position takes part, the last of each row with an ignored target: the hidden
    // states reshape without a copy and every buffer of the loss has the activations' sizes
    // (`[batch·seq, ·]`), which exact-size CUDA memory shares with the layers, where dropping
    // the last positions made `[batch·(seq − 1), ·]` buffers of sizes only the loss uses.
    let hidden = hidden.reshape([batch * seq, width]);
    let ignored = Tensor::<B, 2, Int>::full([batch, 1], IGNORE_INDEX, &labels.device());
    let targets =
        Tensor::cat(vec![labels.narrow(1, 1, seq - 1), ignored], 1).reshape([batch * seq]);
    loss_sum(hidden, weight, bias, targets, chunk_tokens, false).0
}

/// Mean cross-entropy of the logits `hidden·weightᵀ + bias` against `targets`, skipping
/// [`IGNORE_INDEX`]: [`linear_cross_entropy_sum`] divided by its count, `NaN` when every
/// target is ignored (0/0, as PyTorch).
///
/// # Shapes
/// - hidden: `[tokens, hidden]`
/// - weight: `[vocab, hidden]`
/// - bias: `[vocab]`
/// - targets: `[tokens]`
/// - output: `[1]`
///
/// # Panics
/// As [`linear_cross_entropy_sum`].
pub fn linear_cross_entropy<B: AutodiffBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    targets: Tensor<B, 1, Int>,
    chunk_tokens: usize,
) -> Tensor<B, 1> {
    let (sum, counted) = linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_tokens);
    sum / counted as f64
}

/// Summed cross-entropy of the logits `hidden·weightᵀ + bias` against `targets` and the number
/// of targets that count, computed `chunk_tokens` rows at a time (see the module docs).
/// The result does not depend on `chunk_tokens` beyond float rounding.
///
/// Memory beyond the inputs: during the call, a few `[chunk_tokens, vocab]` buffers (the
/// chunk's f32 logits, their exponentials, the logits' gradient and its copy in the inputs'
/// dtype); kept for backward, `∂/∂hidden` (`[tokens, hidden]`, in the hidden states' dtype) and,
/// when the head trains, `∂/∂weight` (`[vocab, hidden]`, f32). No logits are kept for backward.
///
/// Targets equal to [`IGNORE_INDEX`] carry no loss and no gradient. The loss is in f32 (f64 for
/// f64 inputs) whatever the inputs' dtype. Gradients reach `hidden` always, and `weight` and
/// `bias` when they require them ([`Tensor::is_require_grad`]: trainable parameters). A weight
/// computed from parameters inside the graph (not a leaf) receives no gradient here; use
/// [`crate::token_cross_entropy`] on materialised logits for that.
///
/// # Shapes
/// - hidden: `[tokens, hidden]`
/// - weight: `[vocab, hidden]`
/// - bias: `[vocab]`
/// - targets: `[tokens]`, each in `0..vocab` or [`IGNORE_INDEX`]
/// - output: (`[1]` sum, counted targets)
///
/// # Panics
/// If `chunk_tokens` is 0 or the shapes disagree. A target outside `0..vocab` panics on the
/// ndarray backend and reads out of bounds on others.
pub fn linear_cross_entropy_sum<B: AutodiffBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    targets: Tensor<B, 1, Int>,
    chunk_tokens: usize,
) -> (Tensor<B, 1>, usize) {
    loss_sum(hidden, weight, bias, targets, chunk_tokens, true)
}

/// [`linear_cross_entropy_sum`], the targets counted only when `count` (else 0): a count is a
/// read from the device, which waits for everything queued before it.
fn loss_sum<B: AutodiffBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    targets: Tensor<B, 1, Int>,
    chunk_tokens: usize,
    count: bool,
) -> (Tensor<B, 1>, usize) {
    assert!(chunk_tokens > 0, "chunk_tokens must be positive");
    let [tokens, width] = hidden.dims();
    let [vocab, weight_width] = weight.dims();
    assert_eq!(
        width, weight_width,
        "hidden width {width} vs head weight [{vocab}, {weight_width}]"
    );
    assert_eq!(targets.dims(), [tokens], "one target per hidden row");
    if let Some(bias) = &bias {
        assert_eq!(bias.dims(), [vocab], "one bias per vocabulary entry");
    }
    let compute = hidden.dtype();
    let acc = accumulation_dtype(compute);
    let device = hidden.device();

    let chunks = chunked_cross_entropy(
        hidden.clone().inner(),
        weight.clone().inner().cast(compute),
        bias.clone().map(|b| b.inner().cast(acc)),
        targets.inner(),
        chunk_tokens,
        count,
        Wanted {
            weight: weight.is_require_grad(),
            bias: bias.as_ref().is_some_and(Tensor::is_require_grad),
        },
    );

    let loss = match chunks.loss {
        Some(loss) => Tensor::from_inner(loss),
        None => Tensor::zeros([1], (&device, acc)),
    };
    let mut surrogate = Vec::new();
    if let Some(d_hidden) = chunks.hidden {
        // `p − p.detach()` with `p = hidden·∂loss/∂hidden` is zero in every element, so its
        // sum is exactly 0 whatever the magnitudes, and its backward hands `∂loss/∂hidden`
        // (times the incoming gradient) to `hidden`. It stays in the hidden states' dtype: the
        // head's GEMM has rounded the gradient to it already, and an f32 `[tokens, hidden]`
        // copy would be a buffer size nothing else uses (exact-size CUDA memory keeps one of
        // each size it has seen).
        let p = hidden * Tensor::from_inner(d_hidden);
        surrogate.push((p.clone() - p.detach()).sum().cast(acc));
    }
    if let Some(d_weight) = chunks.weight {
        surrogate.push((weight.cast(acc) * Tensor::from_inner(d_weight)).sum());
    }
    if let (Some(bias), Some(d_bias)) = (bias, chunks.bias) {
        surrogate.push((bias.cast(acc) * Tensor::from_inner(d_bias)).sum());
    }
    let loss = match surrogate.into_iter().reduce(|a, b| a + b) {
        Some(s) => loss + (s.clone() - s.detach()),
        None => loss,
    };
    (loss, chunks.counted)
}

/// Which parameter gradients to accumulate besides the hidden states'.
#[derive(Clone, Copy)]
struct Wanted {
    weight: bool,
    bias: bool,
}

/// The loss and its gradients, summed over the chunks, in the accumulation dtype.
struct ChunkSums<I: Backend> {
    /// `[1]`; `None` when there are no tokens.
    loss: Option<Tensor<I, 1>>,
    /// Targets that count (0 when not counted).
    counted: usize,
    /// `∂loss/∂hidden`, `[tokens, hidden]` in the hidden states' dtype, filled chunk by chunk;
    /// `None` when there are no tokens.
    hidden: Option<Tensor<I, 2>>,
    /// `∂loss/∂weight`, `[vocab, hidden]`, when wanted.
    weight: Option<Tensor<I, 2>>,
    /// `∂loss/∂bias`, `[vocab]`, when wanted.
    bias: Option<Tensor<I, 1>>,
}

/// The forward-and-gradient loop, outside the autodiff graph; `weight` is in `hidden`'s dtype,
/// `bias` in the accumulation dtype.
fn chunked_cross_entropy<I: Backend>(
    hidden: Tensor<I, 2>,
    weight: Tensor<I, 2>,
    bias: Option<Tensor<I, 1>>,
    targets: Tensor<I, 1, Int>,
    chunk_tokens: usize,
    count: bool,
    wanted: Wanted,
) -> ChunkSums<I> {
    let [tokens, _] = hidden.dims();
    let [vocab, _] = weight.dims();
    let compute = hidden.dtype();
    let acc = accumulation_dtype(compute);
    let counted = match count {
        true => targets
            .clone()
            .not_equal_elem(IGNORE_INDEX)
            .int()
            .sum()
            .into_scalar()
            .elem::<i64>() as usize,
        false => 0,
    };
    let mut sums = ChunkSums {
        loss: None,
        counted,
        // Every row is written by exactly one chunk below.
        hidden: (tokens > 0).then(|| Tensor::empty(hidden.dims(), (&hidden.device(), compute))),
        weight: None,
        bias: None,
    };
    let len = chunk_tokens.min(tokens);
    let mut start = 0;
    while start < tokens {
        // Every chunk has `len` rows: a short last chunk starts earlier instead, its first
        // `skip` rows (already counted) ignored, so all chunks share one set of buffer sizes
        // (exact-size CUDA memory keeps buffers per size) for at most a chunk of extra work.
        let from = start.min(tokens - len);
        let skip = start - from;
        start = from + len;
        let rows = (from, skip);
        let h = hidden.clone().narrow(0, from, len);
        let mut t = targets.clone().narrow(0, from, len);
        if skip > 0 {
            let counted_before =
                Tensor::<I, 1, Int>::arange(0..len as i64, &t.device()).lower_elem(skip as i64);
            t = t.mask_fill(counted_before, IGNORE_INDEX);
        }
        let logits = matmul(h.clone(), N, weight.clone(), T);
        // One CubeCL kernel for the loss and softmax − onehot where the backend has it and no
        // bias gradient is needed (the Llama family has no head bias).
        let (logits, t) = match bias.is_none() && !wanted.bias {
            true => match fused_ce::cross_entropy_rows(logits, t) {
                Ok((nll, d_logits)) => {
                    // Ignored rows come back as zero loss and zero gradient.
                    sums.loss = Some(accumulate(sums.loss.take(), nll.cast(acc).sum()));
                    push_grads(&mut sums, d_logits.cast(compute), h, &weight, wanted, rows);
                    continue;
                }
                Err(operands) => operands,
            },
            false => (logits, t),
        };
        let kept = t.clone().not_equal_elem(IGNORE_INDEX);
        // `float()` makes the device's default dtype; the arithmetic below is all in `acc`.
        let kept_f = kept.clone().float().cast(acc).reshape([len, 1]);
        // Ignored rows pick column 0 (gather and scatter need an in-range index); their loss
        // and gradient are zeroed by `kept_f`.
        let index = t.mask_fill(kept.bool_not(), 0).reshape([len, 1]);
        let mut logits = logits.cast(acc);
        if let Some(bias) = &bias {
            logits = logits + bias.clone().unsqueeze_dim(0);
        }
        let picked = logits.clone().gather(1, index.clone());
        let max = logits.clone().max_dim(1);
        let exp = (logits - max.clone()).exp();
        let sum_exp = exp.clone().sum_dim(1);
        let nll = (sum_exp.clone().log() + max - picked) * kept_f.clone();
        sums.loss = Some(accumulate(sums.loss.take(), nll.sum()));

        // softmax − onehot on counted rows, zero rows for ignored ones.
        let d_logits = (exp * (kept_f.clone() / sum_exp)).scatter(
            1,
            index,
            kept_f.neg(),
            IndexingUpdateOp::Add,
        );
        if wanted.bias {
            let d_bias = d_logits.clone().sum_dim(0).reshape([vocab]);
            sums.bias = Some(accumulate(sums.bias.take(), d_bias));
        }
        push_grads(&mut sums, d_logits.cast(compute), h, &weight, wanted, rows);
    }
    sums
}

/// Adds the `∂/∂h` (and `∂/∂W` when wanted) of the chunk at rows `from..` from its
/// `∂loss/∂logits`; its first `skip` rows belong to the previous chunk (their gradient rows are
/// zero) and are left out of `∂/∂h`.
fn push_grads<I: Backend>(
    sums: &mut ChunkSums<I>,
    d_logits: Tensor<I, 2>,
    h: Tensor<I, 2>,
    weight: &Tensor<I, 2>,
    wanted: Wanted,
    (from, skip): (usize, usize),
) {
    let acc = accumulation_dtype(d_logits.dtype());
    if wanted.weight {
        let d_weight = matmul(d_logits.clone(), T, h, N).cast(acc);
        sums.weight = Some(accumulate(sums.weight.take(), d_weight));
    }
    let rows = d_logits.dims()[0];
    let d_hidden = matmul(d_logits, N, weight.clone(), N);
    let d_hidden = match skip {
        0 => d_hidden,
        _ => d_hidden.narrow(0, skip, rows - skip),
    };
    let all = sums.hidden.take().expect("allocated when there are tokens");
    let [_, width] = all.dims();
    sums.hidden = Some(all.slice_assign([from + skip..from + rows, 0..width], d_hidden));
}

fn accumulate<I: Backend, const D: usize>(
    total: Option<Tensor<I, D>>,
    term: Tensor<I, D>,
) -> Tensor<I, D> {
    match total {
        Some(total) => total + term,
        None => term,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::token_nll_sum;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Element, TensorData};

    type F64 = Autodiff<NdArray<f64>>;
    type F32 = Autodiff<NdArray<f32>>;

    const TOKENS: usize = 13;
    const WIDTH: usize = 6;
    const VOCAB: usize = 11;
    /// Ignored at the first row, mid-chunk and at the last row, for every chunk size below.
    const TARGETS: [i64; TOKENS] = [-100, 3, 10, 0, -100, -100, 7, 2, 5, 9, 1, 4, -100];
    /// Ragged ones included: 2, 3, 5 and 12 do not divide 13.
    const CHUNKS: [usize; 7] = [1, 2, 3, 5, 12, 13, 64];

    /// Deterministic values of magnitude about `scale`.
    fn values(n: usize, seed: f64, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|k| scale * (seed + 0.7 * k as f64).sin() * (1.3 + (0.31 * k as f64).cos()))
            .collect()
    }

    /// In the backend's own float dtype: the ndarray device is shared by `NdArray<f32>` and
    /// `NdArray<f64>`, and its default dtype is whichever test touched it first.
    fn tensor<B: Backend, const D: usize>(
        values: Vec<f64>,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        let dtype = <B::FloatElem as Element>::dtype();
        Tensor::from_data(TensorData::new(values, shape), (device, dtype))
    }

    fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
        t.into_data().convert::<f64>().to_vec().unwrap()
    }

    /// `max |got − want| ≤ tol · max |want|`.
    fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
        assert!(
            err <= tol * scale,
            "{what}: max error {err:e} vs scale {scale:e}\n got {got:?}\nwant {want:?}"
        );
    }

    /// The problem's leaves: `x` feeds the hidden states through one op (so they are not a
    /// leaf, as in a model), `weight` and `bias` are trainable.
    struct Leaves<B: AutodiffBackend> {
        x: Tensor<B, 2>,
        weight: Tensor<B, 2>,
        bias: Tensor<B, 1>,
        targets: Tensor<B, 1, Int>,
    }

    impl<B: AutodiffBackend> Leaves<B> {
        fn new(targets: &[i64]) -> Self {
            let device = Default::default();
            Self {
                x: tensor(values(TOKENS * WIDTH, 0.3, 1.5), [TOKENS, WIDTH], &device)
                    .require_grad(),
                weight: tensor(values(VOCAB * WIDTH, 1.1, 1.0), [VOCAB, WIDTH], &device)
                    .require_grad(),
                bias: tensor(values(VOCAB, 2.9, 0.5), [VOCAB], &device).require_grad(),
                targets: Tensor::from_data(TensorData::new(targets.to_vec(), [TOKENS]), &device),
            }
        }

        fn hidden(&self) -> Tensor<B, 2> {
            self.x.clone() * 1.5
        }

        /// The loss (as `f64`) and the gradients of `x`, `weight` and `bias`.
        fn backward(&self, loss: Tensor<B, 1>) -> [Vec<f64>; 4] {
            let grads = loss.backward();
            let grad = |t: &Tensor<B, 2>| to_vec(t.grad(&grads).unwrap());
            [
                to_vec(loss),
                grad(&self.x),
                grad(&self.weight),
                to_vec(self.bias.grad(&grads).unwrap()),
            ]
        }

        /// The materialised path: full logits, then the existing summed NLL.
        fn materialised_sum(&self) -> Tensor<B, 1> {
            let logits = self.hidden().matmul(self.weight.clone().transpose())
                + self.bias.clone().unsqueeze_dim(0);
            token_nll_sum(logits, self.targets.clone())
        }

        fn fused_sum(&self, chunk_tokens: usize) -> (Tensor<B, 1>, usize) {
            linear_cross_entropy_sum(
                self.hidden(),
                self.weight.clone(),
                Some(self.bias.clone()),
                self.targets.clone(),
                chunk_tokens,
            )
        }
    }

    fn matches_materialised<B: AutodiffBackend>(tol: f64) {
        let counted = TARGETS.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let leaves = Leaves::<B>::new(&TARGETS);
        assert_eq!(leaves.hidden().dtype(), <B::FloatElem as Element>::dtype());
        let want_sum = leaves.backward(leaves.materialised_sum());
        let want_mean = leaves.backward(leaves.materialised_sum() / counted as f64);
        for chunk in CHUNKS {
            let (sum, got_counted) = leaves.fused_sum(chunk);
            assert_eq!(got_counted, counted);
            let got = leaves.backward(sum);
            for (k, what) in ["sum", "d x", "d weight", "d bias"].iter().enumerate() {
                assert_close(
                    &format!("{what}, chunk {chunk}"),
                    &got[k],
                    &want_sum[k],
                    tol,
                );
            }
            let mean = linear_cross_entropy(
                leaves.hidden(),
                leaves.weight.clone(),
                Some(leaves.bias.clone()),
                leaves.targets.clone(),
                chunk,
            );
            let got = leaves.backward(mean);
            for (k, what) in ["mean", "d x", "d weight", "d bias"].iter().enumerate() {
                assert_close(
                    &format!("{what}, chunk {chunk}"),
                    &got[k],
                    &want_mean[k],
                    tol,
                );
            }
        }
    }

    #[test]
    fn matches_the_materialised_loss_in_f64_across_chunk_sizes() {
        matches_materialised::<F64>(1e-12);
    }

    #[test]
    fn matches_the_materialised_loss_in_f32_across_chunk_sizes() {
        matches_materialised::<F32>(1e-6);
    }

    #[test]
    fn every_target_ignored_gives_zero_sum_and_gradients_and_a_nan_mean() {
        let leaves = Leaves::<F64>::new(&[IGNORE_INDEX; TOKENS]);
        let want = leaves.backward(leaves.materialised_sum());
        for chunk in CHUNKS {
            let (sum, counted) = leaves.fused_sum(chunk);
            assert_eq!(counted, 0);
            let got = leaves.backward(sum);
            for (k, what) in ["sum", "d x", "d weight", "d bias"].iter().enumerate() {
                assert!(got[k].iter().all(|&v| v == 0.0), "{what}: {:?}", got[k]);
                assert_eq!(got[k], want[k], "{what}");
            }
            let mean = linear_cross_entropy(
                leaves.hidden(),
                leaves.weight.clone(),
                None,
                leaves.targets.clone(),
                chunk,
            );
            assert!(mean.into_scalar().is_nan());
        }
    }

    /// Two tokens, hidden width 2, vocabulary 3, no bias; the second token is ignored.
    #[test]
    fn matches_a_float64_closed_form() {
        let device = Default::default();
        let h = [[0.5, -1.0], [2.0, 0.25]];
        let w = [[1.0, 0.0], [-0.5, 2.0], [0.25, 0.75]];
        let target = 2;
        // Token 0 only: z = W·h₀, loss = lse(z) − z₂, ∂/∂h₀ = Wᵀ(p − e₂), ∂/∂W = (p − e₂)·h₀ᵀ.
        let z: Vec<f64> = w.iter().map(|r| r[0] * h[0][0] + r[1] * h[0][1]).collect();
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        let p: Vec<f64> = z.iter().map(|v| (v - lse).exp()).collect();
        let dz: Vec<f64> = (0..3)
            .map(|v| p[v] - f64::from(u8::from(v == target)))
            .collect();
        let want_loss = lse - z[target];
        // The ignored token's row stays zero.
        let want_dh: Vec<f64> = (0..2)
            .map(|j| (0..3).map(|v| w[v][j] * dz[v]).sum())
            .chain([0.0, 0.0])
            .collect();
        let want_dw: Vec<f64> = (0..3)
            .flat_map(|v| (0..2).map(move |j| (v, j)))
            .map(|(v, j)| dz[v] * h[0][j])
            .collect();

        let hidden = tensor::<F64, 2>(h.concat(), [2, 2], &device).require_grad();
        let weight = tensor::<F64, 2>(w.concat(), [3, 2], &device).require_grad();
        let targets = Tensor::<F64, 1, Int>::from_data([target as i64, IGNORE_INDEX], &device);
        for chunk in [1, 2] {
            let loss =
                linear_cross_entropy(hidden.clone(), weight.clone(), None, targets.clone(), chunk);
            let grads = loss.backward();
            assert_close("loss", &to_vec(loss), &[want_loss], 1e-14);
            let got_dh = to_vec(hidden.grad(&grads).unwrap());
            assert_close("d hidden", &got_dh, &want_dh, 1e-14);
            assert_close(
                "d weight",
                &to_vec(weight.grad(&grads).unwrap()),
                &want_dw,
                1e-14,
            );
        }
    }

    #[test]
    fn a_frozen_head_gets_no_gradient_and_a_scaled_loss_scales_the_gradient() {
        let leaves = Leaves::<F64>::new(&TARGETS);
        let frozen = leaves.weight.clone().detach().set_require_grad(false);
        let fused = |scale: f64| {
            let (sum, _) = linear_cross_entropy_sum(
                leaves.hidden(),
                frozen.clone(),
                None,
                leaves.targets.clone(),
                5,
            );
            let value = to_vec(sum.clone());
            let grads = (sum * scale).backward();
            assert!(frozen.grad(&grads).is_none());
            (value, to_vec(leaves.x.grad(&grads).unwrap()))
        };
        let logits = leaves.hidden().matmul(frozen.clone().transpose());
        let want_sum = token_nll_sum(logits, leaves.targets.clone());
        let grads = (want_sum.clone() * 0.25).backward();
        let want_dx = to_vec(leaves.x.grad(&grads).unwrap());
        let (sum, dx) = fused(0.25);
        assert_close("sum", &sum, &to_vec(want_sum), 1e-12);
        assert_close("d x at 1/4", &dx, &want_dx, 1e-12);
        let (_, unscaled) = fused(1.0);
        let scaled: Vec<f64> = unscaled.iter().map(|v| v * 0.25).collect();
        assert_close("d x scales", &dx, &scaled, 1e-15);
    }

    #[test]
    fn default_chunks_hold_at_most_256_mib_of_f32_logits_in_whole_tiles() {
        for vocab in [1, 320, 49_152, 128_256, 300_000_000] {
            let chunk = default_chunk_tokens(vocab);
            assert!(chunk >= 1);
            assert!(
                chunk == 1 || chunk * vocab * 4 <= CHUNK_LOGITS_BYTES,
                "{vocab}"
            );
            let step = if chunk >= TILE_ROWS { TILE_ROWS } else { 1 };
            assert!(
                chunk.is_multiple_of(step),
                "{vocab}: {chunk} is not whole tiles"
            );
            assert!(
                (chunk + step) * vocab * 4 > CHUNK_LOGITS_BYTES,
                "{vocab}: could be larger"
            );
        }
        assert_eq!(default_chunk_tokens(128_256), 512);
        assert_eq!(default_chunk_tokens(49_152), 1_280);
        assert_eq!(default_chunk_tokens(320_000), 128);
    }
}
