//! Model code built on [`crate::PeftBuilder`]: HF weight names and `config.json` structs, only
//! differentiable ops, every linear layer adaptable.

pub mod bert;
pub mod heads;
pub mod llama;

pub use bert::{BertConfig, BertModel, HiddenAct, mean_pool};
