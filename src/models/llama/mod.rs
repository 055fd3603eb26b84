//! The Llama family as causal language models: Llama (1/2/3), Mistral, Qwen2 (q/k/v bias),
//! SmolLM2 (a Llama) and Gemma 3 (text; its differences are in `gemma`), built through
//! [`PeftBuilder`](crate::PeftBuilder) from Hugging Face `config.json` and weight names, so every projection is
//! adaptable.
//!
//! For `x: [B, T, H]`, `n_h` query heads and `n_kv` key/value heads of size `d`:
//!
//! ```text
//! h₀ = embed_tokens[ids]
//! a  = h + o_proj(Attn(RmsNorm(h)))           per layer
//! h' = a + down_proj(silu(gate_proj(r)) ⊙ up_proj(r)),   r = RmsNorm(a)
//! logits = lm_head(RmsNorm(h_L))               [B, T, vocab], f32 (tied: embed_tokensᵀ)
//! Attn: q = RoPE(q_proj x) [B, n_h, T, d], k = RoPE(k_proj x), v = v_proj x  ([B, n_kv, T, d])
//!       softmax(q kᵀ/√d + M) v, query head j reading key/value head j / (n_h / n_kv)
//! RoPE (Hugging Face's half-split form): y = x·cos θ + rotate_half(x)·sin θ,
//!       θ[p, i] = p·ω_i, ω_i = rope_theta^(−2i/d) (rescaled by `rope_scaling`)
//! M[b, i, j] = 0 where j ≤ i, key j is not padding and, in a sliding layer, i − j < window;
//!             the dtype's most negative value elsewhere
//! ```
//!
//! Sliding-window attention (Mistral's `sliding_window`, Qwen2's `use_sliding_window` from
//! `max_window_layers` on, Gemma 3's `layer_types`): each forward builds one mask for the full
//! layers and one for the sliding layers, and a sliding layer's KV cache keeps only the last
//! `window − 1` keys (all a later query can see besides its own). Gemma 3's sliding layers also
//! have their own RoPE base.
//!
//! Weight names: `model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
//! `model.layers.N.mlp.{gate,up,down}_proj`, `model.layers.N.{input,post_attention}_layernorm`,
//! `model.norm`, `lm_head` (absent when `tie_word_embeddings`).
//!
//! Training path: every op has a backward. RMSNorm and the masked softmax are `crate::ops`' fused
//! ops; RoPE (fused with the head transpose and, for queries, the `1/√d` scale) and SwiGLU are
//! fused ops of this file with an exact backward on the CPU, plain candle ops elsewhere. Frozen
//! products (base projections, the tied or untied `lm_head`) go through `crate::ops::frozen_matmul`, so no
//! weight gradient is computed for them. Grouped-query attention reshapes the queries to
//! `[B, n_kv, (n_h/n_kv)·T, d]` instead of copying keys and values `n_h/n_kv` times. Without a
//! KV cache (training, evaluation) on the CPU in f32, `softmax(q kᵀ + M) v` from the rotated
//! heads to `o_proj`'s input is one fused op (`attention::attention_core`).
//!
//! Generation: [`LlamaForCausalLM::forward_cached`] appends each step's keys and values to a
//! [`KvCache`] (detached: no graph is kept across steps); the decoding loop that drives it is
//! `crate::generate`, which builds on this module (this module does not depend on it).
//!
//! Sources ([`LlamaForCausalLM::from_source`]): a Hugging Face folder or hub id (single or sharded
//! safetensors in any float dtype, converted to the requested one), or a `.gguf` file
//! (dequantised to f32 and renamed by `crate::io::gguf`). [`LlamaForCausalLM::export_merged`]
//! writes a Hugging Face folder that transformers and candle-transformers' `llama::Llama` load.
//!
//! Not supported (clear errors): other architectures, activations other than SiLU (GELU-tanh
//! for Gemma 3), RoPE scalings other than `linear` and `llama3`, Gemma's logit soft-capping and
//! bidirectional attention, and sequences longer than `max_position_embeddings`.
//!
//! Files: `config` (config.json parsing; `config_fields`: typed field access, `rope_scaling`,
//! `layer_types`), `layers` (RoPE tables, masks, attention, MLP, decoder
//! layer), `gemma` (Gemma 3's config fields, `(1 + w)` norms and decoder layer), `model`
//! ([`LlamaForCausalLM`] and its loading), `cache` ([`KvCache`]), `tokenizer`, `export`
//! (Hugging Face folder export). The fused kernels the layers call (RoPE, SwiGLU, the
//! attention core, the attention and MLP block ops) live in the crate-private `crate::kernels`.

mod cache;
mod config;
mod config_fields;
mod export;
mod gemma;
mod layers;
mod model;
mod tokenizer;

pub use crate::kernels::attention::attention_core;
pub use crate::kernels::rope::rope_reference;
pub use crate::kernels::swiglu::swiglu;
pub use cache::KvCache;
pub use config::{LayerAttention, LlamaArch, LlamaConfig, RopeScaling};
pub use layers::{LlamaAttention, LlamaDecoderLayer, LlamaMlp};
pub use model::LlamaForCausalLM;
pub use tokenizer::load_causal_tokenizer;

/// The seven projections of every decoder layer, in build order: the default LoRA target list
/// for the Llama family.
pub const LLAMA_TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
