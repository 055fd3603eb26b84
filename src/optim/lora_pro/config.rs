//! LoRA-Pro's hyper-parameters and mode, and the LoRA pairs it adjusts.

use std::fmt;
use std::str::FromStr;

use candle_core::Var;

use crate::adapter::LayerGeometry;
use crate::adapters::lora::LoraAdapter;
use crate::adapters::lora_pro::DEFAULT_DAMPING;
use crate::error::{PeftError, Result};
use crate::model::PeftModel;
use crate::optim::adamw::AdamWConfig;

/// The `optimizer` metadata value of a LoRA-Pro state file.
pub const OPTIMIZER_NAME: &str = "LoraPro";

/// Which LoRA-Pro variant runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraProMode {
    /// Adam moments of the full-size equivalent gradient, projected back onto A and B.
    #[default]
    Full,
    /// Adjusted gradients fed to ordinary AdamW on A and B.
    Efficient,
}

impl FromStr for LoraProMode {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(LoraProMode::Full),
            "efficient" => Ok(LoraProMode::Efficient),
            _ => Err(PeftError::config(
                "lora_pro_mode",
                format!("`{s}` is not one of full, efficient"),
            )),
        }
    }
}

impl fmt::Display for LoraProMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraProMode::Full => "full",
            LoraProMode::Efficient => "efficient",
        })
    }
}

/// LoRA-Pro hyper-parameters: the mode, Adam's (as in [`AdamWConfig`]) and the damping `δ` of
/// the r×r inverses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraProConfig {
    /// Full (the paper's, full-size moments) or efficient (AdamW on adjusted A, B gradients).
    pub mode: LoraProMode,
    /// Adam's β₁, the first-moment decay rate; default 0.9.
    pub beta1: f64,
    /// Adam's β₂, the second-moment decay rate; default 0.999.
    pub beta2: f64,
    /// Adam's ε in the denominator `√v̂ + ε`; default 1e-8.
    pub eps: f64,
    /// Weight-decay coefficient λ, applied to A and B each (`θ ← θ·(1 − η·λ) − η·Δ_θ`, the
    /// reference's SGD decay; never the frozen base). Default 0, as the paper's runs.
    pub weight_decay: f64,
    /// δ added to `BᵀB` and `AAᵀ` before their r×r inverses; default 1e-8, as the reference.
    pub damping: f64,
}

impl Default for LoraProConfig {
    fn default() -> Self {
        let a = AdamWConfig::default();
        Self {
            mode: LoraProMode::Full,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: 0.0,
            damping: DEFAULT_DAMPING,
        }
    }
}

impl LoraProConfig {
    /// The AdamW settings used for vars outside a pair (and for A, B in efficient mode).
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Checks the Adam settings (β in `[0, 1)`, ε and λ ≥ 0) and that `damping` is finite, ≥ 0.
    pub fn validate(&self) -> Result<()> {
        self.adamw().validate()?;
        if !(self.damping.is_finite() && self.damping >= 0.0) {
            return Err(PeftError::config(
                "damping",
                format!("must be finite and ≥ 0, got {}", self.damping),
            ));
        }
        Ok(())
    }
}

/// One LoRA adapter on one layer, as LoRA-Pro needs it.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// The layer's module path.
    pub module: String,
    /// The adapter's name (`default`).
    pub adapter: String,
    /// `lora_A`: `[r, in]`, or `[r, in, kh, kw]` on a conv2d.
    pub a: Var,
    /// `lora_B`: `[out, r]`, or `[out, r, 1, 1]` on a conv2d.
    pub b: Var,
    /// The layer's own `s` (α/r or α/√r after rank_pattern / alpha_pattern).
    pub scaling: f64,
}

/// The (A, B, s) of every active adapter of `model`, in layer order. An active adapter that is
/// not a LoRA adapter, or a LoRA on a grouped convolution, is an error naming the module.
pub fn lora_pairs<M>(model: &PeftModel<M>) -> Result<Vec<LoraPair>> {
    let mut pairs = Vec::new();
    for layer in model.layers() {
        let module = layer.name();
        let geometry = layer.geometry();
        for adapter in model.active_adapters() {
            let found = layer.with_adapter(adapter, |a| {
                match a.as_any().and_then(|any| any.downcast_ref::<LoraAdapter>()) {
                    Some(lora) => {
                        Ok((lora.lora_a().clone(), lora.lora_b().clone(), lora.scaling()))
                    }
                    None => Err(a.method()),
                }
            });
            let Some(found) = found else { continue };
            let (a, b, scaling) = found.map_err(|method| {
                PeftError::layer(
                    &module,
                    format!(
                        "LoRA-Pro optimises LoRA adapters only, but adapter `{adapter}` here is \
                         a {method} adapter"
                    ),
                )
            })?;
            if let LayerGeometry::Conv2d { params, .. } = geometry
                && params.groups != 1
            {
                return Err(PeftError::layer(
                    &module,
                    format!(
                        "LoRA-Pro needs ΔW = s·B·A, which a LoRA on a grouped conv2d \
                             (groups = {}) is not",
                        params.groups
                    ),
                ));
            }
            pairs.push(LoraPair {
                module: module.clone(),
                adapter: adapter.clone(),
                a,
                b,
                scaling,
            });
        }
    }
    Ok(pairs)
}
