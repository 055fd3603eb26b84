//! Model code built on [`crate::PeftBuilder`]: HF weight names and `config.json` structs, only
//! differentiable ops, every linear layer adaptable.
//!
//! Every model's `from_pretrained` returns the same shape, a [`Pretrained`]: the model wrapped in
//! a [`PeftModel`] with no adapters yet, the config it was built from, and the resolved
//! [`ModelSource`] (which a merged export reads again).

pub mod bert;
pub mod heads;
pub mod llama;

pub use bert::{BertConfig, BertModel, HiddenAct, mean_pool};

use candle_core::{DType, Device};

use crate::io::source::ModelSource;
use crate::model::PeftModel;
use crate::ops::BaseDType;

/// How a model's `from_pretrained` / `from_source` loads it. A `&Device` converts into the
/// default options on that device, so `from_pretrained(spec, &Device::Cpu)` reads as before.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where the model runs. Default: the CPU.
    pub device: Device,
    /// The type the frozen linear weights are kept in (`--base-dtype`). Default f32.
    pub base_dtype: BaseDType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            base_dtype: BaseDType::F32,
        }
    }
}

impl From<&Device> for LoadOptions {
    fn from(device: &Device) -> Self {
        Self {
            device: device.clone(),
            ..Self::default()
        }
    }
}

impl From<Device> for LoadOptions {
    fn from(device: Device) -> Self {
        Self::from(&device)
    }
}

impl From<BaseDType> for LoadOptions {
    fn from(base_dtype: BaseDType) -> Self {
        Self {
            base_dtype,
            ..Self::default()
        }
    }
}

/// What a model's `from_pretrained` returns: the model with no adapters yet, its config and
/// where it came from. Destructure it: `let Pretrained { model, config, source } = …?;`.
#[derive(Debug)]
pub struct Pretrained<M, C> {
    /// The model, wrapped in a [`PeftModel`] with no adapters.
    pub model: PeftModel<M>,
    /// The config the model was built from (`config.json`, or a GGUF file's metadata).
    pub config: C,
    /// The resolved files (folder, hub snapshot or GGUF file), kept for a merged export.
    pub source: ModelSource,
}

/// The most negative finite value of `dtype` (transformers' `finfo(dtype).min`): what an
/// additive attention mask puts on masked keys.
pub(crate) fn dtype_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895313892515355e38,
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}
