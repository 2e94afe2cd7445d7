//! The dtype rule of the fused ops: LoRA factors are kept in their own dtype (f32 for training,
//! the optimizer's precision) and used in the activations' dtype. Each op casts the weights it
//! takes on the way in and their gradients on the way out, a group at a time
//! ([`FusedMlpKernels::cast_group`]: one launch for all of an op's factors rather than one
//! autodiff cast node and one kernel per factor).

use burn::tensor::DType;
use burn::tensor::TensorMetadata;
use burn::tensor::ops::FloatTensor;

use crate::op::FusedMlpKernels;

/// Every tensor in `dtype` (those already in it untouched), cast in one group.
pub(crate) fn all_in<B: FusedMlpKernels, const K: usize>(
    tensors: [FloatTensor<B>; K],
    dtype: DType,
) -> [FloatTensor<B>; K] {
    if tensors.iter().all(|t| t.dtype() == dtype) {
        return tensors;
    }
    B::cast_group(tensors.into(), dtype)
        .try_into()
        .unwrap_or_else(|_| unreachable!("cast_group returns one tensor per input"))
}

/// Each present tensor in its own entry of `dtypes` (the dtypes of the op's inputs, so that each
/// gradient comes back in its parameter's dtype), cast in one group per target dtype.
pub(crate) fn each_in<B: FusedMlpKernels, const K: usize>(
    mut tensors: [Option<FloatTensor<B>>; K],
    dtypes: [DType; K],
) -> [Option<FloatTensor<B>>; K] {
    let mut targets: Vec<DType> = Vec::new();
    for (t, &dtype) in tensors.iter().zip(&dtypes) {
        if t.as_ref().is_some_and(|t| t.dtype() != dtype) && !targets.contains(&dtype) {
            targets.push(dtype);
        }
    }
    for target in targets {
        let slots: Vec<usize> = (0..K)
            .filter(|&k| {
                dtypes[k] == target && tensors[k].as_ref().is_some_and(|t| t.dtype() != target)
            })
            .collect();
        let group = slots
            .iter()
            .map(|&k| tensors[k].take().expect("present"))
            .collect();
        for (k, cast) in slots.into_iter().zip(B::cast_group(group, target)) {
            tensors[k] = Some(cast);
        }
    }
    tensors
}
