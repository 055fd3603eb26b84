//! CorDA → PEFT LoRA: PEFT's `path_initial_model_for_weight_conversion`. A CorDA adapter's
//! `ΔW = s·(B A − B₀ A₀) = s·[B | −B₀]·[A ; A₀]` is a PEFT LoRA of rank `2r` with `α' = 2α`
//! (rsLoRA: `√2·α`), so that `s` is unchanged, on the original base model; `rank_pattern` and
//! `alpha_pattern` values are doubled likewise. rsLoRA together with `rank_pattern` /
//! `alpha_pattern` is refused, as PEFT refuses it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::adapters::AdapterConfig;
use crate::adapters::corda::{CordaConfig, INIT_A, INIT_B, LORA_A, LORA_B};
use crate::adapters::lora::{InitLoraWeights, LoraConfig};
use crate::config::CommonFields;
use crate::error::{PeftError, Result};
use crate::io::peft_format::{self, KEY_PREFIX};

/// What [`convert_to_peft_lora`] wrote.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    /// Modules converted to rank-2r LoRA pairs.
    pub modules: Vec<String>,
    /// Whole-module tensors carried over (`modules_to_save`).
    pub copied_tensors: Vec<String>,
    /// The LoRA config written.
    pub config: LoraConfig,
}

/// The PEFT LoRA equivalent of a CorDA adapter on the original base (see the module docs): its
/// tensors under PEFT's file keys, and the report holding its config.
pub fn to_peft_lora(
    config: &CordaConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<(Vec<(String, Tensor)>, ConvertReport)> {
    if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
        return Err(PeftError::Unsupported(
            "converting a CorDA adapter with use_rslora and rank_pattern/alpha_pattern to PEFT \
             LoRA is not supported (PEFT refuses it too: the doubled rank changes the scaling)"
                .into(),
        ));
    }
    let factor = if config.use_rslora {
        std::f64::consts::SQRT_2
    } else {
        2.0
    };
    let mut lora = LoraConfig::new::<&str>(&[], 2 * config.r, config.lora_alpha * factor);
    lora.targeting = config.targeting.clone();
    lora.lora_dropout = config.lora_dropout;
    lora.use_rslora = config.use_rslora;
    lora.init_lora_weights = InitLoraWeights::Bool(true);
    lora.rank_pattern = config
        .rank_pattern
        .iter()
        .map(|(k, v)| (k.clone(), 2 * v))
        .collect();
    lora.alpha_pattern = config
        .alpha_pattern
        .iter()
        .map(|(k, v)| (k.clone(), v * factor))
        .collect();
    lora.common = CommonFields {
        inference_mode: false,
        ..config.common.clone()
    };

    let (shared, per_module) = peft_format::split_shared(tensors);
    if let Some(key) = shared.keys().next() {
        return Err(PeftError::UnexpectedTensor {
            key: key.clone(),
            location: "a CorDA adapter (it has no model-level tensors)".into(),
        });
    }
    let by_module = peft_format::group_by_module(per_module, CordaConfig::TENSOR_PREFIXES);
    let mut out = Vec::new();
    let mut modules = Vec::new();
    let mut copied = Vec::new();
    for (module, mut t) in by_module {
        let has_corda = t.keys().any(|k| {
            k.split('.')
                .next()
                .is_some_and(|h| CordaConfig::TENSOR_PREFIXES.contains(&h))
        });
        if !has_corda {
            for (local, tensor) in t {
                let key = format!("{KEY_PREFIX}{module}.{local}");
                copied.push(key.clone());
                out.push((key, tensor));
            }
            continue;
        }
        let mut take = |name: &str| -> Result<Tensor> {
            let t = t.remove(name).ok_or_else(|| PeftError::MissingTensor {
                key: format!("{KEY_PREFIX}{module}.{name}"),
                location: "the CorDA adapter".into(),
            })?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let (a, b, a0, b0) = (take(LORA_A)?, take(LORA_B)?, take(INIT_A)?, take(INIT_B)?);
        if let Some(extra) = t.keys().next() {
            return Err(PeftError::UnexpectedTensor {
                key: format!("{KEY_PREFIX}{module}.{extra}"),
                location: "the CorDA adapter".into(),
            });
        }
        let r = a.dim(0)?;
        for (name, tensor, expected) in [
            (LORA_B, &b, [b.dim(0)?, r]),
            (INIT_A, &a0, [r, a.dim(1)?]),
            (INIT_B, &b0, [b.dim(0)?, r]),
        ] {
            if tensor.dims() != expected {
                return Err(PeftError::ShapeMismatch {
                    key: format!("{KEY_PREFIX}{module}.{name}"),
                    expected: expected.to_vec(),
                    got: tensor.dims().to_vec(),
                });
            }
        }
        let lora_a = Tensor::cat(&[&a, &a0], 0)?;
        let lora_b = Tensor::cat(&[&b, &b0.neg()?], 1)?;
        out.push((format!("{KEY_PREFIX}{module}.{LORA_A}"), lora_a));
        out.push((format!("{KEY_PREFIX}{module}.{LORA_B}"), lora_b));
        modules.push(module);
    }
    if modules.is_empty() {
        return Err(PeftError::config(
            "adapter",
            "the CorDA adapter has no lora_A / lora_B tensors",
        ));
    }
    let report = ConvertReport {
        modules,
        copied_tensors: copied,
        config: lora,
    };
    Ok((out, report))
}

/// `candle-peft convert <adapter> --to peft-lora --base <model> --out <dir>`: reads a CorDA
/// adapter directory, checks every module against the base model's weights (name and shape;
/// a safetensors base, whose names may lack a task model's leading prefix such as `bert.`), and
/// writes the rank-2r PEFT LoRA to `out`. Each of `carried_files` (names of files beside the
/// adapter, such as a classifier's `labels.json`) that exists in `adapter_dir` is copied to `out`.
pub fn convert_to_peft_lora(
    adapter_dir: &Path,
    base: &Path,
    out: &Path,
    carried_files: &[&str],
) -> Result<ConvertReport> {
    let file = peft_format::read_adapter_dir(adapter_dir)?;
    let config = match file.config {
        AdapterConfig::Corda(c) => c,
        other => {
            return Err(PeftError::Unsupported(format!(
                "{}: only CorDA adapters convert to PEFT LoRA (this one is {})",
                adapter_dir.display(),
                other.method()
            )));
        }
    };
    let (tensors, report) = to_peft_lora(&config, file.tensors)?;
    check_against_base(base, &tensors)?;
    let lora_config = AdapterConfig::Lora(report.config.clone());
    lora_config.validate()?;
    peft_format::write_adapter_dir(out, &lora_config, &tensors)?;
    for name in carried_files {
        let source = adapter_dir.join(name);
        if source.is_file() {
            let bytes = std::fs::read(&source).map_err(|e| PeftError::io(&source, e))?;
            peft_format::write_atomic(&out.join(name), &bytes)?;
        }
    }
    Ok(report)
}

/// Every converted module `P` must find a base weight `P.weight` (or `Q.weight` with `P` =
/// `prefix.Q`) of shape `[out, in]` matching its LoRA pair.
fn check_against_base(base: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let source = crate::io::source::resolve_local(base)?;
    if source.kind == crate::io::source::SourceKind::Gguf {
        // GGUF names differ from the HF names adapters use; the Llama loader maps them, this
        // check does not.
        return Ok(());
    }
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for path in &source.weights {
        for (name, info) in crate::io::export::read_safetensors_header(path)?.tensors {
            shapes.insert(name, info.shape.clone());
        }
    }
    let mut a_shapes: BTreeMap<&str, &[usize]> = BTreeMap::new();
    let mut b_shapes: BTreeMap<&str, &[usize]> = BTreeMap::new();
    for (key, t) in tensors {
        if let Some(m) = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|k| k.strip_suffix(&format!(".{LORA_A}")))
        {
            a_shapes.insert(m, t.dims());
        } else if let Some(m) = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|k| k.strip_suffix(&format!(".{LORA_B}")))
        {
            b_shapes.insert(m, t.dims());
        }
    }
    for (module, a) in &a_shapes {
        let Some(b) = b_shapes.get(module) else {
            continue;
        };
        let expected = vec![b[0], a[1]];
        let wanted = format!("{module}.weight");
        let found = shapes.get(&wanted).or_else(|| {
            shapes
                .iter()
                .filter(|(name, _)| crate::config::suffix_match(&wanted, name))
                .max_by_key(|(name, _)| name.len())
                .map(|(_, s)| s)
        });
        match found {
            None => {
                return Err(PeftError::MissingTensor {
                    key: wanted,
                    location: format!("the base model {}", base.display()),
                });
            }
            Some(shape) if *shape != expected => {
                return Err(PeftError::ShapeMismatch {
                    key: format!("{wanted} (base model {})", base.display()),
                    expected,
                    got: shape.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}
