//! Learning-rate schedules with warmup, as transformers' `get_scheduler` computes them.

use serde::{Deserialize, Serialize};

/// How the learning rate moves after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// Linear decay to 0 at the last step (transformers' default).
    #[default]
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
    /// Constant after warmup.
    Constant,
}

/// The learning rate of optimizer step `step` (0-based) out of `total`, peaking at `peak`
/// after `warmup` steps. Step 0 of a warmup gets 0, as transformers' `LambdaLR` does.
pub fn learning_rate(
    kind: LrScheduler,
    peak: f64,
    step: usize,
    warmup: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / decay_steps;
    match kind {
        LrScheduler::Constant => peak,
        LrScheduler::Linear => peak * (1.0 - progress).max(0.0),
        LrScheduler::Cosine => {
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay_matches_transformers() {
        // transformers: lr_lambda(s) = s/w for s < w, else max(0, (T - s)/(T - w)).
        let lrs: Vec<f64> = (0..10)
            .map(|s| learning_rate(LrScheduler::Linear, 1.0, s, 2, 10))
            .collect();
        let want = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (got, want) in lrs.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{lrs:?}");
        }
    }

    #[test]
    fn cosine_is_half_at_midpoint_and_constant_stays() {
        assert!((learning_rate(LrScheduler::Cosine, 2.0, 6, 2, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(LrScheduler::Cosine, 2.0, 2, 2, 10) - 2.0).abs() < 1e-12);
        assert_eq!(learning_rate(LrScheduler::Constant, 3.0, 9, 2, 10), 3.0);
    }
}
