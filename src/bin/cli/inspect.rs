//! `candle-peft inspect <adapter dir> [--json]`: what an adapter directory holds — method,
//! targets, per-module ranks (read from the tensors, so `rank_pattern` shows), alpha and scaling,
//! trainable parameter count, and every tensor's key, dtype and shape. The tensor data is read
//! once to check it as loading does: a NaN or infinite weight, or an integer tensor where a
//! float belongs, is an error naming the tensor.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_peft::AdapterConfig;
use candle_peft::io::export::read_safetensors_header;
use candle_peft::io::peft_format::{
    KEY_PREFIX, WEIGHTS_NAME, check_adapter_file, read_config, split_key,
};
use clap::Args;
use serde_json::{Value, json};
use std::fmt::Write as _;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Adapter directory (adapter_config.json + adapter_model.safetensors).
    pub adapter: PathBuf,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One adapted module.
struct ModuleInfo {
    /// From the first dimension of `lora_A.weight`, when the method has one.
    rank: Option<usize>,
    /// `(r, alpha, scaling)` the config resolves for the module (LoRA family).
    resolved: Option<(usize, f64, f64)>,
    params: usize,
    /// True when the module's tensors are whole-module weights (`modules_to_save`).
    saved_whole: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let mut o = String::new();
    let dir = &args.adapter;
    let config = read_config(dir).with_context(|| format!("reading {}", dir.display()))?;
    let weights = dir.join(WEIGHTS_NAME);
    let header = read_safetensors_header(&weights)?;
    check_adapter_file(&weights)?;
    let cfg = config.to_json()?;
    // LoRA-family configs carry r / alpha; other methods print what their JSON holds.
    let lora = match &config {
        AdapterConfig::Lora(c) => Some(c),
        #[allow(unreachable_patterns)]
        _ => None,
    };
    let prefixes = config.tensor_prefixes();
    // Per-layer frozen state some methods save beside their trainables (listed, not counted)
    // and the tensor whose first dimension is the rank, as the method's registry entry says.
    let roles = &config.method().spec().tensors;
    let frozen = |local: &str| {
        local
            .split('.')
            .next()
            .is_some_and(|head| roles.frozen.contains(&head))
    };

    let mut modules: BTreeMap<String, ModuleInfo> = BTreeMap::new();
    let mut tensors = Vec::with_capacity(header.tensors.len());
    let mut trainable = 0usize;
    let mut sorted: Vec<_> = header.tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    // Model-level tensors (RandLoRA's shared bases, `base_model.randlora_A`) and their per-layer
    // duplicates are frozen: listed, but neither modules nor trainable.
    let shared_names: Vec<&str> = sorted
        .iter()
        .filter(|(k, _)| !k.starts_with(KEY_PREFIX))
        .filter_map(|(k, _)| k.rsplit('.').next())
        .collect();
    for (key, info) in sorted {
        let numel: usize = info.shape.iter().product();
        tensors.push(json!({
            "key": key,
            "dtype": info.dtype.to_string(),
            "shape": info.shape,
        }));
        if !key.starts_with(KEY_PREFIX) {
            continue;
        }
        let (module, local) = split_key(key, prefixes);
        if shared_names.contains(&local.as_str()) || frozen(&local) {
            continue;
        }
        trainable += numel;
        let whole = !local
            .split('.')
            .next()
            .is_some_and(|head| prefixes.contains(&head));
        let entry = modules.entry(module.clone()).or_insert_with(|| ModuleInfo {
            rank: None,
            resolved: None,
            params: 0,
            saved_whole: whole,
        });
        entry.params += numel;
        entry.saved_whole &= whole;
        if roles.rank == Some(local.as_str()) {
            entry.rank = info.shape.first().copied();
        }
    }
    for (name, m) in modules.iter_mut() {
        if m.saved_whole {
            continue;
        }
        m.resolved = match lora {
            Some(c) => Some(c.resolve(name)?),
            None => None,
        };
    }

    let adapted: Vec<(&String, &ModuleInfo)> =
        modules.iter().filter(|(_, m)| !m.saved_whole).collect();
    let saved: Vec<&String> = modules
        .iter()
        .filter(|(_, m)| m.saved_whole)
        .map(|(n, _)| n)
        .collect();
    let mut rank_counts: BTreeMap<usize, usize> = BTreeMap::new();
    for (_, m) in &adapted {
        if let Some(r) = m.rank {
            *rank_counts.entry(r).or_default() += 1;
        }
    }
    let mismatches: Vec<String> = adapted
        .iter()
        .filter_map(|(n, m)| match (m.rank, m.resolved) {
            (Some(file_r), Some((cfg_r, _, _))) if file_r != cfg_r => Some(format!(
                "{n}: the file has rank {file_r}, the config resolves r = {cfg_r}"
            )),
            _ => None,
        })
        .collect();
    let total_bytes = header.data_len();
    let field = |name: &str| cfg.get(name).cloned().unwrap_or(Value::Null);
    let peft_type = field("peft_type");

    if args.json {
        let module_list: Vec<Value> = adapted
            .iter()
            .map(|(n, m)| {
                let mut v = json!({ "module": n, "rank": m.rank, "params": m.params });
                if let (Some((r, alpha, scaling)), Some(obj)) = (m.resolved, v.as_object_mut()) {
                    obj.insert("config_r".into(), json!(r));
                    obj.insert("alpha".into(), json!(alpha));
                    obj.insert("scaling".into(), json!(scaling));
                }
                v
            })
            .collect();
        let ranks: serde_json::Map<String, Value> = rank_counts
            .iter()
            .map(|(r, c)| (r.to_string(), json!(c)))
            .collect();
        let scaling = match lora {
            Some(c) => json!(if c.use_rslora {
                c.lora_alpha / (c.r as f64).sqrt()
            } else {
                c.lora_alpha / c.r as f64
            }),
            None => Value::Null,
        };
        let out = json!({
            "adapter": dir.display().to_string(),
            "peft_type": peft_type,
            "method": config.method().to_string(),
            "base_model_name_or_path": field("base_model_name_or_path"),
            "task_type": field("task_type"),
            "target_modules": field("target_modules"),
            "exclude_modules": field("exclude_modules"),
            "modules_to_save": field("modules_to_save"),
            "r": field("r"),
            "lora_alpha": field("lora_alpha"),
            "use_rslora": field("use_rslora"),
            "scaling": scaling,
            "rank_pattern": field("rank_pattern"),
            "alpha_pattern": field("alpha_pattern"),
            "ranks": ranks,
            "num_modules": adapted.len(),
            "modules": module_list,
            "saved_modules": saved,
            "trainable_params": trainable,
            "num_tensors": header.tensors.len(),
            "total_bytes": total_bytes,
            "warnings": mismatches,
            "tensors": tensors,
        });
        writeln!(o, "{}", serde_json::to_string(&out)?)?;
        return super::output::print_stdout(&o);
    }

    let show = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    writeln!(o, "adapter        {}", dir.display())?;
    writeln!(
        o,
        "peft_type      {} (method {})",
        show(&peft_type),
        config.method()
    )?;
    let base = field("base_model_name_or_path");
    if !base.is_null() {
        writeln!(o, "base model     {}", show(&base))?;
    }
    writeln!(o, "target_modules {}", show(&field("target_modules")))?;
    if let Some(c) = lora {
        writeln!(o, "r              {}", c.r)?;
        writeln!(o, "lora_alpha     {}", c.lora_alpha)?;
        let (scaling, how) = if c.use_rslora {
            (
                c.lora_alpha / (c.r as f64).sqrt(),
                "lora_alpha / sqrt(r), rsLoRA",
            )
        } else {
            (c.lora_alpha / c.r as f64, "lora_alpha / r")
        };
        writeln!(o, "scaling        {scaling} ({how})")?;
        if !c.rank_pattern.is_empty() {
            writeln!(o, "rank_pattern   {}", show(&field("rank_pattern")))?;
        }
        if !c.alpha_pattern.is_empty() {
            writeln!(o, "alpha_pattern  {}", show(&field("alpha_pattern")))?;
        }
    }
    let ranks: Vec<String> = rank_counts
        .iter()
        .map(|(r, c)| format!("rank {r} × {c}"))
        .collect();
    writeln!(
        o,
        "modules        {} adapted{}",
        adapted.len(),
        if ranks.is_empty() {
            String::new()
        } else {
            format!(" ({})", ranks.join(", "))
        }
    )?;
    if rank_counts.len() > 1 {
        for (n, m) in &adapted {
            if let Some(r) = m.rank {
                writeln!(o, "  {n}: rank {r}")?;
            }
        }
    }
    if !saved.is_empty() {
        let names: Vec<&str> = saved.iter().map(|s| s.as_str()).collect();
        writeln!(o, "saved whole    {} (modules_to_save)", names.join(", "))?;
    }
    writeln!(
        o,
        "trainable      {trainable} parameters in {} tensors ({:.1} KB)",
        header.tensors.len(),
        total_bytes as f64 / 1e3
    )?;
    for w in &mismatches {
        writeln!(o, "warning        {w}")?;
    }
    writeln!(o, "tensors:")?;
    let width = tensors
        .iter()
        .filter_map(|t| t["key"].as_str().map(str::len))
        .max()
        .unwrap_or(0);
    for t in &tensors {
        writeln!(
            o,
            "  {:width$}  {:5} {}",
            t["key"].as_str().unwrap_or(""),
            t["dtype"].as_str().unwrap_or(""),
            t["shape"],
        )?;
    }
    super::output::print_stdout(&o)
}
