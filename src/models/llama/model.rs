//! [`LlamaForCausalLM`]: the decoder with its language-model head, its forwards (training,
//! hidden states, per-token losses, KV-cached generation) and its loading from a source.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::cache::KvCache;
use super::config::{LlamaArch, LlamaConfig};
use super::gemma;
use super::layers::{LlamaDecoderLayer, MaskSpan, RopeTables, attention_mask_for, rms_norm};
use crate::builder::PeftBuilder;
use crate::error::{PeftError, Result};
use crate::io::gguf::GgufModel;
use crate::io::source::{self, ModelSource, SourceKind};
use crate::layer::PeftLinear;
use crate::model::PeftModel;
use crate::models::{LoadOptions, Pretrained};
use crate::ops::{BaseDType, FrozenWeight};

/// A Llama-family decoder with its language-model head.
#[derive(Clone, Debug)]
pub struct LlamaForCausalLM {
    pub(super) embed_tokens: Tensor,
    pub(super) layers: Vec<LlamaDecoderLayer>,
    pub(super) norm: Tensor,
    /// `None` when the head is tied to `embed_tokens`.
    pub(super) lm_head: Option<PeftLinear>,
    rope_freqs: Vec<f32>,
    /// The sliding layers' frequencies when they differ (Gemma 3's local base).
    rope_freqs_local: Option<Vec<f32>>,
    pub(super) config: LlamaConfig,
}

/// Per forward: the attention masks and RoPE tables of the full and the sliding layers.
struct LayerInputs {
    full_mask: Option<Tensor>,
    sliding_mask: Option<Tensor>,
    rope: RopeTables,
    rope_local: Option<RopeTables>,
}

impl LayerInputs {
    fn for_layer(&self, layer: &LlamaDecoderLayer) -> (&RopeTables, Option<&Tensor>) {
        match layer.window() {
            Some(_) => (
                self.rope_local.as_ref().unwrap_or(&self.rope),
                self.sliding_mask.as_ref(),
            ),
            None => (&self.rope, self.full_mask.as_ref()),
        }
    }
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
            .map(|i| LlamaDecoderLayer::load(&layers_b.pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = match cfg.architecture {
            LlamaArch::Gemma3 => gemma::load_norm(&m, "norm", h)?,
            _ => m.pp("norm").get(h, "weight")?,
        };
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
            rope_freqs_local: cfg.rope_frequencies_local(),
            config: cfg.clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The decoder layers, in order.
    pub fn layers(&self) -> &[LlamaDecoderLayer] {
        &self.layers
    }

    /// The untied `lm_head` (`None` when tied to the embeddings).
    pub fn lm_head(&self) -> Option<&PeftLinear> {
        self.lm_head.as_ref()
    }

    /// The embedding table `[vocab, H]` (also the tied head).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The weights' dtype.
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
        Ok(())
    }

    /// The sliding layers' window, when any layer slides.
    fn sliding_window(&self) -> Option<usize> {
        self.layers.iter().find_map(LlamaDecoderLayer::window)
    }

    /// Masks and RoPE tables for queries at `offset..offset + seq_len`. `cached`: keys come from
    /// a KV cache, where a sliding layer keeps the last `window − 1` keys before this step; a
    /// single cached query sees every key its layer keeps, so it gets no mask.
    fn layer_inputs(
        &self,
        hidden: &Tensor,
        offset: usize,
        padding: Option<&[f32]>,
        cached: bool,
    ) -> Result<LayerInputs> {
        let seq_len = hidden.dim(1)?;
        let need_mask = !cached || seq_len > 1;
        let any_full = self.layers.iter().any(|l| l.window().is_none());
        let full_mask = if need_mask && any_full {
            let span = MaskSpan {
                offset,
                kv_start: 0,
                window: None,
            };
            Some(attention_mask_for(hidden, seq_len, span, padding)?)
        } else {
            None
        };
        let window = self.sliding_window();
        let sliding_mask = match window {
            Some(w) if need_mask => {
                let kept = if cached {
                    offset.min(w.saturating_sub(1))
                } else {
                    offset
                };
                let span = MaskSpan {
                    offset,
                    kv_start: offset - kept,
                    window: Some(w),
                };
                Some(attention_mask_for(hidden, seq_len, span, padding)?)
            }
            _ => None,
        };
        let device = hidden.device();
        let rope = RopeTables::new(&self.rope_freqs, offset, seq_len, device)?;
        let rope_local = match (&self.rope_freqs_local, window) {
            (Some(freqs), Some(_)) => Some(RopeTables::new(freqs, offset, seq_len, device)?),
            _ => None,
        };
        Ok(LayerInputs {
            full_mask,
            sliding_mask,
            rope,
            rope_local,
        })
    }

    fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        match self.config.architecture {
            LlamaArch::Gemma3 => gemma::gemma_norm(hidden, &self.norm, self.config.rms_norm_eps),
            _ => rms_norm(hidden, &self.norm, self.config.rms_norm_eps),
        }
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
        let h = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((bsz, seq_len, hidden))?;
        if self.config.architecture == LlamaArch::Gemma3 {
            // transformers multiplies by √H rounded to a float32 scalar, then to the weights' dtype.
            let scale = f64::from((hidden as f32).sqrt());
            return Ok(h.affine(scale, 0.0)?);
        }
        Ok(h)
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
        let inputs = self.layer_inputs(&hidden, 0, padding.as_deref(), false)?;
        for layer in &self.layers {
            let (rope, mask) = inputs.for_layer(layer);
            hidden = layer.forward(&hidden, rope, mask, None)?;
        }
        self.final_norm(&hidden)
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
    /// (`crate::ops::frozen_linear_cross_entropy`) that puts no `[N, vocab]` logits tensor in the graph.
    pub fn token_losses(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let frozen_head = match &self.lm_head {
            _ if hidden.dtype() != DType::F32 => None,
            None => (self.embed_tokens.dtype() == DType::F32)
                .then(|| (FrozenWeight::Dense(self.embed_tokens.clone()), None)),
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
            Some((weight, bias)) => crate::ops::frozen_linear_cross_entropy_weight(
                hidden,
                &weight,
                bias.as_ref(),
                targets,
            )?,
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
        let inputs = self.layer_inputs(&hidden, offset, None, true)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (rope, mask) = inputs.for_layer(layer);
            hidden = layer.forward(&hidden, rope, mask, Some(kv))?;
        }
        cache.len = offset + seq_len;
        let hidden = self.final_norm(&hidden)?;
        Ok(self.logits(&hidden)?.detach())
    }

    /// Loads any source into a [`PeftModel`] with no adapters: a Hugging Face folder (single or
    /// sharded safetensors), a hub id resolved through the cache, or a `.gguf` file
    /// (dequantised, q/k un-permuted; see `crate::io::gguf`). Weights are converted to `dtype`,
    /// except the linear weights, which `opts.base_dtype` keeps in their own type
    /// ([`BaseDType::Gguf`](crate::BaseDType::Gguf): a GGUF's blocks as the file has them).
    pub fn from_source(
        src: &ModelSource,
        dtype: DType,
        opts: impl Into<LoadOptions>,
    ) -> Result<(PeftModel<Self>, LlamaConfig)> {
        let LoadOptions { device, base_dtype } = opts.into();
        let device = &device;
        let mut stored = HashMap::new();
        let (cfg, vb) = match &src.kind {
            SourceKind::Gguf => {
                let gguf = GgufModel::open(&src.config)?;
                let cfg = LlamaConfig::from_json(&gguf.hf_config()?)?;
                let keep = |name: &str| {
                    base_dtype == BaseDType::Gguf
                        && (name.ends_with("_proj.weight") || name == "lm_head.weight")
                };
                let (tensors, kept) = gguf.hf_tensors_keeping(keep, dtype, device)?;
                stored = kept;
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
        let b = PeftBuilder::new(vb)
            .with_base_dtype(base_dtype)
            .with_stored_weights(stored);
        let model = Self::new(&cfg, &b)?;
        Ok((PeftModel::new(model, &b), cfg))
    }

    /// Resolves `spec` (folder, hub id or `.gguf` file) and loads it in f32, on the device and
    /// with the base dtype of `opts` (a `&Device`, or [`LoadOptions`]).
    pub fn from_pretrained(
        spec: &str,
        opts: impl Into<LoadOptions>,
    ) -> Result<Pretrained<Self, LlamaConfig>> {
        let source = source::resolve(spec)?;
        let (model, config) = Self::from_source(&source, DType::F32, opts)?;
        Ok(Pretrained {
            model,
            config,
            source,
        })
    }
}
