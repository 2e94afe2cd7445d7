//! Raw blocks of every decodable type against gguf-py's `gguf.quants.dequantize`
//! (`tests/fixtures/gguf/blocks.json`, made by `tests/scripts/make_gguf_reference.py`): the types
//! SmolLM2's file lacks (Q4_0, Q4_K, Q5_K, Q6_K, BF16, F16) and those it has. Always runs.

mod common;

use common::{assert_bits_eq, fixture, hex_bytes, hex_f32};
use fastlora_gguf::{GgmlType, dequantize};

fn ggml_type(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

#[test]
fn blocks_dequantize_bit_exactly_like_gguf_py() {
    let fixture = fixture("blocks.json");
    let cases = fixture["cases"].as_array().expect("cases");
    let mut seen = Vec::new();
    for case in cases {
        let t = ggml_type(case["type"].as_str().unwrap());
        assert_eq!(case["block_size"].as_u64(), Some(t.block_size()), "{t}");
        assert_eq!(case["type_size"].as_u64(), Some(t.type_size()), "{t}");
        let raw = hex_bytes(case["raw_hex"].as_str().unwrap());
        let expected = hex_f32(case["expected_f32_le_hex"].as_str().unwrap());
        assert_eq!(
            raw.len() as u64 / t.type_size(),
            case["n_blocks"].as_u64().unwrap()
        );
        let actual = dequantize(t, &raw).unwrap();
        assert_bits_eq(&actual, &expected, &format!("{t} ({})", case["how"]));
        seen.push(t);
    }
    let decodable: Vec<GgmlType> = GgmlType::ALL
        .into_iter()
        .filter(|t| t.can_dequantize())
        .collect();
    for t in decodable {
        assert!(seen.contains(&t), "blocks.json has no {t} case");
    }
}
