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

use crate::builder::PeftBuilder;
use crate::error::{PeftError, Result};
use crate::io::source::{self, ModelSource};
use crate::kernels::encoder_blocks::{self, LayerNormParts};
use crate::layer::PeftLinear;
use crate::model::PeftModel;
use crate::models::{LoadOptions, Pretrained};

mod config;

pub use config::{BertConfig, HiddenAct};

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

    fn is_cpu_f32(&self) -> bool {
        cpu_f32(&self.weight) && cpu_f32(&self.bias)
    }

    /// The operands of a fused block's norm.
    fn parts(&self) -> LayerNormParts {
        LayerNormParts {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            eps: self.eps,
        }
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
        let mask = batch_mask(mask, x.dim(0)?)?;
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

/// The additive mask with one `[1 | T, T]` slice per batch row: the attention core takes one
/// per row, and a `[1, …]` mask is shared by the `bsz` rows.
fn batch_mask(mask: Option<&Tensor>, bsz: usize) -> Result<Option<Tensor>> {
    Ok(match mask {
        Some(m) if m.rank() == 4 && m.dim(0)? == 1 && bsz > 1 => {
            let (_, mh, mq, mk) = m.dims4()?;
            Some(m.broadcast_as((bsz, mh, mq, mk))?)
        }
        m => m.cloned(),
    })
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
    ///
    /// On the CPU in f32, with each linear layer a frozen weight (in any stored type) and at most
    /// one live LoRA delta, each half of the layer runs as one fused op
    /// (`kernels::encoder_blocks`): two graph nodes instead of twelve. Anything else (another
    /// adapter method, adapter dropout in training, another device or dtype, an activation
    /// other than the exact GELU for the second half) takes the separate ops below, which
    /// compute the same function.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let attn = match self.fused_attention(x, mask)? {
            Some(attn) => attn,
            None => self.attention_separate(x, mask)?,
        };
        match self.fused_feed_forward(&attn)? {
            Some(out) => Ok(out),
            None => self.feed_forward_separate(&attn),
        }
    }

    /// `LN(x + attention_output(attention(x)))` in separate ops.
    fn attention_separate(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let context = self.attention.forward(x, mask)?;
        let attn = self.attention_output.forward_peft(&context)?;
        self.attention_norm.forward(&(attn + x)?)
    }

    /// `LN(h + output(act(intermediate(h))))` in separate ops.
    fn feed_forward_separate(&self, h: &Tensor) -> Result<Tensor> {
        let inter = self.act.forward(&self.intermediate.forward_peft(h)?)?;
        let out = self.output.forward_peft(&inter)?;
        self.output_norm.forward(&(out + h)?)
    }

    /// The first half as one op, or `None` when it does not apply.
    fn fused_attention(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
        if !cpu_f32(x) || !self.attention_norm.is_cpu_f32() || mask.is_some_and(|m| !cpu_f32(m)) {
            return Ok(None);
        }
        let sa = &self.attention;
        let layers = [&sa.query, &sa.key, &sa.value, &self.attention_output];
        let [Some(q), Some(k), Some(v), Some(o)] = layers.map(|l| l.handle().fused_parts()) else {
            return Ok(None);
        };
        let mask = batch_mask(mask, x.dim(0)?)?;
        encoder_blocks::attention_block_forward(
            x,
            &self.attention_norm.parts(),
            [q, k, v, o],
            sa.num_heads,
            mask.as_ref(),
        )
    }

    /// The second half as one op, or `None` when it does not apply.
    fn fused_feed_forward(&self, attn: &Tensor) -> Result<Option<Tensor>> {
        if self.act != HiddenAct::Gelu || !cpu_f32(attn) || !self.output_norm.is_cpu_f32() {
            return Ok(None);
        }
        let parts = [&self.intermediate, &self.output].map(|l| l.handle().fused_parts());
        let [Some(up), Some(down)] = parts else {
            return Ok(None);
        };
        encoder_blocks::feed_forward_block_forward(attn, &self.output_norm.parts(), [up, down])
    }
}

fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
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
    Ok(inverted
        .affine(crate::models::dtype_min(dtype), 0.0)?
        .to_dtype(dtype)?)
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
    use std::collections::HashMap;

    use candle_core::Var;

    use super::*;
    use crate::LoraConfig;
    use crate::kernels::test_values::{max_abs, max_diff, tensor};

    /// A one-layer BERT (hidden 12, 3 heads, intermediate 20) with smooth weights, and LoRA
    /// (rank 2, non-zero factors) on `query`, `value` and the three `dense` layers.
    fn tiny_bert_with_lora() -> PeftModel<BertModel> {
        let cfg = BertConfig::from_json_str(
            r#"{"vocab_size": 32, "hidden_size": 12, "num_hidden_layers": 1,
                "num_attention_heads": 3, "intermediate_size": 20,
                "max_position_embeddings": 16}"#,
        )
        .unwrap();
        let (h, i) = (12, 20);
        let layer = "encoder.layer.0";
        let mut shapes = vec![
            ("embeddings.word_embeddings.weight".to_string(), vec![32, h]),
            ("embeddings.position_embeddings.weight".into(), vec![16, h]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ];
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            shapes.push((format!("{layer}.{name}.weight"), vec![out, inp]));
            shapes.push((format!("{layer}.{name}.bias"), vec![out]));
        }
        let mut tensors: HashMap<String, Tensor> = shapes
            .into_iter()
            .enumerate()
            .map(|(seed, (name, shape))| (name, tensor(&shape, seed as u32)))
            .collect();
        for (seed, norm) in ["embeddings", "encoder.layer.0.attention.output"]
            .into_iter()
            .chain(["encoder.layer.0.output"])
            .enumerate()
        {
            let gamma = tensor(&[h], 50 + seed as u32).affine(0.5, 1.0).unwrap();
            tensors.insert(format!("{norm}.LayerNorm.weight"), gamma);
            tensors.insert(
                format!("{norm}.LayerNorm.bias"),
                tensor(&[h], 60 + seed as u32),
            );
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let b = PeftBuilder::new(vb);
        let mut model = PeftModel::new(BertModel::load(&b, &cfg).unwrap(), &b);
        let lora = LoraConfig::new(&["query", "value", "dense"], 2, 4.0);
        model.add_adapter("default", lora).unwrap();
        for (seed, (_, var)) in model.trainable_vars().into_iter().enumerate() {
            let values = (tensor(var.dims(), 70 + seed as u32) * 0.3).unwrap();
            var.set(&values).unwrap();
        }
        model
    }

    /// The layer as two fused ops against the same layer in separate ops: output, dL/dx and
    /// every LoRA factor's gradient, with a mask per batch row and one shared by the batch.
    #[test]
    fn fused_layer_matches_the_separate_ops() {
        let model = tiny_bert_with_lora();
        model.train();
        let layer = &model.model().layers()[0];
        let vars = model.trainable_vars();
        assert_eq!(vars.len(), 10);
        let x = Var::from_tensor(&tensor(&[2, 5, 12], 1)).unwrap();
        let padding = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let per_row = extended_attention_mask(&padding, &[2, 5], DType::F32).unwrap();
        let shared = per_row.narrow(0, 1, 1).unwrap();
        let weights = tensor(&[2, 5, 12], 3);
        for mask in [Some(per_row), Some(shared), None] {
            let xt = x.as_tensor();
            let mask = mask.as_ref();
            let attn = layer.fused_attention(xt, mask).unwrap();
            let attn = attn.expect("f32 LoRA layers take the fused attention block");
            let fused = layer.fused_feed_forward(&attn).unwrap();
            let fused = fused.expect("f32 LoRA layers take the fused feed-forward block");
            let separate = layer
                .feed_forward_separate(&layer.attention_separate(xt, mask).unwrap())
                .unwrap();
            let scale = max_abs(&separate);
            assert!(max_diff(&fused, &separate) <= 1e-5 * scale);
            let grads = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap().backward();
            let (fused_grads, separate_grads) = (grads(&fused).unwrap(), grads(&separate).unwrap());
            let all = std::iter::once(("x".to_string(), x.clone())).chain(vars.iter().cloned());
            for (name, v) in all {
                let f = fused_grads.get(v.as_tensor()).expect("fused gradient");
                let s = separate_grads
                    .get(v.as_tensor())
                    .expect("separate gradient");
                let scale = max_abs(s);
                assert!(scale > 0.0, "{name}: zero gradient");
                let d = max_diff(f, s);
                assert!(d <= 1e-5 * scale, "{name}: {d} (scale {scale})");
            }
        }
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
