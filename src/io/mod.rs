//! File formats: PEFT adapter directories, merged exports, model sources.

pub mod peft_format;
