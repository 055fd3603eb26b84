//! Tasks: a model, its tokenizer and a loss, packaged as a [`crate::TrainTask`] so that the
//! [`crate::Trainer`] (and the `candle-peft train` / `eval` commands) can fine-tune and evaluate
//! them.
//!
//! - [`classify::ClassifyTask`]: sequence classification on transformers'
//!   `BertForSequenceClassification` (cross-entropy; accuracy).

pub mod classify;

pub use classify::{ClassifyEval, ClassifyTask};
