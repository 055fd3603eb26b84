//! The one writer of Hugging Face model folders, shared by every export (the streaming merge,
//! the Llama-family export, the BERT classifier export).
//!
//! Weights: `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus
//! `model.safetensors.index.json` (`{"metadata": {"total_size": N}, "weight_map": {…}}`, keys
//! sorted) when the tensor bytes exceed the shard limit; metadata `{"format": "pt"}`; the header
//! padded with spaces so tensor data starts 8-byte aligned, as the safetensors crate writes it.
//! Tensor bytes are produced one tensor at a time by the caller, so no export holds the whole
//! model in its output dtype.
//!
//! Atomicity: shards go to temporary names first ([`StagedWeights`]); nothing replaces an
//! earlier export until every shard is complete. Committing renames them into place, writes the
//! index, and removes weight files of an earlier export that the new one does not contain, so a
//! loader never sees a stale `model.safetensors` next to a fresh index (or the reverse). Other
//! files go through [`write_atomic`] or [`copy_atomic`].

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde_json::Value;

use crate::error::{PeftError, Result};
use crate::io::peft_format::{temp_path, write_atomic};
use crate::io::safetensors_header::st_error;
use crate::io::source::{WEIGHTS_FILE, WEIGHTS_INDEX_FILE};

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

/// One output tensor: its name, stored dtype and shape.
#[derive(Clone, Debug)]
pub(crate) struct TensorEntry {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
}

impl TensorEntry {
    /// Bytes of the tensor's data.
    pub(crate) fn nbytes(&self) -> u64 {
        let bits = self.shape.iter().product::<usize>() * self.dtype.bitsize();
        bits.div_ceil(8) as u64
    }
}

/// Weight files written under temporary names, not yet in place. Dropping it without
/// [`commit`](Self::commit) removes the temporaries.
pub(crate) struct StagedWeights {
    out_dir: PathBuf,
    /// `(temporary, final name)` per shard, in shard order.
    files: Vec<(PathBuf, String)>,
    /// `(tensor, file name)` of every tensor, for the index.
    weight_map: Vec<(String, String)>,
    total_bytes: u64,
}

/// What [`StagedWeights::commit`] put in place.
#[derive(Clone, Debug)]
pub(crate) struct WrittenWeights {
    /// The weight files, in shard order (one `model.safetensors` when not sharded).
    pub(crate) weight_files: Vec<PathBuf>,
    /// `model.safetensors.index.json`, when sharded.
    pub(crate) index_file: Option<PathBuf>,
    /// Bytes of tensor data written (the index's `total_size`).
    pub(crate) total_bytes: u64,
}

impl StagedWeights {
    /// Writes `entries` (in this order) as weight files of `out_dir` under temporary names,
    /// sharded at `max_shard_bytes` (a single tensor larger than it gets its own shard).
    /// `write_data(i, w, path)` writes entry `i`'s bytes to `w`, the file at `path` (for
    /// errors); writing a number of bytes other than the entry's size is an error. `out_dir`
    /// must exist.
    pub(crate) fn write(
        out_dir: &Path,
        entries: &[TensorEntry],
        max_shard_bytes: u64,
        mut write_data: impl FnMut(usize, &mut dyn Write, &Path) -> Result<()>,
    ) -> Result<Self> {
        let shards = split_shards(entries, max_shard_bytes);
        let names: Vec<String> = if shards.len() == 1 {
            vec![WEIGHTS_FILE.to_string()]
        } else {
            (1..=shards.len())
                .map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len()))
                .collect()
        };
        let mut staged = Self {
            out_dir: out_dir.to_path_buf(),
            files: Vec::with_capacity(shards.len()),
            weight_map: Vec::with_capacity(entries.len()),
            total_bytes: entries.iter().map(TensorEntry::nbytes).sum(),
        };
        for (shard, name) in shards.iter().zip(names) {
            let tmp = temp_path(&out_dir.join(&name));
            // Registered before writing, so that a failure removes a partial file.
            staged.files.push((tmp.clone(), name.clone()));
            write_shard(&tmp, shard, entries, &mut write_data)?;
            for &i in shard {
                staged
                    .weight_map
                    .push((entries[i].name.clone(), name.clone()));
            }
        }
        Ok(staged)
    }

    /// Renames the weight files into place, writes the index when sharded, and removes weight
    /// files of an earlier export that this one does not contain.
    pub(crate) fn commit(mut self) -> Result<WrittenWeights> {
        let files = std::mem::take(&mut self.files);
        let mut weight_files = Vec::with_capacity(files.len());
        for (i, (tmp, name)) in files.iter().enumerate() {
            let path = self.out_dir.join(name);
            if let Err(e) = fs::rename(tmp, &path) {
                for (t, _) in &files[i..] {
                    let _ = fs::remove_file(t);
                }
                return Err(PeftError::io(&path, e));
            }
            weight_files.push(path);
        }
        let sharded = files.len() > 1;
        let index_file = if sharded {
            let mut entries: Vec<(&str, &str)> = self
                .weight_map
                .iter()
                .map(|(t, f)| (t.as_str(), f.as_str()))
                .collect();
            entries.sort();
            let mut weight_map = serde_json::Map::new();
            for (tensor, file) in entries {
                weight_map.insert(tensor.to_string(), Value::from(file));
            }
            let index = serde_json::json!({
                "metadata": { "total_size": self.total_bytes },
                "weight_map": weight_map,
            });
            let path = self.out_dir.join(WEIGHTS_INDEX_FILE);
            write_json(&path, &index)?;
            Some(path)
        } else {
            None
        };
        let written: Vec<&str> = files.iter().map(|(_, n)| n.as_str()).collect();
        remove_stale_weights(&self.out_dir, &written, sharded)?;
        Ok(WrittenWeights {
            weight_files,
            index_file,
            total_bytes: self.total_bytes,
        })
    }
}

impl Drop for StagedWeights {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            if tmp.is_file() {
                let _ = fs::remove_file(tmp);
            }
        }
    }
}

/// Writes in-memory tensors as `model.safetensors` of `out_dir` (temporary name until
/// committed), each converted to `dtype` (`None` keeps its own) on the CPU only when its bytes
/// are written, so one converted tensor is held at a time. Tensors are ordered as the
/// safetensors crate's `serialize` orders them (dtype descending, then name), so the file is
/// byte-identical to one it writes. A name given twice is an error.
pub(crate) fn stage_tensors(
    out_dir: &Path,
    tensors: &[(String, Tensor)],
    dtype: Option<DType>,
) -> Result<StagedWeights> {
    let mut order: Vec<(TensorEntry, &Tensor)> = tensors
        .iter()
        .map(|(name, t)| {
            let entry = TensorEntry {
                name: name.clone(),
                dtype: dtype.unwrap_or(t.dtype()).into(),
                shape: t.dims().to_vec(),
            };
            (entry, t)
        })
        .collect();
    order.sort_by(|(a, _), (b, _)| {
        Reverse(a.dtype)
            .cmp(&Reverse(b.dtype))
            .then_with(|| a.name.cmp(&b.name))
    });
    if let Some(w) = order.windows(2).find(|w| w[0].0.name == w[1].0.name) {
        return Err(PeftError::config(
            "tensors",
            format!("`{}` appears twice", w[0].0.name),
        ));
    }
    let entries: Vec<TensorEntry> = order.iter().map(|(e, _)| e.clone()).collect();
    StagedWeights::write(out_dir, &entries, u64::MAX, |i, w, path| {
        let (entry, tensor) = &order[i];
        let t =
            tensor
                .to_device(&Device::Cpu)?
                .to_dtype(DType::try_from(entry.dtype).map_err(|e| {
                    PeftError::Unsupported(format!("tensor `{}`: {e}", entry.name))
                })?)?;
        let bytes = safetensors::View::data(&t);
        w.write_all(&bytes).map_err(|e| PeftError::io(path, e))
    })
}

/// Groups entry indices into shards of at most `max` bytes (a larger tensor goes alone).
fn split_shards(entries: &[TensorEntry], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let nbytes = e.nbytes();
        if let Some(current) = shards.last_mut()
            && !current.is_empty()
            && size + nbytes > max
        {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(current) = shards.last_mut() {
            current.push(i);
        }
        size += nbytes;
    }
    shards
}

/// A writer that counts the bytes passed through it.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one safetensors file: the header computed from the entries, then each tensor's bytes.
fn write_shard(
    tmp: &Path,
    shard: &[usize],
    entries: &[TensorEntry],
    write_data: &mut impl FnMut(usize, &mut dyn Write, &Path) -> Result<()>,
) -> Result<()> {
    let mut infos = Vec::with_capacity(shard.len());
    let mut offset = 0usize;
    for &i in shard {
        let e = &entries[i];
        let len = e.nbytes() as usize;
        infos.push((
            e.name.clone(),
            TensorInfo {
                dtype: e.dtype,
                shape: e.shape.clone(),
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
        let mut counting = Counting {
            inner: &mut w,
            count: 0,
        };
        write_data(i, &mut counting, tmp)?;
        let expected = entries[i].nbytes();
        if counting.count != expected {
            return Err(st_error(
                tmp,
                format!(
                    "tensor `{}`: {} bytes written, its header says {expected}",
                    entries[i].name, counting.count
                ),
            ));
        }
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

/// Removes weight files of an earlier export that the new one (`written`) does not contain.
fn remove_stale_weights(out_dir: &Path, written: &[&str], sharded: bool) -> Result<()> {
    let entries = fs::read_dir(out_dir).map_err(|e| PeftError::io(out_dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| PeftError::io(out_dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if written.contains(&name.as_str()) {
            continue;
        }
        let stale = (name == WEIGHTS_FILE)
            || (name == WEIGHTS_INDEX_FILE && !sharded)
            || is_shard_name(&name);
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

/// Whether `a` and `b` name the same existing directory (an export must not overwrite its
/// base folder).
pub(crate) fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Writes `value` as pretty-printed JSON with a trailing newline, atomically. Keys are sorted
/// at every depth, as transformers writes `config.json` (`sort_keys=True`).
pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut value = value.clone();
    crate::config::sort_keys(&mut value, &[]);
    let text = serde_json::to_string_pretty(&value)
        .map_err(|e| PeftError::config(path.display().to_string(), e.to_string()))?;
    write_atomic(path, format!("{text}\n").as_bytes())
}

/// Copies `src` to `dst` through a temporary file renamed into place.
pub(crate) fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let tmp = temp_path(dst);
    let result = fs::copy(src, &tmp).and_then(|_| fs::rename(&tmp, dst));
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PeftError::io(dst, e)
    })
}

/// Copies each of `names` that exists in `src_dir` to `out_dir` (atomically); returns the names
/// copied, in the order given.
pub(crate) fn copy_present_files<'a>(
    src_dir: &Path,
    out_dir: &Path,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<&'a str>> {
    let mut copied = Vec::new();
    for name in names {
        let from = src_dir.join(name);
        if from.is_file() {
            copy_atomic(&from, &out_dir.join(name))?;
            copied.push(name);
        }
    }
    Ok(copied)
}

/// The `torch_dtype` name of a dtype.
pub(crate) fn torch_dtype_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("float32"),
        DType::F16 => Some("float16"),
        DType::BF16 => Some("bfloat16"),
        DType::F64 => Some("float64"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_need_digits() {
        assert!(is_shard_name("model-00001-of-00002.safetensors"));
        assert!(!is_shard_name("model-a-of-b.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
    }

    #[test]
    fn staged_tensors_match_safetensors_serialize() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("hf_folder_test_{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| PeftError::io(&dir, e))?;
        let tensors = vec![
            (
                "b".to_string(),
                Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((2, 3))?,
            ),
            ("a".to_string(), Tensor::arange(0u32, 4, &Device::Cpu)?),
            (
                "c".to_string(),
                Tensor::arange(0f32, 3.0, &Device::Cpu)?.to_dtype(DType::F16)?,
            ),
        ];
        let written = stage_tensors(&dir, &tensors, None)?.commit()?;
        let ours = fs::read(&written.weight_files[0]).map_err(|e| PeftError::io(&dir, e))?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let theirs = safetensors::tensor::serialize(tensors.clone(), Some(metadata))
            .map_err(|e| st_error(&dir, e.to_string()))?;
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(ours, theirs);
        Ok(())
    }
}
