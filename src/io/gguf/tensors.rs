//! The tensors of a GGUF file under their Hugging Face names: dequantised to a float dtype, or,
//! for the linear weights under `--base-dtype gguf`, kept in the file's own type.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::{GgufModel, unpermute_qk};
use crate::error::{PeftError, Result};
use crate::ops::FrozenWeight;

impl GgufModel {
    /// Every tensor dequantised to f32, un-permuted where needed, under its Hugging Face name
    /// and with its Hugging Face value (Gemma's norms `w`, not the file's `1 + w`), converted to
    /// `dtype` on `device`. An unknown tensor name is an error naming it.
    pub fn hf_tensors(&self, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        Ok(self.hf_tensors_keeping(|_| false, dtype, device)?.0)
    }

    /// As [`hf_tensors`](Self::hf_tensors), except that the 2-D tensors whose Hugging Face
    /// name `keep` accepts stay in the file's own type (ggml blocks, their q/k rows un-permuted
    /// block row by block row; f32, f16 and bf16 tensors as dense tensors of that dtype): the
    /// `--base-dtype gguf` load of the linear weights.
    pub fn hf_tensors_keeping(
        &self,
        keep: impl Fn(&str) -> bool + Sync,
        dtype: DType,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, FrozenWeight>)> {
        let a = self.arch.name;
        let mut jobs = Vec::with_capacity(self.content.tensor_infos.len());
        for name in self.tensor_names() {
            let hf = self.hf_tensor_name(name).ok_or_else(|| {
                PeftError::Unsupported(format!(
                    "{}: GGUF tensor `{name}` has no Hugging Face equivalent for architecture `{a}`",
                    self.path.display()
                ))
            })?;
            let unpermute = self.qk_permutation_heads(name)?;
            jobs.push((name, hf, unpermute));
        }
        let loaded = jobs
            .into_par_iter()
            .map(|(name, hf, unpermute)| {
                let mut reader = BufReader::new(
                    File::open(&self.path).map_err(|e| PeftError::io(&self.path, e))?,
                );
                let q = self
                    .content
                    .tensor(&mut reader, name, &Device::Cpu)
                    .map_err(|e| {
                        PeftError::layer(name, format!("reading {}: {e}", self.path.display()))
                    })?;
                if q.shape().rank() == 2 && keep(&hf) {
                    let kept = kept_weight(q, unpermute)
                        .map_err(|e| PeftError::layer(name, e.to_string()))?;
                    return Ok((hf, Loaded::Kept(kept)));
                }
                let mut w = q.dequantize(&Device::Cpu)?;
                if let Some(n_head) = unpermute {
                    w = unpermute_qk(&w, n_head)
                        .map_err(|e| PeftError::layer(name, e.to_string()))?;
                }
                if self.norms_offset_by_one() && hf.ends_with("norm.weight") {
                    w = (w - 1.0)?;
                }
                Ok((hf, Loaded::Dense(w.to_dtype(dtype)?.to_device(device)?)))
            })
            .collect::<Result<Vec<_>>>()?;
        let (mut dense, mut kept) = (HashMap::new(), HashMap::new());
        for (hf, t) in loaded {
            match t {
                Loaded::Dense(t) => {
                    dense.insert(hf, t);
                }
                Loaded::Kept(w) => {
                    kept.insert(hf, w);
                }
            }
        }
        Ok((dense, kept))
    }
}

/// A tensor of [`GgufModel::hf_tensors_keeping`]: dequantised, or kept in its own type.
enum Loaded {
    Dense(Tensor),
    Kept(FrozenWeight),
}

/// A GGUF tensor in its own type as a frozen weight, its rows un-permuted for `n_head` heads
/// when given. Rows of ggml blocks are independent, so the permutation moves whole rows of
/// bytes and no value is requantised.
fn kept_weight(q: QTensor, unpermute: Option<usize>) -> candle_core::Result<FrozenWeight> {
    let dense = match q.dtype() {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    };
    if let Some(dtype) = dense {
        let mut w = q.dequantize(&Device::Cpu)?;
        if let Some(n_head) = unpermute {
            w = unpermute_qk(&w, n_head)?;
        }
        return Ok(FrozenWeight::Dense(w.to_dtype(dtype)?));
    }
    let Some(n_head) = unpermute else {
        return Ok(FrozenWeight::Quantized(Arc::new(q)));
    };
    let (rows, _) = q.shape().dims2()?;
    let order = unpermute_qk(
        &Tensor::arange(0u32, rows as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((rows, 1))?,
        n_head,
    )?
    .flatten_all()?
    .to_vec1::<f32>()?;
    let bytes = q.data()?;
    let row_bytes = bytes.len() / rows.max(1);
    let mut permuted = Vec::with_capacity(bytes.len());
    for &src in &order {
        let src = src as usize;
        permuted.extend_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(permuted), &Device::Cpu, q.dtype())?;
    Ok(FrozenWeight::Quantized(Arc::new(QTensor::new(
        storage,
        q.shape().clone(),
    )?)))
}
