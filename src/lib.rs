//! candle-peft: parameter-efficient fine-tuning for candle, with Hugging Face PEFT's file format.
//!
//! Build a model's layers through [`PeftBuilder`], wrap it in a [`PeftModel`], attach adapters,
//! train the vars from [`PeftModel::trainable_vars`], save with [`PeftModel::save_adapter`] and
//! export merged weights.

pub mod adapter;
#[path = "../adapters/mod.rs"]
pub mod adapters;
pub mod builder;
pub mod config;
pub mod error;
pub mod frozen;
pub mod init;
pub mod io;
pub mod layer;
pub mod model;
pub mod ops;
pub mod models;

pub use adapter::{Adapter, Conv2dParams, LayerGeometry, Method};
pub use adapters::lora::{LoraAdapter, LoraConfig};
pub use builder::PeftBuilder;
pub use config::{AdapterConfig, ModuleSelector, Targeting};
pub use error::{PeftError, Result};
pub use layer::{LayerHandle, PeftConv2d, PeftLinear};
pub use model::{DEFAULT_ADAPTER, PeftModel};
pub use models::bert::{BertConfig, BertModel};
