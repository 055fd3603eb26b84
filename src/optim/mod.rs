//! Optimisation pieces for training adapters: AdamW with f32 state ([`AdamW`]), global-norm
//! gradient clipping ([`clip_grad_norm`]), learning-rate schedules with warmup ([`LrSchedule`])
//! and gradient accumulation over micro-batches ([`GradAccumulator`]).
//!
//! AdamW and LoRA-Pro write their state through one file format (`state_file`: per tracked
//! tensor its Adam moments and step count, plus metadata).
//!
//! Every piece addresses parameters by the names of [`crate::PeftModel::trainable_vars`], so
//! saved optimiser state maps back onto the vars of a freshly built model by name.

pub mod accumulate;
pub mod adamw;
pub mod clip;
pub mod lora_pro;
pub mod schedule;
mod state_file;

pub use accumulate::{GradAccumulator, average_grads};
pub use adamw::{AdamW, AdamWConfig, StepStats};
pub use clip::{clip_grad_norm, grad_norm};
pub use lora_pro::{LoraPair, LoraPro, LoraProConfig, LoraProMode, lora_pairs};
pub use schedule::{LrSchedule, Schedule, Warmup};
