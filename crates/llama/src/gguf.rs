//! Llama-family models stored as GGUF (llama.cpp's format): the config from the file's
//! metadata, the weights under their Hugging Face names (dequantized to f32, or the
//! projections' quantized blocks kept packed), and the tokenizer (see
//! [`crate::LlamaTokenizer::from_gguf`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fastlora_gguf::{GgmlType, GgufError, GgufErrorKind, GgufFile, TensorInfo};
use lora_layers::PackedWeight;
use serde_json::{Map, Value, json};

use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::model::WeightSource;

/// Whether `path` names a GGUF file (its extension is `gguf`, in any case).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Opens a GGUF file.
///
/// # Errors
///
/// [`ModelError::Io`] naming the file if it cannot be opened or memory-mapped, or
/// [`ModelError::Gguf`] naming it if it is not a valid GGUF file (truncated, corrupt, of an
/// unsupported version).
pub fn open_gguf(path: &Path) -> Result<GgufFile, ModelError> {
    GgufFile::open(path).map_err(|e| gguf_error(&e))
}

/// A GGUF library error as a [`ModelError`]: [`ModelError::Io`] when the file could not be
/// read, [`ModelError::Gguf`] for anything about its contents (the message names the key or
/// tensor at fault).
pub(crate) fn gguf_error(error: &GgufError) -> ModelError {
    match error.kind() {
        // The kind borrows its `io::Error`, which cannot be cloned: keep its kind and message.
        GgufErrorKind::Io { action, source } => ModelError::io(
            action,
            error.path(),
            std::io::Error::new(source.kind(), source.to_string()),
        ),
        kind => ModelError::gguf(error.path(), kind.to_string()),
    }
}

fn optional_u32(file: &GgufFile, key: &str) -> Result<Option<u32>, ModelError> {
    match file.get(key) {
        None => Ok(None),
        Some(_) => file.get_u32(key).map(Some).map_err(|e| gguf_error(&e)),
    }
}

fn required_u32(file: &GgufFile, key: &str) -> Result<u32, ModelError> {
    file.get_u32(key).map_err(|e| gguf_error(&e))
}

/// A float of the metadata; an `f32` is widened through its shortest decimal form, so that
/// `1e-5` stays `1e-5` in the exported `config.json`.
fn optional_float(file: &GgufFile, key: &str) -> Result<Option<f64>, ModelError> {
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    if let Some(x) = value.as_f32() {
        return Ok(Some(x.to_string().parse::<f64>().unwrap_or(f64::from(x))));
    }
    file.get_f64(key).map(Some).map_err(|e| gguf_error(&e))
}

/// The HF `config.json` equivalent of a GGUF file's metadata.
///
/// Read: `{arch}.block_count`, `.embedding_length`, `.feed_forward_length`,
/// `.attention.head_count`, `.attention.head_count_kv` (default: `head_count`),
/// `.rope.freq_base` (default 10000), `.attention.layer_norm_rms_epsilon`, `.context_length`,
/// `.vocab_size` (else the length of `tokenizer.ggml.tokens`, else the rows of
/// `token_embd.weight`), `.rope.dimension_count` (the head dimension), `.rope.scaling.type` /
/// `.rope.scaling.factor` (linear only), and `tokenizer.ggml.{bos,eos,padding}_token_id`.
/// Embeddings are tied when `output.weight` is absent.
///
/// # Errors
///
/// - [`ModelError::Unsupported`] for an architecture other than `llama`, or a RoPE scaling
///   other than `none`/`linear`;
/// - [`ModelError::Gguf`] (naming the GGUF key) for missing or mistyped metadata.
pub fn gguf_config_json(file: &GgufFile) -> Result<Value, ModelError> {
    let path = file.path();
    let arch = file.architecture().map_err(|e| gguf_error(&e))?;
    if arch != "llama" {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            what: format!("GGUF architecture `{arch}` (only `llama` is implemented)"),
        });
    }
    let key = |suffix: &str| format!("{arch}.{suffix}");
    let layers = required_u32(file, &key("block_count"))?;
    let hidden = required_u32(file, &key("embedding_length"))?;
    let ffn = required_u32(file, &key("feed_forward_length"))?;
    let heads = required_u32(file, &key("attention.head_count"))?;
    let kv_heads = optional_u32(file, &key("attention.head_count_kv"))?.unwrap_or(heads);
    let theta = optional_float(file, &key("rope.freq_base"))?.unwrap_or(10000.0);
    let eps_key = key("attention.layer_norm_rms_epsilon");
    let eps = optional_float(file, &eps_key)?.ok_or_else(|| {
        ModelError::gguf(
            path,
            format!("metadata key `{eps_key}` is missing (the RMSNorm epsilon)"),
        )
    })?;
    let context = optional_u32(file, &key("context_length"))?;
    let vocab = match optional_u32(file, &key("vocab_size"))? {
        Some(v) => Some(v as usize),
        None => match file.get_str_array("tokenizer.ggml.tokens") {
            Ok(tokens) => Some(tokens.len()),
            Err(_) => file.tensor_info("token_embd.weight").map(|t| t.shape()[0]),
        },
    };
    let vocab = vocab.ok_or_else(|| {
        ModelError::gguf(
            path,
            format!(
                "metadata key `{}` is missing, and neither tokenizer.ggml.tokens nor token_embd.weight gives it",
                key("vocab_size")
            ),
        )
    })?;

    let mut config = Map::new();
    config.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    config.insert("model_type".into(), json!("llama"));
    config.insert("torch_dtype".into(), json!("float32"));
    config.insert("vocab_size".into(), json!(vocab));
    config.insert("hidden_size".into(), json!(hidden));
    config.insert("intermediate_size".into(), json!(ffn));
    config.insert("num_hidden_layers".into(), json!(layers));
    config.insert("num_attention_heads".into(), json!(heads));
    config.insert("num_key_value_heads".into(), json!(kv_heads));
    config.insert("rms_norm_eps".into(), json!(eps));
    config.insert("rope_theta".into(), json!(theta));
    config.insert("hidden_act".into(), json!("silu"));
    config.insert(
        "attention_bias".into(),
        json!(file.tensor_info("blk.0.attn_q.bias").is_some()),
    );
    config.insert("mlp_bias".into(), json!(false));
    if let Some(context) = context {
        config.insert("max_position_embeddings".into(), json!(context));
    }
    if let Some(dim) = optional_u32(file, &key("rope.dimension_count"))? {
        config.insert("head_dim".into(), json!(dim));
    }
    config.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor_info("output.weight").is_none()),
    );
    let scaling_key = key("rope.scaling.type");
    match file.get(&scaling_key) {
        None => {}
        Some(_) => {
            let kind = file.get_str(&scaling_key).map_err(|e| gguf_error(&e))?;
            match kind {
                "none" => {}
                "linear" => {
                    let factor_key = key("rope.scaling.factor");
                    let factor = optional_float(file, &factor_key)?.ok_or_else(|| {
                        ModelError::gguf(
                            path,
                            format!(
                                "metadata key `{factor_key}` is missing for linear RoPE scaling"
                            ),
                        )
                    })?;
                    config.insert(
                        "rope_scaling".into(),
                        json!({"rope_type": "linear", "type": "linear", "factor": factor}),
                    );
                }
                other => {
                    return Err(ModelError::Unsupported {
                        path: path.to_path_buf(),
                        what: format!(
                            "GGUF RoPE scaling `{other}` ({scaling_key}; only `linear` is implemented)"
                        ),
                    });
                }
            }
        }
    }
    for (hf, gguf) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = optional_u32(file, gguf)? {
            config.insert(hf.into(), json!(id));
        }
    }
    Ok(Value::Object(config))
}

/// The [`LlamaConfig`] of a GGUF file: [`gguf_config_json`] parsed and validated as a
/// `config.json` would be (errors name the GGUF file).
///
/// # Errors
///
/// As [`gguf_config_json`] and [`LlamaConfig::from_json_str`].
pub fn gguf_config(file: &GgufFile) -> Result<LlamaConfig, ModelError> {
    let json = gguf_config_json(file)?;
    LlamaConfig::from_json_str(&json.to_string(), file.path())
}

/// The GGUF name of HF tensor `name`, and for the query/key projections the number of heads
/// whose RoPE row permutation must be undone.
fn gguf_name(name: &str, config_heads: (usize, usize)) -> Option<(String, Option<usize>)> {
    let simple = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(simple) = simple {
        return Some((simple.to_string(), None));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (target, heads) = match module {
        "self_attn.q_proj" => ("attn_q", Some(config_heads.0)),
        "self_attn.k_proj" => ("attn_k", Some(config_heads.1)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        _ => return None,
    };
    Some((format!("blk.{index}.{target}.{kind}"), heads))
}

/// Undoes llama.cpp's RoPE row permutation of a query or key projection (weight or bias).
///
/// `convert_hf_to_gguf.py` stores `w.reshape(n_head, 2, d/2, *rest).swapaxes(1, 2)` (with
/// `d = rows / n_head`) so that rotated pairs are adjacent rows; this returns the HF layout,
/// `w.reshape(n_head, d/2, 2, *rest).swapaxes(1, 2)`. `values` is row-major with `rows` rows
/// of `cols` values each (`cols = 1` for a bias).
///
/// # Panics
///
/// If `rows` is not a multiple of `2 * n_head`, or `values.len() != rows * cols`.
pub fn unpermute_rope_rows(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    unpermute_rows(values, rows, cols, n_head)
}

/// [`unpermute_rope_rows`] for rows of any element: f32 values, or the bytes of whole
/// quantized blocks (a row of a block-quantized tensor is whole blocks, so rows move intact).
fn unpermute_rows<T: Copy>(values: &[T], rows: usize, row_len: usize, n_head: usize) -> Vec<T> {
    assert!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "rows {rows} not divisible by 2 * {n_head}"
    );
    assert_eq!(values.len(), rows * row_len);
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(values.len());
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                // HF row (h, j, i) is stored at GGUF row (h, i, j).
                let gguf_row = h * 2 * half + i * 2 + j;
                out.extend_from_slice(&values[gguf_row * row_len..(gguf_row + 1) * row_len]);
            }
        }
    }
    out
}

/// The weights of a GGUF file under their HF names: a [`WeightSource`] for
/// [`crate::build_model`].
///
/// Tensors are dequantized to f32, except, after
/// [`GgufWeights::with_quantized_projections`], the quantized blocks of the seven projections
/// of each decoder layer, which stay packed (a [`PackedWeight`] holding the blocks, decoded by
/// [`fastlora_gguf::dequantize`]).
#[derive(Debug)]
pub struct GgufWeights {
    file: GgufFile,
    heads: (usize, usize),
    quantized_projections: bool,
}

impl GgufWeights {
    /// Weights of `file` for a model with `config`'s head counts (needed to undo the RoPE
    /// permutation of the query and key projections), all dequantized to f32.
    pub fn new(file: GgufFile, config: &LlamaConfig) -> Self {
        Self {
            file,
            heads: (config.num_attention_heads, config.num_key_value_heads),
            quantized_projections: false,
        }
    }

    /// Whether to keep the quantized blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) of the
    /// projection weights (`q/k/v/o_proj`, `gate/up/down_proj`) packed in memory, as QLoRA keeps
    /// its base: [`WeightSource::packed`] then hands them out. Embeddings, norms, the LM head,
    /// biases and F32/F16/BF16 tensors are read dense either way.
    pub fn with_quantized_projections(mut self, quantized: bool) -> Self {
        self.quantized_projections = quantized;
        self
    }

    /// The GGUF file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The GGUF tensor holding HF tensor `name`, checked against `shape`, with the number of
    /// heads whose RoPE row permutation must be undone; `None` when the file has no such tensor.
    fn lookup(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<(&TensorInfo, Option<usize>)>, ModelError> {
        let path = self.file.path();
        let Some((gguf, heads)) = gguf_name(name, self.heads) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor_info(&gguf) else {
            return Ok(None);
        };
        if info.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                name: format!("{gguf} (for {name})"),
                path: path.to_path_buf(),
                expected: shape.to_vec(),
                found: info.shape().to_vec(),
            });
        }
        if let Some(n_head) = heads {
            let rows = shape[0];
            if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
                return Err(ModelError::Unsupported {
                    path: path.to_path_buf(),
                    what: format!(
                        "tensor `{gguf}`: {rows} rows cannot be split into {n_head} RoPE heads"
                    ),
                });
            }
        }
        Ok(Some((info, heads)))
    }
}

impl WeightSource for GgufWeights {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>, ModelError> {
        let Some((info, heads)) = self.lookup(name, shape)? else {
            return Ok(None);
        };
        let values = self
            .file
            .dequantize_f32(info.name())
            .map_err(|e| gguf_error(&e))?;
        Ok(Some(match heads {
            Some(n_head) => {
                let cols = shape[1..].iter().product::<usize>().max(1);
                unpermute_rope_rows(&values, shape[0], cols, n_head)
            }
            None => values,
        }))
    }

    fn packed(
        &mut self,
        name: &str,
        shape: [usize; 2],
    ) -> Result<Option<Arc<dyn PackedWeight>>, ModelError> {
        if !self.quantized_projections {
            return Ok(None);
        }
        let Some((info, heads)) = self.lookup(name, &shape)? else {
            return Ok(None);
        };
        let ggml_type = info.ggml_type();
        // Float tensors gain little packed; a type this crate cannot decode is left to the
        // dense read, whose error names it.
        if ggml_type.block_size() == 1 || !ggml_type.can_dequantize() {
            return Ok(None);
        }
        let bytes = self
            .file
            .raw_bytes(info.name())
            .map_err(|e| gguf_error(&e))?;
        // A row is whole blocks (checked when the file was opened), so the query/key rows can
        // be put in HF order as bytes, once, instead of after every dequantization.
        let blocks = match heads {
            Some(n_head) => unpermute_rows(bytes, shape[0], bytes.len() / shape[0], n_head),
            None => bytes.to_vec(),
        };
        Ok(Some(Arc::new(GgufPackedWeight {
            tensor: info.name().to_string(),
            ggml_type,
            shape,
            blocks: blocks.into_boxed_slice(),
        })))
    }

    fn location(&self) -> PathBuf {
        self.file.path().to_path_buf()
    }
}

/// A GGUF projection weight kept as its quantized blocks (copied out of the file, so the file
/// can be closed; rows in HF order): its [`PackedWeight::dequantize`] is bit-identical to the
/// dense read of [`GgufWeights`].
struct GgufPackedWeight {
    /// The GGUF tensor it was read from, for debugging output.
    tensor: String,
    ggml_type: GgmlType,
    shape: [usize; 2],
    blocks: Box<[u8]>,
}

impl fmt::Debug for GgufPackedWeight {
    // Not derived: the blocks are megabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufPackedWeight")
            .field("tensor", &self.tensor)
            .field("ggml_type", &self.ggml_type)
            .field("shape", &self.shape)
            .field("bytes", &self.blocks.len())
            .finish()
    }
}

impl PackedWeight for GgufPackedWeight {
    fn shape(&self) -> [usize; 2] {
        self.shape
    }

    fn dequantize(&self) -> Vec<f32> {
        fastlora_gguf::dequantize(self.ggml_type, &self.blocks)
            .expect("GgufWeights::packed keeps whole blocks of decodable types only")
    }

    fn stored_bytes(&self) -> usize {
        self.blocks.len()
    }

    fn format(&self) -> &str {
        self.ggml_type.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build_model;
    use burn::backend::NdArray;
    use burn::prelude::*;
    use half::f16;

    type B = NdArray<f32>;

    enum Meta {
        U32(u32),
        F32(f32),
        Str(&'static str),
    }

    struct TensorSpec {
        name: &'static str,
        shape: Vec<usize>,
        ggml_type: GgmlType,
        bytes: Vec<u8>,
    }

    fn write_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A GGUF v3 file: header, metadata, tensor infos, then the data, 32-byte aligned.
    fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (key, value) in meta {
            write_str(&mut out, key);
            match value {
                Meta::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::Str(v) => {
                    out.extend(8u32.to_le_bytes());
                    write_str(&mut out, v);
                }
            }
        }
        let mut data = Vec::new();
        for tensor in tensors {
            write_str(&mut out, tensor.name);
            out.extend((tensor.shape.len() as u32).to_le_bytes());
            for &dim in tensor.shape.iter().rev() {
                out.extend((dim as u64).to_le_bytes());
            }
            out.extend(tensor.ggml_type.id().to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            data.extend(&tensor.bytes);
            data.resize(data.len().next_multiple_of(32), 0);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(data);
        out
    }

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// `values` values of `ggml_type` with random quants and small positive f16 scales (or
    /// random f32/f16 values around `center`).
    fn random_data(ggml_type: GgmlType, values: usize, center: f32, seed: &mut u64) -> Vec<u8> {
        let small = |seed: &mut u64| (xorshift(seed) % 1000) as f32 * 1e-4 - 0.05;
        if ggml_type == GgmlType::F32 {
            return (0..values)
                .flat_map(|_| (center + small(seed)).to_le_bytes())
                .collect();
        }
        // Offsets of the f16 scales (and minimums) in a block.
        let scales: &[usize] = match ggml_type {
            GgmlType::Q6_K => &[208],
            GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            _ => &[0],
        };
        let (block, size) = (ggml_type.block_size(), ggml_type.type_size());
        let mut out = Vec::new();
        for _ in 0..values / block as usize {
            let mut bytes: Vec<u8> = (0..size).map(|_| xorshift(seed) as u8).collect();
            for &at in scales {
                let scale = f16::from_f32(0.001 + small(seed).abs() * 0.02);
                bytes[at..at + 2].copy_from_slice(&scale.to_bits().to_le_bytes());
            }
            out.extend(bytes);
        }
        out
    }

    /// A one-layer Llama (hidden 256, 4 heads of 64, 2 K/V heads, vocab 8) whose projections
    /// are of six block types and F16, `up` of type `up_type`.
    fn tiny_llama(up_type: GgmlType, with_block_count: bool) -> Vec<u8> {
        let mut meta = vec![
            ("general.architecture", Meta::Str("llama")),
            ("llama.embedding_length", Meta::U32(256)),
            ("llama.feed_forward_length", Meta::U32(256)),
            ("llama.attention.head_count", Meta::U32(4)),
            ("llama.attention.head_count_kv", Meta::U32(2)),
            ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
            ("llama.context_length", Meta::U32(16)),
            ("llama.vocab_size", Meta::U32(8)),
        ];
        if with_block_count {
            meta.push(("llama.block_count", Meta::U32(1)));
        }
        let mut seed = 0x5eed_u64;
        let mut tensor = |name, shape: Vec<usize>, ggml_type, center| {
            let n = shape.iter().product();
            TensorSpec {
                name,
                ggml_type,
                bytes: random_data(ggml_type, n, center, &mut seed),
                shape,
            }
        };
        let tensors = vec![
            tensor("token_embd.weight", vec![8, 256], GgmlType::F32, 0.0),
            tensor("output_norm.weight", vec![256], GgmlType::F32, 1.0),
            tensor("blk.0.attn_norm.weight", vec![256], GgmlType::F32, 1.0),
            tensor("blk.0.ffn_norm.weight", vec![256], GgmlType::F32, 1.0),
            tensor("blk.0.attn_q.weight", vec![256, 256], GgmlType::Q4_K, 0.0),
            tensor("blk.0.attn_k.weight", vec![128, 256], GgmlType::Q6_K, 0.0),
            tensor("blk.0.attn_v.weight", vec![128, 256], GgmlType::Q8_0, 0.0),
            tensor(
                "blk.0.attn_output.weight",
                vec![256, 256],
                GgmlType::Q5_K,
                0.0,
            ),
            tensor("blk.0.ffn_gate.weight", vec![256, 256], GgmlType::Q4_0, 0.0),
            tensor("blk.0.ffn_up.weight", vec![256, 256], up_type, 0.0),
            tensor("blk.0.ffn_down.weight", vec![256, 256], GgmlType::F16, 0.0),
        ];
        gguf_bytes(&meta, &tensors)
    }

    fn load(bytes: &[u8], quantized: bool) -> Result<crate::LlamaForCausalLm<B>, ModelError> {
        let file = GgufFile::from_bytes(bytes.to_vec(), "tiny.gguf").map_err(|e| gguf_error(&e))?;
        let config = gguf_config(&file)?;
        let mut weights = GgufWeights::new(file, &config).with_quantized_projections(quantized);
        build_model(&config, &mut weights, &Default::default())
    }

    #[test]
    fn packed_projections_give_the_dense_model_exactly() {
        let bytes = tiny_llama(GgmlType::Q4_1, true);
        let (dense, packed) = (load(&bytes, false).unwrap(), load(&bytes, true).unwrap());
        let formats: Vec<Option<&str>> = packed.layers[0]
            .projections()
            .iter()
            .map(|p| p.weight.as_packed().map(|w| w.weight().format()))
            .collect();
        assert_eq!(
            formats,
            [
                Some("Q4_K"),
                Some("Q6_K"),
                Some("Q8_0"),
                Some("Q5_K"),
                Some("Q4_0"),
                Some("Q4_1"),
                None, // F16 stays dense
            ]
        );
        assert!(
            dense.layers[0]
                .projections()
                .iter()
                .all(|p| p.weight.as_dense().is_some())
        );
        // The query/key rows (permuted as bytes at load) come out in HF order, as the dense
        // read undoes the permutation on f32 values.
        for ((name, d), (_, p)) in dense.base_tensors().into_iter().zip(packed.base_tensors()) {
            assert_eq!(d, p, "{name}");
        }
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![1i64, 5, 2, 7], [1, 4]),
            &Default::default(),
        );
        let (d, p) = (dense.forward(ids.clone(), None), packed.forward(ids, None));
        assert_eq!(d.into_data(), p.into_data());
    }

    #[test]
    fn gguf_failures_are_gguf_errors_naming_the_file() {
        let gguf_message = |error: ModelError| match error {
            ModelError::Gguf { path, message } => {
                assert_eq!(path, Path::new("tiny.gguf"));
                message
            }
            other => panic!("not a GGUF error: {other}"),
        };
        // A missing metadata key.
        let message = gguf_message(load(&tiny_llama(GgmlType::Q4_1, false), false).unwrap_err());
        assert!(
            message.contains("`llama.block_count` is missing"),
            "{message}"
        );
        // A truncated file, cut in the metadata, the tensor infos or the data.
        let bytes = tiny_llama(GgmlType::Q4_1, true);
        for cut in [10, 200, 700, bytes.len() - 1] {
            let message = gguf_message(load(&bytes[..cut], false).unwrap_err());
            let explained = ["truncated", "cannot fit", "past the end"];
            assert!(
                explained.iter().any(|m| message.contains(m)),
                "{cut}: {message}"
            );
        }
        // A projection of a type that cannot be decoded: kept packed or not, the dense read
        // reports it.
        for quantized in [false, true] {
            let error = load(&tiny_llama(GgmlType::Q5_0, true), quantized).unwrap_err();
            let text = error.to_string();
            let message = gguf_message(error);
            assert!(
                message.contains("blk.0.ffn_up.weight") && message.contains("Q5_0"),
                "{message}"
            );
            assert!(text.starts_with("tiny.gguf: GGUF: "), "{text}");
        }
    }

    /// llama.cpp's permutation, written independently:
    /// `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
    fn permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let half = rows / n_head / 2;
        let mut out = Vec::with_capacity(w.len());
        // Output index order is (h, i, j, c) with source element (h, j, i, c).
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src = ((h * 2 + j) * half + i) * cols;
                    out.extend_from_slice(&w[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let (rows, cols, n_head) = (12, 3, 2);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let permuted = permute(&w, rows, cols, n_head);
        assert_ne!(permuted, w);
        assert_eq!(unpermute_rope_rows(&permuted, rows, cols, n_head), w);
        // Hand-checked: head 0 of d = 6 stores HF rows [0, 3, 1, 4, 2, 5].
        let rows_of = |v: &[f32]| {
            v.chunks(cols)
                .map(|r| r[0] as usize / cols)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            rows_of(&permuted),
            vec![0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
        );
        // A bias (cols = 1).
        let b: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(unpermute_rope_rows(&permute(&b, 8, 1, 1), 8, 1, 1), b);
    }

    #[test]
    fn hf_names_map_to_gguf_names() {
        let heads = (9, 3);
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight", None),
            ("model.norm.weight", "output_norm.weight", None),
            ("lm_head.weight", "output.weight", None),
            (
                "model.layers.3.self_attn.q_proj.weight",
                "blk.3.attn_q.weight",
                Some(9),
            ),
            (
                "model.layers.3.self_attn.k_proj.bias",
                "blk.3.attn_k.bias",
                Some(3),
            ),
            (
                "model.layers.3.self_attn.v_proj.weight",
                "blk.3.attn_v.weight",
                None,
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                "blk.3.attn_output.weight",
                None,
            ),
            (
                "model.layers.12.mlp.gate_proj.weight",
                "blk.12.ffn_gate.weight",
                None,
            ),
            (
                "model.layers.12.mlp.up_proj.weight",
                "blk.12.ffn_up.weight",
                None,
            ),
            (
                "model.layers.12.mlp.down_proj.weight",
                "blk.12.ffn_down.weight",
                None,
            ),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
                None,
            ),
            (
                "model.layers.0.post_attention_layernorm.weight",
                "blk.0.ffn_norm.weight",
                None,
            ),
        ];
        for (hf, gguf, n) in cases {
            assert_eq!(gguf_name(hf, heads), Some((gguf.to_string(), n)), "{hf}");
        }
        assert_eq!(gguf_name("model.layers.0.foo.weight", heads), None);
    }
}
