//! File formats: PEFT adapter directories, merged exports, model sources.

pub mod export;
pub mod peft_format;
pub mod source;
