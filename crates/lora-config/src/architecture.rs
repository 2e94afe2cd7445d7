//! What validation needs to know about the model a config is applied to.

use crate::targeting::{ModuleKind, last_component};

/// The module layout of a decoder-only model, as far as LoRA placement is concerned.
///
/// Build it with [`ArchitectureInfo::llama`] for Llama-family models (Llama, Mistral, Qwen2,
/// ... share the layout), or fill the fields for another layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchitectureInfo {
    /// Number of decoder layers; `layers_to_transform` indices must be below it.
    pub num_layers: usize,
    /// Dotted path of the decoder layer list, e.g. `model.layers`; layer `i` is
    /// `{layers_prefix}.{i}`.
    pub layers_prefix: String,
    /// Linear layers inside each decoder layer, as paths relative to the layer, e.g.
    /// `self_attn.q_proj`.
    pub layer_linear_modules: Vec<String>,
    /// Full name of the token embedding, e.g. `model.embed_tokens`.
    pub embedding_module: String,
    /// Full name of the output projection, e.g. `lm_head`.
    pub lm_head_module: String,
    /// PEFT's per-architecture fallback used when `target_modules` is `None`.
    pub default_target_modules: Vec<String>,
}

impl ArchitectureInfo {
    /// The Llama layout with `num_layers` decoder layers: attention `q/k/v/o_proj`, MLP
    /// `gate/up/down_proj`, `model.embed_tokens` and `lm_head`. PEFT's fallback targets are
    /// `q_proj` and `v_proj`.
    pub fn llama(num_layers: usize) -> Self {
        let attention = ["q_proj", "k_proj", "v_proj", "o_proj"].map(|n| format!("self_attn.{n}"));
        let mlp = ["gate_proj", "up_proj", "down_proj"].map(|n| format!("mlp.{n}"));
        ArchitectureInfo {
            num_layers,
            layers_prefix: "model.layers".to_owned(),
            layer_linear_modules: attention.into_iter().chain(mlp).collect(),
            embedding_module: "model.embed_tokens".to_owned(),
            lm_head_module: "lm_head".to_owned(),
            default_target_modules: vec!["q_proj".to_owned(), "v_proj".to_owned()],
        }
    }

    /// Short names of the Linear layers inside a decoder layer: `q_proj`, ..., `down_proj`.
    pub fn linear_module_names(&self) -> Vec<String> {
        self.layer_linear_modules
            .iter()
            .map(|path| last_component(path).to_owned())
            .collect()
    }

    /// Short name of the token embedding: `embed_tokens`.
    pub fn embedding_name(&self) -> &str {
        last_component(&self.embedding_module)
    }

    /// Short name of the output projection: `lm_head`.
    pub fn lm_head_name(&self) -> &str {
        last_component(&self.lm_head_module)
    }

    /// Every module that can carry an adapter, by full dotted name: the embedding, each
    /// layer's Linear layers in order, then the output projection.
    pub fn modules(&self) -> Vec<(String, ModuleKind)> {
        let per_layer = (0..self.num_layers).flat_map(|layer| {
            self.layer_linear_modules.iter().map(move |path| {
                (
                    format!("{}.{layer}.{path}", self.layers_prefix),
                    ModuleKind::Linear,
                )
            })
        });
        std::iter::once((self.embedding_module.clone(), ModuleKind::Embedding))
            .chain(per_layer)
            .chain(std::iter::once((
                self.lm_head_module.clone(),
                ModuleKind::Linear,
            )))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_layout() {
        let arch = ArchitectureInfo::llama(2);
        assert_eq!(
            arch.linear_module_names(),
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ]
        );
        assert_eq!(arch.embedding_name(), "embed_tokens");
        assert_eq!(arch.lm_head_name(), "lm_head");
        let modules = arch.modules();
        assert_eq!(modules.len(), 1 + 2 * 7 + 1);
        assert_eq!(
            modules[0],
            ("model.embed_tokens".to_owned(), ModuleKind::Embedding)
        );
        assert_eq!(modules[1].0, "model.layers.0.self_attn.q_proj");
        assert_eq!(modules[14].0, "model.layers.1.mlp.down_proj");
        assert_eq!(modules[15], ("lm_head".to_owned(), ModuleKind::Linear));
    }
}
