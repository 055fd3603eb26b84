//! Writing the merged tensors' bytes (copied, converted or merged chunk by chunk) and copying
//! the base folder's other files.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use safetensors::tensor::{Dtype, TensorInfo};

use super::OTHER_COPY_FILES;
use super::base::{BaseFile, BaseModel};
use super::plan::{Planned, Source, delta_for};
use crate::error::{PeftError, Result};
use crate::io::hf_folder::{TOKENIZER_FILES, copy_atomic, torch_dtype_name, write_json};

/// Bytes moved per read when copying or converting a tensor.
const CHUNK_BYTES: usize = 8 << 20;

fn byte_len(info: &TensorInfo) -> u64 {
    (info.data_offsets.1 - info.data_offsets.0) as u64
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Writes one output tensor's bytes.
pub(super) fn write_tensor(
    w: &mut dyn Write,
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
            let delta =
                delta_for(adapter.as_ref(), *transpose, &t.name, &t.info.shape)?.flatten_all()?;
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
fn write_tensor_data(t: &Tensor, w: &mut dyn Write, path: &Path) -> Result<()> {
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
pub(super) fn copy_aux_files(
    src_dir: &Path,
    out_dir: &Path,
    dtype: Option<DType>,
) -> Result<Vec<PathBuf>> {
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
                write_json(&dst, &value)?;
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
