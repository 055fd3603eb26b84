//! `PeftModel`: a model built through `PeftBuilder`, plus named adapters on its layers.
//!
//! Mirrors HF PEFT's model-level API: `add_adapter`, `load_adapter(dir, name)`,
//! `save_adapter(dir, name)`, `set_adapter`/`set_active`, `disable`/`enable` and the scoped
//! [`disable_adapter`](PeftModel::disable_adapter) guard (PEFT's `with model.disable_adapter():`),
//! `delete_adapter`, `merge`/`unmerge`, `merge_and_unload`, `unload`, trainable parameters in a
//! deterministic order. `PeftModel<M>` derefs to `M`, so the model's own forward is called on it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::LayerGeometry;
use crate::adapters::AdapterConfig;
use crate::adapters::lora::InitLoraWeights;
use crate::builder::PeftBuilder;
use crate::config::{InitContext, LoadContext};
use crate::error::{PeftError, Result};
use crate::init::seed_from_name;
use crate::io::peft_format::{self, KEY_PREFIX};
use crate::layer::LayerHandle;

mod switch;

pub use switch::DisabledAdapters;

/// The name PEFT gives an adapter when none is given.
pub const DEFAULT_ADAPTER: &str = "default";

/// A base model `M` plus the PEFT adapters attached to its adaptable layers (PEFT's
/// `PeftModel`): owns adapter configs, the active set, and merge/save/load state.
pub struct PeftModel<M> {
    model: M,
    layers: Vec<LayerHandle>,
    base_tensors: BTreeMap<String, usize>,
    training: Arc<AtomicBool>,
    adapters: Vec<(String, AdapterConfig)>,
    /// Model-level tensors per adapter (RandLoRA's shared bases), under their file keys.
    shared: BTreeMap<String, BTreeMap<String, Tensor>>,
    active: Vec<String>,
    enabled: bool,
    seed: u64,
    /// Files written beside every saved adapter, by file name (see `set_adapter_file`).
    adapter_files: BTreeMap<String, Vec<u8>>,
}

impl<M> PeftModel<M> {
    /// Wraps `model`, whose adaptable layers were built through `builder`.
    pub fn new(model: M, builder: &PeftBuilder<'_>) -> Self {
        let (layers, base_tensors, training) = builder.take_registry();
        Self {
            model,
            layers,
            base_tensors,
            training,
            adapters: Vec::new(),
            shared: BTreeMap::new(),
            active: Vec::new(),
            enabled: true,
            seed: 0,
            adapter_files: BTreeMap::new(),
        }
    }

    /// The wrapped base model, whose forward runs through the adapted layers (also reached
    /// through `Deref`: `peft_model.forward(..)` is `M`'s forward).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The wrapped base model, to change (e.g. a head of its own outside the adaptable layers).
    /// Its adaptable layers stay registered: adapters are managed through `PeftModel`.
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    /// Seed of the ChaCha RNG that initialises new adapters (default 0).
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    /// Training mode: dropout on. Off by default.
    pub fn train(&self) {
        self.training.store(true, Ordering::Relaxed);
    }

    /// Evaluation mode: dropout off (PyTorch's `model.eval()`).
    pub fn eval(&self) {
        self.training.store(false, Ordering::Relaxed);
    }

    /// Whether the model is in training mode (dropout active).
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Every adaptable layer's module path, in build order.
    pub fn layer_names(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.name()).collect()
    }

    /// The adaptable layer at module path `name`; [`PeftError::UnknownModule`] if none.
    pub fn layer(&self, name: &str) -> Result<&LayerHandle> {
        self.layers
            .iter()
            .find(|l| l.name() == name)
            .ok_or_else(|| PeftError::UnknownModule(name.to_string()))
    }

    /// Every adaptable layer, in build order.
    pub fn layers(&self) -> &[LayerHandle] {
        &self.layers
    }

    /// Each adaptable layer's base weight type (`f32`, `bf16`, `q4_1`, …) and the bytes it
    /// holds, in build order: what `--base-dtype` chose, fallbacks included.
    pub fn base_storage(&self) -> Vec<(String, String, usize)> {
        self.layers
            .iter()
            .map(|l| {
                let w = l.frozen_weight();
                (l.name(), w.type_name(), w.storage_bytes())
            })
            .collect()
    }

    /// Names of all added adapters (active or not), in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The config adapter `name` was added with; [`PeftError::UnknownAdapter`] if none.
    pub fn adapter_config(&self, name: &str) -> Result<&AdapterConfig> {
        self.adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .ok_or_else(|| unknown_adapter(name))
    }

    /// Adapter `name`'s model-level tensors (RandLoRA's shared bases), under their file keys.
    pub fn shared_tensors(&self, name: &str) -> Option<&BTreeMap<String, Tensor>> {
        self.shared.get(name)
    }

    /// Names of the adapters whose outputs currently contribute to forward passes.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// The layers `config` targets and the layers it trains whole (`modules_to_save`), chosen by
    /// [`crate::config::Targeting::select`] as PEFT chooses them; a config that targets nothing
    /// is an error naming the field at fault. `"all-linear"` in `config` is replaced by the layer
    /// names it selected, as PEFT keeps it.
    fn select(&self, config: &mut AdapterConfig) -> Result<(Vec<LayerHandle>, Vec<LayerHandle>)> {
        let names = self.layer_names();
        let candidates: Vec<crate::config::Candidate<'_>> = self
            .layers
            .iter()
            .zip(&names)
            .map(|(l, name)| crate::config::Candidate {
                name,
                linear: matches!(l.geometry(), LayerGeometry::Linear { .. }),
            })
            .collect();
        let task_type = config.inner().common().task_type.clone();
        let selection = config
            .targeting()
            .select(&candidates, task_type.as_deref())?;
        if let Some(resolved) = selection.resolved_targets {
            config.targeting_mut().target_modules = Some(resolved);
        }
        let pick = |idx: &[usize]| idx.iter().map(|&i| self.layers[i].clone()).collect();
        Ok((pick(&selection.targets), pick(&selection.to_save)))
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        if self.adapters.iter().any(|(n, _)| n == name) {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        Ok(())
    }

    /// Attaches a freshly initialised adapter `name` to every layer `config` targets. The first
    /// adapter added becomes the active one (PEFT's `add_adapter`: later ones are activated with
    /// [`set_adapter`](Self::set_adapter)). On error the model is left unchanged.
    ///
    /// A config whose init needs calibration data (LoRA with `init_lora_weights: "eva"`; CorDA
    /// without the factors of its calibration pass) is an error naming the call that runs the
    /// calibration (the tasks' `add_eva_adapter` / `add_corda_adapter`, or
    /// [`crate::data_init::eva::add_eva_adapter`] / [`crate::data_init::corda::add_corda_adapter`]).
    pub fn add_adapter(&mut self, name: &str, config: impl Into<AdapterConfig>) -> Result<()> {
        let config = config.into();
        reject_calibrated_init(&config)?;
        self.add_initialised_adapter(name, config)
    }

    /// [`add_adapter`](Self::add_adapter) for a data-driven init whose calibration has run (EVA
    /// sets `A` from its PCA right after): the config may name that init.
    pub(crate) fn add_initialised_adapter(
        &mut self,
        name: &str,
        mut config: AdapterConfig,
    ) -> Result<()> {
        self.check_new_name(name)?;
        config.validate()?;
        let (targets, to_save) = self.select(&mut config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ seed_from_name(name));
        let geometries: Vec<(String, LayerGeometry)> =
            targets.iter().map(|l| (l.name(), l.geometry())).collect();
        let shared_device = targets[0].device();
        let shared = config.init_shared(&geometries, &shared_device, &mut rng)?;
        let mut built = Vec::with_capacity(targets.len());
        for layer in &targets {
            // Inits read the base in f32 whatever its stored type (SVD, LU, norms).
            let weight = layer.frozen_weight().to_f32()?;
            let module = layer.name();
            let ctx = InitContext {
                module: &module,
                geometry: layer.geometry(),
                base_weight: &weight,
                device: weight.device(),
                shared: &shared,
            };
            let adapter = config.init_adapter(&ctx, &mut rng)?;
            built.push((layer, adapter));
        }
        for (layer, adapter) in built {
            layer.add_adapter(name, adapter)?;
        }
        for layer in &to_save {
            layer.add_trainable_copy(name, None)?;
        }
        self.register(name, config, shared);
        Ok(())
    }

    fn register(&mut self, name: &str, config: AdapterConfig, shared: BTreeMap<String, Tensor>) {
        self.adapters.push((name.to_string(), config));
        if !shared.is_empty() {
            self.shared.insert(name.to_string(), shared);
        }
        if self.active.is_empty() {
            self.active = vec![name.to_string()];
            self.push_active();
        }
    }

    fn push_active(&self) {
        for layer in &self.layers {
            layer.set_active(&self.active);
        }
    }

    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) as
    /// adapter `name`. Every tensor in the file must belong to a targeted layer or a module to
    /// save, and every such layer must find its tensors with the right shapes.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        let dir = dir.as_ref();
        self.check_new_name(name)?;
        let file = peft_format::read_adapter_dir(dir)?;
        let mut config = file.config;
        let (targets, to_save) = self.select(&mut config)?;
        let (shared, per_module) = peft_format::split_shared(file.tensors);
        let mut by_module = peft_format::group_by_module(per_module, config.tensor_prefixes());
        let location = dir.display().to_string();
        let mut built = Vec::new();
        for layer in &targets {
            let module = layer.name();
            let tensors = by_module
                .remove(&module)
                .ok_or_else(|| PeftError::MissingTensor {
                    key: format!("{KEY_PREFIX}{module}.*"),
                    location: location.clone(),
                })?;
            let weight = layer.frozen_weight().to_f32()?;
            let ctx = LoadContext {
                module: &module,
                geometry: layer.geometry(),
                tensors: &tensors,
                shared: &shared,
                base_weight: Some(&weight),
                device: weight.device(),
            };
            let adapter = config.load_adapter(&ctx)?;
            built.push((layer, adapter));
        }
        let mut copies = Vec::new();
        for layer in &to_save {
            let module = layer.name();
            let mut tensors =
                by_module
                    .remove(&module)
                    .ok_or_else(|| PeftError::MissingTensor {
                        key: format!("{KEY_PREFIX}{module}.weight"),
                        location: location.clone(),
                    })?;
            let weight = tensors
                .remove("weight")
                .ok_or_else(|| PeftError::MissingTensor {
                    key: format!("{KEY_PREFIX}{module}.weight"),
                    location: location.clone(),
                })?;
            let bias = tensors.remove("bias");
            copies.push((layer, weight, bias));
        }
        if let Some((module, tensors)) = by_module.into_iter().next() {
            let local = tensors.keys().next().cloned().unwrap_or_default();
            return Err(PeftError::UnexpectedTensor {
                key: format!("{KEY_PREFIX}{module}.{local}"),
                location,
            });
        }
        for (layer, adapter) in built {
            layer.add_adapter(name, adapter)?;
        }
        for (layer, weight, bias) in copies {
            layer.add_trainable_copy(name, Some((weight, bias)))?;
        }
        self.register(name, config, shared);
        Ok(())
    }

    /// The tensors adapter `name` saves, under PEFT's file keys: model-level tensors first
    /// (`base_model.randlora_A`), then `base_model.model.<path>.lora_A.weight` in layer order.
    pub fn adapter_tensors(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        self.adapter_config(name)?;
        let mut out = Vec::new();
        if let Some(shared) = self.shared.get(name) {
            out.extend(shared.iter().map(|(k, t)| (k.clone(), t.clone())));
        }
        for layer in &self.layers {
            let module = layer.name();
            for (local, t) in layer.tensors_to_save(name) {
                out.push((format!("{KEY_PREFIX}{module}.{local}"), t));
            }
        }
        Ok(out)
    }

    /// Saves adapter `name` to `dir` in PEFT's format (the argument order of
    /// [`load_adapter`](Self::load_adapter)). Atomic: an interrupted save leaves the previous
    /// files intact.
    pub fn save_adapter(&self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        let config = self.adapter_config(name)?;
        let tensors = self.adapter_tensors(name)?;
        peft_format::write_adapter_dir(dir.as_ref(), config, &tensors)?;
        for (file, contents) in &self.adapter_files {
            peft_format::write_atomic(&dir.as_ref().join(file), contents)?;
        }
        Ok(())
    }

    /// A file that [`save_adapter`](Self::save_adapter) writes beside every adapter it saves
    /// (a classifier's `labels.json`, which PEFT ignores); the same name again replaces it.
    /// `name` must be a plain file name other than the adapter's own two files.
    pub fn set_adapter_file(&mut self, name: &str, contents: impl Into<Vec<u8>>) -> Result<()> {
        let plain = Path::new(name).file_name().is_some_and(|f| f == name);
        if !plain || name == peft_format::CONFIG_NAME || name == peft_format::WEIGHTS_NAME {
            return Err(PeftError::config(
                "adapter file",
                format!("`{name}` is not a plain file name beside the adapter's own two files"),
            ));
        }
        self.adapter_files.insert(name.to_string(), contents.into());
        Ok(())
    }

    /// Activates `names` (they must exist); outputs of several active adapters add up.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.adapter_config(n)?;
        }
        self.active = names.iter().map(|n| n.to_string()).collect();
        self.push_active();
        Ok(())
    }

    /// Activates the single adapter `name`.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_active(&[name])
    }

    /// Switches every adapter off: the model computes the pristine base (merged adapters are
    /// unmerged first).
    pub fn disable(&mut self) -> Result<()> {
        for layer in &self.layers {
            layer.set_enabled(false)?;
        }
        self.enabled = false;
        Ok(())
    }

    /// Switches adapters back on after [`Self::disable`] (PEFT's `enable_adapter_layers`).
    pub fn enable(&mut self) -> Result<()> {
        for layer in &self.layers {
            layer.set_enabled(true)?;
        }
        self.enabled = true;
        Ok(())
    }

    /// Whether adapters are switched on (false after [`Self::disable`]).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Removes adapter `name` from every layer and returns the adapters active afterwards. A
    /// merged adapter must be unmerged first.
    ///
    /// As in PEFT, deleting an active adapter leaves the other active ones active; when it was
    /// the only one, the first remaining adapter in name order becomes active (none if no
    /// adapter remains).
    pub fn delete_adapter(&mut self, name: &str) -> Result<Vec<String>> {
        self.adapter_config(name)?;
        for layer in &self.layers {
            if layer.merged_adapters().iter().any(|n| n == name) {
                return Err(PeftError::AlreadyMerged {
                    module: layer.name(),
                    adapter: name.to_string(),
                });
            }
        }
        for layer in &self.layers {
            layer.delete(name)?;
        }
        self.adapters.retain(|(n, _)| n != name);
        self.shared.remove(name);
        let was_active = self.active.iter().any(|n| n == name);
        self.active.retain(|n| n != name);
        if was_active && self.active.is_empty() {
            let mut remaining = self.adapter_names();
            remaining.sort();
            self.active = remaining.into_iter().take(1).collect();
        }
        self.push_active();
        Ok(self.active.clone())
    }

    /// Folds the active adapters into the base weights (PEFT's `merge_adapter`). Merging an
    /// adapter that is already merged is an error.
    pub fn merge(&mut self) -> Result<()> {
        for layer in &self.layers {
            if let Some(name) = layer
                .merged_adapters()
                .iter()
                .find(|n| self.active.contains(n))
            {
                return Err(PeftError::AlreadyMerged {
                    module: layer.name(),
                    adapter: name.clone(),
                });
            }
        }
        for layer in &self.layers {
            layer.merge(&self.active)?;
        }
        Ok(())
    }

    /// Undoes `merge`. Unmerging a model with nothing merged is an error.
    pub fn unmerge(&mut self) -> Result<()> {
        let merged: Vec<&LayerHandle> = self
            .layers
            .iter()
            .filter(|l| !l.merged_adapters().is_empty())
            .collect();
        if merged.is_empty() {
            return Err(PeftError::NotMerged {
                module: "(every layer)".into(),
            });
        }
        for layer in merged {
            layer.unmerge()?;
        }
        Ok(())
    }

    /// Merges the active adapters into the base weights, removes every adapter, and returns the
    /// plain model.
    pub fn merge_and_unload(self) -> Result<M> {
        for layer in &self.layers {
            layer.unload(true)?;
        }
        Ok(self.model)
    }

    /// Removes every adapter without merging and returns the pristine model.
    pub fn unload(self) -> Result<M> {
        for layer in &self.layers {
            layer.unload(false)?;
        }
        Ok(self.model)
    }

    /// The active adapters' trainable vars, in layer build order, named as PEFT names them in
    /// memory (`base_model.model.<path>.lora_A.<adapter>.weight`,
    /// `base_model.model.<path>.modules_to_save.<adapter>.weight`).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for layer in &self.layers {
            let module = layer.name();
            for adapter in &self.active {
                for (local, var) in layer.trainable_vars(adapter) {
                    out.push((
                        format!("{KEY_PREFIX}{module}.{}", in_memory_name(&local, adapter)),
                        var,
                    ));
                }
            }
        }
        out
    }

    /// The names, as [`trainable_vars`](Self::trainable_vars) gives them, of the active
    /// adapters' trainables that weight decay must skip ([`Adapter::no_weight_decay`]: SVFit's
    /// σ', LoLDU's z, SALT's scale, CorDA's factors), in the same order.
    ///
    /// [`Adapter::no_weight_decay`]: crate::adapter::Adapter::no_weight_decay
    pub fn no_weight_decay_vars(&self) -> Vec<String> {
        let mut out = Vec::new();
        for layer in &self.layers {
            let module = layer.name();
            for adapter in &self.active {
                let locals = layer
                    .with_adapter(adapter, |a| a.no_weight_decay())
                    .unwrap_or_default();
                for local in locals {
                    out.push(format!(
                        "{KEY_PREFIX}{module}.{}",
                        in_memory_name(&local, adapter)
                    ));
                }
            }
        }
        out
    }

    /// `Σ_adapters w · Σ_layers reg` over the active adapters whose config gives a regulariser
    /// weight `w > 0` ([`AdapterConfig::regularizer_weight`]; SALT's `reg_weight`), with `reg`
    /// each layer's [`Adapter::regularizer_loss`]: the term the trainer adds to the training
    /// loss. `None` when no active adapter asks for one.
    ///
    /// [`Adapter::regularizer_loss`]: crate::adapter::Adapter::regularizer_loss
    pub fn regularization_loss(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for adapter in &self.active {
            let weight = self.adapter_config(adapter)?.regularizer_weight();
            if weight == 0.0 {
                continue;
            }
            if let Some(sum) = self.adapter_regularizer(adapter)? {
                let term = sum.affine(weight, 0.0)?;
                total = Some(match total {
                    None => term,
                    Some(t) => t.add(&term)?,
                });
            }
        }
        Ok(total)
    }

    /// `Σ_layers reg` for adapter `adapter`, unweighted, with `reg` each layer's
    /// [`Adapter::regularizer_loss`] (SALT's orthogonality term); `None` when no layer's adapter
    /// has one. [`Self::regularization_loss`] adds `w ·` this sum for every active adapter; a
    /// training loop of your own adds `weight · reg` itself.
    ///
    /// [`Adapter::regularizer_loss`]: crate::adapter::Adapter::regularizer_loss
    pub fn adapter_regularizer(&self, adapter: &str) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for layer in &self.layers {
            let Some(Some(reg)) = layer.with_adapter(adapter, |a| a.regularizer_loss()) else {
                continue;
            };
            let reg = reg?;
            sum = Some(match sum {
                None => reg,
                Some(s) => s.add(&reg)?,
            });
        }
        Ok(sum)
    }

    /// Element count of the active adapters' trainable vars (PEFT's trainable-parameter count).
    pub fn num_trainable_parameters(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    /// Base parameters the builder loaded plus every adapter's trainables (PEFT's
    /// `get_nb_trainable_parameters` total).
    pub fn num_total_parameters(&self) -> usize {
        let base: usize = self.base_tensors.values().sum();
        let adapters: usize = self
            .adapters
            .iter()
            .flat_map(|(name, _)| self.layers.iter().map(move |l| (name, l)))
            .map(|(name, l)| {
                l.trainable_vars(name)
                    .iter()
                    .map(|(_, v)| v.as_tensor().elem_count())
                    .sum::<usize>()
            })
            .sum();
        base + adapters
    }

    /// Every adaptable layer's current weight and bias under the base model's key names
    /// (`<path>.weight`, `<path>.bias`), e.g. after `merge`. Quantized weights are dequantised
    /// to f32 (see [`LayerHandle::weight`]).
    pub fn layer_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for layer in &self.layers {
            let module = layer.name();
            out.push((format!("{module}.weight"), layer.weight()?));
            if let Some(b) = layer.bias() {
                out.push((format!("{module}.bias"), b));
            }
        }
        Ok(out)
    }
}

/// `PeftModel<M>` is used as the `M` it wraps: its forward and fields run through the adapted
/// layers.
impl<M> std::ops::Deref for PeftModel<M> {
    type Target = M;

    fn deref(&self) -> &M {
        &self.model
    }
}

impl<M> std::fmt::Debug for PeftModel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeftModel")
            .field("layers", &self.layer_names())
            .field("adapters", &self.adapter_names())
            .field("active", &self.active)
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// `lora_A.weight` → `lora_A.<adapter>.weight`; a parameter without a sub-name
/// (`randlora_lambda`) → `randlora_lambda.<adapter>` (PEFT's ParameterDict naming); a trainable
/// copy's `weight` / `bias` → `modules_to_save.<adapter>.weight`.
fn in_memory_name(local: &str, adapter: &str) -> String {
    match local.split_once('.') {
        Some((head, tail)) => format!("{head}.{adapter}.{tail}"),
        None if local == "weight" || local == "bias" => {
            format!("modules_to_save.{adapter}.{local}")
        }
        None => format!("{local}.{adapter}"),
    }
}

/// A config that plain `add_adapter` cannot initialise: its init needs a calibration pass.
fn reject_calibrated_init(config: &AdapterConfig) -> Result<()> {
    if let AdapterConfig::Lora(c) = config
        && matches!(&c.init_lora_weights, InitLoraWeights::Named(n) if n == "eva")
    {
        return Err(PeftError::config(
            "init_lora_weights",
            "\"eva\" initialises A from a calibration pass over data, which `add_adapter` \
                 does not run: call the task's `add_eva_adapter` (or \
                 `data_init::eva::add_eva_adapter`) instead",
        ));
    }
    Ok(())
}

fn unknown_adapter(name: &str) -> PeftError {
    PeftError::UnknownAdapter {
        adapter: name.to_string(),
        module: String::new(),
    }
}
