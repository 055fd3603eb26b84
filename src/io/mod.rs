//! File formats: PEFT adapter directories, merged exports, model sources, and the one writer
//! of Hugging Face model folders (`hf_folder`) every export goes through.

pub mod atomic;
pub mod export;
pub mod gguf;
pub(crate) mod hf_folder;
pub mod peft_format;
mod safetensors_header;
pub mod source;

use std::path::Path;

use crate::error::{PeftError, Result};

/// Reads and parses a JSON file, with errors naming the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: path.to_path_buf(),
        source,
    })
}
