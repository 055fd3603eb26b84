//! PEFT's `eva_config` section of a LoRA config: the settings of EVA's data-driven init (the
//! init itself runs in the data-init layer). It is part of LoRA's file format, so LoRA's config
//! reads and writes it.

use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// PEFT's `EvaConfig`, written as `eva_config` in `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaConfig {
    /// Components computed per layer, as a multiple of its rank (≥ 1); also the most a layer's
    /// rank can grow by in the redistribution.
    #[serde(default = "default_rho")]
    pub rho: f64,
    /// Cosine similarity between consecutive estimates at which a component has converged.
    #[serde(default = "default_tau")]
    pub tau: f64,
    /// Count only tokens whose label is not `label_mask_value` (when the batches carry a
    /// token mask built from labels; see `CalibrationBatch::token_mask`).
    #[serde(default = "default_true")]
    pub use_label_mask: bool,
    /// The label value of tokens that do not count (PEFT: -100).
    #[serde(default = "default_label_mask_value")]
    pub label_mask_value: i64,
    /// Divide each row of A by the square root of its singular value.
    #[serde(default)]
    pub whiten: bool,
    /// Scale `α_l` with the rank change so that `α_l / r_l` stays as configured.
    #[serde(default = "default_true")]
    pub adjust_scaling_factors: bool,
}

fn default_rho() -> f64 {
    2.0
}

fn default_tau() -> f64 {
    0.99
}

fn default_true() -> bool {
    true
}

fn default_label_mask_value() -> i64 {
    -100
}

impl Default for EvaConfig {
    fn default() -> Self {
        Self {
            rho: default_rho(),
            tau: default_tau(),
            use_label_mask: true,
            label_mask_value: default_label_mask_value(),
            whiten: false,
            adjust_scaling_factors: true,
        }
    }
}

impl EvaConfig {
    /// PEFT's checks: `ρ ≥ 1`, `0 ≤ τ ≤ 1`.
    pub fn validate(&self) -> Result<()> {
        if !(self.rho.is_finite() && self.rho >= 1.0) {
            return Err(PeftError::config(
                "eva_config.rho",
                format!("must be a number ≥ 1, got {}", self.rho),
            ));
        }
        if !(0.0..=1.0).contains(&self.tau) {
            return Err(PeftError::config(
                "eva_config.tau",
                format!("must be in [0, 1], got {}", self.tau),
            ));
        }
        Ok(())
    }

    /// `round(ρ·r)`, the components computed for a layer of rank `r`.
    pub fn max_components(&self, r: usize) -> usize {
        (self.rho * r as f64).round() as usize
    }
}
