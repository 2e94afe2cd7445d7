//! Training data: the three record shapes, the completion-only mask, chat templates against
//! transformers' renderings, truncation, packing, batching, and every bad input named.

use std::ops::Range;
use std::path::{Path, PathBuf};

use fastlora::llama::{IGNORE_INDEX, LlamaTokenizer};
use fastlora::{
    ChatMessage, ChatTemplate, DataConfig, DataError, Dataset, Example, Location, OnOverflow, Role,
    TINY_DATASET, alpaca_prompt, collate, epoch_order,
};
use fastlora_tests::fixture;
use serde_json::Value;

/// The fixture's EOS (= BOS) token text.
const EOS: &str = "<|endoftext|>";

fn tokenizer() -> LlamaTokenizer {
    LlamaTokenizer::load(&fixture("tokenizer")).unwrap()
}

fn json_fixture(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn load(text: &str, config: &DataConfig) -> Result<Dataset, DataError> {
    Dataset::from_jsonl_str(text, "train.jsonl", &tokenizer(), config)
}

/// A directory holding `name` with `text`, and the file's path.
fn write_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The fixture tokenizer with `edit` applied to its `tokenizer_config.json`.
fn tokenizer_with_config(edit: impl Fn(&mut serde_json::Map<String, Value>)) -> LlamaTokenizer {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let mut config = json_fixture("tokenizer/tokenizer_config.json");
    edit(config.as_object_mut().unwrap());
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    LlamaTokenizer::load(dir.path()).unwrap()
}

/// The maximal runs of trained (label ≠ -100) and untrained tokens, in order.
fn spans(example: &Example) -> Vec<(Range<usize>, bool)> {
    let mut spans: Vec<(Range<usize>, bool)> = Vec::new();
    for (i, &label) in example.labels().iter().enumerate() {
        let trained = label != IGNORE_INDEX;
        match spans.last_mut() {
            Some((range, was)) if *was == trained => range.end = i + 1,
            _ => spans.push((i..i + 1, trained)),
        }
    }
    spans
}

fn decode(ids: &[u32]) -> String {
    tokenizer().decode(ids, false).unwrap()
}

/// Every trained label is its token's id.
fn assert_labels_are_ids_or_ignored(example: &Example) {
    for (&id, &label) in example.input_ids().iter().zip(example.labels()) {
        assert!(
            label == IGNORE_INDEX || label == i64::from(id),
            "label {label} on token {id}"
        );
    }
}

/// The decoded (trained?, text) runs of `example`.
fn decoded_spans(example: &Example) -> Vec<(bool, String)> {
    spans(example)
        .into_iter()
        .map(|(range, trained)| (trained, decode(&example.input_ids()[range])))
        .collect()
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error `{message}` does not mention `{part}`"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Chat templates

fn messages_of(value: &Value) -> Vec<ChatMessage> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            ChatMessage::new(
                m["role"].as_str().unwrap().parse().unwrap(),
                m["content"].as_str().unwrap(),
            )
        })
        .collect()
}

#[test]
fn chat_template_renders_the_tokenizer_fixture_like_transformers() {
    let tokenizer = tokenizer();
    let template = ChatTemplate::from_tokenizer(&tokenizer).unwrap().unwrap();
    let chat = &json_fixture("tokenizer/tokenizer_expected.json")["chat"];
    assert_eq!(
        template
            .render(&messages_of(&chat["messages"]), false)
            .unwrap(),
        chat["rendered"].as_str().unwrap()
    );
    assert_eq!(
        template
            .render(&messages_of(&chat["messages_gen"]), true)
            .unwrap(),
        chat["rendered_add_generation_prompt"].as_str().unwrap()
    );
}

/// Meta-Llama-3-8B-Instruct's template: `bos_token`, `| trim` binding tighter than `+`.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// SmolLM2-Instruct's ChatML template, with its default system prompt.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn arithmetic_conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::user("  What is 2 + 2? "),
        ChatMessage::assistant("4"),
        ChatMessage::user("And 3 + 3?"),
    ]
}

#[test]
fn llama3_template_renders_as_jinja2() {
    // Expected strings from Jinja2 3.1.6 in transformers' environment.
    let template = ChatTemplate::new(
        LLAMA3,
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
    )
    .unwrap();
    let conversation = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd 3 + 3?<|eot_id|>";
    let messages = arithmetic_conversation();
    assert_eq!(template.render(&messages, false).unwrap(), conversation);
    assert_eq!(
        template.render(&messages, true).unwrap(),
        format!("{conversation}<|start_header_id|>assistant<|end_header_id|>\n\n")
    );
}

#[test]
fn smollm2_template_renders_as_jinja2() {
    let template = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>".into())).unwrap();
    let conversation = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n  What is 2 + 2? <|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n";
    let messages = arithmetic_conversation();
    assert_eq!(template.render(&messages, false).unwrap(), conversation);
    assert_eq!(
        template.render(&messages, true).unwrap(),
        format!("{conversation}<|im_start|>assistant\n")
    );
}

#[test]
fn chat_templates_render_as_transformers_jinja2_environment() {
    // tests/fixtures/data/chat_templates.json: Zephyr (trim_blocks), Qwen2.5 (`{%-`), Gemma
    // (raise_exception), and Python string methods, rendered by make_chat_templates.py.
    let fixture = json_fixture("data/chat_templates.json");
    let special = &fixture["special_tokens"];
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 16);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let template = ChatTemplate::new(
            fixture["templates"][name].as_str().unwrap(),
            special["bos_token"].as_str().map(String::from),
            special["eos_token"].as_str().map(String::from),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let generation = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = template.render(&messages_of(&case["messages"]), generation);
        match (&case["rendered"], &case["error"]) {
            (Value::String(expected), _) => assert_eq!(
                rendered.unwrap_or_else(|e| panic!("{name}: {e}")),
                *expected,
                "{name}, add_generation_prompt={generation}"
            ),
            (_, Value::String(expected)) => {
                let error = rendered.unwrap_err();
                assert!(matches!(error, DataError::Template { .. }), "{error:?}");
                assert_mentions(&error.to_string(), &[expected]);
            }
            _ => panic!("case without `rendered` or `error`"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shapes and the completion-only mask

#[test]
fn alpaca_prompts_are_masked_and_responses_trained() {
    let text = r#"{"instruction": "What is the capital of France?", "input": "", "output": "Paris"}
{"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}
{"instruction": "Name a colour.", "output": "Blue, like the sky."}
"#;
    let dataset = load(text, &DataConfig::new(512)).unwrap();
    let expected = [
        ("What is the capital of France?", "", "Paris"),
        ("Add the two numbers.", "2 + 3", "5"),
        ("Name a colour.", "", "Blue, like the sky."),
    ];
    assert_eq!(dataset.len(), 3);
    for (example, (instruction, input, output)) in dataset.examples().iter().zip(expected) {
        assert_labels_are_ids_or_ignored(example);
        // One prompt run then one trained run: the prompt, then the response + EOS.
        assert_eq!(
            decoded_spans(example),
            [
                (false, alpaca_prompt(instruction, input)),
                (true, format!("{output}{EOS}"))
            ]
        );
        assert_eq!(example.input_ids().last(), Some(&0), "ends with EOS");
    }
    assert!(
        decode(dataset.examples()[1].input_ids()).contains("### Input:\n2 + 3\n\n### Response:\n5")
    );
    assert!(!decode(dataset.examples()[0].input_ids()).contains("### Input:"));
}

#[test]
fn chat_trains_on_assistant_turns_with_their_end_tokens() {
    let text = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]}"#;
    let dataset = load(text, &DataConfig::new(512)).unwrap();
    let example = &dataset.examples()[0];
    assert_labels_are_ids_or_ignored(example);
    assert_eq!(
        decoded_spans(example),
        [
            (
                false,
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n".to_string()
            ),
            (true, "Paris.<|im_end|>\n".to_string()),
            (
                false,
                "<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n".to_string()
            ),
            (true, "Rome.<|im_end|>\n".to_string()),
        ]
    );
    // The whole example is the template's rendering.
    let messages = vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("Capital of France?"),
        ChatMessage::assistant("Paris."),
        ChatMessage::user("And Italy?"),
        ChatMessage::assistant("Rome."),
    ];
    let template = ChatTemplate::from_tokenizer(&tokenizer()).unwrap().unwrap();
    assert_eq!(
        decode(example.input_ids()),
        template.render(&messages, false).unwrap()
    );
    assert_eq!(messages[4].role, Role::Assistant);
}

#[test]
fn chat_with_llama3_template_masks_headers_and_trains_eot() {
    let tokenizer = tokenizer_with_config(|config| {
        config.insert("chat_template".into(), LLAMA3.into());
    });
    let text = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#;
    let dataset =
        Dataset::from_jsonl_str(text, "llama3.jsonl", &tokenizer, &DataConfig::new(512)).unwrap();
    let spans = decoded_spans(&dataset.examples()[0]);
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!(
        spans[0],
        (
            false,
            "<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n".to_string()
        )
    );
    assert_eq!(spans[1], (true, "Hello!<|eot_id|>".to_string()));
}

#[test]
fn text_records_train_on_every_token_and_end_with_eos() {
    let dataset = load(r#"{"text": "Hello world!"}"#, &DataConfig::new(512)).unwrap();
    let example = &dataset.examples()[0];
    assert_eq!(
        decoded_spans(example),
        [(true, format!("Hello world!{EOS}"))]
    );
    // The fixture's ids of "Hello world!" (tokenizer_expected.json), then EOS.
    assert_eq!(
        example.input_ids(),
        [43, 72, 79, 79, 82, 298, 82, 85, 79, 71, 4, 0]
    );
    assert_eq!(
        example.num_trained_tokens(),
        11,
        "position 0 predicts nothing"
    );
}

#[test]
fn the_three_shapes_mix_in_one_file_and_are_counted() {
    let text = "{\"text\": \"Plain text.\"}\n\n{\"instruction\": \"Say hi.\", \"output\": \"Hi.\", \"id\": 7}\n\
                {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n";
    let dataset = load(text, &DataConfig::new(512)).unwrap();
    let report = dataset.report();
    assert_eq!(
        (
            report.records,
            report.text_records,
            report.alpaca_records,
            report.chat_records,
            report.examples
        ),
        (3, 1, 1, 1, 3)
    );
    assert_eq!(
        report.tokens,
        dataset.examples().iter().map(Example::len).sum::<usize>()
    );
    assert_eq!(
        report.trained_tokens,
        dataset
            .examples()
            .iter()
            .map(Example::num_trained_tokens)
            .sum::<usize>()
    );
    let line = report.to_string();
    assert_mentions(
        &line,
        &[
            "train.jsonl: 3 records (1 text, 1 Alpaca, 1 chat) -> 3 examples",
            "0 truncated",
        ],
    );
}

#[test]
fn training_on_prompts_too_labels_every_token() {
    let text = r#"{"instruction": "Say hi.", "output": "Hi."}
{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let config = DataConfig::new(512).with_completion_only(false);
    let dataset = load(text, &config).unwrap();
    for example in dataset.examples() {
        let spans = spans(example);
        assert!(spans.len() == 1 && spans[0].1, "{spans:?}");
    }
}

#[test]
fn a_post_processor_free_tokenizer_with_add_bos_token_gets_an_untrained_bos() {
    let tokenizer = tokenizer_with_config(|config| {
        config.insert("add_bos_token".into(), true.into());
    });
    let dataset = Dataset::from_jsonl_str(
        r#"{"text": "Hi"}"#,
        "bos.jsonl",
        &tokenizer,
        &DataConfig::new(64),
    )
    .unwrap();
    let example = &dataset.examples()[0];
    assert_eq!(example.input_ids()[0], 0);
    assert_eq!(example.labels()[0], IGNORE_INDEX);
    assert_eq!(decode(&example.input_ids()[1..]), format!("Hi{EOS}"));
}

#[test]
fn records_without_anything_to_learn_are_skipped_and_counted() {
    let text = r#"{"text": "   "}
{"messages": []}
{"messages": [{"role": "user", "content": "Only a question"}]}
{"text": "kept"}"#;
    let dataset = load(text, &DataConfig::new(512)).unwrap();
    let report = dataset.report();
    assert_eq!(
        (
            report.records,
            report.skipped_empty,
            report.skipped_untrained,
            report.examples
        ),
        (4, 2, 1, 1)
    );
    assert_mentions(
        &report.to_string(),
        &["skipped 2 empty, 1 with nothing to train on"],
    );
}

#[test]
fn json_arrays_are_read_with_element_numbers() {
    let (_dir, path) = write_file(
        "train.json",
        r#"[{"text": "one"}, {"instruction": "two", "output": "2"}]"#,
    );
    let dataset = Dataset::from_jsonl(&path, &tokenizer(), &DataConfig::new(512)).unwrap();
    assert_eq!(dataset.len(), 2);
    let (_dir, path) = write_file("bad.json", r#"[{"text": "one"}, {"text": 2}]"#);
    let error = Dataset::from_jsonl(&path, &tokenizer(), &DataConfig::new(64)).unwrap_err();
    assert!(
        matches!(
            error,
            DataError::Record {
                location: Location::Element(2),
                ..
            }
        ),
        "{error:?}"
    );
    assert_mentions(
        &error.to_string(),
        &[
            &path.display().to_string(),
            "element 2",
            "`text` must be a string",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Length: truncation, packing, batches

fn long_records() -> String {
    [
        r#"{"instruction": "Short?", "output": "Yes."}"#,
        r#"{"instruction": "Tell a long story.", "output": "Once upon a time there was a very long story that went on and on and on."}"#,
        r#"{"text": "Another rather long piece of plain text, to be cut short by the limit: it goes on about the weather, the sea, the hills and the long road home, and then it goes on some more about the same things, because it has to be longer than the limit set for it here."}"#,
    ]
    .join("\n")
}

#[test]
fn over_long_examples_are_truncated_and_counted() {
    let full = load(&long_records(), &DataConfig::new(4096)).unwrap();
    let lengths: Vec<usize> = full.examples().iter().map(Example::len).collect();
    let limit = 140;
    assert!(
        lengths[0] <= limit && lengths[1] > limit && lengths[2] > limit,
        "{lengths:?}"
    );

    let dataset = load(&long_records(), &DataConfig::new(limit)).unwrap();
    let report = dataset.report();
    assert_eq!((report.truncated, report.examples), (2, 3));
    assert_eq!(report.longest, *lengths.iter().max().unwrap());
    for (cut, whole) in dataset.examples().iter().zip(full.examples()) {
        assert_eq!(cut.len(), whole.len().min(limit));
        // Cut from the right: the kept tokens are the first ones.
        assert_eq!(cut.input_ids(), &whole.input_ids()[..cut.len()]);
        assert_eq!(cut.labels(), &whole.labels()[..cut.len()]);
    }
    assert_mentions(&report.to_string(), &["2 truncated to max_seq_length 140"]);
}

#[test]
fn over_long_examples_can_be_errors_naming_file_and_line() {
    let (_dir, path) = write_file("long.jsonl", &long_records());
    let config = DataConfig::new(140).with_on_overflow(OnOverflow::Error);
    let error = Dataset::from_jsonl(&path, &tokenizer(), &config).unwrap_err();
    assert!(
        matches!(
            error.innermost(),
            DataError::TooLong {
                max_seq_length: 140,
                ..
            }
        ),
        "{error:?}"
    );
    assert_mentions(
        &error.to_string(),
        &[
            &path.display().to_string(),
            "line 2",
            "more than max_seq_length 140",
        ],
    );
}

#[test]
fn packing_preserves_the_token_stream_in_full_rows() {
    let records = format!(
        "{}\n{}",
        long_records(),
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#
    );
    let unpacked = load(&records, &DataConfig::new(4096)).unwrap();
    let row = 16;
    let packed = load(&records, &DataConfig::new(4096).with_packing(true)).unwrap();
    // Rows of 4096 hold everything: one row, the examples back to back, the chat one followed
    // by an untrained EOS (its template ends turns with <|im_end|>, not EOS). Each example's
    // first token is no target (nothing of its own document precedes it), and each is its own
    // document.
    assert_eq!(packed.len(), 1);
    let mut stream: Vec<u32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    let mut documents: Vec<u32> = Vec::new();
    let count = unpacked.examples().len();
    for (index, example) in unpacked.examples().iter().enumerate() {
        stream.extend(example.input_ids());
        labels.push(IGNORE_INDEX);
        labels.extend(&example.labels()[1..]);
        // The chat example is last, and its EOS joins it.
        let len = example.len() + usize::from(index + 1 == count);
        documents.extend(std::iter::repeat_n(index as u32, len));
    }
    stream.push(0);
    labels.push(IGNORE_INDEX);
    assert_eq!(packed.examples()[0].input_ids(), stream);
    assert_eq!(packed.examples()[0].labels(), labels);
    assert_eq!(packed.examples()[0].documents(), Some(documents.as_slice()));

    let mut config = DataConfig::new(row).with_packing(true);
    config.on_overflow = OnOverflow::Truncate;
    let cut = load(&records, &config).unwrap();
    let report = cut.report();
    assert!(report.packed && report.rows == cut.len());
    let (last, full_rows) = cut.examples().split_last().unwrap();
    assert!(full_rows.iter().all(|e| e.len() == row));
    assert!(!last.is_empty() && last.len() <= row);
    // Each example was first truncated to the row length, then all were concatenated.
    let truncated = load(&records, &DataConfig::new(row)).unwrap();
    let expected: Vec<u32> = truncated
        .examples()
        .iter()
        .flat_map(|e| {
            let mut ids = e.input_ids().to_vec();
            if ids.last() != Some(&0) && ids.len() < row {
                ids.push(0);
            }
            ids
        })
        .collect();
    let got: Vec<u32> = cut
        .examples()
        .iter()
        .flat_map(|e| e.input_ids().to_vec())
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn collate_right_pads_with_the_pad_token_and_masks_padding() {
    let dataset = load(&long_records(), &DataConfig::new(4096)).unwrap();
    assert_eq!(dataset.pad_id(), 3, "the fixture's <pad>");
    let batch = dataset.collate(&[0, 1], dataset.pad_id());
    let (short, long) = (&dataset.examples()[0], &dataset.examples()[1]);
    assert_eq!((batch.batch, batch.seq), (2, long.len()));
    let row0 = 0..batch.seq;
    let ids: Vec<i64> = short.input_ids().iter().map(|&id| i64::from(id)).collect();
    assert_eq!(&batch.input_ids[row0.clone()][..short.len()], ids);
    assert!(
        batch.input_ids[short.len()..batch.seq]
            .iter()
            .all(|&id| id == 3)
    );
    assert!(
        batch.labels[short.len()..batch.seq]
            .iter()
            .all(|&label| label == IGNORE_INDEX)
    );
    assert_eq!(
        batch.attention_mask[row0].iter().sum::<i64>(),
        short.len() as i64
    );
    assert!(batch.attention_mask[batch.seq..].iter().all(|&m| m == 1));
    assert_eq!(
        batch.num_trained_tokens(),
        short.num_trained_tokens() + long.num_trained_tokens()
    );
    assert_eq!(collate(&[short, long], 3), batch);
}

#[test]
fn epochs_visit_every_example_once_in_a_seeded_order() {
    let dataset = Dataset::from_jsonl_str(
        TINY_DATASET,
        "tiny_dataset.jsonl",
        &tokenizer(),
        &DataConfig::new(256),
    )
    .unwrap();
    let n = dataset.len();
    assert_eq!(dataset.batches_per_epoch(5), n.div_ceil(5));
    let batches: Vec<_> = dataset.epoch_batches(5, 3407, 2).unwrap().collect();
    assert_eq!(batches.len(), n.div_ceil(5));
    assert_eq!(batches.iter().map(|b| b.batch).sum::<usize>(), n);
    // example_at walks the same orders, epoch after epoch.
    let order = epoch_order(n, 3407, 2);
    for (position, &index) in order.iter().enumerate() {
        assert_eq!(dataset.example_at(2 * n + position, 3407), index);
    }
    assert_eq!(dataset.example_at(0, 3407), epoch_order(n, 3407, 0)[0]);
    assert!(dataset.epoch_batches(0, 1, 0).is_err());
}

#[test]
fn the_bundled_dataset_is_small_alpaca_that_fits_the_tiny_model() {
    let dataset = Dataset::from_jsonl_str(
        TINY_DATASET,
        "tiny_dataset.jsonl",
        &tokenizer(),
        &DataConfig::new(256).with_on_overflow(OnOverflow::Error),
    )
    .unwrap();
    let report = dataset.report();
    assert_eq!((report.records, report.alpaca_records), (24, 24));
    assert_eq!((report.truncated, report.skipped_empty), (0, 0));
    println!("{report}");
    for example in dataset.examples() {
        let trained = decoded_spans(example).pop().unwrap();
        assert!(trained.0 && trained.1.ends_with(EOS));
        assert!(trained.1.len() < 25, "short answers: {trained:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input: each case an error naming the file and line, never a panic

/// Loads `text` as the file `train.jsonl` and returns the error.
fn file_error(text: &str) -> (DataError, String) {
    file_error_with(text, &tokenizer(), &DataConfig::new(512))
}

fn file_error_with(
    text: &str,
    tokenizer: &LlamaTokenizer,
    config: &DataConfig,
) -> (DataError, String) {
    let (_dir, path) = write_file("train.jsonl", text);
    let error = Dataset::from_jsonl(&path, tokenizer, config).unwrap_err();
    (error, path.display().to_string())
}

#[test]
fn empty_files_have_no_examples() {
    for text in ["", "\n\n  \n", "{\"text\": \"\"}\n"] {
        let (error, path) = file_error(text);
        assert!(matches!(error, DataError::NoExamples { .. }), "{error:?}");
        assert_mentions(&error.to_string(), &[&path, "no examples"]);
    }
}

#[test]
fn missing_files_are_io_errors() {
    let error = Dataset::from_jsonl(
        Path::new("/nonexistent/train.jsonl"),
        &tokenizer(),
        &DataConfig::new(8),
    )
    .unwrap_err();
    assert!(matches!(error, DataError::Io { .. }));
    assert_mentions(
        &error.to_string(),
        &["/nonexistent/train.jsonl", "cannot read"],
    );
}

#[test]
fn malformed_json_names_line_and_column() {
    let (error, path) = file_error("{\"text\": \"a\"}\n\n{\"text\": \"b\",}\n");
    assert!(
        matches!(
            error,
            DataError::Json {
                line: 3,
                column: 14,
                ..
            }
        ),
        "{error:?}"
    );
    assert_mentions(
        &error.to_string(),
        &[&path, "line 3, column 14: malformed JSON: trailing comma"],
    );
    let (error, _) = file_error("{\n  \"text\": \"pretty-printed\"\n}\n");
    assert!(matches!(error, DataError::NotRecords { .. }), "{error:?}");
    let (error, _) = file_error("[{\"text\": \"a\"},\n {\"text\": }]");
    assert!(
        matches!(error, DataError::Json { line: 2, .. }),
        "{error:?}"
    );
}

#[test]
fn unknown_shapes_list_the_keys_found_and_the_shapes_accepted() {
    let (error, path) =
        file_error("{\"text\": \"ok\"}\n{\"prompt\": \"p\", \"completion\": \"c\"}");
    assert!(matches!(error.innermost(), DataError::UnknownShape { .. }));
    assert_mentions(
        &error.to_string(),
        &[
            &path,
            "line 2",
            "\"prompt\"",
            "\"completion\"",
            "{\"text\"}",
            "\"instruction\"",
            "\"messages\"",
        ],
    );
    let (error, _) = file_error("[1, 2]\n");
    assert!(
        matches!(error, DataError::Json { .. } | DataError::Record { .. }),
        "{error:?}"
    );
    let (error, _) = file_error("\"just a string\"\n");
    assert!(matches!(
        error.innermost(),
        DataError::NotAnObject { found: "a string" }
    ));
}

#[test]
fn missing_and_mistyped_fields_are_named() {
    let cases = [
        (
            r#"{"instruction": "no output"}"#,
            "Alpaca record without `output`",
        ),
        (
            r#"{"output": "no instruction"}"#,
            "Alpaca record without `instruction`",
        ),
        (
            r#"{"instruction": "i", "input": 3, "output": "o"}"#,
            "`input` must be a string, found a number",
        ),
        (
            r#"{"messages": [{"role": "user"}]}"#,
            "chat record without `messages[0].content`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": ["a"]}]}"#,
            "`messages[0].content` must be a string, found an array",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, "b"]}"#,
            "`messages[1]` must be a {\"role\", \"content\"} object",
        ),
        (
            r#"{"messages": {"role": "user"}}"#,
            "`messages` must be an array",
        ),
        (r#"{"text": null}"#, "`text` must be a string, found null"),
    ];
    for (line, expected) in cases {
        let (error, path) = file_error(&format!("{{\"text\": \"fine\"}}\n{line}\n"));
        assert!(
            matches!(
                error.innermost(),
                DataError::MissingField { .. } | DataError::WrongType { .. }
            ),
            "{error:?}"
        );
        assert_mentions(&error.to_string(), &[&path, "line 2", expected]);
    }
}

#[test]
fn unknown_roles_are_named_with_the_accepted_ones() {
    let (error, path) = file_error(
        r#"{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}"#,
    );
    assert!(matches!(error.innermost(), DataError::UnknownRole { role } if role == "human"));
    assert_mentions(
        &error.to_string(),
        &[
            &path,
            "line 1",
            "\"human\"",
            "system, user, assistant, tool",
        ],
    );
}

#[test]
fn chat_data_needs_a_chat_template() {
    let tokenizer = tokenizer_with_config(|config| {
        config.remove("chat_template");
    });
    let text = "{\"text\": \"fine\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}";
    let (error, path) = file_error_with(text, &tokenizer, &DataConfig::new(64));
    assert!(
        matches!(error.innermost(), DataError::NoChatTemplate),
        "{error:?}"
    );
    assert_mentions(&error.to_string(), &[&path, "line 2", "chat template"]);
    // Without chat records, the missing template does not matter.
    let dataset = Dataset::from_jsonl_str(
        "{\"text\": \"fine\"}",
        "t.jsonl",
        &tokenizer,
        &DataConfig::new(64),
    );
    assert!(dataset.is_ok());
}

#[test]
fn template_errors_name_the_line_and_keep_the_templates_message() {
    let gemma_like = "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ message['content'] }}{% endfor %}";
    let tokenizer = tokenizer_with_config(|config| {
        config.insert("chat_template".into(), gemma_like.into());
    });
    let text = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\
                {\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}, {\"role\": \"assistant\", \"content\": \"c\"}]}";
    let (error, path) = file_error_with(text, &tokenizer, &DataConfig::new(64));
    assert!(
        matches!(error.innermost(), DataError::Template { .. }),
        "{error:?}"
    );
    assert_mentions(
        &error.to_string(),
        &[&path, "line 2", "Conversation roles must alternate"],
    );

    let broken = tokenizer_with_config(|config| {
        config.insert("chat_template".into(), "{% for m in messages %}".into());
    });
    let (error, _) = file_error_with(text, &broken, &DataConfig::new(64));
    assert!(
        matches!(error.innermost(), DataError::Template { .. }),
        "{error:?}"
    );
    assert_mentions(&error.to_string(), &["line 1", "chat template"]);
}

#[test]
fn templates_that_do_not_render_incrementally_are_refused_for_masking() {
    // The count of messages up front changes the start of the text as turns are added.
    let counting = "{{ messages | length }}:{% for m in messages %}{{ m['content'] }};{% endfor %}";
    let tokenizer = tokenizer_with_config(|config| {
        config.insert("chat_template".into(), counting.into());
    });
    let text = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let (error, path) = file_error_with(text, &tokenizer, &DataConfig::new(64));
    assert!(
        matches!(
            error.innermost(),
            DataError::TemplateNotIncremental { message_index: 1 }
        ),
        "{error:?}"
    );
    assert_mentions(
        &error.to_string(),
        &[&path, "line 1", "completion_only = false"],
    );
    // Training on the whole text needs no incremental rendering.
    let config = DataConfig::new(64).with_completion_only(false);
    assert!(Dataset::from_jsonl_str(text, "t.jsonl", &tokenizer, &config).is_ok());
}

#[test]
fn a_tokenizer_without_eos_is_refused_for_text_and_alpaca() {
    let tokenizer = tokenizer_with_config(|config| {
        config.remove("eos_token");
    });
    let (error, path) = file_error_with(r#"{"text": "hi"}"#, &tokenizer, &DataConfig::new(64));
    assert!(
        matches!(error.innermost(), DataError::NoEosToken),
        "{error:?}"
    );
    assert_mentions(&error.to_string(), &[&path, "line 1", "eos_token"]);
}

#[test]
fn zero_lengths_are_invalid_settings() {
    let error = load(r#"{"text": "hi"}"#, &DataConfig::new(0)).unwrap_err();
    assert!(
        matches!(error, DataError::InvalidConfig { .. }),
        "{error:?}"
    );
}
