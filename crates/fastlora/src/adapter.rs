//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, written and
//! read with PEFT's key names so PEFT, vLLM and mistral.rs load them unchanged.
//!
//! Keys are the in-model names under PEFT's `base_model.model.` prefix without the adapter name:
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (`[r, in]`), `…lora_B.weight`
//! (`[out, r]`), `modules_to_save` copies as `base_model.model.lm_head.weight`, trainable biases
//! as `…q_proj.base_layer.bias` (adapted) or `…q_proj.bias` (not adapted).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use fastlora_llama::{Checkpoint, FloatDtype, write_safetensors};
use lora_config::{InitLoraWeights, LoraConfig};
use lora_layers::BaseWeight;

use crate::error::{FastLoraError, Result};
use crate::peft::PeftModel;
use crate::pretrained::FastLanguageModel;

/// File name of the adapter weights in a PEFT adapter directory.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

const PREFIX: &str = "base_model.model.";
const EMBED: &str = "model.embed_tokens";
const LM_HEAD: &str = "lm_head";

impl<B: Backend> PeftModel<B> {
    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32, metadata
    /// `format=pt`) into `dir`, each file atomically (temp file + rename).
    ///
    /// # Errors
    /// An I/O failure naming the file.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|e| fastlora_llama::ModelError::io("create", dir, e))?;
        let tensors = crate::export::encode(self.adapter_tensors(), FloatDtype::F32);
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), &tensors, &metadata)?;
        let mut config = self.lora_config.clone();
        config.inference_mode = true;
        if config.base_model_name_or_path.is_none() {
            config.base_model_name_or_path = Some(self.base.source.display().to_string());
        }
        config.save(dir)?;
        Ok(())
    }

    /// The adapter's tensors under their PEFT names, as written to `adapter_model.safetensors`.
    pub fn adapter_tensors(&self) -> Vec<(String, TensorData)> {
        self.adapter_parameters()
            .into_iter()
            .map(|(key, param)| (key, param.into_data()))
            .collect()
    }

    /// The trainable parameters under their PEFT names: LoRA factors, trained biases and
    /// `modules_to_save` copies. The tensors are the parameters' own (gradients can be read
    /// from them after a backward pass).
    pub fn adapter_parameters(&self) -> Vec<(String, AdapterParameter<B>)> {
        let model = self.model();
        let mut out = Vec::new();
        for (name, proj) in model.projections() {
            if let Some(adapter) = &proj.adapter {
                out.push((
                    format!("{PREFIX}{name}.lora_A.weight"),
                    AdapterParameter::Matrix(adapter.lora_a.val()),
                ));
                out.push((
                    format!("{PREFIX}{name}.lora_B.weight"),
                    AdapterParameter::Matrix(adapter.lora_b.val()),
                ));
            }
            if let Some(bias) = &proj.bias
                && self.lora_config.bias.trains(proj.adapter.is_some())
            {
                out.push((
                    bias_key(&name, proj.adapter.is_some()),
                    AdapterParameter::Vector(bias.val()),
                ));
            }
        }
        for module in self.lora_config.modules_to_save.iter().flatten() {
            let (key, weight) = match (module.as_str(), &model.lm_head) {
                ("embed_tokens", _) => (
                    format!("{PREFIX}{EMBED}.weight"),
                    model.embed_tokens.weight.val(),
                ),
                (_, Some(head)) => (format!("{PREFIX}{LM_HEAD}.weight"), head.base_weight()),
                (_, None) => (
                    format!("{PREFIX}{LM_HEAD}.weight"),
                    model.embed_tokens.weight.val(),
                ),
            };
            out.push((key, AdapterParameter::Matrix(weight)));
        }
        out
    }

    /// Loads a PEFT adapter directory onto `base`: Unsloth's and PEFT's
    /// `PeftModel.from_pretrained(model, adapter_dir)`.
    ///
    /// Keys may carry PEFT's adapter name (`lora_A.default.weight`) or not, and legacy
    /// `modules_to_save.default` keys are accepted.
    ///
    /// # Errors
    /// [`FastLoraError::Adapter`] naming the file and tensor for a missing, unexpected or
    /// misshapen tensor; configuration errors naming the field.
    pub fn from_pretrained(
        base: FastLanguageModel<B>,
        adapter_dir: impl AsRef<Path>,
    ) -> Result<Self> {
        let dir = adapter_dir.as_ref();
        let config = LoraConfig::load(dir)?;
        // The file's factors replace whatever init draws; an init that rewrites the base
        // (PiSSA) must not run again on a loaded adapter.
        let mut inject_config = config.clone();
        inject_config.init_lora_weights = InitLoraWeights::Standard;
        let mut peft = PeftModel::inject(base, inject_config)?;
        peft.lora_config.init_lora_weights = config.init_lora_weights;
        let file = dir.join(ADAPTER_WEIGHTS_FILE);
        let checkpoint = Checkpoint::open(&file)?;
        let mut tensors: BTreeMap<String, String> = BTreeMap::new();
        for key in checkpoint.names() {
            let canonical = canonical_key(key);
            if let Some(previous) = tensors.insert(canonical.clone(), key.to_string()) {
                return Err(adapter_error(
                    &file,
                    format!("tensors `{previous}` and `{key}` both name `{canonical}`"),
                ));
            }
        }
        let mut used = BTreeSet::new();
        let device = peft.model().embed_tokens.weight.device();
        let mut read = |canonical: &str, shape: &[usize]| -> Result<TensorData> {
            let key = tensors
                .get(canonical)
                .ok_or_else(|| adapter_error(&file, format!("missing tensor `{canonical}`")))?;
            used.insert(canonical.to_string());
            Ok(TensorData::new(
                checkpoint.read_f32(key, shape)?,
                shape.to_vec(),
            ))
        };
        let matrix =
            |data: TensorData| Param::from_tensor(Tensor::<B, 2>::from_data(data, &device));
        // LoRA factors stay f32 under a half-precision base (see `LoraAdapter::new`).
        let factor = |data: TensorData| {
            Param::from_tensor(Tensor::<B, 2>::from_data(data, (&device, DType::F32)))
        };
        let bias_mode = peft.lora_config.bias;
        for (name, proj) in peft.base.model.projections_mut() {
            let adapted = proj.adapter.is_some();
            if let Some(adapter) = proj.adapter.as_mut() {
                let (rank, d_in, d_out) =
                    (adapter.rank(), proj.weight.dims()[1], proj.weight.dims()[0]);
                adapter.lora_a = factor(read(
                    &format!("{PREFIX}{name}.lora_A.weight"),
                    &[rank, d_in],
                )?);
                adapter.lora_b = factor(read(
                    &format!("{PREFIX}{name}.lora_B.weight"),
                    &[d_out, rank],
                )?);
            }
            if let Some(bias) = proj.bias.as_mut()
                && bias_mode.trains(adapted)
            {
                let values = read(&bias_key(&name, adapted), &[bias.dims()[0]])?;
                *bias = Param::from_tensor(Tensor::from_data(values, &device));
            }
        }
        let (vocab, hidden) = (peft.base.config.vocab_size, peft.base.config.hidden_size);
        for module in peft.lora_config.modules_to_save.clone().iter().flatten() {
            let model = &mut peft.base.model;
            match module.as_str() {
                "embed_tokens" => {
                    model.embed_tokens.weight =
                        matrix(read(&format!("{PREFIX}{EMBED}.weight"), &[vocab, hidden])?);
                }
                _ => {
                    let w = matrix(read(
                        &format!("{PREFIX}{LM_HEAD}.weight"),
                        &[vocab, hidden],
                    )?);
                    match model.lm_head.as_mut() {
                        Some(head) => head.weight = BaseWeight::Dense(w),
                        None => model.embed_tokens.weight = w,
                    }
                }
            }
        }
        peft.stamp_parameter_ids();
        if let Some(unexpected) = tensors.keys().find(|k| !used.contains(*k)) {
            return Err(adapter_error(
                &file,
                format!(
                    "unexpected tensor `{}`: no module of this model and adapter_config.json takes it",
                    tensors[unexpected]
                ),
            ));
        }
        Ok(peft)
    }
}

/// One trainable tensor of an adapter: a matrix (LoRA factor, `modules_to_save` copy) or a
/// vector (bias).
#[derive(Debug, Clone)]
pub enum AdapterParameter<B: Backend> {
    /// A 2-D parameter.
    Matrix(Tensor<B, 2>),
    /// A 1-D parameter.
    Vector(Tensor<B, 1>),
}

impl<B: Backend> AdapterParameter<B> {
    /// The values, with their shape.
    pub fn into_data(self) -> TensorData {
        match self {
            Self::Matrix(t) => t.into_data(),
            Self::Vector(t) => t.into_data(),
        }
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> AdapterParameter<B> {
    /// The gradient of this parameter after `backward`, if it got one.
    pub fn grad(&self, grads: &B::Gradients) -> Option<TensorData> {
        match self {
            Self::Matrix(t) => t.grad(grads).map(|g| g.into_data()),
            Self::Vector(t) => t.grad(grads).map(|g| g.into_data()),
        }
    }
}

/// PEFT names a wrapped layer's bias `base_layer.bias`.
fn bias_key(module: &str, adapted: bool) -> String {
    match adapted {
        true => format!("{PREFIX}{module}.base_layer.bias"),
        false => format!("{PREFIX}{module}.bias"),
    }
}

/// Drops PEFT's adapter name from a key: `lora_A.default.weight` → `lora_A.weight`,
/// `lm_head.modules_to_save.default.weight` → `lm_head.weight`; adds the `base_model.model.`
/// prefix when a file lacks it.
fn canonical_key(key: &str) -> String {
    let key = key
        .replace(".lora_A.default.", ".lora_A.")
        .replace(".lora_B.default.", ".lora_B.")
        .replace(".modules_to_save.default.", ".");
    match key.starts_with(PREFIX) {
        true => key,
        false => format!("{PREFIX}{key}"),
    }
}

fn adapter_error(path: &Path, message: String) -> FastLoraError {
    FastLoraError::Adapter {
        path: PathBuf::from(path),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_key_accepts_peft_spellings() {
        let want = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        assert_eq!(canonical_key(want), want);
        assert_eq!(
            canonical_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
            want
        );
        assert_eq!(
            canonical_key("model.layers.0.self_attn.q_proj.lora_A.weight"),
            want
        );
        assert_eq!(
            canonical_key("base_model.model.lm_head.modules_to_save.default.weight"),
            "base_model.model.lm_head.weight"
        );
    }
}
