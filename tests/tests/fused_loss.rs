//! The trainer's fused (chunked) linear cross-entropy against the materialised loss: the
//! gradients `step_gradients` returns equal those of full logits + `causal_lm_loss_sum`, for a
//! frozen head, a trained head, a tied trained embedding and an adapted head (the fallback).

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use common::{B, assert_close, fixture};
use fastlora::Batch;
use fastlora::llama::{IGNORE_INDEX, LlamaForCausalLm, causal_lm_loss_sum};
use fastlora::lora_config::InitLoraWeights;
use fastlora::train::step_gradients;
use fastlora::{FastLanguageModel, LoraConfig, PeftModel, materialize_builtin_model};

type Inner = burn::backend::NdArray<f32>;

/// Two micro-batches over a vocabulary of at least `vocab` ids: ignored labels inside rows,
/// a padded row, and a row with no trained label at all.
fn micro_batches(vocab: i64) -> Vec<Batch> {
    let id = |k: i64| (k * 37 + 11) % vocab;
    let first = Batch {
        input_ids: (0..18).map(id).collect(),
        labels: (0..18)
            .map(|k| if k % 5 == 2 { IGNORE_INDEX } else { id(k) })
            .collect(),
        attention_mask: vec![1; 18],
        documents: None,
        batch: 2,
        seq: 9,
    };
    let mut labels: Vec<i64> = (100..109).map(id).collect();
    labels.extend([IGNORE_INDEX; 9]);
    labels[7] = IGNORE_INDEX;
    labels[8] = IGNORE_INDEX;
    let second = Batch {
        input_ids: (100..118).map(id).collect(),
        labels,
        attention_mask: [[1; 9], [1; 9]].concat(),
        documents: None,
        batch: 2,
        seq: 9,
    };
    let padded = Batch {
        input_ids: (200..218).map(id).collect(),
        labels: (200..218)
            .map(|k| if k >= 213 { IGNORE_INDEX } else { id(k) })
            .collect(),
        attention_mask: (0..18).map(|k| i64::from(k < 13)).collect(),
        documents: None,
        batch: 2,
        seq: 9,
    };
    vec![first, second, padded]
}

fn int_tensor(values: &[i64], batch: &Batch) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [batch.batch, batch.seq]),
        &Default::default(),
    )
}

/// What `step_gradients` computed before the fused loss: full logits, the materialised summed
/// loss, each micro-batch's sum divided by the step's trained tokens.
fn materialised_step(
    model: &LlamaForCausalLm<B>,
    micro_batches: &[Batch],
) -> (GradientsParams, f64) {
    let trained: usize = micro_batches.iter().map(Batch::num_trained_tokens).sum();
    let mut accumulator = GradientsAccumulator::<LlamaForCausalLm<B>>::new();
    let mut loss = 0.0;
    for batch in micro_batches {
        let logits = model.forward(
            int_tensor(&batch.input_ids, batch),
            Some(int_tensor(&batch.attention_mask, batch)),
        );
        let (sum, _) = causal_lm_loss_sum(logits, int_tensor(&batch.labels, batch));
        let grads = (sum.clone() / trained as f64).backward();
        loss += f64::from(sum.into_scalar());
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    (accumulator.grads(), loss / trained as f64)
}

/// Compares the two gradient sets parameter by parameter; collects the ids compared.
struct SameGradients<'a> {
    fused: &'a GradientsParams,
    materialised: &'a GradientsParams,
    compared: Vec<burn::module::ParamId>,
}

impl ModuleVisitor<B> for SameGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let fused = self.fused.get::<Inner, D>(param.id);
        let materialised = self.materialised.get::<Inner, D>(param.id);
        match (fused, materialised) {
            (Some(fused), Some(materialised)) => {
                assert_close(
                    &format!("gradient of {:?} {:?}", param.id, param.dims()),
                    &common::values(fused),
                    &common::values(materialised),
                    1e-5,
                );
                self.compared.push(param.id);
            }
            (None, None) => {}
            (fused, _) => panic!(
                "{:?} {:?}: a gradient only from the {} loss",
                param.id,
                param.dims(),
                if fused.is_some() {
                    "fused"
                } else {
                    "materialised"
                }
            ),
        }
    }
}

/// Asserts `step_gradients` (fused loss) equals the materialised step; returns the ids of the
/// parameters that received a gradient.
fn assert_fused_step_matches(peft: &PeftModel<B>) -> Vec<burn::module::ParamId> {
    let model = peft.model();
    let vocab = model.embed_tokens.weight.dims()[0] as i64;
    let batches = micro_batches(vocab);
    let fused = step_gradients(model, &batches);
    let (materialised, loss) = materialised_step(model, &batches);
    assert!(
        (fused.loss - loss).abs() <= 1e-6 * loss,
        "loss {} vs {loss}",
        fused.loss
    );
    let mut same = SameGradients {
        fused: &fused.grads,
        materialised: &materialised,
        compared: Vec::new(),
    };
    model.visit(&mut same);
    same.compared
}

fn builtin() -> (tempfile::TempDir, FastLanguageModel<B>) {
    let dir = tempfile::tempdir().unwrap();
    let path = materialize_builtin_model(&dir.path().join("tiny")).unwrap();
    let model =
        FastLanguageModel::from_pretrained(path.to_str().unwrap(), &Default::default()).unwrap();
    (dir, model)
}

fn lora() -> LoraConfig {
    LoraConfig {
        // Non-zero B, so that every adapter factor gets a non-zero gradient.
        init_lora_weights: InitLoraWeights::Random,
        ..LoraConfig::default()
    }
}

#[test]
fn frozen_head_gradients_equal_the_materialised_loss() {
    let (_dir, base) = builtin();
    let peft = base.get_peft_model(lora()).unwrap();
    let compared = assert_fused_step_matches(&peft);
    // 2 layers × 7 projections × (A, B).
    assert_eq!(compared.len(), 28);
}

#[test]
fn trained_head_gradients_equal_the_materialised_loss() {
    let (_dir, base) = builtin();
    let config = LoraConfig {
        modules_to_save: Some(vec!["lm_head".to_string()]),
        ..lora()
    };
    let peft = base.get_peft_model(config).unwrap();
    let head = peft.model().lm_head.as_ref().unwrap();
    let head_id = head.weight.as_dense().unwrap().id;
    let compared = assert_fused_step_matches(&peft);
    assert!(compared.contains(&head_id), "lm_head got no gradient");
    assert_eq!(compared.len(), 29);
}

#[test]
fn tied_trained_embedding_gradients_equal_the_materialised_loss() {
    // Qwen2's tiny fixture ties lm_head to embed_tokens; ensure_weight_tying keeps one matrix,
    // which then gets the gradient of both the lookup and the head.
    let base = FastLanguageModel::<B>::from_pretrained(
        fixture("qwen2-tiny").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    let config = LoraConfig {
        modules_to_save: Some(vec!["embed_tokens".to_string()]),
        ensure_weight_tying: true,
        ..lora()
    };
    let peft = base.get_peft_model(config).unwrap();
    assert!(peft.model().lm_head.is_none(), "the head should stay tied");
    let embed_id = peft.model().embed_tokens.weight.id;
    let compared = assert_fused_step_matches(&peft);
    assert!(compared.contains(&embed_id), "embed_tokens got no gradient");
}

#[test]
fn adapted_head_falls_back_and_equals_the_materialised_loss() {
    let (_dir, base) = builtin();
    let config = LoraConfig {
        target_modules: Some(fastlora::lora_config::TargetModules::names([
            "q_proj", "v_proj", "lm_head",
        ])),
        ..lora()
    };
    let peft = base.get_peft_model(config).unwrap();
    let adapter = peft.model().lm_head.as_ref().unwrap().adapter.as_ref();
    let head_a = adapter.expect("lm_head is adapted").lora_a.id;
    let compared = assert_fused_step_matches(&peft);
    assert!(
        compared.contains(&head_a),
        "the lm_head adapter got no gradient"
    );
    assert_eq!(compared.len(), 2 * 2 * 2 + 2);
}
