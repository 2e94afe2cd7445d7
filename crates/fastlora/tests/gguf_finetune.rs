//! A LoRA fine-tune of a real model: SmolLM2-135M-Instruct (from its GGUF file) learns a made-up
//! fact from tests/fixtures/smollm2-lora/made_up_fact.jsonl and answers with it afterwards,
//! while a real fact in the same set stays right.
//! Skipped when `.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf` is absent
//! (`tests/scripts/fetch_smollm2_gguf.sh` fetches it; CI does).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use fastlora::llama::{LlamaForCausalLm, LlamaTokenizer};
use fastlora::train::{TrainConfig, Trainer, run};
use fastlora::{
    ChatMessage, ChatTemplate, CpuBackend, DataConfig, Dataset, FastLanguageModel,
    GenerationConfig, LoraConfig, eos_token_ids, generate,
};

const STEPS: usize = 8;

fn answer(
    model: &LlamaForCausalLm<CpuBackend>,
    tokenizer: &LlamaTokenizer,
    stop: &[u32],
    question: &str,
) -> String {
    let template = ChatTemplate::from_tokenizer(tokenizer).unwrap().unwrap();
    let prompt = template
        .render(&[ChatMessage::user(question)], true)
        .unwrap();
    let ids = tokenizer.encode(&prompt, false).unwrap();
    let config = GenerationConfig::new(16).with_stop_token_ids(stop.to_vec());
    let generated = generate(model, &ids, &config).unwrap();
    tokenizer.decode(&generated, true).unwrap()
}

#[test]
fn smollm2_learns_a_made_up_fact_and_keeps_a_real_one() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join(".cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!(
            "skipping: {} is absent (tests/scripts/fetch_smollm2_gguf.sh fetches it)",
            path.display()
        );
        return;
    }
    let base = FastLanguageModel::<CpuBackend>::from_pretrained(
        path.to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    let tokenizer = base.tokenizer.clone().unwrap();
    let stop = eos_token_ids(&base);
    let question = "What is the capital of the planet Zorblax?";
    let before = answer(&base.model, &tokenizer, &stop, question);
    eprintln!("before: {before:?}");
    assert!(!before.contains("Quintara"), "{before:?}");

    let data = Dataset::from_jsonl(
        root.join("tests/fixtures/smollm2-lora/made_up_fact.jsonl"),
        &tokenizer,
        &DataConfig::new(128),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let lora = LoraConfig::builder().r(8).lora_alpha(16.0).build().unwrap();
    let config = TrainConfig {
        learning_rate: 2e-3,
        warmup_steps: 0,
        max_steps: Some(STEPS),
        batch_size: 4,
        output_dir: out.path().to_path_buf(),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(base.get_peft_model(lora).unwrap(), config.clone());
    let batches = |step: usize| {
        let first = step * config.batch_size;
        let indices: Vec<usize> = (first..first + config.batch_size)
            .map(|i| data.example_at(i, config.seed))
            .collect();
        vec![data.collate(&indices, data.pad_id())]
    };
    run(
        &mut trainer,
        STEPS,
        batches,
        &Arc::new(AtomicBool::new(false)),
        |_, _| {},
    )
    .unwrap();
    let history = &trainer.state.history;
    let (first, last) = (history[0].loss, history.last().unwrap().loss);
    eprintln!("loss {first} → {last}");
    assert!(last < 0.2 * first, "loss {first} → {last}");

    let tuned = trainer.peft.clone().for_inference();
    let after = answer(tuned.model(), &tokenizer, &stop, question);
    eprintln!("after: {after:?}");
    assert!(after.contains("Quintara"), "{after:?}");
    let paraphrase = answer(
        tuned.model(),
        &tokenizer,
        &stop,
        "Do you know the capital of Zorblax?",
    );
    eprintln!("paraphrase: {paraphrase:?}");
    assert!(paraphrase.contains("Quintara"), "{paraphrase:?}");
    let real = answer(
        tuned.model(),
        &tokenizer,
        &stop,
        "What is the capital of France?",
    );
    eprintln!("real: {real:?}");
    assert!(real.contains("Paris"), "{real:?}");
}
