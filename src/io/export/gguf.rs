//! Merging an adapter into a GGUF base and writing a GGUF, for llama.cpp and Ollama.
//!
//! Each adapted tensor is dequantised to f32, gets `W + ΔW` (ΔW from the adapter's
//! `delta_weight()`, exactly as the safetensors export computes it), and is quantised back to
//! its own GGML type with candle's CPU quantiser: for the 32-element block types (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0) that is round-to-nearest per block with ggml's `quantize_row_*_ref`
//! scales; for the k-quants it is candle's port of ggml's reference scale search, so the bytes
//! can differ from what `llama-quantize` would choose for the same floats while decoding by the
//! same format rules. The requantisation error of each tensor against `W + ΔW` is reported.
//!
//! Re-quantising to the same type keeps a tensor's byte size, so the output is the base file
//! copied byte for byte, header (metadata and tensor directory, offsets included) and tensor
//! data alike, with only the byte ranges of the adapted tensors overwritten. Everything else is
//! identical to the source, whatever llama.cpp puts there.
//!
//! Names: the adapter names modules as Hugging Face does (`model.layers.0.self_attn.q_proj`);
//! GGUF tensors are matched through [`GgufModel::hf_tensor_name`] (`blk.0.attn_q.weight`). For the `llama`
//! architecture llama.cpp stores q and k with the rows of each head permuted for interleaved
//! RoPE, so their ΔW is permuted the same way ([`permute_qk`]) before it is added. The targeting
//! checks are the safetensors export's: an adapter module with no GGUF tensor is an error naming
//! it and the nearest tensors, before anything is written. Whole-module tensors
//! (`modules_to_save`) are refused.
//!
//! The output is written to a temporary sibling and renamed into place, so a reader never sees
//! a partial file and an error leaves an earlier output untouched.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::plan::{AdapterPlan, MergeBase, Source, delta_for, plan_adapter};
use crate::adapter::Adapter;
use crate::error::{PeftError, Result};
use crate::io::gguf::{GgufModel, permute_qk};
use crate::io::peft_format::temp_path;

/// One tensor a GGUF merge re-quantised.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufMergedTensor {
    /// The adapter module (Hugging Face name, `model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The GGUF tensor it was merged into (`blk.0.attn_q.weight`).
    pub tensor: String,
    /// The tensor's GGML type, kept from the base.
    pub ggml_type: GgmlDType,
    /// Bytes of tensor data overwritten (the same as the base's).
    pub bytes: u64,
    /// `max |Q(W + ΔW) − (W + ΔW)|`, with `Q` quantising and dequantising in the tensor's type.
    pub max_abs_error: f32,
    /// The root mean square of `Q(W + ΔW) − (W + ΔW)`.
    pub rms_error: f32,
    /// `rms_error` over the root mean square of `W + ΔW` (0 for an all-zero tensor).
    pub rel_rms_error: f32,
}

/// What a GGUF merge wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufMergeReport {
    /// The GGUF file written.
    pub out_file: PathBuf,
    /// The re-quantised tensors, in file order.
    pub merged: Vec<GgufMergedTensor>,
    /// Number of tensors in the file.
    pub num_tensors: usize,
    /// Size of the file written, in bytes (the base's).
    pub file_bytes: u64,
}

/// llama.cpp's name of a GGML type (`Q4_K`, `Q8_0`, `F32`).
pub fn ggml_type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The types a merge re-quantises into: the storage types of model weights. Q8_1 and Q8_K are
/// ggml's activation types for dot products, not weight formats.
fn is_weight_type(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

struct GgufTensor {
    /// The Hugging Face name, or the GGUF name for a tensor without one.
    name: String,
    gguf_name: String,
    shape: Vec<usize>,
    dtype: GgmlDType,
    /// Absolute position of the tensor's data in the file.
    start: u64,
    bytes: u64,
}

/// A GGUF file's tensor directory, in file order, as a merge sees it.
struct GgufBase {
    label: String,
    tensors: Vec<GgufTensor>,
    by_name: HashMap<String, usize>,
}

impl GgufBase {
    fn new(model: &GgufModel) -> Result<Self> {
        let path = model.path();
        let content = model.content();
        let file_len = fs::metadata(path)
            .map_err(|e| PeftError::io(path, e))?
            .len();
        let mut tensors = Vec::with_capacity(content.tensor_infos.len());
        for (gguf_name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            let numel = info.shape.elem_count();
            let bad = |reason: String| {
                PeftError::layer(gguf_name, format!("{}: {reason}", path.display()))
            };
            if numel % dtype.block_size() != 0 {
                return Err(bad(format!(
                    "{numel} elements do not fill whole {} blocks of {}",
                    ggml_type_name(dtype),
                    dtype.block_size()
                )));
            }
            let bytes = (numel / dtype.block_size() * dtype.type_size()) as u64;
            let start = content.tensor_data_offset.saturating_add(info.offset);
            if start.saturating_add(bytes) > file_len {
                return Err(bad(format!(
                    "its {bytes} bytes at offset {start} run past the end of the file ({file_len} bytes)"
                )));
            }
            tensors.push(GgufTensor {
                name: model
                    .hf_tensor_name(gguf_name)
                    .unwrap_or_else(|| gguf_name.clone()),
                gguf_name: gguf_name.clone(),
                shape: info.shape.dims().to_vec(),
                dtype,
                start,
                bytes,
            });
        }
        tensors.sort_by_key(|t| t.start);
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if let Some(other) = by_name.insert(t.name.clone(), i) {
                return Err(PeftError::layer(
                    &t.gguf_name,
                    format!(
                        "{}: maps to the Hugging Face name `{}`, as `{}` does",
                        path.display(),
                        t.name,
                        tensors[other].gguf_name
                    ),
                ));
            }
        }
        Ok(Self {
            label: format!(
                "{} (GGUF tensors under their Hugging Face names)",
                path.display()
            ),
            tensors,
            by_name,
        })
    }
}

impl MergeBase for GgufBase {
    fn label(&self) -> &str {
        &self.label
    }

    fn tensor_shapes(&self) -> Vec<(&str, &[usize])> {
        self.tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect()
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    fn check_mergeable(&self, index: usize, key: &str) -> Result<()> {
        let t = &self.tensors[index];
        if is_weight_type(t.dtype) {
            return Ok(());
        }
        Err(PeftError::Unsupported(format!(
            "base tensor `{key}` (GGUF `{}`) is {}, which a merge cannot re-quantise into",
            t.gguf_name,
            ggml_type_name(t.dtype)
        )))
    }

    fn check_replaceable(&self, index: usize, key: &str, _tensor: &Tensor) -> Result<()> {
        Err(PeftError::Unsupported(format!(
            "modules_to_save tensor `{key}` would replace GGUF tensor `{}`: whole-module \
             tensors are not merged into GGUF files; merge into a Hugging Face folder instead",
            self.tensors[index].gguf_name
        )))
    }
}

/// The output file until it is complete: removed on drop unless renamed into place.
struct PendingFile {
    tmp: PathBuf,
    done: bool,
}

impl PendingFile {
    fn commit(mut self, target: &Path) -> Result<()> {
        fs::rename(&self.tmp, target).map_err(|e| PeftError::io(target, e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done && self.tmp.is_file() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Refuses an output that is a folder or the base file itself.
fn check_out(base: &Path, out: &Path) -> Result<()> {
    if out.is_dir() {
        return Err(PeftError::config(
            "out",
            format!(
                "{} is a folder; a GGUF merge writes one file (e.g. merged.gguf)",
                out.display()
            ),
        ));
    }
    let same = match (fs::canonicalize(base), fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(PeftError::config(
            "out",
            format!(
                "{} is the base GGUF file; write the merged model elsewhere",
                out.display()
            ),
        ));
    }
    Ok(())
}

/// One adapted tensor, re-quantised.
struct Requantised {
    data: Vec<u8>,
    report: GgufMergedTensor,
}

/// `Q(W + ΔW)` for tensor `t` of `model`, with ΔW in the file's row order.
fn requantise(
    model: &GgufModel,
    t: &GgufTensor,
    adapter: &dyn Adapter,
    transpose: bool,
) -> Result<Requantised> {
    let path = model.path();
    let at =
        |e: candle_core::Error| PeftError::layer(&t.gguf_name, format!("{}: {e}", path.display()));
    let file = File::open(path).map_err(|e| PeftError::io(path, e))?;
    let q = model
        .content()
        .tensor(&mut BufReader::new(file), &t.gguf_name, &Device::Cpu)
        .map_err(at)?;
    let base = q.dequantize(&Device::Cpu)?;
    let mut delta = delta_for(adapter, transpose, &t.name, &t.shape)?;
    if let Some(heads) = model.qk_permutation_heads(&t.gguf_name)? {
        delta = permute_qk(&delta, heads).map_err(at)?;
    }
    let merged = (base + delta)?;
    let requant = QTensor::quantize(&merged, t.dtype).map_err(at)?;
    let data = requant.data().map_err(at)?.into_owned();
    if data.len() as u64 != t.bytes {
        return Err(PeftError::layer(
            &t.gguf_name,
            format!(
                "re-quantised to {} it takes {} bytes, the base file's {}",
                ggml_type_name(t.dtype),
                data.len(),
                t.bytes
            ),
        ));
    }
    let back = requant.dequantize(&Device::Cpu)?;
    let err: Vec<f32> = (back - &merged)?.flatten_all()?.to_vec1()?;
    let target: Vec<f32> = merged.flatten_all()?.to_vec1()?;
    let mean_sq = |v: &[f32]| {
        v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / v.len().max(1) as f64
    };
    let rms_error = mean_sq(&err).sqrt();
    let rms_target = mean_sq(&target).sqrt();
    Ok(Requantised {
        data,
        report: GgufMergedTensor {
            module: t
                .name
                .strip_suffix(".weight")
                .unwrap_or(&t.name)
                .to_string(),
            tensor: t.gguf_name.clone(),
            ggml_type: t.dtype,
            bytes: t.bytes,
            max_abs_error: err.iter().fold(0f32, |m, x| m.max(x.abs())),
            rms_error: rms_error as f32,
            rel_rms_error: if rms_target > 0.0 {
                (rms_error / rms_target) as f32
            } else {
                0.0
            },
        },
    })
}

/// Merges the adapter in `adapter_dir` into the GGUF file `base_gguf` and writes the merged
/// model to the GGUF file `out_file` (see the module docs for what is re-quantised, what is
/// copied and the names). The base must be a `llama`, `qwen2` or `gemma3` GGUF, as for loading.
pub fn merge_adapter_into_gguf(
    base_gguf: &Path,
    adapter_dir: &Path,
    out_file: &Path,
) -> Result<GgufMergeReport> {
    if base_gguf.is_dir() {
        return Err(PeftError::config(
            "base",
            format!(
                "{} is a folder; a GGUF merge takes a .gguf file as its base",
                base_gguf.display()
            ),
        ));
    }
    let model = GgufModel::open(base_gguf)?;
    check_out(base_gguf, out_file)?;
    let base = GgufBase::new(&model)?;
    let AdapterPlan { sources, .. } = plan_adapter(&base, adapter_dir)?;
    let mut jobs: Vec<(&GgufTensor, &dyn Adapter, bool)> = Vec::new();
    for (t, source) in base.tensors.iter().zip(&sources) {
        match source {
            None => {}
            Some(Source::Merge { adapter, transpose }) => {
                jobs.push((t, adapter.as_ref(), *transpose))
            }
            // `check_replaceable` refuses every replacement, and `plan_adapter` plans nothing
            // else; this keeps a future change from writing a tensor the wrong way silently.
            Some(_) => {
                return Err(PeftError::Unsupported(format!(
                    "internal: GGUF merge planned an unsupported change of `{}`",
                    t.gguf_name
                )));
            }
        }
    }

    if let Some(parent) = out_file.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| PeftError::io(parent, e))?;
    }
    let pending = PendingFile {
        tmp: temp_path(out_file),
        done: false,
    };
    let file_bytes = fs::copy(base_gguf, &pending.tmp).map_err(|e| PeftError::io(out_file, e))?;
    let mut out = OpenOptions::new()
        .write(true)
        .open(&pending.tmp)
        .map_err(|e| PeftError::io(out_file, e))?;
    let mut merged = Vec::with_capacity(jobs.len());
    // A batch per thread count bounds memory to a few tensors while using every core.
    for batch in jobs.chunks(rayon::current_num_threads().max(1)) {
        let done: Vec<Result<Requantised>> = batch
            .par_iter()
            .map(|&(t, adapter, transpose)| requantise(&model, t, adapter, transpose))
            .collect();
        for (r, &(t, _, _)) in done.into_iter().zip(batch) {
            let r = r?;
            out.seek(SeekFrom::Start(t.start))
                .and_then(|_| out.write_all(&r.data))
                .map_err(|e| PeftError::io(out_file, e))?;
            merged.push(r.report);
        }
    }
    out.sync_all().map_err(|e| PeftError::io(out_file, e))?;
    drop(out);
    pending.commit(out_file)?;
    Ok(GgufMergeReport {
        out_file: out_file.to_path_buf(),
        merged,
        num_tensors: base.tensors.len(),
        file_bytes,
    })
}
