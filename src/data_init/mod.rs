//! Data-driven initialisation: adapters whose initial weights come from real batches run
//! through the base model (EVA's incremental PCA, CorDA's covariance), and the conversion of a
//! CorDA adapter to a plain PEFT LoRA.
//!
//! **The calibration pass** runs real batches through the base model, with every targeted layer
//! streaming the input rows of its usable tokens into an accumulator ([`RowStatistic`]).
//!
//! ```text
//! for each batch (input_ids [B, T], attention_mask [B, T], optional token mask [B, T]):
//!     usable = token_mask (default: attention_mask) != 0          flat positions b·T + t
//!     model forward; at the start of each targeted layer's forward, with input x:
//!         x [B, T, in] (or [B·T, in])  →  X = rows of x at the usable positions   [N, in] f32
//!         x [B, in] (one row per sequence, e.g. a pooler) → rows of sequences with a usable token
//!         statistic(leader of x).update_sequences(X, rows of each sequence)
//! ```
//!
//! **Shared inputs.** Layers fed the same tensor (q/k/v of one attention block, gate/up of one
//! MLP) form a group. The first batch is run once to find the groups: within one forward, two
//! layers whose inputs are the same tensor (same tensor id) share a group, led by the first one
//! called. Only the leader holds a statistic; the members reuse its result. Later forwards check
//! that a member still sees its leader's tensor.
//!
//! **Memory** is bounded by the statistics: a layer's rows are selected, handed to its statistic
//! and dropped within its forward; no activation outlives the layer call.
//!
//! The model is generic: the pass takes a closure that runs one forward on a batch
//! (`BertModel::forward(ids, None, Some(mask))`, a Llama's `forward(ids, Some(mask))`, …) and
//! reaches the layers through the observers of
//! [`LayerHandle::set_input_observer`](crate::layer::LayerHandle::set_input_observer). The caller
//! runs the pass on the base model: [`with_base_model`] switches adapters off and dropout off for
//! its duration.
//!
//! Modules: [`eva`] (EVA's PCA, rank redistribution and LoRA init), [`corda`] (CorDA's covariance,
//! damping, oriented SVD and factors), [`convert`] (CorDA → PEFT LoRA).

mod batch;
mod calibrator;
pub mod convert;
pub mod corda;
pub mod eva;
mod pass;

pub use batch::{CalibrationBatch, text_batches};
pub use calibrator::{Calibrator, InputGroup, RowStatistic};
pub use pass::{CalibrationOptions, collect, progress_bar, target_layers, with_base_model};
