//! Llama-family models stored as GGUF (llama.cpp's format): the config from the file's
//! metadata, the weights dequantized to f32 under their Hugging Face names, and the tokenizer
//! (see [`crate::LlamaTokenizer::from_gguf`]).

use std::path::{Path, PathBuf};

use fastlora_gguf::{GgufError, GgufFile};
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
/// [`ModelError::Io`] naming the file if it cannot be opened or is not a valid GGUF file.
pub fn open_gguf(path: &Path) -> Result<GgufFile, ModelError> {
    GgufFile::open(path).map_err(|e| gguf_error("open GGUF file", path, &e))
}

/// A GGUF library error as a [`ModelError::Io`] (the GGUF error names the file and what is
/// wrong).
pub(crate) fn gguf_error(action: &'static str, path: &Path, error: &GgufError) -> ModelError {
    ModelError::io(
        action,
        path,
        std::io::Error::other(error.kind().to_string()),
    )
}

/// A metadata problem as a [`ModelError::ConfigField`] of the GGUF file.
fn meta_error(file: &GgufFile, key: &str, error: &GgufError) -> ModelError {
    ModelError::field(file.path(), key, error.kind().to_string())
}

fn optional_u32(file: &GgufFile, key: &str) -> Result<Option<u32>, ModelError> {
    match file.get(key) {
        None => Ok(None),
        Some(_) => file
            .get_u32(key)
            .map(Some)
            .map_err(|e| meta_error(file, key, &e)),
    }
}

fn required_u32(file: &GgufFile, key: &str) -> Result<u32, ModelError> {
    file.get_u32(key).map_err(|e| meta_error(file, key, &e))
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
    file.get_f64(key)
        .map(Some)
        .map_err(|e| meta_error(file, key, &e))
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
/// - [`ModelError::ConfigField`] (field = the GGUF key) for missing or mistyped metadata.
pub fn gguf_config_json(file: &GgufFile) -> Result<Value, ModelError> {
    let path = file.path();
    let arch = file
        .architecture()
        .map_err(|e| meta_error(file, "general.architecture", &e))?;
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
    let eps = optional_float(file, &eps_key)?
        .ok_or_else(|| ModelError::field(path, &eps_key, "is missing (the RMSNorm epsilon)"))?;
    let context = optional_u32(file, &key("context_length"))?;
    let vocab = match optional_u32(file, &key("vocab_size"))? {
        Some(v) => Some(v as usize),
        None => match file.get_str_array("tokenizer.ggml.tokens") {
            Ok(tokens) => Some(tokens.len()),
            Err(_) => file.tensor_info("token_embd.weight").map(|t| t.shape()[0]),
        },
    };
    let vocab = vocab.ok_or_else(|| {
        ModelError::field(
            path,
            key("vocab_size"),
            "is missing, and neither tokenizer.ggml.tokens nor token_embd.weight gives it",
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
            let kind = file
                .get_str(&scaling_key)
                .map_err(|e| meta_error(file, &scaling_key, &e))?;
            match kind {
                "none" => {}
                "linear" => {
                    let factor_key = key("rope.scaling.factor");
                    let factor = optional_float(file, &factor_key)?.ok_or_else(|| {
                        ModelError::field(path, &factor_key, "is missing for linear RoPE scaling")
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
    assert!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "rows {rows} not divisible by 2 * {n_head}"
    );
    assert_eq!(values.len(), rows * cols);
    let half = rows / n_head / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                // HF row (h, j, i) is stored at GGUF row (h, i, j).
                let hf_row = h * 2 * half + j * half + i;
                let gguf_row = h * 2 * half + i * 2 + j;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&values[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    out
}

/// The weights of a GGUF file under their HF names, dequantized to f32: a [`WeightSource`]
/// for [`crate::build_model`].
#[derive(Debug)]
pub struct GgufWeights {
    file: GgufFile,
    heads: (usize, usize),
}

impl GgufWeights {
    /// Weights of `file` for a model with `config`'s head counts (needed to undo the RoPE
    /// permutation of the query and key projections).
    pub fn new(file: GgufFile, config: &LlamaConfig) -> Self {
        Self {
            file,
            heads: (config.num_attention_heads, config.num_key_value_heads),
        }
    }

    /// The GGUF file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl WeightSource for GgufWeights {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>, ModelError> {
        let path = self.file.path().to_path_buf();
        let Some((gguf, heads)) = gguf_name(name, self.heads) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor_info(&gguf) else {
            return Ok(None);
        };
        let found = info.shape().to_vec();
        if found != shape {
            return Err(ModelError::ShapeMismatch {
                name: format!("{gguf} (for {name})"),
                path,
                expected: shape.to_vec(),
                found,
            });
        }
        let values = self
            .file
            .dequantize_f32(&gguf)
            .map_err(|e| gguf_error("dequantize a tensor of", &path, &e))?;
        let Some(n_head) = heads else {
            return Ok(Some(values));
        };
        let rows = shape[0];
        let cols = shape[1..].iter().product::<usize>().max(1);
        if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
            return Err(ModelError::Unsupported {
                path,
                what: format!(
                    "tensor `{gguf}`: {rows} rows cannot be split into {n_head} RoPE heads"
                ),
            });
        }
        Ok(Some(unpermute_rope_rows(&values, rows, cols, n_head)))
    }

    fn location(&self) -> PathBuf {
        self.file.path().to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
