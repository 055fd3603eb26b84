//! Checkpoints: writing `out/checkpoint-<step>/` atomically, finding the latest one, and
//! restoring a run from it after checking that it fits the run.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optimizer::Optimizer;
use super::task::{EvalRecord, TrainTask};
use crate::error::{PeftError, Result};
use crate::io::atomic::write_dir_atomic;
use crate::io::peft_format::{read_safetensors, write_atomic, write_safetensors};

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

/// The contents of `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub global_step: usize,
    /// The run's total steps ([`TrainConfig::steps`]).
    pub max_steps: usize,
    /// The data-order seed.
    pub seed: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Training examples the run was given.
    pub num_examples: usize,
    /// Data epoch in progress (0-based).
    pub epoch: usize,
    /// Examples of that epoch already used.
    pub position: usize,
    /// ChaCha8 word position before that epoch's shuffle (decimal; it is a u128).
    pub epoch_word_pos: String,
    /// Mean loss of each step so far.
    pub losses: Vec<f64>,
    /// Learning rate of each step so far.
    pub lrs: Vec<f64>,
    /// Global gradient norm of each step so far, before clipping.
    pub grad_norms: Vec<f64>,
    /// Evaluations so far.
    pub evals: Vec<EvalRecord>,
    /// What identifies the run ([`TrainConfig::run_identity`]); a resume must match it. Empty
    /// in checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub run_identity: BTreeMap<String, String>,
    /// The task's random streams ([`TrainTask::rng_states`]: dropout RNG positions), restored
    /// on resume. Empty when the task draws none, and in older checkpoints.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rng_states: BTreeMap<String, String>,
}

impl TrainerState {
    /// Reads a `trainer_state.json`.
    pub fn read(path: &Path) -> Result<Self> {
        crate::io::read_json(path)
    }
}

/// Every `checkpoint-<step>` folder in `out_dir`, by step (temporaries are ignored; a missing
/// `out_dir` has none).
pub fn checkpoint_dirs(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !out_dir.is_dir() {
        return Ok(Vec::new());
    }
    let entries = fs::read_dir(out_dir).map_err(|e| PeftError::io(out_dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PeftError::io(out_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix(CHECKPOINT_PREFIX)
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The highest-numbered `checkpoint-<step>` folder in `out_dir` (temporaries are ignored). A
/// checkpoint is written whole, so one without `trainer_state.json` is damaged: it is still
/// the latest, and resuming from it fails naming the missing file rather than silently going
/// back to an older one.
pub fn latest_checkpoint(out_dir: &Path) -> Result<Option<PathBuf>> {
    if !out_dir.is_dir() {
        return Err(PeftError::io(
            out_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
        ));
    }
    Ok(checkpoint_dirs(out_dir)?.pop().map(|(_, p)| p))
}

/// Restores the trainable vars and the optimiser state from the checkpoint `from` names (a
/// checkpoint folder, or an output folder's latest checkpoint), after checking that it was
/// written for this data and batching. Returns its trainer state and the RNG word position
/// before the shuffle of its epoch.
pub(super) fn restore_checkpoint<T: TrainTask>(
    from: &Path,
    cfg: &TrainConfig,
    task: &T,
    num_examples: usize,
    vars: &[(String, Var)],
    opt: &mut Optimizer,
) -> Result<(TrainerState, u128)> {
    let dir = resolve_checkpoint(from)?;
    let state = TrainerState::read(&dir.join(STATE_FILE))?;
    check_resume(&state, cfg, num_examples, &dir)?;
    restore_vars(vars, &dir.join(TRAINABLE_FILE))?;
    opt.load_state(&dir.join(OPTIMIZER_FILE))?;
    task.restore_rng_states(&state.rng_states)
        .map_err(|e| in_file(e, &dir.join(STATE_FILE)))?;
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
    Ok((state, word_pos))
}

/// A config error with the file it came from appended.
fn in_file(e: PeftError, file: &Path) -> PeftError {
    match e {
        PeftError::InvalidConfig { field, reason } => PeftError::InvalidConfig {
            field,
            reason: format!("{reason} (in {})", file.display()),
        },
        other => other,
    }
}

/// A checkpoint folder, or the latest checkpoint of an output folder.
fn resolve_checkpoint(from: &Path) -> Result<PathBuf> {
    if from.join(STATE_FILE).is_file() {
        return Ok(from.to_path_buf());
    }
    if let Some(dir) = latest_checkpoint(from)? {
        if !dir.join(STATE_FILE).is_file() {
            return Err(missing_state(&dir, "the checkpoint is incomplete"));
        }
        return Ok(dir);
    }
    let looks_like_checkpoint = from
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(CHECKPOINT_PREFIX))
        || from.join(TRAINABLE_FILE).exists()
        || from.join(ADAPTER_DIR).exists();
    Err(missing_state(
        from,
        if looks_like_checkpoint {
            "the checkpoint is incomplete"
        } else {
            "not a checkpoint folder, and it holds no checkpoint-<step> folders"
        },
    ))
}

/// An error naming `dir/trainer_state.json` as missing.
fn missing_state(dir: &Path, why: &str) -> PeftError {
    PeftError::io(
        dir.join(STATE_FILE),
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "missing ({why}; a checkpoint holds {STATE_FILE}, {TRAINABLE_FILE}, {OPTIMIZER_FILE} and {ADAPTER_DIR}/)"
            ),
        ),
    )
}

/// A resume must continue the same run (its identity, data and batching) from a state that
/// fits it: the error names the field, and the file when the state itself is impossible.
fn check_resume(state: &TrainerState, cfg: &TrainConfig, n: usize, dir: &Path) -> Result<()> {
    let file = dir.join(STATE_FILE);
    for (key, now) in &cfg.run_identity {
        // Checkpoints written before identities were recorded have none to compare.
        if state.run_identity.is_empty() {
            break;
        }
        let saved = state
            .run_identity
            .get(key)
            .map(String::as_str)
            .unwrap_or("(none)");
        if saved != now {
            return Err(PeftError::config(
                key.clone(),
                format!(
                    "the checkpoint {} belongs to another run: it was written with {key} = \
                     `{saved}`, this run has `{now}`",
                    dir.display()
                ),
            ));
        }
    }
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
    if state.global_step > cfg.steps {
        return Err(PeftError::config(
            "steps",
            format!(
                "the checkpoint {} is at step {}, beyond this run's {} steps; resume with at \
                 least {} steps",
                dir.display(),
                state.global_step,
                cfg.steps,
                state.global_step
            ),
        ));
    }
    if state.position > state.num_examples {
        return Err(PeftError::config(
            "position",
            format!(
                "{} in {} is beyond the {} training examples of an epoch",
                state.position,
                file.display(),
                state.num_examples
            ),
        ));
    }
    if state.losses.len() != state.global_step
        || state.lrs.len() != state.global_step
        || state.grad_norms.len() != state.global_step
    {
        return Err(PeftError::config(
            "global_step",
            format!(
                "{} has {} steps but {} losses",
                file.display(),
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

/// Writes `out/checkpoint-<step>` through a temporary folder swapped into place
/// ([`write_dir_atomic`], as the final adapter save); a failure leaves earlier checkpoints (and
/// an existing folder of the same step) untouched.
pub(super) fn save_checkpoint<T: TrainTask>(
    out: &Path,
    task: &T,
    vars: &[(String, Var)],
    opt: &Optimizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    let target = out.join(format!("{CHECKPOINT_PREFIX}{}", state.global_step));
    write_dir_atomic(&target, |tmp| {
        task.save_adapter(&tmp.join(ADAPTER_DIR))?;
        let values: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
            .collect();
        write_safetensors(&tmp.join(TRAINABLE_FILE), &values)?;
        opt.save_state(&tmp.join(OPTIMIZER_FILE))?;
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| PeftError::config("trainer_state", e.to_string()))?;
        write_atomic(&tmp.join(STATE_FILE), json.as_bytes())
    })?;
    Ok(target)
}
