//! `adamw-check`: the fused AdamW step (per tensor and grouped) and squared norm against Burn's on
//! a CUDA GPU, at the LoRA shapes of the SmolLM2-135M and Llama-3.2-1B benchmarks (f32 adapters on
//! the bf16 and the f32 backend, as the trainer keeps them), over several steps with a changing
//! learning rate.
//!
//! Prints one line per cell and exits non-zero if any differs by more than 1e-5 relative
//! (param and moments, per tensor) or produces a non-finite value. Staged by `cargo xtask
//! gpu-test`.

use burn::backend::Autodiff;
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, AdamWState, GradientsParams, Optimizer, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use fused_adamw::{CudaBackend, FusedAdamWConfig, squared_norm};

const TOL: f32 = 1e-5;
const LRS: [f64; 8] = [2e-4, 2e-4, 1e-3, 5e-4, 1e-2, 1e-4, 3e-4, 2e-4];

/// `max|got − want| / max|want|`, or an error naming the tensor.
fn relative<B: Backend>(what: &str, got: Tensor<B, 2>, want: Tensor<B, 2>) -> Result<f32, String> {
    let got = got.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let want = want.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    if let Some(k) = got.iter().position(|g| !g.is_finite()) {
        return Err(format!("{what}[{k}] = {} (want {})", got[k], want[k]));
    }
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    Ok(err / scale)
}

/// Steps of both optimizers on one f32 tensor of `shape` whose first gradient is zero when
/// `zero_first` (a LoRA A factor while B is still zero).
fn steps<B: Backend>(
    shape: [usize; 2],
    zero_first: bool,
    device: &B::Device,
) -> Result<f32, String> {
    let burn = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .build();
    let fused = FusedAdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .build();
    let f32_random = |lo: f64, hi: f64| {
        Tensor::<B, 2>::random(shape, Distribution::Uniform(lo, hi), device).cast(DType::F32)
    };
    let mut p_burn = f32_random(-0.05, 0.05);
    // Clones, not `from_data` copies: `from_data` stores in the backend's default dtype (bf16
    // on the bf16 backend), the adapters are f32.
    let mut p_fused = p_burn.clone();
    let (mut s_burn, mut s_fused): (Option<AdamWState<B, 2>>, Option<AdamWState<B, 2>>) =
        (None, None);
    let mut worst = 0f32;
    // AdamW in f64 on the host: which of the two is off, if they differ.
    let to_host = |t: &Tensor<B, 2>| -> Vec<f64> {
        let values = t.to_data().convert::<f32>().to_vec::<f32>().unwrap();
        values.into_iter().map(f64::from).collect()
    };
    let mut host_p = to_host(&p_burn);
    let (mut host_m, mut host_v) = (vec![0f64; host_p.len()], vec![0f64; host_p.len()]);
    for (step, lr) in LRS.into_iter().enumerate() {
        let scale = [1e-3, 1e-2, 1.0, 1e-4][step % 4];
        let grad = if step == 0 && zero_first {
            Tensor::<B, 2>::zeros(shape, device).cast(DType::F32)
        } else {
            f32_random(-scale, scale)
        };
        let grad_fused = grad.clone();
        let t = (step + 1) as i32;
        for (k, g) in to_host(&grad).into_iter().enumerate() {
            host_m[k] = 0.9 * host_m[k] + 0.1 * g;
            host_v[k] = 0.999 * host_v[k] + 0.001 * g * g;
            let m_hat = host_m[k] / (1.0 - 0.9f64.powi(t));
            let v_hat = host_v[k] / (1.0 - 0.999f64.powi(t));
            host_p[k] = host_p[k] * (1.0 - lr * 0.01) - lr * m_hat / (v_hat.sqrt() + 1e-8);
        }
        (p_burn, s_burn) = SimpleOptimizer::<B>::step(&burn, lr, p_burn, grad, s_burn);
        (p_fused, s_fused) = SimpleOptimizer::<B>::step(&fused, lr, p_fused, grad_fused, s_fused);
        // CubeCL reports a failed launch (a kernel that did not compile, say) at the next sync,
        // not at the launch nor at a read.
        B::sync(device).map_err(|e| format!("step {}: the device reports {e:?}", step + 1))?;
        let (sb, sf) = (
            &s_burn.as_ref().unwrap().momentum,
            &s_fused.as_ref().unwrap().momentum,
        );
        let what = format!("step {}", step + 1);
        let host_error = |t: &Tensor<B, 2>| {
            let scale = host_p.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = to_host(t)
                .iter()
                .zip(&host_p)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            err / scale
        };
        println!(
            "  {shape:?} {what}: vs f64 host AdamW: burn {:.2e}, fused {:.2e}",
            host_error(&p_burn),
            host_error(&p_fused)
        );
        worst = worst
            .max(relative(
                &format!("{what} param"),
                p_fused.clone(),
                p_burn.clone(),
            )?)
            .max(relative(
                &format!("{what} m"),
                sf.moment_1.clone(),
                sb.moment_1.clone(),
            )?)
            .max(relative(
                &format!("{what} v"),
                sf.moment_2.clone(),
                sb.moment_2.clone(),
            )?);
    }
    Ok(worst)
}

/// The squared norm of many gradients (the trainer's clipping) against an f64 sum.
fn norm<B: Backend>(shapes: &[[usize; 2]], device: &B::Device) -> Result<f64, String> {
    let grads: Vec<_> = shapes
        .iter()
        .cycle()
        .take(420)
        .map(|&s| {
            Tensor::<B, 2>::random(s, Distribution::Uniform(-0.1, 0.1), device).cast(DType::F32)
        })
        .collect();
    let want: f64 = grads
        .iter()
        .flat_map(|g| g.to_data().convert::<f32>().to_vec::<f32>().unwrap())
        .map(|x| f64::from(x) * f64::from(x))
        .sum();
    let got = f64::from(squared_norm(grads));
    if !got.is_finite() {
        return Err(format!("squared norm {got} (want {want})"));
    }
    Ok((got - want).abs() / want)
}

/// LoRA factors as a module: the trainer's optimizer steps them all at once.
#[derive(Module, Debug)]
struct Adapters<B: Backend> {
    factors: Vec<Param<Tensor<B, 2>>>,
}

/// `GroupedAdamW` (groups of up to 16 tensors per launch) against Burn's `AdamW` through its
/// optimizer adaptor, on 42 f32 factors cycling through `shapes` (three groups, the last
/// partial), over the steps of [`LRS`]. Returns the worst relative parameter error.
fn grouped<B: Backend>(shapes: &[[usize; 2]], device: &B::Device) -> Result<f32, String> {
    type A<B> = Autodiff<B>;
    let random = |shape: [usize; 2], scale: f64| {
        Tensor::<B, 2>::random(shape, Distribution::Uniform(-scale, scale), device).cast(DType::F32)
    };
    let all: Vec<[usize; 2]> = shapes.iter().copied().cycle().take(42).collect();
    let mut burn_module = Adapters::<A<B>> {
        factors: all
            .iter()
            .map(|&s| Param::from_tensor(Tensor::from_inner(random(s, 0.05)).require_grad()))
            .collect(),
    };
    let mut grouped_module = burn_module.clone();
    let mut burn = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<A<B>, Adapters<A<B>>>();
    let mut grouped = FusedAdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init_grouped::<A<B>, Adapters<A<B>>>();
    let mut worst = 0f32;
    for (step, lr) in LRS.into_iter().enumerate() {
        let scale = [1e-3, 1e-2, 1.0, 1e-4][step % 4];
        let (mut g_burn, mut g_grouped) = (GradientsParams::new(), GradientsParams::new());
        for ((pb, pg), &shape) in burn_module
            .factors
            .iter()
            .zip(&grouped_module.factors)
            .zip(&all)
        {
            let g = random(shape, scale);
            g_grouped.register(pg.id, g.clone());
            g_burn.register(pb.id, g);
        }
        burn_module = burn.step(lr, burn_module, g_burn);
        grouped_module = grouped.step(lr, grouped_module, g_grouped);
        B::sync(device).map_err(|e| format!("step {}: the device reports {e:?}", step + 1))?;
        for (k, (pb, pg)) in burn_module
            .factors
            .iter()
            .zip(&grouped_module.factors)
            .enumerate()
        {
            worst = worst.max(relative(
                &format!("step {} factor {k} {:?}", step + 1, all[k]),
                pg.val().inner(),
                pb.val().inner(),
            )?);
        }
    }
    Ok(worst)
}

fn cells<B: Backend>(backend: &str, failures: &mut usize) {
    let device = Default::default();
    // r = 16 LoRA factors of SmolLM2-135M (hidden 576, kv 192, mlp 1536) and Llama-3.2-1B
    // (2048, kv 512, mlp 8192); A is [r, in], B is [out, r].
    let shapes = [
        [16, 576],
        [576, 16],
        [192, 16],
        [16, 1536],
        [1536, 16],
        [16, 2048],
        [2048, 16],
        [512, 16],
        [16, 8192],
        [8192, 16],
    ];
    for shape in shapes {
        for zero_first in [false, true] {
            match steps::<B>(shape, zero_first, &device) {
                Ok(err) if err <= TOL => println!(
                    "PASS adamw {backend} {shape:?} zero-first {zero_first}: {} steps, worst relative {err:.2e}",
                    LRS.len()
                ),
                Ok(err) => {
                    *failures += 1;
                    println!(
                        "FAIL adamw {backend} {shape:?} zero-first {zero_first}: worst relative {err:.2e}"
                    );
                }
                Err(e) => {
                    *failures += 1;
                    println!("FAIL adamw {backend} {shape:?} zero-first {zero_first}: {e}");
                }
            }
        }
    }
    match grouped::<B>(&shapes, &device) {
        Ok(err) if err <= TOL => println!(
            "PASS grouped-adamw {backend} 42 tensors: {} steps, worst relative {err:.2e}",
            LRS.len()
        ),
        Ok(err) => {
            *failures += 1;
            println!("FAIL grouped-adamw {backend} 42 tensors: worst relative {err:.2e}");
        }
        Err(e) => {
            *failures += 1;
            println!("FAIL grouped-adamw {backend}: {e}");
        }
    }
    match norm::<B>(&shapes, &device) {
        Ok(rel) if rel <= 1e-5 => {
            println!("PASS squared-norm {backend} 420 tensors: relative {rel:.2e}")
        }
        Ok(rel) => {
            *failures += 1;
            println!("FAIL squared-norm {backend} 420 tensors: relative {rel:.2e}");
        }
        Err(e) => {
            *failures += 1;
            println!("FAIL squared-norm {backend}: {e}");
        }
    }
}

fn main() {
    let mut failures = 0;
    cells::<CudaBackend<burn::tensor::bf16>>("bf16-backend", &mut failures);
    cells::<CudaBackend<f32>>("f32-backend", &mut failures);
    println!("adamw-check: {failures} failing cells");
    if failures > 0 {
        std::process::exit(1);
    }
}
