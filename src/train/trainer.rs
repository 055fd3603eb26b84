//! The training loop. [`Trainer::run`] is the sequence: resume or start, then per step train,
//! maybe evaluate, maybe checkpoint; then finish.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::checkpoint::{TrainerState, restore_checkpoint, save_checkpoint};
use super::config::TrainConfig;
use super::optimizer::Optimizer;
use super::parallel::{Collective, all_reduce_step, broadcast_from_rank0};
use super::progress::{Progress, eval_line};
use super::report::TrainReport;
use super::sampler::Sampler;
use super::task::{EvalRecord, TrainTask};
use crate::error::{PeftError, Result};
use crate::optim::{GradAccumulator, LrSchedule, clip_grad_norm, grad_norm};

/// Runs training as a [`TrainConfig`] describes.
#[derive(Debug, Clone)]
pub struct Trainer {
    /// The settings every run of this trainer uses.
    pub config: TrainConfig,
}

impl Trainer {
    /// A trainer for `config`, after [`TrainConfig::validate`].
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
        self.config.validate()?;
        Self::steps(Run::resume_or_start(&self.config, task, train, eval, None)?)
    }

    /// Trains as one rank of a data-parallel run (see [`super::parallel`]): every rank calls
    /// this with the same config, task setup and `train`, and its own `ranks` handle. The
    /// trainable vars start as rank 0's on every rank. Rank 0 evaluates, checkpoints and
    /// reports progress; the other ranks do none of that (their report has no evals or
    /// checkpoints). A resume reads the same checkpoint on every rank.
    pub fn run_data_parallel<T: TrainTask>(
        &self,
        task: &T,
        train: &[T::Example],
        eval: Option<&[T::Example]>,
        ranks: &dyn Collective,
    ) -> Result<TrainReport> {
        self.config.validate()?;
        if ranks.rank() >= ranks.world_size() {
            return Err(PeftError::config(
                "rank",
                format!(
                    "{} is not below the world size {}",
                    ranks.rank(),
                    ranks.world_size()
                ),
            ));
        }
        let quiet = TrainConfig {
            quiet: true,
            eval_every: None,
            checkpoint_every: None,
            out_dir: None,
            ..self.config.clone()
        };
        let train_this_rank = || {
            let run = if ranks.rank() == 0 {
                Run::resume_or_start(&self.config, task, train, eval, Some(ranks))?
            } else {
                Run::resume_or_start(&quiet, task, train, None, Some(ranks))?
            };
            broadcast_from_rank0(ranks, &run.vars)?;
            Self::steps(run)
        };
        let result = train_this_rank();
        if result.is_err() {
            // The other ranks would otherwise wait for this one at their next all-reduce.
            ranks.abort();
        }
        result
    }

    fn steps<T: TrainTask>(mut run: Run<'_, T>) -> Result<TrainReport> {
        for step in run.report.start_step..run.cfg.steps {
            let global = run.train_step(step)?;
            run.maybe_eval(global)?;
            run.maybe_checkpoint(global)?;
            run.report.global_step = global;
        }
        Ok(run.finish())
    }
}

/// The per-step histories, from step 1 (read back from the checkpoint on resume).
#[derive(Debug, Default)]
struct History {
    losses: Vec<f64>,
    lrs: Vec<f64>,
    grad_norms: Vec<f64>,
    evals: Vec<EvalRecord>,
}

/// One call of [`Trainer::run`] in progress.
struct Run<'a, T: TrainTask> {
    cfg: &'a TrainConfig,
    task: &'a T,
    train: &'a [T::Example],
    eval: Option<&'a [T::Example]>,
    vars: Vec<(String, Var)>,
    schedule: LrSchedule,
    opt: Optimizer,
    sampler: Sampler,
    /// Examples per micro-batch: `batch_size`, capped at the number of training examples.
    batch_size: usize,
    history: History,
    report: TrainReport,
    progress: Progress,
    started: Instant,
    /// The other ranks of a data-parallel run; `None` trains alone.
    ranks: Option<&'a dyn Collective>,
}

impl<'a, T: TrainTask> Run<'a, T> {
    /// Sets up the optimiser and data order, from `cfg.resume_from`'s checkpoint when set, and
    /// switches the task to training mode.
    fn resume_or_start(
        cfg: &'a TrainConfig,
        task: &'a T,
        train: &'a [T::Example],
        eval: Option<&'a [T::Example]>,
        ranks: Option<&'a dyn Collective>,
    ) -> Result<Self> {
        let vars = task.trainable_vars();
        if vars.is_empty() {
            return Err(PeftError::config("trainable vars", "the task has none"));
        }
        task.check_trainable()?;
        let schedule = LrSchedule::new(cfg.schedule, cfg.lr, cfg.warmup, cfg.steps)?;
        let mut opt = Optimizer::new(task, &vars, cfg)?;

        let mut history = History::default();
        let mut sampler = Sampler::new(train.len(), cfg.seed);
        let mut start_step = 0;
        if let Some(from) = &cfg.resume_from {
            let (state, word_pos) =
                restore_checkpoint(from, cfg, task, train.len(), &vars, &mut opt)?;
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

        let report = TrainReport {
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
        let started = Instant::now();
        let progress = Progress::new(cfg, start_step);
        let batch_size = cfg.batch_size.min(train.len().max(1));
        if batch_size < cfg.batch_size && start_step < cfg.steps {
            progress.message(&format!(
                "batch_size {} is larger than the {} training examples: each micro-batch takes \
                 all {batch_size} of them",
                cfg.batch_size,
                train.len()
            ));
        }
        task.set_training(true);
        Ok(Self {
            cfg,
            task,
            train,
            eval,
            vars,
            schedule,
            opt,
            sampler,
            batch_size,
            history,
            report,
            progress,
            started,
            ranks,
        })
    }

    /// Ends the progress output and hands back `err`: for the failures that stop a run
    /// mid-way.
    fn stop(&self, err: PeftError) -> PeftError {
        self.progress.finish();
        err
    }

    /// Optimiser step `step` (0-based): accumulate, clip, update, record. Returns the 1-based
    /// global step.
    fn train_step(&mut self, step: usize) -> Result<usize> {
        let global = step + 1;
        let t0 = Instant::now();
        let lr = self.schedule.lr(step);
        let (mut grads, loss_sum, tokens) = self.accumulate(global)?;
        let norm = match self.cfg.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, &self.vars, max)?,
            None => grad_norm(&grads, &self.vars)?,
        };
        if !norm.is_finite() {
            return Err(self.stop(PeftError::Unsupported(format!(
                "gradient norm is {norm} at step {global}; training stopped and the last \
                 good checkpoint is kept"
            ))));
        }
        if step == self.report.start_step {
            self.report.vars_without_grad = self
                .vars
                .iter()
                .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
                .map(|(n, _)| n.clone())
                .collect();
        }
        let stats = self.opt.step(&grads, lr)?;
        if stats.updated == 0 {
            return Err(self.stop(PeftError::config(
                "trainable vars",
                format!(
                    "none of the {} got a gradient at step {global}",
                    self.vars.len()
                ),
            )));
        }
        let loss = loss_sum / self.cfg.grad_accum as f64;
        self.history.losses.push(loss);
        self.history.lrs.push(lr);
        self.history.grad_norms.push(norm);
        self.report.tokens += tokens;
        self.progress
            .step(global, self.cfg.steps, loss, lr, tokens, t0.elapsed());
        Ok(global)
    }

    /// The mean gradient over `grad_accum` micro-batches, the sum of their losses and their
    /// token count; in a data-parallel run, over every rank's (see [`super::parallel`]). A
    /// non-finite loss stops the run before any update.
    fn accumulate(&mut self, global: usize) -> Result<(GradStore, f64, usize)> {
        let mut acc = GradAccumulator::new(&self.vars);
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        let (rank, world) = self.ranks.map_or((0, 1), |r| (r.rank(), r.world_size()));
        for _ in 0..self.cfg.grad_accum {
            // Every rank draws every rank's micro-batch, so the stream stays the same on all.
            let mut idx = Vec::new();
            for r in 0..world {
                let drawn = self.sampler.next_batch(self.batch_size);
                if r == rank {
                    idx = drawn;
                }
            }
            let batch: Vec<&T::Example> = idx.iter().map(|&i| &self.train[i]).collect();
            let (loss, n_tokens) = self.task.loss(&batch)?;
            let loss = match self.task.regularization_loss()? {
                Some(reg) => add_scalar_term(&loss, &reg)?,
                None => loss,
            };
            let value = scalar(&loss)?;
            if !value.is_finite() {
                return Err(self.stop(PeftError::NonFiniteLoss {
                    step: global,
                    loss: value,
                }));
            }
            let grads = loss.backward()?;
            acc.add(&grads)?;
            loss_sum += value;
            tokens += n_tokens;
        }
        let grads = acc.finish()?;
        match self.ranks {
            Some(ranks) => all_reduce_step(ranks, &self.vars, grads, loss_sum, tokens),
            None => Ok((grads, loss_sum, tokens)),
        }
    }

    /// Evaluates after `global` when eval examples are given and it is an `eval_every` step or
    /// the last.
    fn maybe_eval(&mut self, global: usize) -> Result<()> {
        let last = global == self.cfg.steps;
        if let (Some(every), Some(examples)) = (self.cfg.eval_every, self.eval)
            && (global.is_multiple_of(every) || last)
        {
            self.task.set_training(false);
            let r = self.task.evaluate(examples);
            self.task.set_training(true);
            let r = r?;
            self.progress
                .message(&eval_line(global, self.cfg.steps, &r));
            let record = EvalRecord {
                step: global,
                report: r,
            };
            self.history.evals.push(record);
        }
        Ok(())
    }

    /// Writes `out_dir/checkpoint-<global>/` when there is an output folder and it is a
    /// `checkpoint_every` step or the last.
    fn maybe_checkpoint(&mut self, global: usize) -> Result<()> {
        let Some(out) = &self.cfg.out_dir else {
            return Ok(());
        };
        let last = global == self.cfg.steps;
        let due = self
            .cfg
            .checkpoint_every
            .is_some_and(|every| global.is_multiple_of(every));
        if due || last {
            let state = self.trainer_state(global);
            let dir = save_checkpoint(out, self.task, &self.vars, &self.opt, &state)?;
            self.progress.message(&format!("saved {}", dir.display()));
            self.report.checkpoints.push(dir);
        }
        Ok(())
    }

    /// The state a checkpoint after `global` records.
    fn trainer_state(&self, global: usize) -> TrainerState {
        let cfg = self.cfg;
        TrainerState {
            global_step: global,
            max_steps: cfg.steps,
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            num_examples: self.train.len(),
            epoch: self.sampler.epoch,
            position: self.sampler.position,
            epoch_word_pos: self.sampler.epoch_word_pos.to_string(),
            losses: self.history.losses.clone(),
            lrs: self.history.lrs.clone(),
            grad_norms: self.history.grad_norms.clone(),
            evals: self.history.evals.clone(),
            run_identity: cfg.run_identity.clone(),
            rng_states: self.task.rng_states(),
        }
    }

    /// Ends the progress output, leaves training mode and hands over the report.
    fn finish(self) -> TrainReport {
        self.progress.finish();
        self.task.set_training(false);
        let mut report = self.report;
        report.seconds = self.started.elapsed().as_secs_f64();
        report.losses = self.history.losses;
        report.lrs = self.history.lrs;
        report.grad_norms = self.history.grad_norms;
        report.evals = self.history.evals;
        report
    }
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
