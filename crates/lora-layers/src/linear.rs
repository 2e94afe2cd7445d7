//! [`LoraLinear`]: a frozen base projection with an optional low-rank adapter, PEFT's
//! `lora.Linear`.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::init::{FactorShape, InitError, LoraInit, init_factors};
use crate::packed::{BaseWeight, PackedBase, PackedWeight};

/// A linear projection `y = x·Wᵀ (+ b) + s · dropout(x)·Aᵀ·Bᵀ`.
///
/// The base weight `W` is kept in PyTorch's `[d_output, d_input]` layout, the layout of HF
/// checkpoints and of cuBLAS's transposed operand, so loading needs no transposes. It is frozen;
/// the bias trains only when [`LoraLinear::set_bias_trainable`] says so (PEFT's `bias="all"` or
/// `"lora_only"`). Without an adapter this is a plain linear layer.
///
/// `W` is either a dense parameter or packed ([`LoraLinear::from_packed`], QLoRA's quantized
/// base): packed blocks stay in memory and are dequantized to f32 in every forward, so the
/// output and the adapter's gradients equal those of the dense layer holding the dequantized
/// values. The saving is in resident model memory and in inference: during training, autodiff
/// keeps each projection's dequantized `W` until backward (the matmul saves its right-hand side
/// for the gradient of `x`), so activation memory then includes one dense copy per projection.
///
/// # Shapes
/// - input: `[..., d_input]`
/// - output: `[..., d_output]`
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// Frozen base weight, `[d_output, d_input]`: dense or packed.
    pub weight: BaseWeight<B>,
    /// Optional base bias, `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The low-rank adapter, when this projection is a LoRA target.
    pub adapter: Option<LoraAdapter<B>>,
}

/// The low-rank update of a [`LoraLinear`]: `s · dropout(x)·Aᵀ·Bᵀ`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `lora_A`, `[rank, d_input]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `lora_B`, `[d_output, rank]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `s = alpha/r`, or `alpha/√r` with rsLoRA.
    pub scaling: f64,
    /// Dropout on the adapter's input only, as PEFT.
    pub dropout: Dropout,
    /// Whether `s·B·A` has been folded into the base weight (the adapter then adds nothing).
    pub merged: bool,
}

/// Configuration of a new [`LoraAdapter`].
#[derive(Config, Debug)]
pub struct LoraAdapterConfig {
    /// Rank `r`.
    pub rank: usize,
    /// Scaling `s` applied to the adapter's output.
    pub scaling: f64,
    /// Dropout probability on the adapter input.
    #[config(default = 0.0)]
    pub dropout: f64,
}

/// Configuration of a randomly initialised [`LoraLinear`] (the base as `nn.Linear` would be).
#[derive(Config, Debug)]
pub struct LoraLinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the base has a bias.
    #[config(default = false)]
    pub bias: bool,
}

impl LoraLinearConfig {
    /// A base with `nn.Linear`'s default init, `U(±1/√d_input)`, and no adapter.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LoraLinear<B> {
        let bound = 1.0 / (self.d_input as f64).sqrt();
        let dist = burn::tensor::Distribution::Uniform(-bound, bound);
        let weight = Tensor::random([self.d_output, self.d_input], dist, device);
        let bias = self
            .bias
            .then(|| Tensor::random([self.d_output], dist, device));
        LoraLinear::from_weights(weight, bias)
    }
}

impl<B: Backend> LoraLinear<B> {
    /// Wraps loaded base weights (`[d_output, d_input]` and `[d_output]`), frozen, no adapter.
    pub fn from_weights(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::from_base(BaseWeight::dense(weight), bias)
    }

    /// Wraps a packed base weight (`[d_output, d_input]` once dequantized, onto `device`) and a
    /// loaded bias (`[d_output]`), frozen, no adapter.
    pub fn from_packed(
        weight: Arc<dyn PackedWeight>,
        bias: Option<Tensor<B, 1>>,
        device: &B::Device,
    ) -> Self {
        Self::from_base(BaseWeight::Packed(PackedBase::new(weight, device)), bias)
    }

    fn from_base(weight: BaseWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight,
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            adapter: None,
        }
    }

    /// Input features.
    pub fn d_input(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output features.
    pub fn d_output(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The base weight as a dense tensor: the parameter, or the packed weight dequantized now
    /// on its device (merged adapters included, unmerged ones not).
    ///
    /// # Shapes
    /// - output: `[d_output, d_input]`
    pub fn base_weight(&self) -> Tensor<B, 2> {
        self.weight.tensor()
    }

    /// Applies the projection.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let base = burn::tensor::module::linear(
            input.clone(),
            self.base_weight().transpose(),
            self.bias.as_ref().map(|b| b.val()),
        );
        match &self.adapter {
            Some(adapter) if !adapter.merged => base + adapter.forward(input),
            _ => base,
        }
    }

    /// Attaches a freshly initialised adapter; PiSSA also rewrites the base weight (a packed base
    /// is dequantized for the decomposition and replaced by the dense residual).
    ///
    /// `seed` fixes the draw (see [`crate::module_seed`]); `module` names the layer in errors.
    ///
    /// # Errors
    /// From [`init_factors`]: PiSSA with a rank above `min(d_output, d_input)`.
    pub fn init_adapter(
        mut self,
        config: &LoraAdapterConfig,
        init: LoraInit,
        seed: u64,
        module: &str,
    ) -> Result<Self, InitError> {
        let (d_input, d_output) = (self.d_input(), self.d_output());
        let device = self.weight.device();
        let shape = FactorShape {
            rank: config.rank,
            d_input,
            d_output,
            scaling: config.scaling,
        };
        let base = match init {
            LoraInit::Pissa => Some(
                self.base_weight()
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|_| InitError::PissaNeedsWeight {
                        module: module.to_string(),
                    })?,
            ),
            _ => None,
        };
        let factors = init_factors(init, shape, seed, module, base.as_deref())?;
        if let Some(residual) = factors.residual_weight {
            let data = TensorData::new(residual, [d_output, d_input]);
            // A packed base dequantizes to the default float dtype, which `from_data` gives.
            let mut residual = Tensor::<B, 2>::from_data(data, &device);
            if let Some(dense) = self.weight.as_dense() {
                residual = residual.cast(dense.dtype());
            }
            self.weight = self.weight.replaced_by(residual);
        }
        // Made in f32 directly: through the default dtype a bf16 model would round them first.
        let f32_on_device = (&device, DType::F32);
        let a = Tensor::from_data(
            TensorData::new(factors.a, [config.rank, d_input]),
            f32_on_device,
        );
        let b = Tensor::from_data(
            TensorData::new(factors.b, [d_output, config.rank]),
            f32_on_device,
        );
        self.adapter = Some(LoraAdapter::new(a, b, config.scaling, config.dropout));
        Ok(self)
    }

    /// Attaches a given adapter (e.g. loaded from a PEFT file), replacing any existing one.
    pub fn with_adapter(mut self, adapter: LoraAdapter<B>) -> Self {
        self.adapter = Some(adapter);
        self
    }

    /// Makes the base bias trainable (PEFT `bias="all"`/`"lora_only"`) or frozen.
    pub fn set_bias_trainable(mut self, trainable: bool) -> Self {
        self.bias = self.bias.map(|b| b.set_require_grad(trainable));
        self
    }

    /// Folds `s·B·A` into the base weight; the adapter stays attached, marked merged.
    ///
    /// A packed base cannot hold the sum: it is dequantized and the base becomes the dense
    /// `W + s·B·A` (and stays dense after [`LoraLinear::unmerge`]). A no-op without an adapter
    /// or when already merged.
    pub fn merge(self) -> Self {
        self.fold(1.0, true)
    }

    /// Subtracts a merged adapter's `s·B·A` from the base weight again.
    ///
    /// A no-op without an adapter or when not merged.
    pub fn unmerge(self) -> Self {
        self.fold(-1.0, false)
    }

    /// Merges the adapter into the base weight and removes it: a plain linear layer (dense,
    /// when an adapter was folded into a packed base; see [`LoraLinear::merge`]).
    pub fn merge_and_unload(self) -> Self {
        let mut merged = self.merge();
        merged.adapter = None;
        merged
    }

    fn fold(mut self, sign: f64, merged: bool) -> Self {
        let Some(adapter) = self.adapter.as_mut() else {
            return self;
        };
        if adapter.merged == merged {
            return self;
        }
        let delta = adapter.delta_weight().mul_scalar(sign);
        adapter.merged = merged;
        let base = self.base_weight();
        let dtype = base.dtype();
        let folded = (base.cast(delta.dtype()) + delta).cast(dtype);
        self.weight = self.weight.replaced_by(folded);
        self
    }
}

impl<B: Backend> LoraAdapter<B> {
    /// An adapter from its factors, `A: [rank, d_input]` and `B: [d_output, rank]`, both
    /// trainable and kept in f32 whatever their given dtype (Unsloth's rule for a bf16/f16
    /// base: the factors, their gradients and the optimizer state stay f32; [`Self::forward`]
    /// casts them to the activations' dtype).
    ///
    /// # Panics
    /// If the two factors disagree on the rank.
    pub fn new(lora_a: Tensor<B, 2>, lora_b: Tensor<B, 2>, scaling: f64, dropout: f64) -> Self {
        assert_eq!(
            lora_a.dims()[0],
            lora_b.dims()[1],
            "lora_A and lora_B ranks differ"
        );
        Self {
            lora_a: Param::from_tensor(to_f32(lora_a)),
            lora_b: Param::from_tensor(to_f32(lora_b)),
            scaling,
            dropout: DropoutConfig::new(dropout).init(),
            merged: false,
        }
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }

    /// The adapter's contribution `s · dropout(x)·Aᵀ·Bᵀ`, computed in activation space (the
    /// dense `B·A` is never formed).
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = input.dtype();
        let x = self.dropout.forward(input);
        let a = cast_to(self.lora_a.val(), dtype);
        let b = cast_to(self.lora_b.val(), dtype);
        let low = burn::tensor::module::linear(x, a.transpose(), None);
        burn::tensor::module::linear(low, b.transpose(), None).mul_scalar(self.scaling)
    }

    /// The dense update `s·B·A`, `[d_output, d_input]`, in f32 (PEFT upcasts for the merge too).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        let a = self.lora_a.val().detach().cast(burn::tensor::DType::F32);
        let b = self.lora_b.val().detach().cast(burn::tensor::DType::F32);
        b.matmul(a).mul_scalar(self.scaling)
    }
}

fn to_f32<B: Backend>(t: Tensor<B, 2>) -> Tensor<B, 2> {
    cast_to(t, DType::F32)
}

/// `t` in `dtype`; the tensor itself when it already is (autodiff then records no cast).
fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::module::AutodiffModule;

    type B = NdArray<f32>;
    type AB = Autodiff<B>;

    fn tensor2(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        (0..rows * cols).map(|k| f(k / cols, k % cols)).collect()
    }

    fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// A 3→2 layer with bias and a rank-2 adapter, values chosen so each term matters.
    fn layer(device: &burn::backend::ndarray::NdArrayDevice) -> (LoraLinear<B>, [Vec<f32>; 4]) {
        let w = tensor2(2, 3, |r, c| 0.1 * (r as f32 + 1.0) - 0.2 * c as f32);
        let bias = vec![0.5, -0.25];
        let a = tensor2(2, 3, |r, c| 0.3 * r as f32 - 0.1 * c as f32 + 0.05);
        let b = tensor2(2, 2, |r, c| 0.2 * (r + 2 * c) as f32 - 0.1);
        let linear = LoraLinear::<B>::from_weights(
            Tensor::from_data(TensorData::new(w.clone(), [2, 3]), device),
            Some(Tensor::from_data(
                TensorData::new(bias.clone(), [2]),
                device,
            )),
        )
        .with_adapter(LoraAdapter::new(
            Tensor::from_data(TensorData::new(a.clone(), [2, 3]), device),
            Tensor::from_data(TensorData::new(b.clone(), [2, 2]), device),
            1.5,
            0.0,
        ));
        (linear, [w, bias, a, b])
    }

    /// `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` in float64 by loops.
    fn reference(x: &[f32], n: usize, [w, bias, a, b]: &[Vec<f32>; 4], s: f64) -> Vec<f64> {
        let mut y = vec![0.0f64; n * 2];
        for row in 0..n {
            let xr = &x[row * 3..row * 3 + 3];
            let low: Vec<f64> = (0..2)
                .map(|k| {
                    (0..3)
                        .map(|c| f64::from(a[k * 3 + c]) * f64::from(xr[c]))
                        .sum()
                })
                .collect();
            for o in 0..2 {
                let base: f64 = (0..3)
                    .map(|c| f64::from(w[o * 3 + c]) * f64::from(xr[c]))
                    .sum();
                let lora: f64 = (0..2).map(|k| f64::from(b[o * 2 + k]) * low[k]).sum();
                y[row * 2 + o] = base + f64::from(bias[o]) + s * lora;
            }
        }
        y
    }

    #[test]
    fn forward_matches_float64_reference_on_3d_input() {
        let device = Default::default();
        let (linear, parts) = layer(&device);
        let x = tensor2(4, 3, |r, c| (r as f32 - 1.5) * 0.7 + c as f32 * 0.3);
        let out = linear.forward(Tensor::<B, 3>::from_data(
            TensorData::new(x.clone(), [2, 2, 3]),
            &device,
        ));
        assert_eq!(out.dims(), [2, 2, 2]);
        for (got, want) in to_vec(out).iter().zip(reference(&x, 4, &parts, 1.5)) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn merge_equals_unmerged_and_unmerge_restores_weight() {
        let device = Default::default();
        let (linear, _) = layer(&device);
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(tensor2(5, 3, |r, c| (r * c) as f32 * 0.1 - 0.4), [5, 3]),
            &device,
        );
        let before = to_vec(linear.forward(x.clone()));
        let w_before = to_vec(linear.base_weight());
        let merged = linear.merge();
        assert!(merged.adapter.as_ref().unwrap().merged);
        let after = to_vec(merged.forward(x.clone()));
        let restored = merged.unmerge();
        for (p, q) in before.iter().zip(&after) {
            assert!((p - q).abs() < 1e-6);
        }
        for (p, q) in w_before.iter().zip(to_vec(restored.base_weight())) {
            assert!((p - q).abs() < 1e-7);
        }
        let unloaded = restored.merge_and_unload();
        assert!(unloaded.adapter.is_none());
        for (p, q) in before.iter().zip(to_vec(unloaded.forward(x))) {
            assert!((p - q).abs() < 1e-6);
        }
    }

    #[test]
    fn only_adapter_factors_get_gradients_and_they_match_closed_form() {
        let device = Default::default();
        let (linear, [_, _, a, b]) = layer(&device);
        let linear: LoraLinear<AB> = LoraLinear::from_weights(
            Tensor::from_data(linear.base_weight().into_data(), &device),
            Some(Tensor::from_data(
                linear.bias.unwrap().val().into_data(),
                &device,
            )),
        )
        .with_adapter(LoraAdapter::new(
            Tensor::from_data(TensorData::new(a.clone(), [2, 3]), &device),
            Tensor::from_data(TensorData::new(b.clone(), [2, 2]), &device),
            1.5,
            0.0,
        ));
        let x = tensor2(3, 3, |r, c| 0.2 * r as f32 - 0.3 * c as f32 + 0.1);
        let xt = Tensor::<AB, 2>::from_data(TensorData::new(x.clone(), [3, 3]), &device);
        // loss = Σ y, so G = 1: dB = s·Gᵀ·(X·Aᵀ), dA = s·Bᵀ·Gᵀ·X.
        let grads = linear.forward(xt).sum().backward();
        let weight = linear.weight.as_dense().unwrap();
        assert!(weight.val().grad(&grads).is_none());
        assert!(linear.bias.as_ref().unwrap().val().grad(&grads).is_none());
        let adapter = linear.adapter.as_ref().unwrap();
        let ga = to_vec(adapter.lora_a.val().grad(&grads).unwrap());
        let gb = to_vec(adapter.lora_b.val().grad(&grads).unwrap());
        let col_sum_x: Vec<f64> = (0..3)
            .map(|c| (0..3).map(|r| f64::from(x[r * 3 + c])).sum())
            .collect();
        for k in 0..2 {
            let col_sum_b: f64 = (0..2).map(|o| f64::from(b[o * 2 + k])).sum();
            for c in 0..3 {
                let want = 1.5 * col_sum_b * col_sum_x[c];
                assert!((f64::from(ga[k * 3 + c]) - want).abs() < 1e-5);
            }
            let low_sum: f64 = (0..3).map(|c| f64::from(a[k * 3 + c]) * col_sum_x[c]).sum();
            for o in 0..2 {
                assert!((f64::from(gb[o * 2 + k]) - 1.5 * low_sum).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn trainable_bias_gets_a_gradient() {
        let device = Default::default();
        let linear = LoraLinearConfig::new(4, 3)
            .with_bias(true)
            .init::<AB>(&device)
            .set_bias_trainable(true);
        let x = Tensor::<AB, 2>::ones([2, 4], &device);
        let grads = linear.forward(x).sum().backward();
        let gb = linear.bias.as_ref().unwrap().val().grad(&grads).unwrap();
        assert_eq!(gb.into_data().to_vec::<f32>().unwrap(), vec![2.0; 3]);
    }

    #[test]
    fn pissa_keeps_the_output_and_default_init_adds_nothing() {
        let device = Default::default();
        let base = LoraLinearConfig::new(8, 6).init::<B>(&device);
        let x = Tensor::<B, 2>::random([3, 8], burn::tensor::Distribution::Default, &device);
        let plain = to_vec(base.forward(x.clone()));
        let config = LoraAdapterConfig::new(2, 2.0);
        for init in [
            LoraInit::Pissa,
            LoraInit::KaimingUniform,
            LoraInit::Gaussian,
        ] {
            let lora = base.clone().init_adapter(&config, init, 3407, "m").unwrap();
            for (p, q) in plain.iter().zip(to_vec(lora.forward(x.clone()))) {
                assert!((p - q).abs() < 1e-5, "{init:?}: {p} vs {q}");
            }
        }
        let random = base
            .init_adapter(&config, LoraInit::Random, 3407, "m")
            .unwrap();
        let changed = to_vec(random.forward(x));
        assert!(
            plain
                .iter()
                .zip(&changed)
                .any(|(p, q)| (p - q).abs() > 1e-3)
        );
    }

    /// A packed weight for tests: i8 codes times a scale, as a block quantizer stores them.
    #[derive(Debug)]
    struct Int8Weight {
        codes: Vec<i8>,
        scale: f32,
        shape: [usize; 2],
    }

    impl PackedWeight for Int8Weight {
        fn shape(&self) -> [usize; 2] {
            self.shape
        }

        fn dequantize(&self) -> Vec<f32> {
            self.codes
                .iter()
                .map(|&c| f32::from(c) * self.scale)
                .collect()
        }

        fn stored_bytes(&self) -> usize {
            self.codes.len() + 4
        }

        fn format(&self) -> &str {
            "I8"
        }
    }

    /// The same 5→4 projection with a rank-2 adapter twice: base packed, and base dense holding
    /// the dequantized values.
    fn packed_and_dense<Bk: Backend>(device: &Bk::Device) -> (LoraLinear<Bk>, LoraLinear<Bk>) {
        let packed = Arc::new(Int8Weight {
            codes: (0..20).map(|k| (k * 37 % 29) as i8 - 14).collect(),
            scale: 0.03,
            shape: [4, 5],
        });
        let dense_values = TensorData::new(packed.dequantize(), [4, 5]);
        let bias = || Tensor::from_data(TensorData::new(vec![0.1, -0.2, 0.3, 0.0], [4]), device);
        let adapter = || {
            LoraAdapter::new(
                Tensor::from_data(
                    TensorData::new(tensor2(2, 5, |r, c| 0.1 * (r + c) as f32 - 0.2), [2, 5]),
                    device,
                ),
                Tensor::from_data(
                    TensorData::new(
                        tensor2(4, 2, |r, c| 0.05 * (r * 2 + c) as f32 - 0.1),
                        [4, 2],
                    ),
                    device,
                ),
                2.0,
                0.0,
            )
        };
        let packed = LoraLinear::from_packed(packed, Some(bias()), device).with_adapter(adapter());
        let dense = LoraLinear::from_weights(Tensor::from_data(dense_values, device), Some(bias()))
            .with_adapter(adapter());
        (packed, dense)
    }

    #[test]
    fn packed_base_gives_the_dense_output_and_lora_gradients() {
        let device = Default::default();
        let (packed, dense) = packed_and_dense::<AB>(&device);
        assert!(packed.weight.as_packed().is_some());
        assert_eq!((packed.d_input(), packed.d_output()), (5, 4));
        // Only the adapter and the frozen bias are parameters: the packed base is none.
        assert_eq!(packed.num_params(), 10 + 8 + 4);
        assert_eq!(dense.num_params(), packed.num_params() + 20);
        let x = tensor2(6, 5, |r, c| (r as f32 - 2.5) * 0.3 + c as f32 * 0.1);
        let run = |linear: &LoraLinear<AB>| {
            let x = Tensor::<AB, 3>::from_data(TensorData::new(x.clone(), [2, 3, 5]), &device)
                .require_grad();
            let y = linear.forward(x.clone());
            let grads = (y.clone() * y.clone()).sum().backward();
            let adapter = linear.adapter.as_ref().unwrap();
            let grad = |t: Tensor<AB, 2>| t.grad(&grads).unwrap().into_data();
            (
                y.into_data(),
                x.grad(&grads).unwrap().into_data(),
                grad(adapter.lora_a.val()),
                grad(adapter.lora_b.val()),
            )
        };
        let (p, d) = (run(&packed), run(&dense));
        assert_eq!(p.0, d.0, "output");
        assert_eq!(p.1, d.1, "input gradient");
        assert_eq!(p.2, d.2, "lora_A gradient");
        assert_eq!(p.3, d.3, "lora_B gradient");
        // The inference copy keeps the base packed.
        assert!(packed.valid().weight.as_packed().is_some());
    }

    #[test]
    fn merging_into_a_packed_base_gives_the_dense_merge() {
        let device = Default::default();
        let (packed, dense) = packed_and_dense::<B>(&device);
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(
                tensor2(3, 5, |r, c| 0.2 * r as f32 - 0.1 * c as f32),
                [3, 5],
            ),
            &device,
        );
        let before = to_vec(packed.forward(x.clone()));
        let merged = packed.clone().merge_and_unload();
        let BaseWeight::Dense(weight) = &merged.weight else {
            panic!("a merged packed base is dense");
        };
        // W + s·B·A, exactly as the dense layer merges.
        assert_eq!(
            weight.val().into_data(),
            dense.merge_and_unload().base_weight().into_data()
        );
        for (p, q) in before.iter().zip(to_vec(merged.forward(x.clone()))) {
            assert!((p - q).abs() < 1e-6, "{p} vs {q}");
        }
        // PiSSA decomposes the dequantized weight, keeps a dense residual and the output.
        let base = LoraLinear::<B> {
            adapter: None,
            ..packed
        };
        let plain = to_vec(base.forward(x.clone()));
        let pissa = base
            .init_adapter(&LoraAdapterConfig::new(2, 2.0), LoraInit::Pissa, 3407, "m")
            .unwrap();
        assert!(pissa.weight.as_dense().is_some());
        for (p, q) in plain.iter().zip(to_vec(pissa.forward(x))) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}
