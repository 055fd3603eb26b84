//! Merged export: a base model folder plus an adapter directory → a model folder with the base's
//! own tensor names, loadable by any Hugging Face–compatible loader. No model code is involved.
//!
//! Mapping: every adapter module `P` (from the adapter file's keys,
//! `base_model.model.P.lora_A.weight` …) is merged into the base tensor `P.weight`:
//! `W' = W + ΔW`, computed in f32 from the adapter's `delta_weight()` and cast to the output
//! dtype. The layer geometry comes from the base weight's shape: 2-D is a linear layer
//! (`[out, in]`, or `[in, out]` when the config says `fan_in_fan_out`), 4-D a conv2d
//! (`[out, in/groups, kh, kw]`, groups read off the adapter's shapes). Whole-module tensors in the adapter (`modules_to_save`, keys `P.weight` / `P.bias`)
//! replace the base tensors of the same name. Every adapter module must find its base tensor;
//! otherwise the merge fails before anything is written, naming the module and the nearest base
//! tensor names.
//!
//! Streaming: only the safetensors headers are parsed up front. The output headers are computed
//! from them (shapes are unchanged; dtypes are the base's, or `MergeOptions::dtype` for float
//! tensors), then tensors are read, transformed and written one at a time: untouched tensors are
//! copied in fixed-size chunks, dtype conversions go chunk by chunk, and only a merged tensor is
//! held whole (in f32, with its ΔW). Memory is bounded by a small multiple of the largest adapted
//! tensor, never by the model.
//!
//! Output: `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus
//! `model.safetensors.index.json` (`{"metadata": {"total_size": N}, "weight_map": {…}}`) when the
//! tensor bytes exceed `max_shard_bytes`; metadata `{"format": "pt"}`; non-float tensors
//! (`position_ids`, …) unchanged. `config.json`, the tokenizer files and sentence-transformers
//! module folders are copied; with a dtype, `config.json`'s `torch_dtype` is updated. Every file
//! is written to a temporary name and renamed into place, and stale weight files of an earlier
//! export in the same folder are removed, so loaders never see a mix.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use crate::adapter::{Adapter, Conv2dParams, LayerGeometry};
use crate::config::LoadContext;
use crate::error::{PeftError, Result};
use crate::io::peft_format::{
    self, KEY_PREFIX, WEIGHTS_NAME, read_adapter_dir, temp_path, write_atomic,
};

/// Hugging Face's default shard size (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;
/// The single-file weights name.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Tokenizer files a model folder may carry; exports copy those the base has.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
];

/// The other non-weight files a merge copies from the base folder when present.
const OTHER_COPY_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    // sentence-transformers
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];

/// Bytes moved per read when copying or converting a tensor.
const CHUNK_BYTES: usize = 8 << 20;
/// Largest safetensors header accepted (as the safetensors crate).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// How to write the merged model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MergeOptions {
    /// Output dtype of float tensors (`F32`, `F16` or `BF16`); `None` keeps each tensor's dtype.
    pub dtype: Option<DType>,
    /// Shard when the tensor bytes exceed this (a single tensor larger than it gets its own shard).
    pub max_shard_bytes: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// What a merge wrote.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    /// The weight files, in shard order (one `model.safetensors` when not sharded).
    pub weight_files: Vec<PathBuf>,
    /// `model.safetensors.index.json`, when sharded.
    pub index_file: Option<PathBuf>,
    /// Other files copied from the base folder, relative to it.
    pub copied_files: Vec<PathBuf>,
    /// Adapter modules merged into their base weight (`P` for tensor `P.weight`).
    pub merged_modules: Vec<String>,
    /// Base tensors replaced by whole-module adapter tensors (`modules_to_save`).
    pub replaced_tensors: Vec<String>,
    /// Number of tensors written.
    pub num_tensors: usize,
    /// Bytes of tensor data written (the index's `total_size`).
    pub total_bytes: u64,
}

/// A safetensors header, read without touching the tensor data.
#[derive(Clone, Debug)]
pub struct SafetensorsHeader {
    /// File offset of the first tensor byte (8 + header length).
    pub data_start: u64,
    /// Tensors in file (offset) order.
    pub tensors: Vec<(String, TensorInfo)>,
    /// The `__metadata__` map, if any.
    pub metadata: Option<HashMap<String, String>>,
}

impl SafetensorsHeader {
    /// Bytes of tensor data after the header.
    pub fn data_len(&self) -> u64 {
        self.tensors
            .last()
            .map(|(_, t)| t.data_offsets.1 as u64)
            .unwrap_or(0)
    }
}

fn st_error(path: &Path, reason: impl Into<String>) -> PeftError {
    PeftError::Safetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads and validates the header of a safetensors file, checking that the file holds exactly
/// the bytes the header describes (a truncated file is an error naming it).
pub fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader> {
    let mut file = File::open(path).map_err(|e| PeftError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| PeftError::io(path, e))?.len();
    if file_len < 8 {
        return Err(st_error(
            path,
            format!("file is {file_len} bytes, too short for a safetensors header"),
        ));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| PeftError::io(path, e))?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES || n > file_len - 8 {
        return Err(st_error(
            path,
            format!(
                "header length {n} does not fit in the file ({file_len} bytes): truncated or not safetensors"
            ),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| PeftError::io(path, e))?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| st_error(path, format!("invalid header: {e}")))?;
    let data_start = 8 + n;
    let offset_keys = metadata.offset_keys();
    let mut tensors = Vec::with_capacity(offset_keys.len());
    for name in offset_keys {
        if let Some(info) = metadata.info(&name) {
            let info = info.clone();
            tensors.push((name, info));
        }
    }
    let header = SafetensorsHeader {
        data_start,
        tensors,
        metadata: metadata.metadata().clone(),
    };
    let expected = data_start + header.data_len();
    if expected != file_len {
        let what = if expected > file_len {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return Err(st_error(
            path,
            format!(
                "file is {what}: the header describes {expected} bytes, the file has {file_len}"
            ),
        ));
    }
    Ok(header)
}

/// Parses a CLI dtype name: `f32`/`float32`, `f16`/`float16`/`half`, `bf16`/`bfloat16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => Ok(DType::F32),
        "f16" | "float16" | "half" | "fp16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(PeftError::config(
            "dtype",
            format!("unknown dtype `{other}` (expected f32, f16 or bf16)"),
        )),
    }
}

/// Parses a size such as `5GB`, `500MB`, `2GiB`, `1.5G` or `1048576` into bytes. Units follow
/// Hugging Face: `KB`/`MB`/`GB`/`TB` are powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` powers of 1024.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = |reason: &str| {
        PeftError::config(
            "max_shard_size",
            format!("`{text}`: {reason} (examples: 5GB, 500MB, 2GiB, 1048576)"),
        )
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = (number * scale).round();
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad("must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// The `torch_dtype` name of a dtype.
fn torch_dtype_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("float32"),
        DType::F16 => Some("float16"),
        DType::BF16 => Some("bfloat16"),
        DType::F64 => Some("float64"),
        _ => None,
    }
}

/// Float dtypes that candle converts and that take a merge or a dtype change.
fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

fn byte_len(info: &TensorInfo) -> u64 {
    (info.data_offsets.1 - info.data_offsets.0) as u64
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

// ---------------------------------------------------------------------------------------------
// Base model: safetensors headers of one file or of the shards of an index.

struct BaseFile {
    path: PathBuf,
    data_start: u64,
}

struct BaseTensor {
    name: String,
    file: usize,
    info: TensorInfo,
}

struct BaseModel {
    /// Where the base's config and tokenizer live.
    dir: PathBuf,
    files: Vec<BaseFile>,
    /// In output order: file order, then offset order within a file.
    tensors: Vec<BaseTensor>,
    by_name: HashMap<String, usize>,
    /// How the base was given, for messages.
    label: String,
}

impl BaseModel {
    fn open(base: &Path) -> Result<Self> {
        let not_found = |reason: String| PeftError::ModelNotFound {
            id: base.display().to_string(),
            reason,
        };
        let (dir, files) = if base.is_file() {
            let dir = base
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let name = base
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".index.json") {
                let files = read_index(base, &dir)?;
                (dir, files)
            } else {
                (dir, vec![base.to_path_buf()])
            }
        } else if base.is_dir() {
            let index = base.join(INDEX_NAME);
            let single = base.join(SINGLE_FILE_NAME);
            // transformers' order: the single file wins over an index.
            if single.is_file() {
                (base.to_path_buf(), vec![single])
            } else if index.is_file() {
                (base.to_path_buf(), read_index(&index, base)?)
            } else {
                let (weights, indexes) = list_weight_files(base)?;
                match (weights.as_slice(), indexes.as_slice()) {
                    (_, [index]) => (base.to_path_buf(), read_index(index, base)?),
                    ([one], []) => (base.to_path_buf(), vec![one.clone()]),
                    _ => {
                        let found: Vec<String> = weights
                            .iter()
                            .chain(indexes.iter())
                            .filter_map(|p| p.file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                            .collect();
                        return Err(not_found(format!(
                            "no {SINGLE_FILE_NAME} or {INDEX_NAME} in the folder (safetensors files found: {})",
                            if found.is_empty() {
                                "none".to_string()
                            } else {
                                found.join(", ")
                            }
                        )));
                    }
                }
            }
        } else {
            return Err(not_found("no such file or directory".into()));
        };

        let mut model = BaseModel {
            dir,
            files: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            label: base.display().to_string(),
        };
        for path in files {
            let header = read_safetensors_header(&path)?;
            let file = model.files.len();
            for (name, info) in header.tensors {
                if let Some(&other) = model.by_name.get(&name) {
                    let first = &model.files[model.tensors[other].file].path;
                    return Err(st_error(
                        &path,
                        format!(
                            "tensor `{name}` is also in {}: a tensor must be in one shard",
                            first.display()
                        ),
                    ));
                }
                model.by_name.insert(name.clone(), model.tensors.len());
                model.tensors.push(BaseTensor { name, file, info });
            }
            model.files.push(BaseFile {
                path,
                data_start: header.data_start,
            });
        }
        if model.tensors.is_empty() {
            return Err(not_found("the weight files hold no tensors".into()));
        }
        Ok(model)
    }

    /// Up to `n` base tensor names closest to `wanted` (shared trailing, then leading segments).
    fn nearby(&self, wanted: &str, n: usize) -> Vec<&str> {
        let w: Vec<&str> = wanted.split('.').collect();
        let mut scored: Vec<(usize, usize, &str)> = self
            .tensors
            .iter()
            .map(|t| {
                let s: Vec<&str> = t.name.split('.').collect();
                let suffix = w
                    .iter()
                    .rev()
                    .zip(s.iter().rev())
                    .take_while(|(a, b)| a == b)
                    .count();
                let prefix = w.iter().zip(s.iter()).take_while(|(a, b)| a == b).count();
                (suffix + prefix, suffix, t.name.as_str())
            })
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
        scored
            .into_iter()
            .take(n)
            .map(|(_, _, name)| name)
            .collect()
    }

    fn missing(&self, module: &str, key: &str) -> PeftError {
        let near = self.nearby(key, 5);
        PeftError::layer(
            module,
            format!(
                "the base model {} has no tensor `{key}`; nearest base tensors: {}",
                self.label,
                near.join(", ")
            ),
        )
    }
}

/// `*.safetensors` and `*.safetensors.index.json` files of a folder, sorted.
fn list_weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut weights = Vec::new();
    let mut indexes = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| PeftError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| PeftError::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !path.is_file() || name.starts_with('.') {
            continue;
        }
        if name.ends_with(".safetensors.index.json") {
            indexes.push(path);
        } else if name.ends_with(".safetensors") && name != WEIGHTS_NAME {
            weights.push(path);
        }
    }
    weights.sort();
    indexes.sort();
    Ok((weights, indexes))
}

/// The shard files of a Hugging Face index, in sorted order; checks that each listed tensor is in
/// the file the index names.
fn read_index(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, file) in crate::io::source::weight_map(index)? {
        by_file.entry(file).or_default().push(name);
    }
    let mut files = Vec::with_capacity(by_file.len());
    for (file, names) in by_file {
        let path = dir.join(&file);
        let header = read_safetensors_header(&path)?;
        let present: BTreeSet<&str> = header.tensors.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(name) = names.iter().find(|n| !present.contains(n.as_str())) {
            return Err(PeftError::MissingTensor {
                key: name.clone(),
                location: format!("{} (as {} says)", path.display(), index.display()),
            });
        }
        files.push(path);
    }
    Ok(files)
}

// ---------------------------------------------------------------------------------------------
// The plan: what each output tensor is made of.

enum Source {
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

struct Planned {
    source: Source,
    out_dtype: Dtype,
    nbytes: u64,
}

/// Merges the adapter in `adapter_dir` into the base model at `base` (a model folder, a
/// `.safetensors` file or a `*.safetensors.index.json`) and writes the merged model folder to
/// `out_dir`. See the module docs for the mapping, the streaming and the files written.
pub fn merge_adapter_into_base(
    base: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: MergeOptions,
) -> Result<MergeReport> {
    if let Some(d) = opts.dtype {
        if !matches!(d, DType::F32 | DType::F16 | DType::BF16) {
            return Err(PeftError::config(
                "dtype",
                format!("{d:?} is not an output dtype (expected f32, f16 or bf16)"),
            ));
        }
    }
    if opts.max_shard_bytes == 0 {
        return Err(PeftError::config("max_shard_bytes", "must be at least 1"));
    }
    let model = BaseModel::open(base)?;
    if same_dir(&model.dir, out_dir) {
        return Err(PeftError::config(
            "out",
            format!(
                "{} is the base model's folder; write the merged model elsewhere",
                out_dir.display()
            ),
        ));
    }
    let (plan, merged_modules, replaced_tensors) = plan_merge(&model, adapter_dir, opts)?;

    fs::create_dir_all(out_dir).map_err(|e| PeftError::io(out_dir, e))?;
    let shards = split_shards(&plan, opts.max_shard_bytes);
    let names: Vec<String> = if shards.len() == 1 {
        vec![SINGLE_FILE_NAME.to_string()]
    } else {
        (1..=shards.len())
            .map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len()))
            .collect()
    };

    // Weight files go to temporary names first; nothing replaces an earlier export until every
    // shard is complete.
    let mut temps: Vec<PathBuf> = Vec::new();
    let written = (|| -> Result<()> {
        let mut readers = Vec::with_capacity(model.files.len());
        for f in &model.files {
            readers.push(File::open(&f.path).map_err(|e| PeftError::io(&f.path, e))?);
        }
        for (shard, name) in shards.iter().zip(&names) {
            let tmp = temp_path(&out_dir.join(name));
            temps.push(tmp.clone());
            write_shard(&tmp, shard, &model, &plan, &mut readers)?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        for t in &temps {
            let _ = fs::remove_file(t);
        }
        return Err(e);
    }

    let copied_files = match copy_aux_files(&model.dir, out_dir, opts.dtype) {
        Ok(c) => c,
        Err(e) => {
            for t in &temps {
                let _ = fs::remove_file(t);
            }
            return Err(e);
        }
    };

    let mut weight_files = Vec::with_capacity(names.len());
    for (i, (tmp, name)) in temps.iter().zip(&names).enumerate() {
        let path = out_dir.join(name);
        if let Err(e) = fs::rename(tmp, &path) {
            for t in &temps[i..] {
                let _ = fs::remove_file(t);
            }
            return Err(PeftError::io(&path, e));
        }
        weight_files.push(path);
    }
    let total_bytes: u64 = plan.iter().map(|p| p.nbytes).sum();
    let index_file = if shards.len() > 1 {
        let mut weight_map = serde_json::Map::new();
        let mut entries: Vec<(&str, &str)> = Vec::new();
        for (shard, name) in shards.iter().zip(&names) {
            for &i in shard {
                entries.push((model.tensors[i].name.as_str(), name.as_str()));
            }
        }
        entries.sort();
        for (tensor, file) in entries {
            weight_map.insert(tensor.to_string(), serde_json::Value::from(file));
        }
        let index = serde_json::json!({
            "metadata": { "total_size": total_bytes },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| PeftError::config("weight_map", e.to_string()))?;
        let path = out_dir.join(INDEX_NAME);
        write_atomic(&path, format!("{text}\n").as_bytes())?;
        Some(path)
    } else {
        None
    };
    remove_stale_weights(out_dir, &names, index_file.is_some())?;

    Ok(MergeReport {
        weight_files,
        index_file,
        copied_files,
        merged_modules,
        replaced_tensors,
        num_tensors: plan.len(),
        total_bytes,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Reads the adapter and decides, for every base tensor, how its output is produced. Fails
/// before anything is written if an adapter module has no base tensor or does not fit it.
fn plan_merge(
    model: &BaseModel,
    adapter_dir: &Path,
    opts: MergeOptions,
) -> Result<(Vec<Planned>, Vec<String>, Vec<String>)> {
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

    let mut sources: Vec<Option<Source>> = (0..model.tensors.len()).map(|_| None).collect();
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
        let (adapted, whole): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) =
            tensors.into_iter().partition(|(local, _)| {
                local
                    .split('.')
                    .next()
                    .is_some_and(|head| prefixes.contains(&head))
            });

        if !adapted.is_empty() {
            let key = join(&module, "weight");
            let &idx = model
                .by_name
                .get(&key)
                .ok_or_else(|| model.missing(&module, &key))?;
            let info = &model.tensors[idx].info;
            if !is_float(info.dtype) {
                return Err(PeftError::Unsupported(format!(
                    "base tensor `{key}` is {:?}: an adapter merges only into F32, F16, BF16 or F64 weights",
                    info.dtype
                )));
            }
            let (geometry, transpose) =
                geometry_for(&module, &key, &info.shape, &adapted, fan_in_fan_out)?;
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
            let &idx = model
                .by_name
                .get(&key)
                .ok_or_else(|| model.missing(&module, &key))?;
            let info = &model.tensors[idx].info;
            if tensor.dims() != info.shape.as_slice() {
                return Err(PeftError::ShapeMismatch {
                    key: format!("{KEY_PREFIX}{key} (modules_to_save, replacing base `{key}`)"),
                    expected: info.shape.clone(),
                    got: tensor.dims().to_vec(),
                });
            }
            if !is_float(info.dtype) || !is_float(tensor.dtype().into()) {
                return Err(PeftError::Unsupported(format!(
                    "modules_to_save tensor `{key}`: only float tensors can replace base tensors \
                     (base {:?}, adapter {:?})",
                    info.dtype,
                    tensor.dtype()
                )));
            }
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
            let bits = numel(&t.info.shape) * out_dtype.bitsize();
            Planned {
                source,
                out_dtype,
                nbytes: bits.div_ceil(8) as u64,
            }
        })
        .collect();
    Ok((plan, merged_modules, replaced_tensors))
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
            if per_group == 0 || in_channels % per_group != 0 {
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

/// Groups tensor indices into shards of at most `max` bytes (a larger tensor goes alone).
fn split_shards(plan: &[Planned], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, p) in plan.iter().enumerate() {
        if let Some(current) = shards.last_mut() {
            if !current.is_empty() && size + p.nbytes > max {
                shards.push(Vec::new());
                size = 0;
            }
        }
        if let Some(current) = shards.last_mut() {
            current.push(i);
        }
        size += p.nbytes;
    }
    shards
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// Writes one safetensors file: the header computed from the plan, then each tensor in order.
fn write_shard(
    tmp: &Path,
    shard: &[usize],
    model: &BaseModel,
    plan: &[Planned],
    readers: &mut [File],
) -> Result<()> {
    let mut infos = Vec::with_capacity(shard.len());
    let mut offset = 0usize;
    for &i in shard {
        let p = &plan[i];
        let len = p.nbytes as usize;
        infos.push((
            model.tensors[i].name.clone(),
            TensorInfo {
                dtype: p.out_dtype,
                shape: model.tensors[i].info.shape.clone(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let meta = Metadata::new(
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        infos,
    )
    .map_err(|e| st_error(tmp, e.to_string()))?;
    let mut header = serde_json::to_vec(&meta).map_err(|e| st_error(tmp, e.to_string()))?;
    // Pad with spaces so that tensor data starts 8-byte aligned, as the safetensors crate does.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }

    let io = |e: std::io::Error| PeftError::io(tmp, e);
    let file = File::create(tmp).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for &i in shard {
        write_tensor(&mut w, tmp, model, i, &plan[i], readers)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

/// Writes one output tensor's bytes.
fn write_tensor<W: Write>(
    w: &mut W,
    tmp: &Path,
    model: &BaseModel,
    i: usize,
    planned: &Planned,
    readers: &mut [File],
) -> Result<()> {
    let t = &model.tensors[i];
    let src = &model.files[t.file];
    let reader = &mut readers[t.file];
    let start = src.data_start + t.info.data_offsets.0 as u64;
    let len = byte_len(&t.info);
    let what = || format!("tensor `{}`", t.name);
    match &planned.source {
        Source::Copy => {
            reader
                .seek(SeekFrom::Start(start))
                .map_err(|e| PeftError::io(&src.path, e))?;
            let mut buf = vec![0u8; CHUNK_BYTES.min(len as usize)];
            let mut left = len;
            while left > 0 {
                let n = (left as usize).min(buf.len());
                reader
                    .read_exact(&mut buf[..n])
                    .map_err(|e| PeftError::io(&src.path, e))?;
                w.write_all(&buf[..n]).map_err(|e| PeftError::io(tmp, e))?;
                left -= n as u64;
            }
            Ok(())
        }
        Source::Convert => {
            let src_dtype = candle_dtype(t.info.dtype, &what)?;
            let dst_dtype = candle_dtype(planned.out_dtype, &what)?;
            stream_elements(reader, src, start, &t.info.shape, src_dtype, |_, x| {
                write_tensor_data(&x.to_dtype(dst_dtype)?, w, tmp)
            })
        }
        Source::Merge { adapter, transpose } => {
            let src_dtype = candle_dtype(t.info.dtype, &what)?;
            let dst_dtype = candle_dtype(planned.out_dtype, &what)?;
            // ΔW is the only whole tensor held; the base streams past it chunk by chunk.
            let mut delta = adapter.delta_weight()?.to_dtype(DType::F32)?;
            if *transpose {
                delta = delta.t()?;
            }
            if delta.dims() != t.info.shape.as_slice() {
                return Err(PeftError::ShapeMismatch {
                    key: format!("ΔW for `{}`", t.name),
                    expected: t.info.shape.clone(),
                    got: delta.dims().to_vec(),
                });
            }
            let delta = delta.flatten_all()?;
            stream_elements(reader, src, start, &t.info.shape, src_dtype, |k, x| {
                let n = x.elem_count();
                let y = (x.to_dtype(DType::F32)? + delta.narrow(0, k, n)?)?.to_dtype(dst_dtype)?;
                write_tensor_data(&y, w, tmp)
            })
        }
        Source::Replace(tensor) => {
            let dst_dtype = candle_dtype(planned.out_dtype, &what)?;
            let x = tensor.to_dtype(dst_dtype)?;
            write_tensor_data(&x, w, tmp)
        }
    }
}

/// Reads a tensor's elements from `start` in chunks of about `CHUNK_BYTES`, calling
/// `f(first_element_index, chunk)` with each chunk as a 1-D tensor of `dtype`.
fn stream_elements(
    reader: &mut File,
    src: &BaseFile,
    start: u64,
    shape: &[usize],
    dtype: DType,
    mut f: impl FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    let elem = dtype.size_in_bytes();
    let chunk_elems = (CHUNK_BYTES / elem).max(1);
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| PeftError::io(&src.path, e))?;
    let total = numel(shape);
    let mut buf = vec![0u8; chunk_elems.min(total) * elem];
    let mut k = 0;
    while k < total {
        let n = (total - k).min(chunk_elems);
        let bytes = &mut buf[..n * elem];
        reader
            .read_exact(bytes)
            .map_err(|e| PeftError::io(&src.path, e))?;
        f(
            k,
            Tensor::from_raw_buffer(bytes, dtype, &[n], &Device::Cpu)?,
        )?;
        k += n;
    }
    Ok(())
}

fn candle_dtype(dtype: Dtype, what: &dyn Fn() -> String) -> Result<DType> {
    DType::try_from(dtype)
        .map_err(|_| PeftError::Unsupported(format!("{}: dtype {dtype:?} not supported", what())))
}

/// Writes a CPU tensor's elements as little-endian bytes.
fn write_tensor_data<W: Write>(t: &Tensor, w: &mut W, path: &Path) -> Result<()> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(PeftError::Unsupported(
            "internal: tensor not contiguous after contiguous()".into(),
        ));
    };
    let Storage::Cpu(cpu) = &*storage else {
        return Err(PeftError::Unsupported(
            "merged export runs on the CPU; got a tensor on another device".into(),
        ));
    };
    let io = |e: std::io::Error| PeftError::io(path, e);
    macro_rules! emit {
        ($v:expr, $size:expr) => {{
            let mut buf = Vec::with_capacity((1 << 16) * $size);
            for chunk in $v[start..end].chunks(1 << 16) {
                buf.clear();
                for x in chunk {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
                w.write_all(&buf).map_err(io)?;
            }
            Ok(())
        }};
    }
    match cpu {
        CpuStorage::F32(v) => emit!(v, 4),
        CpuStorage::F16(v) => emit!(v, 2),
        CpuStorage::BF16(v) => emit!(v, 2),
        CpuStorage::F64(v) => emit!(v, 8),
        CpuStorage::U8(v) => w.write_all(&v[start..end]).map_err(io),
        CpuStorage::U32(v) => emit!(v, 4),
        CpuStorage::I16(v) => emit!(v, 2),
        CpuStorage::I32(v) => emit!(v, 4),
        CpuStorage::I64(v) => emit!(v, 8),
        _ => Err(PeftError::Unsupported(format!(
            "writing {:?} tensors is not supported",
            t.dtype()
        ))),
    }
}

/// Copies config, tokenizer and sentence-transformers files; sets `torch_dtype` when a dtype is
/// given. Returns the copied paths relative to the base folder.
fn copy_aux_files(src_dir: &Path, out_dir: &Path, dtype: Option<DType>) -> Result<Vec<PathBuf>> {
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES.iter().chain(OTHER_COPY_FILES) {
        let src = src_dir.join(name);
        if !src.is_file() {
            continue;
        }
        let dst = out_dir.join(name);
        match dtype.and_then(torch_dtype_name) {
            Some(torch) if *name == "config.json" => {
                let mut value: serde_json::Value = crate::io::read_json(&src)?;
                if let Some(obj) = value.as_object_mut() {
                    obj.insert("torch_dtype".into(), torch.into());
                    // transformers ≥ 4.56 writes `dtype` instead.
                    if obj.contains_key("dtype") {
                        obj.insert("dtype".into(), torch.into());
                    }
                }
                let text = serde_json::to_string_pretty(&value)
                    .map_err(|e| PeftError::config("config.json", e.to_string()))?;
                write_atomic(&dst, format!("{text}\n").as_bytes())?;
            }
            _ => copy_atomic(&src, &dst)?,
        }
        copied.push(PathBuf::from(name));
    }
    // sentence-transformers module folders (`1_Pooling`, `2_Normalize`, `2_Dense`, …).
    let entries = fs::read_dir(src_dir).map_err(|e| PeftError::io(src_dir, e))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| PeftError::io(src_dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_module_dir = path.is_dir()
            && name.split_once('_').is_some_and(|(n, rest)| {
                !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && !rest.is_empty()
            });
        if is_module_dir {
            dirs.push((path, PathBuf::from(name)));
        }
    }
    dirs.sort();
    while let Some((dir, rel)) = dirs.pop() {
        let dst = out_dir.join(&rel);
        fs::create_dir_all(&dst).map_err(|e| PeftError::io(&dst, e))?;
        let entries = fs::read_dir(&dir).map_err(|e| PeftError::io(&dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| PeftError::io(&dir, e))?.path();
            let Some(name) = path.file_name() else {
                continue;
            };
            if path.is_dir() {
                dirs.push((path.clone(), rel.join(name)));
            } else if path.is_file() {
                copy_atomic(&path, &dst.join(name))?;
                copied.push(rel.join(name));
            }
        }
    }
    Ok(copied)
}

fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let tmp = temp_path(dst);
    let result = fs::copy(src, &tmp).and_then(|_| fs::rename(&tmp, dst));
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PeftError::io(dst, e)
    })
}

/// Removes weight files of an earlier export that the new one does not contain, so that a
/// loader never picks up a stale `model.safetensors` next to a fresh index (or the reverse).
fn remove_stale_weights(out_dir: &Path, written: &[String], sharded: bool) -> Result<()> {
    let entries = fs::read_dir(out_dir).map_err(|e| PeftError::io(out_dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| PeftError::io(out_dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if written.contains(&name) {
            continue;
        }
        let stale =
            (name == SINGLE_FILE_NAME) || (name == INDEX_NAME && !sharded) || is_shard_name(&name);
        if stale && path.is_file() {
            fs::remove_file(&path).map_err(|e| PeftError::io(&path, e))?;
        }
    }
    Ok(())
}

/// `model-00001-of-00002.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    match rest.split_once("-of-") {
        Some((i, n)) => {
            !i.is_empty()
                && !n.is_empty()
                && i.chars().all(|c| c.is_ascii_digit())
                && n.chars().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}
