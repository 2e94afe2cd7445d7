//! The materialised attention the fast op replaces: `[b, h, s, s]` scores, an additive mask,
//! softmax in f32, every backend. The math of the model's portable `Attention::attend` (K/V
//! repeated per query head, `-1e9` on masked scores) under the op's segment rule; the tests'
//! and the benchmark's oracle and baseline.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType};

/// Causal GQA attention with `[b, h, s, s]` scores kept for backward; with segments
/// ([`crate::attention_segments`]), query `i` sees key `j ≤ i` iff `seg[j] = seg[i]`.
///
/// # Shapes
/// - q: `[b, h, s, d]`; k, v: `[b, kvh, s, d]`; segments: `[b, s]`
/// - output: `[b, s, h·d]`
pub fn materialised_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segments: Option<Tensor<B, 2>>,
) -> Tensor<B, 3> {
    let [b, h, s, d] = q.dims();
    let kvh = k.dims()[1];
    let g = h / kvh;
    let device = q.device();
    let dtype = q.dtype();
    let repeat = |t: Tensor<B, 4>| {
        t.unsqueeze_dim::<5>(2)
            .expand([b, kvh, g, s, d])
            .reshape([b, h, s, d])
    };
    let (k, v) = (repeat(k), repeat(v));
    let future: Tensor<B, 2, Bool> = Tensor::tril_mask([s, s], 0, &device);
    let mut blocked = future.unsqueeze::<4>().expand([b, 1, s, s]);
    if let Some(segments) = segments {
        let keys = segments.clone().reshape([b, 1, 1, s]).expand([b, 1, s, s]);
        let queries = segments.reshape([b, 1, s, 1]).expand([b, 1, s, s]);
        blocked = blocked.bool_or(keys.not_equal(queries));
    }
    let mask = Tensor::<B, 4>::zeros([b, 1, s, s], (&device, dtype)).mask_fill(blocked, -1.0e9);
    let scale = (d as f64).powf(-0.5);
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale) + mask;
    let probs = softmax(scores.cast(DType::F32), 3).cast(v.dtype());
    probs.matmul(v).swap_dims(1, 2).reshape([b, s, h * d])
}
