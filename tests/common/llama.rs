//! Shared pieces of the Llama-family tests: tiny random configs (Llama with GQA, Mistral with
//! an explicit head_dim, Qwen2 with q/k/v bias), seeded random weights under Hugging Face names,
//! models built from them, and SmolLM2 loaded from the offline GGUF.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_peft::io::gguf::GgufModel;
use candle_peft::io::source::{self, ModelSource};
use candle_peft::models::llama::{LlamaConfig, LlamaForCausalLM};
use candle_peft::{PeftBuilder, PeftModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

pub use super::tensors::flat;

/// A 2-layer Llama: hidden 32, 4 query heads over 2 key/value heads, vocab 97.
pub fn tiny_llama_json(tied: bool) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "vocab_size": 97,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
}

/// A 2-layer Mistral whose head_dim (16) is not hidden_size / heads (8).
pub fn tiny_mistral_json() -> Value {
    json!({
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 128,
        "sliding_window": 64,
        "vocab_size": 101,
        "tie_word_embeddings": false,
    })
}

/// A 2-layer Qwen2 (q/k/v bias, tied embeddings, 6 query heads over 2).
pub fn tiny_qwen2_json() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 128,
        "max_window_layers": 2,
        "sliding_window": 4096,
        "use_sliding_window": false,
        "vocab_size": 89,
        "tie_word_embeddings": true,
    })
}

pub fn config(json: &Value) -> LlamaConfig {
    LlamaConfig::from_json(json).unwrap()
}

fn rand_tensor(rng: &mut ChaCha8Rng, shape: &[usize], center: f32, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| center + scale * (2.0 * rng.random::<f32>() - 1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Seeded random weights for `cfg` under Hugging Face names (norm weights near 1).
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, i, v, d) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.head_dim,
    );
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], center: f32, scale: f32| {
        w.insert(name, rand_tensor(&mut rng, shape, center, scale));
    };
    put("model.embed_tokens.weight".into(), &[v, h], 0.0, 1.0);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, out, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            let scale = 1.0 / (inp as f32).sqrt();
            put(format!("{p}.{name}.weight"), &[out, inp], 0.0, scale);
        }
        if cfg.qkv_bias {
            for (name, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                put(format!("{p}.self_attn.{name}.bias"), &[out], 0.0, 0.2);
            }
        }
        put(format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.2);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            1.0,
            0.2,
        );
    }
    put("model.norm.weight".into(), &[h], 1.0, 0.2);
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, h], 0.0, 0.3);
    }
    w
}

/// Our model over `weights` (f32, CPU), with no adapters.
pub fn build(cfg: &LlamaConfig, weights: &HashMap<String, Tensor>) -> PeftModel<LlamaForCausalLM> {
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let model = LlamaForCausalLM::new(cfg, &b).unwrap();
    PeftModel::new(model, &b)
}

pub fn tiny(json: &Value, seed: u64) -> (PeftModel<LlamaForCausalLM>, LlamaConfig) {
    let cfg = config(json);
    let w = random_weights(&cfg, seed);
    (build(&cfg, &w), cfg)
}

/// `[1, T]` u32 ids.
pub fn ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Deterministic pseudo-random token ids below `vocab`.
pub fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// The last position of `[B, T, V]` logits as `[B, V]`.
pub fn last_position(logits: &Tensor) -> Tensor {
    let t = logits.dim(1).unwrap();
    logits.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap()
}

/// The SmolLM2 GGUF as a model source.
pub fn smollm2_source() -> ModelSource {
    source::resolve(super::smollm2_gguf().to_str().unwrap()).unwrap()
}

/// SmolLM2's Hugging Face tensors (dequantised f32, q/k un-permuted) and config.
pub fn smollm2_tensors() -> (HashMap<String, Tensor>, LlamaConfig) {
    let gguf = GgufModel::open(&super::smollm2_gguf()).unwrap();
    let cfg = LlamaConfig::from_json(&gguf.hf_config().unwrap()).unwrap();
    (gguf.hf_tensors(DType::F32, &Device::Cpu).unwrap(), cfg)
}

/// A chat prompt in SmolLM2's ids: "<|im_start|>user\nWhat is the capital of France? 2024<|im_end|>".
pub const SMOLLM2_PROMPT: &[u32] = &[
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 216, 34, 32, 34, 36, 2,
];

/// Pearson correlation of two equally long vectors.
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    let ma = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let mb = b.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (f64::from(x) - ma, f64::from(y) - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
