//! The model, LoRA and the loss in f16 on a CubeCL backend (Burn's wgpu; Mesa's lavapipe in CPU
//! CI) against PEFT's f32 references: logits, loss and every LoRA gradient.
//!
//! This guards the half-precision path of the CUDA backend without a GPU. Burn 0.21's CubeCL
//! binary ops read both operands at the left one's dtype, and tensors made from host data or
//! from a bool mask take the device's default float dtype (here f16), so any op of the model,
//! the adapters or the loss that mixes an f32 tensor (the loss, RMSNorm, the f32 LoRA factors)
//! with a default-dtype one reads garbage; the bf16 CUDA runs failed exactly so.
//!
//! The tolerance is f16's: ~1e-3 relative rounding per op through a two-layer model.

mod common;

use burn::backend::Autodiff;
use burn::tensor::DType;
use burn::tensor::f16;
use common::{Reference, assert_close, fixture, input_ids_on, values};
use fastlora::llama::causal_lm_loss;
use fastlora::{FastLanguageModel, PeftModel};
use fused_mlp::{WgpuBackend, vulkan_test_device};

type H = Autodiff<WgpuBackend<f16>>;

/// Relative tolerance (max norm) against the f32 references.
const TOL: f64 = 2e-2;

fn check_adapter_in_f16(base_dir: &str, adapter: &str) {
    let Some(device) = vulkan_test_device() else {
        return;
    };
    let base =
        FastLanguageModel::<H>::from_pretrained(fixture(base_dir).to_str().unwrap(), &device)
            .unwrap_or_else(|e| panic!("loading {base_dir}: {e}"));
    let peft = PeftModel::from_pretrained(base, fixture(adapter)).unwrap();
    let reference = Reference::open(&format!("{adapter}/reference.safetensors"));
    let ids = input_ids_on::<H>(&device);
    let logits = peft.model().forward(ids.clone(), None);
    assert_eq!(
        logits.dtype(),
        DType::F16,
        "the model runs in the device's f16"
    );
    assert_close(
        &format!("{adapter} f16 logits"),
        &values(logits.clone()),
        &reference.f32("logits").0,
        TOL,
    );
    let loss = causal_lm_loss(logits, ids);
    assert_eq!(loss.dtype(), DType::F32, "the loss is computed in f32");
    assert_close(
        &format!("{adapter} f16 loss"),
        &values(loss.clone()),
        &reference.f32("loss").0,
        TOL,
    );
    let grads = loss.backward();
    let mut checked = 0;
    for (key, param) in peft.adapter_parameters() {
        let got = param
            .grad(&grads)
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        if key.contains("lora_") {
            assert_eq!(got.dtype, DType::F32, "{key}: LoRA factors train in f32");
        }
        assert_close(
            &format!("{adapter} f16 grad.{key}"),
            &got.convert::<f32>().to_vec::<f32>().unwrap(),
            &reference.f32(&format!("grad.{key}")).0,
            TOL,
        );
        checked += 1;
    }
    assert!(checked > 0, "{adapter}: no gradient checked");
}

#[test]
fn llama_lora_in_f16_matches_peft() {
    check_adapter_in_f16("llama-tiny", "llama-tiny-lora");
}

#[test]
fn qwen2_lora_with_biases_in_f16_matches_peft() {
    check_adapter_in_f16("qwen2-tiny", "qwen2-tiny-lora");
}
