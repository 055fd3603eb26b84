//! Typed errors for the library. Every variant names the module, key, shape or field at fault.

use std::path::PathBuf;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A tensor operation or device error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A filesystem read or write failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory being accessed.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (e.g. `adapter_config.json`) could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The JSON file that failed to parse.
        path: PathBuf,
        /// The serde_json parse error, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// A `.safetensors` file is malformed or holds an unsupported dtype or layout.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The offending safetensors file.
        path: PathBuf,
        /// What is wrong with its header or contents.
        reason: String,
    },

    /// A configuration value is out of range, inconsistent, or not supported.
    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// The config key at fault, as spelled in the JSON/CLI (e.g. `r`, `lora_alpha`).
        field: String,
        /// Why the value is rejected.
        reason: String,
    },

    /// `target_modules` selected no linear layer of the base model (PEFT raises the same).
    #[error("target_modules {targets} matched no layer; layers found: {found}")]
    NoTargetMatch {
        /// The `target_modules` patterns, rendered for display.
        targets: String,
        /// The adaptable layer names that were available, rendered for display.
        found: String,
    },

    /// A module cannot be adapted or operated on as requested (wrong kind, shape or state).
    #[error("module `{module}`: {reason}")]
    InvalidLayer {
        /// Dotted name of the module at fault.
        module: String,
        /// Why the operation is rejected.
        reason: String,
    },

    /// A loaded tensor's shape disagrees with the shape the module or config implies.
    #[error("tensor `{key}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's key (safetensors name or parameter path).
        key: String,
        /// The shape required by the model/config.
        expected: Vec<usize>,
        /// The shape actually found.
        got: Vec<usize>,
    },

    /// A tensor required by an adapter, model or optimizer state is absent from its file.
    #[error("missing tensor `{key}` in {location}")]
    MissingTensor {
        /// The expected tensor key.
        key: String,
        /// Where it was looked for (usually a file path).
        location: String,
    },

    /// A file holds a tensor that matches no adapted module or state slot (strict loading).
    #[error("tensor `{key}` in {location} belongs to no adapted module")]
    UnexpectedTensor {
        /// The unrecognised tensor key.
        key: String,
        /// The file or source it came from.
        location: String,
    },

    /// `adapter_config.json` names a `peft_type` this build cannot load.
    #[error(
        "unknown peft_type `{0}` (this build supports: LORA, CORDA, SVFIT, LOLDU, SALT, RANDLORA, FLORA)"
    )]
    UnknownPeftType(String),

    /// An adapter directory has no `adapter_config.json`.
    #[error("{dir}: missing adapter_config.json")]
    MissingAdapterConfig {
        /// The adapter directory that was searched.
        dir: PathBuf,
    },

    /// Merging was requested for an adapter whose delta is already folded into the base weight.
    #[error("adapter `{adapter}` is already merged into `{module}`")]
    AlreadyMerged {
        /// Dotted name of the module whose weight holds the merge.
        module: String,
        /// Name of the already-merged adapter.
        adapter: String,
    },

    /// Unmerging was requested on a module that holds no merged adapter delta.
    #[error("module `{module}` has no merged adapter to unmerge")]
    NotMerged {
        /// Dotted name of the module.
        module: String,
    },

    /// No adapter with the given name is registered (on a module, or anywhere in the model).
    #[error("no adapter named `{adapter}`{}", if .module.is_empty() { String::new() } else { format!(" on `{}`", .module) })]
    UnknownAdapter {
        /// The adapter name that was looked up.
        adapter: String,
        /// The module it was looked up on; empty when the lookup was model-wide.
        module: String,
    },

    /// Training was asked of an adapter whose trainable vars cannot get a gradient: it is merged
    /// into the base weight (the forward no longer reads its vars) or switched off.
    #[error(
        "adapter `{adapter}` is {cause} on `{module}`, so its trainable vars get no gradient; {}",
        cause.remedy()
    )]
    NoGradient {
        /// The adapter that cannot be trained.
        adapter: String,
        /// The first module where it is merged or disabled.
        module: String,
        /// Merged or disabled.
        cause: NoGradientCause,
    },

    /// An adapter is being added under a name that is already taken.
    #[error("an adapter named `{0}` already exists")]
    DuplicateAdapter(String),

    /// A module path does not exist in the model.
    #[error("no module named `{0}`")]
    UnknownModule(String),

    /// A base model could not be located or resolved from its id or path.
    #[error("model `{id}` not found: {reason}")]
    ModelNotFound {
        /// The model id or local path that was requested.
        id: String,
        /// Why it could not be found or opened.
        reason: String,
    },

    /// Training produced a NaN or infinite loss and was aborted.
    #[error("loss is {loss} at step {step}; training stopped and the last good checkpoint is kept")]
    NonFiniteLoss {
        /// The optimizer step at which the loss diverged.
        step: usize,
        /// The non-finite loss value.
        loss: f64,
    },

    /// A feature or combination of options this library does not implement; the message says which.
    #[error("{0}")]
    Unsupported(String),

    /// A bad row or file of training/eval data; `line` is 1-based, 0 for the file as a whole
    /// (then the message is `{path}: {reason}`).
    #[error("{}: {reason}", data_location(.path, *.line))]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line number of the bad row, or 0 for the whole file.
        line: usize,
        /// What is wrong with the row or file.
        reason: String,
    },
}

/// Why an adapter's trainable vars get no gradient ([`PeftError::NoGradient`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoGradientCause {
    /// Its delta is folded into the base weight (`PeftModel::merge`).
    Merged,
    /// Adapters are switched off (`PeftModel::disable`, or inside a disable guard).
    Disabled,
}

impl NoGradientCause {
    /// What to do before training.
    pub fn remedy(self) -> &'static str {
        match self {
            NoGradientCause::Merged => "unmerge it (`PeftModel::unmerge`) before training",
            NoGradientCause::Disabled => {
                "enable adapters (`PeftModel::enable`, or drop the disable guard) before training"
            }
        }
    }
}

impl std::fmt::Display for NoGradientCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NoGradientCause::Merged => "merged into the base weight",
            NoGradientCause::Disabled => "disabled",
        })
    }
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

/// `Result` specialised to [`PeftError`], returned by every fallible API in the crate.
pub type Result<T> = std::result::Result<T, PeftError>;
