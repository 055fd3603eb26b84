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
//! A NaN or infinite loss stops the run with [`PeftError::NonFiniteLoss`](crate::PeftError::NonFiniteLoss) naming the step,
//! before any update: the last checkpoint written is the last good one.

mod checkpoint;
mod config;
mod optimizer;
mod outdir;
mod progress;
mod report;
mod sampler;
mod task;
mod trainer;

pub use checkpoint::{
    ADAPTER_DIR, CHECKPOINT_PREFIX, OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE, TrainerState,
    checkpoint_dirs, latest_checkpoint,
};
pub use config::{OptimizerKind, TrainConfig};
pub use outdir::{LOCK_FILE, OutputLock, prepare_output_dir};
pub use report::TrainReport;
pub use task::{EvalRecord, EvalReport, TrainTask, check_eval_loss};
pub use trainer::Trainer;
