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
//!    `in`; layers sharing an input all take the group's largest `k_l`, as PEFT does, so a
//!    `v_proj` beside a wider `q_proj` can end with a rank above its `out`). Per batch `X: [N, in]` (skipped while `N < k_l`), sklearn's update as PEFT
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
//! This file holds the registry entry (the `eva_config` section is [`EvaConfig`]); the calibration
//! and the init run in [`crate::data_init::eva`]
//! ([`add_eva_adapter`](crate::data_init::eva::add_eva_adapter)).
//!
//! Differences from PEFT: the PCA runs in f64 (PEFT: f32); ties in the pooled ratios are broken
//! by layer order (PEFT's argsort leaves them unspecified); the randomised SVD draws its test
//! matrix from a seeded ChaCha RNG, not torch's; PEFT loops until convergence with no cap.

use crate::adapter::{CliSpec, Method, MethodSpec, OptionKind, OptionSpec};
use crate::adapters::lora::{LORA_TENSORS, USE_RSLORA};
pub use crate::config::EvaConfig;

/// EVA's registry entry: a LoRA file (`init_lora_weights: "eva"`, `eva_config`) whose `A` comes
/// from a calibration pass. CLI: r 8, α 16, dropout 0 unless given.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "eva",
    aliases: &[],
    peft_type: "LORA",
    summary: "LoRA initialised from a PCA of the layers' inputs on calibration data",
    tensors: LORA_TENSORS,
    cli: CliSpec {
        defaults: r#"{"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
            "init_lora_weights": "eva", "eva_config": {}}"#,
        rank: Some("r"),
        alpha: Some("lora_alpha"),
        alpha_per_rank: None,
        dropout: Some("lora_dropout"),
        options: &[
            eva_option(
                "rho",
                "eva_config.rho",
                OptionKind::Float,
                "components per layer as a multiple of its rank (≥ 1)",
            ),
            eva_option(
                "tau",
                "eva_config.tau",
                OptionKind::Float,
                "cosine similarity at which a component has converged",
            ),
            eva_option(
                "whiten",
                "eva_config.whiten",
                OptionKind::Bool,
                "divide each row of A by √(its singular value)",
            ),
            eva_option(
                "adjust_scaling_factors",
                "eva_config.adjust_scaling_factors",
                OptionKind::Bool,
                "scale α with the redistributed rank so that α/r stays",
            ),
            eva_option(
                "use_label_mask",
                "eva_config.use_label_mask",
                OptionKind::Bool,
                "skip tokens labelled label_mask_value",
            ),
            eva_option(
                "label_mask_value",
                "eva_config.label_mask_value",
                OptionKind::Int,
                "the label of tokens that do not count",
            ),
            USE_RSLORA,
        ],
    },
    needs_calibration: true,
    lora_pro_optimizer: false,
});

const fn eva_option(
    key: &'static str,
    path: &'static str,
    kind: OptionKind,
    help: &'static str,
) -> OptionSpec {
    OptionSpec {
        key,
        path,
        kind,
        help,
        excludes: None,
    }
}
