//! End to end from a GGUF file: SmolLM2-135M-Instruct answers a chat question.
//! Skipped when `.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf` is absent.

use std::path::PathBuf;

use fastlora::{
    ChatMessage, ChatTemplate, FastLanguageModel, GenerationConfig, eos_token_ids, generate,
};

type B = burn::backend::NdArray<f32>;

#[test]
fn smollm2_gguf_knows_the_capital_of_france() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!("skipping: {} is absent", path.display());
        return;
    }
    let model =
        FastLanguageModel::<B>::from_pretrained(path.to_str().unwrap(), &Default::default())
            .unwrap();
    let tokenizer = model.tokenizer.as_ref().unwrap();
    let template = ChatTemplate::from_tokenizer(tokenizer).unwrap().unwrap();
    let prompt = template
        .render(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let ids = tokenizer.encode(&prompt, false).unwrap();
    let config = GenerationConfig::new(24).with_stop_token_ids(eos_token_ids(&model));
    let generated = generate(&model.model, &ids, &config).unwrap();
    let text = tokenizer.decode(&generated, true).unwrap();
    eprintln!("reply: {text:?}");
    assert!(text.contains("Paris"), "{text:?}");
}
