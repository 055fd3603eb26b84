//! The parsing side of `config`: typed access to config.json fields, `rope_scaling` and the
//! per-layer attention spans (`layer_types`).

use serde_json::{Map, Value};

use super::config::{LayerAttention, LlamaArch, RopeScaling};
use crate::error::{PeftError, Result};

/// Typed access to config.json fields, with errors naming the field.
pub(super) struct Fields<'a>(pub(super) &'a Map<String, Value>);

impl Fields<'_> {
    pub(super) fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
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

    pub(super) fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| PeftError::config(key, "missing from config.json"))
    }

    pub(super) fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        match self.usize_opt(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| PeftError::config(key, format!("{n} is not a token id"))),
        }
    }

    pub(super) fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| PeftError::config(key, format!("expected a number, got {v}"))),
        }
    }

    pub(super) fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| PeftError::config(key, format!("expected true or false, got {v}"))),
        }
    }

    pub(super) fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| PeftError::config(key, format!("expected a string, got {v}"))),
        }
    }
}

pub(super) fn parse_rope_scaling(value: Option<&Value>) -> Result<Option<RopeScaling>> {
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

/// Each layer's attention span (see [`LlamaConfig::layer_types`]).
pub(super) fn layer_types(
    f: &Fields<'_>,
    arch: LlamaArch,
    layers: usize,
    window: Option<usize>,
) -> Result<Vec<LayerAttention>> {
    if window.is_none() {
        return Ok(vec![LayerAttention::Full; layers]);
    }
    if let Some(v) = f.present("layer_types") {
        let items = v.as_array().ok_or_else(|| {
            PeftError::config(
                "layer_types",
                format!("expected a list of strings, got {v}"),
            )
        })?;
        if items.len() != layers {
            return Err(PeftError::config(
                "layer_types",
                format!("{} entries for num_hidden_layers {layers}", items.len()),
            ));
        }
        return items
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(LayerAttention::Full),
                Some("sliding_attention") => Ok(LayerAttention::Sliding),
                _ => Err(PeftError::Unsupported(format!(
                    "layer_types entry {t} (supported: full_attention, sliding_attention)"
                ))),
            })
            .collect();
    }
    let sliding = |slides: bool| {
        if slides {
            LayerAttention::Sliding
        } else {
            LayerAttention::Full
        }
    };
    Ok(match arch {
        LlamaArch::Llama | LlamaArch::Mistral => vec![LayerAttention::Sliding; layers],
        // transformers' Qwen2Config: layers from `max_window_layers` on slide.
        LlamaArch::Qwen2 => {
            let from = f.usize_opt("max_window_layers")?.unwrap_or(28);
            (0..layers).map(|i| sliding(i >= from)).collect()
        }
        // Gemma3TextConfig: every `sliding_window_pattern`-th layer is full.
        LlamaArch::Gemma3 => {
            let pattern = f.usize_opt("sliding_window_pattern")?.unwrap_or(6);
            if pattern == 0 {
                return Err(PeftError::config(
                    "sliding_window_pattern",
                    "must be at least 1, got 0",
                ));
            }
            (0..layers)
                .map(|i| sliding(!(i + 1).is_multiple_of(pattern)))
                .collect()
        }
    })
}
