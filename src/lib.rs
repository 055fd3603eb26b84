//! candle-peft: parameter-efficient fine-tuning for candle, with Hugging Face PEFT's file format.
//!
//! Build a model's layers through [`PeftBuilder`], wrap it in a [`PeftModel`], attach adapters,
//! train the vars from [`PeftModel::trainable_vars`], save with [`PeftModel::save_adapter`] and
//! export merged weights.
//!
//! The README follows; its Rust example is compiled as a doctest.
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod adapter;
#[path = "../adapters/mod.rs"]
pub mod adapters;
pub mod builder;
pub mod chat;
pub mod config;
pub mod data;
pub mod data_init;
pub mod error;
pub mod generate;
pub mod init;
pub mod io;
mod kernels;
pub mod layer;
pub mod linalg;
pub mod model;
pub mod models;
pub mod ops;
pub mod optim;
pub mod runtime;
pub mod tasks;
pub mod train;

pub use adapter::{Adapter, Conv2dParams, LayerGeometry, Method};
pub use adapters::AdapterConfig;
pub use adapters::lora::{LoraAdapter, LoraConfig};
// Every method's config and the types of its fields, so that
// `SaltConfig { targeting, r_lora: 16, ..Default::default() }` needs only the crate root.
pub use adapters::corda::{CordaConfig, CordaInit, CordaMethod};
pub use adapters::flora::FloraConfig;
pub use adapters::loldu::LolduConfig;
pub use adapters::lora::InitLoraWeights;
pub use adapters::randlora::RandLoraConfig;
pub use adapters::salt::SaltConfig;
pub use adapters::svfit::SvfitConfig;
pub use builder::PeftBuilder;
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{
    CommonFields, ConfigFields, EvaConfig, MethodConfig, ModuleSelector, OneOrMany, PatternMap,
    Targeting,
};
pub use error::{NoGradientCause, PeftError, Result};
pub use generate::{GenerationConfig, generate, generate_uncached};
pub use layer::{LayerHandle, PeftConv2d, PeftLinear};
pub use linalg::Precision;
pub use model::{DEFAULT_ADAPTER, PeftModel};
pub use models::bert::{BertConfig, BertModel};
pub use models::llama::{
    KvCache, LayerAttention, LlamaArch, LlamaConfig, LlamaForCausalLM, load_causal_tokenizer,
};
pub use models::{LoadOptions, Pretrained};
pub use ops::{BaseDType, FrozenWeight};
pub use optim::lora_pro::{LoraProConfig, LoraProMode};
pub use optim::{AdamW, AdamWConfig, LrSchedule, Schedule, Warmup};
pub use tasks::{CausalLmTask, ClassifyEval, ClassifyTask, TaskOptions};
pub use train::{EvalReport, TrainConfig, TrainReport, TrainTask, Trainer};
