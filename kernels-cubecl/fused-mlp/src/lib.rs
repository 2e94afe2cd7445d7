//! The LoRA SwiGLU MLP as one operation: `y = down(silu(gate(x)) · up(x))` where each projection
//! may carry a LoRA adapter, following Unsloth's `LoRA_MLP` math:
//!
//! - `e = x·W_gᵀ + s_g·(x·A_gᵀ)·B_gᵀ`, `g = x·W_uᵀ + s_u·(x·A_uᵀ)·B_uᵀ`
//! - `h = silu(e)·g`
//! - `y = h·W_dᵀ + s_d·(h·A_dᵀ)·B_dᵀ`
//!
//! Today this crate holds the portable path (plain Burn ops, the same math), which every backend
//! runs and which is the oracle for the fused CUDA kernel, and the rule that decides when the
//! fused kernel may take over ([`check_fusable`]). The CubeCL kernel with its own backward is not
//! written yet.

use burn::prelude::*;
use burn::tensor::activation::silu;
use lora_layers::LoraLinear;

/// Why an MLP cannot take the fused path (it then runs the portable path, same result).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotFusable {
    /// A projection has no LoRA adapter.
    #[error("`{0}` carries no LoRA adapter")]
    NoAdapter(&'static str),
    /// A projection's adapter uses dropout, which the fused kernel does not apply.
    #[error("`{0}` has LoRA dropout {1} (the fused path needs 0)")]
    Dropout(&'static str, f64),
    /// A projection has a base bias, which the fused kernel does not add.
    #[error("`{0}` has a base bias")]
    BaseBias(&'static str),
}

/// Checks Unsloth's patch rule for the MLP: all three projections carry LoRA with dropout 0
/// and no base bias.
///
/// # Errors
/// The first [`NotFusable`] reason found, in gate, up, down order.
pub fn check_fusable<B: Backend>(
    gate: &LoraLinear<B>,
    up: &LoraLinear<B>,
    down: &LoraLinear<B>,
) -> Result<(), NotFusable> {
    for (name, proj) in [("gate_proj", gate), ("up_proj", up), ("down_proj", down)] {
        let adapter = proj.adapter.as_ref().ok_or(NotFusable::NoAdapter(name))?;
        if adapter.dropout.prob != 0.0 {
            return Err(NotFusable::Dropout(name, adapter.dropout.prob));
        }
        if proj.bias.is_some() {
            return Err(NotFusable::BaseBias(name));
        }
    }
    Ok(())
}

/// The portable LoRA SwiGLU MLP.
///
/// # Shapes
/// - x: `[batch, seq, hidden]`
/// - output: `[batch, seq, hidden]`
pub fn lora_mlp<B: Backend>(
    x: Tensor<B, 3>,
    gate: &LoraLinear<B>,
    up: &LoraLinear<B>,
    down: &LoraLinear<B>,
) -> Tensor<B, 3> {
    let e = gate.forward(x.clone());
    let g = up.forward(x);
    down.forward(silu(e) * g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use lora_layers::{LoraAdapterConfig, LoraInit, LoraLinearConfig};

    type B = NdArray<f32>;

    fn projections(bias: bool, dropout: f64) -> [LoraLinear<B>; 3] {
        let device = Default::default();
        let adapter = LoraAdapterConfig::new(2, 0.5).with_dropout(dropout);
        [(6, 10), (6, 10), (10, 6)].map(|(d_in, d_out)| {
            LoraLinearConfig::new(d_in, d_out)
                .with_bias(bias)
                .init::<B>(&device)
                .init_adapter(&adapter, LoraInit::Random, d_in as u64, "m")
                .unwrap()
        })
    }

    #[test]
    fn portable_path_is_swiglu_in_float64() {
        let [gate, up, down] = projections(false, 0.0);
        let device = Default::default();
        let x = Tensor::<B, 3>::random([1, 2, 6], burn::tensor::Distribution::Default, &device);
        let got: Vec<f32> = lora_mlp(x.clone(), &gate, &up, &down)
            .into_data()
            .to_vec()
            .unwrap();
        let vec = |t: Tensor<B, 3>| -> Vec<f64> {
            t.into_data()
                .to_vec::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        let (e, g) = (vec(gate.forward(x.clone())), vec(up.forward(x)));
        let h: Vec<f32> = e
            .iter()
            .zip(&g)
            .map(|(e, g)| (e / (1.0 + (-e).exp()) * g) as f32)
            .collect();
        let want = down.forward(Tensor::<B, 3>::from_data(
            TensorData::new(h, [1, 2, 10]),
            &device,
        ));
        for (p, q) in got.iter().zip(want.into_data().to_vec::<f32>().unwrap()) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }

    #[test]
    fn patch_rule_names_the_blocking_projection() {
        let [gate, up, down] = projections(false, 0.0);
        assert_eq!(check_fusable(&gate, &up, &down), Ok(()));
        let plain_up = LoraLinear::from_weights(up.weight.val(), None);
        assert_eq!(
            check_fusable(&gate, &plain_up, &down),
            Err(NotFusable::NoAdapter("up_proj"))
        );
        let [gate, up, down] = projections(true, 0.0);
        assert_eq!(
            check_fusable(&gate, &up, &down),
            Err(NotFusable::BaseBias("gate_proj"))
        );
        let [gate, up, down] = projections(false, 0.1);
        assert_eq!(
            check_fusable(&gate, &up, &down),
            Err(NotFusable::Dropout("gate_proj", 0.1))
        );
    }
}
