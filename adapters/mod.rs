//! One file per method, each the whole method: config, init, forward, delta and file I/O.

pub mod lora;

pub use lora::{LoraAdapter, LoraConfig};
