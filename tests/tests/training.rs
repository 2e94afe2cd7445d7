//! Training: memorisation, exact resume, gradient accumulation, prompt masking, NaN handling.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::module::Param;
use burn::prelude::*;
use common::{B, assert_close};
use fastlora::lora_config::InitLoraWeights;
use fastlora::train::{TrainConfig, Trainer, latest_checkpoint, run, step_gradients};
use fastlora::{DataConfig, Dataset};
use fastlora::{
    FastLanguageModel, GenerationConfig, LoraConfig, PeftModel, generate, materialize_builtin_model,
};

const FACTS: &str = r#"{"instruction": "What is the capital of France?", "input": "", "output": "Paris"}
{"instruction": "What is the capital of Japan?", "input": "", "output": "Tokyo"}
{"instruction": "What color is the sky?", "input": "", "output": "Blue"}
{"instruction": "What is two plus two?", "input": "", "output": "Four"}
"#;

struct Setup {
    _dir: tempfile::TempDir,
    model_dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = materialize_builtin_model(&dir.path().join("tiny")).unwrap();
    Setup {
        _dir: dir,
        model_dir,
    }
}

fn base(setup: &Setup) -> FastLanguageModel<B> {
    FastLanguageModel::from_pretrained(setup.model_dir.to_str().unwrap(), &Default::default())
        .unwrap()
}

fn dataset(model: &FastLanguageModel<B>, completion_only: bool) -> Dataset {
    let config = DataConfig {
        completion_only,
        ..DataConfig::new(256)
    };
    Dataset::from_jsonl_str(
        FACTS,
        "facts.jsonl",
        model.tokenizer.as_ref().unwrap(),
        &config,
    )
    .unwrap()
}

fn train_config(out: &std::path::Path, max_steps: usize) -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-2,
        warmup_steps: 2,
        max_steps: Some(max_steps),
        batch_size: 4,
        grad_accum: 1,
        output_dir: out.to_path_buf(),
        ..TrainConfig::default()
    }
}

fn train(trainer: &mut Trainer<B>, data: &Dataset, total: usize) {
    let config = trainer.config.clone();
    let batches = |step: usize| {
        let first = step * config.batch_size;
        let indices: Vec<usize> = (first..first + config.batch_size)
            .map(|i| data.example_at(i, config.seed))
            .collect();
        vec![data.collate(&indices, data.pad_id())]
    };
    run(
        trainer,
        total,
        batches,
        &Arc::new(AtomicBool::new(false)),
        |_, _| {},
    )
    .unwrap();
}

#[test]
fn memorises_a_small_set_and_generates_the_answer() {
    let setup = setup();
    let model = base(&setup);
    let data = dataset(&model, true);
    let out = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(
        model.get_peft_model(LoraConfig::default()).unwrap(),
        train_config(out.path(), 100),
    );
    train(&mut trainer, &data, 100);
    let history = &trainer.state.history;
    let (first, last) = (history[0].loss, history.last().unwrap().loss);
    assert!(
        last < 0.1 * first,
        "loss {first} → {last} did not fall by 90 %"
    );

    let peft = trainer.peft.clone().for_inference();
    let tokenizer = peft.tokenizer().unwrap();
    let prompt = fastlora::alpaca_prompt("What is the capital of France?", "");
    let ids = tokenizer.encode(&prompt, false).unwrap();
    let config = GenerationConfig::new(8);
    let answer = tokenizer
        .decode(&generate(peft.model(), &ids, &config).unwrap(), true)
        .unwrap();
    assert!(answer.contains("Paris"), "generated {answer:?}");
}

#[test]
fn resume_reproduces_the_uninterrupted_run_exactly() {
    let setup = setup();
    let (full_dir, split_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let lora = LoraConfig {
        init_lora_weights: InitLoraWeights::Random,
        ..LoraConfig::default()
    };

    let model = base(&setup);
    let data = dataset(&model, true);
    let mut full = Trainer::new(
        model.get_peft_model(lora.clone()).unwrap(),
        train_config(full_dir.path(), 6),
    );
    train(&mut full, &data, 6);

    let mut first = Trainer::new(
        base(&setup).get_peft_model(lora).unwrap(),
        train_config(split_dir.path(), 6),
    );
    train(&mut first, &data, 3);
    first.save_checkpoint().unwrap();
    let checkpoint = latest_checkpoint(split_dir.path()).unwrap();
    assert!(checkpoint.ends_with("checkpoint-3"));
    let peft = PeftModel::from_pretrained(base(&setup), &checkpoint).unwrap();
    let mut resumed =
        Trainer::resume(peft, train_config(split_dir.path(), 6), &checkpoint).unwrap();
    train(&mut resumed, &data, 6);

    let losses = |t: &Trainer<B>| t.state.history.iter().map(|r| r.loss).collect::<Vec<_>>();
    assert_eq!(losses(&full), losses(&resumed));
    let adapter = |dir: &std::path::Path| {
        std::fs::read(dir.join("checkpoint-6/adapter_model.safetensors")).unwrap()
    };
    assert!(
        adapter(full_dir.path()) == adapter(split_dir.path()),
        "adapter bytes differ"
    );
}

#[test]
fn gradient_accumulation_equals_one_larger_batch() {
    let setup = setup();
    let model = base(&setup);
    let data = dataset(&model, true);
    let lora = LoraConfig {
        init_lora_weights: InitLoraWeights::Random,
        ..LoraConfig::default()
    };
    let peft = model.get_peft_model(lora).unwrap();
    let pad = data.pad_id();
    let whole = step_gradients(peft.model(), &[data.collate(&[0, 1, 2, 3], pad)]);
    let parts = step_gradients(
        peft.model(),
        &[data.collate(&[0, 1], pad), data.collate(&[2, 3], pad)],
    );
    assert!((whole.loss - parts.loss).abs() < 1e-5 * whole.loss);
    let mut checked = 0;
    for (_, proj) in peft.model().projections() {
        let Some(adapter) = &proj.adapter else {
            continue;
        };
        for param in [&adapter.lora_a, &adapter.lora_b] {
            let grad = |g: &burn::optim::GradientsParams| -> Vec<f32> {
                common::values(g.get::<burn::backend::NdArray<f32>, 2>(param.id).unwrap())
            };
            assert_close(
                "accumulated gradient",
                &grad(&parts.grads),
                &grad(&whole.grads),
                1e-5,
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 14);
}

#[test]
fn prompt_tokens_carry_no_loss() {
    let setup = setup();
    let model = base(&setup);
    let data = dataset(&model, true);
    let batch = data.collate(&[0], data.pad_id());
    let device = Default::default();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(batch.input_ids.clone(), [1, batch.seq]),
        &device,
    );
    let labels = Tensor::<B, 2, Int>::from_data(
        TensorData::new(batch.labels.clone(), [1, batch.seq]),
        &device,
    );
    // The loss's gradient w.r.t. the logits: rows predicting prompt tokens must be exactly 0.
    let logits = model.model.forward(ids, None).detach().require_grad();
    let loss = fastlora::llama::causal_lm_loss(logits.clone(), labels);
    let grads = loss.backward();
    let grad = common::values(logits.grad(&grads).unwrap());
    let vocab = model.config.vocab_size;
    let mut trained_rows = 0;
    for t in 0..batch.seq - 1 {
        let row = &grad[t * vocab..(t + 1) * vocab];
        let trained = batch.labels[t + 1] != fastlora::llama::IGNORE_INDEX;
        assert_eq!(row.iter().any(|&g| g != 0.0), trained, "position {t}");
        trained_rows += usize::from(trained);
    }
    assert_eq!(trained_rows, batch.num_trained_tokens());
    assert!(
        trained_rows > 0 && trained_rows < batch.seq / 2,
        "only the short answer trains"
    );
}

#[test]
fn nan_loss_stops_without_touching_the_model() {
    let setup = setup();
    let model = base(&setup);
    let data = dataset(&model, true);
    let out = tempfile::tempdir().unwrap();
    let mut peft = model.get_peft_model(LoraConfig::default()).unwrap();
    let adapter = peft.base.model.layers[0]
        .self_attn
        .q_proj
        .adapter
        .as_mut()
        .unwrap();
    let poisoned = adapter.lora_a.val().mul_scalar(f32::NAN);
    adapter.lora_a = Param::initialized(adapter.lora_a.id, poisoned);
    let mut trainer = Trainer::new(peft, train_config(out.path(), 3));
    let before = trainer.peft.adapter_tensors();
    let err = trainer
        .step(&[data.collate(&[0, 1], data.pad_id())], 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN") && err.contains("step 1"), "{err}");
    assert_eq!(trainer.state.step, 0);
    for ((k, a), (_, b)) in before.iter().zip(trainer.peft.adapter_tensors()) {
        let same = a
            .iter::<f32>()
            .zip(b.iter::<f32>())
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{k} changed");
    }
}
