//! What the trainer asks of a model and task, and what an evaluation reports.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};
use crate::io::peft_format::first_non_finite;
use crate::optim::lora_pro::LoraPair;

/// What the trainer needs from a model + task.
pub trait TrainTask {
    /// One training or evaluation example (a labelled text, a token sequence, ...).
    type Example;

    /// The mean loss over `batch` (a scalar on the graph of the trainable vars) and the number
    /// of tokens the batch covers (for throughput).
    fn loss(&self, batch: &[&Self::Example]) -> Result<(Tensor, usize)>;

    /// Evaluates on `examples` (called in eval mode).
    fn evaluate(&self, examples: &[Self::Example]) -> Result<EvalReport>;

    /// The vars to train, named uniquely, in a deterministic order.
    fn trainable_vars(&self) -> Vec<(String, Var)>;

    /// Writes the adapter (e.g. `PeftModel::save_adapter`) into `dir`.
    fn save_adapter(&self, dir: &Path) -> Result<()>;

    /// Fails when the trainable vars cannot get a gradient, with the reason (e.g.
    /// [`crate::PeftModel::check_trainable`]: an active adapter merged or disabled). The trainer
    /// calls it before the first step. Default: no check.
    fn check_trainable(&self) -> Result<()> {
        Ok(())
    }

    /// Switches train-only behaviour such as dropout.
    fn set_training(&self, _training: bool) {}

    /// The positions of the random streams training advances (dropout masks), by name (e.g.
    /// [`crate::train::adapter_rng_states`] of the task's `PeftModel`): checkpoints save them
    /// and a resume restores them with [`restore_rng_states`](Self::restore_rng_states), so that
    /// it draws the masks the uninterrupted run would have drawn. Default: none.
    fn rng_states(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// Restores what [`rng_states`](Self::rng_states) returned. Default: nothing to restore.
    fn restore_rng_states(&self, _states: &BTreeMap<String, String>) -> Result<()> {
        Ok(())
    }

    /// The LoRA adapters LoRA-Pro steps (e.g. [`crate::optim::lora_pairs`] of the task's
    /// `PeftModel`). The default reports none, which LoRA-Pro refuses.
    fn lora_pairs(&self) -> Result<Vec<LoraPair>> {
        Ok(Vec::new())
    }

    /// The names, among those of [`trainable_vars`](Self::trainable_vars), that weight decay
    /// must skip (e.g. [`crate::PeftModel::no_weight_decay_vars`]). Default: none.
    fn no_weight_decay_vars(&self) -> Vec<String> {
        Vec::new()
    }

    /// A one-element term added to every micro-batch's loss before the backward pass, on the
    /// graph of the trainable vars: a weighted regulariser such as SALT's
    /// ([`crate::PeftModel::regularization_loss`]). It is part of the reported training loss,
    /// not of [`evaluate`](Self::evaluate). Default: none.
    fn regularization_loss(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalReport {
    /// Mean loss over the evaluated examples.
    pub loss: f64,
    /// Task metrics by name, e.g. `accuracy` or `perplexity`.
    pub metrics: BTreeMap<String, f64>,
}

/// An evaluation and the global step after which it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The global step (1-based) the evaluation followed.
    pub step: usize,
    /// What the evaluation measured.
    pub report: EvalReport,
}

/// An evaluation's mean loss must be finite: a NaN or infinite loss is an error rather than a
/// `null` in a report. `weights` (name, tensor), e.g. [`crate::PeftModel::layer_weights`], are
/// searched for the first tensor holding a NaN or an infinity, which the error names; adapter
/// files are already checked when they are read.
pub fn check_eval_loss(loss: f64, weights: &[(String, Tensor)]) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    for (name, t) in weights {
        if let Some((index, value)) = first_non_finite(t)? {
            return Err(PeftError::InvalidLayer {
                module: name.clone(),
                reason: format!(
                    "the evaluation loss is {loss}: this weight holds {value} at flat index \
                     {index}"
                ),
            });
        }
    }
    Err(PeftError::Unsupported(format!(
        "the evaluation loss is {loss} although the {} layer weights searched are finite (the \
         model's other weights or its activations overflowed)",
        weights.len()
    )))
}
