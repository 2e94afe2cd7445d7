//! Which modules get LoRA adapters: `target_modules`, `exclude_modules`, `layers_to_transform`
//! and `layers_pattern`, matched the way PEFT's `check_target_module_exists` does.
//!
//! PEFT's patterns are Python regular expressions; they are compiled here with the `regex`
//! crate, whose syntax covers what adapter configs use in practice (no look-around, no
//! back-references). A pattern that does not compile matches nothing here, and
//! [`LoraConfig::validate_values`] reports it.

use std::collections::BTreeSet;
use std::fmt;

use regex::Regex;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::LoraConfig;

/// The name PEFT's `"all-linear"` leaves out: the output projection of a causal LM.
pub(crate) const LM_HEAD: &str = "lm_head";

/// The `target_modules` value that selects every Linear layer except the output projection.
pub const ALL_LINEAR: &str = "all-linear";

/// Which modules receive LoRA adapters (PEFT's `target_modules`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetModules {
    /// A set of names. A module is targeted when its full dotted name equals an entry or ends
    /// with `.` followed by the entry, so `q_proj` selects `model.layers.3.self_attn.q_proj`.
    /// Written as a sorted list.
    Names(BTreeSet<String>),
    /// A regular expression that must match the full dotted module name.
    Pattern(String),
    /// `"all-linear"`: every Linear layer except `lm_head`.
    AllLinear,
}

impl TargetModules {
    /// A [`TargetModules::Names`] set from any list of names.
    pub fn names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TargetModules::Names(names.into_iter().map(Into::into).collect())
    }

    /// Unsloth's default: the seven projections of a Llama decoder layer.
    pub fn unsloth_default() -> Self {
        Self::names([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ])
    }

    pub(crate) fn to_json_value(&self) -> Value {
        match self {
            TargetModules::Names(names) => Value::from_iter(names.iter().cloned()),
            TargetModules::Pattern(pattern) => Value::from(pattern.as_str()),
            TargetModules::AllLinear => Value::from(ALL_LINEAR),
        }
    }
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json_value())
    }
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match deserializer.deserialize_any(NamesOrPatternVisitor)? {
            NamesOrPattern::Names(names) => TargetModules::Names(names),
            // PEFT compares the shorthand case-insensitively.
            NamesOrPattern::Pattern(text) if text.eq_ignore_ascii_case(ALL_LINEAR) => {
                TargetModules::AllLinear
            }
            NamesOrPattern::Pattern(pattern) => TargetModules::Pattern(pattern),
        })
    }
}

/// Modules that never receive adapters (PEFT's `exclude_modules`); it takes precedence over
/// [`TargetModules`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExcludeModules {
    /// Names matched like [`TargetModules::Names`]: the full name or a `.`-separated suffix.
    Names(BTreeSet<String>),
    /// A regular expression that must match the full dotted module name.
    Pattern(String),
}

impl ExcludeModules {
    pub(crate) fn to_json_value(&self) -> Value {
        match self {
            ExcludeModules::Names(names) => Value::from_iter(names.iter().cloned()),
            ExcludeModules::Pattern(pattern) => Value::from(pattern.as_str()),
        }
    }
}

impl Serialize for ExcludeModules {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ExcludeModules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match deserializer.deserialize_any(NamesOrPatternVisitor)? {
            NamesOrPattern::Names(names) => ExcludeModules::Names(names),
            NamesOrPattern::Pattern(pattern) => ExcludeModules::Pattern(pattern),
        })
    }
}

/// The shape shared by `target_modules` and `exclude_modules` in JSON.
enum NamesOrPattern {
    Names(BTreeSet<String>),
    Pattern(String),
}

struct NamesOrPatternVisitor;

impl<'de> Visitor<'de> for NamesOrPatternVisitor {
    type Value = NamesOrPattern;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of module names, a regular expression, or \"all-linear\"")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(NamesOrPattern::Pattern(text.to_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut names = BTreeSet::new();
        while let Some(name) = seq.next_element::<String>()? {
            names.insert(name);
        }
        Ok(NamesOrPattern::Names(names))
    }
}

/// What kind of layer a module is; `"all-linear"` selects only [`ModuleKind::Linear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    /// A dense projection (`nn.Linear`).
    Linear,
    /// A token embedding (`nn.Embedding`).
    Embedding,
}

impl LoraConfig {
    /// Whether the Linear layer with this full dotted name (e.g.
    /// `model.layers.3.self_attn.q_proj`) gets a LoRA adapter.
    ///
    /// Shorthand for [`LoraConfig::targets_with_kind`] with [`ModuleKind::Linear`], the only
    /// layers a Llama adapter wraps. Call it on a config that went through
    /// [`LoraConfig::normalize`]: a `target_modules` of `None` (PEFT's "use the architecture's
    /// default") targets nothing here.
    pub fn targets(&self, module_name: &str) -> bool {
        self.targets_with_kind(module_name, ModuleKind::Linear)
    }

    /// Whether the module with this full dotted name and kind gets a LoRA adapter, following
    /// PEFT's `check_target_module_exists`:
    ///
    /// 1. `exclude_modules` and `modules_to_save` win: such modules are never adapted.
    /// 2. A [`TargetModules::Pattern`] must match the whole name.
    /// 3. A [`TargetModules::Names`] entry must equal the name or be a `.`-separated suffix.
    ///    [`TargetModules::AllLinear`] selects every [`ModuleKind::Linear`] except `lm_head`.
    /// 4. For suffix matches and `"all-linear"`, `layers_to_transform` (when non-empty) then
    ///    keeps only modules whose layer index is listed. The index is the number after the
    ///    first `.{layers_pattern}.` in the name (any `.<segment>.<number>.` when
    ///    `layers_pattern` is unset); a module without one is not adapted. An exact name match
    ///    and a regular expression skip this filter, as in PEFT.
    pub fn targets_with_kind(&self, module_name: &str, kind: ModuleKind) -> bool {
        if self.is_excluded(module_name) || self.is_saved_in_full(module_name) {
            return false;
        }
        match &self.target_modules {
            None => false,
            Some(TargetModules::Pattern(pattern)) => full_match(pattern, module_name),
            Some(TargetModules::Names(names)) => {
                names.contains(module_name)
                    || (names.iter().any(|name| is_dotted_suffix(name, module_name))
                        && self.is_in_selected_layer(module_name))
            }
            Some(TargetModules::AllLinear) => {
                kind == ModuleKind::Linear
                    && last_component(module_name) != LM_HEAD
                    && self.is_in_selected_layer(module_name)
            }
        }
    }

    fn is_excluded(&self, module_name: &str) -> bool {
        match &self.exclude_modules {
            None => false,
            Some(ExcludeModules::Pattern(pattern)) => full_match(pattern, module_name),
            Some(ExcludeModules::Names(names)) => {
                names.iter().any(|name| is_dotted_suffix(name, module_name))
            }
        }
    }

    /// PEFT never puts an adapter inside a module that is trained in full: the two would
    /// fight over the same weights.
    fn is_saved_in_full(&self, module_name: &str) -> bool {
        self.modules_to_save.iter().flatten().any(|saved| {
            anchored(&format!(r"(?:.*\.)?(?:{saved})(?:\..*)?"))
                .is_some_and(|re| re.is_match(module_name))
        })
    }

    fn is_in_selected_layer(&self, module_name: &str) -> bool {
        match self.layers_to_transform.as_deref() {
            None | Some([]) => true,
            Some(selected) => layer_index(module_name, self.layers_pattern.as_deref())
                .is_some_and(|index| selected.contains(&index)),
        }
    }
}

/// The decoder-layer index in a module name, found PEFT's way: the number after the first
/// `.{pattern}.` for the first pattern that matches, or after the first `.<segment>.` when no
/// pattern is given.
///
/// Unlike PEFT, which pastes the pattern into its regex as is, the pattern is grouped, so an
/// alternation like `layers|h` stays inside the layer-name position.
pub(crate) fn layer_index(module_name: &str, layers_pattern: Option<&[String]>) -> Option<usize> {
    let index_after = |segment: &str| {
        // `.*?` is lazy so that the first numbered segment wins: in MoE names like
        // `layers.1.experts.0.` the layer is 1, not the expert 0.
        Regex::new(&format!(r"^.*?\.(?:{segment})\.(?P<index>[0-9]+)\."))
            .ok()?
            .captures(module_name)?
            .name("index")?
            .as_str()
            .parse::<usize>()
            .ok()
    };
    match layers_pattern {
        None | Some([]) => index_after(r"[^.]*"),
        Some(patterns) => patterns.iter().find_map(|pattern| index_after(pattern)),
    }
}

/// Whether a `rank_pattern`/`alpha_pattern` key selects this module: PEFT's
/// `re.match(rf"(.*\.)?({key})$", module_name)`.
pub(crate) fn pattern_key_matches(key: &str, module_name: &str) -> bool {
    anchored(&format!(r"(?:.*\.)?(?:{key})")).is_some_and(|re| re.is_match(module_name))
}

/// Python's `re.fullmatch(pattern, text)`.
pub(crate) fn full_match(pattern: &str, text: &str) -> bool {
    anchored(pattern).is_some_and(|re| re.is_match(text))
}

/// Compiles `^(?:body)$`, or `None` when `body` is not a valid regular expression.
fn anchored(body: &str) -> Option<Regex> {
    Regex::new(&format!("^(?:{body})$")).ok()
}

/// `name == entry` or `name` ends with `.{entry}`.
pub(crate) fn is_dotted_suffix(entry: &str, name: &str) -> bool {
    name.strip_suffix(entry)
        .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
}

/// The part after the last `.`: `q_proj` for `model.layers.0.self_attn.q_proj`.
pub(crate) fn last_component(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q3: &str = "model.layers.3.self_attn.q_proj";

    fn with_targets(targets: TargetModules) -> LoraConfig {
        LoraConfig {
            target_modules: Some(targets),
            ..LoraConfig::default()
        }
    }

    #[test]
    fn names_match_exactly_or_as_dotted_suffix() {
        let config = with_targets(TargetModules::names(["q_proj", "mlp.down_proj"]));
        assert!(config.targets(Q3));
        assert!(config.targets("model.layers.0.mlp.down_proj"));
        assert!(config.targets("q_proj"));
        // A suffix must start at a `.`: `xq_proj` is another module.
        assert!(!config.targets("model.layers.0.self_attn.xq_proj"));
        assert!(!config.targets("model.layers.0.self_attn.k_proj"));
        assert!(!config.targets("model.layers.0.down_proj"));
    }

    #[test]
    fn pattern_must_match_whole_name() {
        let config = with_targets(TargetModules::Pattern(r".*\.(q|v)_proj".into()));
        assert!(config.targets(Q3));
        assert!(config.targets("model.layers.10.self_attn.v_proj"));
        assert!(!config.targets("model.layers.10.self_attn.k_proj"));
        // Without full-match semantics `q_proj` alone would hit `q_proj_extra`.
        let partial = with_targets(TargetModules::Pattern("q_proj".into()));
        assert!(!partial.targets(Q3));
        assert!(partial.targets("q_proj"));
        let broken = with_targets(TargetModules::Pattern("(".into()));
        assert!(!broken.targets(Q3));
    }

    #[test]
    fn all_linear_skips_lm_head_and_embeddings() {
        let config = with_targets(TargetModules::AllLinear);
        assert!(config.targets(Q3));
        assert!(config.targets("model.layers.0.mlp.gate_proj"));
        assert!(!config.targets("lm_head"));
        assert!(!config.targets_with_kind("model.embed_tokens", ModuleKind::Embedding));
    }

    #[test]
    fn layers_to_transform_filters_suffix_matches() {
        let mut config = LoraConfig {
            layers_to_transform: Some(vec![0, 3]),
            ..LoraConfig::default()
        };
        assert!(config.targets(Q3));
        assert!(config.targets("model.layers.0.mlp.up_proj"));
        assert!(!config.targets("model.layers.1.mlp.up_proj"));
        assert!(!config.targets("model.layers.30.mlp.up_proj"));

        config.layers_pattern = Some(vec!["h".into()]);
        assert!(!config.targets(Q3), "no `.h.<n>.` segment in a Llama name");
        assert!(config.targets("transformer.h.3.attn.q_proj"));

        config.layers_pattern = Some(vec!["blocks".into(), "layers".into()]);
        assert!(config.targets(Q3));

        config.target_modules = Some(TargetModules::AllLinear);
        assert!(config.targets(Q3));
        assert!(!config.targets("model.layers.2.self_attn.q_proj"));
    }

    #[test]
    fn layer_index_takes_the_first_numbered_segment() {
        let name = "model.layers.1.mlp.experts.0.down_proj";
        assert_eq!(layer_index(name, None), Some(1));
        assert_eq!(layer_index(name, Some(&["experts".into()])), Some(0));
        assert_eq!(layer_index("lm_head", None), None);
    }

    #[test]
    fn exclusions_and_modules_to_save_win() {
        let mut config = with_targets(TargetModules::AllLinear);
        config.exclude_modules = Some(ExcludeModules::Names(["o_proj".to_owned()].into()));
        assert!(!config.targets("model.layers.0.self_attn.o_proj"));
        assert!(config.targets(Q3));

        config.exclude_modules = Some(ExcludeModules::Pattern(r".*\.layers\.0\..*".into()));
        assert!(!config.targets("model.layers.0.self_attn.q_proj"));
        assert!(config.targets("model.layers.1.self_attn.q_proj"));

        let mut config = with_targets(TargetModules::names(["lm_head", "q_proj"]));
        assert!(config.targets("lm_head"));
        config.modules_to_save = Some(vec!["lm_head".into()]);
        assert!(!config.targets("lm_head"));
        assert!(config.targets(Q3));
    }

    #[test]
    fn pattern_keys_match_dotted_suffixes() {
        assert!(pattern_key_matches("q_proj", Q3));
        assert!(pattern_key_matches(r"layers\.3\.self_attn\.q_proj", Q3));
        assert!(pattern_key_matches(r"^model.layers.3.self_attn.q_proj", Q3));
        assert!(!pattern_key_matches("proj", Q3));
        assert!(!pattern_key_matches("(", Q3));
    }

    #[test]
    fn target_modules_json_forms() {
        let list: TargetModules = serde_json::from_str(r#"["v_proj","q_proj","q_proj"]"#).unwrap();
        assert_eq!(list, TargetModules::names(["q_proj", "v_proj"]));
        assert_eq!(
            list.to_json_value(),
            serde_json::json!(["q_proj", "v_proj"])
        );
        let all: TargetModules = serde_json::from_str(r#""ALL-LINEAR""#).unwrap();
        assert_eq!(all, TargetModules::AllLinear);
        let regex: TargetModules = serde_json::from_str(r#"".*q_proj""#).unwrap();
        assert_eq!(regex, TargetModules::Pattern(".*q_proj".into()));
        let err = serde_json::from_str::<TargetModules>("3").unwrap_err();
        assert!(err.to_string().contains("a list of module names"), "{err}");
    }
}
