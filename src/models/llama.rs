//! The Llama family as causal language models: Llama (1/2/3), Mistral, Qwen2 (q/k/v bias) and
//! SmolLM2 (a Llama), built through [`PeftBuilder`] from Hugging Face `config.json` and weight
//! names, so every projection is adaptable.
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
//! M[b, i, j] = 0 where j ≤ i and key j is not padding, the dtype's most negative value elsewhere
//! ```
//!
//! Weight names: `model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
//! `model.layers.N.mlp.{gate,up,down}_proj`, `model.layers.N.{input,post_attention}_layernorm`,
//! `model.norm`, `lm_head` (absent when `tie_word_embeddings`).
//!
//! Training path: every op has a backward. RMSNorm and the masked softmax are `crate::ops`' fused
//! ops; RoPE (fused with the head transpose and, for queries, the `1/√d` scale) and SwiGLU are
//! fused ops of this file with an exact backward on the CPU, plain candle ops elsewhere. Frozen
//! products (base projections, the tied or untied `lm_head`) go through `ops::frozen_matmul`, so no
//! weight gradient is computed for them. Grouped-query attention reshapes the queries to
//! `[B, n_kv, (n_h/n_kv)·T, d]` instead of copying keys and values `n_h/n_kv` times. Without a
//! KV cache (training, evaluation) on the CPU in f32, `softmax(q kᵀ + M) v` from the rotated
//! heads to `o_proj`'s input is one fused op (`attention::attention_core`).
//!
//! Generation: [`LlamaForCausalLM::forward_cached`] appends each step's keys and values to a
//! [`KvCache`] (detached: no graph is kept across steps); see `crate::generate`.
//!
//! Sources ([`LlamaForCausalLM::from_source`]): a Hugging Face folder or hub id (single or sharded
//! safetensors in any float dtype, converted to the requested one), or a `.gguf` file
//! (dequantised to f32 and renamed by `crate::io::gguf`). [`LlamaForCausalLM::export_merged`]
//! writes a Hugging Face folder that transformers and candle-transformers' `llama::Llama` load.
//!
//! Not supported (clear errors): other architectures, activations other than SiLU, RoPE
//! scalings other than `linear` and `llama3`, and sequences longer than a Mistral/Qwen2
//! `sliding_window` (sliding-window attention is not implemented; below the window it is plain
//! causal attention).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{Map, Value, json};

use crate::builder::PeftBuilder;
use crate::error::{PeftError, Result};
use crate::io::gguf::GgufModel;
use crate::io::peft_format::{temp_path, write_atomic};
use crate::io::source::{self, ModelSource, SourceKind};
use crate::kernels::attention;
use crate::layer::PeftLinear;
use crate::model::PeftModel;
use crate::ops::NormKind;

mod attn_block;
mod kernels;
mod mlp_block;

pub use attention::attention_core;
pub use kernels::{rope_reference, swiglu};

// ---------------------------------------------------------------------------------------------
// Configuration.

/// The Hugging Face architecture a config describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaArch {
    /// `LlamaForCausalLM` (also SmolLM2).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM`: bias on q/k/v.
    Qwen2,
}

/// `(architectures entry, model_type, arch)` of every supported architecture.
const ARCHITECTURES: &[(&str, &str, LlamaArch)] = &[
    ("LlamaForCausalLM", "llama", LlamaArch::Llama),
    ("MistralForCausalLM", "mistral", LlamaArch::Mistral),
    ("Qwen2ForCausalLM", "qwen2", LlamaArch::Qwen2),
];

impl LlamaArch {
    /// The `architectures` entry transformers writes.
    pub fn hf_architecture(self) -> &'static str {
        ARCHITECTURES
            .iter()
            .find(|(_, _, a)| *a == self)
            .map_or("LlamaForCausalLM", |(name, _, _)| name)
    }

    /// The `model_type` transformers writes.
    pub fn model_type(self) -> &'static str {
        ARCHITECTURES
            .iter()
            .find(|(_, _, a)| *a == self)
            .map_or("llama", |(_, mt, _)| mt)
    }

    fn from_architecture(name: &str) -> Option<Self> {
        let base = name
            .strip_suffix("ForCausalLM")
            .or_else(|| name.strip_suffix("Model"))
            .unwrap_or(name);
        ARCHITECTURES
            .iter()
            .find(|(arch, _, _)| arch.strip_suffix("ForCausalLM") == Some(base))
            .map(|(_, _, a)| *a)
    }

    fn from_model_type(name: &str) -> Option<Self> {
        ARCHITECTURES
            .iter()
            .find(|(_, mt, _)| *mt == name)
            .map(|(_, _, a)| *a)
    }
}

fn supported_list() -> String {
    ARCHITECTURES
        .iter()
        .map(|(a, _, _)| *a)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `rope_scaling` of a config.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency `ω_i / factor`).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// A Llama-family `config.json`. Missing optional fields take transformers' defaults for the
/// architecture; fields the model does not use are kept in `source_json` for exports.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub architecture: LlamaArch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Resolved: `num_attention_heads` when the config has none.
    pub num_key_value_heads: usize,
    /// Resolved: `hidden_size / num_attention_heads` when the config has none.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, a number or a list in config.json.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The attention window when the model uses one (Mistral's `sliding_window`, Qwen2's when
    /// `use_sliding_window`). Longer sequences are refused.
    pub sliding_window: Option<usize>,
    pub torch_dtype: Option<String>,
    /// The JSON object this config was read from.
    pub source_json: Map<String, Value>,
}

/// Typed access to config.json fields, with errors naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    PeftError::config(key, format!("expected a non-negative integer, got {v}"))
                }),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| PeftError::config(key, "missing from config.json"))
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        match self.usize_opt(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| PeftError::config(key, format!("{n} is not a token id"))),
        }
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| PeftError::config(key, format!("expected a number, got {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| PeftError::config(key, format!("expected true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| PeftError::config(key, format!("expected a string, got {v}"))),
        }
    }
}

/// The architecture named by `architectures` (first entry), else by `model_type`.
fn detect_architecture(obj: &Map<String, Value>) -> Result<LlamaArch> {
    if let Some(archs) = obj.get("architectures").filter(|v| !v.is_null()) {
        let names: Vec<&str> = archs
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let Some(first) = names.first() else {
            return Err(PeftError::config(
                "architectures",
                format!("expected a non-empty list of class names, got {archs}"),
            ));
        };
        return LlamaArch::from_architecture(first).ok_or_else(|| {
            PeftError::Unsupported(format!(
                "architecture `{first}` in config.json is not supported by the Llama-family \
                 model (supported: {})",
                supported_list()
            ))
        });
    }
    match obj.get("model_type").and_then(Value::as_str) {
        Some(mt) => LlamaArch::from_model_type(mt).ok_or_else(|| {
            PeftError::Unsupported(format!(
                "model_type `{mt}` in config.json is not supported by the Llama-family model \
                 (supported: {})",
                supported_list()
            ))
        }),
        None => Err(PeftError::config(
            "architectures",
            "config.json names neither `architectures` nor `model_type`",
        )),
    }
}

fn parse_rope_scaling(value: Option<&Value>) -> Result<Option<RopeScaling>> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let obj = value.as_object().ok_or_else(|| {
        PeftError::config("rope_scaling", format!("expected an object, got {value}"))
    })?;
    let f = Fields(obj);
    let kind = match f.str_opt("rope_type")? {
        Some(k) => k,
        None => f.str_opt("type")?.unwrap_or("default"),
    };
    let factor = |f: &Fields<'_>| -> Result<f64> {
        let v = f
            .f64_opt("factor")?
            .ok_or_else(|| PeftError::config("rope_scaling.factor", "missing"))?;
        if !(v.is_finite() && v > 0.0) {
            return Err(PeftError::config(
                "rope_scaling.factor",
                format!("must be positive, got {v}"),
            ));
        }
        Ok(v)
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: factor(&f)?,
        })),
        "llama3" => {
            let need = |key: &str| -> Result<f64> {
                f.f64_opt(key)?.ok_or_else(|| {
                    PeftError::config(format!("rope_scaling.{key}"), "missing for llama3")
                })
            };
            let low = need("low_freq_factor")?;
            let high = need("high_freq_factor")?;
            if high <= low {
                return Err(PeftError::config(
                    "rope_scaling.high_freq_factor",
                    format!("must exceed low_freq_factor {low}, got {high}"),
                ));
            }
            Ok(Some(RopeScaling::Llama3 {
                factor: factor(&f)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: f
                    .usize_opt("original_max_position_embeddings")?
                    .ok_or_else(|| {
                        PeftError::config(
                            "rope_scaling.original_max_position_embeddings",
                            "missing for llama3",
                        )
                    })?,
            }))
        }
        other => Err(PeftError::Unsupported(format!(
            "rope_scaling type `{other}` is not supported (supported: linear, llama3)"
        ))),
    }
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` object. An architecture other than Llama, Mistral or
    /// Qwen2 is [`PeftError::Unsupported`] naming it.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| {
            PeftError::config("config.json", "expected a JSON object at the top level")
        })?;
        let architecture = detect_architecture(obj)?;
        let f = Fields(obj);
        if let Some(act) = f.str_opt("hidden_act")? {
            if !matches!(act, "silu" | "swish") {
                return Err(PeftError::Unsupported(format!(
                    "hidden_act `{act}` (the Llama family uses silu)"
                )));
            }
        }
        let hidden_size = f.usize_req("hidden_size")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let (default_ctx, default_kv) = match architecture {
            LlamaArch::Llama => (2048, None),
            LlamaArch::Mistral => (4096 * 32, Some(8)),
            LlamaArch::Qwen2 => (32768, None),
        };
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .or(default_kv)
            .unwrap_or(num_attention_heads);
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let eos_token_ids = match f.present("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| {
                            PeftError::config("eos_token_id", format!("{v} is not a token id"))
                        })
                })
                .collect::<Result<Vec<u32>>>()?,
            Some(_) => f.u32_opt("eos_token_id")?.into_iter().collect(),
        };
        let attention_bias = f.bool_opt("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            LlamaArch::Llama => (
                attention_bias,
                attention_bias,
                f.bool_opt("mlp_bias")?.unwrap_or(false),
            ),
            LlamaArch::Mistral => (false, false, false),
            LlamaArch::Qwen2 => (true, false, false),
        };
        let sliding_window = match architecture {
            LlamaArch::Llama => None,
            LlamaArch::Mistral => f.usize_opt("sliding_window")?,
            LlamaArch::Qwen2 => {
                if f.bool_opt("use_sliding_window")?.unwrap_or(false) {
                    f.usize_opt("sliding_window")?
                } else {
                    None
                }
            }
        };
        let cfg = Self {
            architecture,
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_hidden_layers: f.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
            rope_scaling: parse_rope_scaling(obj.get("rope_scaling"))?,
            max_position_embeddings: f
                .usize_opt("max_position_embeddings")?
                .unwrap_or(default_ctx),
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            bos_token_id: f.u32_opt("bos_token_id")?,
            eos_token_ids,
            pad_token_id: f.u32_opt("pad_token_id")?,
            sliding_window,
            torch_dtype: f.str_opt("torch_dtype")?.map(str::to_string),
            source_json: obj.clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and checks a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let value: Value = crate::io::read_json(path.as_ref())?;
        Self::from_json(&value)
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(PeftError::config(field, "must be at least 1, got 0"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(PeftError::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(PeftError::config(
                "head_dim",
                format!("RoPE needs an even head size, got {}", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(PeftError::config(
                "rms_norm_eps",
                format!("must be finite and non-negative, got {}", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(PeftError::config(
                "rope_theta",
                format!("must be positive, got {}", self.rope_theta),
            ));
        }
        Ok(())
    }

    /// The config as Hugging Face `config.json` (for exports): the source's fields, with every
    /// field the model uses written from this struct.
    pub fn to_hf_json(&self) -> Value {
        let mut obj = self.source_json.clone();
        let arch = self.architecture;
        let mut set = |k: &str, v: Value| {
            obj.insert(k.to_string(), v);
        };
        set("architectures", json!([arch.hf_architecture()]));
        set("model_type", json!(arch.model_type()));
        set("hidden_act", json!("silu"));
        set("vocab_size", json!(self.vocab_size));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.num_hidden_layers));
        set("num_attention_heads", json!(self.num_attention_heads));
        set("num_key_value_heads", json!(self.num_key_value_heads));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("rope_theta", json!(self.rope_theta));
        set(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        set(
            "rope_scaling",
            match &self.rope_scaling {
                None => Value::Null,
                Some(RopeScaling::Linear { factor }) => {
                    json!({"rope_type": "linear", "type": "linear", "factor": factor})
                }
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                }),
            },
        );
        if let Some(id) = self.bos_token_id {
            set("bos_token_id", json!(id));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => set("eos_token_id", json!(one)),
            many => set("eos_token_id", json!(many)),
        }
        if let Some(id) = self.pad_token_id {
            set("pad_token_id", json!(id));
        }
        if arch == LlamaArch::Llama {
            set("attention_bias", json!(self.qkv_bias));
            set("mlp_bias", json!(self.mlp_bias));
        }
        if self.num_attention_heads * self.head_dim != self.hidden_size
            || self.source_json.contains_key("head_dim")
        {
            set("head_dim", json!(self.head_dim));
        }
        if let Some(dtype) = &self.torch_dtype {
            set("torch_dtype", json!(dtype));
        }
        Value::Object(obj)
    }

    /// RoPE frequencies `ω_i`, `i < head_dim/2`, with the config's scaling, computed in f32 as
    /// transformers does.
    pub fn rope_frequencies(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => {
                base.iter().map(|w| w / *factor as f32).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old_ctx = *original_max_position_embeddings as f32;
                let low_wavelen = old_ctx / low;
                let high_wavelen = old_ctx / high;
                base.iter()
                    .map(|&w| {
                        let wavelen = 2.0 * std::f32::consts::PI / w;
                        if wavelen < high_wavelen {
                            w
                        } else if wavelen > low_wavelen {
                            w / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * w / factor + smooth * w
                        }
                    })
                    .collect()
            }
        }
    }

    /// Query heads per key/value head.
    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary tables and masks.

/// `cos θ`, `sin θ` for positions `offset..offset + len`, `[len, head_dim/2]` each: as tensors
/// for the plain-ops path and as values for the fused kernel (built once per forward).
#[derive(Clone, Debug)]
pub(crate) struct RopeTables {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) cos_values: Arc<Vec<f32>>,
    pub(crate) sin_values: Arc<Vec<f32>>,
}

impl RopeTables {
    fn new(freqs: &[f32], offset: usize, len: usize, device: &Device) -> Result<Self> {
        let half = freqs.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            for &w in freqs {
                // The angle is rounded to f32 as transformers computes it; cos/sin of it exactly.
                let angle = f64::from(p as f32 * w);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_slice(&cos, (len, half), device)?,
            sin: Tensor::from_slice(&sin, (len, half), device)?,
            cos_values: Arc::new(cos),
            sin_values: Arc::new(sin),
        })
    }
}

/// The most negative finite value of `dtype` (transformers' `finfo(dtype).min`).
fn dtype_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895313892515355e38,
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// The additive attention mask `[B, 1, T, offset + T]`: query `i` (position `offset + i`) sees
/// key `j` when `j ≤ offset + i` and key `j` is not padding. Masked entries hold the dtype's
/// minimum once (never summed, so a fully masked row stays finite).
fn attention_mask(
    batch: usize,
    seq_len: usize,
    offset: usize,
    padding: Option<&[f32]>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let kv_len = offset + seq_len;
    let min = dtype_min(dtype) as f32;
    let mut mask = vec![0f32; batch * seq_len * kv_len];
    for b in 0..batch {
        for i in 0..seq_len {
            let row = &mut mask[(b * seq_len + i) * kv_len..(b * seq_len + i + 1) * kv_len];
            for (j, m) in row.iter_mut().enumerate() {
                let is_pad = padding.is_some_and(|p| p[b * kv_len + j] == 0.0);
                if j > offset + i || is_pad {
                    *m = min;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (batch, 1, seq_len, kv_len), device)?;
    Ok(if dtype == DType::F32 {
        mask
    } else {
        mask.to_dtype(dtype)?
    })
}

// ---------------------------------------------------------------------------------------------
// Layers.

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(crate::ops::norm(x, weight, None, eps, NormKind::RmsNorm)?)
}

/// Keys and values of one layer, `[B, n_kv, T_cached, d]` each.
type LayerKv = Option<(Tensor, Tensor)>;

/// Self-attention with grouped-query heads and RoPE.
#[derive(Clone, Debug)]
pub struct LlamaAttention {
    pub q_proj: PeftLinear,
    pub k_proj: PeftLinear,
    pub v_proj: PeftLinear,
    pub o_proj: PeftLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl LlamaAttention {
    fn load(b: &PeftBuilder<'_>, cfg: &LlamaConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_attention_heads * d;
        let kv_out = cfg.num_key_value_heads * d;
        Ok(Self {
            q_proj: b.linear(h, q_out, cfg.qkv_bias, "q_proj")?,
            k_proj: b.linear(h, kv_out, cfg.qkv_bias, "k_proj")?,
            v_proj: b.linear(h, kv_out, cfg.qkv_bias, "v_proj")?,
            o_proj: b.linear(q_out, h, cfg.o_bias, "o_proj")?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    /// `x: [B, T, H]`; `mask`: additive `[B, 1, T, T_kv]` or none (a single query over the
    /// whole cache). With `kv`, the new keys/values are appended to the layer's cache.
    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        kv: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let (bsz, seq_len, _) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward_peft(x)?
            .reshape((bsz, seq_len, nh, d))?;
        let k = self
            .k_proj
            .forward_peft(x)?
            .reshape((bsz, seq_len, nkv, d))?;
        let v = self
            .v_proj
            .forward_peft(x)?
            .reshape((bsz, seq_len, nkv, d))?;
        // 1/√d is folded into the queries: a [B, n_h, T, d] pass instead of one over the scores.
        let q = kernels::rope(&q, rope, 1.0 / (d as f64).sqrt())?;
        let k = kernels::rope(&k, rope, 1.0)?;
        if kv.is_none() && [&q, &k, &v].iter().all(|t| attention::fused(t)) {
            // Training and evaluation: the fused core (one graph node instead of a dozen, each
            // of which costs the backward an activation-sized pass). Generation keeps the ops
            // below, which append to the cache.
            let context = attention::attention_core(&q, &k, &v, mask, nkv)?;
            return self.o_proj.forward_peft(&context);
        }
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match kv {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((k0, v0)) => (Tensor::cat(&[&k0, &k], 2)?, Tensor::cat(&[&v0, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.detach(), v.detach()));
                (k, v)
            }
        };
        let kv_len = k.dim(2)?;
        let groups = nh / nkv;
        // Query heads g·groups .. (g+1)·groups share key/value head g: as rows of one matrix.
        let q = q.reshape((bsz, nkv, groups * seq_len, d))?;
        let scores = q.matmul(&k.t()?)?.reshape((bsz, nh, seq_len, kv_len))?;
        let probs = crate::ops::masked_softmax(&scores, mask)?;
        let context = probs
            .reshape((bsz, nkv, groups * seq_len, kv_len))?
            .matmul(&v)?
            .reshape((bsz, nh, seq_len, d))?
            .transpose(1, 2)?
            .reshape((bsz, seq_len, nh * d))?;
        self.o_proj.forward_peft(&context)
    }
}

/// The SwiGLU feed-forward block.
#[derive(Clone, Debug)]
pub struct LlamaMlp {
    pub gate_proj: PeftLinear,
    pub up_proj: PeftLinear,
    pub down_proj: PeftLinear,
}

impl LlamaMlp {
    fn load(b: &PeftBuilder<'_>, cfg: &LlamaConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: b.linear(h, i, cfg.mlp_bias, "gate_proj")?,
            up_proj: b.linear(h, i, cfg.mlp_bias, "up_proj")?,
            down_proj: b.linear(i, h, cfg.mlp_bias, "down_proj")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward_peft(x)?;
        let up = self.up_proj.forward_peft(x)?;
        self.down_proj.forward_peft(&swiglu(&gate, &up)?)
    }
}

/// One pre-norm decoder layer.
#[derive(Clone, Debug)]
pub struct LlamaDecoderLayer {
    pub self_attn: LlamaAttention,
    pub mlp: LlamaMlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    eps: f64,
}

impl LlamaDecoderLayer {
    fn load(b: &PeftBuilder<'_>, cfg: &LlamaConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            self_attn: LlamaAttention::load(&b.pp("self_attn"), cfg)?,
            mlp: LlamaMlp::load(&b.pp("mlp"), cfg)?,
            input_layernorm: b.pp("input_layernorm").get(h, "weight")?,
            post_attention_layernorm: b.pp("post_attention_layernorm").get(h, "weight")?,
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        kv: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let fused_attn = match kv {
            // Generation appends to the cache: the separate ops below do that.
            Some(_) => None,
            None => attn_block::try_forward(
                x,
                &self.input_layernorm,
                self.eps,
                &self.self_attn,
                rope,
                mask,
            )?,
        };
        let attn = match fused_attn {
            Some(attn) => attn,
            None => {
                let normed = rms_norm(x, &self.input_layernorm, self.eps)?;
                (self.self_attn.forward(&normed, rope, mask, kv)? + x)?
            }
        };
        if let Some(out) =
            mlp_block::try_forward(&attn, &self.post_attention_layernorm, self.eps, &self.mlp)?
        {
            return Ok(out);
        }
        let normed = rms_norm(&attn, &self.post_attention_layernorm, self.eps)?;
        Ok((self.mlp.forward(&normed)? + attn)?)
    }
}

/// Keys and values of past positions, one entry per layer, for generation.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every cached position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

/// A Llama-family decoder with its language-model head.
#[derive(Clone, Debug)]
pub struct LlamaForCausalLM {
    embed_tokens: Tensor,
    layers: Vec<LlamaDecoderLayer>,
    norm: Tensor,
    /// `None` when the head is tied to `embed_tokens`.
    lm_head: Option<PeftLinear>,
    rope_freqs: Vec<f32>,
    config: LlamaConfig,
}

impl LlamaForCausalLM {
    /// Builds the model from `pb` with Hugging Face weight names (see the module docs).
    pub fn new(cfg: &LlamaConfig, pb: &PeftBuilder) -> Result<Self> {
        cfg.validate()?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let m = pb.pp("model");
        let embed_tokens = m.pp("embed_tokens").get((v, h), "weight")?;
        let layers_b = m.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::load(&layers_b.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = m.pp("norm").get(h, "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(pb.linear(h, v, false, "lm_head")?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_freqs: cfg.rope_frequencies(),
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn layers(&self) -> &[LlamaDecoderLayer] {
        &self.layers
    }

    /// The untied `lm_head` (`None` when tied to the embeddings).
    pub fn lm_head(&self) -> Option<&PeftLinear> {
        self.lm_head.as_ref()
    }

    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Every adaptable linear layer in build order (the seven projections per layer, then an
    /// untied `lm_head`).
    pub fn linears(&self) -> Vec<&PeftLinear> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            out.extend([
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]);
        }
        out.extend(self.lm_head.as_ref());
        out
    }

    /// An empty cache for [`forward_cached`](Self::forward_cached).
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    fn check_positions(&self, offset: usize, seq_len: usize) -> Result<()> {
        let total = offset + seq_len;
        let ctx = self.config.max_position_embeddings;
        if total > ctx {
            return Err(PeftError::Unsupported(format!(
                "a sequence of {total} tokens does not fit the model's context of {ctx} tokens \
                 (max_position_embeddings)"
            )));
        }
        if let Some(window) = self.config.sliding_window {
            if total > window {
                return Err(PeftError::Unsupported(format!(
                    "a sequence of {total} tokens exceeds the model's sliding_window of {window} \
                     tokens; sliding-window attention is not implemented"
                )));
            }
        }
        Ok(())
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (bsz, seq_len) = input_ids.dims2()?;
        if seq_len == 0 {
            return Err(PeftError::ShapeMismatch {
                key: "input_ids".into(),
                expected: vec![bsz, 1],
                got: vec![bsz, 0],
            });
        }
        let hidden = self.config.hidden_size;
        Ok(self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((bsz, seq_len, hidden))?)
    }

    /// The final hidden states `[B, T, H]` (after the last norm) for every position: the
    /// training forward without the head. See [`forward`](Self::forward).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (bsz, seq_len) = input_ids.dims2()?;
        self.check_positions(0, seq_len)?;
        let padding = match attention_mask {
            None => None,
            Some(m) => {
                if m.dims() != [bsz, seq_len] {
                    return Err(PeftError::ShapeMismatch {
                        key: "attention_mask".into(),
                        expected: vec![bsz, seq_len],
                        got: m.dims().to_vec(),
                    });
                }
                Some(
                    m.to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_device(&Device::Cpu)?
                        .to_vec1::<f32>()?,
                )
            }
        };
        let mut hidden = self.embed(input_ids)?;
        let mask = attention_mask_for(&hidden, seq_len, 0, padding.as_deref())?;
        let rope = RopeTables::new(&self.rope_freqs, 0, seq_len, hidden.device())?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &rope, Some(&mask), None)?;
        }
        rms_norm(&hidden, &self.norm, self.config.rms_norm_eps)
    }

    /// `lm_head(hidden)` in f32: `[.., H]` → `[.., vocab]`. The tied head multiplies by the
    /// frozen embedding table with no gradient for it.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(head) => head.forward_peft(hidden)?,
            None => crate::ops::frozen_matmul(hidden, &self.embed_tokens, None)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Per-row next-token losses `lse(z_i) − z_i[t_i]` (f32, `[N]`) of the logits
    /// `z = lm_head(hidden)` for `hidden: [N, H]`: `cross_entropy_rows(&self.logits(hidden)?,
    /// targets)`. When the head is a plain frozen product in f32 (the tied embedding table, or
    /// an `lm_head` with no live adapter, trainable copy or observer) it runs as one op
    /// (`ops::frozen_linear_cross_entropy`) that puts no `[N, vocab]` logits tensor in the graph.
    pub fn token_losses(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let frozen_head = match &self.lm_head {
            _ if hidden.dtype() != DType::F32 => None,
            None => {
                (self.embed_tokens.dtype() == DType::F32).then(|| (self.embed_tokens.clone(), None))
            }
            Some(head) => match head.handle().fused_parts() {
                Some(crate::layer::FusedLinearParts {
                    weight,
                    bias,
                    lora: None,
                }) => Some((weight, bias)),
                _ => None,
            },
        };
        let losses = match frozen_head {
            Some((weight, bias)) => {
                crate::ops::frozen_linear_cross_entropy(hidden, &weight, bias.as_ref(), targets)?
            }
            None => crate::ops::cross_entropy_rows(&self.logits(hidden)?, targets)?,
        };
        Ok(losses)
    }

    /// Logits `[B, T, vocab]` (f32) for every position. `attention_mask` `[B, T]` (1 = token,
    /// 0 = padding; any dtype), `None` = all tokens. Causal plus padding mask; positions are
    /// `0..T` whatever the padding (as transformers' forward without `position_ids`).
    /// Differentiable: the training path.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask)?;
        self.logits(&hidden)
    }

    /// KV-cached forward for generation: runs `input_ids: [B, T_new]` at positions
    /// `cache.len()..`, appends their keys and values to `cache`, and returns logits
    /// `[B, T_new, vocab]`. No padding; the batch size must stay the same across calls.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, seq_len) = input_ids.dims2()?;
        let offset = cache.len;
        self.check_positions(offset, seq_len)?;
        if cache.layers.len() != self.layers.len() {
            return Err(PeftError::config(
                "cache",
                format!(
                    "a cache for {} layers used with a model of {} (use new_cache)",
                    cache.layers.len(),
                    self.layers.len()
                ),
            ));
        }
        let mut hidden = self.embed(input_ids)?;
        let mask = if seq_len > 1 {
            Some(attention_mask_for(&hidden, seq_len, offset, None)?)
        } else {
            None
        };
        let rope = RopeTables::new(&self.rope_freqs, offset, seq_len, hidden.device())?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            hidden = layer.forward(&hidden, &rope, mask.as_ref(), Some(kv))?;
        }
        cache.len = offset + seq_len;
        let hidden = rms_norm(&hidden, &self.norm, self.config.rms_norm_eps)?;
        Ok(self.logits(&hidden)?.detach())
    }

    /// Loads any source into a [`PeftModel`] with no adapters: a Hugging Face folder (single or
    /// sharded safetensors), a hub id resolved through the cache, or a `.gguf` file
    /// (dequantised, q/k un-permuted; see `crate::io::gguf`). Weights are converted to `dtype`.
    pub fn from_source(
        src: &ModelSource,
        dtype: DType,
        device: &Device,
    ) -> Result<(PeftModel<Self>, LlamaConfig)> {
        let (cfg, vb) = match &src.kind {
            SourceKind::Gguf => {
                let gguf = GgufModel::open(&src.config)?;
                let cfg = LlamaConfig::from_json(&gguf.hf_config()?)?;
                let tensors = gguf.hf_tensors(dtype, device)?;
                (cfg, VarBuilder::from_tensors(tensors, dtype, device))
            }
            _ => {
                let cfg = LlamaConfig::from_file(&src.config)?;
                // SAFETY: the weight files are memory-mapped only while the model is built;
                // `VarBuilder::get` copies every tensor out of the map (as BertModel does).
                let vb =
                    unsafe { VarBuilder::from_mmaped_safetensors(&src.weights, dtype, device) }
                        .map_err(|e| PeftError::Safetensors {
                            path: src.weights.first().cloned().unwrap_or_default(),
                            reason: e.to_string(),
                        })?;
                (cfg, vb)
            }
        };
        let b = PeftBuilder::new(vb);
        let model = Self::new(&cfg, &b)?;
        Ok((PeftModel::new(model, &b), cfg))
    }

    /// Resolves `spec` (folder, hub id or `.gguf` file) and loads it in f32 on `device`.
    pub fn from_pretrained(
        spec: &str,
        device: &Device,
    ) -> Result<(PeftModel<Self>, LlamaConfig, ModelSource)> {
        let src = source::resolve(spec)?;
        let (model, cfg) = Self::from_source(&src, DType::F32, device)?;
        Ok((model, cfg, src))
    }

    /// Merges the active adapters into the weights, removes every adapter and writes the merged
    /// model as a Hugging Face folder (see [`save_pretrained`](Self::save_pretrained)).
    pub fn export_merged(
        model: PeftModel<Self>,
        src: &ModelSource,
        out_dir: &Path,
        dtype: DType,
    ) -> Result<()> {
        let merged = model.merge_and_unload()?;
        merged.save_pretrained(src, out_dir, dtype)
    }

    /// Writes this model's current weights as a Hugging Face folder loadable by transformers and
    /// candle-transformers' `llama::Llama`: `config.json` (with `torch_dtype`),
    /// `model.safetensors` (every tensor under its Hugging Face name, in `dtype`, written one
    /// tensor at a time), the tokenizer files and `generation_config.json`. For a folder or hub
    /// source they are copied; for a GGUF source `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json` are built from its metadata. A layer that still carries an
    /// unmerged adapter is an error (use [`export_merged`](Self::export_merged)).
    pub fn save_pretrained(&self, src: &ModelSource, out_dir: &Path, dtype: DType) -> Result<()> {
        let Some(dtype_name) = torch_dtype_name(dtype) else {
            return Err(PeftError::config(
                "dtype",
                format!("{dtype:?} is not an export dtype (expected f32, f16 or bf16)"),
            ));
        };
        self.check_no_pending_adapters()?;
        if src.kind != SourceKind::Gguf && same_dir(&src.dir, out_dir) {
            return Err(PeftError::Unsupported(format!(
                "refusing to export into the base model folder {}",
                src.dir.display()
            )));
        }
        fs::create_dir_all(out_dir).map_err(|e| PeftError::io(out_dir, e))?;

        let weights = out_dir.join(source::WEIGHTS_FILE);
        write_safetensors_streaming(&weights, &self.hf_tensors(), dtype)?;

        let mut cfg = self.config.clone();
        cfg.torch_dtype = Some(dtype_name.to_string());
        write_json(&out_dir.join(source::CONFIG_FILE), &cfg.to_hf_json())?;

        match src.kind {
            SourceKind::Gguf => {
                let gguf = GgufModel::open(&src.config)?;
                let tokenizer = gguf.tokenizer()?;
                let text = tokenizer
                    .to_string(true)
                    .map_err(|e| PeftError::config("tokenizer", e.to_string()))?;
                write_atomic(&out_dir.join(source::TOKENIZER_FILE), text.as_bytes())?;
                write_json(
                    &out_dir.join("tokenizer_config.json"),
                    &gguf.tokenizer_config_json()?,
                )?;
                write_json(
                    &out_dir.join("generation_config.json"),
                    &generation_config(&self.config),
                )?;
            }
            _ => {
                let extra = ["generation_config.json", "chat_template.jinja"];
                let names = crate::io::export::TOKENIZER_FILES
                    .iter()
                    .chain(extra.iter());
                for name in names {
                    let from = src.dir.join(name);
                    if from.is_file() {
                        let bytes = fs::read(&from).map_err(|e| PeftError::io(&from, e))?;
                        write_atomic(&out_dir.join(name), &bytes)?;
                    }
                }
            }
        }
        remove_stale_shards(out_dir)
    }

    /// Every weight under its Hugging Face name, in checkpoint order.
    pub fn hf_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let attn = &l.self_attn;
            let mlp = &l.mlp;
            for lin in [
                &attn.q_proj,
                &attn.k_proj,
                &attn.v_proj,
                &attn.o_proj,
                &mlp.gate_proj,
                &mlp.up_proj,
                &mlp.down_proj,
            ] {
                let h = lin.handle();
                out.push((format!("{}.weight", h.name()), h.weight()));
                if let Some(b) = h.bias() {
                    out.push((format!("{}.bias", h.name()), b));
                }
            }
            let prefix = format!("model.layers.{i}");
            out.push((
                format!("{prefix}.input_layernorm.weight"),
                l.input_layernorm.clone(),
            ));
            out.push((
                format!("{prefix}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.handle().weight()));
        }
        out
    }

    fn check_no_pending_adapters(&self) -> Result<()> {
        for l in self.linears() {
            let h = l.handle();
            let merged = h.merged_adapters();
            if let Some(n) = h.adapter_names().iter().find(|n| !merged.contains(n)) {
                return Err(PeftError::Unsupported(format!(
                    "`{}` carries adapter `{n}` that is not merged into its weight; export with \
                     LlamaForCausalLM::export_merged (merge_and_unload)",
                    h.name()
                )));
            }
        }
        Ok(())
    }
}

/// The tokenizer of a causal-LM source: `tokenizer.json` of a folder or hub snapshot, or the
/// tokenizer rebuilt from a GGUF file's metadata. A source without one is an error naming the
/// file that is missing.
pub fn load_causal_tokenizer(src: &ModelSource) -> Result<tokenizers::Tokenizer> {
    if src.kind == SourceKind::Gguf {
        return GgufModel::open(&src.config)?.tokenizer();
    }
    let path = match &src.tokenizer {
        Some(p) => p.clone(),
        None => {
            let expected = src.dir.join(source::TOKENIZER_FILE);
            return Err(PeftError::io(
                &expected,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "missing: model `{}` has no {} (a causal-LM task needs its tokenizer)",
                        src.spec,
                        source::TOKENIZER_FILE
                    ),
                ),
            ));
        }
    };
    tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        PeftError::config(
            path.display().to_string(),
            format!("not a valid tokenizer.json: {e}"),
        )
    })
}

fn attention_mask_for(
    hidden: &Tensor,
    seq_len: usize,
    offset: usize,
    padding: Option<&[f32]>,
) -> Result<Tensor> {
    let bsz = hidden.dim(0)?;
    attention_mask(
        bsz,
        seq_len,
        offset,
        padding,
        hidden.dtype(),
        hidden.device(),
    )
}

// ---------------------------------------------------------------------------------------------
// Export helpers.

fn torch_dtype_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("float32"),
        DType::F16 => Some("float16"),
        DType::BF16 => Some("bfloat16"),
        _ => None,
    }
}

/// `generation_config.json` from the config's special token ids.
fn generation_config(cfg: &LlamaConfig) -> Value {
    let mut obj = Map::new();
    if let Some(id) = cfg.bos_token_id {
        obj.insert("bos_token_id".into(), json!(id));
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            obj.insert("eos_token_id".into(), json!(one));
        }
        many => {
            obj.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(id) = cfg.pad_token_id {
        obj.insert("pad_token_id".into(), json!(id));
    }
    Value::Object(obj)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| PeftError::config(path.display().to_string(), e.to_string()))?;
    write_atomic(path, format!("{text}\n").as_bytes())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Removes `model-*-of-*.safetensors` shards and their index left by an earlier export, so that
/// loaders see only the new `model.safetensors`.
fn remove_stale_shards(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| PeftError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| PeftError::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_shard =
            name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        if is_shard || name == source::WEIGHTS_INDEX_FILE {
            fs::remove_file(&path).map_err(|e| PeftError::io(&path, e))?;
        }
    }
    Ok(())
}

/// A tensor written as `dtype`, converted only when the writer asks for its bytes, so the export
/// holds one converted tensor at a time.
struct ExportView<'a> {
    tensor: &'a Tensor,
    dtype: DType,
    failure: &'a Mutex<Option<String>>,
}

impl safetensors::View for ExportView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.into()
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let converted = self
            .tensor
            .to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(self.dtype));
        match converted {
            Ok(t) => Cow::Owned(safetensors::View::data(&t).into_owned()),
            Err(e) => {
                // The writer cannot fail here: record the error, fill the slot, and let
                // `write_safetensors_streaming` discard the file.
                let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert_with(|| e.to_string());
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.elem_count() * self.dtype.size_in_bytes()
    }
}

/// Writes `tensors` to `path` as `dtype` with `{"format": "pt"}` metadata, one tensor at a time,
/// through a temporary file renamed into place.
fn write_safetensors_streaming(
    path: &Path,
    tensors: &[(String, Tensor)],
    dtype: DType,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (name, _) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(PeftError::config(
                "tensors",
                format!("`{name}` appears twice"),
            ));
        }
    }
    let failure = Mutex::new(None);
    let views: Vec<(&str, ExportView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.as_str(),
                ExportView {
                    tensor: t,
                    dtype,
                    failure: &failure,
                },
            )
        })
        .collect();
    let tmp: PathBuf = temp_path(path);
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp);
    let failed = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    let outcome = match (written, failed) {
        (Err(e), _) => Err(PeftError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        (Ok(()), Some(reason)) => Err(PeftError::Safetensors {
            path: path.to_path_buf(),
            reason,
        }),
        (Ok(()), None) => fs::rename(&tmp, path).map_err(|e| PeftError::io(path, e)),
    };
    if outcome.is_err() && tmp.is_file() {
        let _ = fs::remove_file(&tmp);
    }
    outcome
}
