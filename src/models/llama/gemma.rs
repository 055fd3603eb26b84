//! Gemma 3 (text) as a member of the Llama family: its config.json fields, its `(1 + w)`
//! RMSNorm and its decoder layer, which normalises the attention and MLP outputs as well as
//! their inputs.
//!
//! ```text
//! h₀ = embed_tokens[ids] · √H                                   (√H rounded to f32)
//! r  = h + GemmaNorm_post_attn(Attn(GemmaNorm_in(h)))
//! h' = r + GemmaNorm_post_ffw(down(gelu_tanh(gate(s)) ⊙ up(s))),  s = GemmaNorm_pre_ffw(r)
//! GemmaNorm(x) = x · rsqrt(mean(x²) + ε) · (1 + w)              in f32
//! Attn: q = RoPE(GemmaNorm_q(q_proj x)), k = RoPE(GemmaNorm_k(k_proj x)) (per head, over d),
//!       scores scaled by query_pre_attn_scalar^(−½)
//! ```
//!
//! The model keeps `1 + w` (f32) as the norm weight, so the shared RMSNorm op applies it; the
//! Hugging Face export writes `w` back.

use candle_core::{DType, Tensor};
use serde_json::{Map, Value, json};

use super::cache::LayerKv;
use super::config::{LayerAttention, LlamaConfig, RopeScaling};
use super::config_fields::{Fields, parse_rope_scaling};
use super::layers::{LlamaDecoderLayer, RopeTables, rms_norm};
use crate::builder::PeftBuilder;
use crate::error::{PeftError, Result};

/// transformers' defaults for the RoPE bases of Gemma 3's full and sliding layers.
const GLOBAL_THETA: f64 = 1_000_000.0;
const LOCAL_THETA: f64 = 10_000.0;

/// Refuses the Gemma 3 options this model does not implement, naming the field.
pub(super) fn check_config(f: &Fields<'_>) -> Result<()> {
    if let Some(act) = f.str_opt("hidden_activation")?
        && act != "gelu_pytorch_tanh"
    {
        return Err(PeftError::Unsupported(format!(
            "hidden_activation `{act}` (Gemma 3 uses gelu_pytorch_tanh)"
        )));
    }
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if let Some(v) = f.f64_opt(key)? {
            return Err(PeftError::Unsupported(format!(
                "{key} = {v}: logit soft-capping is not implemented (Gemma 3 sets it to null)"
            )));
        }
    }
    if f.bool_opt("use_bidirectional_attention")?.unwrap_or(false) {
        return Err(PeftError::Unsupported(
            "use_bidirectional_attention = true (only causal Gemma 3 is supported)".into(),
        ));
    }
    Ok(())
}

/// `(rope_theta, rope_scaling, local theta)` of a Gemma 3 config, from transformers 5's
/// `rope_parameters.{full_attention, sliding_attention}` or the older `rope_theta`,
/// `rope_scaling` (full layers) and `rope_local_base_freq`.
pub(super) fn rope_config(f: &Fields<'_>) -> Result<(f64, Option<RopeScaling>, Option<f64>)> {
    let theta_of = |params: Option<&Value>, key: &str| -> Result<Option<f64>> {
        match params
            .and_then(|p| p.get("rope_theta"))
            .filter(|v| !v.is_null())
        {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                PeftError::config(
                    format!("rope_parameters.{key}.rope_theta"),
                    format!("expected a number, got {v}"),
                )
            }),
        }
    };
    let params = f.present("rope_parameters");
    let full = params.and_then(|p| p.get("full_attention"));
    let sliding = params.and_then(|p| p.get("sliding_attention"));
    let global = match theta_of(full, "full_attention")? {
        Some(t) => t,
        None => f.f64_opt("rope_theta")?.unwrap_or(GLOBAL_THETA),
    };
    let local = match theta_of(sliding, "sliding_attention")? {
        Some(t) => t,
        None => f.f64_opt("rope_local_base_freq")?.unwrap_or(LOCAL_THETA),
    };
    if parse_rope_scaling(sliding)?.is_some() {
        return Err(PeftError::Unsupported(
            "rope_parameters.sliding_attention: only the default RoPE is supported for Gemma 3's \
             sliding layers"
                .into(),
        ));
    }
    let scaling = match f.present("rope_scaling") {
        Some(v) => parse_rope_scaling(Some(v))?,
        None => parse_rope_scaling(full)?,
    };
    Ok((global, scaling, Some(local)))
}

/// Rewrites the Llama-style fields `to_hf_json` set into what `Gemma3TextConfig` reads.
pub(super) fn write_config(cfg: &LlamaConfig, obj: &mut Map<String, Value>) {
    let mut full = match obj.remove("rope_scaling") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    full.remove("type");
    full.entry("rope_type").or_insert(json!("default"));
    full.insert("rope_theta".into(), json!(cfg.rope_theta));
    let local = cfg.rope_local_theta.unwrap_or(LOCAL_THETA);
    for key in [
        "hidden_act",
        "rope_theta",
        "rope_local_base_freq",
        "sliding_window_pattern",
        "mlp_bias",
    ] {
        obj.remove(key);
    }
    let types: Vec<&str> = cfg
        .layer_types
        .iter()
        .map(|t| match t {
            LayerAttention::Full => "full_attention",
            LayerAttention::Sliding => "sliding_attention",
        })
        .collect();
    let mut set = |k: &str, v: Value| {
        obj.insert(k.to_string(), v);
    };
    set("hidden_activation", json!("gelu_pytorch_tanh"));
    set("head_dim", json!(cfg.head_dim));
    set("attention_bias", json!(cfg.qkv_bias));
    // Gemma3TextConfig declares an int and its strict validation refuses `24.0`.
    let scalar = match cfg.query_pre_attn_scalar {
        Some(v) if v.fract() == 0.0 && v > 0.0 && v < u64::MAX as f64 => json!(v as u64),
        other => json!(other),
    };
    set("query_pre_attn_scalar", scalar);
    set("sliding_window", json!(cfg.sliding_window));
    set("layer_types", json!(types));
    set(
        "rope_parameters",
        json!({
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }),
    );
}

/// A Gemma norm weight as the model keeps it: `1 + w` in f32.
pub(super) fn load_norm(b: &PeftBuilder<'_>, name: &str, size: usize) -> Result<Tensor> {
    let w = b.pp(name).get(size, "weight")?;
    Ok((w.to_dtype(DType::F32)? + 1.0)?)
}

/// The Hugging Face value `w` of a kept norm weight `1 + w`.
pub(super) fn export_norm(kept: &Tensor) -> Result<Tensor> {
    Ok((kept - 1.0)?)
}

/// `x · rsqrt(mean(x²) + ε) · (1 + w)` over the last dim, computed in f32 (as transformers'
/// `Gemma3RMSNorm`) and returned in `x`'s dtype; `one_plus_w` is the kept weight.
pub(super) fn gemma_norm(x: &Tensor, one_plus_w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return rms_norm(x, one_plus_w, eps);
    }
    Ok(rms_norm(&x.to_dtype(DType::F32)?, one_plus_w, eps)?.to_dtype(x.dtype())?)
}

/// The two norms a Gemma layer has around its MLP (Llama has one, before it).
#[derive(Clone, Debug)]
pub(super) struct GemmaFeedForwardNorms {
    pub(super) pre: Tensor,
    pub(super) post: Tensor,
}

impl GemmaFeedForwardNorms {
    pub(super) fn load(b: &PeftBuilder<'_>, cfg: &LlamaConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            pre: load_norm(b, "pre_feedforward_layernorm", h)?,
            post: load_norm(b, "post_feedforward_layernorm", h)?,
        })
    }
}

impl LlamaDecoderLayer {
    /// Gemma 3's layer (module docs): every sublayer's input and output normalised.
    pub(super) fn forward_gemma(
        &self,
        ffn: &GemmaFeedForwardNorms,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        kv: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let eps = self.eps;
        let normed = gemma_norm(x, &self.input_layernorm, eps)?;
        let attn = self.self_attn.forward(&normed, rope, mask, kv)?;
        let r = (x + gemma_norm(&attn, &self.post_attention_layernorm, eps)?)?;
        let mlp = self.mlp.forward(&gemma_norm(&r, &ffn.pre, eps)?)?;
        Ok((r + gemma_norm(&mlp, &ffn.post, eps)?)?)
    }
}
