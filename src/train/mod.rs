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
//! across epoch boundaries, so every micro-batch has exactly `batch_size` examples; a
//! `batch_size` above the number of examples `n` is capped at `n` (with a message), so a
//! micro-batch is the whole data set once rather than the data cycled to fill it. The
//! checkpoint stores the epoch, the position in it and the RNG's word position before that
//! epoch's shuffle, which rebuilds the permutation and the RNG exactly on resume.
//!
//! Checkpoint layout, written into `out/.checkpoint-<step>.tmp/` and swapped into place as one
//! folder (`io::atomic::write_dir_atomic`, as the final adapter save):
//!
//! ```text
//! out/checkpoint-<step>/adapter/                the task's adapter (PEFT format)
//! out/checkpoint-<step>/trainable.safetensors   every trainable var, by name (exact resume)
//! out/checkpoint-<step>/optimizer.safetensors   AdamW or LoRA-Pro state (optim::adamw, lora_pro)
//! out/checkpoint-<step>/trainer_state.json      step, data position, RNG states, loss history,
//!                                               the run's identity
//! ```
//!
//! Resume restores the trainable vars, the optimiser state, the data order, the task's random
//! streams ([`TrainTask::rng_states`]: the adapters' and the classifier's dropout RNGs) and the
//! histories, so it reproduces the uninterrupted run bit for bit, dropout included. It is
//! refused, naming the field, for a checkpoint of another run ([`TrainConfig::run_identity`],
//! seed, batching, example count), beyond `steps`, or with an impossible data position.
//!
//! The output folder is prepared by [`prepare_output_dir`] before any work: checked for
//! writability, locked against a second run, and refused when it holds another run's
//! checkpoints unless overwriting.
//!
//! A NaN or infinite loss stops the run with [`PeftError::NonFiniteLoss`](crate::PeftError::NonFiniteLoss) naming the step,
//! before any update: the last checkpoint written is the last good one.

mod checkpoint;
mod config;
#[cfg(feature = "nccl")]
pub mod nccl;
mod optimizer;
mod outdir;
pub mod parallel;
mod progress;
mod report;
mod rng;
mod sampler;
mod task;
mod trainer;

pub use checkpoint::{
    ADAPTER_DIR, CHECKPOINT_PREFIX, OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE, TrainerState,
    checkpoint_dirs, latest_checkpoint,
};
pub use config::{OptimizerKind, TrainConfig};
pub use outdir::{LOCK_FILE, OutputLock, prepare_output_dir};
pub use parallel::{Collective, ThreadGroup, ThreadRank};
pub use report::TrainReport;
pub use rng::{adapter_rng_states, decode_rng, encode_rng, restore_adapter_rng_states};
pub use task::{EvalRecord, EvalReport, TrainTask, check_eval_loss};
pub use trainer::Trainer;
