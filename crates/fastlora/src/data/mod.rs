//! Training data for `fastlora train`: JSON Lines records rendered, tokenized and masked as
//! TRL's `SFTTrainer` does, then packed or padded into batches.
//!
//! Each line is one record, in one of three shapes recognised from its keys:
//!
//! - `{"text": "..."}`: trained on whole, followed by EOS;
//! - Alpaca, `{"instruction": "...", "input": "..." (optional), "output": "..."}`: rendered with
//!   the Alpaca prompt ([`alpaca_prompt`]); the response is `output` + EOS;
//! - chat, `{"messages": [{"role": "user", "content": "..."}, ...]}`: rendered with the
//!   tokenizer's chat template ([`ChatTemplate`](crate::ChatTemplate)); the responses are the
//!   assistant turns with their end-of-turn tokens.
//!
//! With [`DataConfig::completion_only`] (the default) only responses are learnt: the
//! prompt's labels are [`IGNORE_INDEX`](fastlora_llama::IGNORE_INDEX).
//!
//! ```no_run
//! use fastlora::llama::LlamaTokenizer;
//! use fastlora::{DataConfig, Dataset};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tokenizer = LlamaTokenizer::load("tests/fixtures/tokenizer".as_ref())?;
//! let dataset = Dataset::from_jsonl("train.jsonl", &tokenizer, &DataConfig::new(512))?;
//! println!("{}", dataset.report());
//! for batch in dataset.epoch_batches(8, 3407, 0)? {
//!     println!("{} x {}: {} trained tokens", batch.batch, batch.seq, batch.num_trained_tokens());
//! }
//! # Ok(())
//! # }
//! ```

mod alpaca;
mod batch;
mod encode;
mod error;
mod record;

use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use fastlora_llama::LlamaTokenizer;
use serde_json::Value;

pub use alpaca::alpaca_prompt;
pub use batch::{Batch, Example, collate, epoch_order, pack};
pub use error::{DataError, Location};

use encode::Encoder;
use record::Record;

/// What to do with an example longer than `max_seq_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOverflow {
    /// Keep its first `max_seq_length` tokens, and count it in the report.
    #[default]
    Truncate,
    /// Fail with [`DataError::TooLong`], naming the file and line.
    Error,
}

/// How records become training rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataConfig {
    /// The longest example, in tokens (Unsloth's `max_seq_length`); packed rows are this long.
    pub max_seq_length: usize,
    /// What to do with longer examples.
    pub on_overflow: OnOverflow,
    /// Concatenate examples and cut the stream into rows of `max_seq_length` (TRL's
    /// `packing=True`, "wrapped" strategy): no padding, but examples are split across rows.
    /// Within a row each example attends only to itself, at positions from 0 (as TRL's
    /// padding-free packing does; see [`pack`]).
    pub packing: bool,
    /// Learn only responses (Alpaca `output`, chat assistant turns), as TRL's
    /// `completion_only_loss` / `assistant_only_loss`; `false` trains on every token.
    pub completion_only: bool,
}

impl DataConfig {
    /// Examples of at most `max_seq_length` tokens, truncated beyond, not packed, trained on
    /// responses only.
    pub fn new(max_seq_length: usize) -> Self {
        Self {
            max_seq_length,
            on_overflow: OnOverflow::Truncate,
            packing: false,
            completion_only: true,
        }
    }

    /// The same, with over-long examples handled per `on_overflow`.
    pub fn with_on_overflow(self, on_overflow: OnOverflow) -> Self {
        Self {
            on_overflow,
            ..self
        }
    }

    /// The same, packed or not.
    pub fn with_packing(self, packing: bool) -> Self {
        Self { packing, ..self }
    }

    /// The same, learning responses only or every token.
    pub fn with_completion_only(self, completion_only: bool) -> Self {
        Self {
            completion_only,
            ..self
        }
    }
}

impl Default for DataConfig {
    /// `max_seq_length` 2048, as Unsloth's notebooks.
    fn default() -> Self {
        Self::new(2048)
    }
}

/// What loading a dataset did: the caller prints it (its `Display` is one line), so that
/// truncation and skipped records are never silent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DatasetReport {
    /// The file, or the name given to a string source.
    pub source_name: String,
    /// Records read (blank lines are not records).
    pub records: usize,
    /// Of which `{"text"}` records.
    pub text_records: usize,
    /// Of which Alpaca records.
    pub alpaca_records: usize,
    /// Of which chat records.
    pub chat_records: usize,
    /// Records with nothing in them (blank text, blank instruction and output, no messages).
    pub skipped_empty: usize,
    /// Records left without a token to learn (a conversation without assistant turn, or one
    /// whose responses truncation cut off): in a batch of their own they would make the loss
    /// 0/0.
    pub skipped_untrained: usize,
    /// Examples kept.
    pub examples: usize,
    /// Examples cut to `max_seq_length`.
    pub truncated: usize,
    /// The longest example before truncation, in tokens.
    pub longest: usize,
    /// The limit examples were held to.
    pub max_seq_length: usize,
    /// Whether examples were packed into rows.
    pub packed: bool,
    /// Training rows: `examples`, or the packed rows.
    pub rows: usize,
    /// Tokens in all rows.
    pub tokens: usize,
    /// Tokens the loss learns, over all rows (see [`Example::num_trained_tokens`]).
    pub trained_tokens: usize,
}

impl fmt::Display for DatasetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} records ({} text, {} Alpaca, {} chat) -> {} examples, {} tokens, {} trained",
            self.source_name,
            self.records,
            self.text_records,
            self.alpaca_records,
            self.chat_records,
            self.examples,
            self.tokens,
            self.trained_tokens,
        )?;
        write!(
            f,
            "; {} truncated to max_seq_length {} (longest {})",
            self.truncated, self.max_seq_length, self.longest
        )?;
        if self.skipped_empty + self.skipped_untrained > 0 {
            write!(
                f,
                "; skipped {} empty, {} with nothing to train on",
                self.skipped_empty, self.skipped_untrained
            )?;
        }
        if self.packed {
            write!(f, "; packed into {} rows", self.rows)?;
        }
        Ok(())
    }
}

/// Tokenized training examples (or packed rows) with the report of their loading.
#[derive(Debug)]
pub struct Dataset {
    examples: Vec<Example>,
    report: DatasetReport,
    pad_id: u32,
    /// The order of the epoch [`Dataset::example_at`] last looked into: it is asked position
    /// by position, and recomputing the permutation each time would cost `len` per example.
    epoch_cache: Mutex<Option<EpochOrder>>,
}

/// One epoch's order, for [`Dataset::example_at`].
#[derive(Debug, Clone)]
struct EpochOrder {
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
}

impl Clone for Dataset {
    fn clone(&self) -> Self {
        Self {
            examples: self.examples.clone(),
            report: self.report.clone(),
            pad_id: self.pad_id,
            epoch_cache: Mutex::new(None),
        }
    }
}

impl Dataset {
    /// Loads `path`: JSON Lines (one record per line; blank lines are skipped), or a JSON
    /// array of records (a file whose first character is `[`).
    ///
    /// # Errors
    ///
    /// - [`DataError::Io`] if the file cannot be read;
    /// - everything [`Dataset::from_jsonl_str`] returns, naming the file.
    pub fn from_jsonl(
        path: impl AsRef<Path>,
        tokenizer: &LlamaTokenizer,
        config: &DataConfig,
    ) -> Result<Self, DataError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_jsonl_str(&text, &path.display().to_string(), tokenizer, config)
    }

    /// Loads records from `text` (JSON Lines or a JSON array, as [`Dataset::from_jsonl`]);
    /// `source_name` names it in the report and in errors.
    ///
    /// # Errors
    ///
    /// - [`DataError::InvalidConfig`] if `max_seq_length` is 0;
    /// - [`DataError::Json`] for malformed JSON, with line and column;
    /// - [`DataError::NotRecords`] for a single JSON object spread over several lines;
    /// - [`DataError::Record`] for a bad record, with its line (or array element) and the cause:
    ///   [`DataError::NotAnObject`], [`DataError::UnknownShape`], [`DataError::MissingField`],
    ///   [`DataError::WrongType`], [`DataError::UnknownRole`], [`DataError::NoChatTemplate`],
    ///   [`DataError::Template`], [`DataError::TemplateNotIncremental`],
    ///   [`DataError::NoEosToken`], [`DataError::TooLong`] (with [`OnOverflow::Error`]) or
    ///   [`DataError::Tokenizer`];
    /// - [`DataError::NoExamples`] if no record is left to train on.
    pub fn from_jsonl_str(
        text: &str,
        source_name: &str,
        tokenizer: &LlamaTokenizer,
        config: &DataConfig,
    ) -> Result<Self, DataError> {
        if config.max_seq_length == 0 {
            return Err(DataError::InvalidConfig {
                message: "max_seq_length must be at least 1".into(),
            });
        }
        let records = parse_records(text, source_name)?;
        let encoder = Encoder::new(tokenizer, config.completion_only)?;
        let mut report = DatasetReport {
            source_name: source_name.to_string(),
            max_seq_length: config.max_seq_length,
            packed: config.packing,
            ..DatasetReport::default()
        };
        let mut examples = Vec::new();
        for (location, value) in records {
            let at = |error: DataError| DataError::Record {
                source_name: source_name.to_string(),
                location,
                error: Box::new(error),
            };
            let record = Record::from_json(&value).map_err(at)?;
            report.records += 1;
            match record {
                Record::Text(_) => report.text_records += 1,
                Record::Alpaca { .. } => report.alpaca_records += 1,
                Record::Chat(_) => report.chat_records += 1,
            }
            if record.is_empty() {
                report.skipped_empty += 1;
                continue;
            }
            let mut example = encoder.encode(&record).map_err(at)?;
            if config.packing {
                // Packed examples must end with EOS, so the model sees where one stops; chat
                // templates end turns with their own token, which need not be EOS. Not learnt:
                // the template's end-of-turn is what the model should produce.
                let eos = encoder.eos().map_err(at)?;
                if example.input_ids().last() != Some(&eos) {
                    example.extend(&[eos], false);
                }
            }
            report.longest = report.longest.max(example.len());
            if example.len() > config.max_seq_length {
                match config.on_overflow {
                    OnOverflow::Error => {
                        return Err(at(DataError::TooLong {
                            tokens: example.len(),
                            max_seq_length: config.max_seq_length,
                        }));
                    }
                    OnOverflow::Truncate => {
                        example.truncate(config.max_seq_length);
                        report.truncated += 1;
                    }
                }
            }
            if example.num_trained_tokens() == 0 {
                report.skipped_untrained += 1;
                continue;
            }
            examples.push(example);
        }
        if examples.is_empty() {
            return Err(DataError::NoExamples {
                source_name: source_name.to_string(),
                reason: if report.records == 0 {
                    "it holds no record".to_string()
                } else {
                    format!(
                        "all {} records were skipped ({} empty, {} with nothing to train on)",
                        report.records, report.skipped_empty, report.skipped_untrained
                    )
                },
            });
        }
        report.examples = examples.len();
        if config.packing {
            examples = pack(&examples, config.max_seq_length)?;
        }
        report.rows = examples.len();
        report.tokens = examples.iter().map(Example::len).sum();
        report.trained_tokens = examples.iter().map(Example::num_trained_tokens).sum();
        Ok(Self {
            examples,
            report,
            pad_id: padding_id(tokenizer),
            epoch_cache: Mutex::new(None),
        })
    }

    /// The examples (the packed rows, with packing), in file order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Number of examples (or packed rows).
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is no example (never, for a loaded dataset).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// What loading did: counts, truncation, skipped records.
    pub fn report(&self) -> &DatasetReport {
        &self.report
    }

    /// The id batches are padded with: the tokenizer's pad token, else its EOS (as Unsloth
    /// does for tokenizers without one), else 0. Padding is masked out, so only its being a
    /// valid id matters.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The example at `position` of the training stream: epochs follow one another, each in
    /// its [`epoch_order`]`(len, seed, epoch)`, so position `p` is in epoch `p / len`. A
    /// trainer resumed at step `s` thus sees the examples an uninterrupted run would.
    ///
    /// # Panics
    ///
    /// If the dataset is empty (a loaded one never is).
    pub fn example_at(&self, position: usize, seed: u64) -> usize {
        let len = self.len();
        assert!(len > 0, "example_at on an empty dataset");
        let epoch = (position / len) as u64;
        let mut cache = self
            .epoch_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cached = cache
            .as_ref()
            .is_some_and(|order| order.seed == seed && order.epoch == epoch);
        if !cached {
            *cache = Some(EpochOrder {
                seed,
                epoch,
                order: epoch_order(len, seed, epoch),
            });
        }
        cache
            .as_ref()
            .map_or(position % len, |order| order.order[position % len])
    }

    /// The examples at `indices`, padded with `pad_id` by [`collate`].
    ///
    /// # Panics
    ///
    /// If an index is out of range (indices come from the caller, not from the data).
    pub fn collate(&self, indices: &[usize], pad_id: u32) -> Batch {
        let rows: Vec<&Example> = indices.iter().map(|&i| &self.examples[i]).collect();
        collate(&rows, pad_id)
    }

    /// Number of batches of `batch_size` in an epoch (the last may be smaller).
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.len().div_ceil(batch_size.max(1))
    }

    /// The batches of epoch `epoch`: examples in [`epoch_order`]`(len, seed, epoch)`, `batch_size`
    /// at a time (the last batch holds the rest), each padded by [`collate`].
    ///
    /// # Errors
    ///
    /// [`DataError::InvalidConfig`] if `batch_size` is 0.
    pub fn epoch_batches(
        &self,
        batch_size: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<impl Iterator<Item = Batch> + '_, DataError> {
        if batch_size == 0 {
            return Err(DataError::InvalidConfig {
                message: "batch size must be at least 1".into(),
            });
        }
        let order = epoch_order(self.len(), seed, epoch);
        let batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
        Ok(batches
            .into_iter()
            .map(move |indices| self.collate(&indices, self.pad_id)))
    }
}

/// The id to pad with: pad, else EOS, else 0.
fn padding_id(tokenizer: &LlamaTokenizer) -> u32 {
    tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0)
}

/// The JSON values of `text` with their locations: a JSON array's elements, or the lines of
/// JSON Lines (blank ones skipped).
fn parse_records(text: &str, source_name: &str) -> Result<Vec<(Location, Value)>, DataError> {
    // A UTF-8 byte-order mark, as some editors write, is not JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let json_error = |error: &serde_json::Error, line: usize| DataError::Json {
        source_name: source_name.to_string(),
        line,
        column: error.column(),
        message: serde_message(error),
    };
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> =
            serde_json::from_str(text).map_err(|e| json_error(&e, e.line()))?;
        return Ok(values
            .into_iter()
            .enumerate()
            .map(|(index, value)| (Location::Element(index + 1), value))
            .collect());
    }
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(value) => records.push((Location::Line(index + 1), value)),
            Err(error) => {
                // A pretty-printed single object fails on its first line; say what it is.
                if records.is_empty() && matches!(serde_json::from_str(text), Ok(Value::Object(_)))
                {
                    return Err(DataError::NotRecords {
                        source_name: source_name.to_string(),
                        found: "one JSON object spread over several lines",
                    });
                }
                return Err(json_error(&error, index + 1));
            }
        }
    }
    Ok(records)
}

/// serde_json's message without its " at line L column C" (the location is reported apart).
fn serde_message(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    message
        .strip_suffix(&position)
        .unwrap_or(&message)
        .to_string()
}
