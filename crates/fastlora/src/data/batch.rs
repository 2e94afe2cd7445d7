//! Examples, packing, batches and the shuffled order of an epoch.

use fastlora_llama::IGNORE_INDEX;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::error::DataError;

/// One tokenized training sequence: its token ids and, per token, the label the causal LM
/// loss compares with (the id itself, or [`IGNORE_INDEX`] where nothing is learnt). A packed
/// row ([`pack`]) also says which document each token comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Example {
    input_ids: Vec<u32>,
    labels: Vec<i64>,
    /// Per token, the index of its document within the row; empty: one document.
    documents: Vec<u32>,
}

impl Example {
    /// An example from its token ids and one label per token.
    ///
    /// # Errors
    ///
    /// [`DataError::LabelCount`] if the lengths differ.
    pub fn new(input_ids: Vec<u32>, labels: Vec<i64>) -> Result<Self, DataError> {
        if input_ids.len() != labels.len() {
            return Err(DataError::LabelCount {
                tokens: input_ids.len(),
                labels: labels.len(),
            });
        }
        Ok(Self {
            input_ids,
            labels,
            documents: Vec::new(),
        })
    }

    /// An example trained on every token.
    pub fn fully_trained(input_ids: Vec<u32>) -> Self {
        let labels = input_ids.iter().map(|&id| i64::from(id)).collect();
        Self {
            input_ids,
            labels,
            documents: Vec::new(),
        }
    }

    /// Appends `ids`, trained on or not.
    pub(crate) fn extend(&mut self, ids: &[u32], trained: bool) {
        self.input_ids.extend_from_slice(ids);
        self.labels.extend(
            ids.iter()
                .map(|&id| if trained { i64::from(id) } else { IGNORE_INDEX }),
        );
    }

    /// Keeps the first `len` tokens.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.input_ids.truncate(len);
        self.labels.truncate(len);
        self.documents.truncate(len);
    }

    /// The token ids.
    pub fn input_ids(&self) -> &[u32] {
        &self.input_ids
    }

    /// The labels, one per token: the token's id, or [`IGNORE_INDEX`].
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// For a packed row, the index of each token's document within the row (`0, 1, ..`);
    /// `None` for a single example.
    pub fn documents(&self) -> Option<&[u32]> {
        (!self.documents.is_empty()).then_some(self.documents.as_slice())
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of tokens the causal LM loss learns: labels other than [`IGNORE_INDEX`] at
    /// positions 1.. (position 0 has nothing before it to predict it from).
    pub fn num_trained_tokens(&self) -> usize {
        count_trained(self.labels.get(1..).unwrap_or_default())
    }
}

fn count_trained(labels: &[i64]) -> usize {
    labels
        .iter()
        .filter(|&&label| label != IGNORE_INDEX)
        .count()
}

/// A padded batch of examples, row-major `[batch, seq]`, ready to become tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids; padding positions hold the pad id.
    pub input_ids: Vec<i64>,
    /// Labels; padding positions hold [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<i64>,
    /// For packed rows, per token the document it belongs to within its row (padding: −1);
    /// the model keeps documents apart ([`fastlora_llama::PackedDocuments`]). `None` when every
    /// row is one example.
    pub documents: Option<Vec<i64>>,
    /// Number of rows.
    pub batch: usize,
    /// Length of every row: the longest example's.
    pub seq: usize,
}

impl Batch {
    /// Number of tokens the causal LM loss averages over: labels other than
    /// [`IGNORE_INDEX`] at positions 1.. of each row (the loss shifts labels by one).
    pub fn num_trained_tokens(&self) -> usize {
        if self.seq == 0 {
            return 0;
        }
        self.labels
            .chunks(self.seq)
            .map(|row| count_trained(&row[1..]))
            .sum()
    }

    /// The key-padding mask a causal training forward needs, or `None` when it can go without
    /// one: every row is its tokens followed only by padding, and no padded position has a
    /// label (what [`collate`] makes). Under causal attention a real token never sees a later
    /// key, so no real token sees padding, and the loss reads no padded position: the loss
    /// and every gradient are those of the masked forward. Without a mask the forward can take
    /// the fused attention kernels, which have no mask input (cuDNN's on CUDA).
    pub fn training_key_mask(&self) -> Option<&[i64]> {
        if self.seq == 0 {
            return None;
        }
        let suffix_padding = self
            .attention_mask
            .chunks(self.seq)
            .zip(self.labels.chunks(self.seq))
            .all(|(mask, labels)| {
                let real = mask.iter().take_while(|&&m| m != 0).count();
                mask[real..].iter().all(|&m| m == 0)
                    && labels[real..].iter().all(|&label| label == IGNORE_INDEX)
            });
        (!suffix_padding).then_some(self.attention_mask.as_slice())
    }

    /// This batch with every row right-padded further, to a length that is a multiple of
    /// `multiple` (new positions: `pad_id`, label [`IGNORE_INDEX`], mask 0); unchanged when the
    /// length already is one, when `multiple` ≤ 1, or when the padded length would exceed
    /// `max_seq`. On CUDA the trainer pads to the length cuDNN's attention takes
    /// (`flash_attention::fused_sequence_multiple`); like the padding [`collate`] adds, the new
    /// positions change neither the loss nor any gradient.
    pub fn padded_to_multiple_of(self, multiple: usize, pad_id: u32, max_seq: usize) -> Batch {
        if multiple <= 1 || self.seq.is_multiple_of(multiple) {
            return self;
        }
        let seq = self.seq.next_multiple_of(multiple);
        if seq > max_seq {
            return self;
        }
        let extra = seq - self.seq;
        let cells = self.batch * seq;
        let mut padded = Batch {
            input_ids: Vec::with_capacity(cells),
            labels: Vec::with_capacity(cells),
            attention_mask: Vec::with_capacity(cells),
            documents: self.documents.as_ref().map(|_| Vec::with_capacity(cells)),
            batch: self.batch,
            seq,
        };
        for row in 0..self.batch {
            let cells = row * self.seq..(row + 1) * self.seq;
            padded
                .input_ids
                .extend_from_slice(&self.input_ids[cells.clone()]);
            padded
                .input_ids
                .extend(std::iter::repeat_n(i64::from(pad_id), extra));
            padded.labels.extend_from_slice(&self.labels[cells.clone()]);
            padded
                .labels
                .extend(std::iter::repeat_n(IGNORE_INDEX, extra));
            padded
                .attention_mask
                .extend_from_slice(&self.attention_mask[cells.clone()]);
            padded.attention_mask.extend(std::iter::repeat_n(0, extra));
            if let (Some(padded), Some(documents)) = (&mut padded.documents, &self.documents) {
                padded.extend_from_slice(&documents[cells]);
                padded.extend(std::iter::repeat_n(PADDING_DOCUMENT, extra));
            }
        }
        padded
    }

    /// Number of real (unpadded) tokens.
    pub fn num_tokens(&self) -> usize {
        self.attention_mask
            .iter()
            .filter(|&&mask| mask == 1)
            .count()
    }
}

/// The document of a padding position in [`Batch::documents`].
const PADDING_DOCUMENT: i64 = -1;

/// Right-pads `examples` with `pad_id` to the longest of them: padding gets label
/// [`IGNORE_INDEX`] and attention mask 0. When any example is a packed row, the batch carries
/// the documents of every row (a single example is document 0). No examples give an empty
/// `0 × 0` batch.
pub fn collate(examples: &[&Example], pad_id: u32) -> Batch {
    let seq = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let cells = examples.len() * seq;
    let packed = examples.iter().any(|e| e.documents().is_some());
    let mut batch = Batch {
        input_ids: Vec::with_capacity(cells),
        labels: Vec::with_capacity(cells),
        attention_mask: Vec::with_capacity(cells),
        documents: packed.then(|| Vec::with_capacity(cells)),
        batch: examples.len(),
        seq,
    };
    for example in examples {
        let padding = seq - example.len();
        batch
            .input_ids
            .extend(example.input_ids.iter().map(|&id| i64::from(id)));
        batch
            .input_ids
            .extend(std::iter::repeat_n(i64::from(pad_id), padding));
        batch.labels.extend_from_slice(&example.labels);
        batch
            .labels
            .extend(std::iter::repeat_n(IGNORE_INDEX, padding));
        batch
            .attention_mask
            .extend(std::iter::repeat_n(1, example.len()));
        batch.attention_mask.extend(std::iter::repeat_n(0, padding));
        if let Some(documents) = &mut batch.documents {
            match example.documents() {
                Some(own) => documents.extend(own.iter().map(|&d| i64::from(d))),
                None => documents.extend(std::iter::repeat_n(0, example.len())),
            }
            documents.extend(std::iter::repeat_n(PADDING_DOCUMENT, padding));
        }
    }
    // Rows that each hold one document need no boundaries (and keep the fused attention).
    if let Some(documents) = &batch.documents
        && documents.iter().all(|&d| d == 0 || d == PADDING_DOCUMENT)
    {
        batch.documents = None;
    }
    batch
}

/// Concatenates `examples` into one stream and cuts it into rows of exactly `row_length`
/// tokens, labels following their tokens; the last, shorter row is kept (collate pads it).
/// Examples are cut at row boundaries wherever they fall: packing trades that for no padding.
///
/// Each row records which example ("document") each token comes from, and the model keeps them
/// apart: a token attends only to the earlier tokens of its own document, at RoPE positions
/// counted from the document's start in the row. The first token of each example loses its
/// label, which its own document gives it nothing to predict from (unpacked, position 0 is
/// never predicted either): a packed row trains exactly as its pieces would alone.
///
/// # Errors
///
/// [`DataError::InvalidConfig`] if `row_length` is 0.
pub fn pack(examples: &[Example], row_length: usize) -> Result<Vec<Example>, DataError> {
    if row_length == 0 {
        return Err(DataError::InvalidConfig {
            message: "packing needs rows of at least one token (max_seq_length 0)".into(),
        });
    }
    let input_ids: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.input_ids.iter().copied())
        .collect();
    let labels: Vec<i64> = examples
        .iter()
        .flat_map(|e| {
            let first = e.labels.iter().take(1).map(|_| IGNORE_INDEX);
            first.chain(e.labels.iter().skip(1).copied())
        })
        .collect();
    let example_of: Vec<usize> = examples
        .iter()
        .enumerate()
        .flat_map(|(index, e)| std::iter::repeat_n(index, e.len()))
        .collect();
    Ok(input_ids
        .chunks(row_length)
        .zip(labels.chunks(row_length))
        .zip(example_of.chunks(row_length))
        .map(|((ids, labels), example_of)| Example {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            documents: example_of
                .iter()
                .map(|&index| (index - example_of[0]) as u32)
                .collect(),
        })
        .collect())
}

/// The order to visit `len` examples in during epoch `epoch`: a permutation of `0..len`
/// determined by `seed` and `epoch` alone (ChaCha8, one stream per epoch), so a run resumed
/// at any epoch sees the same order as an uninterrupted one.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: i64 = IGNORE_INDEX;

    #[test]
    fn collate_right_pads_with_mask_and_ignored_labels() {
        let a = Example::new(vec![5, 6, 7], vec![I, 6, 7]).unwrap();
        let b = Example::fully_trained(vec![8]);
        let batch = collate(&[&a, &b], 3);
        assert_eq!((batch.batch, batch.seq), (2, 3));
        assert_eq!(batch.input_ids, [5, 6, 7, 8, 3, 3]);
        assert_eq!(batch.labels, [I, 6, 7, 8, I, I]);
        assert_eq!(batch.attention_mask, [1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.num_trained_tokens(), 2);
        assert_eq!(batch.num_tokens(), 4);
        let empty = collate(&[], 0);
        assert_eq!(
            (empty.batch, empty.seq, empty.num_trained_tokens()),
            (0, 0, 0)
        );
    }

    #[test]
    fn training_key_mask_only_where_padding_is_seen() {
        let a = Example::new(vec![5, 6, 7], vec![I, 6, 7]).unwrap();
        let b = Example::fully_trained(vec![8]);
        let right_padded = collate(&[&a, &b], 3);
        assert_eq!(right_padded.training_key_mask(), None);
        let mut left_padded = right_padded.clone();
        left_padded.attention_mask = vec![1, 1, 1, 0, 0, 1];
        left_padded.labels = vec![I, 6, 7, I, I, 8];
        assert_eq!(
            left_padded.training_key_mask(),
            Some(&[1, 1, 1, 0, 0, 1][..])
        );
        let mut labelled_padding = right_padded.clone();
        labelled_padding.labels[5] = 3;
        assert!(labelled_padding.training_key_mask().is_some());
    }

    #[test]
    fn padding_to_a_multiple_keeps_rows_and_stays_maskless() {
        let a = Example::new(vec![5, 6, 7], vec![I, 6, 7]).unwrap();
        let b = Example::fully_trained(vec![8]);
        let batch = collate(&[&a, &b], 3);
        let padded = batch.clone().padded_to_multiple_of(4, 9, 16);
        assert_eq!((padded.batch, padded.seq), (2, 4));
        assert_eq!(padded.input_ids, [5, 6, 7, 9, 8, 3, 3, 9]);
        assert_eq!(padded.labels, [I, 6, 7, I, 8, I, I, I]);
        assert_eq!(padded.attention_mask, [1, 1, 1, 0, 1, 0, 0, 0]);
        assert_eq!(padded.num_trained_tokens(), batch.num_trained_tokens());
        assert_eq!(padded.training_key_mask(), None);
        // Already a multiple, no multiple, or past the model's length: unchanged.
        assert_eq!(batch.clone().padded_to_multiple_of(3, 9, 16), batch);
        assert_eq!(batch.clone().padded_to_multiple_of(1, 9, 16), batch);
        assert_eq!(batch.clone().padded_to_multiple_of(4, 9, 3), batch);
    }

    #[test]
    fn example_lengths_must_agree() {
        assert!(matches!(
            Example::new(vec![1, 2], vec![1]),
            Err(DataError::LabelCount {
                tokens: 2,
                labels: 1
            })
        ));
        assert_eq!(Example::default().num_trained_tokens(), 0);
    }

    #[test]
    fn packing_cuts_the_stream_into_full_rows() {
        let examples = [
            Example::new(vec![1, 2, 3], vec![I, 2, 3]).unwrap(),
            Example::new(vec![4, 5, 6, 7], vec![I, I, 6, 7]).unwrap(),
        ];
        let rows = pack(&examples, 3).unwrap();
        let ids: Vec<&[u32]> = rows.iter().map(Example::input_ids).collect();
        assert_eq!(ids, [&[1, 2, 3][..], &[4, 5, 6], &[7]]);
        assert_eq!(rows[1].labels(), [I, I, 6]);
        assert!(pack(&examples, 0).is_err());
        // Two examples in a row: the second's first token loses its label.
        let rows = pack(&examples, 5).unwrap();
        assert_eq!(rows[0].labels(), [I, 2, 3, I, I]);
        assert_eq!(rows[0].documents(), Some(&[0, 0, 0, 1, 1][..]));
        assert_eq!(rows[1].documents(), Some(&[0, 0][..]));
        let batch = collate(&rows.iter().collect::<Vec<_>>(), 0);
        assert_eq!(
            batch.documents.as_deref(),
            Some(&[0, 0, 0, 1, 1, 0, 0, -1, -1, -1][..])
        );
        let padded = batch.padded_to_multiple_of(3, 0, 8);
        assert_eq!(
            padded.documents.as_deref(),
            Some(&[0, 0, 0, 1, 1, -1, 0, 0, -1, -1, -1, -1][..])
        );
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation_per_epoch() {
        let first = epoch_order(50, 3407, 0);
        assert_eq!(first, epoch_order(50, 3407, 0));
        assert_ne!(first, epoch_order(50, 3407, 1));
        assert_ne!(first, epoch_order(50, 1, 0));
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert!(epoch_order(0, 1, 1).is_empty());
    }
}
