//! Tasks: a model, its tokenizer and a loss, packaged as a [`crate::TrainTask`] so that the
//! [`crate::Trainer`] (and the `candle-peft train` / `eval` commands) can fine-tune and evaluate
//! them.
//!
//! - [`classify::ClassifyTask`]: sequence classification on transformers'
//!   `BertForSequenceClassification` (cross-entropy; accuracy).
//! - [`causal_lm::CausalLmTask`]: next-token prediction on the Llama family, on packed text or
//!   prompt/response pairs (cross-entropy; perplexity).

pub mod calibrated;
/// Next-token prediction on Llama-family models.
pub mod causal_lm;
/// Sequence classification on BERT-family encoders.
pub mod classify;

pub use causal_lm::{CausalLmTask, LmEval, LmExample};
pub use classify::{ClassifyEval, ClassifyTask};
