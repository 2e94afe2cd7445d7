//! PEFT's `adapter_config.json`: reading (PEFT defaults for missing keys, unknown keys kept),
//! writing (PEFT's full key set, sorted, indent 2, atomically), and the [`Deserialize`] impl for
//! user-written configs (Unsloth defaults, unknown keys refused).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::LoraConfig;
use crate::error::LoraConfigError;
use crate::options::{Bias, GradientCheckpointing, InitLoraWeights};
use crate::targeting::{ExcludeModules, TargetModules};

/// The file name PEFT gives the adapter config inside an adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// Every key this crate reads: PEFT's, sorted, then the Unsloth-only ones.
const KNOWN_KEYS: [&str; 47] = [
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "monteclora_config",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "use_rslora",
    "velora_config",
    // Unsloth-only, never written to adapter_config.json.
    "finetune_last_n_layers",
    "max_seq_length",
    "qat_scheme",
    "random_state",
    "temporary_location",
    "use_gradient_checkpointing",
];

/// The keys PEFT (main as of August 2026, 0.20 dev) writes for a LoRA adapter, sorted. Files
/// written by [`LoraConfig::save`] have exactly these keys plus any unknown keys read in.
pub const PEFT_ADAPTER_CONFIG_KEYS: &[&str] = KNOWN_KEYS.split_at(41).0;

/// Which defaults and which key set a document is read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// A PEFT file: PEFT keys only, unknown keys kept in `extra`.
    AdapterConfig,
    /// A user's config (TOML, CLI): PEFT and Unsloth keys, unknown keys refused.
    UserConfig,
}

impl<'de> Deserialize<'de> for LoraConfig {
    /// Reads a user-written config, e.g. the CLI's TOML table: missing keys take **Unsloth's**
    /// defaults, PEFT and Unsloth keys are accepted, and an unknown key is an error (it is
    /// likely a typo). Read it as its own table, not through `#[serde(flatten)]`, which would
    /// hand it the neighbouring keys. Errors name the offending key.
    ///
    /// To read a PEFT `adapter_config.json`, use [`LoraConfig::from_json_str`] instead.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ConfigSeed {
            base: LoraConfig::default(),
            dialect: Dialect::UserConfig,
            failed_key: None,
        }
        .deserialize(deserializer)
    }
}

impl LoraConfig {
    /// Parses a PEFT `adapter_config.json`. Missing keys take **PEFT's** defaults
    /// ([`LoraConfig::peft_defaults`]); keys this crate does not know are kept in
    /// [`LoraConfig::extra`] and written back by [`LoraConfig::to_json_string_pretty`]. A
    /// missing `peft_type` is read as `"LORA"`.
    ///
    /// The result is not validated; call [`LoraConfig::normalize`] before use.
    ///
    /// # Errors
    ///
    /// [`LoraConfigError::MalformedJson`] (with line and column),
    /// [`LoraConfigError::NotAnObject`], [`LoraConfigError::UnsupportedPeftType`] for any
    /// `peft_type` but `"LORA"`, or [`LoraConfigError::InvalidField`] naming a key whose value
    /// has the wrong type or is not one of the allowed values.
    pub fn from_json_str(text: &str) -> Result<Self, LoraConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|error| LoraConfigError::MalformedJson {
                line: error.line(),
                column: error.column(),
                message: error.to_string(),
            })?;
        Self::from_json_value(value)
    }

    /// Like [`LoraConfig::from_json_str`], from an already parsed JSON value.
    ///
    /// # Errors
    ///
    /// As [`LoraConfig::from_json_str`], except [`LoraConfigError::MalformedJson`].
    pub fn from_json_value(value: Value) -> Result<Self, LoraConfigError> {
        let object = match value {
            Value::Object(object) => object,
            other => {
                return Err(LoraConfigError::NotAnObject {
                    found: json_kind(&other),
                });
            }
        };
        if let Some(found) = object.get("peft_type").and_then(Value::as_str)
            && found != "LORA"
        {
            return Err(LoraConfigError::UnsupportedPeftType {
                found: found.to_owned(),
            });
        }
        let failed_key = Cell::new(None);
        let seed = ConfigSeed {
            base: LoraConfig::peft_defaults(),
            dialect: Dialect::AdapterConfig,
            failed_key: Some(&failed_key),
        };
        seed.deserialize(Value::Object(object))
            .map_err(|error| LoraConfigError::InvalidField {
                field: failed_key.take().unwrap_or_default(),
                message: error.to_string(),
            })
    }

    /// Reads `adapter_config.json` from `path`, a file or an adapter directory.
    ///
    /// # Errors
    ///
    /// [`LoraConfigError::Io`] when the file cannot be read, or
    /// [`LoraConfigError::InFile`] wrapping a [`LoraConfig::from_json_str`] error; both name
    /// the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LoraConfigError> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            path.join(ADAPTER_CONFIG_FILE)
        } else {
            path.to_owned()
        };
        let text = fs::read_to_string(&file).map_err(|error| LoraConfigError::Io {
            action: "read",
            path: file.clone(),
            error,
        })?;
        Self::from_json_str(&text).map_err(|error| LoraConfigError::InFile {
            path: file,
            error: Box::new(error),
        })
    }

    /// The `adapter_config.json` document as a JSON object: every key of
    /// [`PEFT_ADAPTER_CONFIG_KEYS`] with this config's values, plus [`LoraConfig::extra`];
    /// no Unsloth-only key. Objects are sorted by key at every level.
    pub fn to_json_value(&self) -> Value {
        let mut entries: BTreeMap<String, Value> = self.extra.clone().into_iter().collect();
        for (key, value) in self.peft_field_values() {
            entries.insert(key.to_owned(), value);
        }
        sort_keys(Value::Object(entries.into_iter().collect()))
    }

    /// The `adapter_config.json` text, formatted like PEFT's
    /// `json.dumps(config, indent=2, sort_keys=True)`. `target_modules` lists are sorted, and
    /// an integral `lora_alpha` is written as an integer, as PEFT writes it.
    pub fn to_json_string_pretty(&self) -> String {
        format!("{:#}", self.to_json_value())
    }

    /// Writes `adapter_config.json` atomically: to a temporary file in the same directory,
    /// flushed to disk, then renamed over the target, so a reader never sees half a file.
    ///
    /// `path` is an adapter directory (created if missing, as PEFT's `save_pretrained` does)
    /// or, when it ends in `.json` and is not a directory, the file itself. Returns the path
    /// of the written file.
    ///
    /// # Errors
    ///
    /// [`LoraConfigError::Io`] naming the directory or file that could not be created,
    /// written or renamed; no temporary file is left behind.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<PathBuf, LoraConfigError> {
        let path = path.as_ref();
        let names_a_file = !path.is_dir() && path.extension().is_some_and(|ext| ext == "json");
        let file = if names_a_file {
            path.to_owned()
        } else {
            fs::create_dir_all(path).map_err(|error| LoraConfigError::Io {
                action: "create directory",
                path: path.to_owned(),
                error,
            })?;
            path.join(ADAPTER_CONFIG_FILE)
        };
        write_atomically(&file, self.to_json_string_pretty().as_bytes())?;
        Ok(file)
    }

    /// Each PEFT key with this config's value, in sorted key order.
    pub(crate) fn peft_field_values(&self) -> [(&'static str, Value); 41] {
        let string = |s: &Option<String>| s.as_deref().map_or(Value::Null, Value::from);
        let raw = |v: &Option<Value>| v.clone().unwrap_or(Value::Null);
        let strings = |v: &Option<Vec<String>>| {
            v.as_ref()
                .map_or(Value::Null, |v| Value::from_iter(v.iter().cloned()))
        };
        [
            (
                "alora_invocation_tokens",
                raw(&self.alora_invocation_tokens),
            ),
            (
                "alpha_pattern",
                Value::Object(
                    self.alpha_pattern
                        .iter()
                        .map(|(key, &alpha)| (key.clone(), alpha_value(alpha)))
                        .collect(),
                ),
            ),
            ("arrow_config", raw(&self.arrow_config)),
            ("auto_mapping", raw(&self.auto_mapping)),
            (
                "base_model_name_or_path",
                string(&self.base_model_name_or_path),
            ),
            ("bias", Value::from(self.bias.as_str())),
            ("corda_config", raw(&self.corda_config)),
            ("ensure_weight_tying", Value::Bool(self.ensure_weight_tying)),
            ("eva_config", raw(&self.eva_config)),
            (
                "exclude_modules",
                self.exclude_modules
                    .as_ref()
                    .map_or(Value::Null, ExcludeModules::to_json_value),
            ),
            ("fan_in_fan_out", Value::Bool(self.fan_in_fan_out)),
            ("inference_mode", Value::Bool(self.inference_mode)),
            ("init_lora_weights", self.init_lora_weights.to_json_value()),
            ("kasa_config", raw(&self.kasa_config)),
            ("layer_replication", raw(&self.layer_replication)),
            ("layers_pattern", strings(&self.layers_pattern)),
            (
                "layers_to_transform",
                self.layers_to_transform
                    .as_ref()
                    .map_or(Value::Null, |v| Value::from_iter(v.iter().copied())),
            ),
            ("loftq_config", Value::Object(self.loftq_config.clone())),
            ("lora_alpha", alpha_value(self.lora_alpha)),
            ("lora_bias", Value::Bool(self.lora_bias)),
            ("lora_dropout", Value::from(self.lora_dropout)),
            ("lora_ga_config", raw(&self.lora_ga_config)),
            ("megatron_config", raw(&self.megatron_config)),
            ("megatron_core", string(&self.megatron_core)),
            ("modules_to_save", strings(&self.modules_to_save)),
            ("monteclora_config", raw(&self.monteclora_config)),
            ("peft_type", Value::from("LORA")),
            ("peft_version", string(&self.peft_version)),
            ("qalora_group_size", Value::from(self.qalora_group_size)),
            ("r", Value::from(self.r)),
            (
                "rank_pattern",
                Value::Object(
                    self.rank_pattern
                        .iter()
                        .map(|(key, &rank)| (key.clone(), Value::from(rank)))
                        .collect(),
                ),
            ),
            ("revision", string(&self.revision)),
            ("target_modules", self.target_modules_value()),
            ("target_parameters", strings(&self.target_parameters)),
            ("task_type", string(&self.task_type)),
            (
                "trainable_token_indices",
                raw(&self.trainable_token_indices),
            ),
            ("use_bdlora", raw(&self.use_bdlora)),
            ("use_dora", Value::Bool(self.use_dora)),
            ("use_qalora", Value::Bool(self.use_qalora)),
            ("use_rslora", Value::Bool(self.use_rslora)),
            ("velora_config", raw(&self.velora_config)),
        ]
    }

    fn target_modules_value(&self) -> Value {
        self.target_modules
            .as_ref()
            .map_or(Value::Null, TargetModules::to_json_value)
    }
}

/// PEFT types `lora_alpha` as an int, so an integral alpha is written as one: files we write
/// then look like PEFT's, and PEFT reads back the same type.
fn alpha_value(alpha: f64) -> Value {
    // Beyond 2^53 not every integer is a float; keep such values as floats.
    const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;
    if alpha.fract() == 0.0 && alpha.abs() <= EXACT_INTEGER_LIMIT {
        Value::from(alpha as i64)
    } else {
        Value::from(alpha)
    }
}

/// Rebuilds every object with its keys in sorted order, as Python's `sort_keys=True` writes
/// them. (`serde_json::Map` sorts on its own only while no crate in the build enables its
/// `preserve_order` feature.)
fn sort_keys(value: Value) -> Value {
    match value {
        Value::Object(object) => {
            let sorted: BTreeMap<String, Value> = object
                .into_iter()
                .map(|(key, value)| (key, sort_keys(value)))
                .collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn write_atomically(target: &Path, bytes: &[u8]) -> Result<(), LoraConfigError> {
    let dir = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let io_error = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |error| LoraConfigError::Io {
            action,
            path,
            error,
        }
    };
    // The temporary file lives in the target's directory so that the rename stays on one
    // file system and is atomic; it is deleted on every early return.
    let mut temp = tempfile::Builder::new()
        .prefix(".adapter_config.")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    temp.write_all(bytes)
        .map_err(io_error("write", temp.path()))?;
    make_world_readable(temp.as_file()).map_err(io_error("set permissions of", temp.path()))?;
    temp.as_file()
        .sync_all()
        .map_err(io_error("flush", temp.path()))?;
    temp.persist(target)
        .map_err(|failure| LoraConfigError::Io {
            action: "replace",
            path: target.to_owned(),
            error: failure.error,
        })?;
    // Flushing the directory makes the rename itself durable. Not every platform can open a
    // directory, and the file is complete either way, so failure here is not an error.
    if let Ok(directory) = fs::File::open(dir) {
        let _ = directory.sync_all();
    }
    Ok(())
}

/// Temporary files are created owner-only; an adapter config is meant to be shared like the
/// files PEFT writes.
#[cfg(unix)]
fn make_world_readable(file: &fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn make_world_readable(_file: &fs::File) -> std::io::Result<()> {
    Ok(())
}

/// Reads a config map onto `base`, one key at a time, so that an error can name its key.
struct ConfigSeed<'a> {
    base: LoraConfig,
    dialect: Dialect,
    /// Where to record the key of a failing value, for callers that build a typed error.
    /// Without it, the key is written into the error message instead.
    failed_key: Option<&'a Cell<Option<String>>>,
}

/// Attaches `key` to a value's error: recorded in `failed_key` when the caller wants it for a
/// typed error, else written into the message.
fn key_error<E: de::Error>(failed_key: Option<&Cell<Option<String>>>, key: String, error: E) -> E {
    match failed_key {
        Some(slot) => {
            slot.set(Some(key));
            error
        }
        None => E::custom(format_args!("invalid value for `{key}`: {error}")),
    }
}

impl<'de> DeserializeSeed<'de> for ConfigSeed<'_> {
    type Value = LoraConfig;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<LoraConfig, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ConfigSeed<'_> {
    type Value = LoraConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a LoRA configuration (a map of parameter names to values)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LoraConfig, A::Error> {
        let ConfigSeed {
            base: mut config,
            dialect,
            failed_key,
        } = self;
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                let error = de::Error::custom("the key appears twice");
                return Err(key_error(failed_key, key, error));
            }
            let assigned = match read_peft_key(&mut config, &key, &mut map) {
                Ok(false) if dialect == Dialect::UserConfig => {
                    read_unsloth_key(&mut config, &key, &mut map)
                }
                other => other,
            };
            match assigned {
                Ok(true) => {}
                Ok(false) if dialect == Dialect::AdapterConfig => match map.next_value::<Value>() {
                    Ok(value) => {
                        config.extra.insert(key, value);
                    }
                    Err(error) => return Err(key_error(failed_key, key, error)),
                },
                Ok(false) => return Err(de::Error::unknown_field(&key, &KNOWN_KEYS)),
                Err(error) => return Err(key_error(failed_key, key, error)),
            }
        }
        Ok(config)
    }
}

/// Reads the value of a PEFT key into `config`; `Ok(false)` when `key` is not a PEFT key (its
/// value is then still unread).
fn read_peft_key<'de, A: MapAccess<'de>>(
    config: &mut LoraConfig,
    key: &str,
    map: &mut A,
) -> Result<bool, A::Error> {
    match key {
        "alora_invocation_tokens" => config.alora_invocation_tokens = map.next_value()?,
        "alpha_pattern" => {
            config.alpha_pattern = map
                .next_value::<Option<BTreeMap<String, f64>>>()?
                .unwrap_or_default();
        }
        "arrow_config" => config.arrow_config = map.next_value()?,
        "auto_mapping" => config.auto_mapping = map.next_value()?,
        "base_model_name_or_path" => config.base_model_name_or_path = map.next_value()?,
        "bias" => config.bias = map.next_value::<Bias>()?,
        "corda_config" => config.corda_config = map.next_value()?,
        "ensure_weight_tying" => config.ensure_weight_tying = map.next_value()?,
        "eva_config" => config.eva_config = map.next_value()?,
        "exclude_modules" => config.exclude_modules = map.next_value()?,
        "fan_in_fan_out" => config.fan_in_fan_out = map.next_value()?,
        "inference_mode" => config.inference_mode = map.next_value()?,
        "init_lora_weights" => config.init_lora_weights = map.next_value::<InitLoraWeights>()?,
        "kasa_config" => config.kasa_config = map.next_value()?,
        "layer_replication" => config.layer_replication = map.next_value()?,
        "layers_pattern" => {
            config.layers_pattern = map.next_value::<Option<LayersPattern>>()?.map(|p| p.0);
        }
        "layers_to_transform" => {
            config.layers_to_transform = map.next_value::<Option<LayerIndices>>()?.map(|l| l.0);
        }
        "loftq_config" => {
            // Unsloth turns `None` into `{}`; PEFT writes `{}`.
            config.loftq_config = map
                .next_value::<Option<Map<String, Value>>>()?
                .unwrap_or_default();
        }
        "lora_alpha" => config.lora_alpha = map.next_value()?,
        "lora_bias" => config.lora_bias = map.next_value()?,
        "lora_dropout" => config.lora_dropout = map.next_value()?,
        "lora_ga_config" => config.lora_ga_config = map.next_value()?,
        "megatron_config" => config.megatron_config = map.next_value()?,
        "megatron_core" => config.megatron_core = map.next_value()?,
        "modules_to_save" => config.modules_to_save = map.next_value()?,
        "monteclora_config" => config.monteclora_config = map.next_value()?,
        "peft_type" => {
            let peft_type: String = map.next_value()?;
            if peft_type != "LORA" {
                return Err(de::Error::custom(format_args!(
                    "\"{peft_type}\" is not supported; only \"LORA\" adapters are"
                )));
            }
        }
        "peft_version" => config.peft_version = map.next_value()?,
        "qalora_group_size" => config.qalora_group_size = map.next_value()?,
        "r" => config.r = map.next_value()?,
        "rank_pattern" => {
            config.rank_pattern = map
                .next_value::<Option<BTreeMap<String, usize>>>()?
                .unwrap_or_default();
        }
        "revision" => config.revision = map.next_value()?,
        "target_modules" => config.target_modules = map.next_value()?,
        "target_parameters" => config.target_parameters = map.next_value()?,
        "task_type" => config.task_type = map.next_value()?,
        "trainable_token_indices" => config.trainable_token_indices = map.next_value()?,
        "use_bdlora" => config.use_bdlora = map.next_value()?,
        "use_dora" => config.use_dora = map.next_value()?,
        "use_qalora" => config.use_qalora = map.next_value()?,
        "use_rslora" => config.use_rslora = map.next_value()?,
        "velora_config" => config.velora_config = map.next_value()?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// Reads the value of an Unsloth-only key into `config`; `Ok(false)` when `key` is not one.
fn read_unsloth_key<'de, A: MapAccess<'de>>(
    config: &mut LoraConfig,
    key: &str,
    map: &mut A,
) -> Result<bool, A::Error> {
    match key {
        "finetune_last_n_layers" => config.finetune_last_n_layers = map.next_value()?,
        "max_seq_length" => config.max_seq_length = map.next_value()?,
        "qat_scheme" => config.qat_scheme = map.next_value()?,
        "random_state" => config.random_state = map.next_value()?,
        "temporary_location" => config.temporary_location = map.next_value()?,
        "use_gradient_checkpointing" => {
            config.use_gradient_checkpointing = map.next_value::<GradientCheckpointing>()?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// `layers_to_transform`: one index or a list of them.
struct LayerIndices(Vec<usize>);

impl<'de> Deserialize<'de> for LayerIndices {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IndicesVisitor;

        impl<'de> Visitor<'de> for IndicesVisitor {
            type Value = LayerIndices;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a layer index or a list of layer indices (integers >= 0)")
            }

            fn visit_u64<E: de::Error>(self, index: u64) -> Result<Self::Value, E> {
                usize::try_from(index)
                    .map(|index| LayerIndices(vec![index]))
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(index), &self))
            }

            fn visit_i64<E: de::Error>(self, index: i64) -> Result<Self::Value, E> {
                usize::try_from(index)
                    .map(|index| LayerIndices(vec![index]))
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(index), &self))
            }

            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                let mut indices = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(index) = seq.next_element::<usize>()? {
                    indices.push(index);
                }
                Ok(LayerIndices(indices))
            }
        }

        deserializer.deserialize_any(IndicesVisitor)
    }
}

/// `layers_pattern`: one pattern or a list of them. An empty string means "no pattern", as in
/// PEFT, and is read as an empty list.
struct LayersPattern(Vec<String>);

impl<'de> Deserialize<'de> for LayersPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PatternVisitor;

        impl<'de> Visitor<'de> for PatternVisitor {
            type Value = LayersPattern;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a layer-list name such as \"layers\", or a list of them")
            }

            fn visit_str<E: de::Error>(self, pattern: &str) -> Result<Self::Value, E> {
                Ok(LayersPattern(if pattern.is_empty() {
                    Vec::new()
                } else {
                    vec![pattern.to_owned()]
                }))
            }

            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                let mut patterns = Vec::new();
                while let Some(pattern) = seq.next_element::<String>()? {
                    patterns.push(pattern);
                }
                Ok(LayersPattern(patterns))
            }
        }

        deserializer.deserialize_any(PatternVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An adapter_config.json as PEFT main (0.20 dev) writes it for an Unsloth-style Llama
    /// adapter: every key, sorted, indent 2. (PEFT writes `target_modules` in set order; it is
    /// sorted here because we write it sorted.)
    const PEFT_MAIN_SAMPLE: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": "unsloth/Llama-3.2-1B-Instruct",
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.20.1.dev0@5d602fdbff04",
  "qalora_group_size": 16,
  "r": 16,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "down_proj",
    "gate_proj",
    "k_proj",
    "o_proj",
    "q_proj",
    "up_proj",
    "v_proj"
  ],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
}"#;

    /// What PEFT 0.18.0 writes: no `lora_ga_config`, `velora_config`, `monteclora_config`,
    /// `use_bdlora`, `kasa_config`. With patterns, rsLoRA and `modules_to_save`.
    const PEFT_0_18_SAMPLE: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {"o_proj": 8},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": "meta-llama/Llama-3.2-3B",
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": "gaussian",
  "layer_replication": null,
  "layers_pattern": "layers",
  "layers_to_transform": [0, 1, 2],
  "loftq_config": {},
  "lora_alpha": 64,
  "lora_bias": false,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": ["lm_head"],
  "peft_type": "LORA",
  "peft_version": "0.18.0",
  "qalora_group_size": 16,
  "r": 32,
  "rank_pattern": {"q_proj": 8},
  "revision": null,
  "target_modules": ["v_proj", "q_proj"],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": true
}"#;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn written_keys_are_peft_keys() {
        let keys: Vec<&str> = LoraConfig::default()
            .peft_field_values()
            .iter()
            .map(|(key, _)| *key)
            .collect();
        assert_eq!(keys, PEFT_ADAPTER_CONFIG_KEYS);
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "sorted");
    }

    #[test]
    fn peft_main_file_round_trips_exactly() {
        let config = LoraConfig::from_json_str(PEFT_MAIN_SAMPLE).unwrap();
        assert_eq!(config.r, 16);
        assert_eq!(config.lora_alpha, 16.0);
        assert!(config.inference_mode);
        assert!(config.extra.is_empty());
        assert_eq!(config.to_json_value(), parse(PEFT_MAIN_SAMPLE));
        // Byte for byte too: same formatting as Python's json.dumps(indent=2, sort_keys=True).
        assert_eq!(config.to_json_string_pretty(), PEFT_MAIN_SAMPLE);
    }

    #[test]
    fn unsloth_default_writes_peft_key_set_and_no_unsloth_keys() {
        let written = parse(&LoraConfig::default().to_json_string_pretty());
        let object = written.as_object().unwrap();
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        assert_eq!(keys, PEFT_ADAPTER_CONFIG_KEYS);
        assert_eq!(object["lora_alpha"], json!(16));
        assert_eq!(object["r"], json!(16));
        assert_eq!(object["task_type"], json!("CAUSAL_LM"));
        for unsloth_key in [
            "use_gradient_checkpointing",
            "random_state",
            "max_seq_length",
        ] {
            assert!(!object.contains_key(unsloth_key));
        }
        let mut expected = parse(PEFT_MAIN_SAMPLE);
        expected["base_model_name_or_path"] = Value::Null;
        expected["inference_mode"] = json!(false);
        expected["peft_version"] = Value::Null;
        assert_eq!(written, expected);
    }

    #[test]
    fn peft_0_18_file_keeps_every_value_and_gains_newer_keys() {
        let config = LoraConfig::from_json_str(PEFT_0_18_SAMPLE).unwrap();
        assert_eq!(
            (config.r, config.lora_alpha, config.lora_dropout),
            (32, 64.0, 0.05)
        );
        assert!(config.use_rslora);
        assert_eq!(config.init_lora_weights, InitLoraWeights::Gaussian);
        assert_eq!(config.layers_pattern, Some(vec!["layers".to_owned()]));
        assert_eq!(config.layers_to_transform, Some(vec![0, 1, 2]));
        assert_eq!(config.rank_pattern.get("q_proj"), Some(&8));
        assert_eq!(config.alpha_pattern.get("o_proj"), Some(&8.0));

        let written = config.to_json_value();
        let input = parse(PEFT_0_18_SAMPLE);
        for (key, value) in input.as_object().unwrap() {
            let expected = match key.as_str() {
                "target_modules" => json!(["q_proj", "v_proj"]),
                // A single pattern string is written as a one-element list.
                "layers_pattern" => json!(["layers"]),
                _ => value.clone(),
            };
            assert_eq!(written[key], expected, "{key}");
        }
        for newer in [
            "lora_ga_config",
            "velora_config",
            "monteclora_config",
            "use_bdlora",
            "kasa_config",
        ] {
            assert_eq!(written[newer], Value::Null, "{newer}");
        }
        // And the rewritten file reads back to the same config.
        let reread = LoraConfig::from_json_value(written).unwrap();
        assert_eq!(reread, config);
    }

    #[test]
    fn old_minimal_file_takes_peft_defaults() {
        let config = LoraConfig::from_json_str(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"]}"#,
        )
        .unwrap();
        let expected = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: Some(TargetModules::names(["q_proj", "v_proj"])),
            ..LoraConfig::peft_defaults()
        };
        assert_eq!(config, expected);
        assert_eq!(config.scaling_for("model.layers.0.self_attn.q_proj"), 2.0);

        let bare = LoraConfig::from_json_str(r#"{"peft_type":"LORA"}"#).unwrap();
        assert_eq!(bare, LoraConfig::peft_defaults());
        assert_eq!(
            LoraConfig::from_json_str("{}").unwrap(),
            LoraConfig::peft_defaults()
        );
    }

    #[test]
    fn unknown_keys_survive_a_round_trip() {
        let text = r#"{"peft_type":"LORA","r":4,"future_option":{"b":[1,2],"a":true},
                       "random_state":42}"#;
        let config = LoraConfig::from_json_str(text).unwrap();
        // In a PEFT file, Unsloth's keys are foreign too: kept, not interpreted.
        assert_eq!(config.random_state, 3407);
        let written = config.to_json_value();
        assert_eq!(written["future_option"], json!({"a": true, "b": [1, 2]}));
        assert_eq!(written["random_state"], json!(42));
        assert!(
            config
                .to_json_string_pretty()
                .contains("\"future_option\": {\n    \"a\"")
        );
    }

    #[test]
    fn json_spellings_of_scalars() {
        let config = LoraConfig::from_json_str(
            r#"{"lora_alpha": 16.5, "layers_to_transform": 3, "layers_pattern": ["layers", "h"],
                "rank_pattern": null, "loftq_config": null, "init_lora_weights": "pissa_niter_8",
                "target_modules": "all-linear"}"#,
        )
        .unwrap();
        assert_eq!(config.lora_alpha, 16.5);
        assert_eq!(config.layers_to_transform, Some(vec![3]));
        assert_eq!(
            config.layers_pattern,
            Some(vec!["layers".into(), "h".into()])
        );
        assert!(config.rank_pattern.is_empty() && config.loftq_config.is_empty());
        assert_eq!(config.target_modules, Some(TargetModules::AllLinear));
        let written = config.to_json_value();
        assert_eq!(written["lora_alpha"], json!(16.5));
        assert_eq!(written["layers_to_transform"], json!([3]));
        assert_eq!(written["init_lora_weights"], json!("pissa_niter_8"));
        assert_eq!(written["target_modules"], json!("all-linear"));

        let regex = LoraConfig::from_json_str(r#"{"target_modules": ".*\\.(q|v)_proj"}"#).unwrap();
        assert_eq!(
            regex.target_modules,
            Some(TargetModules::Pattern(r".*\.(q|v)_proj".into()))
        );
        assert!(regex.targets("model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn malformed_json_reports_position() {
        let error = LoraConfig::from_json_str("{\n  \"r\": 8,\n  \"lora_alpha\": }").unwrap_err();
        let LoraConfigError::MalformedJson { line, column, .. } = error else {
            panic!("{error:?}");
        };
        assert_eq!((line, column), (3, 17));
        assert!(matches!(
            LoraConfig::from_json_str("[1, 2]"),
            Err(LoraConfigError::NotAnObject { found: "an array" })
        ));
    }

    #[test]
    fn wrong_values_name_their_field() {
        let cases = [
            (r#"{"r": "sixteen"}"#, "r", "expected usize"),
            (r#"{"r": -1}"#, "r", "-1"),
            (r#"{"lora_alpha": "16"}"#, "lora_alpha", "expected f64"),
            (r#"{"bias": "some"}"#, "bias", "`none`, `all`, `lora_only`"),
            (
                r#"{"target_modules": 5}"#,
                "target_modules",
                "list of module names",
            ),
            (
                r#"{"layers_to_transform": -2}"#,
                "layers_to_transform",
                "integers >= 0",
            ),
            (
                r#"{"init_lora_weights": 1}"#,
                "init_lora_weights",
                "true, false",
            ),
            (
                r#"{"use_rslora": "yes"}"#,
                "use_rslora",
                "expected a boolean",
            ),
        ];
        for (text, field, hint) in cases {
            let error = LoraConfig::from_json_str(text).unwrap_err();
            let LoraConfigError::InvalidField {
                field: named,
                message,
            } = &error
            else {
                panic!("{text}: {error:?}");
            };
            assert_eq!(named, field, "{text}");
            assert!(message.contains(hint), "{text}: {message}");
            assert!(error.to_string().contains(&format!("`{field}`")), "{error}");
        }
    }

    #[test]
    fn other_peft_types_are_rejected() {
        let error = LoraConfig::from_json_str(r#"{"peft_type": "PREFIX_TUNING"}"#).unwrap_err();
        assert!(
            matches!(error, LoraConfigError::UnsupportedPeftType { ref found } if found == "PREFIX_TUNING")
        );
        assert!(error.to_string().contains("only \"LORA\""));
        let error = LoraConfig::from_json_str(r#"{"peft_type": 3}"#).unwrap_err();
        assert!(
            matches!(error, LoraConfigError::InvalidField { ref field, .. } if field == "peft_type")
        );
    }

    #[test]
    fn user_config_takes_unsloth_defaults_and_refuses_unknown_keys() {
        let config: LoraConfig = serde_json::from_value(json!({
            "r": 32,
            "lora_alpha": 64,
            "use_gradient_checkpointing": true,
            "random_state": 7,
            "max_seq_length": 4096,
            "temporary_location": "tmp",
            "finetune_last_n_layers": 4
        }))
        .unwrap();
        assert_eq!((config.r, config.lora_alpha), (32, 64.0));
        assert_eq!(config.use_gradient_checkpointing, GradientCheckpointing::On);
        assert_eq!((config.random_state, config.max_seq_length), (7, 4096));
        assert_eq!(config.temporary_location, "tmp");
        assert_eq!(config.finetune_last_n_layers, Some(4));
        assert_eq!(
            config.target_modules,
            Some(TargetModules::unsloth_default())
        );
        let empty: LoraConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(empty, LoraConfig::default());

        let error = serde_json::from_value::<LoraConfig>(json!({"lora_aplha": 8})).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `lora_aplha`"),
            "{error}"
        );
        let error =
            serde_json::from_value::<LoraConfig>(json!({"use_gradient_checkpointing": "yes"}))
                .unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("`use_gradient_checkpointing`"),
            "{message}"
        );
        assert!(message.contains("false, true or \"unsloth\""), "{message}");
        let error = serde_json::from_str::<LoraConfig>(r#"{"r": 4, "r": 5}"#).unwrap_err();
        assert!(error.to_string().contains("appears twice"), "{error}");
    }

    #[test]
    fn save_is_atomic_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let adapter_dir = dir.path().join("adapter");
        let mut config = LoraConfig {
            base_model_name_or_path: Some("unsloth/Llama-3.2-1B".into()),
            ..LoraConfig::default()
        };

        let written = config.save(&adapter_dir).unwrap();
        assert_eq!(written, adapter_dir.join(ADAPTER_CONFIG_FILE));
        // Saving again replaces the file in place.
        config.r = 8;
        config.save(&adapter_dir).unwrap();
        let names: Vec<_> = fs::read_dir(&adapter_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            [ADAPTER_CONFIG_FILE],
            "no temporary file left behind"
        );

        let loaded = LoraConfig::load(&adapter_dir).unwrap();
        assert_eq!(loaded.to_json_value(), config.to_json_value());
        assert_eq!(LoraConfig::load(&written).unwrap(), loaded);
        // The Unsloth-only fields are not in the file: they come back as defaults.
        assert_eq!(loaded.random_state, 3407);

        let file = dir.path().join("custom.json");
        assert_eq!(config.save(&file).unwrap(), file);
        assert!(file.is_file());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere.json");
        let error = LoraConfig::load(&missing).unwrap_err();
        assert!(matches!(error, LoraConfigError::Io { action: "read", .. }));
        assert!(error.to_string().contains("nowhere.json"), "{error}");

        let broken = dir.path().join("adapter_config.json");
        fs::write(&broken, r#"{"r": "x"}"#).unwrap();
        let error = LoraConfig::load(dir.path()).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("adapter_config.json") && message.contains("`r`"),
            "{message}"
        );
    }
}
