//! Training settings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{PeftError, Result};
use crate::optim::lora_pro::{LoraProConfig, LoraProMode};
use crate::optim::{AdamWConfig, LrSchedule, Schedule, Warmup};

/// The optimiser a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    /// AdamW on every trainable var.
    #[default]
    AdamW,
    /// LoRA-Pro in the given mode (see [`crate::optim::lora_pro`]).
    LoraPro(LoraProMode),
}

/// Training settings. `Default` follows HF `TrainingArguments` where it has a counterpart
/// (linear schedule, max_grad_norm 1, seed 42, β = (0.9, 0.999), ε = 1e-8).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimiser steps in the whole run (a resumed run continues up to this).
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    /// Decoupled weight decay, for every trainable except the task's
    /// [`TrainTask::no_weight_decay_vars`](super::TrainTask::no_weight_decay_vars).
    pub weight_decay: f64,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Adam's second-moment decay.
    pub beta2: f64,
    /// Adam's denominator term.
    pub eps: f64,
    /// The learning-rate schedule after warmup.
    pub schedule: Schedule,
    /// Linear warmup from 0 to `lr`: a step count or a fraction of `steps`.
    pub warmup: Warmup,
    /// Clip the global gradient norm to this; `None` turns clipping off.
    pub max_grad_norm: Option<f64>,
    /// AdamW (default) or LoRA-Pro; β, ε and weight decay above apply to both.
    pub optimizer: OptimizerKind,
    /// Seeds the data order.
    pub seed: u64,
    /// Evaluate every N steps (and after the last step), when eval examples are given.
    pub eval_every: Option<usize>,
    /// Checkpoint every N steps; with `out_dir` set, the last step is always checkpointed.
    pub checkpoint_every: Option<usize>,
    /// A plain log line every N steps when stderr is not a terminal. Progress goes to stderr,
    /// which keeps stdout for results such as `--json`.
    pub log_every: usize,
    /// Where checkpoints go (`out_dir/checkpoint-<step>/`); `None`: no checkpoints.
    pub out_dir: Option<PathBuf>,
    /// A checkpoint folder, or an output folder (its highest `checkpoint-<step>` is used).
    pub resume_from: Option<PathBuf>,
    /// No progress output at all.
    pub quiet: bool,
    /// What identifies the run beyond the fields above (the CLI records the task, model, method,
    /// a hash of the adapter config, the data file and its size): written into every
    /// checkpoint's `trainer_state.json`, and a resume from a checkpoint whose identity differs
    /// is refused naming the key. Empty: nothing beyond seed, batching and example count is
    /// checked.
    pub run_identity: BTreeMap<String, String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-4,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: Schedule::Linear,
            warmup: Warmup::Steps(0),
            max_grad_norm: Some(1.0),
            optimizer: OptimizerKind::AdamW,
            seed: 42,
            eval_every: None,
            checkpoint_every: None,
            log_every: 10,
            out_dir: None,
            resume_from: None,
            quiet: false,
            run_identity: BTreeMap::new(),
        }
    }
}

impl TrainConfig {
    /// AdamW's settings: Adam's hyper-parameters and the weight decay of this config.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// LoRA-Pro's settings: the mode and Adam's hyper-parameters of this config.
    pub fn lora_pro(&self, mode: LoraProMode) -> LoraProConfig {
        LoraProConfig {
            mode,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            ..LoraProConfig::default()
        }
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<()> {
        for (field, n) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("log_every", self.log_every),
        ] {
            if n == 0 {
                return Err(PeftError::config(field, "must be ≥ 1"));
            }
        }
        for (field, n) in [
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if n == Some(0) {
                return Err(PeftError::config(field, "must be ≥ 1"));
            }
        }
        if let Some(m) = self.max_grad_norm
            && !(m.is_finite() && m > 0.0)
        {
            return Err(PeftError::config(
                "max_grad_norm",
                format!("must be finite and > 0, got {m}"),
            ));
        }
        if self.checkpoint_every.is_some() && self.out_dir.is_none() {
            return Err(PeftError::config(
                "checkpoint_every",
                "checkpoints need an output folder (out_dir)",
            ));
        }
        self.adamw().validate()?;
        LrSchedule::new(self.schedule, self.lr, self.warmup, self.steps)?;
        Ok(())
    }
}
