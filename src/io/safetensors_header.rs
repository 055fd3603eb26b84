//! Reading a safetensors header without touching the tensor data.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::error::{PeftError, Result};

/// Largest safetensors header accepted (as the safetensors crate).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors header, read without touching the tensor data.
#[derive(Clone, Debug)]
pub struct SafetensorsHeader {
    /// File offset of the first tensor byte (8 + header length).
    pub data_start: u64,
    /// Tensors in file (offset) order.
    pub tensors: Vec<(String, TensorInfo)>,
    /// The `__metadata__` map, if any.
    pub metadata: Option<HashMap<String, String>>,
}

impl SafetensorsHeader {
    /// Bytes of tensor data after the header.
    pub fn data_len(&self) -> u64 {
        self.tensors
            .last()
            .map(|(_, t)| t.data_offsets.1 as u64)
            .unwrap_or(0)
    }
}

/// A [`PeftError::Safetensors`] naming `path`.
pub(crate) fn st_error(path: &Path, reason: impl Into<String>) -> PeftError {
    PeftError::Safetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads and validates the header of a safetensors file, checking that the file holds exactly
/// the bytes the header describes (a truncated file is an error naming it).
pub fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader> {
    let mut file = File::open(path).map_err(|e| PeftError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| PeftError::io(path, e))?.len();
    if file_len < 8 {
        return Err(st_error(
            path,
            format!("file is {file_len} bytes, too short for a safetensors header"),
        ));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| PeftError::io(path, e))?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES || n > file_len - 8 {
        return Err(st_error(
            path,
            format!(
                "header length {n} does not fit in the file ({file_len} bytes): truncated or not safetensors"
            ),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| PeftError::io(path, e))?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| st_error(path, format!("invalid header: {e}")))?;
    let data_start = 8 + n;
    let offset_keys = metadata.offset_keys();
    let mut tensors = Vec::with_capacity(offset_keys.len());
    for name in offset_keys {
        if let Some(info) = metadata.info(&name) {
            let info = info.clone();
            tensors.push((name, info));
        }
    }
    let header = SafetensorsHeader {
        data_start,
        tensors,
        metadata: metadata.metadata().clone(),
    };
    let expected = data_start + header.data_len();
    if expected != file_len {
        let what = if expected > file_len {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return Err(st_error(
            path,
            format!(
                "file is {what}: the header describes {expected} bytes, the file has {file_len}"
            ),
        ));
    }
    Ok(header)
}
