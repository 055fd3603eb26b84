//! The LoRA-Pro optimiser (arXiv:2407.18242): steps LoRA factors so that the change of the
//! effective weight `W + s·B·A` approximates full fine-tuning. The gradient-adjustment math is
//! in [`crate::adapters::lora_pro`]; this module keeps the state and applies the updates.
//!
//! Per adapted matrix (A paired with B by module and adapter, each with the layer's own `s`),
//! with the raw LoRA gradients `g_A`, `g_B` (accumulated, then clipped by the trainer) and
//! learning rate `η`:
//!
//! ```text
//! full (default, the paper's):
//!   g̃  = equivalent gradient of (g_A, g_B)                     [out, in]
//!   m  ← β₁·m + (1 − β₁)·g̃ ;   v ← β₂·v + (1 − β₂)·g̃²         (per layer, t = 1, 2, …)
//!   Ĝ  = (m / (1 − β₁ᵗ)) / (√v / √(1 − β₂ᵗ) + ε)               (the full-FT Adam direction)
//!   (Δ_A, Δ_B) = adjusted gradients of (s·Bᵀ·Ĝ, s·Ĝ·Aᵀ), X from the Sylvester equation
//!   A ← A·(1 − η·λ) − η·Δ_A ;   B ← B·(1 − η·λ) − η·Δ_B
//! efficient:
//!   (g^A, g^B) = adjusted gradients of (g_A, g_B), X from the Sylvester equation
//!   A, B ← AdamW(A, B; g^A, g^B)                                (moments shaped like A and B)
//! ```
//!
//! To first order in η, a full-mode step moves the effective weight by
//! `−η·(P_B·Ĝ + Ĝ·P_A − P_B·Ĝ·P_A)`, the projection of full fine-tuning's AdamW step onto what
//! a rank-r update can reach. Full mode uses full-FT-sized learning rates (the reference uses
//! 2e-5 for Llama-2-7B, ten times less than usual for LoRA).
//!
//! **Memory.** Full mode keeps two moments of each adapted weight's full size, `2·out·in`
//! f32 values (8 bytes per base-weight element, as much as full-fine-tuning AdamW on those
//! matrices), plus two transient `[out, in]` buffers per layer during a step. Efficient mode
//! costs what LoRA + AdamW costs.
//!
//! Choices where the reference differs (methods-a §1(i)): `s` is each layer's own scaling
//! (rank_pattern / alpha_pattern / rsLoRA), never a constant; the Adam step count is the
//! standard `t` (the reference's first step uses t = 2); both moments are f32 (f64 for f64
//! factors); clipping acts on the raw gradients before the adjustment; A and B are paired by
//! module, never by position. Vars outside a LoRA pair (a `modules_to_save` classifier) get plain
//! AdamW. Vars named in the exempt set of [`LoraPro::with_no_decay`] get no weight decay, inside
//! a pair or outside.
//!
//! **Weight decay** `λ` acts on A and B, each on its own, as the reference's does: its LoRA-Pro
//! step replaces the gradients of A and B by `Δ_A`, `Δ_B`, and the training script's optimiser
//! is plain SGD with the run's weight decay, `θ ← θ − η·(Δ_θ + λ·θ)`, which is the full-mode
//! update above. So `s·B·A` decays towards 0, i.e. the adapted weight towards the base, at about
//! `2ηλ` per step (`(1 − ηλ)²` exactly for a step with zero gradients), where full fine-tuning's
//! decay pulls the whole weight towards 0 at `ηλ`. The paper's and the reference's runs use
//! `λ = 0`, which is [`LoraProConfig::default`]'s and the CLI's default for `--method lora-pro`.
//!
//! State file (safetensors, written atomically): the AdamW part under AdamW's keys
//! (`<var>.exp_avg`, `<var>.exp_avg_sq`, `<var>.step`); in full mode, per pair,
//! `lora_pro.<module>.<adapter>.exp_avg` / `.exp_avg_sq` (`[out, in]`, conv flattened to
//! `[out, in·kh·kw]`) and `.step`; metadata `optimizer = LoraPro`, `mode`, `step` and the
//! hyper-parameters.
//!
//! The hyper-parameters, the mode and the pairing of factors are in `config`; the optimiser,
//! its step and its state file in `optimizer`.

mod config;
mod optimizer;

pub use config::{LoraPair, LoraProConfig, LoraProMode, OPTIMIZER_NAME, lora_pairs};
pub use optimizer::LoraPro;
