//! transformers' `BertConfig` and the feed-forward activations it names.

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// `hidden_act` of a BERT config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HiddenAct {
    /// transformers' `gelu`: the exact, erf-based GELU.
    #[default]
    #[serde(rename = "gelu", alias = "gelu_python")]
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// `max(x, 0)`.
    #[serde(rename = "relu")]
    Relu,
    /// `x · sigmoid(x)` (`silu`, `swish`).
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl HiddenAct {
    /// Applies the activation elementwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            HiddenAct::Gelu => crate::ops::gelu_erf(x)?,
            HiddenAct::GeluNew => x.gelu()?,
            HiddenAct::Relu => x.relu()?,
            HiddenAct::Silu => x.silu()?,
        })
    }
}

fn default_vocab_size() -> usize {
    30522
}
fn default_hidden_size() -> usize {
    768
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    12
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_position_embeddings() -> usize {
    512
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_pad_token_id() -> Option<usize> {
    Some(0)
}
fn default_position_embedding_type() -> String {
    "absolute".to_string()
}

/// transformers' `BertConfig`, read from `config.json` (missing fields take transformers'
/// defaults; unknown fields are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Rows of the word embedding table (default 30522).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width `H` of the hidden states (default 768).
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Number of encoder layers (default 12).
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads; must divide `hidden_size` (default 12).
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer (default 3072).
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Feed-forward activation (default exact GELU).
    #[serde(default)]
    pub hidden_act: HiddenAct,
    /// Dropout on hidden states in transformers; here it only sets the classifier dropout when `classifier_dropout` is unset (default 0.1).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities in transformers; read and kept, not applied (default 0.1).
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Rows of the position embedding table: the longest sequence (default 512).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Rows of the token-type embedding table (default 2).
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// Standard deviation of freshly initialised weights (default 0.02).
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// LayerNorm epsilon (default 1e-12).
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// `pad_token_id` (default 0).
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<usize>,
    /// Only `absolute` is supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// Dropout before a classification head; `None` uses `hidden_dropout_prob`.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// `model_type`, kept for exports.
    #[serde(default)]
    pub model_type: Option<String>,
    /// `architectures`, kept for exports.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            hidden_size: default_hidden_size(),
            num_hidden_layers: default_num_hidden_layers(),
            num_attention_heads: default_num_attention_heads(),
            intermediate_size: default_intermediate_size(),
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: default_dropout(),
            attention_probs_dropout_prob: default_dropout(),
            max_position_embeddings: default_max_position_embeddings(),
            type_vocab_size: default_type_vocab_size(),
            initializer_range: default_initializer_range(),
            layer_norm_eps: default_layer_norm_eps(),
            pad_token_id: default_pad_token_id(),
            position_embedding_type: default_position_embedding_type(),
            classifier_dropout: None,
            model_type: Some("bert".to_string()),
            architectures: None,
        }
    }
}

impl BertConfig {
    /// Parses `config.json` content and checks it.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| PeftError::config("config.json", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and checks a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let cfg: Self = crate::io::read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the sizes are positive, the heads divide `hidden_size`, `layer_norm_eps` is
    /// finite and non-negative, and the position embedding type is supported.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(PeftError::config(field, "must be at least 1, got 0"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(PeftError::config(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(PeftError::config(
                "layer_norm_eps",
                format!(
                    "must be finite and non-negative, got {}",
                    self.layer_norm_eps
                ),
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(PeftError::Unsupported(format!(
                "BERT position_embedding_type `{}` (only \"absolute\" is supported)",
                self.position_embedding_type
            )));
        }
        Ok(())
    }

    /// Size of one attention head, `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_acts() {
        let cfg = BertConfig::from_json_str(r#"{"hidden_act": "gelu_new"}"#).unwrap();
        assert_eq!(cfg.hidden_act, HiddenAct::GeluNew);
        assert_eq!(cfg.hidden_size, 768);
        assert_eq!(cfg.layer_norm_eps, 1e-12);
        assert_eq!(cfg.pad_token_id, Some(0));
        let cfg = BertConfig::from_json_str(r#"{"hidden_act": "gelu_pytorch_tanh"}"#).unwrap();
        assert_eq!(cfg.hidden_act, HiddenAct::GeluNew);
        assert!(BertConfig::from_json_str(r#"{"hidden_act": "mish"}"#).is_err());
        assert!(BertConfig::from_json_str(r#"{"hidden_size": 100}"#).is_err());
        assert!(
            BertConfig::from_json_str(r#"{"position_embedding_type": "relative_key"}"#).is_err()
        );
    }
}
