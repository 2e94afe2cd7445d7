//! Fixture access and comparison helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use safetensors::SafeTensors;

/// The CPU autodiff backend every parity test runs on.
pub type B = fastlora::CpuBackend;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// All f32 tensors of a fixture safetensors file, by name, with shapes.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    /// Reads `tests/fixtures/<rel>`.
    pub fn open(rel: &str) -> Self {
        let path = fixture(rel);
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    /// Tensor `name` as f32 values and its shape.
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture parses");
        let view = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture has no `{name}`"));
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (values, view.shape().to_vec())
    }

    /// Every tensor name.
    pub fn names(&self) -> Vec<String> {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture parses");
        st.names().into_iter().map(String::from).collect()
    }
}

/// The fixture's `input_ids`, `[2, 12]`.
pub fn input_ids(device: &burn::backend::ndarray::NdArrayDevice) -> Tensor<B, 2, Int> {
    input_ids_on::<B>(device)
}

/// The fixture's `input_ids`, `[2, 12]`, on any backend.
pub fn input_ids_on<BK: Backend>(device: &BK::Device) -> Tensor<BK, 2, Int> {
    let bytes = std::fs::read(fixture("inputs.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("input_ids").unwrap();
    let ids: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Tensor::from_data(
        TensorData::new(ids, [view.shape()[0], view.shape()[1]]),
        device,
    )
}

/// Values of a tensor as f32.
pub fn values<const D: usize, BK: Backend>(t: Tensor<BK, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Asserts `max|got − want| ≤ rel · max(max|want|, 1e-12)`: relative error in the max norm.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want
        .iter()
        .map(|v| f64::from(v.abs()))
        .fold(1e-12, f64::max);
    let (worst, at) = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| (f64::from((g - w).abs()), i))
        .fold((0.0, 0), |acc, x| if x.0 > acc.0 { x } else { acc });
    assert!(
        worst <= rel * scale,
        "{what}: max |diff| {worst:e} at {at} (got {}, want {}) exceeds {rel:e} × {scale:e}",
        got[at],
        want[at]
    );
}

/// One tensor as raw little-endian bytes, for building altered safetensors files.
pub struct RawTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: safetensors::Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub bytes: Vec<u8>,
}

/// Every tensor of a safetensors file.
pub fn read_raw(path: &std::path::Path) -> Vec<RawTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| RawTensor {
            name,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            bytes: view.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Writes `tensors` as a safetensors file.
pub fn write_raw(path: &std::path::Path, tensors: &[RawTensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Copies a fixture folder into a fresh temp dir and returns (guard, path).
pub fn copy_fixture(rel: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(rel);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture(rel)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    (tmp, dst)
}
