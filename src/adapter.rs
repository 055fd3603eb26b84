//! The `Adapter` contract every method implements, the method list, and layer geometry.
//!
//! An adapter is written as `y = base(x) + Δ(x)` relative to the pristine base weight `W`:
//! `forward_delta` gives `Δ(x)` in activation space, `delta_weight` gives the dense `ΔW` with
//! `W' = W + ΔW` for merging. At initialisation `Δ = 0` exactly for every method.

use std::fmt;

use candle_core::{Tensor, Var};

use crate::error::{PeftError, Result};

/// The nine methods. Only those compiled into this build can be constructed; the rest are
/// recognised by name so that errors can say what is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Lora,
    LoraPro,
    Eva,
    Corda,
    Svfit,
    Loldu,
    RandLora,
    Flora,
    Salt,
}

impl Method {
    /// The `peft_type` string written to `adapter_config.json`.
    pub fn peft_type(self) -> &'static str {
        match self {
            // LoRA-Pro and EVA only change the optimiser / init: the file is a plain PEFT LoRA.
            Method::Lora | Method::LoraPro | Method::Eva => "LORA",
            Method::Corda => "CORDA",
            Method::Svfit => "SVFIT",
            Method::Loldu => "LOLDU",
            Method::RandLora => "RANDLORA",
            Method::Flora => "FLORA",
            Method::Salt => "SALT",
        }
    }

    /// Parses a CLI method name (`lora`, `lora-pro`, …).
    pub fn from_cli_name(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "lora" => Method::Lora,
            "lora-pro" | "lora_pro" => Method::LoraPro,
            "eva" => Method::Eva,
            "corda" => Method::Corda,
            "svfit" => Method::Svfit,
            "loldu" => Method::Loldu,
            "randlora" => Method::RandLora,
            "flora" => Method::Flora,
            "salt" => Method::Salt,
            other => {
                return Err(PeftError::config(
                    "method",
                    format!(
                        "unknown method `{other}` (expected one of lora, lora-pro, eva, corda, \
                         svfit, loldu, randlora, flora, salt)"
                    ),
                ));
            }
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Method::Lora => "lora",
            Method::LoraPro => "lora-pro",
            Method::Eva => "eva",
            Method::Corda => "corda",
            Method::Svfit => "svfit",
            Method::Loldu => "loldu",
            Method::RandLora => "randlora",
            Method::Flora => "flora",
            Method::Salt => "salt",
        };
        f.write_str(name)
    }
}

/// Hyper-parameters of a 2-D convolution (candle uses one value for both spatial axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
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

/// The shape of the layer an adapter is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerGeometry {
    /// Weight `[out_features, in_features]`.
    Linear {
        in_features: usize,
        out_features: usize,
    },
    /// Weight `[out_channels, in_channels / groups, kernel_h, kernel_w]`.
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize),
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

    pub fn in_features(&self) -> usize {
        match *self {
            LayerGeometry::Linear { in_features, .. } => in_features,
            LayerGeometry::Conv2d { in_channels, .. } => in_channels,
        }
    }

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
        _weight: &Tensor,
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
