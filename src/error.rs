//! Typed errors for the library. Every variant names the module, key, shape or field at fault.

use std::path::PathBuf;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },

    #[error("target_modules {targets} matched no layer; layers found: {found}")]
    NoTargetMatch { targets: String, found: String },

    #[error("module `{module}`: {reason}")]
    InvalidLayer { module: String, reason: String },

    #[error("tensor `{key}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("missing tensor `{key}` in {location}")]
    MissingTensor { key: String, location: String },

    #[error("tensor `{key}` in {location} belongs to no adapted module")]
    UnexpectedTensor { key: String, location: String },

    #[error(
        "unknown peft_type `{0}` (this build supports: LORA, CORDA, SVFIT, LOLDU, SALT, RANDLORA, FLORA)"
    )]
    UnknownPeftType(String),

    #[error("{dir}: missing adapter_config.json")]
    MissingAdapterConfig { dir: PathBuf },

    #[error("adapter `{adapter}` is already merged into `{module}`")]
    AlreadyMerged { module: String, adapter: String },

    #[error("module `{module}` has no merged adapter to unmerge")]
    NotMerged { module: String },

    #[error("no adapter named `{adapter}`{}", if .module.is_empty() { String::new() } else { format!(" on `{}`", .module) })]
    UnknownAdapter { adapter: String, module: String },

    #[error("an adapter named `{0}` already exists")]
    DuplicateAdapter(String),

    #[error("no module named `{0}`")]
    UnknownModule(String),

    #[error("model `{id}` not found: {reason}")]
    ModelNotFound { id: String, reason: String },

    #[error("loss is {loss} at step {step}; training stopped and the last good checkpoint is kept")]
    NonFiniteLoss { step: usize, loss: f64 },

    #[error("{0}")]
    Unsupported(String),

    /// A bad row or file of training/eval data; `line` is 1-based, 0 for the file as a whole
    /// (then the message is `{path}: {reason}`).
    #[error("{}: {reason}", data_location(.path, *.line))]
    Data {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// `path:line`, or `path` when `line` is 0.
fn data_location(path: &std::path::Path, line: usize) -> String {
    if line == 0 {
        path.display().to_string()
    } else {
        format!("{}:{line}", path.display())
    }
}

impl PeftError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PeftError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        PeftError::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn layer(module: impl Into<String>, reason: impl Into<String>) -> Self {
        PeftError::InvalidLayer {
            module: module.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, PeftError>;
