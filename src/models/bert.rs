//! BERT (transformers' `BertModel`), built through [`PeftBuilder`] so that every linear layer is
//! adaptable, with Hugging Face weight names and `config.json`.
//!
//! Weight names: `embeddings.{word,position,token_type}_embeddings.weight`,
//! `embeddings.LayerNorm.{weight,bias}`, `encoder.layer.N.attention.self.{query,key,value}`,
//! `encoder.layer.N.attention.output.{dense,LayerNorm}`, `encoder.layer.N.intermediate.dense`,
//! `encoder.layer.N.output.{dense,LayerNorm}`, and `pooler.dense` when the checkpoint has one.
//! A checkpoint saved from a task model (`BertForSequenceClassification`, …) carries a `bert.`
//! prefix; it is detected and kept, so layer names (and PEFT adapter keys) are
//! `bert.encoder.layer.N.…`, as PEFT names them for that model.
//!
//! The forward uses only ops with a backward (`crate::ops::{norm, attention_core, gelu_erf}`,
//! whose backward gives only the input gradients since norm weights and masks are frozen), so
//! gradients reach every adapter. The attention mask is
//! additive as in transformers: masked keys get `(1 - mask) · finfo(dtype).min`.
//! Dropout is not applied (the forward is transformers' `eval()` forward); adapters apply their
//! own dropout in training.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::builder::PeftBuilder;
use crate::error::{PeftError, Result};
use crate::io::source::{self, ModelSource};
use crate::layer::PeftLinear;
use crate::model::PeftModel;
use crate::models::{LoadOptions, Pretrained};

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

/// LayerNorm over the last dim, with a backward for the input only (`crate::ops::norm`).
#[derive(Clone, Debug)]
pub struct BertLayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl BertLayerNorm {
    /// Loads `LayerNorm.{weight,bias}` (or the old `gamma`/`beta` names) under `b`.
    fn load(b: &PeftBuilder<'_>, size: usize, eps: f64) -> Result<Self> {
        let b = b.pp("LayerNorm");
        let (w, bias) = if !b.contains("weight") && b.contains("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(Self {
            weight: b.get(size, w)?,
            bias: b.get(size, bias)?,
            eps,
        })
    }

    /// `(x − mean) / √(var + eps) · weight + bias` over the last dim.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::norm(
            x,
            &self.weight,
            Some(&self.bias),
            self.eps,
            crate::ops::NormKind::LayerNorm,
        )?)
    }
}

/// Word, position and token-type embeddings, summed and layer-normed.
#[derive(Clone, Debug)]
pub struct BertEmbeddings {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    layer_norm: BertLayerNorm,
}

impl BertEmbeddings {
    fn load(b: &PeftBuilder<'_>, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word_embeddings: b.pp("word_embeddings").get((cfg.vocab_size, h), "weight")?,
            position_embeddings: b
                .pp("position_embeddings")
                .get((cfg.max_position_embeddings, h), "weight")?,
            token_type_embeddings: b
                .pp("token_type_embeddings")
                .get((cfg.type_vocab_size, h), "weight")?,
            layer_norm: BertLayerNorm::load(b, h, cfg.layer_norm_eps)?,
        })
    }

    /// `LayerNorm(word[ids] + token_type[tt] + position[0..T])`, `ids: [B, T]` → `[B, T, H]`.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<Tensor> {
        let (bsz, seq_len) = input_ids.dims2()?;
        let max_pos = self.position_embeddings.dim(0)?;
        if seq_len > max_pos {
            return Err(PeftError::ShapeMismatch {
                key: "input_ids".into(),
                expected: vec![bsz, max_pos],
                got: vec![bsz, seq_len],
            });
        }
        let hidden = self.word_embeddings.dim(1)?;
        let words = self
            .word_embeddings
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((bsz, seq_len, hidden))?;
        let embeddings = match token_type_ids {
            Some(tt) => {
                if tt.dims() != input_ids.dims() {
                    return Err(PeftError::ShapeMismatch {
                        key: "token_type_ids".into(),
                        expected: input_ids.dims().to_vec(),
                        got: tt.dims().to_vec(),
                    });
                }
                let types = self
                    .token_type_embeddings
                    .index_select(&tt.flatten_all()?, 0)?
                    .reshape((bsz, seq_len, hidden))?;
                (words + types)?
            }
            // transformers' default: every token has type 0.
            None => words.broadcast_add(&self.token_type_embeddings.get(0)?)?,
        };
        let positions = self.position_embeddings.narrow(0, 0, seq_len)?;
        let embeddings = embeddings.broadcast_add(&positions)?;
        self.layer_norm.forward(&embeddings)
    }
}

/// Multi-head self-attention (`attention.self`).
#[derive(Clone, Debug)]
pub struct BertSelfAttention {
    /// `query`.
    pub query: PeftLinear,
    /// `key`.
    pub key: PeftLinear,
    /// `value`.
    pub value: PeftLinear,
    num_heads: usize,
    head_dim: usize,
}

impl BertSelfAttention {
    fn load(b: &PeftBuilder<'_>, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            query: b.linear(h, h, true, "query")?,
            key: b.linear(h, h, true, "key")?,
            value: b.linear(h, h, true, "value")?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x: [B, T, H]`, `mask`: additive, `[B | 1, 1, 1 | T, T]` (what
    /// [`extended_attention_mask`] gives); another shape is an error naming it.
    ///
    /// The attention after the projections is one fused op
    /// ([`crate::ops::attention_core_projected`]): as separate candle ops (the scaling, the head
    /// split, two matmuls, the softmax) every node costs the backward an activation-sized
    /// zero-fill and add, and the scores and probabilities stay alive until the backward.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let bsz = x.dim(0)?;
        let mask = match mask {
            // One mask for the whole batch: the core takes one per batch row.
            Some(m) if m.rank() == 4 && m.dim(0)? == 1 && bsz > 1 => {
                let (_, mh, mq, mk) = m.dims4()?;
                Some(m.broadcast_as((bsz, mh, mq, mk))?)
            }
            m => m.cloned(),
        };
        crate::ops::attention_core_projected(
            &self.query.forward_peft(x)?,
            &self.key.forward_peft(x)?,
            &self.value.forward_peft(x)?,
            mask.as_ref(),
            (self.num_heads, self.num_heads),
            1.0 / (self.head_dim as f64).sqrt(),
        )
    }
}

/// One post-norm encoder layer: self-attention, then the feed-forward block.
#[derive(Clone, Debug)]
pub struct BertLayer {
    /// `attention.self`.
    pub attention: BertSelfAttention,
    /// `attention.output.dense`
    pub attention_output: PeftLinear,
    attention_norm: BertLayerNorm,
    /// `intermediate.dense`
    pub intermediate: PeftLinear,
    /// `output.dense`
    pub output: PeftLinear,
    output_norm: BertLayerNorm,
    act: HiddenAct,
}

impl BertLayer {
    fn load(b: &PeftBuilder<'_>, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = b.pp("attention");
        let attn_out = attn.pp("output");
        let out = b.pp("output");
        Ok(Self {
            attention: BertSelfAttention::load(&attn.pp("self"), cfg)?,
            attention_output: attn_out.linear(h, h, true, "dense")?,
            attention_norm: BertLayerNorm::load(&attn_out, h, cfg.layer_norm_eps)?,
            intermediate: b
                .pp("intermediate")
                .linear(h, cfg.intermediate_size, true, "dense")?,
            output: out.linear(cfg.intermediate_size, h, true, "dense")?,
            output_norm: BertLayerNorm::load(&out, h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
        })
    }

    /// `x: [B, T, H]` → `[B, T, H]`; `mask`: additive, `[B | 1, 1, 1 | T, T]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let context = self.attention.forward(x, mask)?;
        let attn = self.attention_output.forward_peft(&context)?;
        let attn = self.attention_norm.forward(&(attn + x)?)?;
        let inter = self.act.forward(&self.intermediate.forward_peft(&attn)?)?;
        let out = self.output.forward_peft(&inter)?;
        self.output_norm.forward(&(out + attn)?)
    }
}

/// transformers' `BertModel`: embeddings, encoder and (when the checkpoint has one) the pooler.
#[derive(Clone, Debug)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pooler: Option<PeftLinear>,
    config: BertConfig,
    prefix: String,
}

impl BertModel {
    /// Builds the model from `b`. Weight names have no prefix, or `bert.` when the checkpoint
    /// was saved from a task model (then layer names keep the prefix). The pooler is loaded when
    /// `pooler.dense.weight` is present.
    pub fn load(b: &PeftBuilder<'_>, cfg: &BertConfig) -> Result<Self> {
        cfg.validate()?;
        const PROBE: &str = "embeddings.word_embeddings.weight";
        let mut prefix = String::new();
        if !b.contains(PROBE) {
            let mut candidates = vec!["bert".to_string()];
            if let Some(mt) = cfg.model_type.as_ref().filter(|mt| mt.as_str() != "bert") {
                candidates.push(mt.clone());
            }
            if let Some(p) = candidates
                .into_iter()
                .find(|p| b.contains(&format!("{p}.{PROBE}")))
            {
                prefix = p;
            }
        }
        let root = if prefix.is_empty() {
            b.clone()
        } else {
            b.pp(&prefix)
        };
        let embeddings = BertEmbeddings::load(&root.pp("embeddings"), cfg)?;
        let encoder = root.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(&encoder.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let pooler_b = root.pp("pooler");
        let pooler = if pooler_b.contains("dense.weight") {
            Some(pooler_b.linear(cfg.hidden_size, cfg.hidden_size, true, "dense")?)
        } else {
            None
        };
        Ok(Self {
            embeddings,
            layers,
            pooler,
            config: cfg.clone(),
            prefix,
        })
    }

    /// Loads a resolved model (`config.json` + safetensors weights, memory-mapped) in `dtype` on
    /// `device`, wrapped in a [`PeftModel`] with no adapters yet.
    pub fn from_source(
        source: &ModelSource,
        dtype: DType,
        opts: impl Into<LoadOptions>,
    ) -> Result<(PeftModel<Self>, BertConfig)> {
        let LoadOptions { device, base_dtype } = opts.into();
        let device = &device;
        let cfg = BertConfig::from_file(&source.config)?;
        // SAFETY: the weight files are memory-mapped only while the model is built; every tensor
        // is copied out of the map by `VarBuilder::get`. Files changed by another process during
        // that window are outside what the library can guard against (as for every mmap loader).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&source.weights, dtype, device) }
            .map_err(|e| PeftError::Safetensors {
                path: source.weights.first().cloned().unwrap_or_default(),
                reason: e.to_string(),
            })?;
        let b = PeftBuilder::new(vb).with_base_dtype(base_dtype);
        let model = Self::load(&b, &cfg)?;
        Ok((PeftModel::new(model, &b), cfg))
    }

    /// Loads a local model folder in f32 on `device`.
    pub fn from_dir(
        dir: impl AsRef<Path>,
        device: &Device,
    ) -> Result<(PeftModel<Self>, BertConfig)> {
        let source = source::resolve_local(dir.as_ref())?;
        Self::from_source(&source, DType::F32, device)
    }

    /// Loads a local folder or a hub id (hub cache first; `HF_HUB_OFFLINE=1` means cache only)
    /// in f32, on the device and with the base dtype of `opts` (a `&Device`, or
    /// [`LoadOptions`]).
    pub fn from_pretrained(
        model: &str,
        opts: impl Into<LoadOptions>,
    ) -> Result<Pretrained<Self, BertConfig>> {
        let source = source::resolve(model)?;
        let (model, config) = Self::from_source(&source, DType::F32, opts)?;
        Ok(Pretrained {
            model,
            config,
            source,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// `""`, or `"bert"` when the weights carry that prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The embedding block.
    pub fn embeddings(&self) -> &BertEmbeddings {
        &self.embeddings
    }

    /// The encoder layers, in order.
    pub fn layers(&self) -> &[BertLayer] {
        &self.layers
    }

    /// `pooler.dense`, when the checkpoint has one.
    pub fn pooler(&self) -> Option<&PeftLinear> {
        self.pooler.as_ref()
    }

    /// Every linear layer in build order (name: `layer.handle().name()`).
    pub fn linears(&self) -> Vec<&PeftLinear> {
        let mut out = Vec::with_capacity(self.layers.len() * 6 + 1);
        for l in &self.layers {
            out.extend([
                &l.attention.query,
                &l.attention.key,
                &l.attention.value,
                &l.attention_output,
                &l.intermediate,
                &l.output,
            ]);
        }
        out.extend(self.pooler.as_ref());
        out
    }

    /// `last_hidden_state: [B, T, H]` for `input_ids: [B, T]` (u8, u32 or i64).
    /// `token_type_ids` defaults to zeros; `attention_mask` (`[B, T]`, 1 = attend, 0 = padding,
    /// any dtype; or `[B, T, T]`) to all ones.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut hidden = self.embeddings.forward(input_ids, token_type_ids)?;
        let mask = match attention_mask {
            Some(m) => Some(extended_attention_mask(
                m,
                input_ids.dims(),
                hidden.dtype(),
            )?),
            None => None,
        };
        for layer in &self.layers {
            hidden = layer.forward(&hidden, mask.as_ref())?;
        }
        Ok(hidden)
    }

    /// transformers' pooler: `tanh(dense(hidden[:, 0]))`, `[B, H]`. An error when the checkpoint
    /// has no pooler.
    pub fn pooler_output(&self, hidden: &Tensor) -> Result<Tensor> {
        let pooler = self
            .pooler
            .as_ref()
            .ok_or_else(|| PeftError::MissingTensor {
                key: format!("{}pooler.dense.weight", self.key_prefix()),
                location: "the model weights".into(),
            })?;
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(pooler.forward_peft(&first)?.tanh()?)
    }

    fn key_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}.", self.prefix)
        }
    }
}

/// The most negative finite value of `dtype` (`torch.finfo(dtype).min`).
fn dtype_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895313892515355e38,
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// transformers' `get_extended_attention_mask`: `[B, T]` (or `[B, T, T]`) of 1/0 →
/// `(1 - mask) · finfo(dtype).min`, shaped `[B, 1, 1, T]` (or `[B, 1, T, T]`).
pub fn extended_attention_mask(mask: &Tensor, ids_dims: &[usize], dtype: DType) -> Result<Tensor> {
    let mask = match mask.rank() {
        2 => {
            if mask.dims() != ids_dims {
                return Err(PeftError::ShapeMismatch {
                    key: "attention_mask".into(),
                    expected: ids_dims.to_vec(),
                    got: mask.dims().to_vec(),
                });
            }
            mask.unsqueeze(1)?.unsqueeze(1)?
        }
        3 => mask.unsqueeze(1)?,
        _ => {
            return Err(PeftError::ShapeMismatch {
                key: "attention_mask".into(),
                expected: ids_dims.to_vec(),
                got: mask.dims().to_vec(),
            });
        }
    };
    let inverted = mask.to_dtype(DType::F32)?.affine(-1.0, 1.0)?;
    Ok(inverted.affine(dtype_min(dtype), 0.0)?.to_dtype(dtype)?)
}

/// Masked mean pooling over the sequence (sentence-transformers' `mean` pooling):
/// `Σ_t h[b,t]·m[b,t] / max(Σ_t m[b,t], 1e-9)`, `[B, T, H]` → `[B, H]`. Without a mask, the plain
/// mean over `T`.
pub fn mean_pool(hidden: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
    let (bsz, seq_len, _) = hidden.dims3()?;
    let Some(mask) = attention_mask else {
        return Ok(hidden.mean(1)?);
    };
    if mask.dims() != [bsz, seq_len] {
        return Err(PeftError::ShapeMismatch {
            key: "attention_mask".into(),
            expected: vec![bsz, seq_len],
            got: mask.dims().to_vec(),
        });
    }
    let mask = mask.to_dtype(hidden.dtype())?.reshape((bsz, seq_len, 1))?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.maximum(1e-9)?;
    Ok(summed.broadcast_div(&counts)?)
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

    #[test]
    fn mask_values() {
        let m = Tensor::new(&[[1i64, 1, 0]], &Device::Cpu).unwrap();
        let e = extended_attention_mask(&m, &[1, 3], DType::F32).unwrap();
        assert_eq!(e.dims(), &[1, 1, 1, 3]);
        let v = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0.0, 0.0, f32::MIN]);
    }

    #[test]
    fn mean_pool_ignores_padding() {
        let h = Tensor::new(&[[[1f32, 2.], [3., 4.], [100., 100.]]], &Device::Cpu).unwrap();
        let m = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
        let p = mean_pool(&h, Some(&m)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(p, vec![vec![2.0, 3.0]]);
    }
}
