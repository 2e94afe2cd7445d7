//! Helpers shared by the fixture tests.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

/// The repository root (this crate is `crates/gguf`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Reads a JSON fixture under `tests/fixtures/gguf/`.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests/fixtures/gguf").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Bytes from lowercase or uppercase hex.
pub fn hex_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex length");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// f32 values from the hex of their little-endian bits (the fixtures' bit-exact encoding).
pub fn hex_f32(hex: &str) -> Vec<f32> {
    hex_bytes(hex)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Asserts two f32 slices are bit-identical, reporting the first difference.
pub fn assert_bits_eq(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = (0..actual.len()).find(|&i| actual[i].to_bits() != expected[i].to_bits()) {
        panic!(
            "{what}: value {i} is {} ({:#010x}), expected {} ({:#010x})",
            actual[i],
            actual[i].to_bits(),
            expected[i],
            expected[i].to_bits()
        );
    }
}
