//! Tasks: a model, its tokenizer and a loss, packaged as a [`crate::TrainTask`] so that the
//! [`crate::Trainer`] (and the `candle-peft train` / `eval` commands) can fine-tune and evaluate
//! them.
//!
//! - [`classify::ClassifyTask`]: sequence classification on transformers'
//!   `BertForSequenceClassification` (cross-entropy; accuracy).
//! - [`causal_lm::CausalLmTask`]: next-token prediction on the Llama family, on packed text or
//!   prompt/response pairs (cross-entropy; perplexity).
//!
//! Both load the same way, `from_pretrained(spec, …, TaskOptions)` with `spec` a hub id, a folder
//! or (causal LM) a `.gguf` file; both keep the resolved source, so `export_merged(out)` needs
//! nothing else; and both save the active adapter, from `save_adapter` and from the
//! [`crate::Trainer`]'s checkpoints alike.

use std::path::Path;

use candle_core::Device;

use crate::error::{PeftError, Result};
use crate::io::source::ModelSource;
use crate::model::PeftModel;
use crate::models::LoadOptions;
use crate::ops::BaseDType;

pub mod calibrated;
/// Next-token prediction on Llama-family models.
pub mod causal_lm;
/// Sequence classification on BERT-family encoders.
pub mod classify;

pub use causal_lm::{CausalLmTask, LmEval, LmExample};
pub use classify::{ClassifyEval, ClassifyTask};

/// How a task loads its model. Build it with struct-update syntax, so fields added later (the
/// ones) keep your code compiling: `TaskOptions { seq_len: 64, ..TaskOptions::default() }`.
#[derive(Clone, Debug)]
pub struct TaskOptions {
    /// Maximum tokens per example (classification: special tokens included) or per training
    /// sequence (causal LM). Default 128.
    pub seq_len: usize,
    /// Where the model runs. Default: the CPU.
    pub device: Device,
    /// Examples per forward pass in evaluation; `None` (the default) is the task's own default
    /// ([`classify::DEFAULT_EVAL_BATCH`], [`causal_lm::DEFAULT_EVAL_BATCH`]).
    pub eval_batch: Option<usize>,
    /// Seeds the adapters added later and, for classification, a classifier the checkpoint
    /// lacks and its dropout. Default 42 (the command line's default).
    pub seed: u64,
    /// The type the frozen linear weights are kept in (`--base-dtype`; see [`BaseDType`]).
    /// Default f32.
    pub base_dtype: BaseDType,
}

impl TaskOptions {
    /// The model's load options: this device and base dtype.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device.clone(),
            base_dtype: self.base_dtype,
        }
    }
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            seq_len: 128,
            device: Device::Cpu,
            eval_batch: None,
            seed: 42,
            base_dtype: BaseDType::F32,
        }
    }
}

/// Writes the active adapter of `model` into `dir` (what a task's `save_adapter` and the
/// trainer's checkpoints write). With several active adapters, each goes to `dir/<name>/`
/// (PEFT's layout for more than one adapter). No active adapter is an error naming the
/// adapters there are.
pub(crate) fn save_active<M>(model: &PeftModel<M>, dir: &Path) -> Result<()> {
    match model.active_adapters() {
        [] => Err(PeftError::config(
            "active adapter",
            format!(
                "no adapter is active, nothing to save (adapters: {}); add one with add_adapter \
                 or activate one with set_adapter",
                match model.adapter_names() {
                    names if names.is_empty() => "none".to_string(),
                    names => names.join(", "),
                }
            ),
        )),
        [one] => model.save_adapter(dir, one),
        several => {
            for name in several {
                model.save_adapter(dir.join(name), name)?;
            }
            Ok(())
        }
    }
}

/// The source a task's `export_merged` reads from: `source`, or, for a task built with `new`
/// (which has none), the [`PeftError::Unsupported`] that names the `model` type's own
/// `export_merged`, which takes the source.
pub(crate) fn export_source(
    source: Option<ModelSource>,
    task: &str,
    model: &str,
) -> Result<ModelSource> {
    source.ok_or_else(|| {
        PeftError::Unsupported(format!(
            "this {task} was built with {task}::new and has no model source to export from; \
             load it with from_pretrained or from_source, or call {model}::export_merged with \
             the source"
        ))
    })
}
