//! PEFT's target selection rules, as in `peft.tuners.tuners_utils.check_target_module_exists`:
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

use crate::error::{PeftError, Result};

/// `target_modules` / `exclude_modules`: a list of names or suffixes, or one regex.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// Names or suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// One regex that must match the whole module name.
    Regex(String),
}

impl ModuleSelector {
    /// A list selector of `names`.
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
    /// A single value.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The values as a list.
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
    /// The modules to adapt.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Modules never adapted, even when `target_modules` matches them.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Layer indices to adapt (all when absent).
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    /// The name segment(s) before the layer index (`layers`, `h`).
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Modules whose full weights are trained and saved.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

impl Targeting {
    /// Targeting `target_modules`, every other field unset.
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
