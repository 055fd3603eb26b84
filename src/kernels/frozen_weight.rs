//! A frozen base weight in the type it is stored in, and the load option that picks that type.
//!
//! A base weight is either a dense tensor (f32, f16 or bf16) or ggml blocks (a candle
//! [`QTensor`], as a GGUF file holds them). Adapters, their gradients, the optimiser state and
//! the activations stay f32 whatever the base type: the frozen ops read a low-precision weight
//! tile by tile (see `kernels::lowp`) and never widen the whole matrix. Only what needs the whole
//! matrix in f32 once widens it: a data-driven init (SVD, LU), a merge, an export.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Device, Layout, Storage, StorageRef, Tensor};

use super::lowp::{Path, WeightMatrix, WeightValues};
use crate::error::{PeftError, Result};

/// The type a model's frozen linear weights are kept in (`--base-dtype`). Norms, embeddings,
/// biases and convolutions stay f32; adapters are always f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BaseDType {
    /// f32 (the default): no rounding.
    #[default]
    F32,
    /// IEEE half: weights rounded to nearest.
    F16,
    /// bfloat16: weights rounded to nearest even, as `torch_dtype=torch.bfloat16` loads them.
    Bf16,
    /// ggml's Q8_0 (blocks of 32 8-bit values and an f16 scale), quantised at load from any
    /// source, the reference (round-to-nearest) quantiser.
    Q8_0,
    /// ggml's Q4_K (super-blocks of 256 4-bit values), quantised at load: the QLoRA-style path
    /// for Hugging Face folders. A weight whose rows are not a multiple of 256 gets Q5_0
    /// instead, as llama.cpp's quantiser does (reported by `PeftModel::base_storage`).
    Q4K,
    /// Keep a GGUF file's own per-tensor types (Q4_0, Q4_1, Q5_0, Q8_0, the k-quants, …); a
    /// model from another source is refused.
    Gguf,
}

impl BaseDType {
    /// Every choice, in the command line's spelling.
    pub const NAMES: &'static str = "f32|f16|bf16|q8_0|q4_k|gguf";

    /// The command-line spelling (`bf16`, `q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Gguf => "gguf",
        }
    }

    /// Stores the loaded weight `w` (`[out, in]`, any float dtype) of tensor `name` in this
    /// type. Under [`Gguf`](Self::Gguf) a GGUF's own blocks reach the layer directly (see
    /// `PeftBuilder`), so a weight stored here did not come from a GGUF file: an error.
    pub fn store(self, name: &str, w: &Tensor) -> Result<FrozenWeight> {
        let dense = |dtype: DType| -> Result<FrozenWeight> {
            Ok(FrozenWeight::Dense(w.to_dtype(dtype)?.contiguous()?))
        };
        match self {
            Self::F32 => dense(DType::F32),
            Self::Gguf => Err(PeftError::layer(
                name,
                "--base-dtype gguf keeps a GGUF file's own tensor types, and this weight does not \
                 come from a GGUF file (choose f32, f16, bf16, q8_0 or q4_k)",
            )),
            Self::F16 => dense(DType::F16),
            Self::Bf16 => dense(DType::BF16),
            Self::Q8_0 => quantize(name, w, GgmlDType::Q8_0, None),
            Self::Q4K => quantize(name, w, GgmlDType::Q4K, Some(GgmlDType::Q5_0)),
        }
    }
}

impl BaseDType {
    /// How this CPU's frozen products read weights of this type: `f32 gemm`, `native
    /// AVX512-BF16 dot products`, or the type widened (or dequantised) to f32 tile by tile, with
    /// the instruction set the conversion uses.
    pub fn cpu_kernel(self) -> String {
        let path = Path::best();
        match self {
            Self::F32 => "f32 gemm".to_string(),
            Self::Bf16 if path == Path::Avx512Bf16 => {
                "native AVX512-BF16 dot products (activations rounded to bf16 per tile)".to_string()
            }
            Self::Bf16 | Self::F16 => format!("widened to f32 tile by tile ({})", path.name()),
            Self::Q8_0 | Self::Q4K | Self::Gguf => {
                format!(
                    "ggml blocks dequantised to f32 tile by tile ({})",
                    path.name()
                )
            }
        }
    }

    /// A note for the user when this type runs on a fallback that forgoes its speed-up on this
    /// CPU (bf16 without AVX512-BF16): the results are the same up to rounding, the speed is
    /// f32's. `None` when the type runs as intended.
    pub fn cpu_fallback_note(self) -> Option<String> {
        (self == Self::Bf16 && Path::best() != Path::Avx512Bf16).then(|| {
            format!(
                "this CPU lacks AVX512-BF16: bf16 base weights are {} (f32 speed, bf16 memory)",
                self.cpu_kernel()
            )
        })
    }
}

impl std::fmt::Display for BaseDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BaseDType {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Self::F32,
            "f16" | "float16" => Self::F16,
            "bf16" | "bfloat16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_k" | "q4k" => Self::Q4K,
            "gguf" => Self::Gguf,
            other => {
                return Err(PeftError::config(
                    "base dtype",
                    format!("`{other}` is not one of {}", Self::NAMES),
                ));
            }
        })
    }
}

/// Quantises `w` (`[out, in]`) to `dtype`, or to `fallback` when its rows do not split into
/// `dtype`'s blocks; an error names the tensor when neither fits.
fn quantize(
    name: &str,
    w: &Tensor,
    dtype: GgmlDType,
    fallback: Option<GgmlDType>,
) -> Result<FrozenWeight> {
    let (_, cols) = w.dims2()?;
    let chosen = [Some(dtype), fallback]
        .into_iter()
        .flatten()
        .find(|t| cols % t.block_size() == 0)
        .ok_or_else(|| {
            PeftError::layer(
                name,
                format!(
                    "rows of {cols} values do not split into {dtype:?} blocks of {}",
                    dtype.block_size()
                ),
            )
        })?;
    let w = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let q = QTensor::quantize(&w, chosen).map_err(|e| PeftError::layer(name, e.to_string()))?;
    Ok(FrozenWeight::Quantized(Arc::new(q)))
}

/// A frozen base weight in its stored type. Cloning is cheap (shared storage).
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// f32, f16 or bf16 values.
    Dense(Tensor),
    /// ggml blocks (a GGUF tensor, or quantised at load), on the CPU.
    Quantized(Arc<QTensor>),
}

impl From<Tensor> for FrozenWeight {
    fn from(t: Tensor) -> Self {
        Self::Dense(t)
    }
}

impl FrozenWeight {
    /// The weight's shape.
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Dense(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
        }
    }

    /// Where the weight lives.
    pub fn device(&self) -> Device {
        match self {
            Self::Dense(t) => t.device().clone(),
            Self::Quantized(q) => q.device(),
        }
    }

    /// The stored type's name: `f32`, `bf16`, `q4_1`, `q4_k`.
    pub fn type_name(&self) -> String {
        match self {
            Self::Dense(t) => t.dtype().as_str().to_string(),
            Self::Quantized(q) => ggml_name(q.dtype()),
        }
    }

    /// The dense tensor, when the weight is not quantized.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(t) => Some(t),
            Self::Quantized(_) => None,
        }
    }

    /// Whether the weight is dense f32.
    pub fn is_f32(&self) -> bool {
        self.dense().is_some_and(|t| t.dtype() == DType::F32)
    }

    /// The whole weight as an f32 tensor: a dense weight converted, a quantized one
    /// dequantised with ggml's formula (exact in f32). This widens the whole matrix; the frozen
    /// ops never call it.
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(t) => t.to_dtype(DType::F32)?,
            Self::Quantized(q) => q.dequantize(&Device::Cpu)?,
        })
    }

    /// Bytes the stored values take.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// Whether the CPU kernels of `kernels::lowp` read this weight: a 2-D CPU weight, dense in
    /// f32, f16 or bf16, or quantized.
    pub(crate) fn is_cpu_matrix(&self) -> bool {
        self.dims().len() == 2
            && self.device().is_cpu()
            && match self {
                Self::Dense(t) => matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16),
                Self::Quantized(_) => true,
            }
    }

    /// Holds the stored values for reading as a [`WeightMatrix`].
    pub(crate) fn values(&self) -> candle_core::Result<WeightGuard<'_>> {
        Ok(match self {
            Self::Dense(t) => {
                let (storage, layout) = t.storage_and_layout();
                WeightGuard::Dense(storage, layout)
            }
            Self::Quantized(q) => WeightGuard::Quantized(q.data()?, q.dtype()),
        })
    }
}

/// The ggml type's name as GGUF tools print it (`q4_k`, `q8_0`, `f16`).
pub fn ggml_name(dtype: GgmlDType) -> String {
    let name = format!("{dtype:?}").to_ascii_lowercase();
    match name.strip_suffix('k') {
        Some(stem) if stem.starts_with('q') => format!("{stem}_k"),
        _ => name,
    }
}

/// A frozen weight's values, held for reading (a dense tensor's storage stays read-locked).
pub(crate) enum WeightGuard<'a> {
    Dense(StorageRef<'a>, &'a Layout),
    Quantized(Cow<'a, [u8]>, GgmlDType),
}

impl WeightGuard<'_> {
    /// The values as a `[rows, cols]` matrix; `op` and `name` name the caller and the weight in
    /// errors.
    pub(crate) fn matrix(
        &self,
        op: &str,
        name: &str,
        (rows, cols): (usize, usize),
    ) -> candle_core::Result<WeightMatrix<'_>> {
        let values = match self {
            WeightGuard::Quantized(bytes, dtype) => WeightValues::Quantized {
                dtype: *dtype,
                bytes,
            },
            WeightGuard::Dense(storage, layout) => {
                let Storage::Cpu(cpu) = &**storage else {
                    candle_core::bail!("{op}: {name} is not on the CPU");
                };
                let Some((start, end)) = layout.contiguous_offsets() else {
                    candle_core::bail!("{op}: {name} must be contiguous");
                };
                match cpu {
                    CpuStorage::F32(v) => WeightValues::F32(&v[start..end]),
                    CpuStorage::BF16(v) => WeightValues::Bf16(&v[start..end]),
                    CpuStorage::F16(v) => WeightValues::F16(&v[start..end]),
                    other => candle_core::bail!(
                        "{op}: {name} is {:?}; the frozen ops read f32, f16, bf16 or ggml blocks",
                        other.dtype()
                    ),
                }
            }
        };
        WeightMatrix::new(op, name, values, rows, cols)
    }
}
