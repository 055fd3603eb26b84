//! Merged export: a base model folder plus an adapter directory → a model folder with the base's
//! own tensor names, loadable by any Hugging Face–compatible loader. No model code is involved.
//! A GGUF base merges into a GGUF file instead ([`merge_adapter_into_gguf`], see `gguf.rs`).
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

mod base;
mod gguf;
mod plan;
mod write;

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::{PeftError, Result};
use crate::io::hf_folder::{StagedWeights, TensorEntry, same_dir};

pub use gguf::{GgufMergeReport, GgufMergedTensor, ggml_type_name, merge_adapter_into_gguf};

pub use crate::io::hf_folder::TOKENIZER_FILES;
pub use crate::io::safetensors_header::{SafetensorsHeader, read_safetensors_header};
/// The single-file weights name.
pub use crate::io::source::WEIGHTS_FILE as SINGLE_FILE_NAME;
/// The shard index name.
pub use crate::io::source::WEIGHTS_INDEX_FILE as INDEX_NAME;

/// Hugging Face's default shard size (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

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

/// Merges the adapter in `adapter_dir` into the base model at `base` (a model folder, a
/// `.safetensors` file or a `*.safetensors.index.json`) and writes the merged model folder to
/// `out_dir`. See the module docs for the mapping, the streaming and the files written.
pub fn merge_adapter_into_base(
    base: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: MergeOptions,
) -> Result<MergeReport> {
    if let Some(d) = opts.dtype
        && !matches!(d, DType::F32 | DType::F16 | DType::BF16)
    {
        return Err(PeftError::config(
            "dtype",
            format!("{d:?} is not an output dtype (expected f32, f16 or bf16)"),
        ));
    }
    if opts.max_shard_bytes == 0 {
        return Err(PeftError::config("max_shard_bytes", "must be at least 1"));
    }
    let model = base::BaseModel::open(base)?;
    if same_dir(&model.dir, out_dir) {
        return Err(PeftError::config(
            "out",
            format!(
                "{} is the base model's folder; write the merged model elsewhere",
                out_dir.display()
            ),
        ));
    }
    let (plan, merged_modules, replaced_tensors) = plan::plan_merge(&model, adapter_dir, opts)?;

    fs::create_dir_all(out_dir).map_err(|e| PeftError::io(out_dir, e))?;
    let entries: Vec<TensorEntry> = model
        .tensors
        .iter()
        .zip(&plan)
        .map(|(t, p)| TensorEntry {
            name: t.name.clone(),
            dtype: p.out_dtype,
            shape: t.info.shape.clone(),
        })
        .collect();
    let mut readers = Vec::with_capacity(model.files.len());
    for f in &model.files {
        readers.push(File::open(&f.path).map_err(|e| PeftError::io(&f.path, e))?);
    }
    // Nothing replaces an earlier export until every shard and every other file is complete;
    // dropping `staged` on an error removes the temporaries.
    let staged = StagedWeights::write(out_dir, &entries, opts.max_shard_bytes, |i, w, path| {
        write::write_tensor(w, path, &model, i, &plan[i], &mut readers)
    })?;
    let copied_files = write::copy_aux_files(&model.dir, out_dir, opts.dtype)?;
    let written = staged.commit()?;

    Ok(MergeReport {
        weight_files: written.weight_files,
        index_file: written.index_file,
        copied_files,
        merged_modules,
        replaced_tensors,
        num_tensors: plan.len(),
        total_bytes: written.total_bytes,
    })
}
