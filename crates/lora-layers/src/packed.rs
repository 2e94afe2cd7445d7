//! Frozen base weights kept packed (e.g. a GGUF file's quantized blocks) and dequantized on
//! use: QLoRA's idea of a quantized base under f32 adapters.
//!
//! This crate knows a packed weight only through [`PackedWeight`]; the format (GGUF's Q4_1,
//! Q4_K...) is the loader's business. A [`LoraLinear`](crate::LoraLinear) holds its base as a
//! [`BaseWeight`]: a dense frozen parameter, or a [`PackedBase`].

use std::fmt;
use std::sync::Arc;

use burn::module::{
    AutodiffModule, Content, Devices, EmptyRecord, HasAutodiffModule, Module, ModuleDisplay,
    ModuleDisplayDefault, ModuleMapper, ModuleVisitor, Param,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// A frozen `[d_output, d_input]` weight stored in some packed (quantized) format.
///
/// Implementations hold the packed bytes on the host and decode them on request; they must be
/// cheap to share ([`PackedBase`] holds them in an [`Arc`]).
///
/// # Shapes
/// - [`PackedWeight::dequantize`]: `[d_output, d_input]`, row-major
pub trait PackedWeight: Send + Sync + fmt::Debug {
    /// The shape of the unpacked weight, `[d_output, d_input]`.
    fn shape(&self) -> [usize; 2];

    /// The weight unpacked to f32, row-major in [`PackedWeight::shape`]. Deterministic: every
    /// call gives the same values.
    fn dequantize(&self) -> Vec<f32>;

    /// Bytes the packed form keeps in memory.
    fn stored_bytes(&self) -> usize;

    /// The packed format's name, e.g. `Q4_1`.
    fn format(&self) -> &str;
}

/// A [`PackedWeight`] on a device: the packed bytes stay on the host, and each
/// [`PackedBase::dequantize`] builds the dense f32 tensor on `device`.
///
/// A module without parameters: nothing to train, record or optimise. Moving it to another
/// device (`to_device`, `fork`) moves where it dequantizes to.
pub struct PackedBase<B: Backend> {
    weight: Arc<dyn PackedWeight>,
    device: B::Device,
}

impl<B: Backend> PackedBase<B> {
    /// `weight`, dequantized onto `device` when used.
    pub fn new(weight: Arc<dyn PackedWeight>, device: &B::Device) -> Self {
        Self {
            weight,
            device: device.clone(),
        }
    }

    /// The packed weight.
    pub fn weight(&self) -> &Arc<dyn PackedWeight> {
        &self.weight
    }

    /// The device it dequantizes to.
    pub fn device(&self) -> B::Device {
        self.device.clone()
    }

    /// The dense f32 weight, decoded now. Not tracked by autodiff (it is frozen).
    ///
    /// # Shapes
    /// - output: `[d_output, d_input]`
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let data = TensorData::new(self.weight.dequantize(), self.weight.shape());
        Tensor::from_data(data, &self.device)
    }
}

impl<B: Backend> Clone for PackedBase<B> {
    fn clone(&self) -> Self {
        Self {
            weight: Arc::clone(&self.weight),
            device: self.device.clone(),
        }
    }
}

impl<B: Backend> fmt::Debug for PackedBase<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackedBase")
            .field("weight", &self.weight)
            .field("device", &self.device)
            .finish()
    }
}

// Written out rather than derived: the derive would not move `device` in `to_device`/`fork`,
// and a packed weight is no parameter (no record, nothing for visitors or optimisers).
impl<B: Backend> Module<B> for PackedBase<B> {
    type Record = EmptyRecord;

    fn collect_devices(&self, mut devices: Devices<B>) -> Devices<B> {
        if !devices.contains(&self.device) {
            devices.push(self.device.clone());
        }
        devices
    }

    fn fork(self, device: &B::Device) -> Self {
        self.to_device(device)
    }

    fn to_device(self, device: &B::Device) -> Self {
        Self::new(self.weight, device)
    }

    fn visit<V: ModuleVisitor<B>>(&self, _visitor: &mut V) {}

    fn map<M: ModuleMapper<B>>(self, _mapper: &mut M) -> Self {
        self
    }

    fn load_record(self, _record: Self::Record) -> Self {
        self
    }

    fn into_record(self) -> Self::Record {
        EmptyRecord::new()
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for PackedBase<B> {
    type InnerModule = PackedBase<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        PackedBase::new(Arc::clone(&self.weight), &self.device)
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        Self::new(module.weight, &module.device)
    }
}

impl<B: AutodiffBackend> HasAutodiffModule<B> for PackedBase<B::InnerBackend> {
    type TrainModule = PackedBase<B>;
}

impl<B: Backend> ModuleDisplayDefault for PackedBase<B> {
    fn content(&self, content: Content) -> Option<Content> {
        let text = format!(
            "Packed {{format: {}, shape: {:?}}}",
            self.weight.format(),
            self.weight.shape()
        );
        content.add_formatted(&text).optional()
    }
}

impl<B: Backend> ModuleDisplay for PackedBase<B> {}

/// The frozen base weight of a [`LoraLinear`](crate::LoraLinear), `[d_output, d_input]`.
///
/// # Shapes
/// - [`BaseWeight::tensor`]: `[d_output, d_input]`
#[derive(Module, Debug)]
pub enum BaseWeight<B: Backend> {
    /// A dense parameter (frozen, unless a `modules_to_save` head trains it).
    Dense(Param<Tensor<B, 2>>),
    /// Packed blocks, dequantized whenever the weight is used; never trainable.
    Packed(PackedBase<B>),
}

impl<B: Backend> BaseWeight<B> {
    /// A dense frozen base.
    pub fn dense(weight: Tensor<B, 2>) -> Self {
        Self::Dense(Param::from_tensor(weight).set_require_grad(false))
    }

    /// `[d_output, d_input]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Dense(param) => param.dims(),
            Self::Packed(packed) => packed.weight.shape(),
        }
    }

    /// The device the weight is (or dequantizes) on.
    pub fn device(&self) -> B::Device {
        match self {
            Self::Dense(param) => param.device(),
            Self::Packed(packed) => packed.device(),
        }
    }

    /// The dense weight: the parameter's value, or the packed blocks dequantized now (an
    /// allocation of `d_output · d_input` f32 values each call).
    pub fn tensor(&self) -> Tensor<B, 2> {
        match self {
            Self::Dense(param) => param.val(),
            Self::Packed(packed) => packed.dequantize(),
        }
    }

    /// The dense parameter, unless the base is packed.
    pub fn as_dense(&self) -> Option<&Param<Tensor<B, 2>>> {
        match self {
            Self::Dense(param) => Some(param),
            Self::Packed(_) => None,
        }
    }

    /// The dense parameter, mutably, unless the base is packed.
    pub fn as_dense_mut(&mut self) -> Option<&mut Param<Tensor<B, 2>>> {
        match self {
            Self::Dense(param) => Some(param),
            Self::Packed(_) => None,
        }
    }

    /// The packed base, if it is one.
    pub fn as_packed(&self) -> Option<&PackedBase<B>> {
        match self {
            Self::Dense(_) => None,
            Self::Packed(packed) => Some(packed),
        }
    }

    /// The base replaced by the dense frozen `weight`; a dense base keeps its parameter id.
    pub(crate) fn replaced_by(self, weight: Tensor<B, 2>) -> Self {
        let weight = weight.detach().set_require_grad(false);
        match self {
            Self::Dense(param) => Self::Dense(param.map(|_| weight)),
            Self::Packed(_) => Self::dense(weight),
        }
    }
}
