//! Differentiable ops for building a model whose training step stays cheap.
//!
//! Each op below is one graph node with an exact backward (not an approximation: the gradient
//! of the same function its forward computes). Frozen operands (norm weights, masks, base
//! weights) get no gradient: the backward returns the gradient of the activations and of the
//! trainable operands only, so a frozen model costs no weight-sized gradient per step. On the CPU
//! in f32 each runs a fused kernel; other dtypes and devices run the same math (in candle ops,
//! or the kernel on converted values), except [`frozen_linear_lora`], which is CPU f32 only.
//!
//! Element-wise and row-wise:
//! - [`norm`] ([`NormKind`]): layer norm `(x − μ)·r·γ + β` or RMS norm `x·r·γ` over the last
//!   dim, `r = 1/√(var + eps)` (or `1/√(mean(x²) + eps)`); `γ`, `β` frozen.
//! - [`gelu_erf`]: GELU in its exact form `x·Φ(x)`, as BERT uses it.
//! - [`masked_softmax`]: `softmax(x + mask)` over the last dim with a frozen additive mask
//!   `[B, 1, 1 | Tq, Tk]` broadcast over `x: [B, H, Tq, Tk]`.
//! - [`cross_entropy_rows`]: per-row `lse(x_i) − x_i[t_i]` of `[N, V]` logits, without
//!   materialising a softmax.
//! - [`swiglu`]: `silu(gate) ⊙ up`, differentiable in both.
//! - [`geglu`]: `gelu_tanh(gate) ⊙ up` (Gemma 3's MLP activation, candle's `Tensor::gelu`),
//!   differentiable in both.
//! - [`rope_reference`]: RoPE with the head transpose in plain candle ops (what the fused RoPE
//!   inside the Llama model is checked against).
//!
//! Attention:
//! - [`attention_core`]: `softmax(q kᵀ + mask) v` with grouped key/value heads, laid out as
//!   `o_proj`'s input; differentiable in `q`, `k`, `v`.
//! - [`attention_core_projected`]: the same on the projections as the linear layers give them
//!   (`[B, T, n·d]`), with q's scaling inside: one graph node where the head split of q and k
//!   in candle ops would add eight.
//!
//! Products with frozen weights (gradient for the input and the trainable factors only):
//! - [`frozen_matmul`]: `x Wᵀ + b`; [`frozen_matmul_weight`]: the same with `W` kept in its
//!   stored type ([`FrozenWeight`]: f32, f16, bf16 or ggml blocks, chosen by [`BaseDType`]); [`frozen_conv2d`]: `conv2d(x, K) + b`;
//!   [`conv2d_trainable`]: candle's conv2d for a trainable kernel, padded so its backward
//!   works for any stride remainder.
//! - [`frozen_linear_lora`]: `x Wᵀ + b + s (x Aᵀ) Bᵀ` as one op (gradients for `x`, `A`, `B`).
//! - [`frozen_linear_cross_entropy`]: `cross_entropy_rows(x Wᵀ + b, t)` without a `[N, V]`
//!   logits tensor in the graph.

pub use crate::kernels::attention::{attention_core, attention_core_projected};
pub use crate::kernels::cross_entropy::cross_entropy_rows;
pub use crate::kernels::frozen::{
    conv2d_trainable, frozen_conv2d, frozen_matmul, frozen_matmul_weight,
};
pub use crate::kernels::frozen_weight::{BaseDType, FrozenWeight, ggml_name};
pub use crate::kernels::geglu::geglu;
pub use crate::kernels::gelu::gelu_erf;
pub use crate::kernels::linear_cross_entropy::{
    frozen_linear_cross_entropy, frozen_linear_cross_entropy_weight,
};
pub use crate::kernels::linear_lora::{frozen_linear_lora, frozen_linear_lora_weight};
pub use crate::kernels::norm::{NormKind, norm};
pub use crate::kernels::rope::rope_reference;
pub use crate::kernels::softmax::masked_softmax;
pub use crate::kernels::swiglu::swiglu;
