//! The decoder's building blocks: RoPE tables, the additive attention mask, grouped-query
//! self-attention, the SwiGLU MLP and the pre-norm decoder layer.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::cache::LayerKv;
use super::config::{LlamaArch, LlamaConfig};
use super::gemma::{self, GemmaFeedForwardNorms};
use crate::builder::PeftBuilder;
use crate::error::Result;
use crate::kernels::attention;
use crate::kernels::rope::RopeAngles;
use crate::layer::PeftLinear;
use crate::ops::{NormKind, swiglu};

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
    pub(super) fn new(freqs: &[f32], offset: usize, len: usize, device: &Device) -> Result<Self> {
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

impl RopeTables {
    /// The tables as the kernels read them.
    pub(crate) fn angles(&self) -> RopeAngles<'_> {
        RopeAngles {
            cos: &self.cos,
            sin: &self.sin,
            cos_values: &self.cos_values,
            sin_values: &self.sin_values,
        }
    }
}

/// `scale·RoPE(x)` for `x: [B, T, H, d]` at the tables' positions, as `[B, H, T, d]`.
fn apply_rope(x: &Tensor, tables: &RopeTables, scale: f64) -> Result<Tensor> {
    crate::kernels::rope::rope(x, &tables.angles(), scale)
}

/// Which keys the queries of one forward see: queries at positions `offset..offset + T`, keys
/// at positions `kv_start..offset + T` (a sliding layer's cache keeps only the last keys), and
/// the window of a sliding layer.
#[derive(Clone, Copy, Debug)]
pub(super) struct MaskSpan {
    pub(super) offset: usize,
    pub(super) kv_start: usize,
    pub(super) window: Option<usize>,
}

/// The additive attention mask `[B, 1, T, offset + T − kv_start]`: query `i` (position
/// `p = offset + i`) sees key `j` (position `q = kv_start + j`) when `q ≤ p`, `p − q < window`
/// (sliding layers; transformers' `kv_idx > q_idx − sliding_window`) and key `j` is not padding
/// (`padding` indexes keys from position 0). Masked entries hold the dtype's minimum once (never
/// summed, so a fully masked row stays finite).
pub(super) fn attention_mask(
    batch: usize,
    seq_len: usize,
    span: MaskSpan,
    padding: Option<&[f32]>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let MaskSpan {
        offset,
        kv_start,
        window,
    } = span;
    let total = offset + seq_len;
    let kv_len = total - kv_start.min(total);
    let min = crate::models::dtype_min(dtype) as f32;
    let mut mask = vec![0f32; batch * seq_len * kv_len];
    for b in 0..batch {
        for i in 0..seq_len {
            let row = &mut mask[(b * seq_len + i) * kv_len..(b * seq_len + i + 1) * kv_len];
            let p = offset + i;
            for (j, m) in row.iter_mut().enumerate() {
                let q = kv_start + j;
                let is_pad = padding.is_some_and(|pad| pad[b * total + q] == 0.0);
                let outside = window.is_some_and(|w| q + w <= p);
                if q > p || outside || is_pad {
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

pub(super) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(crate::ops::norm(x, weight, None, eps, NormKind::RmsNorm)?)
}

/// Self-attention with grouped-query heads and RoPE.
#[derive(Clone, Debug)]
pub struct LlamaAttention {
    /// `q_proj`: `H → n_h·d`.
    pub q_proj: PeftLinear,
    /// `k_proj`: `H → n_kv·d`.
    pub k_proj: PeftLinear,
    /// `v_proj`: `H → n_kv·d`.
    pub v_proj: PeftLinear,
    /// `o_proj`: `n_h·d → H`.
    pub o_proj: PeftLinear,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
    /// The factor on `q·kᵀ`, folded into the queries.
    pub(super) scale: f64,
    /// Gemma's per-head q/k norms (`1 + w`, f32) and their epsilon.
    pub(super) qk_norms: Option<(Tensor, Tensor, f64)>,
    /// A sliding layer's window: its cache keeps only the keys a later query can see.
    pub(super) window: Option<usize>,
}

impl LlamaAttention {
    pub(super) fn load(b: &PeftBuilder<'_>, cfg: &LlamaConfig, index: usize) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_attention_heads * d;
        let qk_norms = match cfg.architecture {
            LlamaArch::Gemma3 => Some((
                gemma::load_norm(b, "q_norm", d)?,
                gemma::load_norm(b, "k_norm", d)?,
                cfg.rms_norm_eps,
            )),
            _ => None,
        };
        let kv_out = cfg.num_key_value_heads * d;
        Ok(Self {
            q_proj: b.linear(h, q_out, cfg.qkv_bias, "q_proj")?,
            k_proj: b.linear(h, kv_out, cfg.qkv_bias, "k_proj")?,
            v_proj: b.linear(h, kv_out, cfg.qkv_bias, "v_proj")?,
            o_proj: b.linear(q_out, h, cfg.o_bias, "o_proj")?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            scale: cfg.attention_scale(),
            qk_norms,
            window: cfg.layer_window(index),
        })
    }

    /// `x: [B, T, H]`; `mask`: additive `[B, 1, T, T_kv]` or none (a single query over the
    /// whole cache). With `kv`, the new keys/values are appended to the layer's cache.
    pub(super) fn forward(
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
        let (q, k) = match &self.qk_norms {
            Some((qn, kn, eps)) => (
                gemma::gemma_norm(&q, qn, *eps)?,
                gemma::gemma_norm(&k, kn, *eps)?,
            ),
            None => (q, k),
        };
        // The scale is folded into the queries: a [B, n_h, T, d] pass instead of one over the
        // scores.
        let q = apply_rope(&q, rope, self.scale)?;
        let k = apply_rope(&k, rope, 1.0)?;
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
                *slot = kept_keys(&k, &v, self.window)?;
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

/// What a sliding layer's cache keeps after a step: the last `window − 1` keys and values, all a
/// later query can see besides its own (every key for a full layer). Detached: no graph is kept
/// across steps.
fn kept_keys(k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<LayerKv> {
    let len = k.dim(2)?;
    let keep = window.map_or(len, |w| len.min(w.saturating_sub(1)));
    if keep == 0 {
        return Ok(None);
    }
    let (k, v) = if keep < len {
        (
            k.narrow(2, len - keep, keep)?.contiguous()?,
            v.narrow(2, len - keep, keep)?.contiguous()?,
        )
    } else {
        (k.clone(), v.clone())
    };
    Ok(Some((k.detach(), v.detach())))
}

/// The feed-forward block: SwiGLU (`down(silu(gate) ⊙ up)`), or Gemma's GELU-tanh variant.
#[derive(Clone, Debug)]
pub struct LlamaMlp {
    /// `gate_proj`: `H → intermediate`, through SiLU.
    pub gate_proj: PeftLinear,
    /// `up_proj`: `H → intermediate`.
    pub up_proj: PeftLinear,
    /// `down_proj`: `intermediate → H`.
    pub down_proj: PeftLinear,
    /// `down(gelu_tanh(gate) ⊙ up)` (Gemma) instead of SiLU.
    pub(super) gelu: bool,
}

impl LlamaMlp {
    pub(super) fn load(b: &PeftBuilder<'_>, cfg: &LlamaConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: b.linear(h, i, cfg.mlp_bias, "gate_proj")?,
            up_proj: b.linear(h, i, cfg.mlp_bias, "up_proj")?,
            down_proj: b.linear(i, h, cfg.mlp_bias, "down_proj")?,
            gelu: cfg.architecture == LlamaArch::Gemma3,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward_peft(x)?;
        let up = self.up_proj.forward_peft(x)?;
        if self.gelu {
            return self.down_proj.forward_peft(&crate::ops::geglu(&gate, &up)?);
        }
        self.down_proj.forward_peft(&swiglu(&gate, &up)?)
    }
}

/// One pre-norm decoder layer.
#[derive(Clone, Debug)]
pub struct LlamaDecoderLayer {
    /// `self_attn`.
    pub self_attn: LlamaAttention,
    /// `mlp`.
    pub mlp: LlamaMlp,
    /// Llama: before the attention and before the MLP; Gemma: before and after the attention
    /// (`1 + w`, f32).
    pub(super) input_layernorm: Tensor,
    pub(super) post_attention_layernorm: Tensor,
    /// Gemma's norms before and after the MLP.
    pub(super) gemma_ffn: Option<GemmaFeedForwardNorms>,
    pub(super) eps: f64,
}

impl LlamaDecoderLayer {
    pub(super) fn load(b: &PeftBuilder<'_>, cfg: &LlamaConfig, index: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let gemma = cfg.architecture == LlamaArch::Gemma3;
        let norm = |name: &str| -> Result<Tensor> {
            if gemma {
                gemma::load_norm(b, name, h)
            } else {
                b.pp(name).get(h, "weight")
            }
        };
        Ok(Self {
            self_attn: LlamaAttention::load(&b.pp("self_attn"), cfg, index)?,
            mlp: LlamaMlp::load(&b.pp("mlp"), cfg)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            gemma_ffn: if gemma {
                Some(GemmaFeedForwardNorms::load(b, cfg)?)
            } else {
                None
            },
            eps: cfg.rms_norm_eps,
        })
    }

    /// The layer's sliding window (`None`: full attention).
    pub fn window(&self) -> Option<usize> {
        self.self_attn.window
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        kv: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        if let Some(ffn) = &self.gemma_ffn {
            return self.forward_gemma(ffn, x, rope, mask, kv);
        }
        let fused_attn = match kv {
            // Generation appends to the cache: the separate ops below do that.
            Some(_) => None,
            None => fused_attention_block(
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
            fused_mlp_block(&attn, &self.post_attention_layernorm, self.eps, &self.mlp)?
        {
            return Ok(out);
        }
        let normed = rms_norm(&attn, &self.post_attention_layernorm, self.eps)?;
        Ok((self.mlp.forward(&normed)? + attn)?)
    }
}

pub(super) fn attention_mask_for(
    hidden: &Tensor,
    seq_len: usize,
    span: MaskSpan,
    padding: Option<&[f32]>,
) -> Result<Tensor> {
    let bsz = hidden.dim(0)?;
    attention_mask(bsz, seq_len, span, padding, hidden.dtype(), hidden.device())
}

/// `x + self_attn(RMSNorm(x)·γ)` as one op when `x` is CPU f32 and each projection is a frozen
/// linear with at most one LoRA delta; `None` sends the caller to the separate ops.
fn fused_attention_block(
    x: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    attn: &LlamaAttention,
    rope: &RopeTables,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !cpu_f32(x) || !cpu_f32(norm_weight) || mask.is_some_and(|m| !cpu_f32(m)) {
        return Ok(None);
    }
    let layers = [&attn.q_proj, &attn.k_proj, &attn.v_proj, &attn.o_proj];
    let [Some(q), Some(k), Some(v), Some(o)] = layers.map(|l| l.handle().fused_parts()) else {
        return Ok(None);
    };
    let heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
    crate::kernels::attn_block::block_forward(
        x,
        norm_weight,
        eps,
        [q, k, v, o],
        heads,
        &rope.angles(),
        mask,
    )
}

/// `h + mlp(RMSNorm(h)·γ)` as one op when `h` is CPU f32 and each of the MLP's layers is a
/// frozen linear with at most one LoRA delta; `None` sends the caller to the separate ops.
fn fused_mlp_block(
    h: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    mlp: &LlamaMlp,
) -> Result<Option<Tensor>> {
    if !h.device().is_cpu() || h.dtype() != DType::F32 || norm_weight.dtype() != DType::F32 {
        return Ok(None);
    }
    let parts = [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj].map(|l| l.handle().fused_parts());
    let [Some(gate), Some(up), Some(down)] = parts else {
        return Ok(None);
    };
    crate::kernels::mlp_block::block_forward(h, norm_weight, eps, [gate, up, down])
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::rope::rope_reference;
    use crate::kernels::test_values::{grid_values as values, max_diff};

    /// `(Σ w ⊙ f(x), dL/dx)` for a fixed weighting `w` of the output.
    fn grad_of(x: &Var, y: &Tensor, seed: usize) -> Tensor {
        let w = Tensor::from_vec(values(y.elem_count(), seed), y.shape(), &Device::Cpu).unwrap();
        let loss = (y * w).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
    }

    #[test]
    fn rope_matches_the_plain_ops_forward_and_backward() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = Var::from_vec(values(b * t * h * d, 1), (b, t, h, d), &Device::Cpu).unwrap();
        let tables = RopeTables::new(&[1.0, 0.3, 0.05, 0.01], 3, t, &Device::Cpu).unwrap();
        let fused = apply_rope(&x, &tables, 0.7).unwrap();
        let plain = rope_reference(&x, &tables.cos, &tables.sin, 0.7).unwrap();
        assert_eq!(fused.dims(), &[b, h, t, d]);
        assert!(max_diff(&fused, &plain) < 1e-6);
        // Position 3 (the first of the table) rotates pair (0, 4) of head 0 by 3 rad, scaled.
        let x0 = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y0 = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (c, s) = (3f32.cos(), 3f32.sin());
        assert!((y0[0] - 0.7 * (x0[0] * c - x0[4] * s)).abs() < 1e-6);
        let g_fused = grad_of(&x, &fused, 2);
        let g_plain = grad_of(&x, &plain, 2);
        assert!(max_diff(&g_fused, &g_plain) < 1e-6);
    }
}
