//! Packed rows: several documents in one row of a batch, each attending only to itself and each
//! at positions from 0, so that a packed row computes what its documents would alone.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use flash_attention::SegmentRuns;

/// Where the documents of packed rows start, as the model's forward takes it: per token, the
/// index of its document within its row and its position within that document.
///
/// # Shapes
/// - ids, positions: `[batch, seq]`
#[derive(Debug, Clone)]
pub struct PackedDocuments<B: Backend> {
    /// The token's document, numbered `0, 1, ..` from the start of its row.
    pub ids: Tensor<B, 2, Int>,
    /// The token's position within its document (RoPE's position), from 0.
    pub positions: Tensor<B, 2, Int>,
    /// The documents as runs of positions, on the host: with them, the fused attention (cuDNN
    /// on CUDA) runs each document as a sequence of its own instead of masking across the row.
    pub runs: Arc<SegmentRuns>,
}

impl<B: Backend> PackedDocuments<B> {
    /// From one label per token, row-major `[batch, seq]`: a document is a maximal run of equal
    /// labels within a row (any labels: only where they change counts).
    ///
    /// # Panics
    /// If `labels` does not hold `batch · seq` values.
    pub fn from_labels(labels: &[i64], [batch, seq]: [usize; 2], device: &B::Device) -> Self {
        let (ids, positions) = document_runs(labels, [batch, seq]);
        let tensor = |values: Vec<i64>| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(values, [batch, seq]), device)
        };
        Self {
            ids: tensor(ids),
            positions: tensor(positions),
            runs: Arc::new(SegmentRuns::from_labels(labels, [batch, seq])),
        }
    }
}

/// Row-local document indices and in-document positions of each token (see
/// [`PackedDocuments::from_labels`]).
///
/// # Panics
/// If `labels` does not hold `batch · seq` values.
pub fn document_runs(labels: &[i64], [batch, seq]: [usize; 2]) -> (Vec<i64>, Vec<i64>) {
    assert_eq!(
        labels.len(),
        batch * seq,
        "document labels: {} values for a [{batch}, {seq}] batch",
        labels.len()
    );
    let mut ids = Vec::with_capacity(labels.len());
    let mut positions = Vec::with_capacity(labels.len());
    for row in labels.chunks(seq.max(1)) {
        let (mut id, mut position) = (0i64, 0i64);
        for (j, label) in row.iter().enumerate() {
            if j > 0 && *label != row[j - 1] {
                id += 1;
                position = 0;
            }
            ids.push(id);
            positions.push(position);
            position += 1;
        }
    }
    (ids, positions)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use burn::backend::NdArray;

    use super::*;
    use crate::{Checkpoint, LlamaConfig, LlamaForCausalLm, build_model};

    type B = NdArray<f32>;

    fn llama_tiny() -> LlamaForCausalLm<B> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama-tiny");
        let config = LlamaConfig::load(&dir.join("config.json")).unwrap();
        let mut checkpoint = Checkpoint::open(&dir).unwrap();
        build_model(&config, &mut checkpoint, &Default::default()).unwrap()
    }

    fn int_tensor(values: &[i64], shape: [usize; 2]) -> Tensor<B, 2, Int> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), &Default::default())
    }

    /// Two rows, one packing three documents and one packing a document and padding: every
    /// document's hidden states equal those of the document run alone, and the documents'
    /// tokens differ from what the row gives without document boundaries.
    #[test]
    fn a_packed_row_computes_each_document_as_if_alone() {
        let model = llama_tiny();
        let documents: [&[i64]; 4] = [
            &[5, 9, 17, 3, 60],
            &[21, 8, 8, 40],
            &[2, 77, 13],
            &[30, 31, 32, 33, 34, 35, 36],
        ];
        let seq = 12;
        let (mut ids, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (label, doc) in documents[..3].iter().enumerate() {
            ids.extend_from_slice(doc);
            labels.extend(std::iter::repeat_n(label as i64, doc.len()));
        }
        mask.extend(std::iter::repeat_n(1, seq));
        ids.extend_from_slice(documents[3]);
        ids.extend(std::iter::repeat_n(0, seq - documents[3].len()));
        labels.extend(std::iter::repeat_n(9, seq));
        mask.extend((0..seq).map(|j| i64::from(j < documents[3].len())));

        let packed = PackedDocuments::<B>::from_labels(&labels, [2, seq], &Default::default());
        let hidden = model.hidden_states_packed(
            int_tensor(&ids, [2, seq]),
            Some(int_tensor(&mask, [2, seq])),
            Some(&packed),
        );
        let unbounded = model.hidden_states(
            int_tensor(&ids, [2, seq]),
            Some(int_tensor(&mask, [2, seq])),
        );
        let width = hidden.dims()[2];
        let mut starts = vec![(0, 0), (0, 5), (0, 9), (1, 0)].into_iter();
        for doc in documents {
            let (row, start) = starts.next().unwrap();
            let alone = model
                .hidden_states(int_tensor(doc, [1, doc.len()]), None)
                .reshape([doc.len(), width]);
            let slice = |t: &Tensor<B, 3>| {
                t.clone()
                    .slice([row..row + 1, start..start + doc.len(), 0..width])
                    .reshape([doc.len(), width])
            };
            let err = (slice(&hidden) - alone.clone()).abs().max().into_scalar();
            let scale = alone.clone().abs().max().into_scalar();
            assert!(
                err <= 1e-5 * scale,
                "document {doc:?}: {err:e} of {scale:e}"
            );
            if start > 0 {
                let crossed = (slice(&unbounded) - alone).abs().max().into_scalar();
                assert!(
                    crossed > 1e-2 * scale,
                    "document {doc:?} unaffected by its row"
                );
            }
        }
    }

    #[test]
    fn runs_number_documents_and_restart_positions_per_row() {
        let labels = [7, 7, 7, 3, 3, 7, /* row 2 */ 1, 1, 1, 1, 1, 1];
        let (ids, positions) = document_runs(&labels, [2, 6]);
        assert_eq!(ids, [0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(positions, [0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 4, 5]);
        assert_eq!(document_runs(&[], [0, 4]), (vec![], vec![]));
    }

    #[test]
    #[should_panic(expected = "5 values for a [2, 3] batch")]
    fn a_label_count_off_the_shape_panics() {
        document_runs(&[0; 5], [2, 3]);
    }
}
