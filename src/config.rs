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
use crate::adapters::corda::CordaConfig;
use crate::adapters::flora::FloraConfig;
use crate::adapters::lora::LoraConfig;
use crate::adapters::randlora::RandLoraConfig;
use crate::adapters::{loldu::LolduConfig, salt::SaltConfig, svfit::SvfitConfig};
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

/// What a method's init sees for one targeted layer.
pub struct InitContext<'a> {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub module: &'a str,
    pub geometry: LayerGeometry,
    /// The layer's current base weight (pristine unless another adapter is merged), in the
    /// model's dtype, on the layer's device. Decomposition methods factorise it.
    pub base_weight: &'a Tensor,
    pub device: &'a Device,
    /// Model-level tensors made by [`MethodConfig::init_shared`] for this adapter (RandLoRA's
    /// bases), under their file keys. Empty for most methods.
    pub shared: &'a BTreeMap<String, Tensor>,
}

/// What a method's loader sees for one layer of a saved adapter.
pub struct LoadContext<'a> {
    pub module: &'a str,
    pub geometry: LayerGeometry,
    /// The layer's saved tensors, named relative to the layer (`lora_A.weight`).
    pub tensors: &'a BTreeMap<String, Tensor>,
    /// The file's model-level tensors (keys outside `base_model.model.`), e.g.
    /// `base_model.randlora_A`.
    pub shared: &'a BTreeMap<String, Tensor>,
    /// The base weight when the caller has it (`PeftModel::load_adapter` does; the streaming
    /// merge does not). Methods that save all their frozen state never need it.
    pub base_weight: Option<&'a Tensor>,
    pub device: &'a Device,
}

/// The [`MethodConfig`] methods every method's config implements the same way: the method, its
/// `targeting`, `task_type` and `base_model_name_or_path` fields, and its inherent `validate`,
/// `to_peft_json` and `TENSOR_PREFIXES`. Used inside `impl MethodConfig for …`.
macro_rules! method_config_plumbing {
    ($method:expr) => {
        fn method(&self) -> $crate::adapter::Method {
            $method
        }

        fn targeting(&self) -> &$crate::config::Targeting {
            &self.targeting
        }

        fn targeting_mut(&mut self) -> &mut $crate::config::Targeting {
            &mut self.targeting
        }

        fn set_task_type(&mut self, task_type: Option<String>) {
            self.task_type = task_type;
        }

        fn set_base_model(&mut self, name: Option<String>) {
            self.base_model_name_or_path = name;
        }

        fn validate(&self) -> $crate::error::Result<()> {
            Self::validate(self)
        }

        fn to_peft_json(&self) -> $crate::error::Result<serde_json::Value> {
            Self::to_peft_json(self)
        }

        fn tensor_prefixes(&self) -> &'static [&'static str] {
            Self::TENSOR_PREFIXES
        }
    };
}
pub(crate) use method_config_plumbing;

/// One method's configuration. Each method implements it in its file under `adapters/`;
/// [`AdapterConfig`] dispatches to it.
pub trait MethodConfig: std::fmt::Debug + Send + Sync {
    fn method(&self) -> Method;
    fn targeting(&self) -> &Targeting;
    fn targeting_mut(&mut self) -> &mut Targeting;
    /// PEFT's `task_type` (`SEQ_CLS`, `CAUSAL_LM`).
    fn set_task_type(&mut self, task_type: Option<String>);
    /// PEFT's `base_model_name_or_path`.
    fn set_base_model(&mut self, name: Option<String>);
    /// Checks every field, without looking at a model.
    fn validate(&self) -> Result<()>;
    /// The JSON written to `adapter_config.json` (PEFT's field names; keys sorted).
    fn to_peft_json(&self) -> Result<serde_json::Value>;
    /// The first segments of this method's per-layer tensor names (`lora_A`, `lora_B`), used to
    /// split a file key into module path and tensor name.
    fn tensor_prefixes(&self) -> &'static [&'static str];
    /// Whether base weights are stored `[in, out]` (PEFT's `fan_in_fan_out`).
    fn fan_in_fan_out(&self) -> bool {
        false
    }
    /// The weight of the method's regulariser ([`Adapter::regularizer_loss`]) in the training
    /// loss; 0 (the default, and every method without one) adds nothing.
    fn regularizer_weight(&self) -> f64 {
        0.0
    }
    /// Model-level tensors made once per adapter, before any layer, from every targeted layer's
    /// geometry (RandLoRA's shared bases). Keys are full file keys (`base_model.randlora_A`).
    fn init_shared(
        &self,
        layers: &[(String, LayerGeometry)],
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<BTreeMap<String, Tensor>> {
        let _ = (layers, device, rng);
        Ok(BTreeMap::new())
    }
    /// A fresh adapter for one layer, drawn from `rng`.
    fn init_adapter(&self, ctx: &InitContext<'_>, rng: &mut ChaCha8Rng)
    -> Result<Box<dyn Adapter>>;
    /// The adapter for one layer rebuilt from its saved tensors.
    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>>;
}

/// The settings the CLI's flags give (`--targets`, `--rank`, `--alpha`, `--dropout`,
/// `--opt key=value`), before a method turns them into its config.
#[derive(Clone, Debug, Default)]
pub struct CliAdapterArgs {
    pub targets: Vec<String>,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    /// Method-specific options (`energy=0.95`, `sparse=true`); a method refuses keys it does
    /// not know, naming them.
    pub options: BTreeMap<String, String>,
}

impl CliAdapterArgs {
    /// Fails naming the first option not in `known`.
    pub fn check_options(&self, method: Method, known: &[&str]) -> Result<()> {
        if let Some(k) = self.options.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(PeftError::config(
                format!("--opt {k}"),
                format!(
                    "`{k}` is not an option of {method} (its options: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Option `key` parsed as `T`, if given.
    pub fn option<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.options.get(key) {
            None => Ok(None),
            Some(v) => v.parse::<T>().map(Some).map_err(|_| {
                PeftError::config(format!("--opt {key}"), format!("cannot parse `{v}`"))
            }),
        }
    }
}

/// The config of one adapter, for any method this build supports.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterConfig {
    Lora(LoraConfig),
    Corda(CordaConfig),
    RandLora(RandLoraConfig),
    Flora(FloraConfig),
    Svfit(SvfitConfig),
    Loldu(LolduConfig),
    Salt(SaltConfig),
}

impl AdapterConfig {
    /// The method's own config, behind the common interface.
    pub fn inner(&self) -> &dyn MethodConfig {
        match self {
            AdapterConfig::Lora(c) => c,
            AdapterConfig::Corda(c) => c,
            AdapterConfig::RandLora(c) => c,
            AdapterConfig::Flora(c) => c,
            AdapterConfig::Svfit(c) => c,
            AdapterConfig::Loldu(c) => c,
            AdapterConfig::Salt(c) => c,
        }
    }

    pub fn inner_mut(&mut self) -> &mut dyn MethodConfig {
        match self {
            AdapterConfig::Lora(c) => c,
            AdapterConfig::Corda(c) => c,
            AdapterConfig::RandLora(c) => c,
            AdapterConfig::Flora(c) => c,
            AdapterConfig::Svfit(c) => c,
            AdapterConfig::Loldu(c) => c,
            AdapterConfig::Salt(c) => c,
        }
    }

    pub fn method(&self) -> Method {
        self.inner().method()
    }

    pub fn targeting(&self) -> &Targeting {
        self.inner().targeting()
    }

    pub fn targeting_mut(&mut self) -> &mut Targeting {
        self.inner_mut().targeting_mut()
    }

    /// Whether base weights are stored `[in, out]` (PEFT's `fan_in_fan_out`).
    pub fn fan_in_fan_out(&self) -> bool {
        self.inner().fan_in_fan_out()
    }

    /// The weight of the method's regulariser in the training loss (0: none).
    pub fn regularizer_weight(&self) -> f64 {
        self.inner().regularizer_weight()
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.inner().validate()
    }

    /// The JSON written to `adapter_config.json` (PEFT's field names; keys sorted as PEFT sorts).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        self.inner().to_peft_json()
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
            "CORDA" => AdapterConfig::Corda(CordaConfig::from_peft_json(value)?),
            "RANDLORA" => AdapterConfig::RandLora(RandLoraConfig::from_peft_json(value)?),
            "FLORA" => AdapterConfig::Flora(FloraConfig::from_peft_json(value)?),
            "SVFIT" => AdapterConfig::Svfit(SvfitConfig::from_peft_json(value)?),
            "LOLDU" => AdapterConfig::Loldu(LolduConfig::from_peft_json(value)?),
            "SALT" => AdapterConfig::Salt(SaltConfig::from_peft_json(value)?),
            other => return Err(PeftError::UnknownPeftType(other.to_string())),
        };
        config.validate()?;
        Ok(config)
    }

    /// The config `candle-peft train --method <method>` builds from its flags.
    pub fn from_cli(method: Method, args: &CliAdapterArgs) -> Result<Self> {
        let config = match method {
            Method::Lora | Method::LoraPro => AdapterConfig::Lora(LoraConfig::from_cli(args)?),
            Method::Eva => AdapterConfig::Lora(crate::adapters::eva::lora_config_from_cli(args)?),
            Method::Corda => AdapterConfig::Corda(CordaConfig::from_cli(args)?),
            Method::RandLora => AdapterConfig::RandLora(RandLoraConfig::from_cli(args)?),
            Method::Flora => AdapterConfig::Flora(FloraConfig::from_cli(args)?),
            Method::Svfit => AdapterConfig::Svfit(SvfitConfig::from_cli(args)?),
            Method::Loldu => AdapterConfig::Loldu(LolduConfig::from_cli(args)?),
            Method::Salt => AdapterConfig::Salt(SaltConfig::from_cli(args)?),
        };
        config.validate()?;
        Ok(config)
    }

    /// Model-level tensors for a new adapter (see [`MethodConfig::init_shared`]).
    pub fn init_shared(
        &self,
        layers: &[(String, LayerGeometry)],
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<BTreeMap<String, Tensor>> {
        self.inner().init_shared(layers, device, rng)
    }

    /// A fresh adapter for one layer, drawn from `rng`.
    pub fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        self.inner().init_adapter(ctx, rng)
    }

    /// The adapter for one layer rebuilt from its saved tensors.
    pub fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        self.inner().load_adapter(ctx)
    }

    /// The first segments of this method's per-layer tensor names (`lora_A`, `lora_B`).
    pub fn tensor_prefixes(&self) -> &'static [&'static str] {
        self.inner().tensor_prefixes()
    }
}

impl From<LoraConfig> for AdapterConfig {
    fn from(c: LoraConfig) -> Self {
        AdapterConfig::Lora(c)
    }
}

impl From<RandLoraConfig> for AdapterConfig {
    fn from(c: RandLoraConfig) -> Self {
        AdapterConfig::RandLora(c)
    }
}

impl From<FloraConfig> for AdapterConfig {
    fn from(c: FloraConfig) -> Self {
        AdapterConfig::Flora(c)
    }
}

impl From<CordaConfig> for AdapterConfig {
    fn from(c: CordaConfig) -> Self {
        AdapterConfig::Corda(c)
    }
}

impl From<SvfitConfig> for AdapterConfig {
    fn from(c: SvfitConfig) -> Self {
        AdapterConfig::Svfit(c)
    }
}

impl From<LolduConfig> for AdapterConfig {
    fn from(c: LolduConfig) -> Self {
        AdapterConfig::Loldu(c)
    }
}

impl From<SaltConfig> for AdapterConfig {
    fn from(c: SaltConfig) -> Self {
        AdapterConfig::Salt(c)
    }
}
