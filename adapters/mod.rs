//! One file per method, each the whole method: config, init, forward, delta and file I/O.

pub mod corda;
pub mod eva;
pub(crate) mod factored;
pub mod flora;
pub mod loldu;
pub mod lora;
pub mod lora_pro;
pub mod randlora;
pub mod salt;
pub mod svfit;

pub use lora::{LoraAdapter, LoraConfig};
