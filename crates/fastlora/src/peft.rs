//! [`PeftModel`]: a base model with LoRA adapters injected, PEFT's `PeftModel` as Unsloth's
//! `get_peft_model` returns it.

use std::fmt;

use burn::module::Param;
use burn::prelude::*;
use checkpointing::CheckpointMode;
use fastlora_llama::{LlamaForCausalLm, LlamaTokenizer};
use lora_config::{Bias, GradientCheckpointing, InitLoraWeights, LoraConfig, Notice};
use lora_layers::{BaseWeight, LoraAdapterConfig, LoraInit, LoraLinear, module_seed};

use crate::error::Result;
use crate::pretrained::FastLanguageModel;

/// A base model with LoRA adapters: the trainable part is the adapters, the `modules_to_save`
/// copies and the biases `bias` selects; everything else is frozen.
#[derive(Debug, Clone)]
pub struct PeftModel<B: Backend> {
    /// The model with its adapters in place.
    pub base: FastLanguageModel<B>,
    /// The configuration the adapters were made with (normalised: `embed_tokens` moved to
    /// `modules_to_save`, default targets filled in).
    pub lora_config: LoraConfig,
    /// What was patched and how it will run.
    pub report: PatchReport,
    training: bool,
}

/// What `get_peft_model` did: adapters injected, which layers qualify for the fused kernels,
/// how checkpointing runs, and the notices raised on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchReport {
    /// Decoder layers in the model.
    pub layers: usize,
    /// Projections that received an adapter, by HF module name.
    pub adapted_modules: Vec<String>,
    /// Layers whose q, k and v qualify for the fused QKV op.
    pub fusable_qkv: usize,
    /// Layers whose o_proj qualifies for the fused O op.
    pub fusable_o: usize,
    /// Layers whose MLP qualifies for the fused SwiGLU+LoRA op.
    pub fusable_mlp: usize,
    /// Whether this backend runs the fused MLP kernels (CUDA and wgpu `CubeBackend`s, when
    /// built with their feature; the portable path runs elsewhere).
    pub fused_kernels_active: bool,
    /// Which attention the model's training and prompt passes run on this backend.
    pub attention: AttentionPath,
    /// The checkpointing mode asked for.
    pub checkpointing: CheckpointMode,
    /// Notices raised while normalising and applying the configuration.
    pub notices: Vec<String>,
}

/// The attention a [`PatchReport`]'s backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// `[b, h, s, s]` scores kept for backward (backends without the fast op).
    Materialised,
    /// The block-wise op, memory linear in the sequence (`flash-attention`).
    BlockWise,
    /// cuDNN's fused flash attention where it takes the problem (f16/bf16, no padding or packed
    /// documents to mask), the block-wise op elsewhere (CUDA's default; `FASTLORA_CUDNN=0` turns cuDNN off).
    CudnnThenBlockWise,
}

impl AttentionPath {
    /// The path the model takes on `B` now.
    pub fn of<B: burn::tensor::backend::Backend>() -> Self {
        use fastlora_llama::flash_attention;
        if !flash_attention::flash_available::<B>() {
            Self::Materialised
        } else if flash_attention::cudnn_first::<B>() {
            Self::CudnnThenBlockWise
        } else {
            Self::BlockWise
        }
    }
}

impl fmt::Display for PatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fastlora patched {} layers with {} QKV layers, {} O layers and {} MLP layers.",
            self.layers, self.fusable_qkv, self.fusable_o, self.fusable_mlp
        )?;
        match self.fused_kernels_active {
            true => writeln!(
                f,
                "Fused LoRA kernels: active for the SwiGLU MLP and for q/k/v together (one op \
                 where all three qualify); every other projection without LoRA dropout (o, LM \
                 head, q/k/v that don't qualify together) runs as one LoRA linear op; RMSNorm, \
                 RoPE and the loss's per-chunk softmax run as kernels."
            )?,
            false => writeln!(
                f,
                "Fused LoRA kernels: not on this backend; the portable path runs (same math)."
            )?,
        }
        match self.attention {
            AttentionPath::Materialised => writeln!(
                f,
                "Attention: materialised ([b, h, s, s] scores kept for backward) on this backend."
            )?,
            AttentionPath::BlockWise => writeln!(
                f,
                "Attention: the block-wise op, memory linear in the sequence length."
            )?,
            AttentionPath::CudnnThenBlockWise => writeln!(
                f,
                "Attention: cuDNN's fused flash attention where cuDNN takes the problem \
                 (bf16/f16; right-padded batches need no mask, packed documents run as \
                 cuDNN's ragged sequences), else the block-wise op (left padding)."
            )?,
        }
        match self.checkpointing {
            CheckpointMode::Off => writeln!(f, "Gradient checkpointing: off.")?,
            CheckpointMode::Recompute => writeln!(
                f,
                "Gradient checkpointing: true; each decoder layer keeps only its input, on the device, and is recomputed in backward."
            )?,
            CheckpointMode::HostOffload => writeln!(
                f,
                "Gradient checkpointing: unsloth; each decoder layer but the last keeps only its input, in host memory, and is recomputed in backward (on CUDA the copies run on a copy stream beside the compute stream, the way back prefetched one layer ahead)."
            )?,
        }
        for notice in &self.notices {
            writeln!(f, "Notice: {notice}")?;
        }
        Ok(())
    }
}

/// Counts of PEFT's `print_trainable_parameters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCounts {
    /// Parameters the optimiser updates.
    pub trainable: usize,
    /// Every parameter, base and adapters (and `modules_to_save` copies) alike.
    pub all: usize,
}

impl fmt::Display for ParameterCounts {
    /// PEFT's exact line: `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = 100.0 * self.trainable as f64 / self.all as f64;
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {percent:.4}",
            thousands(self.trainable),
            thousands(self.all)
        )
    }
}

/// `1234567` → `1,234,567`, as Python's `{:,}`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl<B: Backend> PeftModel<B> {
    /// Normalises and validates `config` for `base`, then injects the adapters.
    pub(crate) fn inject(mut base: FastLanguageModel<B>, config: LoraConfig) -> Result<Self> {
        let arch = base.architecture();
        let (config, notices) = config.normalize(&arch)?;
        let init = lora_init(&config.init_lora_weights)?;
        let mut notices: Vec<String> = notices.iter().map(Notice::to_string).collect();
        let modules_to_save = config.modules_to_save.clone().unwrap_or_default();
        let trains = |name: &str| modules_to_save.iter().any(|m| m == name);
        untie_if_needed(
            &mut base.model,
            &config,
            trains("embed_tokens"),
            trains("lm_head"),
            &mut notices,
        );

        let mut adapted_modules = Vec::new();
        for (name, proj) in base.model.projections_mut() {
            let adapted = config.targets(&name) && !(name == "lm_head" && trains("lm_head"));
            if adapted {
                let adapter =
                    LoraAdapterConfig::new(config.rank_for(&name), config.scaling_for(&name))
                        .with_dropout(config.lora_dropout);
                let seed = module_seed(config.random_state, &name);
                *proj = proj.clone().init_adapter(&adapter, init, seed, &name)?;
                adapted_modules.push(name);
            }
            let bias_trains = config.bias.trains(adapted);
            *proj = proj.clone().set_bias_trainable(bias_trains);
        }
        make_modules_to_save_trainable(&mut base.model, trains("embed_tokens"), trains("lm_head"));

        let checkpointing = match config.use_gradient_checkpointing {
            GradientCheckpointing::Off => CheckpointMode::Off,
            GradientCheckpointing::On => CheckpointMode::Recompute,
            GradientCheckpointing::Unsloth => CheckpointMode::HostOffload,
        };
        base.model.checkpointing = checkpointing;
        let report = patch_report(
            &base.model,
            &config,
            adapted_modules,
            checkpointing,
            notices,
        );
        tracing::info!("{report}");
        let mut peft = Self {
            base,
            lora_config: config,
            report,
            training: true,
        };
        peft.stamp_parameter_ids();
        Ok(peft)
    }

    /// Unsloth's rule for calling `get_peft_model` on a model that already has adapters: the
    /// same parameters are a no-op (with a notice), different ones an error.
    ///
    /// # Errors
    /// [`lora_config::LoraConfigError::AlreadyHasDifferentAdapters`] listing what differs.
    pub fn get_peft_model(mut self, config: LoraConfig) -> Result<Self> {
        let (config, _) = config.normalize(&self.base.architecture())?;
        let decision = config.check_reapply(&self.lora_config)?;
        let notice = decision.notice().to_string();
        tracing::info!("{notice}");
        self.report.notices.push(notice);
        Ok(self)
    }

    /// The model with adapters.
    pub fn model(&self) -> &LlamaForCausalLm<B> {
        &self.base.model
    }

    /// The tokenizer of the base model, if it has one.
    pub fn tokenizer(&self) -> Option<&LlamaTokenizer> {
        self.base.tokenizer.as_ref()
    }

    /// Trainable and total parameter counts, as PEFT's `get_nb_trainable_parameters`: every
    /// parameter counts once in `all` (tied weights once), adapters and `modules_to_save`
    /// copies included.
    pub fn parameter_counts(&self) -> ParameterCounts {
        let config = &self.base.config;
        let mut all = config.num_parameters();
        let mut trainable = 0;
        for (_, proj) in self.base.model.projections() {
            if let Some(adapter) = &proj.adapter {
                let n = adapter.rank() * (proj.d_input() + proj.d_output());
                all += n;
                trainable += n;
            }
            let bias_trains = self.lora_config.bias.trains(proj.adapter.is_some());
            if let (Some(bias), true) = (&proj.bias, bias_trains) {
                trainable += bias.dims()[0];
            }
        }
        // PEFT keeps each `modules_to_save` original beside its trainable copy: both count in
        // `all`. (An lm_head we untie internally is still one parameter in PEFT's count.)
        let copies = self
            .lora_config
            .modules_to_save
            .as_ref()
            .map_or(0, Vec::len);
        let copy_size = config.vocab_size * config.hidden_size;
        all += copies * copy_size;
        trainable += copies * copy_size;
        ParameterCounts { trainable, all }
    }

    /// Prints PEFT's `trainable params: … || all params: … || trainable%: …` line and returns it.
    pub fn print_trainable_parameters(&self) -> String {
        let line = self.parameter_counts().to_string();
        println!("{line}");
        line
    }

    /// Switches to training mode: LoRA dropout as configured, gradient checkpointing as
    /// configured (Unsloth's `for_training`).
    pub fn for_training(mut self) -> Self {
        self.training = true;
        self.base.model.checkpointing = self.report.checkpointing;
        self.set_lora_dropout(self.lora_config.lora_dropout);
        self
    }

    /// Switches to inference mode: no LoRA dropout, no gradient checkpointing (Unsloth's
    /// `for_inference`).
    pub fn for_inference(mut self) -> Self {
        self.training = false;
        self.base.model.checkpointing = CheckpointMode::Off;
        self.set_lora_dropout(0.0);
        self
    }

    /// Gives every trainable parameter an id derived from its PEFT name, so optimizer state
    /// saved by one process finds its parameters in another (Burn keys optimizer state by id,
    /// and fresh ids are random).
    pub(crate) fn stamp_parameter_ids(&mut self) {
        fn stamp<B: Backend, const D: usize>(param: &mut Param<Tensor<B, D>>, key: &str) {
            let id = burn::module::ParamId::from(module_seed(0, key));
            *param = Param::initialized(id, param.val());
        }
        let model = &mut self.base.model;
        for (name, proj) in model.projections_mut() {
            if let Some(adapter) = proj.adapter.as_mut() {
                stamp(&mut adapter.lora_a, &format!("{name}.lora_A"));
                stamp(&mut adapter.lora_b, &format!("{name}.lora_B"));
            }
            if let Some(bias) = proj.bias.as_mut() {
                stamp(bias, &format!("{name}.bias"));
            }
            // A packed base is no parameter: nothing to stamp.
            if let Some(weight) = proj.weight.as_dense_mut() {
                stamp(weight, &format!("{name}.weight"));
            }
        }
        stamp(&mut model.embed_tokens.weight, "model.embed_tokens.weight");
    }

    fn set_lora_dropout(&mut self, prob: f64) {
        for (_, proj) in self.base.model.projections_mut() {
            if let Some(adapter) = proj.adapter.as_mut() {
                adapter.dropout = burn::nn::DropoutConfig::new(prob).init();
            }
        }
    }

    /// Whether the model is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Folds every adapter into its base weight and removes it; `modules_to_save` copies replace
    /// their originals, as PEFT's `merge_and_unload`.
    pub fn merge_and_unload(mut self) -> FastLanguageModel<B> {
        for (_, proj) in self.base.model.projections_mut() {
            let mut merged = proj.clone().merge_and_unload().set_bias_trainable(false);
            // A trained `modules_to_save` head is base weight again after the merge.
            if let Some(weight) = merged.weight.as_dense_mut() {
                *weight = weight.clone().set_require_grad(false);
            }
            *proj = merged;
        }
        let model = &mut self.base.model;
        model.embed_tokens.weight = model.embed_tokens.weight.clone().set_require_grad(false);
        model.checkpointing = CheckpointMode::Off;
        self.base
    }
}

/// Maps PEFT's `init_lora_weights` onto the initialisations this crate draws.
fn lora_init(init: &InitLoraWeights) -> Result<LoraInit> {
    Ok(match init {
        InitLoraWeights::Standard => LoraInit::KaimingUniform,
        InitLoraWeights::Random => LoraInit::Random,
        InitLoraWeights::Gaussian => LoraInit::Gaussian,
        // PEFT's `pissa_niter_K` is a randomised SVD; the exact SVD is its limit.
        InitLoraWeights::Pissa { .. } => LoraInit::Pissa,
        other => {
            return Err(lora_config::LoraConfigError::UnsupportedInit {
                value: other.to_string(),
            }
            .into());
        }
    })
}

/// With tied embeddings, a trained or adapted `lm_head`, or a trained `embed_tokens`, needs
/// its own copy of the shared matrix unless `ensure_weight_tying` keeps them one parameter
/// (PEFT's `ModulesToSaveWrapper` copies the module; the tied partner keeps the original).
fn untie_if_needed<B: Backend>(
    model: &mut LlamaForCausalLm<B>,
    config: &LoraConfig,
    train_embed: bool,
    train_head: bool,
    notices: &mut Vec<String>,
) {
    if model.lm_head.is_some() {
        return;
    }
    let head_targeted = config.targets("lm_head");
    if config.ensure_weight_tying && !head_targeted {
        return;
    }
    if train_embed || train_head || head_targeted {
        let shared = model.embed_tokens.weight.val().detach();
        model.lm_head = Some(LoraLinear::from_weights(shared, None));
        notices.push(
            "tied embeddings: lm_head now holds its own copy of the embedding matrix, so training one does not change the other (set ensure_weight_tying to keep them one)".to_string(),
        );
    }
}

/// Makes the `modules_to_save` weights trainable. A head still tied at this point (kept one
/// parameter by `ensure_weight_tying`) trains through the shared embedding matrix.
fn make_modules_to_save_trainable<B: Backend>(
    model: &mut LlamaForCausalLm<B>,
    embed: bool,
    head: bool,
) {
    if embed || (head && model.lm_head.is_none()) {
        let w = model.embed_tokens.weight.val().detach();
        model.embed_tokens.weight = Param::from_tensor(w).set_require_grad(true);
    }
    if head && let Some(lm_head) = model.lm_head.as_mut() {
        let w = lm_head.base_weight().detach();
        lm_head.weight = BaseWeight::Dense(Param::from_tensor(w).set_require_grad(true));
    }
}

fn patch_report<B: Backend>(
    model: &LlamaForCausalLm<B>,
    config: &LoraConfig,
    adapted_modules: Vec<String>,
    checkpointing: CheckpointMode,
    notices: Vec<String>,
) -> PatchReport {
    // Unsloth's global gate: the fused kernels take no dropout and no trainable bias.
    let gate_open = config.lora_dropout == 0.0 && config.bias == Bias::None;
    let fusable = |projs: &[&LoraLinear<B>]| {
        gate_open
            && projs
                .iter()
                .all(|p| p.adapter.is_some() && p.bias.is_none())
    };
    let (mut qkv, mut o, mut mlp) = (0, 0, 0);
    for layer in &model.layers {
        let a = &layer.self_attn;
        qkv += usize::from(
            gate_open && fused_mlp::check_qkv_fusable(&a.q_proj, &a.k_proj, &a.v_proj).is_ok(),
        );
        o += usize::from(fusable(&[&a.o_proj]));
        let m = &layer.mlp;
        mlp += usize::from(
            gate_open && fused_mlp::check_fusable(&m.gate_proj, &m.up_proj, &m.down_proj).is_ok(),
        );
    }
    let mut notices = notices;
    let device = model.embed_tokens.weight.device();
    if checkpointing != CheckpointMode::Off
        && B::ad_enabled(&device)
        && !checkpointing::is_supported::<B>()
    {
        notices.push(format!(
            "gradient checkpointing is not available on backend {}; decoder layers keep their activations (same gradients, more memory)",
            B::name(&device)
        ));
    }
    PatchReport {
        layers: model.layers.len(),
        adapted_modules,
        fusable_qkv: qkv,
        fusable_o: o,
        fusable_mlp: mlp,
        fused_kernels_active: fused_mlp::fused_backend::<B>() && fused_mlp::fused_enabled(),
        attention: AttentionPath::of::<B>(),
        checkpointing,
        notices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_matches_python_grouping() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn counts_line_is_peft_format() {
        let line = ParameterCounts {
            trainable: 1_843_200,
            all: 136_358_208,
        }
        .to_string();
        assert_eq!(
            line,
            "trainable params: 1,843,200 || all params: 136,358,208 || trainable%: 1.3517"
        );
    }
}
