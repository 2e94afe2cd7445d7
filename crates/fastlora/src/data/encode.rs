//! Records to token ids and labels: prompts get [`IGNORE_INDEX`](fastlora_llama::IGNORE_INDEX),
//! responses their ids (TRL's completion-only loss).
//!
//! Prompt and response are tokenized separately and concatenated, as TRL does (it tokenizes the
//! prompt alone and takes its length as the mask boundary): the prompt's tokens are then exactly
//! those the model is given at inference, and the response's those it is taught to produce.

use fastlora_llama::LlamaTokenizer;

use super::alpaca::alpaca_prompt;
use super::batch::Example;
use super::error::DataError;
use super::record::Record;
use crate::chat::{ChatMessage, ChatTemplate, Role};

/// Tokenizes records for one tokenizer.
pub(crate) struct Encoder<'a> {
    tokenizer: &'a LlamaTokenizer,
    /// What `encode(text, add_special_tokens = true)` puts before the text (a BOS, for
    /// tokenizers that add one): text and Alpaca examples start with it, as transformers'
    /// `tokenizer(text)` does. Chat templates write their own BOS.
    special_prefix: Vec<u32>,
    /// The tokenizer's chat template; its absence or syntax error only matters for chat records.
    chat_template: TemplateState,
    completion_only: bool,
}

impl<'a> Encoder<'a> {
    pub(crate) fn new(
        tokenizer: &'a LlamaTokenizer,
        completion_only: bool,
    ) -> Result<Self, DataError> {
        Ok(Self {
            tokenizer,
            special_prefix: special_prefix(tokenizer)?,
            chat_template: TemplateState::of(tokenizer),
            completion_only,
        })
    }

    /// The example of `record`, not yet truncated.
    pub(crate) fn encode(&self, record: &Record) -> Result<Example, DataError> {
        match record {
            Record::Text(text) => {
                let eos = self.eos()?;
                let mut example = self.start();
                example.extend(&self.tokenizer.encode(text, false)?, true);
                example.extend(&[eos], true);
                Ok(example)
            }
            Record::Alpaca {
                instruction,
                input,
                output,
            } => {
                let eos = self.eos()?;
                let mut example = self.start();
                let prompt = alpaca_prompt(instruction, input);
                example.extend(
                    &self.tokenizer.encode(&prompt, false)?,
                    !self.completion_only,
                );
                example.extend(&self.tokenizer.encode(output, false)?, true);
                example.extend(&[eos], true);
                Ok(example)
            }
            Record::Chat(messages) => self.encode_chat(messages),
        }
    }

    /// The EOS id, which examples other than chat end with (chat templates write their own
    /// end-of-turn tokens).
    pub(crate) fn eos(&self) -> Result<u32, DataError> {
        self.tokenizer.eos_id().ok_or(DataError::NoEosToken)
    }

    /// An example holding the special prefix; it predicts nothing worth learning (at position
    /// 0 nothing is predicted; packed mid-row, "BOS follows EOS" is not worth a gradient).
    fn start(&self) -> Example {
        let mut example = Example::default();
        example.extend(&self.special_prefix, false);
        example
    }

    fn template(&self) -> Result<&ChatTemplate, DataError> {
        match &self.chat_template {
            TemplateState::Ready(template) => Ok(template),
            TemplateState::Missing => Err(DataError::NoChatTemplate),
            TemplateState::Invalid(message) => Err(DataError::Template {
                message: message.clone(),
            }),
        }
    }

    /// Renders the conversation and tokenizes it piece by piece: the text each assistant
    /// message adds (its content and end-of-turn tokens) is trained on, the rest is prompt.
    /// The pieces come from rendering incrementally: the conversation before assistant message
    /// `k` with the generation prompt ends where the reply starts, the conversation through `k`
    /// where it ends.
    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Example, DataError> {
        let template = self.template()?;
        let whole = template.render(messages, false)?;
        let mut pieces: Vec<(&str, bool)> = Vec::new();
        if self.completion_only {
            let mut done = 0;
            for (index, message) in messages.iter().enumerate() {
                if message.role != Role::Assistant {
                    continue;
                }
                let before = template.render(&messages[..index], true)?;
                let through = template.render(&messages[..=index], false)?;
                let consistent = before.len() >= done
                    && whole.starts_with(&before)
                    && whole.starts_with(&through)
                    && through.len() >= before.len();
                if !consistent {
                    return Err(DataError::TemplateNotIncremental {
                        message_index: index,
                    });
                }
                pieces.push((&whole[done..before.len()], false));
                pieces.push((&whole[before.len()..through.len()], true));
                done = through.len();
            }
            pieces.push((&whole[done..], false));
        } else {
            pieces.push((&whole, true));
        }
        let mut example = Example::default();
        for (text, trained) in pieces {
            if !text.is_empty() {
                example.extend(&self.tokenizer.encode(text, false)?, trained);
            }
        }
        Ok(example)
    }
}

/// The tokenizer's chat template, compiled.
enum TemplateState {
    Missing,
    /// The syntax error.
    Invalid(String),
    // Boxed: the compiled template is large and this enum small otherwise.
    Ready(Box<ChatTemplate>),
}

impl TemplateState {
    fn of(tokenizer: &LlamaTokenizer) -> Self {
        match ChatTemplate::from_tokenizer(tokenizer) {
            Ok(Some(template)) => TemplateState::Ready(Box::new(template)),
            Ok(None) => TemplateState::Missing,
            Err(DataError::Template { message }) => TemplateState::Invalid(message),
            Err(other) => TemplateState::Invalid(other.to_string()),
        }
    }
}

/// The ids the tokenizer's post-processor puts before a text (found by encoding a probe with
/// and without special tokens), else a BOS if `tokenizer_config.json` has `add_bos_token`.
/// A suffix the post-processor adds (an EOS) is not taken: examples add their own EOS.
fn special_prefix(tokenizer: &LlamaTokenizer) -> Result<Vec<u32>, DataError> {
    const PROBE: &str = "a";
    let plain = tokenizer.encode(PROBE, false)?;
    let special = tokenizer.encode(PROBE, true)?;
    let prefix = (0..=special.len().saturating_sub(plain.len()))
        .find(|&start| special[start..].starts_with(&plain))
        .map(|start| special[..start].to_vec())
        .unwrap_or_default();
    if prefix.is_empty()
        && tokenizer.add_bos_token() == Some(true)
        && let Some(bos) = tokenizer.bos_id()
    {
        return Ok(vec![bos]);
    }
    Ok(prefix)
}
