//! HF PEFT's adapter directory: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.<module path>.<tensor>`, e.g.
//! `base_model.model.encoder.layer.0.attention.self.query.lora_A.weight`. PEFT strips the adapter
//! name when saving; files written from memory by other tools may still carry it
//! (`lora_A.default.weight`, `classifier.modules_to_save.default.weight`), and both forms are read.
//! The safetensors metadata is `{"format": "pt"}`.
//!
//! Reading checks every tensor: adapter weights are floating point (F16, BF16, F32 or F64) and
//! finite. An integer tensor where a float belongs (an I32 `lora_A`) or a NaN or infinity is an
//! error naming the file and the tensor; the only integer tensors an adapter may hold are the
//! index tensors of [`INDEX_TENSORS`].
//!
//! Writing is atomic as a whole: the adapter folder is written as a temporary sibling and
//! swapped into place ([`crate::io::atomic::write_dir_atomic`]), so an interrupted save leaves
//! the previous adapter whole and never mixes the files of two saves.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::adapters::AdapterConfig;
use crate::error::{PeftError, Result};
use crate::io::atomic::write_dir_atomic;

pub use crate::config::{KEY_PREFIX, PEFT_VERSION};

/// File name of the adapter's JSON config inside an adapter directory (PEFT's `CONFIG_NAME`).
pub const CONFIG_NAME: &str = "adapter_config.json";
/// File name of the adapter's weights inside an adapter directory (PEFT's
/// `SAFETENSORS_WEIGHTS_NAME`).
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// An adapter directory as read from disk: the config and the tensors under their file keys.
#[derive(Debug)]
pub struct AdapterFile {
    /// The parsed and checked `adapter_config.json`.
    pub config: AdapterConfig,
    /// Every tensor of `adapter_model.safetensors`, keyed as in the file.
    pub tensors: BTreeMap<String, Tensor>,
}

/// Reads and checks `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_NAME);
    if !path.is_file() {
        return Err(PeftError::MissingAdapterConfig {
            dir: dir.to_path_buf(),
        });
    }
    let value: serde_json::Value = crate::io::read_json(&path)?;
    AdapterConfig::from_json(&value).map_err(|e| match e {
        PeftError::InvalidConfig { field, reason } => PeftError::InvalidConfig {
            field,
            reason: format!("{reason} (in {})", path.display()),
        },
        other => other,
    })
}

/// Reads a whole adapter directory onto the CPU, after [`check_adapter_tensors`].
pub fn read_adapter_dir(dir: &Path) -> Result<AdapterFile> {
    let config = read_config(dir)?;
    let path = dir.join(WEIGHTS_NAME);
    let tensors: BTreeMap<String, Tensor> =
        read_safetensors(&path, &Device::Cpu)?.into_iter().collect();
    check_adapter_tensors(&path, &tensors)?;
    Ok(AdapterFile { config, tensors })
}

/// The per-layer tensors (by first segment of their local name) that hold indices rather than
/// weights and so are stored as integers: LoLDU's row permutation `loldu_perm.weight`.
pub const INDEX_TENSORS: &[&str] = &["loldu_perm"];

/// Reads `path` (an `adapter_model.safetensors`) and checks its tensors as
/// [`check_adapter_tensors`] does.
pub fn check_adapter_file(path: &Path) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> =
        read_safetensors(path, &Device::Cpu)?.into_iter().collect();
    check_adapter_tensors(path, &tensors)
}

/// Every tensor of an adapter file (`path` names it in errors) must be a finite float (F16,
/// BF16, F32, F64), except the index tensors of [`INDEX_TENSORS`], which must be integers. The
/// error is a [`PeftError::Io`] of kind `InvalidData` naming the file, the tensor and, for a
/// non-finite value, its first position.
pub fn check_adapter_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    for (key, t) in tensors {
        let dtype = t.dtype();
        let is_index = key
            .split('.')
            .any(|segment| INDEX_TENSORS.contains(&segment));
        if is_index {
            if !dtype.is_int() {
                return Err(bad_tensor(
                    path,
                    format!("tensor `{key}` is {dtype:?}; an index tensor must be an integer"),
                ));
            }
            continue;
        }
        if !matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
            return Err(bad_tensor(
                path,
                format!(
                    "tensor `{key}` is {dtype:?}; adapter weights must be floating point \
                     (F16, BF16, F32 or F64)"
                ),
            ));
        }
        if let Some((index, value)) = first_non_finite(t)? {
            return Err(bad_tensor(
                path,
                format!(
                    "tensor `{key}` holds {value} at flat index {index}; adapter weights must \
                     be finite"
                ),
            ));
        }
    }
    Ok(())
}

/// The first NaN or infinite element of a float tensor (flat index and value), if any.
pub fn first_non_finite(t: &Tensor) -> Result<Option<(usize, f64)>> {
    let flat = t.flatten_all()?;
    let found = if t.dtype() == DType::F64 {
        flat.to_vec1::<f64>()?
            .into_iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
    } else {
        flat.to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .map(|(i, v)| (i, f64::from(v)))
    };
    Ok(found)
}

fn bad_tensor(path: &Path, reason: String) -> PeftError {
    PeftError::io(
        path,
        std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
    )
}

/// Reads every tensor of a safetensors file, with an error naming the file when it is missing,
/// truncated or malformed.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = fs::read(path).map_err(|e| PeftError::io(path, e))?;
    safetensors::SafeTensors::deserialize(&bytes).map_err(|e| PeftError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| PeftError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Splits a file key into `(module path, tensor name relative to the module)`, dropping the
/// `base_model.model.` prefix and any adapter name PEFT keeps in memory. `prefixes` are the
/// method's tensor-name heads (`lora_A`, …); a key with none of them is a whole-module tensor
/// (`modules_to_save`): its last segment is the tensor name.
pub fn split_key(key: &str, prefixes: &[&str]) -> (String, String) {
    let key = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    let mut segments: Vec<&str> = key.split('.').collect();
    if let Some(i) = segments.iter().position(|s| *s == "modules_to_save") {
        // `<module>.modules_to_save.<adapter>.<param>`
        if i + 2 < segments.len() {
            segments.drain(i..i + 2);
        }
    }
    if let Some(i) = segments.iter().position(|s| prefixes.contains(s)) {
        let module = segments[..i].join(".");
        let mut local: Vec<&str> = segments[i..].to_vec();
        // `lora_A.<adapter>.weight` → `lora_A.weight`
        if local.len() == 3 {
            local.remove(1);
        }
        return (module, local.join("."));
    }
    match segments.split_last() {
        Some((last, head)) => (head.join("."), last.to_string()),
        None => (String::new(), key.to_string()),
    }
}

/// Splits off the model-level tensors: keys outside `base_model.model.` (RandLoRA's
/// `base_model.randlora_A`). Returns `(model-level, per-module)`.
pub fn split_shared(
    tensors: BTreeMap<String, Tensor>,
) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    tensors
        .into_iter()
        .partition(|(key, _)| !key.starts_with(KEY_PREFIX))
}

/// Groups file tensors by module: module path → (tensor name → tensor).
pub fn group_by_module(
    tensors: BTreeMap<String, Tensor>,
    prefixes: &[&str],
) -> BTreeMap<String, BTreeMap<String, Tensor>> {
    let mut out: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    for (key, t) in tensors {
        let (module, local) = split_key(&key, prefixes);
        out.entry(module).or_default().insert(local, t);
    }
    out
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors`, atomically as a whole
/// ([`write_dir_atomic`]): the folder is written as a temporary sibling and swapped into place,
/// so a failed or killed save leaves the previous adapter whole, and weights and config always
/// come from the same save. Other files of an existing `dir` are kept.
pub fn write_adapter_dir(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let mut json = config.to_json()?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("inference_mode".into(), serde_json::Value::Bool(true));
    }
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| PeftError::config("adapter_config.json", e.to_string()))?;
    let bytes = serialize_safetensors(&dir.join(WEIGHTS_NAME), tensors)?;
    write_dir_atomic(dir, |tmp| {
        write_synced(&tmp.join(WEIGHTS_NAME), &bytes)?;
        write_synced(&tmp.join(CONFIG_NAME), text.as_bytes())
    })
}

/// The bytes of a safetensors file with `{"format": "pt"}` metadata; `path` is for errors.
fn serialize_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut contiguous = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        contiguous.push((name.clone(), t.contiguous()?));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(contiguous, Some(metadata)).map_err(|e| PeftError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes tensors to a safetensors file with `{"format": "pt"}` metadata, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let bytes = serialize_safetensors(path, tensors)?;
    write_atomic(path, &bytes)
}

/// The temporary file `write_atomic` writes before renaming: `.<name>.tmp` beside the target.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temp(path, bytes)?;
    fs::rename(&tmp, path).map_err(|e| {
        if tmp.is_file() {
            let _ = fs::remove_file(&tmp);
        }
        PeftError::io(path, e)
    })
}

/// Writes `bytes` to `temp_path(path)` and syncs it; returns the temporary's path. On failure
/// the temporary is removed and the error names `path`.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = temp_path(path);
    match write_synced(&tmp, bytes) {
        Ok(()) => Ok(tmp),
        Err(e) => {
            if tmp.is_file() {
                let _ = fs::remove_file(&tmp);
            }
            Err(match e {
                PeftError::Io { source, .. } => PeftError::io(path, source),
                other => other,
            })
        }
    }
}

/// Writes `bytes` to `path` (created or truncated) and syncs it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    (|| -> std::io::Result<()> {
        let mut f = fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    })()
    .map_err(|e| PeftError::io(path, e))
}
