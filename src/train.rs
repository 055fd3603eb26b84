//! The training loop: seeded batches, gradient accumulation, clipping, AdamW (or LoRA-Pro) with
//! a scheduled learning rate, periodic evaluation, atomic checkpoints and exact resume.
//!
//! One optimiser step `s` (1-based `global_step`) does:
//!
//! ```text
//! lr   = schedule(s − 1)                              (see optim::schedule)
//! for each of grad_accum micro-batches of batch_size examples:
//!     (ℓ_j, tokens_j) = task.loss(batch_j)
//!     L_j  = ℓ_j + task.regularization_loss()                   (a weighted regulariser, if any)
//!     G_j  = ∇L_j                                                (L_j must be finite)
//! G    = (1/grad_accum) Σ_j G_j                                   (optim::accumulate)
//! ‖G‖  = global L2 norm; clipped to max_grad_norm when set        (optim::clip)
//! θ    ← AdamW(θ, G, lr)      (no decay on task.no_weight_decay_vars())    (optim::adamw)
//! loss(s) = (1/grad_accum) Σ_j L_j
//! ```
//!
//! With [`OptimizerKind::LoraPro`] the last update is LoRA-Pro's (optim::lora_pro) on every LoRA
//! pair the task reports ([`TrainTask::lora_pairs`]), on the same accumulated and clipped `G`,
//! once per step; other trainable vars still get AdamW.
//!
//! Data order: examples are drawn from a permutation of `0..n` that a ChaCha8 RNG seeded with
//! `seed` shuffles at the start of every epoch (the identity permutation, shuffled). Batches run
//! across epoch boundaries, so every micro-batch has exactly `batch_size` examples. The
//! checkpoint stores the epoch, the position in it and the RNG's word position before that
//! epoch's shuffle, which rebuilds the permutation and the RNG exactly on resume.
//!
//! Checkpoint layout, written into `out/.checkpoint-<step>.tmp/` and renamed into place:
//!
//! ```text
//! out/checkpoint-<step>/adapter/                the task's adapter (PEFT format)
//! out/checkpoint-<step>/trainable.safetensors   every trainable var, by name (exact resume)
//! out/checkpoint-<step>/optimizer.safetensors   AdamW or LoRA-Pro state (optim::adamw, lora_pro)
//! out/checkpoint-<step>/trainer_state.json      step, data position, RNG state, loss history
//! ```
//!
//! Resume restores the trainable vars, the optimiser state, the data order and the histories;
//! it reproduces the uninterrupted run exactly when the task's loss depends only on the vars and
//! the batch. Randomness inside the task (dropout masks drawn from an adapter's own RNG) is not
//! part of the checkpoint.
//!
//! A NaN or infinite loss stops the run with [`PeftError::NonFiniteLoss`] naming the step,
//! before any update: the last checkpoint written is the last good one.

use std::collections::BTreeMap;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};
use crate::io::peft_format::{read_safetensors, write_atomic, write_safetensors};
use crate::optim::lora_pro::{self, LoraPair, LoraPro, LoraProConfig, LoraProMode};
use crate::optim::{
    AdamW, AdamWConfig, GradAccumulator, LrSchedule, Schedule, StepStats, Warmup, clip_grad_norm,
    grad_norm,
};

/// Name of the adapter folder inside a checkpoint.
pub const ADAPTER_DIR: &str = "adapter";
/// Name of the trainable-var file inside a checkpoint.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
/// Name of the optimiser-state file inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Name of the trainer-state file inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// Prefix of checkpoint folder names (`checkpoint-<step>`).
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// What the trainer needs from a model + task.
pub trait TrainTask {
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

    /// Switches train-only behaviour such as dropout.
    fn set_training(&self, _training: bool) {}

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

/// The optimiser a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    #[default]
    AdamW,
    /// LoRA-Pro in the given mode (see [`crate::optim::lora_pro`]).
    LoraPro(LoraProMode),
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalReport {
    pub loss: f64,
    /// Task metrics by name, e.g. `accuracy` or `perplexity`.
    pub metrics: BTreeMap<String, f64>,
}

/// An evaluation and the global step after which it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: usize,
    pub report: EvalReport,
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
    pub lr: f64,
    /// Decoupled weight decay, for every trainable except the task's
    /// [`TrainTask::no_weight_decay_vars`].
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub schedule: Schedule,
    pub warmup: Warmup,
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
    pub out_dir: Option<PathBuf>,
    /// A checkpoint folder, or an output folder (its highest `checkpoint-<step>` is used).
    pub resume_from: Option<PathBuf>,
    /// No progress output at all.
    pub quiet: bool,
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
        }
    }
}

impl TrainConfig {
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
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return Err(PeftError::config(
                    "max_grad_norm",
                    format!("must be finite and > 0, got {m}"),
                ));
            }
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

/// What a run did. Histories cover every step from step 1, including steps done before a
/// resume (read back from the checkpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Mean loss of each step (the task's loss plus its regularisation term, see
    /// [`TrainTask::regularization_loss`]); `losses[i]` is step `i + 1`.
    pub losses: Vec<f64>,
    /// Learning rate of each step.
    pub lrs: Vec<f64>,
    /// Global gradient norm of each step, before clipping.
    pub grad_norms: Vec<f64>,
    /// Evaluations, including those before a resume.
    pub evals: Vec<EvalRecord>,
    /// Steps already done when this run began (0 unless resumed).
    pub start_step: usize,
    /// Steps done at the end.
    pub global_step: usize,
    /// Checkpoint folders this run wrote.
    pub checkpoints: Vec<PathBuf>,
    /// Trainable vars that got no gradient at this run's first step (left unchanged).
    pub vars_without_grad: Vec<String>,
    /// Tokens this run trained on.
    pub tokens: usize,
    /// Wall time of this run's steps (evaluation and checkpoints included).
    pub seconds: f64,
}

/// The contents of `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub max_steps: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub num_examples: usize,
    /// Data epoch in progress (0-based).
    pub epoch: usize,
    /// Examples of that epoch already used.
    pub position: usize,
    /// ChaCha8 word position before that epoch's shuffle (decimal; it is a u128).
    pub epoch_word_pos: String,
    pub losses: Vec<f64>,
    pub lrs: Vec<f64>,
    pub grad_norms: Vec<f64>,
    pub evals: Vec<EvalRecord>,
}

impl TrainerState {
    pub fn read(path: &Path) -> Result<Self> {
        crate::io::read_json(path)
    }
}

/// The highest-numbered `checkpoint-<step>` folder in `out_dir` (temporaries are ignored).
pub fn latest_checkpoint(out_dir: &Path) -> Result<Option<PathBuf>> {
    let entries = fs::read_dir(out_dir).map_err(|e| PeftError::io(out_dir, e))?;
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries {
        let entry = entry.map_err(|e| PeftError::io(out_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix(CHECKPOINT_PREFIX)
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// The seeded, epoch-wise shuffled stream of example indices.
#[derive(Debug, Clone)]
struct Sampler {
    rng: ChaCha8Rng,
    order: Vec<usize>,
    epoch: usize,
    position: usize,
    epoch_word_pos: u128,
}

impl Sampler {
    fn new(n: usize, seed: u64) -> Self {
        let mut s = Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            order: Vec::new(),
            epoch: 0,
            position: 0,
            epoch_word_pos: 0,
        };
        s.shuffle(n);
        s
    }

    fn restore(n: usize, seed: u64, epoch: usize, word_pos: u128, position: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_word_pos(word_pos);
        let mut s = Self {
            rng,
            order: Vec::new(),
            epoch,
            position: 0,
            epoch_word_pos: word_pos,
        };
        s.shuffle(n);
        s.position = position;
        s
    }

    fn shuffle(&mut self, n: usize) {
        self.epoch_word_pos = self.rng.get_word_pos();
        self.order = (0..n).collect();
        self.order.shuffle(&mut self.rng);
        self.position = 0;
    }

    fn next_batch(&mut self, size: usize) -> Vec<usize> {
        let n = self.order.len();
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.position >= n {
                self.epoch += 1;
                self.shuffle(n);
            }
            out.push(self.order[self.position]);
            self.position += 1;
        }
        out
    }
}

/// Progress output: an indicatif bar on a terminal, plain lines otherwise, or nothing.
enum Progress {
    Quiet,
    Bar {
        bar: ProgressBar,
        tokens: usize,
        time: Duration,
    },
    Lines {
        every: usize,
        loss_sum: f64,
        steps: usize,
        tokens: usize,
        time: Duration,
    },
}

impl Progress {
    fn new(config: &TrainConfig, start: usize) -> Self {
        if config.quiet {
            return Progress::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(
                Some(config.steps as u64),
                ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                bar.set_style(style);
            }
            bar.set_position(start as u64);
            Progress::Bar {
                bar,
                tokens: 0,
                time: Duration::ZERO,
            }
        } else {
            Progress::Lines {
                every: config.log_every,
                loss_sum: 0.0,
                steps: 0,
                tokens: 0,
                time: Duration::ZERO,
            }
        }
    }

    fn step(&mut self, step: usize, total: usize, loss: f64, lr: f64, tokens: usize, dt: Duration) {
        match self {
            Progress::Quiet => {}
            Progress::Bar {
                bar,
                tokens: tok,
                time,
            } => {
                *tok += tokens;
                *time += dt;
                bar.set_position(step as u64);
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.1e} tok/s {:.0}",
                    per_second(*tok, *time)
                ));
            }
            Progress::Lines {
                every,
                loss_sum,
                steps,
                tokens: tok,
                time,
            } => {
                *loss_sum += loss;
                *steps += 1;
                *tok += tokens;
                *time += dt;
                if step % *every == 0 || step == total {
                    eprintln!(
                        "step {step}/{total} loss {:.4} lr {lr:.1e} tok/s {:.0}",
                        *loss_sum / *steps as f64,
                        per_second(*tok, *time)
                    );
                    *loss_sum = 0.0;
                    *steps = 0;
                    *tok = 0;
                    *time = Duration::ZERO;
                }
            }
        }
    }

    fn message(&self, line: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Bar { bar, .. } => bar.println(line),
            Progress::Lines { .. } => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Progress::Bar { bar, .. } = self {
            bar.finish();
        }
    }
}

fn per_second(tokens: usize, time: Duration) -> f64 {
    let s = time.as_secs_f64();
    if s > 0.0 { tokens as f64 / s } else { 0.0 }
}

fn eval_line(step: usize, total: usize, r: &EvalReport) -> String {
    let mut line = format!("eval step {step}/{total} loss {:.4}", r.loss);
    for (k, v) in &r.metrics {
        line.push_str(&format!(" {k} {v:.4}"));
    }
    line
}

/// Runs training as a [`TrainConfig`] describes.
#[derive(Debug, Clone)]
pub struct Trainer {
    pub config: TrainConfig,
}

impl Trainer {
    pub fn new(config: TrainConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    /// Trains `task` on `train` (evaluating on `eval` when given) up to `config.steps` steps,
    /// resuming from `config.resume_from` when set.
    pub fn run<T: TrainTask>(
        &self,
        task: &T,
        train: &[T::Example],
        eval: Option<&[T::Example]>,
    ) -> Result<TrainReport> {
        let cfg = &self.config;
        cfg.validate()?;
        let vars = task.trainable_vars();
        if vars.is_empty() {
            return Err(PeftError::config("trainable vars", "the task has none"));
        }
        let schedule = LrSchedule::new(cfg.schedule, cfg.lr, cfg.warmup, cfg.steps)?;
        let mut opt = Optimizer::new(task, &vars, cfg)?;

        let mut history = History::default();
        let mut sampler = Sampler::new(train.len(), cfg.seed);
        let mut start_step = 0;
        if let Some(from) = &cfg.resume_from {
            let dir = resolve_checkpoint(from)?;
            let state = TrainerState::read(&dir.join(STATE_FILE))?;
            check_resume(&state, cfg, train.len(), &dir)?;
            restore_vars(&vars, &dir.join(TRAINABLE_FILE))?;
            opt.load_state(&dir.join(OPTIMIZER_FILE))?;
            let word_pos = state.epoch_word_pos.parse::<u128>().map_err(|_| {
                PeftError::config(
                    "epoch_word_pos",
                    format!(
                        "`{}` in {} is not a u128",
                        state.epoch_word_pos,
                        dir.display()
                    ),
                )
            })?;
            sampler =
                Sampler::restore(train.len(), cfg.seed, state.epoch, word_pos, state.position);
            start_step = state.global_step;
            history = History {
                losses: state.losses,
                lrs: state.lrs,
                grad_norms: state.grad_norms,
                evals: state.evals,
            };
        }
        if start_step < cfg.steps && train.is_empty() {
            return Err(PeftError::config("train examples", "none were given"));
        }

        let mut report = TrainReport {
            losses: Vec::new(),
            lrs: Vec::new(),
            grad_norms: Vec::new(),
            evals: Vec::new(),
            start_step,
            global_step: start_step,
            checkpoints: Vec::new(),
            vars_without_grad: Vec::new(),
            tokens: 0,
            seconds: 0.0,
        };
        let run_start = Instant::now();
        let mut progress = Progress::new(cfg, start_step);
        task.set_training(true);
        for step in start_step..cfg.steps {
            let global = step + 1;
            let t0 = Instant::now();
            let lr = schedule.lr(step);
            let mut acc = GradAccumulator::new(&vars);
            let mut loss_sum = 0.0;
            let mut tokens = 0;
            for _ in 0..cfg.grad_accum {
                let idx = sampler.next_batch(cfg.batch_size);
                let batch: Vec<&T::Example> = idx.iter().map(|&i| &train[i]).collect();
                let (loss, n_tokens) = task.loss(&batch)?;
                let loss = match task.regularization_loss()? {
                    Some(reg) => add_scalar_term(&loss, &reg)?,
                    None => loss,
                };
                let value = scalar(&loss)?;
                if !value.is_finite() {
                    progress.finish();
                    return Err(PeftError::NonFiniteLoss {
                        step: global,
                        loss: value,
                    });
                }
                let grads = loss.backward()?;
                acc.add(&grads)?;
                loss_sum += value;
                tokens += n_tokens;
            }
            let mut grads = acc.finish()?;
            let norm = match cfg.max_grad_norm {
                Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
                None => grad_norm(&grads, &vars)?,
            };
            if !norm.is_finite() {
                progress.finish();
                return Err(PeftError::Unsupported(format!(
                    "gradient norm is {norm} at step {global}; training stopped and the last \
                     good checkpoint is kept"
                )));
            }
            if step == start_step {
                report.vars_without_grad = vars
                    .iter()
                    .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
                    .map(|(n, _)| n.clone())
                    .collect();
            }
            let stats = opt.step(&grads, lr)?;
            if stats.updated == 0 {
                progress.finish();
                return Err(PeftError::config(
                    "trainable vars",
                    format!("none of the {} got a gradient at step {global}", vars.len()),
                ));
            }
            let loss = loss_sum / cfg.grad_accum as f64;
            history.losses.push(loss);
            history.lrs.push(lr);
            history.grad_norms.push(norm);
            report.tokens += tokens;
            progress.step(global, cfg.steps, loss, lr, tokens, t0.elapsed());

            let last = global == cfg.steps;
            if let (Some(every), Some(examples)) = (cfg.eval_every, eval) {
                if global % every == 0 || last {
                    task.set_training(false);
                    let r = task.evaluate(examples);
                    task.set_training(true);
                    let r = r?;
                    progress.message(&eval_line(global, cfg.steps, &r));
                    let record = EvalRecord {
                        step: global,
                        report: r,
                    };
                    history.evals.push(record);
                }
            }
            if let Some(out) = &cfg.out_dir {
                let due = cfg
                    .checkpoint_every
                    .is_some_and(|every| global % every == 0);
                if due || last {
                    let state = TrainerState {
                        global_step: global,
                        max_steps: cfg.steps,
                        seed: cfg.seed,
                        batch_size: cfg.batch_size,
                        grad_accum: cfg.grad_accum,
                        num_examples: train.len(),
                        epoch: sampler.epoch,
                        position: sampler.position,
                        epoch_word_pos: sampler.epoch_word_pos.to_string(),
                        losses: history.losses.clone(),
                        lrs: history.lrs.clone(),
                        grad_norms: history.grad_norms.clone(),
                        evals: history.evals.clone(),
                    };
                    let dir = save_checkpoint(out, task, &vars, &opt, &state)?;
                    progress.message(&format!("saved {}", dir.display()));
                    report.checkpoints.push(dir);
                }
            }
            report.global_step = global;
        }
        progress.finish();
        task.set_training(false);
        report.seconds = run_start.elapsed().as_secs_f64();
        report.losses = history.losses;
        report.lrs = history.lrs;
        report.grad_norms = history.grad_norms;
        report.evals = history.evals;
        Ok(report)
    }
}

#[derive(Debug, Default)]
struct History {
    losses: Vec<f64>,
    lrs: Vec<f64>,
    grad_norms: Vec<f64>,
    evals: Vec<EvalRecord>,
}

/// The value of a one-element loss tensor.
fn scalar(loss: &Tensor) -> Result<f64> {
    if loss.elem_count() != 1 {
        return Err(PeftError::ShapeMismatch {
            key: "loss".into(),
            expected: vec![],
            got: loss.dims().to_vec(),
        });
    }
    Ok(loss
        .detach()
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?[0])
}

/// `loss + term` for two one-element tensors, in the loss's shape and dtype.
fn add_scalar_term(loss: &Tensor, term: &Tensor) -> Result<Tensor> {
    if term.elem_count() != 1 {
        return Err(PeftError::ShapeMismatch {
            key: "regularization loss".into(),
            expected: vec![],
            got: term.dims().to_vec(),
        });
    }
    let term = term.to_dtype(loss.dtype())?.reshape(loss.shape())?;
    Ok(loss.add(&term)?)
}

/// A checkpoint folder, or the latest checkpoint of an output folder.
fn resolve_checkpoint(from: &Path) -> Result<PathBuf> {
    if from.join(STATE_FILE).is_file() {
        return Ok(from.to_path_buf());
    }
    if from.is_dir() {
        if let Some(dir) = latest_checkpoint(from)? {
            return Ok(dir);
        }
    }
    Err(PeftError::io(
        from.join(STATE_FILE),
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "not a checkpoint folder, nor a folder holding checkpoint-<step> folders",
        ),
    ))
}

/// A resume must see the data and batching the checkpoint was written with.
fn check_resume(state: &TrainerState, cfg: &TrainConfig, n: usize, dir: &Path) -> Result<()> {
    let checks: [(&str, u64, u64); 4] = [
        ("seed", state.seed, cfg.seed),
        ("batch_size", state.batch_size as u64, cfg.batch_size as u64),
        ("grad_accum", state.grad_accum as u64, cfg.grad_accum as u64),
        ("train examples", state.num_examples as u64, n as u64),
    ];
    for (field, saved, now) in checks {
        if saved != now {
            return Err(PeftError::config(
                field,
                format!(
                    "the checkpoint {} was written with {saved}, this run has {now}",
                    dir.display()
                ),
            ));
        }
    }
    if state.losses.len() != state.global_step
        || state.lrs.len() != state.global_step
        || state.grad_norms.len() != state.global_step
    {
        return Err(PeftError::config(
            "global_step",
            format!(
                "{} has {} steps but {} losses",
                dir.join(STATE_FILE).display(),
                state.global_step,
                state.losses.len()
            ),
        ));
    }
    Ok(())
}

/// Sets every var from `path` (keys are the var names). All are checked before any is set.
fn restore_vars(vars: &[(String, Var)], path: &Path) -> Result<()> {
    let mut tensors = read_safetensors(path, &Device::Cpu)?;
    let location = path.display().to_string();
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let t = tensors
            .remove(name)
            .ok_or_else(|| PeftError::MissingTensor {
                key: name.clone(),
                location: location.clone(),
            })?;
        if t.dims() != var.dims() {
            return Err(PeftError::ShapeMismatch {
                key: name.clone(),
                expected: var.dims().to_vec(),
                got: t.dims().to_vec(),
            });
        }
        values.push(t.to_dtype(var.dtype())?.to_device(var.device())?);
    }
    if let Some(key) = tensors.keys().min() {
        return Err(PeftError::UnexpectedTensor {
            key: key.clone(),
            location,
        });
    }
    for ((_, var), t) in vars.iter().zip(values) {
        var.set(&t)?;
    }
    Ok(())
}

/// Writes `out/checkpoint-<step>` through a temporary folder and a rename; a failure leaves
/// earlier checkpoints (and an existing folder of the same step) untouched.
fn save_checkpoint<T: TrainTask>(
    out: &Path,
    task: &T,
    vars: &[(String, Var)],
    opt: &Optimizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    let step = state.global_step;
    fs::create_dir_all(out).map_err(|e| PeftError::io(out, e))?;
    let target = out.join(format!("{CHECKPOINT_PREFIX}{step}"));
    let tmp = out.join(format!(".{CHECKPOINT_PREFIX}{step}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    let written = (|| -> Result<()> {
        task.save_adapter(&tmp.join(ADAPTER_DIR))?;
        let values: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
            .collect();
        write_safetensors(&tmp.join(TRAINABLE_FILE), &values)?;
        opt.save_state(&tmp.join(OPTIMIZER_FILE))?;
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| PeftError::config("trainer_state", e.to_string()))?;
        write_atomic(&tmp.join(STATE_FILE), json.as_bytes())?;
        if target.exists() {
            let old = out.join(format!(".{CHECKPOINT_PREFIX}{step}.old"));
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| PeftError::io(&old, e))?;
            }
            fs::rename(&target, &old).map_err(|e| PeftError::io(&target, e))?;
            if let Err(e) = fs::rename(&tmp, &target) {
                let _ = fs::rename(&old, &target);
                return Err(PeftError::io(&target, e));
            }
            fs::remove_dir_all(&old).map_err(|e| PeftError::io(&old, e))?;
        } else {
            fs::rename(&tmp, &target).map_err(|e| PeftError::io(&target, e))?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        if tmp.exists() {
            let _ = fs::remove_dir_all(&tmp);
        }
        return Err(e);
    }
    Ok(target)
}

/// The optimiser of a run.
#[derive(Debug)]
enum Optimizer {
    AdamW(AdamW),
    LoraPro(LoraPro),
}

impl Optimizer {
    fn new<T: TrainTask>(task: &T, vars: &[(String, Var)], cfg: &TrainConfig) -> Result<Self> {
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

    fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<StepStats> {
        match self {
            Optimizer::AdamW(o) => o.step(grads, lr),
            Optimizer::LoraPro(o) => o.step(grads, lr),
        }
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.save_state(path),
            Optimizer::LoraPro(o) => o.save_state(path),
        }
    }

    /// Restores the state, after checking that the file comes from the same optimiser.
    fn load_state(&mut self, path: &Path) -> Result<()> {
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
