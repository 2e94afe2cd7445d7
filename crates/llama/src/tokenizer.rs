//! The model's tokenizer: `tokenizer.json` plus the special tokens and chat template of
//! `tokenizer_config.json` (or `chat_template.jinja`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::write_atomically;
use crate::error::ModelError;
use crate::json::{self, Fields};

const TOKENIZER_FILE: &str = "tokenizer.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// transformers ≥ 4.43 saves the chat template here, and prefers it to `tokenizer_config.json`'s.
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The pre-tokenizer regex of Llama 3 (`tokenizer.ggml.pre = "llama-bpe"`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A special token and its id in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpecialToken {
    content: String,
    id: u32,
}

/// A Hugging Face fast tokenizer with the settings transformers reads next to it.
#[derive(Debug, Clone)]
pub struct LlamaTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// `tokenizer.json`, named in encode/decode errors.
    path: PathBuf,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    chat_template: Option<String>,
    add_bos_token: Option<bool>,
}

impl LlamaTokenizer {
    /// Loads `tokenizer.json` from model directory `dir`, with `tokenizer_config.json` and
    /// `chat_template.jinja` when present (without the config, no special tokens are known).
    ///
    /// # Errors
    ///
    /// - [`ModelError::Io`] if `tokenizer.json` (or a present config) cannot be read;
    /// - [`ModelError::Tokenizer`] if `tokenizer.json` is not a valid tokenizer, or a special
    ///   token of the config is not in its vocabulary;
    /// - [`ModelError::Json`] / [`ModelError::ConfigField`] if `tokenizer_config.json` is
    ///   malformed.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(TOKENIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io("read", &path, e))?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| ModelError::Tokenizer {
                path: path.clone(),
                message: format!("not a valid Hugging Face tokenizer: {e}"),
            })?;
        let mut loaded = Self {
            tokenizer,
            path,
            bos: None,
            eos: None,
            pad: None,
            chat_template: None,
            add_bos_token: None,
        };

        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        if config_path.is_file() {
            let config = json::read_object(&config_path)?;
            let fields = Fields::new(&config_path, &config);
            loaded.bos = loaded.special_token(&fields, "bos_token")?;
            loaded.eos = loaded.special_token(&fields, "eos_token")?;
            loaded.pad = loaded.special_token(&fields, "pad_token")?;
            loaded.add_bos_token = fields.optional_bool("add_bos_token")?;
            loaded.chat_template = chat_template(&fields)?;
        }
        let template_path = dir.join(CHAT_TEMPLATE_FILE);
        if template_path.is_file() {
            let template = std::fs::read_to_string(&template_path)
                .map_err(|e| ModelError::io("read", &template_path, e))?;
            loaded.chat_template = Some(template);
        }
        Ok(loaded)
    }

    /// Builds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata: a byte-level
    /// BPE (`tokenizer.ggml.model = "gpt2"`) from `tokens` (id = index) and `merges`, with the
    /// pre-tokenizer named by `tokenizer.ggml.pre` (`default`/`gpt-2`, `smollm`, `llama-bpe`),
    /// CONTROL tokens (`token_type` 3) as special added tokens and USER_DEFINED ones (4) as
    /// added tokens; BOS/EOS/padding from the `*_token_id` keys, the chat template from
    /// `tokenizer.chat_template`, and a BOS prepended by [`LlamaTokenizer::encode`] only when
    /// `tokenizer.ggml.add_bos_token` is true.
    ///
    /// # Errors
    ///
    /// - [`ModelError::Unsupported`] for another tokenizer model (e.g. SentencePiece `llama`)
    ///   or pre-tokenizer;
    /// - [`ModelError::Tokenizer`] (naming the GGUF file) for missing or malformed tokenizer
    ///   metadata, or a special token id outside the vocabulary.
    pub fn from_gguf(file: &fastlora_gguf::GgufFile) -> Result<Self, ModelError> {
        let path = file.path().to_path_buf();
        let fail = |message: String| ModelError::Tokenizer {
            path: path.clone(),
            message,
        };
        let model = file
            .get_str("tokenizer.ggml.model")
            .map_err(|e| fail(e.kind().to_string()))?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported {
                path: path.clone(),
                what: format!(
                    "GGUF tokenizer model `{model}` (only byte-level BPE, `gpt2`, is implemented)"
                ),
            });
        }
        let pre = match file.get("tokenizer.ggml.pre") {
            Some(_) => file
                .get_str("tokenizer.ggml.pre")
                .map_err(|e| fail(e.kind().to_string()))?,
            None => "default",
        };
        let byte_level = |use_regex: bool| {
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                               "trim_offsets": true, "use_regex": use_regex})
        };
        let pre_tokenizer = match pre {
            "default" | "gpt-2" | "gpt2" => byte_level(true),
            "smollm" => serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            "llama-bpe" | "llama3" => serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN},
                 "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            other => {
                return Err(ModelError::Unsupported {
                    path: path.clone(),
                    what: format!(
                        "GGUF pre-tokenizer `{other}` (tokenizer.ggml.pre; implemented: default, \
                         gpt-2, smollm, llama-bpe)"
                    ),
                });
            }
        };
        let tokens = file
            .get_str_array("tokenizer.ggml.tokens")
            .map_err(|e| fail(e.kind().to_string()))?;
        let merges = file
            .get_str_array("tokenizer.ggml.merges")
            .map_err(|e| fail(e.kind().to_string()))?;
        let types: Vec<i32> = match file.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => file
                .get_i32_array("tokenizer.ggml.token_type")
                .map(<[i32]>::to_vec)
                .or_else(|_| {
                    file.get_u32_array("tokenizer.ggml.token_type")
                        .map(|t| t.iter().map(|&x| x as i32).collect())
                })
                .map_err(|e| fail(e.kind().to_string()))?,
        };
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), Value::from(id)))
            .collect();
        let added: Vec<Value> = types
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t == 3 || t == 4)
            .filter_map(|(id, &t)| {
                tokens.get(id).map(|content| {
                    serde_json::json!({"id": id, "content": content, "single_word": false,
                        "lstrip": false, "rstrip": false, "normalized": false,
                        "special": t == 3})
                })
            })
            .collect();
        let token_id = |key: &str| -> Result<Option<u32>, ModelError> {
            match file.get(key) {
                None => Ok(None),
                Some(_) => file
                    .get_u32(key)
                    .map(Some)
                    .map_err(|e| fail(e.kind().to_string())),
            }
        };
        let special = |key: &str| -> Result<Option<SpecialToken>, ModelError> {
            let Some(id) = token_id(key)? else {
                return Ok(None);
            };
            let content = tokens.get(id as usize).ok_or_else(|| {
                fail(format!(
                    "{key} = {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ))
            })?;
            Ok(Some(SpecialToken {
                content: content.clone(),
                id,
            }))
        };
        let bos = special("tokenizer.ggml.bos_token_id")?;
        let add_bos_token = match file.get("tokenizer.ggml.add_bos_token") {
            None => None,
            Some(_) => Some(
                file.get_bool("tokenizer.ggml.add_bos_token")
                    .map_err(|e| fail(e.kind().to_string()))?,
            ),
        };
        let post_processor = match (&bos, add_bos_token) {
            (Some(bos), Some(true)) => serde_json::json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos.content, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos.content, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos.content, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.content.clone(): {"id": bos.content, "ids": [bos.id],
                                                         "tokens": [bos.content]}}}),
            _ => serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                                    "trim_offsets": false, "use_regex": true}),
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| {
                fail(format!(
                    "cannot build the tokenizer from GGUF metadata: {e}"
                ))
            })?;
        let chat_template = match file.get("tokenizer.chat_template") {
            None => None,
            Some(_) => Some(
                file.get_str("tokenizer.chat_template")
                    .map_err(|e| fail(e.kind().to_string()))?
                    .to_string(),
            ),
        };
        Ok(Self {
            tokenizer,
            bos,
            eos: special("tokenizer.ggml.eos_token_id")?,
            pad: special("tokenizer.ggml.padding_token_id")?,
            chat_template,
            add_bos_token,
            path,
        })
    }

    /// Reads special token `key` of `tokenizer_config.json`: a string, or an `AddedToken`
    /// object whose `content` is the string.
    fn special_token(
        &self,
        fields: &Fields<'_>,
        key: &str,
    ) -> Result<Option<SpecialToken>, ModelError> {
        let content = match fields.get(key) {
            None => return Ok(None),
            Some(Value::String(content)) => content.as_str(),
            Some(Value::Object(_)) => match fields.optional_object(key)? {
                Some(token) => token.required_str("content")?,
                None => return Ok(None),
            },
            Some(other) => {
                return Err(fields.error(
                    key,
                    format!(
                        "must be a string or an object with `content`, found {}",
                        json::kind(other)
                    ),
                ));
            }
        };
        let id = self
            .tokenizer
            .token_to_id(content)
            .ok_or_else(|| ModelError::Tokenizer {
                path: fields.path().to_path_buf(),
                message: format!(
                    "{key} \"{content}\" is not in the vocabulary of {}",
                    self.path.display()
                ),
            })?;
        Ok(Some(SpecialToken {
            content: content.to_string(),
            id,
        }))
    }

    /// The ids of `text`; `add_special_tokens` applies the post-processor of `tokenizer.json`
    /// (e.g. a BOS), as `tokenizer(text)` does in transformers.
    ///
    /// # Errors
    ///
    /// [`ModelError::Tokenizer`] if the tokenizer fails on the text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, without special tokens if `skip_special_tokens`.
    ///
    /// # Errors
    ///
    /// [`ModelError::Tokenizer`] if the tokenizer's decoder fails.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("cannot decode ids: {e}")))
    }

    fn error(&self, message: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            message,
        }
    }

    /// The beginning-of-sequence token's id, if `tokenizer_config.json` names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|token| token.id)
    }

    /// The end-of-sequence token's id, if `tokenizer_config.json` names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|token| token.id)
    }

    /// The padding token's id, if `tokenizer_config.json` names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|token| token.id)
    }

    /// The beginning-of-sequence token's text (chat templates use it as `bos_token`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|token| token.content.as_str())
    }

    /// The end-of-sequence token's text (chat templates use it as `eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|token| token.content.as_str())
    }

    /// The padding token's text.
    pub fn pad_token(&self) -> Option<&str> {
        self.pad.as_ref().map(|token| token.content.as_str())
    }

    /// The Jinja chat template: `chat_template.jinja` if present, else `tokenizer_config.json`'s
    /// `chat_template` (from a list of named templates, the one named `default`).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// `add_bos_token` of `tokenizer_config.json`, for information: [`LlamaTokenizer::encode`]
    /// follows the post-processor of `tokenizer.json`, which transformers saves consistent
    /// with this flag.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.add_bos_token
    }

    /// The number of tokens including added ones, as `len(tokenizer)` in transformers.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` (special tokens, `add_bos_token`,
    /// the chat template) into `dir`, each atomically, so that transformers'
    /// `AutoTokenizer.from_pretrained(dir)` and [`LlamaTokenizer::load`] rebuild this tokenizer
    /// — the way a GGUF tokenizer becomes an HF folder.
    ///
    /// # Errors
    ///
    /// [`ModelError::Io`] naming the file that could not be written, or
    /// [`ModelError::Tokenizer`] if the tokenizer cannot be serialised.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let text = self
            .tokenizer
            .to_string(true)
            .map_err(|e| self.error(format!("cannot serialise the tokenizer: {e}")))?;
        write_text(&dir.join(TOKENIZER_FILE), &text)?;
        let mut config = serde_json::Map::new();
        // transformers picks the tokenizer class from here; the fast tokenizer is all there is.
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        for (key, token) in [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("pad_token", &self.pad),
        ] {
            if let Some(token) = token {
                config.insert(key.into(), token.content.clone().into());
            }
        }
        if let Some(add_bos) = self.add_bos_token {
            config.insert("add_bos_token".into(), add_bos.into());
        }
        if let Some(template) = &self.chat_template {
            config.insert("chat_template".into(), template.clone().into());
        }
        let text = serde_json::to_string_pretty(&Value::Object(config))
            .expect("a JSON map always serialises");
        write_text(&dir.join(TOKENIZER_CONFIG_FILE), &text)
    }
}

/// `chat_template` of `tokenizer_config.json`: a string, or a list of `{name, template}`
/// from which transformers uses the one named `default`.
fn chat_template(fields: &Fields<'_>) -> Result<Option<String>, ModelError> {
    const KEY: &str = "chat_template";
    match fields.get(KEY) {
        None => Ok(None),
        Some(Value::String(template)) => Ok(Some(template.clone())),
        Some(Value::Array(named)) => {
            let default = named
                .iter()
                .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"));
            match default.map(|entry| entry.get("template")) {
                None => Ok(None),
                Some(Some(Value::String(template))) => Ok(Some(template.clone())),
                Some(_) => Err(fields.error(
                    KEY,
                    "has an entry named \"default\" without a string `template`",
                )),
            }
        }
        Some(other) => Err(fields.error(
            KEY,
            format!(
                "must be a string or a list of {{name, template}} objects, found {}",
                json::kind(other)
            ),
        )),
    }
}

/// Writes `text` to `path` atomically.
fn write_text(path: &Path, text: &str) -> Result<(), ModelError> {
    write_atomically(path, |temp| {
        std::fs::write(temp, text).map_err(|e| ModelError::io("write", temp, e))
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::json;

    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn fixture_tokenizer() -> LlamaTokenizer {
        LlamaTokenizer::load(&fixtures().join("tokenizer")).unwrap()
    }

    /// A directory with the fixture's `tokenizer.json` and the given `tokenizer_config.json`.
    fn with_config(config: Option<Value>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(
            fixtures().join("tokenizer").join(TOKENIZER_FILE),
            dir.path().join(TOKENIZER_FILE),
        )
        .unwrap();
        if let Some(config) = config {
            fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), config.to_string()).unwrap();
        }
        dir
    }

    #[test]
    fn encodes_like_transformers() {
        let tokenizer = fixture_tokenizer();
        let expected: Value = serde_json::from_str(
            &fs::read_to_string(fixtures().join("tokenizer/tokenizer_expected.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            tokenizer.vocab_size(),
            expected["vocab_size"].as_u64().unwrap() as usize
        );
        let encodings = expected["encodings"].as_array().unwrap();
        assert_eq!(encodings.len(), 6);
        for case in encodings {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(tokenizer.encode(text, true).unwrap(), ids, "{text:?}");
            assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
        }
        let chat = &expected["chat"];
        let rendered_ids: Vec<u32> = serde_json::from_value(chat["rendered_ids"].clone()).unwrap();
        assert_eq!(
            tokenizer
                .encode(chat["rendered"].as_str().unwrap(), true)
                .unwrap(),
            rendered_ids
        );
    }

    #[test]
    fn special_tokens_and_template_come_from_tokenizer_config() {
        let tokenizer = fixture_tokenizer();
        assert_eq!(
            (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
            (Some(0), Some(0), Some(3))
        );
        assert_eq!(tokenizer.bos_token(), Some("<|endoftext|>"));
        assert_eq!(tokenizer.eos_token(), Some("<|endoftext|>"));
        assert_eq!(tokenizer.pad_token(), Some("<pad>"));
        assert_eq!(tokenizer.add_bos_token(), Some(false));
        let template = tokenizer.chat_template().unwrap();
        assert!(
            template.starts_with("{% for message in messages %}{{ '<|im_start|>'"),
            "{template}"
        );
    }

    #[test]
    fn skipping_special_tokens_drops_them_from_the_text() {
        let tokenizer = fixture_tokenizer();
        let ids = tokenizer
            .encode("<|im_start|>user\nHi<|im_end|>", true)
            .unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "user\nHi");
    }

    #[test]
    fn added_token_objects_and_named_templates_are_understood() {
        let dir = with_config(Some(json!({
            "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": false},
            "eos_token": {"content": "<|im_end|>"},
            "pad_token": null,
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "plain"}
            ]
        })));
        let tokenizer = LlamaTokenizer::load(dir.path()).unwrap();
        assert_eq!(
            (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
            (Some(1), Some(2), None)
        );
        assert_eq!(tokenizer.chat_template(), Some("plain"));
        assert_eq!(tokenizer.add_bos_token(), None);
    }

    #[test]
    fn chat_template_file_wins_over_the_config() {
        let dir = with_config(Some(json!({"chat_template": "from config"})));
        fs::write(dir.path().join(CHAT_TEMPLATE_FILE), "from file").unwrap();
        let tokenizer = LlamaTokenizer::load(dir.path()).unwrap();
        assert_eq!(tokenizer.chat_template(), Some("from file"));
    }

    #[test]
    fn without_tokenizer_config_no_special_tokens_are_known() {
        let dir = with_config(None);
        let tokenizer = LlamaTokenizer::load(dir.path()).unwrap();
        assert_eq!(
            (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
            (None, None, None)
        );
        assert_eq!(tokenizer.chat_template(), None);
        assert_eq!(tokenizer.encode("Hello world!", false).unwrap().len(), 11);
    }

    #[test]
    fn special_token_outside_the_vocabulary_is_named() {
        let dir = with_config(Some(json!({"eos_token": "</s>"})));
        let error = LlamaTokenizer::load(dir.path()).unwrap_err();
        assert!(matches!(error, ModelError::Tokenizer { .. }));
        let message = error.to_string();
        assert!(
            message
                .contains("tokenizer_config.json: eos_token \"</s>\" is not in the vocabulary of"),
            "{message}"
        );
    }

    #[test]
    fn malformed_special_token_and_template_fields_are_named() {
        let dir = with_config(Some(json!({"pad_token": 3})));
        let message = LlamaTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(
            message.contains(
                "field `pad_token` must be a string or an object with `content`, found a number"
            ),
            "{message}"
        );
        let dir = with_config(Some(json!({"bos_token": {"lstrip": true}})));
        let message = LlamaTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(
            message.contains("field `bos_token.content` is missing"),
            "{message}"
        );
        let dir = with_config(Some(json!({"chat_template": 1})));
        let message = LlamaTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(
            message.contains("field `chat_template` must be a string or a list"),
            "{message}"
        );
    }

    #[test]
    fn corrupt_tokenizer_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENIZER_FILE);
        fs::write(&path, "{\"model\": 42}").unwrap();
        let error = LlamaTokenizer::load(dir.path()).unwrap_err();
        assert!(matches!(error, ModelError::Tokenizer { .. }));
        assert!(
            error.to_string().starts_with(&format!(
                "{}: not a valid Hugging Face tokenizer",
                path.display()
            )),
            "{error}"
        );
    }

    #[test]
    fn missing_tokenizer_json_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let error = LlamaTokenizer::load(dir.path()).unwrap_err();
        assert!(matches!(error, ModelError::Io { .. }));
        assert!(
            error.to_string().contains("tokenizer.json: cannot read"),
            "{error}"
        );
    }

    #[test]
    fn malformed_tokenizer_config_reports_line_and_column() {
        let dir = with_config(None);
        fs::write(
            dir.path().join(TOKENIZER_CONFIG_FILE),
            "{\n\"bos_token\": }",
        )
        .unwrap();
        let error = LlamaTokenizer::load(dir.path()).unwrap_err();
        assert!(
            matches!(error, ModelError::Json { line: 2, .. }),
            "{error:?}"
        );
    }
}
