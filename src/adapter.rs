//! The `Adapter` contract every method implements, the method descriptions the registry holds
//! ([`MethodSpec`], [`Method`]), and layer geometry.
//!
//! An adapter is written as `y = base(x) + Δ(x)` relative to the pristine base weight `W`:
//! `forward_delta` gives `Δ(x)` in activation space, `delta_weight` gives the dense `ΔW` with
//! `W' = W + ΔW` for merging. At initialisation `Δ = 0` exactly for every method.

use std::fmt;

use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// What the registry knows about one method: its names, its file format, the roles of its
/// tensors, and how the CLI's generic flags map onto its config JSON. Each method declares one
/// in its own file under `adapters/`; the list of them is `crate::adapters::METHODS`.
///
#[derive(Debug, PartialEq, Eq)]
pub struct MethodSpec {
    /// The CLI name (`--method lora-pro`), also what [`Method`] displays.
    pub name: &'static str,
    /// Other accepted spellings of the CLI name (`lora_pro`).
    pub aliases: &'static [&'static str],
    /// The `peft_type` of the config file; methods that only change the init or the optimiser of
    /// another method share its type (EVA and LoRA-Pro write `LORA`).
    pub peft_type: &'static str,
    /// One line for help texts.
    pub summary: &'static str,
    /// The per-layer tensors of its adapter files.
    pub tensors: TensorRoles,
    /// How `candle-peft train` builds its config from flags.
    pub cli: CliSpec,
    /// Its init needs a calibration pass over data (EVA, CorDA).
    pub needs_calibration: bool,
    /// It trains with the LoRA-Pro optimiser instead of AdamW.
    pub lora_pro_optimizer: bool,
}

/// The per-layer tensors of a method's adapter files, named by their first segment
/// (`lora_A` for `base_model.model.<module>.lora_A.weight`).
#[derive(Debug, PartialEq, Eq)]
pub struct TensorRoles {
    /// Every first segment a file of this method may hold per layer; used to split a file key
    /// into module path and tensor name.
    pub prefixes: &'static [&'static str],
    /// Those of `prefixes` that are frozen state saved beside the trainables (listed, not counted
    /// as trainable).
    pub frozen: &'static [&'static str],
    /// The trained tensor (full local name) whose first dimension is a module's rank, if any.
    pub rank: Option<&'static str>,
}

/// How the CLI's generic flags (`--rank`, `--alpha`, `--dropout`, `--opt key=value`) become a
/// method's config JSON, which is then read like any `adapter_config.json`.
#[derive(Debug, PartialEq, Eq)]
pub struct CliSpec {
    /// The JSON object the CLI starts from (besides `peft_type` and `target_modules`): the
    /// defaults the CLI uses where they differ from the file format's, and fixed fields
    /// (`"init_lora_weights": "eva"`).
    pub defaults: &'static str,
    /// The key `--rank` sets; `None`: the method has no rank.
    pub rank: Option<&'static str>,
    /// The key `--alpha` sets; `None`: `--alpha` is refused.
    pub alpha: Option<&'static str>,
    /// When `--alpha` is not given, `alpha = alpha_per_rank · rank` (RandLoRA's `20·r`) instead
    /// of the default in `defaults`.
    pub alpha_per_rank: Option<u32>,
    /// The key `--dropout` sets; `None`: a non-zero `--dropout` is refused.
    pub dropout: Option<&'static str>,
    /// The `--opt key=value` options, in the order help lists them.
    pub options: &'static [OptionSpec],
}

/// One `--opt key=value` option of a method.
#[derive(Debug, PartialEq, Eq)]
pub struct OptionSpec {
    /// The key after `--opt`.
    pub key: &'static str,
    /// The JSON path it sets, dot-separated (`eva_config.tau`).
    pub path: &'static str,
    /// How the value is parsed.
    pub kind: OptionKind,
    /// One line for help texts.
    pub help: &'static str,
    /// A flag (`--rank`) or another option key that must not be given together with this one.
    pub excludes: Option<&'static str>,
}

/// The value type of an [`OptionSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionKind {
    /// `true` or `false`.
    Bool,
    /// An integer.
    Int,
    /// A number.
    Float,
    /// Any text.
    Str,
    /// `true` or `false` as a bool, anything else as text (LoRA's `init_lora_weights`).
    BoolOrStr,
    /// Comma-separated integers (`16,16,2,2`), written as a JSON list.
    IntList,
}

/// A method: a `Copy` handle to its [`MethodSpec`]. Displays as its CLI name; compares and
/// hashes by name (names are unique in the registry). Compare with `==`
/// (`method == crate::adapters::eva::METHOD`), not in `match` patterns.
#[derive(Clone, Copy, Debug)]
pub struct Method(&'static MethodSpec);

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Method {}

impl Method {
    /// The handle of `spec` (each method file declares `pub const METHOD: Method`).
    pub const fn new(spec: &'static MethodSpec) -> Self {
        Self(spec)
    }

    /// Everything the registry knows about the method.
    pub const fn spec(self) -> &'static MethodSpec {
        self.0
    }

    /// The CLI name (`lora-pro`).
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// The `peft_type` string written to `adapter_config.json`.
    pub fn peft_type(self) -> &'static str {
        self.0.peft_type
    }

    /// Whether `name` (any case) is this method's CLI name or one of its aliases.
    pub fn answers_to(self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.0.name == name || self.0.aliases.contains(&name.as_str())
    }

    /// Whether its init needs a calibration pass over data.
    pub fn needs_calibration(self) -> bool {
        self.0.needs_calibration
    }

    /// Whether it trains with the LoRA-Pro optimiser.
    pub fn uses_lora_pro(self) -> bool {
        self.0.lora_pro_optimizer
    }
}

impl std::hash::Hash for Method {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state);
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

/// Hyper-parameters of a 2-D convolution (candle uses one value for both spatial axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Step between kernel applications.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups (`in` and `out` are split into this many independent convolutions).
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// candle-nn's conv config carries the same four numbers (its cuDNN algorithm choice is dropped),
/// so `PeftBuilder::conv2d` takes a `candle_nn::Conv2dConfig` as it is.
impl From<candle_nn::Conv2dConfig> for Conv2dParams {
    fn from(c: candle_nn::Conv2dConfig) -> Self {
        Self {
            stride: c.stride,
            padding: c.padding,
            dilation: c.dilation,
            groups: c.groups,
        }
    }
}

/// The shape of the layer an adapter is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerGeometry {
    /// Weight `[out_features, in_features]`.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
    },
    /// Weight `[out_channels, in_channels / groups, kernel_h, kernel_w]`.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel height and width.
        kernel: (usize, usize),
        /// Stride, padding, dilation, groups.
        params: Conv2dParams,
    },
}

impl LayerGeometry {
    /// The base weight's shape.
    pub fn weight_shape(&self) -> Vec<usize> {
        match *self {
            LayerGeometry::Linear {
                in_features,
                out_features,
            } => vec![out_features, in_features],
            LayerGeometry::Conv2d {
                in_channels,
                out_channels,
                kernel,
                params,
            } => vec![
                out_channels,
                in_channels / params.groups,
                kernel.0,
                kernel.1,
            ],
        }
    }

    /// Input features (linear) or input channels (conv2d).
    pub fn in_features(&self) -> usize {
        match *self {
            LayerGeometry::Linear { in_features, .. } => in_features,
            LayerGeometry::Conv2d { in_channels, .. } => in_channels,
        }
    }

    /// Output features (linear) or output channels (conv2d).
    pub fn out_features(&self) -> usize {
        match *self {
            LayerGeometry::Linear { out_features, .. } => out_features,
            LayerGeometry::Conv2d { out_channels, .. } => out_channels,
        }
    }

    /// Number of base weight elements.
    pub fn weight_numel(&self) -> usize {
        self.weight_shape().iter().product()
    }
}

/// One adapter on one layer. Implementations live in `adapters/`, one method per file.
pub trait Adapter: Send + Sync + fmt::Debug {
    /// The method this adapter belongs to.
    fn method(&self) -> Method;

    /// Activation-space delta: what the adapter adds to the base layer's output for input `x`
    /// (`[.., in]` for linear, `[N, C, H, W]` for conv2d). `train` enables dropout.
    fn forward_delta(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// Dense `ΔW`, same shape as the base weight, in f32. `W' = W + ΔW`.
    fn delta_weight(&self) -> Result<Tensor>;

    /// Trainable parameters, named relative to the layer as PEFT names them (`lora_A.weight`).
    fn trainable_vars(&self) -> Vec<(String, Var)>;

    /// Everything the adapter file must hold for this layer: the trainables plus any frozen state
    /// that cannot be re-derived from the base weight. Names as in `trainable_vars`.
    fn tensors_to_save(&self) -> Vec<(String, Tensor)>;

    /// `x Wᵀ + b + Δ(x)` as one op, for a linear layer whose only live adapter is this one,
    /// when the adapter has such a path for these operands; `None` sends the layer to the base
    /// op plus [`forward_delta`](Self::forward_delta). Same values, fewer passes over the
    /// activations in training (see `crate::ops::frozen_linear_lora`).
    fn fused_linear_forward(
        &self,
        _x: &Tensor,
        _weight: &crate::ops::FrozenWeight,
        _bias: Option<&Tensor>,
        _train: bool,
    ) -> Option<Result<Tensor>> {
        None
    }

    /// `(A, B, s)` when this adapter's delta is exactly `s (x Aᵀ) Bᵀ` with `A: [r, in]` and
    /// `B: [out, r]` as CPU f32 tensors (the trainable vars themselves): the form fused
    /// multi-layer ops take (`crate::models::llama` fuses a whole MLP block). `None` (the
    /// default) keeps the layer on its own forward.
    fn fused_lora_factors(&self, _train: bool) -> Option<(Tensor, Tensor, f64)> {
        None
    }

    /// The adapter as `Any`, for code that needs its concrete type (the LoRA-Pro optimiser
    /// downcasts to `LoraAdapter`). Adapters that allow this return `Some(self)`.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// A copy of the adapter's dropout RNG, which training advances: checkpoints save it so
    /// that a resume draws the masks the uninterrupted run would have drawn. `None` (the
    /// default): the adapter draws no random numbers.
    fn dropout_rng(&self) -> Option<ChaCha8Rng> {
        None
    }

    /// Replaces the adapter's dropout RNG (with one [`dropout_rng`](Self::dropout_rng)
    /// returned). Default: nothing to replace.
    fn set_dropout_rng(&self, _rng: ChaCha8Rng) {}

    /// Number of trainable scalars.
    fn num_trainable(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    /// The trainables (local names, as [`trainable_vars`](Self::trainable_vars) gives them)
    /// that weight decay must leave alone: those that start at a value taken from the base
    /// weight. Decay pulls a var towards 0, which for them is away from the pretrained layer
    /// even when the gradient is zero; for a var whose zero is the base model (LoRA's factors)
    /// it is the usual pull towards the base. Default: none.
    fn no_weight_decay(&self) -> Vec<String> {
        Vec::new()
    }

    /// This layer's unweighted regulariser, for methods that define one (SALT), on the graph of
    /// the trainables. The trainer adds it times the adapter config's
    /// [`regularizer_weight`](crate::config::MethodConfig::regularizer_weight) to the training
    /// loss; it is never part of the forward. Default: none.
    fn regularizer_loss(&self) -> Option<Result<Tensor>> {
        None
    }
}
