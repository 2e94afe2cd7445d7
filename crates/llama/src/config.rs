//! The model's `config.json`: sizes, RoPE, biases and special token ids of a Llama-family model.
//!
//! Both layouts transformers writes are read: 4.x (`rope_theta` + `rope_scaling`, `torch_dtype`)
//! and 5.x (`rope_parameters`, `dtype`). Absent optional fields take transformers' defaults for
//! the model type.

use std::f64::consts::PI;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::checkpoint::FloatDtype;
use crate::error::ModelError;
use crate::json::{self, Fields};

/// The architectures this crate implements; all share the Llama decoder layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// `llama`: Llama 1/2/3, SmolLM/SmolLM2, TinyLlama, ...
    Llama,
    /// `mistral`: no biases, optional sliding window.
    Mistral,
    /// `qwen2`: biases on the q, k and v projections.
    Qwen2,
}

impl ModelType {
    /// The `model_type` string of `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    fn from_model_type(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// transformers' `max_position_embeddings` default for this architecture.
    fn default_max_position_embeddings(self) -> usize {
        match self {
            Self::Llama => 2048,
            Self::Mistral => 4096 * 32,
            Self::Qwen2 => 32768,
        }
    }
}

/// How RoPE frequencies are rescaled for longer contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `linear`: every inverse frequency divided by `factor` (position interpolation).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, the band between blended.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The `rope_type` string transformers uses.
    fn rope_type(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "linear",
            Self::Llama3 { .. } => "llama3",
        }
    }

    /// The scaling parameters as transformers writes them (without `rope_type`/`rope_theta`).
    fn parameters(&self) -> Map<String, Value> {
        let mut parameters = Map::new();
        let mut set = |key: &str, value: Value| {
            parameters.insert(key.to_string(), value);
        };
        match *self {
            Self::Linear { factor } => set("factor", json!(factor)),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                set("factor", json!(factor));
                set("low_freq_factor", json!(low_freq_factor));
                set("high_freq_factor", json!(high_freq_factor));
                set(
                    "original_max_position_embeddings",
                    json!(original_max_position_embeddings),
                );
            }
        }
        parameters
    }

    /// Applies the scaling to unscaled inverse frequencies, as transformers'
    /// `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters` do.
    fn apply(&self, inv_freq: &mut [f64]) {
        match *self {
            Self::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_context_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = old_context_len / low_freq_factor;
                let high_freq_wavelen = old_context_len / high_freq_factor;
                for f in inv_freq {
                    let wavelen = 2.0 * PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_context_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
    }
}

/// A parsed and validated HF `config.json` of a Llama, Mistral or Qwen2 model.
///
/// The fields are the source of truth for [`LlamaConfig::to_hf_json`]; every other key of the
/// original file is kept in `raw` and written back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// The architecture (`model_type`).
    pub model_type: ModelType,
    /// Rows of the embedding and of the LM head (`vocab_size`).
    pub vocab_size: usize,
    /// Width of the residual stream (`hidden_size`).
    pub hidden_size: usize,
    /// Width of the MLP's gate and up projections (`intermediate_size`).
    pub intermediate_size: usize,
    /// Number of decoder layers (`num_hidden_layers`).
    pub num_hidden_layers: usize,
    /// Number of query heads (`num_attention_heads`).
    pub num_attention_heads: usize,
    /// Number of key/value heads (`num_key_value_heads`; defaults to `num_attention_heads`);
    /// fewer than the query heads means grouped-query attention.
    pub num_key_value_heads: usize,
    /// Width of one attention head (`head_dim`; defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Epsilon of every RMSNorm (`rms_norm_eps`; default 1e-6).
    pub rms_norm_eps: f64,
    /// RoPE base (`rope_parameters.rope_theta`, or `rope_theta` in 4.x files; default 10000).
    pub rope_theta: f64,
    /// RoPE frequency scaling, `None` for plain RoPE (`rope_type` `default`).
    pub rope_scaling: Option<RopeScaling>,
    /// Longest sequence the model is configured for (`max_position_embeddings`).
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix (`tie_word_embeddings`; default false).
    /// When true, checkpoints usually hold no `lm_head.weight`.
    pub tie_word_embeddings: bool,
    /// Whether q, k and v projections have biases: always for Qwen2, `attention_bias` for Llama.
    pub qkv_bias: bool,
    /// Whether the o projection has a bias: `attention_bias` for Llama, never otherwise.
    pub o_bias: bool,
    /// Whether the gate, up and down projections have biases (`mlp_bias`, Llama only).
    pub mlp_bias: bool,
    /// Sliding-window attention span: Mistral's `sliding_window`, Qwen2's when
    /// `use_sliding_window` is true. Stored only; the window is not applied by this crate.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token (`bos_token_id`).
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (`eos_token_id`, an integer or a list); empty if none.
    pub eos_token_ids: Vec<u32>,
    /// Padding token (`pad_token_id`).
    pub pad_token_id: Option<u32>,
    /// The dtype the weights were saved in (`dtype` in 5.x files, `torch_dtype` in 4.x).
    pub torch_dtype: Option<String>,
    /// The whole original file, so that [`LlamaConfig::to_hf_json`] keeps the keys this struct
    /// does not model (`architectures`, `initializer_range`, ...).
    pub raw: Value,
}

impl LlamaConfig {
    /// Reads `config.json`: `path` is the file, or a model directory holding it.
    ///
    /// # Errors
    ///
    /// [`ModelError::Io`] if the file cannot be read; otherwise as
    /// [`LlamaConfig::from_json_str`].
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| ModelError::io("read", &file, e))?;
        Self::from_json_str(&text, &file)
    }

    /// Parses the text of a `config.json`; `path` is used in error messages only.
    ///
    /// # Errors
    ///
    /// - [`ModelError::Json`] if the text is not a JSON object (with line and column);
    /// - [`ModelError::ConfigField`] naming a field that is missing, of the wrong type, or
    ///   inconsistent (e.g. `num_attention_heads` not dividing `hidden_size`);
    /// - [`ModelError::Unsupported`] for another `model_type`, activation, RoPE type
    ///   (`yarn`, `dynamic`, `longrope`, ...), partial rotary embeddings, or a pre-quantized
    ///   checkpoint.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ModelError> {
        let map = json::parse_object(text, path)?;
        let config = Self::from_fields(&Fields::new(path, &map))?;
        let config = Self {
            raw: Value::Object(map),
            ..config
        };
        config.validate(path)?;
        Ok(config)
    }

    fn from_fields(fields: &Fields<'_>) -> Result<Self, ModelError> {
        let unsupported = |what: String| ModelError::Unsupported {
            path: fields.path().to_path_buf(),
            what,
        };

        let model_type_name = fields.required_str("model_type")?;
        let model_type = ModelType::from_model_type(model_type_name).ok_or_else(|| {
            unsupported(format!(
                "model_type \"{model_type_name}\"; supported: llama, mistral, qwen2"
            ))
        })?;
        if fields.get("quantization_config").is_some() {
            return Err(unsupported(
                "pre-quantized checkpoint (`quantization_config` is set); load the unquantized \
                 model instead"
                    .to_string(),
            ));
        }
        let hidden_act = fields.optional_str("hidden_act")?.unwrap_or("silu");
        // transformers maps both names to the same SiLU.
        if !matches!(hidden_act, "silu" | "swish") {
            return Err(unsupported(format!(
                "hidden_act \"{hidden_act}\"; only \"silu\" is supported"
            )));
        }
        if let Some(factor) = fields.optional_f64("partial_rotary_factor")? {
            check_full_rotary(fields, factor)?;
        }

        let hidden_size = fields.required_usize("hidden_size")?;
        let num_attention_heads = fields.required_usize("num_attention_heads")?;
        let head_dim = match fields.optional_usize("head_dim")? {
            Some(head_dim) => head_dim,
            None => {
                if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(fields.error(
                        "num_attention_heads",
                        format!(
                            "is {num_attention_heads}, which does not divide hidden_size \
                             ({hidden_size}); set `head_dim` or use a divisor"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let (rope_theta, rope_scaling) = read_rope(fields)?;
        let attention_bias = fields.optional_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match model_type {
            // HF Llama puts `attention_bias` on all four projections, o_proj included.
            ModelType::Llama => (
                attention_bias,
                attention_bias,
                fields.optional_bool("mlp_bias")?.unwrap_or(false),
            ),
            ModelType::Mistral => (false, false, false),
            ModelType::Qwen2 => (true, false, false),
        };
        let sliding_window = match model_type {
            ModelType::Llama => None,
            ModelType::Mistral => fields.optional_usize("sliding_window")?,
            ModelType::Qwen2 => {
                if fields.optional_bool("use_sliding_window")?.unwrap_or(false) {
                    fields.optional_usize("sliding_window")?
                } else {
                    None
                }
            }
        };
        let torch_dtype = match fields.optional_str("dtype")? {
            Some(dtype) => Some(dtype),
            None => fields.optional_str("torch_dtype")?,
        };

        Ok(Self {
            model_type,
            vocab_size: fields.required_usize("vocab_size")?,
            hidden_size,
            intermediate_size: fields.required_usize("intermediate_size")?,
            num_hidden_layers: fields.required_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: fields
                .optional_usize("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: fields.optional_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: fields
                .optional_usize("max_position_embeddings")?
                .unwrap_or_else(|| model_type.default_max_position_embeddings()),
            tie_word_embeddings: fields
                .optional_bool("tie_word_embeddings")?
                .unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: fields.optional_token_id("bos_token_id")?,
            eos_token_ids: fields.token_ids("eos_token_id")?,
            pad_token_id: fields.optional_token_id("pad_token_id")?,
            torch_dtype: torch_dtype.map(str::to_string),
            raw: Value::Null,
        })
    }

    /// Checks the sizes fit together; errors name the offending field.
    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let error = |field: &str, message: String| ModelError::field(path, field, message);
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(error(field, "is 0; it must be at least 1".to_string()));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(error(
                "num_key_value_heads",
                format!(
                    "is {}, which does not divide num_attention_heads ({}); grouped-query \
                     attention shares each key/value head among a whole number of query heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(error(
                "head_dim",
                format!(
                    "is {}, but rotary embeddings rotate pairs of dimensions, so it must be even",
                    self.head_dim
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(error(
                "rms_norm_eps",
                format!("is {}; it must be a positive number", self.rms_norm_eps),
            ));
        }
        Ok(())
    }

    /// The RoPE inverse frequencies, `head_dim / 2` values, in f64.
    ///
    /// `theta^(-2i/head_dim)` for `i` in `0..head_dim/2`, then rescaled as transformers does for
    /// `linear` and `llama3` scaling. transformers computes these in f32, so its values differ
    /// from these by f32 rounding (about 1e-7 relative).
    pub fn inv_freq(&self) -> Vec<f64> {
        let dim = self.head_dim as f64;
        let mut inv_freq: Vec<f64> = (0..self.head_dim)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f64 / dim))
            .collect();
        if let Some(scaling) = &self.rope_scaling {
            scaling.apply(&mut inv_freq);
        }
        inv_freq
    }

    /// Parameters of the base model, counted as transformers' `num_parameters()` does:
    /// embedding, every layer's projections (with their biases) and norms, the final norm, and
    /// the LM head unless it is tied to the embedding.
    pub fn num_parameters(&self) -> usize {
        let hidden = self.hidden_size;
        let q_width = self.num_attention_heads * self.head_dim;
        let kv_width = self.num_key_value_heads * self.head_dim;
        let with_bias = |inputs: usize, outputs: usize, bias: bool| {
            inputs * outputs + if bias { outputs } else { 0 }
        };
        let attention = with_bias(hidden, q_width, self.qkv_bias)
            + 2 * with_bias(hidden, kv_width, self.qkv_bias)
            + with_bias(q_width, hidden, self.o_bias);
        let mlp = 2 * with_bias(hidden, self.intermediate_size, self.mlp_bias)
            + with_bias(self.intermediate_size, hidden, self.mlp_bias);
        let layer_norms = 2 * hidden;
        let embedding = self.vocab_size * hidden;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * hidden
        };
        embedding + self.num_hidden_layers * (attention + mlp + layer_norms) + hidden + lm_head
    }

    /// A transformers-compatible `config.json` for weights saved in `dtype`, e.g. a merged model.
    ///
    /// Starts from `raw` (so unmodelled keys survive) and writes the fields of this struct over
    /// it, keeping the file's layout: RoPE goes to `rope_parameters` if the original had that
    /// key (transformers 5), else to `rope_theta` + `rope_scaling` (read by 4.x and 5.x); the
    /// dtype goes to whichever of `dtype`/`torch_dtype` the original had (`torch_dtype` if
    /// neither). The bias flags and `sliding_window` are not written: they follow from
    /// `model_type` and the original keys.
    pub fn to_hf_json(&self, dtype: FloatDtype) -> Value {
        let mut out = match &self.raw {
            Value::Object(map) => map.clone(),
            _ => Map::new(),
        };
        let mut set = |key: &str, value: Value| {
            out.insert(key.to_string(), value);
        };
        set("model_type", json!(self.model_type.as_str()));
        set("vocab_size", json!(self.vocab_size));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.num_hidden_layers));
        set("num_attention_heads", json!(self.num_attention_heads));
        set("num_key_value_heads", json!(self.num_key_value_heads));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        set("bos_token_id", json!(self.bos_token_id));
        set("pad_token_id", json!(self.pad_token_id));
        let eos_was_list = self.raw.get("eos_token_id").is_some_and(Value::is_array);
        set(
            "eos_token_id",
            match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [id] if !eos_was_list => json!(id),
                ids => json!(ids),
            },
        );
        out.insert("head_dim".to_string(), json!(self.head_dim));
        self.write_rope(&mut out);
        let dtype_keys: Vec<&str> = ["dtype", "torch_dtype"]
            .into_iter()
            .filter(|key| out.contains_key(*key))
            .collect();
        let dtype_keys = if dtype_keys.is_empty() {
            vec!["torch_dtype"]
        } else {
            dtype_keys
        };
        for key in dtype_keys {
            out.insert(key.to_string(), json!(dtype.torch_name()));
        }
        Value::Object(out)
    }

    fn write_rope(&self, out: &mut Map<String, Value>) {
        let rope_type = self
            .rope_scaling
            .as_ref()
            .map_or("default", RopeScaling::rope_type);
        let scaling_parameters = self
            .rope_scaling
            .as_ref()
            .map(RopeScaling::parameters)
            .unwrap_or_default();
        if out.contains_key("rope_parameters") {
            let mut parameters = scaling_parameters;
            parameters.insert("rope_type".to_string(), json!(rope_type));
            parameters.insert("rope_theta".to_string(), json!(self.rope_theta));
            out.insert("rope_parameters".to_string(), Value::Object(parameters));
        } else {
            out.insert("rope_theta".to_string(), json!(self.rope_theta));
            let scaling = if self.rope_scaling.is_some() {
                let mut parameters = scaling_parameters;
                parameters.insert("rope_type".to_string(), json!(rope_type));
                Value::Object(parameters)
            } else {
                Value::Null
            };
            out.insert("rope_scaling".to_string(), scaling);
        }
    }
}

/// Reads RoPE's base and scaling from `rope_parameters` (transformers 5) or from `rope_theta`
/// and `rope_scaling` (transformers 4).
fn read_rope(fields: &Fields<'_>) -> Result<(f64, Option<RopeScaling>), ModelError> {
    let top_level_theta = fields.optional_f64("rope_theta")?;
    let (theta, scaling) = if let Some(parameters) = fields.optional_object("rope_parameters")? {
        reject_per_layer_type_rope(&parameters)?;
        let theta = parameters.optional_f64("rope_theta")?.or(top_level_theta);
        // transformers 5 treats a missing `rope_type` as plain RoPE.
        let rope_type = rope_type(&parameters)?.unwrap_or("default");
        (theta, read_scaling(&parameters, rope_type)?)
    } else if let Some(scaling) = fields.optional_object("rope_scaling")? {
        let rope_type = rope_type(&scaling)?.ok_or_else(|| {
            scaling.error(
                "rope_type",
                "is missing (and so is `type`); expected one of default, linear, llama3",
            )
        })?;
        (top_level_theta, read_scaling(&scaling, rope_type)?)
    } else {
        (top_level_theta, None)
    };
    let theta = theta.unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 0.0) {
        let field = if fields.get("rope_parameters").is_some() {
            "rope_parameters.rope_theta"
        } else {
            "rope_theta"
        };
        return Err(ModelError::field(
            fields.path(),
            field,
            format!("is {theta}; it must be a positive number"),
        ));
    }
    Ok((theta, scaling))
}

/// `rope_type`, or the older spelling `type`.
fn rope_type<'a>(parameters: &Fields<'a>) -> Result<Option<&'a str>, ModelError> {
    match parameters.optional_str("rope_type")? {
        Some(rope_type) => Ok(Some(rope_type)),
        None => parameters.optional_str("type"),
    }
}

/// transformers 5 allows one RoPE setup per layer type (`{"full_attention": {...}, ...}`),
/// which no supported architecture uses.
fn reject_per_layer_type_rope(parameters: &Fields<'_>) -> Result<(), ModelError> {
    let nested: Vec<&str> = parameters
        .keys()
        .filter(|key| parameters.get(key).is_some_and(Value::is_object))
        .collect();
    if nested.is_empty() {
        return Ok(());
    }
    Err(ModelError::Unsupported {
        path: parameters.path().to_path_buf(),
        what: format!(
            "per-layer-type RoPE parameters (`rope_parameters` holds objects for {}); expected \
             a single object with `rope_type` and `rope_theta`",
            nested.join(", ")
        ),
    })
}

fn read_scaling(
    parameters: &Fields<'_>,
    rope_type: &str,
) -> Result<Option<RopeScaling>, ModelError> {
    if let Some(factor) = parameters.optional_f64("partial_rotary_factor")? {
        check_full_rotary(parameters, factor)?;
    }
    let positive = |key: &str| -> Result<f64, ModelError> {
        let value = parameters.required_f64(key)?;
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(parameters.error(key, format!("is {value}; it must be a positive number")))
        }
    };
    match rope_type {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: positive("factor")?,
        })),
        "llama3" => {
            let low_freq_factor = positive("low_freq_factor")?;
            let high_freq_factor = positive("high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(parameters.error(
                    "high_freq_factor",
                    format!(
                        "is {high_freq_factor}, but it must be greater than low_freq_factor \
                         ({low_freq_factor})"
                    ),
                ));
            }
            let original_max_position_embeddings =
                parameters.required_usize("original_max_position_embeddings")?;
            if original_max_position_embeddings == 0 {
                return Err(parameters.error(
                    "original_max_position_embeddings",
                    "is 0; it must be at least 1",
                ));
            }
            Ok(Some(RopeScaling::Llama3 {
                factor: positive("factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }))
        }
        other => Err(ModelError::Unsupported {
            path: parameters.path().to_path_buf(),
            what: format!(
                "RoPE type \"{other}\" (in `{}`); supported: default, linear, llama3",
                parameters.name("rope_type")
            ),
        }),
    }
}

fn check_full_rotary(fields: &Fields<'_>, factor: f64) -> Result<(), ModelError> {
    if factor == 1.0 {
        return Ok(());
    }
    Err(ModelError::Unsupported {
        path: fields.path().to_path_buf(),
        what: format!(
            "partial rotary embeddings (`{}` is {factor}); only 1.0 is supported",
            fields.name("partial_rotary_factor")
        ),
    })
}

impl std::fmt::Display for LlamaConfig {
    /// A one-paragraph architecture summary, as `fastlora info` prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rope = match &self.rope_scaling {
            None => "plain".to_string(),
            Some(RopeScaling::Linear { factor }) => format!("linear ×{factor}"),
            Some(RopeScaling::Llama3 { factor, .. }) => format!("llama3 ×{factor}"),
        };
        writeln!(
            f,
            "architecture: {} ({} parameters)",
            self.model_type.as_str(),
            self.num_parameters()
        )?;
        writeln!(
            f,
            "layers: {}, hidden: {}, intermediate: {}, vocab: {}",
            self.num_hidden_layers, self.hidden_size, self.intermediate_size, self.vocab_size
        )?;
        writeln!(
            f,
            "attention: {} heads, {} kv heads, head_dim {}, q/k/v bias: {}",
            self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.qkv_bias
        )?;
        write!(
            f,
            "rope: θ = {}, scaling {rope}, max positions {}; tied embeddings: {}",
            self.rope_theta, self.max_position_embeddings, self.tie_word_embeddings
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::checkpoint::Checkpoint;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn fixture_json(relative: &str) -> Map<String, Value> {
        crate::json::read_object(&fixtures().join(relative)).expect("fixture is valid JSON")
    }

    /// Parses `json` as if it were the file `config.json`.
    fn parse(json: &Map<String, Value>) -> Result<LlamaConfig, ModelError> {
        LlamaConfig::from_json_str(
            &Value::Object(json.clone()).to_string(),
            Path::new("config.json"),
        )
    }

    /// Parses llama-tiny's config after `edit`, expecting an error; returns its message.
    fn llama_error(edit: impl FnOnce(&mut Map<String, Value>)) -> (ModelError, String) {
        let mut json = fixture_json("llama-tiny/config.json");
        edit(&mut json);
        let error = parse(&json).expect_err("the edited config must be rejected");
        let message = error.to_string();
        (error, message)
    }

    fn assert_close(actual: &[f64], expected: &[f32], tolerance: f64) {
        assert_eq!(actual.len(), expected.len());
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let e = f64::from(e);
            assert!(
                (a - e).abs() <= tolerance * e.abs(),
                "inv_freq[{i}]: {a} vs transformers' {e}"
            );
        }
    }

    fn reference_inv_freq(model: &str) -> Vec<f32> {
        Checkpoint::open(&fixtures().join(model).join("reference.safetensors"))
            .and_then(|reference| reference.read_f32("rope.inv_freq", &[8]))
            .expect("reference has rope.inv_freq")
    }

    #[test]
    fn llama_tiny_reads_the_same_from_both_transformers_layouts() {
        let v5 = LlamaConfig::load(&fixtures().join("llama-tiny")).unwrap();
        let v4 = LlamaConfig::load(&fixtures().join("llama-tiny/config.v4.json")).unwrap();
        assert_eq!(v5.model_type, ModelType::Llama);
        assert_eq!(
            (v5.vocab_size, v5.hidden_size, v5.intermediate_size),
            (320, 64, 176)
        );
        assert_eq!(
            (
                v5.num_hidden_layers,
                v5.num_attention_heads,
                v5.num_key_value_heads,
                v5.head_dim
            ),
            (3, 4, 2, 16)
        );
        assert_eq!(v5.rms_norm_eps, 1e-5);
        assert_eq!(v5.rope_theta, 10_000.0);
        assert_eq!(
            v5.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32,
            })
        );
        assert_eq!(v5.max_position_embeddings, 128);
        assert!(!v5.tie_word_embeddings);
        assert!(!v5.qkv_bias && !v5.o_bias && !v5.mlp_bias);
        assert_eq!(v5.sliding_window, None);
        assert_eq!(
            (
                v5.bos_token_id,
                v5.eos_token_ids.as_slice(),
                v5.pad_token_id
            ),
            (Some(0), [0].as_slice(), Some(3))
        );
        assert_eq!(v5.torch_dtype.as_deref(), Some("float32"));
        assert_eq!(
            LlamaConfig {
                raw: Value::Null,
                ..v4
            },
            LlamaConfig {
                raw: Value::Null,
                ..v5
            }
        );
    }

    #[test]
    fn llama3_inv_freq_matches_transformers() {
        let expected = reference_inv_freq("llama-tiny");
        for file in ["config.json", "config.v4.json"] {
            let config = LlamaConfig::load(&fixtures().join("llama-tiny").join(file)).unwrap();
            assert_close(&config.inv_freq(), &expected, 1e-6);
        }
        // The fixture's README: #0 unchanged, #1 smoothed, #2..7 divided by 8.
        let config = LlamaConfig::load(&fixtures().join("llama-tiny")).unwrap();
        let plain = LlamaConfig {
            rope_scaling: None,
            ..config.clone()
        }
        .inv_freq();
        let scaled = config.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        assert!(scaled[1] < plain[1] && scaled[1] > plain[1] / 8.0);
        for i in 2..8 {
            assert!((scaled[i] - plain[i] / 8.0).abs() <= 1e-15 * plain[i]);
        }
    }

    #[test]
    fn qwen2_tiny_has_qkv_biases_tied_embeddings_and_default_rope() {
        let expected = reference_inv_freq("qwen2-tiny");
        for file in ["config.json", "config.v4.json"] {
            let config = LlamaConfig::load(&fixtures().join("qwen2-tiny").join(file)).unwrap();
            assert_eq!(config.model_type, ModelType::Qwen2);
            assert!(config.qkv_bias && !config.o_bias && !config.mlp_bias);
            assert!(config.tie_word_embeddings);
            assert_eq!(config.rope_theta, 1e6);
            assert_eq!(config.rope_scaling, None);
            assert_eq!(config.head_dim, 16);
            assert_eq!(config.sliding_window, None);
            assert_eq!(config.rms_norm_eps, 1e-6);
            assert_close(&config.inv_freq(), &expected, 1e-6);
        }
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let mut json = fixture_json("qwen2-tiny/config.v4.json");
        json.insert(
            "rope_scaling".into(),
            json!({"type": "linear", "factor": 4.0}),
        );
        let scaled = parse(&json).unwrap();
        assert_eq!(
            scaled.rope_scaling,
            Some(RopeScaling::Linear { factor: 4.0 })
        );
        let plain = LlamaConfig {
            rope_scaling: None,
            ..scaled.clone()
        };
        for (s, p) in scaled.inv_freq().iter().zip(plain.inv_freq()) {
            assert_eq!(*s, p / 4.0);
        }
    }

    /// The number of elements stored in a checkpoint.
    fn stored_parameters(model: &str) -> usize {
        let checkpoint = Checkpoint::open(&fixtures().join(model)).unwrap();
        checkpoint
            .names()
            .map(|name| checkpoint.shape(name).unwrap().iter().product::<usize>())
            .sum()
    }

    #[test]
    fn num_parameters_counts_what_transformers_stores() {
        let llama = LlamaConfig::load(&fixtures().join("llama-tiny")).unwrap();
        // `total_parameters` of the sharded fixture's index, written by transformers.
        assert_eq!(llama.num_parameters(), 179_648);
        assert_eq!(llama.num_parameters(), stored_parameters("llama-tiny"));
        // Tied: the checkpoint has no lm_head, and transformers counts the shared matrix once.
        let qwen2 = LlamaConfig::load(&fixtures().join("qwen2-tiny")).unwrap();
        assert_eq!(qwen2.num_parameters(), stored_parameters("qwen2-tiny"));
    }

    #[test]
    fn attention_bias_is_on_all_four_llama_projections() {
        let mut json = fixture_json("llama-tiny/config.json");
        json.insert("attention_bias".into(), json!(true));
        json.insert("mlp_bias".into(), json!(true));
        let config = parse(&json).unwrap();
        assert!(config.qkv_bias && config.o_bias && config.mlp_bias);
        let unbiased = LlamaConfig::load(&fixtures().join("llama-tiny")).unwrap();
        let (hidden, kv_width, intermediate) = (64, 32, 176);
        let attention_biases = hidden + 2 * kv_width + hidden;
        let mlp_biases = 2 * intermediate + hidden;
        let biases = 3 * (attention_biases + mlp_biases);
        assert_eq!(config.num_parameters(), unbiased.num_parameters() + biases);
    }

    #[test]
    fn mistral_keeps_its_sliding_window_and_has_no_biases() {
        let mut json = fixture_json("llama-tiny/config.v4.json");
        json.insert("model_type".into(), json!("mistral"));
        json.insert("attention_bias".into(), json!(true));
        json.insert("sliding_window".into(), json!(4096));
        json.insert("eos_token_id".into(), json!([1, 2]));
        json.remove("head_dim");
        json.remove("num_key_value_heads");
        let config = parse(&json).unwrap();
        assert_eq!(config.model_type, ModelType::Mistral);
        assert!(!config.qkv_bias && !config.o_bias);
        assert_eq!(config.sliding_window, Some(4096));
        assert_eq!(config.eos_token_ids, vec![1, 2]);
        assert_eq!((config.head_dim, config.num_key_value_heads), (16, 4));
    }

    #[test]
    fn qwen2_sliding_window_counts_only_when_enabled() {
        let mut json = fixture_json("qwen2-tiny/config.json");
        json.insert("sliding_window".into(), json!(64));
        assert_eq!(parse(&json).unwrap().sliding_window, None);
        json.insert("use_sliding_window".into(), json!(true));
        assert_eq!(parse(&json).unwrap().sliding_window, Some(64));
    }

    #[test]
    fn negative_token_ids_read_as_absent() {
        let mut json = fixture_json("llama-tiny/config.json");
        json.insert("pad_token_id".into(), json!(-1));
        assert_eq!(parse(&json).unwrap().pad_token_id, None);
    }

    #[test]
    fn malformed_json_reports_file_line_and_column() {
        let text = "{\n  \"model_type\": \"llama\",\n  \"hidden_size\": 64,,\n}";
        let error =
            LlamaConfig::from_json_str(text, Path::new("/models/x/config.json")).unwrap_err();
        assert!(
            matches!(
                error,
                ModelError::Json {
                    line: 3,
                    column: 21,
                    ..
                }
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with("/models/x/config.json:3:21: malformed JSON"),
            "{message}"
        );
    }

    #[test]
    fn a_json_array_is_not_a_config() {
        let error = LlamaConfig::from_json_str("[1, 2]", Path::new("config.json")).unwrap_err();
        assert!(matches!(error, ModelError::Json { .. }));
        assert!(
            error.to_string().contains("expected a JSON object"),
            "{error}"
        );
    }

    #[test]
    fn missing_config_file_is_an_io_error_naming_it() {
        let error = LlamaConfig::load(Path::new("/nonexistent/model")).unwrap_err();
        assert!(matches!(error, ModelError::Io { .. }));
        assert!(error.to_string().contains("/nonexistent/model"), "{error}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let (error, message) = llama_error(|json| {
            json.remove("hidden_size");
        });
        assert!(matches!(error, ModelError::ConfigField { .. }));
        assert_eq!(
            message,
            "config.json: field `hidden_size` is missing; expected a non-negative integer"
        );
    }

    #[test]
    fn field_of_the_wrong_type_shows_the_value() {
        let (_, message) = llama_error(|json| {
            json.insert("num_hidden_layers".into(), json!("3"));
        });
        assert_eq!(
            message,
            "config.json: field `num_hidden_layers` must be a non-negative integer, found a \
             string (\"3\")"
        );
    }

    #[test]
    fn heads_must_divide_the_hidden_size_when_head_dim_is_not_given() {
        let (error, message) = llama_error(|json| {
            json.remove("head_dim");
            json.insert("num_attention_heads".into(), json!(5));
        });
        assert!(
            matches!(error, ModelError::ConfigField { ref field, .. } if field == "num_attention_heads")
        );
        assert!(
            message.contains("does not divide hidden_size (64)"),
            "{message}"
        );
    }

    #[test]
    fn key_value_heads_must_divide_query_heads() {
        let (_, message) = llama_error(|json| {
            json.insert("num_key_value_heads".into(), json!(3));
        });
        assert!(
            message.contains("field `num_key_value_heads` is 3"),
            "{message}"
        );
        assert!(message.contains("num_attention_heads (4)"), "{message}");
    }

    #[test]
    fn zero_sizes_are_rejected() {
        let (_, message) = llama_error(|json| {
            json.insert("intermediate_size".into(), json!(0));
        });
        assert!(
            message.contains("field `intermediate_size` is 0"),
            "{message}"
        );
    }

    #[test]
    fn odd_head_dim_is_rejected() {
        let (_, message) = llama_error(|json| {
            json.insert("head_dim".into(), json!(15));
        });
        assert!(message.contains("field `head_dim` is 15"), "{message}");
    }

    #[test]
    fn unsupported_rope_type_is_named() {
        let (error, message) = llama_error(|json| {
            json.insert(
                "rope_parameters".into(),
                json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
            );
        });
        assert!(matches!(error, ModelError::Unsupported { .. }));
        assert_eq!(
            message,
            "config.json: unsupported RoPE type \"yarn\" (in `rope_parameters.rope_type`); \
             supported: default, linear, llama3"
        );

        let mut v4 = fixture_json("llama-tiny/config.v4.json");
        v4.insert(
            "rope_scaling".into(),
            json!({"type": "dynamic", "factor": 2.0}),
        );
        let message = parse(&v4).unwrap_err().to_string();
        assert!(
            message.contains("RoPE type \"dynamic\" (in `rope_scaling.rope_type`)"),
            "{message}"
        );
    }

    #[test]
    fn llama3_scaling_needs_all_its_parameters() {
        let mut v4 = fixture_json("llama-tiny/config.v4.json");
        v4.insert(
            "rope_scaling".into(),
            json!({"rope_type": "llama3", "factor": 8.0}),
        );
        let message = parse(&v4).unwrap_err().to_string();
        assert_eq!(
            message,
            "config.json: field `rope_scaling.low_freq_factor` is missing; expected a number"
        );
        let (_, message) = llama_error(|json| {
            json["rope_parameters"]["high_freq_factor"] = json!(1.0);
        });
        assert!(
            message.contains("field `rope_parameters.high_freq_factor` is 1"),
            "{message}"
        );
    }

    #[test]
    fn rope_scaling_without_a_type_is_rejected() {
        let mut v4 = fixture_json("llama-tiny/config.v4.json");
        v4.insert("rope_scaling".into(), json!({"factor": 8.0}));
        let message = parse(&v4).unwrap_err().to_string();
        assert!(
            message.contains("field `rope_scaling.rope_type` is missing"),
            "{message}"
        );
    }

    #[test]
    fn other_architectures_and_activations_are_unsupported() {
        let (_, message) = llama_error(|json| {
            json.insert("model_type".into(), json!("gemma"));
        });
        assert_eq!(
            message,
            "config.json: unsupported model_type \"gemma\"; supported: llama, mistral, qwen2"
        );
        let (_, message) = llama_error(|json| {
            json.insert("hidden_act".into(), json!("gelu"));
        });
        assert!(message.contains("hidden_act \"gelu\""), "{message}");
        let (_, message) = llama_error(|json| {
            json.insert(
                "quantization_config".into(),
                json!({"quant_method": "bitsandbytes"}),
            );
        });
        assert!(message.contains("pre-quantized checkpoint"), "{message}");
        let (_, message) = llama_error(|json| {
            json["rope_parameters"]["partial_rotary_factor"] = json!(0.5);
        });
        assert!(
            message.contains("`rope_parameters.partial_rotary_factor` is 0.5"),
            "{message}"
        );
    }

    #[test]
    fn per_layer_type_rope_parameters_are_unsupported() {
        let (_, message) = llama_error(|json| {
            json.insert(
                "rope_parameters".into(),
                json!({"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            );
        });
        assert!(
            message.contains("per-layer-type RoPE parameters"),
            "{message}"
        );
        assert!(message.contains("full_attention"), "{message}");
    }

    #[test]
    fn hf_json_round_trips_in_the_original_layout() {
        for (file, dtype_key, stale_key) in [
            ("config.json", "dtype", "torch_dtype"),
            ("config.v4.json", "torch_dtype", "dtype"),
        ] {
            let path = fixtures().join("llama-tiny").join(file);
            let config = LlamaConfig::load(&path).unwrap();
            let exported = config.to_hf_json(FloatDtype::BF16);
            assert_eq!(exported[dtype_key], "bfloat16");
            assert!(exported.get(stale_key).is_none());
            assert_eq!(exported["architectures"], json!(["LlamaForCausalLM"]));
            assert_eq!(
                exported.get("rope_parameters").is_some(),
                file == "config.json",
                "{file} keeps its RoPE layout"
            );
            let reread = LlamaConfig::from_json_str(&exported.to_string(), &path).unwrap();
            assert_eq!(reread.torch_dtype.as_deref(), Some("bfloat16"));
            let same_but_dtype = LlamaConfig {
                torch_dtype: Some("bfloat16".to_string()),
                raw: reread.raw.clone(),
                ..config
            };
            assert_eq!(reread, same_but_dtype);
        }
    }

    #[test]
    fn hf_json_writes_changed_fields_and_keeps_unknown_keys() {
        let config = LlamaConfig::load(&fixtures().join("qwen2-tiny")).unwrap();
        let untied = LlamaConfig {
            tie_word_embeddings: false,
            eos_token_ids: vec![0, 2],
            ..config
        };
        let exported = untied.to_hf_json(FloatDtype::F32);
        assert_eq!(exported["tie_word_embeddings"], false);
        assert_eq!(exported["eos_token_id"], json!([0, 2]));
        assert_eq!(
            exported["layer_types"],
            json!(["full_attention", "full_attention"])
        );
        assert_eq!(
            exported["rope_parameters"],
            json!({"rope_type": "default", "rope_theta": 1e6})
        );
        let reread = LlamaConfig::from_json_str(&exported.to_string(), Path::new("x")).unwrap();
        assert!(!reread.tie_word_embeddings);
        assert!(reread.qkv_bias);
    }

    #[test]
    fn hf_json_without_a_dtype_key_writes_torch_dtype() {
        let mut json = fixture_json("qwen2-tiny/config.v4.json");
        json.remove("torch_dtype");
        let exported = parse(&json).unwrap().to_hf_json(FloatDtype::F16);
        assert_eq!(exported["torch_dtype"], "float16");
        assert_eq!(exported["rope_scaling"], Value::Null);
        assert_eq!(exported["rope_theta"], 1e6);
    }
}
