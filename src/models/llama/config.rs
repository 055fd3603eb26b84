//! Llama-family `config.json`: architecture detection, `rope_scaling`, defaults per
//! architecture, validation, and the JSON written back on export.

use std::path::Path;

use serde_json::{Map, Value, json};

use super::config_fields::{Fields, layer_types, parse_rope_scaling};
use crate::error::{PeftError, Result};

/// The Hugging Face architecture a config describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaArch {
    /// `LlamaForCausalLM` (also SmolLM2).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM`: bias on q/k/v.
    Qwen2,
    /// `Gemma3ForCausalLM` (text only): scaled embeddings, `(1 + w)` RMSNorms around attention
    /// and MLP, q/k norms, GELU-tanh MLP, sliding and full layers with their own RoPE bases.
    Gemma3,
}

/// The span of one decoder layer's attention (transformers' `layer_types`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerAttention {
    /// `full_attention`: every earlier key.
    Full,
    /// `sliding_attention`: the last [`LlamaConfig::sliding_window`] keys (the query's own
    /// included).
    Sliding,
}

/// `(architectures entry, model_type, arch)` of every supported architecture.
const ARCHITECTURES: &[(&str, &str, LlamaArch)] = &[
    ("LlamaForCausalLM", "llama", LlamaArch::Llama),
    ("MistralForCausalLM", "mistral", LlamaArch::Mistral),
    ("Qwen2ForCausalLM", "qwen2", LlamaArch::Qwen2),
    ("Gemma3ForCausalLM", "gemma3_text", LlamaArch::Gemma3),
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
        // A multimodal `gemma3` config names its text model the same way.
        if name == "gemma3" {
            return Some(Self::Gemma3);
        }
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
    Linear {
        /// The divisor (> 0).
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent rescaling: wavelengths above
    /// `original_max_position_embeddings / low_freq_factor` are divided by `factor`, those below
    /// `original_max_position_embeddings / high_freq_factor` kept, and those between
    /// interpolated.
    Llama3 {
        /// The divisor of the low frequencies (> 0).
        factor: f64,
        /// Sets the wavelength above which frequencies are divided by `factor`.
        low_freq_factor: f64,
        /// Sets the wavelength below which frequencies are kept (exceeds `low_freq_factor`).
        high_freq_factor: f64,
        /// The context length the model was trained with before the rescaling.
        original_max_position_embeddings: usize,
    },
}

/// A Llama-family `config.json`. Missing optional fields take transformers' defaults for the
/// architecture; fields the model does not use are kept in `source_json` for exports.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// The architecture (`architectures`, else `model_type`).
    pub architecture: LlamaArch,
    /// Rows of the embedding table and columns of the logits.
    pub vocab_size: usize,
    /// Width `H` of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate/up projections.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads `n_h`.
    pub num_attention_heads: usize,
    /// Resolved: `num_attention_heads` when the config has none.
    pub num_key_value_heads: usize,
    /// Resolved: `hidden_size / num_attention_heads` when the config has none.
    pub head_dim: usize,
    /// RMSNorm epsilon (default 1e-6).
    pub rms_norm_eps: f64,
    /// RoPE base (default 10000).
    pub rope_theta: f64,
    /// RoPE frequency rescaling, `None` for the plain frequencies.
    pub rope_scaling: Option<RopeScaling>,
    /// The RoPE base of the sliding layers when it differs from `rope_theta` (Gemma 3's local
    /// base, `rope_parameters.sliding_attention.rope_theta`, unscaled); `None`: every layer
    /// uses `rope_theta` and `rope_scaling`.
    pub rope_local_theta: Option<f64>,
    /// Gemma 3's `query_pre_attn_scalar`: attention scores are scaled by its inverse square
    /// root instead of `1/√head_dim`. `None` for the other architectures.
    pub query_pre_attn_scalar: Option<f64>,
    /// The context length; longer sequences are refused.
    pub max_position_embeddings: usize,
    /// `lm_head` is the transposed embedding table (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, a number or a list in config.json.
    pub eos_token_ids: Vec<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// The attention window of the sliding layers (Mistral's `sliding_window`, Qwen2's when
    /// `use_sliding_window`, Gemma 3's): query `i` sees key `j` iff `i − j < sliding_window`.
    /// `None`: no layer slides.
    pub sliding_window: Option<usize>,
    /// Resolved per layer (`num_hidden_layers` entries): the config's `layer_types` when
    /// present, else the architecture's rule (Mistral: every layer slides; Qwen2: layers from
    /// `max_window_layers` on; Gemma 3: every `sliding_window_pattern`-th layer is full). All
    /// [`LayerAttention::Full`] when `sliding_window` is `None`.
    pub layer_types: Vec<LayerAttention>,
    /// `torch_dtype` (`float32`, `bfloat16`, …), written back on export.
    pub torch_dtype: Option<String>,
    /// The JSON object this config was read from.
    pub source_json: Map<String, Value>,
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

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` object. An architecture other than Llama, Mistral,
    /// Qwen2 or Gemma 3 is [`PeftError::Unsupported`] naming it.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| {
            PeftError::config("config.json", "expected a JSON object at the top level")
        })?;
        let architecture = detect_architecture(obj)?;
        let f = Fields(obj);
        if architecture == LlamaArch::Gemma3 {
            super::gemma::check_config(&f)?;
        } else if let Some(act) = f.str_opt("hidden_act")?
            && !matches!(act, "silu" | "swish")
        {
            return Err(PeftError::Unsupported(format!(
                "hidden_act `{act}` (the Llama family uses silu)"
            )));
        }
        let hidden_size = f.usize_req("hidden_size")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let (default_ctx, default_kv) = match architecture {
            LlamaArch::Llama => (2048, None),
            LlamaArch::Mistral => (4096 * 32, Some(8)),
            LlamaArch::Qwen2 => (32768, None),
            LlamaArch::Gemma3 => (131_072, Some(4)),
        };
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .or(default_kv)
            .unwrap_or(num_attention_heads);
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None if architecture == LlamaArch::Gemma3 => 256,
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
            LlamaArch::Gemma3 => (attention_bias, attention_bias, false),
        };
        let num_hidden_layers = f.usize_req("num_hidden_layers")?;
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
            LlamaArch::Gemma3 => Some(f.usize_opt("sliding_window")?.unwrap_or(4096)),
        };
        let layer_types = layer_types(&f, architecture, num_hidden_layers, sliding_window)?;
        // transformers 5 writes `rope_parameters`; older configs `rope_theta` / `rope_scaling`.
        let rope_parameters = f.present("rope_parameters");
        let (rope_theta, rope_scaling, rope_local_theta) = if architecture == LlamaArch::Gemma3 {
            super::gemma::rope_config(&f)?
        } else {
            let nested = rope_parameters.and_then(|p| p.get("rope_theta"));
            let theta = match f.f64_opt("rope_theta")? {
                Some(t) => t,
                None => match nested.filter(|v| !v.is_null()) {
                    Some(v) => v.as_f64().ok_or_else(|| {
                        PeftError::config(
                            "rope_parameters.rope_theta",
                            format!("expected a number, got {v}"),
                        )
                    })?,
                    None => 10_000.0,
                },
            };
            let scaling = match f.present("rope_scaling") {
                Some(v) => parse_rope_scaling(Some(v))?,
                None => parse_rope_scaling(rope_parameters)?,
            };
            (theta, scaling, None)
        };
        let query_pre_attn_scalar = match architecture {
            LlamaArch::Gemma3 => Some(f.f64_opt("query_pre_attn_scalar")?.unwrap_or(256.0)),
            _ => None,
        };
        let tie_default = architecture == LlamaArch::Gemma3;
        let cfg = Self {
            architecture,
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_local_theta,
            query_pre_attn_scalar,
            max_position_embeddings: f
                .usize_opt("max_position_embeddings")?
                .unwrap_or(default_ctx),
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(tie_default),
            qkv_bias,
            o_bias,
            mlp_bias,
            bos_token_id: f.u32_opt("bos_token_id")?,
            eos_token_ids,
            pad_token_id: f.u32_opt("pad_token_id")?,
            sliding_window,
            layer_types,
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

    /// Checks the sizes (positive, heads dividing, even head size) and the norm and RoPE
    /// constants.
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
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(PeftError::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
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
        let positive_f = [
            ("rope_theta", Some(self.rope_theta)),
            ("rope_local_base_freq", self.rope_local_theta),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
        ];
        for (field, value) in positive_f {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0)
            {
                return Err(PeftError::config(
                    field,
                    format!("must be positive, got {v}"),
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return Err(PeftError::config(
                "sliding_window",
                "must be at least 1, got 0",
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(PeftError::config(
                "layer_types",
                format!(
                    "{} entries for num_hidden_layers {}",
                    self.layer_types.len(),
                    self.num_hidden_layers
                ),
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
        if arch == LlamaArch::Gemma3 {
            super::gemma::write_config(self, &mut obj);
        }
        Value::Object(obj)
    }

    /// RoPE frequencies `ω_i`, `i < head_dim/2`, with the config's scaling, computed in f32 as
    /// transformers does.
    pub fn rope_frequencies(&self) -> Vec<f32> {
        let base = self.plain_frequencies(self.rope_theta);
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

    /// RoPE frequencies of the sliding layers when they differ from
    /// [`rope_frequencies`](Self::rope_frequencies): unscaled, base `rope_local_theta`.
    pub fn rope_frequencies_local(&self) -> Option<Vec<f32>> {
        self.rope_local_theta.map(|t| self.plain_frequencies(t))
    }

    /// `ω_i = base^(−2i/d)` in f32, as transformers' default RoPE computes them.
    fn plain_frequencies(&self, theta: f64) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / d as f32))
            .collect()
    }

    /// The factor applied to `q·kᵀ`: `query_pre_attn_scalar^(−½)` (Gemma 3), else
    /// `head_dim^(−½)`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// Whether layer `i` attends over a sliding window (and the window).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        match self.layer_types.get(i) {
            Some(LayerAttention::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// Query heads per key/value head.
    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}
