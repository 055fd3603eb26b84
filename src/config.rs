//! Adapter configuration: PEFT-compatible JSON per method, and PEFT's target selection rules.
//!
//! Target selection follows `peft.tuners.tuners_utils.check_target_module_exists`:
//! - `target_modules` as a list matches a module whose name equals an entry or ends with
//!   `.<entry>`; as a string it is a regex that must match the whole module name.
//! - `exclude_modules` uses the same rules and wins over `target_modules`.
//! - `layers_to_transform` keeps modules whose layer index is listed. The index is the number in
//!   the last `.<segment>.<digits>.` of the name, or the one after a `layers_pattern` segment.
//! - `rank_pattern` / `alpha_pattern` keys match when `^(.*\.)?(<key>)$` matches the module name;
//!   keys are tried in sorted order (the order PEFT writes them, since it sorts JSON keys).

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use crate::adapter::{Adapter, LayerGeometry, Method};
use crate::adapters::lora::LoraConfig;
use crate::error::{PeftError, Result};

/// `target_modules` / `exclude_modules`: a list of names or suffixes, or one regex.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    List(Vec<String>),
    Regex(String),
}

impl ModuleSelector {
    pub fn list<S: AsRef<str>>(names: &[S]) -> Self {
        ModuleSelector::List(names.iter().map(|s| s.as_ref().to_string()).collect())
    }

    /// Does `module` (a full HF module path) match?
    pub fn matches(&self, module: &str) -> Result<bool> {
        match self {
            ModuleSelector::List(names) => Ok(names.iter().any(|n| suffix_match(module, n))),
            ModuleSelector::Regex(pattern) => {
                Ok(full_regex(pattern, "target_modules")?.is_match(module))
            }
        }
    }
}

impl std::fmt::Display for ModuleSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSelector::List(names) => write!(f, "{names:?}"),
            ModuleSelector::Regex(p) => write!(f, "regex {p:?}"),
        }
    }
}

/// `name == key` or `name` ends with `.key`.
pub(crate) fn suffix_match(name: &str, key: &str) -> bool {
    name == key
        || (name.len() > key.len()
            && name.ends_with(key)
            && name.as_bytes()[name.len() - key.len() - 1] == b'.')
}

fn full_regex(pattern: &str, field: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| PeftError::config(field, format!("invalid regex {pattern:?}: {e}")))
}

/// An int or a list of ints, as PEFT accepts for `layers_to_transform`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// The target-selection fields every method's config carries (PEFT names).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Targeting {
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

impl Targeting {
    pub fn new(target_modules: ModuleSelector) -> Self {
        Self {
            target_modules: Some(target_modules),
            ..Self::default()
        }
    }

    /// Checks the fields that can be wrong on their own.
    pub fn validate(&self) -> Result<()> {
        match &self.target_modules {
            None => {
                return Err(PeftError::config(
                    "target_modules",
                    "must be set (a list of module names or a regex)",
                ));
            }
            Some(ModuleSelector::List(l)) if l.is_empty() => {
                return Err(PeftError::config("target_modules", "is an empty list"));
            }
            Some(ModuleSelector::Regex(p)) => {
                full_regex(p, "target_modules")?;
                if self.layers_to_transform.is_some() {
                    return Err(PeftError::config(
                        "layers_to_transform",
                        "only works when target_modules is a list, not a regex",
                    ));
                }
            }
            Some(ModuleSelector::List(_)) => {}
        }
        if let Some(ModuleSelector::Regex(p)) = &self.exclude_modules {
            full_regex(p, "exclude_modules")?;
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(PeftError::config(
                "layers_pattern",
                "requires layers_to_transform",
            ));
        }
        Ok(())
    }

    /// Is `module` a target? (Not counting `modules_to_save`.)
    pub fn is_target(&self, module: &str) -> Result<bool> {
        let Some(targets) = &self.target_modules else {
            return Ok(false);
        };
        if let Some(exclude) = &self.exclude_modules {
            if exclude.matches(module)? {
                return Ok(false);
            }
        }
        if !targets.matches(module)? {
            return Ok(false);
        }
        if let Some(layers) = &self.layers_to_transform {
            let layers = layers.to_vec();
            return Ok(match layer_index(module, self.layers_pattern.as_ref())? {
                Some(i) => layers.contains(&i),
                None => false,
            });
        }
        Ok(true)
    }

    /// Is `module` one whose full weights are trained and saved (`modules_to_save`)?
    pub fn is_module_to_save(&self, module: &str) -> bool {
        self.modules_to_save
            .as_ref()
            .is_some_and(|m| m.iter().any(|k| suffix_match(module, k)))
    }
}

/// The layer index PEFT reads from a module name, if any.
fn layer_index(module: &str, layers_pattern: Option<&OneOrMany<String>>) -> Result<Option<usize>> {
    let patterns = match layers_pattern {
        None => vec![r".*\.[^.]*\.(\d+)\.".to_string()],
        Some(p) => p
            .to_vec()
            .iter()
            .map(|p| format!(r".*\.{p}\.(\d+)\."))
            .collect(),
    };
    for p in patterns {
        let re = Regex::new(&format!("^(?:{p})"))
            .map_err(|e| PeftError::config("layers_pattern", e.to_string()))?;
        if let Some(c) = re.captures(module) {
            return Ok(c.get(1).and_then(|m| m.as_str().parse().ok()));
        }
    }
    Ok(None)
}

/// PEFT's `get_pattern_key`: the value of the first pattern matching `module`, if any.
pub fn pattern_value<V: Copy>(
    patterns: &BTreeMap<String, V>,
    module: &str,
    field: &str,
) -> Result<Option<V>> {
    for (key, value) in patterns {
        let re = Regex::new(&format!(r"^(.*\.)?({key})$"))
            .map_err(|e| PeftError::config(field, format!("invalid pattern {key:?}: {e}")))?;
        if re.is_match(module) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

/// The config of one adapter, for any method this build supports.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterConfig {
    Lora(LoraConfig),
}

impl AdapterConfig {
    pub fn method(&self) -> Method {
        match self {
            AdapterConfig::Lora(_) => Method::Lora,
        }
    }

    pub fn targeting(&self) -> &Targeting {
        match self {
            AdapterConfig::Lora(c) => &c.targeting,
        }
    }

    /// Whether base weights are stored `[in, out]` (PEFT's `fan_in_fan_out`).
    pub fn fan_in_fan_out(&self) -> bool {
        match self {
            AdapterConfig::Lora(c) => c.fan_in_fan_out,
        }
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        match self {
            AdapterConfig::Lora(c) => c.validate(),
        }
    }

    /// The JSON written to `adapter_config.json` (PEFT's field names; keys sorted as PEFT sorts).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        match self {
            AdapterConfig::Lora(c) => c.to_peft_json(),
        }
    }

    /// Reads `adapter_config.json` content, dispatching on `peft_type`. Unknown fields are ignored,
    /// as PEFT ignores them.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let peft_type = value
            .get("peft_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| PeftError::config("peft_type", "missing or not a string"))?;
        let config = match peft_type {
            "LORA" => AdapterConfig::Lora(LoraConfig::from_peft_json(value)?),
            other => return Err(PeftError::UnknownPeftType(other.to_string())),
        };
        config.validate()?;
        Ok(config)
    }

    /// A fresh adapter for `module`, drawn from `rng`.
    pub fn init_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        match self {
            AdapterConfig::Lora(c) => Ok(Box::new(c.init_adapter(module, geometry, device, rng)?)),
        }
    }

    /// The adapter for `module` rebuilt from its saved tensors (names relative to the layer).
    pub fn load_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        tensors: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Box<dyn Adapter>> {
        match self {
            AdapterConfig::Lora(c) => {
                Ok(Box::new(c.load_adapter(module, geometry, tensors, device)?))
            }
        }
    }

    /// The first segments of this method's per-layer tensor names (`lora_A`, `lora_B`), used to
    /// split a file key into module path and tensor name.
    pub fn tensor_prefixes(&self) -> &'static [&'static str] {
        match self {
            AdapterConfig::Lora(_) => LoraConfig::TENSOR_PREFIXES,
        }
    }
}

impl From<LoraConfig> for AdapterConfig {
    fn from(c: LoraConfig) -> Self {
        AdapterConfig::Lora(c)
    }
}
