//! `use_gradient_checkpointing` false / true / "unsloth" on the built-in tiny Llama with LoRA on
//! all seven projections: the same loss and the same LoRA gradients, bit for bit on the CPU.

use std::sync::Mutex;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use fastlora::lora_config::{GradientCheckpointing, InitLoraWeights};
use fastlora::{CpuBackend, FastLanguageModel, LoraConfig, PeftModel, materialize_builtin_model};

type B = CpuBackend;

/// Dropout draws from the process-wide backend RNG: the runs of one test must not interleave
/// with another test's.
static RNG: Mutex<()> = Mutex::new(());

const MODES: [GradientCheckpointing; 3] = [
    GradientCheckpointing::Off,
    GradientCheckpointing::On,
    GradientCheckpointing::Unsloth,
];

fn peft_model(mode: GradientCheckpointing, dropout: f64) -> PeftModel<B> {
    let dir = tempfile::tempdir().unwrap();
    let path = materialize_builtin_model(dir.path()).unwrap();
    let device = Default::default();
    let model = FastLanguageModel::<B>::from_pretrained(path.to_str().unwrap(), &device).unwrap();
    let config = LoraConfig::builder()
        .r(8)
        .lora_alpha(16.0)
        .lora_dropout(dropout)
        .target_modules([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ])
        // Both factors random, so every factor has a non-zero gradient to compare.
        .init_lora_weights(InitLoraWeights::Random)
        .random_state(3407)
        .use_gradient_checkpointing(mode)
        .build()
        .unwrap();
    model.get_peft_model(config).unwrap()
}

/// Mean next-token cross-entropy over the unpadded positions.
fn loss(model: &PeftModel<B>, ids: &Tensor<B, 2, Int>, mask: &Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq] = ids.dims();
    let logits = model.model().forward(ids.clone(), Some(mask.clone()));
    let vocab = logits.dims()[2];
    let logp = log_softmax(logits.slice([0..batch, 0..seq - 1, 0..vocab]), 2);
    let targets = ids.clone().slice([0..batch, 1..seq]).unsqueeze_dim::<3>(2);
    let picked = logp.gather(2, targets).squeeze_dim::<2>(2);
    let keep = mask.clone().slice([0..batch, 1..seq]).float();
    (picked * keep.clone()).sum().neg() / keep.sum()
}

/// Loss bits and every LoRA factor's gradient bits, by PEFT name, for `steps` successive
/// forward/backward passes (no update in between: the second pass checks that the dropout seed
/// stream stays aligned across modes).
fn run(mode: GradientCheckpointing, dropout: f64, steps: usize) -> Vec<(String, Vec<u32>)> {
    let model = peft_model(mode, dropout);
    let device = Default::default();
    let ids = Tensor::<B, 2, Int>::from_ints(
        [
            [5, 17, 42, 99, 7, 250, 3, 3],
            [11, 12, 13, 14, 15, 16, 17, 18],
        ],
        &device,
    );
    let mask = Tensor::<B, 2, Int>::from_ints(
        [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]],
        &device,
    );
    fastlora::checkpointing::seed_layers(7);
    let mut out = Vec::new();
    for step in 0..steps {
        let loss = loss(&model, &ids, &mask);
        out.push((format!("step {step} loss"), bits(loss.to_data())));
        let grads = loss.backward();
        for (name, proj) in model.model().projections() {
            if name == "lm_head" {
                continue;
            }
            let adapter = proj
                .adapter
                .as_ref()
                .expect("all 7 projections are adapted");
            for (factor, param) in [("lora_A", &adapter.lora_a), ("lora_B", &adapter.lora_b)] {
                let grad = param
                    .grad(&grads)
                    .unwrap_or_else(|| panic!("{mode:?}: no gradient for {name}.{factor}"));
                out.push((
                    format!("step {step} {name}.{factor}"),
                    bits(grad.into_data()),
                ));
            }
        }
        assert_frozen_have_no_grad(&model, &grads);
    }
    out
}

fn assert_frozen_have_no_grad(model: &PeftModel<B>, grads: &<B as AutodiffBackend>::Gradients) {
    for (name, proj) in model.model().projections() {
        if let Some(weight) = proj.weight.as_dense() {
            assert!(weight.grad(grads).is_none(), "{name}.weight got a gradient");
        }
    }
}

fn bits(data: TensorData) -> Vec<u32> {
    data.to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_modes_agree(dropout: f64) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let reference = run(GradientCheckpointing::Off, dropout, 2);
    // 2 steps × (loss + 2 layers × 7 projections × 2 factors).
    assert_eq!(reference.len(), 2 * (1 + 2 * 7 * 2));
    assert!(
        reference
            .iter()
            .all(|(_, bits)| bits.iter().any(|&b| b & 0x7fff_ffff != 0)),
        "every gradient is non-zero"
    );
    for mode in &MODES[1..] {
        let got = run(*mode, dropout, 2);
        assert_eq!(got.len(), reference.len());
        for ((name, g), (_, r)) in got.iter().zip(&reference) {
            assert!(
                g == r,
                "{mode:?}: {name} differs from the run without checkpointing"
            );
        }
    }
}

#[test]
fn checkpointing_modes_give_identical_loss_and_lora_gradients() {
    assert_modes_agree(0.0);
}

#[test]
fn checkpointing_modes_agree_with_lora_dropout() {
    assert_modes_agree(0.1);
}

#[test]
fn lora_dropout_is_active_in_the_compared_runs() {
    // Guards the test above: with dropout the loss must differ from the dropout-free one.
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let with = run(GradientCheckpointing::On, 0.1, 1);
    let without = run(GradientCheckpointing::On, 0.0, 1);
    assert_ne!(with[0], without[0]);
}

#[test]
fn patch_report_names_the_mode() {
    let report = peft_model(GradientCheckpointing::Unsloth, 0.0)
        .report
        .to_string();
    assert!(
        report.contains("Gradient checkpointing: unsloth"),
        "{report}"
    );
}
