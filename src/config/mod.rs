//! Shared configuration types: target selection ([`Targeting`]), the fields every PEFT config
//! carries ([`CommonFields`]), the [`MethodConfig`] interface each method's config implements,
//! and the JSON helpers the configs write `adapter_config.json` with. The per-method configs live
//! with their methods under `adapters/`; this module knows none of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use crate::adapter::{Adapter, LayerGeometry, Method};
use crate::error::{PeftError, Result};

mod diagnose;
mod eva;
mod pattern;
mod selector;
mod targeting;

pub use eva::EvaConfig;
pub use pattern::{PatternMap, pattern_value};
pub(crate) use selector::suffix_match;
pub use selector::{ALL_LINEAR, ModuleSelector, OneOrMany};
pub use targeting::{Candidate, OUTPUT_LAYER_NAMES, SEQ_CLS_HEAD_NAMES, Selection, Targeting};

/// Prefix of every per-layer key in a PEFT adapter file (`base_model.model.<module>.lora_A.weight`).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The PEFT version written to `adapter_config.json` (`peft_version`).
pub const PEFT_VERSION: &str = "0.21.2";

/// The bookkeeping fields every PEFT config carries, read and written under PEFT's names
/// (flattened into each method's config).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommonFields {
    /// PEFT's `task_type` (`SEQ_CLS`, `CAUSAL_LM`).
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on (a hub id or a path).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The base model's hub revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// Set when the adapter is saved, as PEFT does.
    #[serde(default)]
    pub inference_mode: bool,
}

/// Writes a float as a JSON integer when it is one (PEFT writes `"lora_alpha": 16`).
pub(crate) fn json_number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// `v` as JSON, with serde's error as a config error.
pub(crate) fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| PeftError::config("adapter_config.json", e.to_string()))
}

/// Reads a method's config from `adapter_config.json` content. Unknown fields are ignored, as
/// PEFT ignores them. A value of the wrong type is an error naming its key and what it should
/// be (`lora_alpha: expected a number, got string "16"`).
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T> {
    let err = match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let reason = readable(&err.inner().to_string());
    let path = err.path().to_string();
    if !(path.is_empty() || path == ".") {
        return Err(PeftError::config(path, reason));
    }
    Err(PeftError::config(flattened_key::<T>(value), reason))
}

/// The key at fault when serde could not say (a field of a `#[serde(flatten)]` struct, such as
/// [`Targeting`]): the targeting path when the targeting fields fail on their own, else the
/// first top-level key whose removal changes the outcome.
fn flattened_key<T: serde::de::DeserializeOwned>(value: &Value) -> String {
    if let Err(e) = serde_path_to_error::deserialize::<_, Targeting>(value) {
        let path = e.path().to_string();
        if !(path.is_empty() || path == ".") {
            return path;
        }
    }
    let whole = "adapter_config.json".to_string();
    let (Value::Object(map), Err(first)) = (value, T::deserialize(value).map(|_| ())) else {
        return whole;
    };
    let first = first.to_string();
    for key in map.keys() {
        let mut without = map.clone();
        without.shift_remove(key);
        match T::deserialize(&Value::Object(without)) {
            Ok(_) => return key.clone(),
            Err(e) if e.to_string() != first => return key.clone(),
            Err(_) => {}
        }
    }
    whole
}

/// serde's `invalid type: string "16", expected f64` as `expected a number, got string "16"`.
fn readable(message: &str) -> String {
    let (got, expected) = match ["invalid type: ", "invalid value: "]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|rest| rest.split_once(", expected "))
    {
        Some(parts) => parts,
        None => return message.to_string(),
    };
    let expected = match expected {
        "f64" | "f32" => "a number",
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number >= 0",
        "i64" | "i32" => "a whole number",
        "a boolean" | "bool" => "true or false",
        "a sequence" => "a list",
        "a map" => "an object",
        other => other,
    };
    format!("expected {expected}, got {}", got.replace('`', ""))
}

/// Sorts the keys of every JSON object in `value`, at every depth, as Python's
/// `json.dumps(sort_keys=True)` does, except inside the objects under the keys in `keep` (at
/// any depth), whose key order is their meaning (`rank_pattern`, `alpha_pattern`).
pub(crate) fn sort_keys(value: &mut Value, keep: &[&str]) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, v) in &mut entries {
                if !keep.contains(&k.as_str()) {
                    sort_keys(v, keep);
                }
            }
            map.extend(entries);
        }
        Value::Array(items) => items.iter_mut().for_each(|v| sort_keys(v, keep)),
        _ => {}
    }
}

/// The config keys whose objects keep their key order when written.
pub(crate) const ORDERED_KEYS: &[&str] = &["rank_pattern", "alpha_pattern"];

/// A config's JSON: the method's own `fields` plus the targeting fields, the common fields and
/// `peft_version`. Keys are sorted at every depth, as PEFT writes them, except the keys of
/// `rank_pattern` / `alpha_pattern`, which keep their order: PEFT matches them in that order, and
/// sorting would change which key wins when reading the file back.
pub(crate) fn peft_json(
    fields: Value,
    targeting: &Targeting,
    common: &CommonFields,
) -> Result<Value> {
    let mut out = match fields {
        Value::Object(map) => map,
        _ => return Err(PeftError::config("adapter_config.json", "not an object")),
    };
    for part in [to_json(targeting)?, to_json(common)?] {
        if let Value::Object(map) = part {
            out.extend(map);
        }
    }
    out.insert("peft_version".into(), json!(PEFT_VERSION));
    let mut out = Value::Object(out);
    sort_keys(&mut out, ORDERED_KEYS);
    Ok(out)
}

/// serde's `deserialize_with` for `rank_pattern`: a map of whole numbers (PEFT may write them
/// as floats), `null` read as empty, key order kept.
pub(crate) fn whole_rank_pattern<'de, D>(d: D) -> std::result::Result<PatternMap<usize>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw: PatternMap<f64> = PatternMap::deserialize(d)?;
    let mut out = PatternMap::new();
    for (k, &v) in &raw {
        if v.fract() != 0.0 || v < 0.0 {
            return Err(serde::de::Error::custom(format!(
                "rank_pattern.{k}: rank must be a whole number, got {v}"
            )));
        }
        out.insert(k.clone(), v as usize);
    }
    Ok(out)
}

/// serde's `deserialize_with` for maps that PEFT may write as `null` (read as empty).
pub(crate) fn null_as_empty<'de, D, V>(d: D) -> std::result::Result<PatternMap<V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    PatternMap::deserialize(d)
}

/// What a method's init sees for one targeted layer.
pub struct InitContext<'a> {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub module: &'a str,
    /// The layer's shape.
    pub geometry: LayerGeometry,
    /// The layer's current base weight (pristine unless another adapter is merged), in the
    /// model's dtype, on the layer's device. Decomposition methods factorise it.
    pub base_weight: &'a Tensor,
    /// Where the adapter's tensors go.
    pub device: &'a Device,
    /// Model-level tensors made by [`MethodConfig::init_shared`] for this adapter (RandLoRA's
    /// bases), under their file keys. Empty for most methods.
    pub shared: &'a BTreeMap<String, Tensor>,
}

/// What a method's loader sees for one layer of a saved adapter.
pub struct LoadContext<'a> {
    /// The module path.
    pub module: &'a str,
    /// The layer's shape.
    pub geometry: LayerGeometry,
    /// The layer's saved tensors, named relative to the layer (`lora_A.weight`).
    pub tensors: &'a BTreeMap<String, Tensor>,
    /// The file's model-level tensors (keys outside `base_model.model.`), e.g.
    /// `base_model.randlora_A`.
    pub shared: &'a BTreeMap<String, Tensor>,
    /// The base weight when the caller has it (`PeftModel::load_adapter` does; the streaming
    /// merge does not). Methods that save all their frozen state never need it.
    pub base_weight: Option<&'a Tensor>,
    /// Where the adapter's tensors go.
    pub device: &'a Device,
}

/// The two field groups every method's config holds (both serde-flattened into its JSON):
/// [`Targeting`] and [`CommonFields`]. A config says once where they are; [`MethodConfig`]'s
/// accessors ([`targeting`](MethodConfig::targeting), [`common`](MethodConfig::common), their
/// `_mut` forms and the setters) read them through this trait.
pub trait ConfigFields {
    /// `(targeting, common)`.
    fn fields(&self) -> (&Targeting, &CommonFields);
    /// `(targeting, common)`, to change.
    fn fields_mut(&mut self) -> (&mut Targeting, &mut CommonFields);
}

/// One method's configuration. Each method implements it (and [`ConfigFields`]) in its file
/// under `adapters/`; `crate::adapters::AdapterConfig` dispatches to it.
pub trait MethodConfig: ConfigFields + std::fmt::Debug + Send + Sync {
    /// The method whose file format this config is (EVA and LoRA-Pro configs are LoRA's).
    fn method(&self) -> Method;
    /// Checks every field, without looking at a model.
    fn validate(&self) -> Result<()>;
    /// The JSON written to `adapter_config.json` (PEFT's field names; keys sorted).
    fn to_peft_json(&self) -> Result<serde_json::Value>;
    /// A fresh adapter for one layer, drawn from `rng`.
    fn init_adapter(&self, ctx: &InitContext<'_>, rng: &mut ChaCha8Rng)
    -> Result<Box<dyn Adapter>>;
    /// The adapter for one layer rebuilt from its saved tensors.
    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>>;

    /// Which modules are adapted.
    fn targeting(&self) -> &Targeting {
        self.fields().0
    }
    /// Which modules are adapted, to change.
    fn targeting_mut(&mut self) -> &mut Targeting {
        self.fields_mut().0
    }
    /// The fields every PEFT config carries.
    fn common(&self) -> &CommonFields {
        self.fields().1
    }
    /// The fields every PEFT config carries, to change.
    fn common_mut(&mut self) -> &mut CommonFields {
        self.fields_mut().1
    }
    /// PEFT's `task_type` (`SEQ_CLS`, `CAUSAL_LM`).
    fn set_task_type(&mut self, task_type: Option<String>) {
        self.common_mut().task_type = task_type;
    }
    /// PEFT's `base_model_name_or_path`.
    fn set_base_model(&mut self, name: Option<String>) {
        self.common_mut().base_model_name_or_path = name;
    }
    /// The first segments of this method's per-layer tensor names (`lora_A`, `lora_B`), used to
    /// split a file key into module path and tensor name.
    fn tensor_prefixes(&self) -> &'static [&'static str] {
        self.method().spec().tensors.prefixes
    }
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
}
