//! PEFT 0.21's target selection (`peft.tuners.tuners_utils.check_target_module_exists` and
//! `_maybe_include_all_linear_layers`), applied to a model's adaptable layers:
//! - `exclude_modules` wins first: as a list, a module whose name equals an entry or ends with
//!   `.<entry>`; as a string, a regex that must match the whole name.
//! - A module that `modules_to_save` covers (`re.match(r"(^|.*\.){m}($|\..*)", name)`) is never
//!   a target; the modules trained whole are those whose name ends with an entry
//!   (`name.endswith(m)`, as PEFT's `_set_trainable`).
//! - `target_modules` as a list matches a name equal to an entry or ending with `.<entry>`; as a
//!   string it is a regex that must match the whole name, except `"all-linear"` (any case): every
//!   linear layer but the model's output layer (`lm_head`, see [`OUTPUT_LAYER_NAMES`]), or, for
//!   `task_type: "SEQ_CLS"` with no output layer, but the classification head (the first of
//!   [`SEQ_CLS_HEAD_NAMES`] the model has).
//! - `layers_to_transform` (an int or a list) applies only when `target_modules` is a list and
//!   the name is not itself an entry. The layer index is the number after the FIRST
//!   `.<segment>.` followed by digits (`.*?\.[^.]*\.(\d+)\.`), or, with `layers_pattern` (a string
//!   or a list, tried in order), the number after the first `<pattern>.` (`(?:^|.*?\.)<pattern>\.(\d+)\.`).
//!   A name without an index is not a target.
//! - Regexes use Python's syntax (lookaround included), as PEFT's `re` does.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::diagnose;
use super::selector::{ModuleSelector, OneOrMany, PyRegex, suffix_match};
use crate::error::{PeftError, Result};

/// The output layers `"all-linear"` leaves out: transformers' `get_output_embeddings()` module of
/// every causal-LM architecture this crate builds (a top-level module of that name).
pub const OUTPUT_LAYER_NAMES: &[&str] = &["lm_head"];

/// The classification heads `"all-linear"` leaves out for `task_type: "SEQ_CLS"` (PEFT's
/// `SEQ_CLS_HEAD_NAMES`, tried in this order, top-level modules). PEFT also adds them to
/// `modules_to_save` for that task, so an entry among them that matches nothing is not an error.
pub const SEQ_CLS_HEAD_NAMES: &[&str] = &["score", "classifier"];

/// PEFT's `task_type` of sequence classification.
const SEQ_CLS: &str = "SEQ_CLS";

/// PEFT condenses a `target_modules` list of at least this many names to suffixes
/// (`MIN_TARGET_MODULES_FOR_OPTIMIZATION`).
const MIN_TARGETS_TO_CONDENSE: usize = 20;

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
    /// The name segment(s) before the layer index (`layers`, `h`); regexes, as in PEFT.
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Modules whose full weights are trained and saved.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// A module [`Targeting::select`] may pick: its path and whether it is a linear layer (the
/// layers `"all-linear"` means).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate<'a> {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub name: &'a str,
    /// A linear layer (not a convolution).
    pub linear: bool,
}

/// What a config selects from a model's candidate modules (indices into the candidates, in
/// their order).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection {
    /// The modules adapted.
    pub targets: Vec<usize>,
    /// The modules trained whole (`modules_to_save`).
    pub to_save: Vec<usize>,
    /// `target_modules` as PEFT keeps it after adding the adapter, when that differs from the
    /// config's: `"all-linear"` resolved to the layer names it selected (sorted; condensed to
    /// suffixes, as PEFT condenses lists of 20 or more).
    pub resolved_targets: Option<ModuleSelector>,
}

/// Why a candidate is not a target.
#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    Target,
    NoMatch,
    /// Matched by `target_modules` but not in `layers_to_transform`.
    OtherLayer,
    /// Removed by `exclude_modules`.
    Excluded,
    /// Removed because `modules_to_save` covers it.
    Saved,
}

/// The compiled regexes of one targeting.
struct Rules<'t> {
    targets: &'t ModuleSelector,
    target_re: Option<PyRegex>,
    exclude: Option<&'t ModuleSelector>,
    exclude_re: Option<PyRegex>,
    saved_re: Vec<PyRegex>,
    layers: Option<Vec<usize>>,
    layer_res: Vec<PyRegex>,
}

impl Targeting {
    /// Targeting `target_modules`, every other field unset.
    pub fn new(target_modules: ModuleSelector) -> Self {
        Self {
            target_modules: Some(target_modules),
            ..Self::default()
        }
    }

    /// `layers_pattern` as a list (empty when unset, `""` or `[]`: any segment).
    fn layer_patterns(&self) -> Vec<String> {
        let patterns = self
            .layers_pattern
            .as_ref()
            .map_or_else(Vec::new, |p| p.to_vec());
        patterns.into_iter().filter(|p| !p.is_empty()).collect()
    }

    /// Checks the fields that can be wrong on their own (PEFT's `LoraConfig.__post_init__`).
    pub fn validate(&self) -> Result<()> {
        match &self.target_modules {
            None => {
                return Err(PeftError::config(
                    "target_modules",
                    "must be set (a list of module names, a regex, or \"all-linear\")",
                ));
            }
            Some(ModuleSelector::List(l)) if l.is_empty() => {
                return Err(PeftError::config("target_modules", "is an empty list"));
            }
            Some(sel @ ModuleSelector::Regex(p)) => {
                if !sel.is_all_linear() {
                    PyRegex::full(p, "target_modules")?;
                }
                if self.layers_to_transform.is_some() {
                    return Err(PeftError::config(
                        "layers_to_transform",
                        "cannot be used when target_modules is a string (a regex or \"all-linear\"); \
                         give target_modules as a list",
                    ));
                }
                if self.layers_pattern.is_some() {
                    return Err(PeftError::config(
                        "layers_pattern",
                        "cannot be used when target_modules is a string (a regex or \"all-linear\"); \
                         give target_modules as a list",
                    ));
                }
            }
            Some(ModuleSelector::List(_)) => {}
        }
        if let Some(ModuleSelector::Regex(p)) = &self.exclude_modules {
            PyRegex::full(p, "exclude_modules")?;
        }
        if !self.layer_patterns().is_empty() && self.layers_to_transform.is_none() {
            return Err(PeftError::config(
                "layers_pattern",
                "requires layers_to_transform",
            ));
        }
        self.rules()?;
        Ok(())
    }

    fn rules(&self) -> Result<Rules<'_>> {
        let Some(targets) = &self.target_modules else {
            return Err(PeftError::config("target_modules", "must be set"));
        };
        let target_re = match targets {
            ModuleSelector::Regex(p) if !targets.is_all_linear() => {
                Some(PyRegex::full(p, "target_modules")?)
            }
            _ => None,
        };
        let exclude = self.exclude_modules.as_ref().filter(|e| match e {
            ModuleSelector::List(l) => !l.is_empty(),
            ModuleSelector::Regex(p) => !p.is_empty(),
        });
        let exclude_re = match exclude {
            Some(ModuleSelector::Regex(p)) => Some(PyRegex::full(p, "exclude_modules")?),
            _ => None,
        };
        let saved_re = self
            .modules_to_save
            .iter()
            .flatten()
            .map(|m| PyRegex::new(&format!(r"^(?:(^|.*\.){m}($|\..*))"), "modules_to_save"))
            .collect::<Result<_>>()?;
        let layers = self
            .layers_to_transform
            .as_ref()
            .map(|l| l.to_vec())
            .filter(|l| {
                !l.is_empty() || matches!(self.layers_to_transform, Some(OneOrMany::One(_)))
            });
        let patterns = self.layer_patterns();
        let layer_res = if patterns.is_empty() {
            vec![PyRegex::new(
                r"^.*?\.[^.]*\.(?P<idx>\d+)\.",
                "layers_pattern",
            )?]
        } else {
            patterns
                .iter()
                .map(|p| {
                    PyRegex::new(
                        &format!(r"^(?:(?:^|.*?\.){p}\.(?P<idx>\d+)\.)"),
                        "layers_pattern",
                    )
                })
                .collect::<Result<_>>()?
        };
        Ok(Rules {
            targets,
            target_re,
            exclude,
            exclude_re,
            saved_re,
            layers,
            layer_res,
        })
    }

    /// The layer index PEFT reads from `module` (with `layers_pattern`, when set).
    fn layer_index(rules: &Rules<'_>, module: &str) -> Result<Option<usize>> {
        for re in &rules.layer_res {
            if let Some(idx) = re.named_group(module, "idx", "layers_pattern")? {
                return Ok(idx.parse().ok());
            }
        }
        Ok(None)
    }

    /// PEFT's `check_target_module_exists` for one module, `targets` standing in for
    /// `target_modules` (the resolved list under `"all-linear"`). The exclusions are checked
    /// last here (PEFT checks them first; the selection is the same), so that a module they
    /// remove is one `target_modules` would have adapted.
    fn verdict(
        &self,
        rules: &Rules<'_>,
        targets: &ModuleSelector,
        module: &str,
    ) -> Result<Verdict> {
        let matched = match targets {
            ModuleSelector::Regex(_) => match &rules.target_re {
                Some(re) => re.is_match(module, "target_modules")?,
                None => false,
            },
            ModuleSelector::List(names) => {
                if names.iter().any(|n| n == module) {
                    true
                } else if !names.iter().any(|n| suffix_match(module, n)) {
                    false
                } else if let Some(layers) = &rules.layers {
                    match Self::layer_index(rules, module)? {
                        Some(i) if layers.contains(&i) => true,
                        _ => return Ok(Verdict::OtherLayer),
                    }
                } else {
                    true
                }
            }
        };
        if !matched {
            return Ok(Verdict::NoMatch);
        }
        if let Some(exclude) = rules.exclude {
            let hit = match &rules.exclude_re {
                Some(re) => re.is_match(module, "exclude_modules")?,
                None => exclude.matches(module)?,
            };
            if hit {
                return Ok(Verdict::Excluded);
            }
        }
        for re in &rules.saved_re {
            if re.is_match(module, "modules_to_save")? {
                return Ok(Verdict::Saved);
            }
        }
        Ok(Verdict::Target)
    }

    /// Is `module` a target? (`"all-linear"` counts every module as a linear layer that is not
    /// an output layer; [`Targeting::select`] knows the model's layers.)
    pub fn is_target(&self, module: &str) -> Result<bool> {
        let rules = self.rules()?;
        let candidate = [Candidate {
            name: module,
            linear: true,
        }];
        let targets = self.effective_targets(&rules, &candidate, None);
        Ok(self.verdict(&rules, &targets, module)? == Verdict::Target)
    }

    /// Is `module` one whose full weights are trained and saved (`modules_to_save`: the name
    /// ends with an entry, as PEFT's `_set_trainable` tests)?
    pub fn is_module_to_save(&self, module: &str) -> bool {
        self.modules_to_save.as_ref().is_some_and(|m| {
            m.iter()
                .any(|k| !k.is_empty() && module.ends_with(k.as_str()))
        })
    }

    /// `target_modules`, with `"all-linear"` resolved against `candidates`.
    fn effective_targets(
        &self,
        rules: &Rules<'_>,
        candidates: &[Candidate<'_>],
        task_type: Option<&str>,
    ) -> ModuleSelector {
        if !rules.targets.is_all_linear() {
            return rules.targets.clone();
        }
        let has = |n: &str| candidates.iter().any(|c| c.name == n);
        let mut left_out: Vec<&str> = OUTPUT_LAYER_NAMES
            .iter()
            .copied()
            .filter(|n| has(n))
            .collect();
        if left_out.is_empty() && task_type == Some(SEQ_CLS) {
            left_out.extend(SEQ_CLS_HEAD_NAMES.iter().copied().find(|n| has(n)));
        }
        let names: BTreeSet<String> = candidates
            .iter()
            .filter(|c| c.linear && !left_out.contains(&c.name))
            .map(|c| c.name.to_string())
            .collect();
        ModuleSelector::List(names.into_iter().collect())
    }

    /// The modules of `candidates` this config adapts and those it trains whole, as PEFT selects
    /// them (see the module docs). `task_type` is the config's (PEFT's `"SEQ_CLS"` changes what
    /// `"all-linear"` leaves out). Selecting no module is an error that names the field at fault:
    /// `target_modules` (listing the model's distinct module names and the closest one to a
    /// mistyped entry), `layers_to_transform` / `layers_pattern`, or `exclude_modules` /
    /// `modules_to_save` when they removed every match. So is a `modules_to_save` entry that
    /// matches no candidate.
    pub fn select(
        &self,
        candidates: &[Candidate<'_>],
        task_type: Option<&str>,
    ) -> Result<Selection> {
        let rules = self.rules()?;
        let targets = self.effective_targets(&rules, candidates, task_type);
        let mut verdicts = Vec::with_capacity(candidates.len());
        for c in candidates {
            verdicts.push(self.verdict(&rules, &targets, c.name)?);
        }
        let mut sel = Selection::default();
        for (i, (c, v)) in candidates.iter().zip(&verdicts).enumerate() {
            let saved = self.is_module_to_save(c.name);
            if *v == Verdict::Target {
                if saved {
                    return Err(PeftError::config(
                        "modules_to_save",
                        format!("`{}` is both a target and a module to save", c.name),
                    ));
                }
                sel.targets.push(i);
            } else if saved {
                sel.to_save.push(i);
            }
        }
        if sel.targets.is_empty() {
            return Err(self.no_target(&rules, candidates, &verdicts)?);
        }
        self.check_modules_to_save(candidates, &sel, task_type)?;
        if rules.targets.is_all_linear() {
            let names: Vec<&str> = candidates.iter().map(|c| c.name).collect();
            if let ModuleSelector::List(list) = &targets {
                sel.resolved_targets = Some(ModuleSelector::List(condense(list, &names)));
            }
        }
        Ok(sel)
    }

    /// The error for a selection that came out empty.
    fn no_target(
        &self,
        rules: &Rules<'_>,
        candidates: &[Candidate<'_>],
        verdicts: &[Verdict],
    ) -> Result<PeftError> {
        let pick = |want: Verdict| -> Vec<&str> {
            candidates
                .iter()
                .zip(verdicts)
                .filter(|(_, v)| **v == want)
                .map(|(c, _)| c.name)
                .collect()
        };
        let mut other_layer = Vec::new();
        for name in pick(Verdict::OtherLayer) {
            other_layer.push((name, Self::layer_index(rules, name)?));
        }
        let entries = match rules.targets {
            ModuleSelector::List(l) => l.iter().map(String::as_str).collect(),
            ModuleSelector::Regex(_) => Vec::new(),
        };
        let patterns = self.layer_patterns();
        Ok(diagnose::no_target(diagnose::NoTarget {
            targets: rules.targets.to_string(),
            entries,
            names: candidates.iter().map(|c| c.name).collect(),
            other_layer,
            excluded: pick(Verdict::Excluded),
            saved: pick(Verdict::Saved),
            layers: rules.layers.clone().unwrap_or_default(),
            layers_pattern: (!patterns.is_empty()).then(|| format!("{patterns:?}")),
        }))
    }

    /// Every `modules_to_save` entry must name a candidate (PEFT's own `classifier` / `score`
    /// additions for `SEQ_CLS` excepted).
    fn check_modules_to_save(
        &self,
        candidates: &[Candidate<'_>],
        sel: &Selection,
        task_type: Option<&str>,
    ) -> Result<()> {
        for wanted in self.modules_to_save.iter().flatten() {
            let found = sel
                .to_save
                .iter()
                .any(|&i| !wanted.is_empty() && candidates[i].name.ends_with(wanted.as_str()));
            let peft_default =
                task_type == Some(SEQ_CLS) && SEQ_CLS_HEAD_NAMES.contains(&wanted.as_str());
            if !found && !peft_default {
                let names: Vec<&str> = candidates.iter().map(|c| c.name).collect();
                return Err(PeftError::config(
                    "modules_to_save",
                    format!(
                        "`{wanted}` matches no adaptable layer; {}",
                        diagnose::describe_layers(&names, &[wanted.as_str()])
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// PEFT's `_find_minimal_target_modules`, used when a `target_modules` list has at least 20
/// names: the fewest suffixes that select exactly `targets` among `modules`. The other modules
/// are the non-targets of `modules` and every path prefix of a module (the containers a
/// transformers model has); `targets` comes back sorted when it stays as it is.
fn condense(targets: &[String], modules: &[&str]) -> Vec<String> {
    let mut sorted: Vec<String> = targets.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.len() < MIN_TARGETS_TO_CONDENSE || sorted.iter().any(|t| t.is_empty()) {
        return sorted;
    }
    let suffixes = |s: &str| -> Vec<String> {
        let parts: Vec<&str> = s.split('.').collect();
        (0..parts.len())
            .rev()
            .map(|i| parts[i..].join("."))
            .collect()
    };
    let is_target = |n: &str| {
        sorted.iter().any(|t| t == n) || sorted.iter().any(|t| n.ends_with(&format!(".{t}")))
    };
    let mut others: BTreeSet<String> = BTreeSet::from([String::new()]);
    for m in modules {
        let parts: Vec<&str> = m.split('.').collect();
        for k in 1..parts.len() {
            others.extend(suffixes(&parts[..k].join(".")));
        }
        if !is_target(m) {
            others.extend(suffixes(m));
        }
    }
    let mut items: Vec<(Vec<String>, &String)> = sorted.iter().map(|t| (suffixes(t), t)).collect();
    items.sort();
    let mut required: BTreeSet<String> = BTreeSet::new();
    for (sfx, item) in items {
        for s in sfx {
            if required.contains(&s) || others.contains(&s) {
                continue;
            }
            if !required.iter().any(|r| item.ends_with(&format!(".{r}"))) {
                required.insert(s);
                break;
            }
        }
    }
    if required.is_empty() {
        sorted
    } else {
        required.into_iter().collect()
    }
}
