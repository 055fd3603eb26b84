//! The compute kernels: fused CPU ops with exact backwards, and what they share.
//!
//! Crate-private; the differentiable ops a model is built from are public through
//! [`crate::ops`]. Nothing here knows about layers, adapters or models: the fused decoder
//! blocks take plain tensors (a layer's operands as [`block_layers::FusedLinearParts`]).
//!
//! - shared plumbing: [`slices`] (f32 views of storages and tensors), [`saved`] (an op that
//!   keeps its forward's activations for its backward), [`gemm`], [`fast_exp`], [`simd`]
//!   (the runtime AVX2 + FMA dispatch), [`blocks`] (outputs written once, in blocks), `cuda`;
//! - element-wise ops: [`norm`], [`gelu`], [`softmax`], [`cross_entropy`], [`swiglu`],
//!   [`geglu`], [`rope`];
//! - products: [`frozen_weight`] (a base weight in its stored type, `--base-dtype`), [`lowp`] (a frozen weight in its stored type: f32, bf16, f16, ggml blocks),
//!   [`frozen`] (matmul and conv with frozen weights), [`linear_lora`] (a frozen
//!   linear plus its LoRA delta), [`linear_cross_entropy`] (a frozen head and the loss);
//! - attention and the layer blocks: [`attention`], [`block_layers`], [`attn_block`],
//!   [`mlp_block`] (Llama's pre-norm decoder layer), [`encoder_blocks`] (BERT's post-norm
//!   encoder layer).

pub(crate) mod attention;
pub(crate) mod attn_block;
pub(crate) mod block_layers;
pub(crate) mod blocks;
pub(crate) mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod encoder_blocks;
pub(crate) mod fast_exp;
pub(crate) mod frozen;
pub(crate) mod frozen_basis;
pub(crate) mod frozen_weight;
pub(crate) mod geglu;
pub(crate) mod gelu;
pub(crate) mod gemm;
pub(crate) mod linear_cross_entropy;
pub(crate) mod linear_lora;
pub(crate) mod lowp;
pub(crate) mod mlp_block;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod saved;
pub(crate) mod simd;
pub(crate) mod slices;
pub(crate) mod softmax;
pub(crate) mod swiglu;
#[cfg(test)]
pub(crate) mod test_values;
#[cfg(test)]
mod timing;
