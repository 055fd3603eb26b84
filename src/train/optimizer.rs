//! The optimiser a run steps: AdamW or LoRA-Pro, with their saved state.

use std::fs;
use std::path::Path;

use candle_core::Var;

use super::config::{OptimizerKind, TrainConfig};
use super::task::TrainTask;
use crate::error::{PeftError, Result};
use crate::optim::lora_pro::{self, LoraPro};
use crate::optim::{AdamW, StepStats};

/// The optimiser of a run.
#[derive(Debug)]
pub(super) enum Optimizer {
    AdamW(AdamW),
    LoraPro(LoraPro),
}

impl Optimizer {
    pub(super) fn new<T: TrainTask>(
        task: &T,
        vars: &[(String, Var)],
        cfg: &TrainConfig,
    ) -> Result<Self> {
        let no_decay = task.no_weight_decay_vars();
        Ok(match cfg.optimizer {
            OptimizerKind::AdamW => {
                Optimizer::AdamW(AdamW::with_no_decay(vars.to_vec(), cfg.adamw(), &no_decay)?)
            }
            OptimizerKind::LoraPro(mode) => Optimizer::LoraPro(LoraPro::with_no_decay(
                vars.to_vec(),
                task.lora_pairs()?,
                cfg.lora_pro(mode),
                &no_decay,
            )?),
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Optimizer::AdamW(_) => "AdamW",
            Optimizer::LoraPro(_) => lora_pro::OPTIMIZER_NAME,
        }
    }

    pub(super) fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
    ) -> Result<StepStats> {
        match self {
            Optimizer::AdamW(o) => o.step(grads, lr),
            Optimizer::LoraPro(o) => o.step(grads, lr),
        }
    }

    pub(super) fn save_state(&self, path: &Path) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.save_state(path),
            Optimizer::LoraPro(o) => o.save_state(path),
        }
    }

    /// Restores the state, after checking that the file comes from the same optimiser.
    pub(super) fn load_state(&mut self, path: &Path) -> Result<()> {
        let bytes = fs::read(path).map_err(|e| PeftError::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            PeftError::Safetensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let saved = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("optimizer").cloned());
        if let Some(saved) = saved.filter(|s| s != self.name()) {
            return Err(PeftError::config(
                "optimizer",
                format!(
                    "{} holds {saved} state, but this run uses {}",
                    path.display(),
                    self.name()
                ),
            ));
        }
        match self {
            Optimizer::AdamW(o) => o.load_state(path),
            Optimizer::LoraPro(o) => o.load_state(path),
        }
    }
}
