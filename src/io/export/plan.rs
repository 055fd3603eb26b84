//! The merge plan: what each output tensor is made of (copied, converted, merged with an
//! adapter's ΔW, or replaced by a `modules_to_save` tensor), decided before anything is written.
//!
//! The adapter side (reading the directory, matching its modules to base tensors, the targeting
//! checks, ΔW) is [`plan_adapter`] over a [`MergeBase`], shared by the safetensors export and the
//! GGUF merge; only what a base tensor may become differs between the two.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Dtype;

use super::MergeOptions;
use super::base::BaseModel;
use crate::adapter::{Adapter, Conv2dParams, LayerGeometry};
use crate::adapters::AdapterConfig;
use crate::config::{Candidate, LoadContext};
use crate::error::{PeftError, Result};
use crate::io::peft_format::{self, KEY_PREFIX, WEIGHTS_NAME, read_adapter_dir};
use crate::io::safetensors_header::st_error;

/// Float dtypes that candle converts and that take a merge or a dtype change.
fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

pub(super) enum Source {
    /// Bytes copied unchanged.
    Copy,
    /// Float tensor cast to another float dtype.
    Convert,
    /// `W + ΔW` (ΔW transposed for `fan_in_fan_out`).
    Merge {
        adapter: Box<dyn Adapter>,
        transpose: bool,
    },
    /// Replaced by a whole-module adapter tensor.
    Replace(Tensor),
}

pub(super) struct Planned {
    pub(super) source: Source,
    pub(super) out_dtype: Dtype,
}

/// What planning a merge needs to know of a base model's tensors, whatever file holds them.
/// Tensors are addressed by their index in [`MergeBase::tensor_shapes`], and named as the
/// adapter names them (Hugging Face names).
pub(super) trait MergeBase {
    /// How the base was given, for messages.
    fn label(&self) -> &str;
    /// Every tensor's name and shape, in output order.
    fn tensor_shapes(&self) -> Vec<(&str, &[usize])>;
    /// The index of the tensor called `name`.
    fn index_of(&self, name: &str) -> Option<usize>;
    /// Refuses a base tensor that an adapter's ΔW cannot be added to (by its storage type).
    fn check_mergeable(&self, index: usize, key: &str) -> Result<()>;
    /// Refuses a whole-module adapter tensor (of the right shape) that cannot replace the base
    /// tensor.
    fn check_replaceable(&self, index: usize, key: &str, tensor: &Tensor) -> Result<()>;
}

impl MergeBase for BaseModel {
    fn label(&self) -> &str {
        &self.label
    }

    fn tensor_shapes(&self) -> Vec<(&str, &[usize])> {
        self.tensors
            .iter()
            .map(|t| (t.name.as_str(), t.info.shape.as_slice()))
            .collect()
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    fn check_mergeable(&self, index: usize, key: &str) -> Result<()> {
        let dtype = self.tensors[index].info.dtype;
        if is_float(dtype) {
            return Ok(());
        }
        Err(PeftError::Unsupported(format!(
            "base tensor `{key}` is {dtype:?}: an adapter merges only into F32, F16, BF16 or F64 weights"
        )))
    }

    fn check_replaceable(&self, index: usize, key: &str, tensor: &Tensor) -> Result<()> {
        let dtype = self.tensors[index].info.dtype;
        if is_float(dtype) && is_float(tensor.dtype().into()) {
            return Ok(());
        }
        Err(PeftError::Unsupported(format!(
            "modules_to_save tensor `{key}`: only float tensors can replace base tensors \
             (base {dtype:?}, adapter {:?})",
            tensor.dtype()
        )))
    }
}

/// Up to `n` base tensor names closest to `wanted` (shared trailing, then leading segments).
fn nearby<'a>(base: &'a dyn MergeBase, wanted: &str, n: usize) -> Vec<&'a str> {
    let w: Vec<&str> = wanted.split('.').collect();
    let mut scored: Vec<(usize, usize, &str)> = base
        .tensor_shapes()
        .into_iter()
        .map(|(name, _)| {
            let s: Vec<&str> = name.split('.').collect();
            let suffix = w
                .iter()
                .rev()
                .zip(s.iter().rev())
                .take_while(|(a, b)| a == b)
                .count();
            let prefix = w.iter().zip(s.iter()).take_while(|(a, b)| a == b).count();
            (suffix + prefix, suffix, name)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    scored
        .into_iter()
        .take(n)
        .map(|(_, _, name)| name)
        .collect()
}

/// The error for an adapter module whose base tensor `key` does not exist.
fn missing(base: &dyn MergeBase, module: &str, key: &str) -> PeftError {
    let near = nearby(base, key, 5);
    PeftError::layer(
        module,
        format!(
            "the base model {} has no tensor `{key}`; nearest base tensors: {}",
            base.label(),
            near.join(", ")
        ),
    )
}

/// The adapter's part of a merge: for each base tensor, `Merge` or `Replace` where the adapter
/// changes it (`None` elsewhere), and the adapted modules and replaced tensors by name.
pub(super) struct AdapterPlan {
    pub(super) sources: Vec<Option<Source>>,
    pub(super) merged_modules: Vec<String>,
    pub(super) replaced_tensors: Vec<String>,
}

/// Reads the adapter and decides, for every base tensor, how its output is produced. Fails
/// before anything is written if an adapter module has no base tensor or does not fit it.
pub(super) fn plan_merge(
    model: &BaseModel,
    adapter_dir: &Path,
    opts: MergeOptions,
) -> Result<(Vec<Planned>, Vec<String>, Vec<String>)> {
    let AdapterPlan {
        sources,
        merged_modules,
        replaced_tensors,
    } = plan_adapter(model, adapter_dir)?;
    let plan = model
        .tensors
        .iter()
        .zip(sources)
        .map(|(t, source)| {
            let out_dtype = match opts.dtype {
                Some(d) if is_float(t.info.dtype) => Dtype::from(d),
                _ => t.info.dtype,
            };
            let source = source.unwrap_or(if out_dtype == t.info.dtype {
                Source::Copy
            } else {
                Source::Convert
            });
            Planned { source, out_dtype }
        })
        .collect();
    Ok((plan, merged_modules, replaced_tensors))
}

/// Reads the adapter in `adapter_dir` and matches its modules to `model`'s tensors, with every
/// check of the adapter against the base (see the module docs of `export`). Fails before
/// anything is written.
pub(super) fn plan_adapter(model: &dyn MergeBase, adapter_dir: &Path) -> Result<AdapterPlan> {
    let adapter = read_adapter_dir(adapter_dir)?;
    let weights_path = adapter_dir.join(WEIGHTS_NAME);
    if adapter.tensors.is_empty() {
        return Err(st_error(&weights_path, "the adapter file holds no tensors"));
    }
    let config = adapter.config;
    let fan_in_fan_out = config.fan_in_fan_out();
    let prefixes = config.tensor_prefixes();
    let (shared, per_module) = peft_format::split_shared(adapter.tensors);
    let modules = peft_format::group_by_module(per_module, prefixes);
    // Checked after the per-module checks below, so that a module with no base tensor is named
    // with the nearest base tensors first.
    let layout: BTreeMap<String, Vec<String>> = modules
        .iter()
        .map(|(m, t)| (m.clone(), t.keys().cloned().collect()))
        .collect();

    let shapes = model.tensor_shapes();
    let mut sources: Vec<Option<Source>> = (0..shapes.len()).map(|_| None).collect();
    let mut merged_modules = Vec::new();
    let mut replaced_tensors = Vec::new();
    let join = |module: &str, local: &str| {
        if module.is_empty() {
            local.to_string()
        } else {
            format!("{module}.{local}")
        }
    };

    for (module, tensors) in modules {
        let (adapted, whole): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) = tensors
            .into_iter()
            .partition(|(local, _)| is_adapter_tensor(local, prefixes));

        if !adapted.is_empty() {
            let key = join(&module, "weight");
            let idx = model
                .index_of(&key)
                .ok_or_else(|| missing(model, &module, &key))?;
            model.check_mergeable(idx, &key)?;
            let (geometry, transpose) =
                geometry_for(&module, &key, shapes[idx].1, &adapted, fan_in_fan_out)?;
            let built = config.load_adapter(&LoadContext {
                module: &module,
                geometry,
                tensors: &adapted,
                shared: &shared,
                base_weight: None,
                device: &Device::Cpu,
            })?;
            let used: BTreeSet<String> = built
                .tensors_to_save()
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            if let Some(extra) = adapted.keys().find(|k| !used.contains(*k)) {
                return Err(PeftError::UnexpectedTensor {
                    key: format!("{KEY_PREFIX}{}", join(&module, extra)),
                    location: weights_path.display().to_string(),
                });
            }
            if sources[idx].is_some() {
                return Err(PeftError::layer(
                    &module,
                    format!("base tensor `{key}` is targeted twice by the adapter"),
                ));
            }
            sources[idx] = Some(Source::Merge {
                adapter: built,
                transpose,
            });
            merged_modules.push(module.clone());
        }

        for (local, tensor) in whole {
            let key = join(&module, &local);
            let idx = model
                .index_of(&key)
                .ok_or_else(|| missing(model, &module, &key))?;
            if tensor.dims() != shapes[idx].1 {
                return Err(PeftError::ShapeMismatch {
                    key: format!("{KEY_PREFIX}{key} (modules_to_save, replacing base `{key}`)"),
                    expected: shapes[idx].1.to_vec(),
                    got: tensor.dims().to_vec(),
                });
            }
            model.check_replaceable(idx, &key, &tensor)?;
            if sources[idx].is_some() {
                return Err(PeftError::layer(
                    &module,
                    format!("base tensor `{key}` is both adapted and replaced by the adapter"),
                ));
            }
            sources[idx] = Some(Source::Replace(tensor));
            replaced_tensors.push(key);
        }
    }

    check_targeting(model, &config, &layout, prefixes, adapter_dir)?;
    Ok(AdapterPlan {
        sources,
        merged_modules,
        replaced_tensors,
    })
}

/// Whether a tensor named `local` (relative to its module) is one of the adapter's own tensors
/// (`lora_A.weight`), not a whole-module copy (`weight`).
fn is_adapter_tensor(local: &str, prefixes: &[&str]) -> bool {
    local
        .split('.')
        .next()
        .is_some_and(|head| prefixes.contains(&head))
}

/// The adapter's config, applied to the base model's modules as `PeftModel::load_adapter`
/// applies it to a model's layers: it must select something (the same errors as adding the
/// adapter), every module the file adapts must be a target, every target must have its tensors
/// in the file, and every whole-module tensor must belong to a `modules_to_save` module. The
/// candidates are the base's modules with a `weight` tensor, linear when it is 2-D. Under
/// `"all-linear"` a 2-D weight may also be an embedding, which the file cannot tell apart, so
/// targets without tensors are not checked there.
fn check_targeting(
    model: &dyn MergeBase,
    config: &AdapterConfig,
    modules: &BTreeMap<String, Vec<String>>,
    prefixes: &[&str],
    adapter_dir: &Path,
) -> Result<()> {
    let names: Vec<(&str, bool)> = model
        .tensor_shapes()
        .into_iter()
        .filter_map(|(name, shape)| {
            let module = name.strip_suffix(".weight")?;
            Some((module, shape.len() == 2))
        })
        .collect();
    let candidates: Vec<Candidate<'_>> = names
        .iter()
        .map(|&(name, linear)| Candidate { name, linear })
        .collect();
    let targeting = config.targeting();
    let task_type = config.inner().common().task_type.as_deref();
    let selection = targeting.select(&candidates, task_type)?;
    let targets: BTreeSet<&str> = selection.targets.iter().map(|&i| names[i].0).collect();
    let shown = targeting
        .target_modules
        .as_ref()
        .map_or_else(|| "(none)".to_string(), |t| t.to_string());
    for (module, tensors) in modules {
        let adapted = tensors.iter().any(|l| is_adapter_tensor(l, prefixes));
        if adapted && !targets.contains(module.as_str()) {
            return Err(PeftError::config(
                "target_modules",
                format!(
                    "the adapter file has tensors for `{module}`, which target_modules {shown} \
                     does not select on the base model {}",
                    model.label()
                ),
            ));
        }
        let whole = tensors.iter().any(|l| !is_adapter_tensor(l, prefixes));
        if whole && !targeting.is_module_to_save(module) {
            return Err(PeftError::config(
                "modules_to_save",
                format!(
                    "the adapter file has whole-module tensors for `{module}`, which \
                     modules_to_save does not name"
                ),
            ));
        }
    }
    let all_linear = targeting
        .target_modules
        .as_ref()
        .is_some_and(|t| t.is_all_linear());
    if !all_linear {
        let adapted = |m: &str| {
            modules
                .get(m)
                .is_some_and(|t| t.iter().any(|l| is_adapter_tensor(l, prefixes)))
        };
        if let Some(missing) = targets.iter().find(|m| !adapted(m)) {
            return Err(PeftError::MissingTensor {
                key: format!("{KEY_PREFIX}{missing}.*"),
                location: adapter_dir.join(WEIGHTS_NAME).display().to_string(),
            });
        }
    }
    Ok(())
}

/// The layer geometry implied by a base weight's shape (and, for grouped convs, the adapter's).
fn geometry_for(
    module: &str,
    key: &str,
    shape: &[usize],
    adapted: &BTreeMap<String, Tensor>,
    fan_in_fan_out: bool,
) -> Result<(LayerGeometry, bool)> {
    match *shape {
        [a, b] if fan_in_fan_out => Ok((
            LayerGeometry::Linear {
                in_features: a,
                out_features: b,
            },
            true,
        )),
        [out_features, in_features] => Ok((
            LayerGeometry::Linear {
                in_features,
                out_features,
            },
            false,
        )),
        [out_channels, per_group, kh, kw] => {
            let in_channels = adapted
                .get("lora_A.weight")
                .filter(|a| a.rank() == 4)
                .map(|a| a.dims()[1])
                .unwrap_or(per_group);
            if per_group == 0 || !in_channels.is_multiple_of(per_group) {
                return Err(PeftError::layer(
                    module,
                    format!(
                        "the adapter's input channels ({in_channels}) do not fit the base conv \
                         weight `{key}` {shape:?}"
                    ),
                ));
            }
            Ok((
                LayerGeometry::Conv2d {
                    in_channels,
                    out_channels,
                    kernel: (kh, kw),
                    params: Conv2dParams {
                        groups: in_channels / per_group,
                        ..Conv2dParams::default()
                    },
                },
                false,
            ))
        }
        _ => Err(PeftError::layer(
            module,
            format!(
                "base tensor `{key}` has shape {shape:?}; adapters merge into 2-D (linear) or \
                 4-D (conv2d) weights"
            ),
        )),
    }
}

/// An adapter's ΔW as the f32 tensor to add to base tensor `name` of `shape`: transposed for
/// `fan_in_fan_out`, and checked against the shape so that a broadcast never hides a mismatch.
pub(super) fn delta_for(
    adapter: &dyn Adapter,
    transpose: bool,
    name: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let mut delta = adapter.delta_weight()?.to_dtype(DType::F32)?;
    if transpose {
        delta = delta.t()?;
    }
    if delta.dims() != shape {
        return Err(PeftError::ShapeMismatch {
            key: format!("ΔW for `{name}`"),
            expected: shape.to_vec(),
            got: delta.dims().to_vec(),
        });
    }
    Ok(delta)
}
