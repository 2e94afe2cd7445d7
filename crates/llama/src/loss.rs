//! The causal language-modelling loss, as transformers computes it.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int};

/// Label value whose position carries no loss (PyTorch's `ignore_index`, TRL's prompt mask).
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy: position `t` predicts `labels[t + 1]`; positions whose label
/// is [`IGNORE_INDEX`] are skipped. Computed in f32 whatever the logits' dtype (f64 for f64
/// logits).
///
/// Returns a one-element tensor; `NaN` when every label is ignored (0/0, as PyTorch).
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`
/// - labels: `[batch, seq]`
/// - output: `[1]`
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    let predicting = logits
        .narrow(1, 0, seq - 1)
        .reshape([batch * (seq - 1), vocab]);
    let targets = labels.narrow(1, 1, seq - 1).reshape([batch * (seq - 1)]);
    token_cross_entropy(predicting, targets)
}

/// Summed next-token cross-entropy and the number of positions that count: the pieces a
/// trainer needs to average exactly over several micro-batches.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`
/// - labels: `[batch, seq]`
/// - output: (`[1]` sum, counted positions)
pub fn causal_lm_loss_sum<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, usize) {
    let [batch, seq, vocab] = logits.dims();
    let predicting = logits
        .narrow(1, 0, seq - 1)
        .reshape([batch * (seq - 1), vocab]);
    let targets = labels.narrow(1, 1, seq - 1).reshape([batch * (seq - 1)]);
    let counted = targets
        .clone()
        .not_equal_elem(IGNORE_INDEX)
        .int()
        .sum()
        .into_scalar()
        .elem::<i64>() as usize;
    (token_nll_sum(predicting, targets), counted)
}

/// Mean cross-entropy of `logits` rows against `targets`, skipping [`IGNORE_INDEX`].
///
/// # Shapes
/// - logits: `[tokens, vocab]`
/// - targets: `[tokens]`
/// - output: `[1]`
pub fn token_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    // The count in the loss's dtype, not the device's default float dtype: bf16 counts exactly
    // only to 256, and Burn's CubeCL binary ops read both operands at the left one's dtype.
    let kept = targets
        .clone()
        .not_equal_elem(IGNORE_INDEX)
        .float()
        .cast(accumulation_dtype(logits.dtype()));
    token_nll_sum(logits, targets) / kept.sum()
}

/// The dtype losses accumulate in for inputs of `dtype`: f64 stays f64, the rest is f32.
pub(crate) fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Summed negative log-likelihood of `targets` under `logits` rows, skipping [`IGNORE_INDEX`].
pub(crate) fn token_nll_sum<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let [tokens, _] = logits.dims();
    let kept = targets.clone().not_equal_elem(IGNORE_INDEX);
    // Ignored targets gather row 0 and are then zeroed; gather needs an in-range index.
    let safe_targets = targets.mask_fill(kept.clone().bool_not(), 0);
    let acc = accumulation_dtype(logits.dtype());
    let log_probs = log_softmax(logits.cast(acc), 1);
    let picked = log_probs
        .gather(1, safe_targets.reshape([tokens, 1]))
        .reshape([tokens]);
    (picked * kept.float().cast(acc)).sum().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn matches_float64_cross_entropy_and_skips_ignored() {
        let device = Default::default();
        let logits: Vec<f32> = (0..2 * 3 * 4)
            .map(|k| ((k * 7 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let labels = [[1i64, 2, 3], [0, IGNORE_INDEX, 1]];
        let loss = causal_lm_loss(
            Tensor::<B, 3>::from_data(TensorData::new(logits.clone(), [2, 3, 4]), &device),
            Tensor::<B, 2, Int>::from_data(labels, &device),
        );
        // Positions (b, t) predict labels[b][t+1]: (0,0)→2, (0,1)→3, (1,0) ignored, (1,1)→1.
        let nll = |b: usize, t: usize, target: usize| -> f64 {
            let row: Vec<f64> = (0..4)
                .map(|v| f64::from(logits[(b * 3 + t) * 4 + v]))
                .collect();
            let max = row.iter().copied().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
            lse - row[target]
        };
        let want = (nll(0, 0, 2) + nll(0, 1, 3) + nll(1, 1, 1)) / 3.0;
        let got = f64::from(loss.into_scalar());
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
