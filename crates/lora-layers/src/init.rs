//! Seeded initialisation of LoRA factors, following PEFT's `reset_lora_parameters`.
//!
//! Factors are drawn on the host in a fixed order from a ChaCha stream seeded by
//! `(random_state, module name)`, so the same seed gives the same adapters on every backend and
//! whatever order modules are visited in.

use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

/// How the A/B factors of a new adapter are initialised (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default (`true`): `A ~ U(±1/√in)` (kaiming-uniform with `a = √5`), `B = 0`, so the
    /// adapter starts as the identity update.
    KaimingUniform,
    /// `"gaussian"`: `A ~ N(0, σ = 1/r)`, `B = 0`.
    Gaussian,
    /// `false`: both factors keep `nn.Linear`'s default init (`U(±1/√fan_in)`), so the adapter
    /// changes the output from the start. For debugging and tests.
    Random,
    /// `"pissa"`: the top-`r` singular triplets of the base weight become `A` and `B`, and the
    /// base weight keeps the residual `W − s·B·A` (the output is unchanged at init).
    Pissa,
}

/// Errors from initialising LoRA factors.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InitError {
    /// PiSSA needs the base weight to decompose.
    #[error("PiSSA initialisation of `{module}` needs its base weight, which was not given")]
    PissaNeedsWeight {
        /// Module being initialised.
        module: String,
    },
    /// The rank exceeds what the weight's shape allows.
    #[error(
        "rank {rank} of `{module}` exceeds min(out, in) = {max} (PiSSA takes r singular vectors)"
    )]
    RankTooLarge {
        /// Module being initialised.
        module: String,
        /// Requested rank.
        rank: usize,
        /// Largest rank the shape allows.
        max: usize,
    },
}

/// Freshly initialised LoRA factors, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFactors {
    /// `A`, `[rank, d_input]`.
    pub a: Vec<f32>,
    /// `B`, `[d_output, rank]`.
    pub b: Vec<f32>,
    /// For PiSSA only: the residual base weight `W − s·B·A`, `[d_output, d_input]`.
    pub residual_weight: Option<Vec<f32>>,
}

/// Shape and scaling of the factors to initialise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FactorShape {
    /// Rank `r`.
    pub rank: usize,
    /// Input features of the wrapped linear.
    pub d_input: usize,
    /// Output features of the wrapped linear.
    pub d_output: usize,
    /// The adapter's scaling `s`, used by PiSSA to split the singular values.
    pub scaling: f64,
}

/// A stable per-module seed: the same `(random_state, module)` always gives the same stream.
///
/// FNV-1a of the name mixed into the seed; independent of visiting order and of the platform.
pub fn module_seed(random_state: u64, module: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in module.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    random_state ^ hash
}

/// Draws the factors of one adapter.
///
/// `base_weight` (`[d_output, d_input]`, row-major) is read by [`LoraInit::Pissa`] only.
///
/// # Errors
/// [`InitError::PissaNeedsWeight`] when PiSSA gets no weight, [`InitError::RankTooLarge`] when
/// PiSSA's rank exceeds `min(d_output, d_input)`.
pub fn init_factors(
    init: LoraInit,
    shape: FactorShape,
    seed: u64,
    module: &str,
    base_weight: Option<&[f32]>,
) -> Result<LoraFactors, InitError> {
    let FactorShape {
        rank,
        d_input,
        d_output,
        ..
    } = shape;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let zeros_b = || vec![0.0f32; d_output * rank];
    Ok(match init {
        LoraInit::KaimingUniform => LoraFactors {
            a: uniform(&mut rng, rank * d_input, fan_in_bound(d_input)),
            b: zeros_b(),
            residual_weight: None,
        },
        LoraInit::Gaussian => {
            let normal = Normal::new(0.0f64, 1.0 / rank as f64).expect("rank > 0 gives a finite σ");
            LoraFactors {
                a: (0..rank * d_input)
                    .map(|_| normal.sample(&mut rng) as f32)
                    .collect(),
                b: zeros_b(),
                residual_weight: None,
            }
        }
        LoraInit::Random => LoraFactors {
            a: uniform(&mut rng, rank * d_input, fan_in_bound(d_input)),
            b: uniform(&mut rng, d_output * rank, fan_in_bound(rank)),
            residual_weight: None,
        },
        LoraInit::Pissa => {
            let weight = base_weight.ok_or_else(|| InitError::PissaNeedsWeight {
                module: module.to_string(),
            })?;
            pissa(weight, shape, module)?
        }
    })
}

/// kaiming-uniform with `a = √5` on a fan-in of `n`: gain √(1/3), bound √3·gain/√n = 1/√n.
fn fan_in_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

fn uniform(rng: &mut impl Rng, len: usize, bound: f64) -> Vec<f32> {
    let dist = Uniform::new_inclusive(-bound, bound).expect("finite, ordered bounds");
    (0..len).map(|_| dist.sample(rng) as f32).collect()
}

/// PiSSA: `W = U·S·Vᵀ`; with `S' = S_r / s`, `A = √S'·V_rᵀ`, `B = U_r·√S'`, residual `W − s·B·A`.
fn pissa(weight: &[f32], shape: FactorShape, module: &str) -> Result<LoraFactors, InitError> {
    let FactorShape {
        rank,
        d_input,
        d_output,
        scaling,
    } = shape;
    let max = d_output.min(d_input);
    if rank > max {
        return Err(InitError::RankTooLarge {
            module: module.to_string(),
            rank,
            max,
        });
    }
    let w = DMatrix::from_row_iterator(d_output, d_input, weight.iter().map(|&v| f64::from(v)));
    let svd = w.clone().svd(true, true);
    let (u, v_t) = (svd.u.expect("requested U"), svd.v_t.expect("requested Vᵀ"));
    // nalgebra does not promise sorted singular values; PiSSA takes the largest r.
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let mut a = DMatrix::<f64>::zeros(rank, d_input);
    let mut b = DMatrix::<f64>::zeros(d_output, rank);
    for (k, &idx) in order.iter().take(rank).enumerate() {
        let root = (svd.singular_values[idx] / scaling).sqrt();
        a.set_row(k, &(v_t.row(idx) * root));
        b.set_column(k, &(u.column(idx) * root));
    }
    let residual = &w - (&b * &a) * scaling;
    let row_major = |m: &DMatrix<f64>| -> Vec<f32> {
        m.row_iter()
            .flat_map(|row| row.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .collect()
    };
    Ok(LoraFactors {
        a: row_major(&a),
        b: row_major(&b),
        residual_weight: Some(row_major(&residual)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: FactorShape = FactorShape {
        rank: 4,
        d_input: 32,
        d_output: 24,
        scaling: 2.0,
    };

    fn std_of(values: &[f32]) -> f64 {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        (values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt()
    }

    #[test]
    fn kaiming_uniform_matches_peft_bounds_and_zero_b() {
        let shape = FactorShape {
            rank: 64,
            d_input: 256,
            ..SHAPE
        };
        let f = init_factors(LoraInit::KaimingUniform, shape, 1, "m", None).unwrap();
        let bound = 1.0 / 16.0;
        assert!(f.a.iter().all(|&v| f64::from(v.abs()) <= bound));
        // U(±b) has σ = b/√3.
        assert!((std_of(&f.a) - bound / 3f64.sqrt()).abs() < 0.02 * bound);
        assert!(f.b.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn gaussian_has_std_one_over_rank() {
        let shape = FactorShape {
            rank: 8,
            d_input: 4096,
            ..SHAPE
        };
        let f = init_factors(LoraInit::Gaussian, shape, 7, "m", None).unwrap();
        assert!((std_of(&f.a) - 0.125).abs() < 0.003, "std {}", std_of(&f.a));
        assert!(f.b.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn same_seed_same_factors_other_module_other_factors() {
        let draw = |name: &str| {
            init_factors(LoraInit::Random, SHAPE, module_seed(3407, name), name, None).unwrap()
        };
        assert_eq!(
            draw("model.layers.0.self_attn.q_proj"),
            draw("model.layers.0.self_attn.q_proj")
        );
        assert_ne!(
            draw("model.layers.0.self_attn.q_proj").a,
            draw("model.layers.1.self_attn.q_proj").a
        );
    }

    #[test]
    fn pissa_reconstructs_weight_and_takes_top_singular_values() {
        let (o, i) = (SHAPE.d_output, SHAPE.d_input);
        let weight: Vec<f32> = (0..o * i)
            .map(|k| ((k * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let f = init_factors(LoraInit::Pissa, SHAPE, 0, "m", Some(&weight)).unwrap();
        let residual = f.residual_weight.as_ref().unwrap();
        // residual + s·B·A == W (float64 math on the f32 factors).
        for r in 0..o {
            for c in 0..i {
                let ba: f64 = (0..SHAPE.rank)
                    .map(|k| f64::from(f.b[r * SHAPE.rank + k]) * f64::from(f.a[k * i + c]))
                    .sum();
                let rebuilt = f64::from(residual[r * i + c]) + SHAPE.scaling * ba;
                assert!((rebuilt - f64::from(weight[r * i + c])).abs() < 1e-5);
            }
        }
        // The residual's largest singular value is the (r+1)-th of W: the top r were taken.
        let w = DMatrix::from_row_slice(
            o,
            i,
            &weight.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        );
        let mut sv: Vec<f64> = w.singular_values().iter().copied().collect();
        sv.sort_by(|a, b| b.total_cmp(a));
        let res = DMatrix::from_row_slice(
            o,
            i,
            &residual.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        );
        let top_res = res.singular_values().iter().copied().fold(0.0, f64::max);
        assert!(
            (top_res - sv[SHAPE.rank]).abs() < 1e-4,
            "{top_res} vs {}",
            sv[SHAPE.rank]
        );
    }

    #[test]
    fn pissa_errors_name_the_module() {
        let err = init_factors(
            LoraInit::Pissa,
            SHAPE,
            0,
            "model.layers.0.mlp.up_proj",
            None,
        );
        assert_eq!(
            err,
            Err(InitError::PissaNeedsWeight {
                module: "model.layers.0.mlp.up_proj".into()
            })
        );
        let shape = FactorShape { rank: 25, ..SHAPE };
        let weight = vec![0.5f32; 24 * 32];
        let err = init_factors(LoraInit::Pissa, shape, 0, "x", Some(&weight)).unwrap_err();
        assert!(err.to_string().contains("min(out, in) = 24"), "{err}");
    }
}
