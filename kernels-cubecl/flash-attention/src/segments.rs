//! The segments attention runs under (padding, packed documents): the per-token tensor every path
//! reads, and, where the caller knows it on the host, the same layout as runs of positions, which
//! a kernel for variable-length sequences (cuDNN's ragged layout) needs to treat each run as a
//! sequence of its own.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::{DType, FloatDType, TensorPrimitive};

/// Each row of a `[batch, seq]` batch cut into runs of consecutive positions: maximal runs of
/// equal labels, numbered `0, 1, ..` from the start of their row (the numbering
/// [`attention_segments`] takes for documents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRuns {
    batch: usize,
    seq: usize,
    /// Flat token index (`row·seq + position`) where each run starts, in order.
    starts: Vec<usize>,
    /// Each run's length, ≥ 1.
    lengths: Vec<usize>,
}

impl SegmentRuns {
    /// From one label per token, row-major `[batch, seq]`: a run is a maximal stretch of equal
    /// labels within a row (only where labels change counts, not their values).
    ///
    /// # Panics
    /// If `labels` does not hold `batch · seq` values.
    pub fn from_labels(labels: &[i64], [batch, seq]: [usize; 2]) -> Self {
        assert_eq!(
            labels.len(),
            batch * seq,
            "segment runs: {} labels for a [{batch}, {seq}] batch",
            labels.len()
        );
        let (mut starts, mut lengths) = (Vec::new(), Vec::new());
        for (row, row_labels) in labels.chunks(seq.max(1)).enumerate().take(batch) {
            for (j, label) in row_labels.iter().enumerate() {
                if j == 0 || *label != row_labels[j - 1] {
                    starts.push(row * seq + j);
                    lengths.push(1);
                } else if let Some(length) = lengths.last_mut() {
                    *length += 1;
                }
            }
        }
        Self {
            batch,
            seq,
            starts,
            lengths,
        }
    }

    /// `[batch, seq]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.batch, self.seq]
    }

    /// Number of runs over all rows.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether there is no run (an empty batch).
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Flat token index (`row·seq + position`) of each run's first token, in order.
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// Each run's length, in the order of [`Self::starts`].
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// The segment of each token, row-major `[batch, seq]`: its run's index within its row.
    pub fn ids(&self) -> Vec<i64> {
        let mut ids = vec![0i64; self.batch * self.seq];
        let mut id = 0i64;
        for (&start, &length) in self.starts.iter().zip(&self.lengths) {
            id = if start % self.seq.max(1) == 0 {
                0
            } else {
                id + 1
            };
            ids[start..start + length].fill(id);
        }
        ids
    }
}

/// The segments of one attention: `[batch, seq]` f32 per-token segments (query `i` sees key
/// `j ≤ i` iff `seg[j] = seg[i]`; [`attention_segments`]) and, where known, the same layout as
/// [`SegmentRuns`].
#[derive(Debug, Clone)]
pub struct Segments<B: Backend> {
    ids: Tensor<B, 2>,
    runs: Option<Arc<SegmentRuns>>,
}

impl<B: Backend> Segments<B> {
    /// Segments known only on the device ([`attention_segments`]).
    ///
    /// # Panics
    /// If `ids` is not f32.
    pub fn from_ids(ids: Tensor<B, 2>) -> Self {
        assert_eq!(ids.dtype(), DType::F32, "attention segments must be f32");
        Self { ids, runs: None }
    }

    /// The segments of `runs`, uploaded to `device`.
    pub fn from_runs(runs: Arc<SegmentRuns>, device: &B::Device) -> Self {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(runs.ids(), runs.dims()), device);
        Self {
            ids: exact_f32(ids),
            runs: Some(runs),
        }
    }

    /// `[batch, seq]` f32 segments.
    pub fn ids(&self) -> &Tensor<B, 2> {
        &self.ids
    }

    /// The runs, where known.
    pub fn runs(&self) -> Option<&Arc<SegmentRuns>> {
        self.runs.as_ref()
    }

    /// `(ids, runs)`.
    pub fn into_parts(self) -> (Tensor<B, 2>, Option<Arc<SegmentRuns>>) {
        (self.ids, self.runs)
    }
}

/// Integer segments as f32 (exact below 2²⁴).
///
/// # Panics
/// If `s` ≥ 2²⁴.
fn exact_f32<B: Backend>(t: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [_, s] = t.dims();
    assert!(
        s < 1 << 24,
        "attention segments: {s} positions exceed f32's integers"
    );
    Tensor::from_primitive(TensorPrimitive::Float(B::int_into_float(
        t.into_primitive(),
        FloatDType::F32,
    )))
}

/// The segments `[b, s]` (f32) that [`crate::flash_attention`] and
/// [`crate::materialised_attention`] take, from a key-padding mask (1 = token, 0 = padding) and
/// the documents of packed rows (an integer per token, equal within a document and different
/// between the documents of a row, below 2²⁴ in magnitude so that f32 holds it exactly;
/// row-local indices `0, 1, ..` are): a token's segment is its document's value (0 without
/// documents), a padding position `j`'s is `−1 − j`, alone in its segment. `None` when neither
/// is given: plain causal attention.
///
/// # Shapes
/// - key_mask, documents: `[b, s]`
/// - output: `[b, s]` f32
///
/// # Panics
/// If the two shapes differ, or `s` ≥ 2²⁴.
pub fn attention_segments<B: Backend>(
    key_mask: Option<Tensor<B, 2, Int>>,
    documents: Option<Tensor<B, 2, Int>>,
) -> Option<Tensor<B, 2>> {
    let documents = documents.map(exact_f32);
    let Some(mask) = key_mask else {
        return documents;
    };
    let [b, s] = mask.dims();
    let device = mask.device();
    let documents = match documents {
        Some(documents) => {
            assert_eq!(
                documents.dims(),
                [b, s],
                "attention segments: key mask and documents differ"
            );
            documents
        }
        None => Tensor::zeros([b, s], (&device, DType::F32)),
    };
    let alone = exact_f32(
        Tensor::<B, 1, Int>::arange(1..s as i64 + 1, &device)
            .neg()
            .reshape([1, s])
            .expand([b, s]),
    );
    Some(documents.mask_where(mask.equal_elem(0), alone))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;

    /// Runs restart at every row and wherever the label changes; their ids are the row-local
    /// run indices, whatever the labels' values (a label seen again later is a new run).
    #[test]
    fn runs_follow_label_changes_row_by_row() {
        let labels = [7, 7, 3, 3, 3, 7, /* row 1 */ 3, 3, 3, 3, 3, 3];
        let runs = SegmentRuns::from_labels(&labels, [2, 6]);
        assert_eq!(runs.starts(), &[0, 2, 5, 6]);
        assert_eq!(runs.lengths(), &[2, 3, 1, 6]);
        assert_eq!(runs.ids(), vec![0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(runs.len(), 4);
        assert!(SegmentRuns::from_labels(&[], [0, 5]).is_empty());
    }

    /// The uploaded segments equal what `attention_segments` makes of the same documents.
    #[test]
    fn segments_from_runs_match_the_documents_segments() {
        let device = Default::default();
        let labels = [1, 1, 2, 2, 2, 9, 4, 4, 4, 5, 5, 5];
        let runs = Arc::new(SegmentRuns::from_labels(&labels, [2, 6]));
        let segments = Segments::<NdArray<f32>>::from_runs(runs.clone(), &device);
        let documents =
            Tensor::<NdArray<f32>, 2, Int>::from_data(TensorData::new(runs.ids(), [2, 6]), &device);
        let want = attention_segments(None, Some(documents)).expect("documents");
        assert_eq!(segments.ids().to_data(), want.to_data());
        assert_eq!(
            segments.ids().to_data().to_vec::<f32>().unwrap(),
            vec![0., 0., 1., 1., 1., 2., 0., 0., 0., 1., 1., 1.]
        );
        assert_eq!(segments.runs(), Some(&runs));
    }

    #[test]
    #[should_panic(expected = "5 labels for a [2, 3] batch")]
    fn runs_reject_a_wrong_label_count() {
        SegmentRuns::from_labels(&[0; 5], [2, 3]);
    }
}
