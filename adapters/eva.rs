//! EVA: explained variance adaptation (Paischer et al., 2024, "Parameter Efficient Fine-tuning
//! via Explained Variance Adaptation", arXiv:2410.07170), with Hugging Face PEFT's semantics
//! (`init_lora_weights="eva"`, `peft/tuners/lora/eva.py`).
//!
//! EVA is an initialisation of LoRA; the adapter it makes is a plain [`LoraAdapter`](crate::LoraAdapter) and the file
//! a plain PEFT LoRA. For every targeted linear layer `l` (`W_l: [out, in]`, configured rank
//! `r_l`, `α_l`):
//!
//! 1. **Incremental PCA** of the layer's inputs on the calibration batches (rows of non-padding
//!    tokens only, see [`crate::data_init`]), with `k_l = round(ρ·r_l)` components (at most
//!    `min(in, out)`). Per batch `X: [N, in]` (skipped while `N < k_l`), sklearn's update as PEFT
//!    runs it: running mean `μ` and variance `σ²` (Chan's update, f64), then the SVD of
//!    `X − μ` (first batch) or of `[diag(S)·Vᵀ; X − mean(X); √(n·N/(n+N))·(μ_old − mean(X))]`;
//!    `components = Vᵀ[:k]` with each row's largest-magnitude entry positive (sklearn's
//!    `svd_flip`), `explained_variance_ratio = S² / Σ_j σ²_j·n`. The SVD is PEFT's randomised
//!    `svd_lowrank` (q = 2k, 4 subspace iterations, a seeded test matrix; exact when q reaches
//!    the matrix's smaller side).
//! 2. **Convergence.** After every fit (but the first) component `i` has converged when
//!    `cos(components_t[i], components_{t−1}[i]) ≥ τ`. A layer is done when its first `r_l`
//!    components (for its current `r_l`, step 3) have converged; it then stops fitting, and
//!    resumes if a later redistribution raises `r_l` past what converged. The batches cycle until
//!    every layer is done, at most
//!    [`EvaOptions::max_iterations`](crate::data_init::eva::EvaOptions::max_iterations)
//!    batches: past that the error names the layers that have not converged.
//! 3. **Rank redistribution.** Once every layer has components: pool the values
//!    `explained_variance_ratio[:k_l]` of all layers, keep the `Σ_l r_l` largest, and set `r_l` to
//!    the number of layer `l`'s values kept (0 ≤ `r_l` ≤ `k_l`, and `Σ r_l` is unchanged; with
//!    `ρ = 1` every layer keeps its rank).
//! 4. **Init.** `A_l = components[:r_l]` (`[r_l, in]`, orthonormal rows; divided row-wise by
//!    `√S_i` with `whiten`), `B_l = 0`, so the adapted model is the base model exactly. A layer
//!    with `r_l = 0` gets no adapter. With `adjust_scaling_factors` (default),
//!    `α_l ← α_l · r_l_new / r_l`, keeping `s = α/r` per layer.
//!
//! Layers fed the same tensor (q/k/v of one block) share one PCA ([`crate::data_init`]); each of
//! them still gets its own rank, and the one whose PCA is tracked holds the group's largest.
//! Targeted layers other than linear ones (conv2d) get the standard LoRA init, as PEFT does.
//!
//! The config written is PEFT's: `init_lora_weights: "eva"`, `eva_config`, `target_modules` =
//! the adapted modules (full names; rank-0 layers removed), `rank_pattern` / `alpha_pattern` =
//! full module name → `r_l` / `α_l` where they differ from `r` / `lora_alpha`. Python PEFT loads
//! it as it is, with no data.
//!
//! This file holds the config; the calibration and the init run in [`crate::data_init::eva`]
//! ([`add_eva_adapter`](crate::data_init::eva::add_eva_adapter)).
//!
//! Differences from PEFT: the PCA runs in f64 (PEFT: f32); ties in the pooled ratios are broken
//! by layer order (PEFT's argsort leaves them unspecified); the randomised SVD draws its test
//! matrix from a seeded ChaCha RNG, not torch's; PEFT loops until convergence with no cap.

use serde::{Deserialize, Serialize};

use crate::adapter::Method;
use crate::adapters::lora::{InitLoraWeights, LoraConfig};
use crate::config::CliAdapterArgs;
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
    /// token mask built from labels; see
    /// [`CalibrationBatch::token_mask`](crate::data_init::CalibrationBatch::token_mask)).
    #[serde(default = "default_true")]
    pub use_label_mask: bool,
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

/// The LoRA config `--method eva` builds from the CLI flags (r 8, α 16, dropout 0 unless given).
/// Options: `rho`, `tau`, `whiten`, `adjust_scaling_factors`, `use_label_mask`,
/// `label_mask_value`, `use_rslora`.
pub fn lora_config_from_cli(args: &CliAdapterArgs) -> Result<LoraConfig> {
    args.check_options(
        Method::Eva,
        &[
            "rho",
            "tau",
            "whiten",
            "adjust_scaling_factors",
            "use_label_mask",
            "label_mask_value",
            "use_rslora",
        ],
    )?;
    let mut eva = EvaConfig::default();
    if let Some(v) = args.option("rho")? {
        eva.rho = v;
    }
    if let Some(v) = args.option("tau")? {
        eva.tau = v;
    }
    if let Some(v) = args.option("whiten")? {
        eva.whiten = v;
    }
    if let Some(v) = args.option("adjust_scaling_factors")? {
        eva.adjust_scaling_factors = v;
    }
    if let Some(v) = args.option("use_label_mask")? {
        eva.use_label_mask = v;
    }
    if let Some(v) = args.option("label_mask_value")? {
        eva.label_mask_value = v;
    }
    let mut c = LoraConfig::new(
        &args.targets,
        args.rank.unwrap_or(8),
        args.alpha.unwrap_or(16.0),
    );
    c.lora_dropout = args.dropout.unwrap_or(0.0);
    if let Some(v) = args.option("use_rslora")? {
        c.use_rslora = v;
    }
    c.init_lora_weights = InitLoraWeights::Named("eva".into());
    c.eva_config = Some(eva);
    Ok(c)
}
