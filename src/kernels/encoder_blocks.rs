//! The two halves of a post-norm encoder layer (BERT's) as one op each, with exact backwards.
//!
//! Shapes: `x: [B, T, H]`; `query`, `key`, `value`, `out`: `H → H` (`n` heads of `d = H/n`),
//! `up`: `H → I`, `down`: `I → H`, each a frozen linear with an optional LoRA delta whose
//! factors reach the op packed into one operand (see `block_layers`). `LN` is a layer norm over
//! the last dim with frozen `γ`, `β`; `M` the frozen additive mask `[B, 1, 1 | T, T]`.
//!
//! ```text
//! attention  q = query(x)·s,  k = key(x),  v = value(x)   (s = 1/√d; q, k split into heads)
//!            c = softmax(q kᵀ + M) v,  p = x + out(c),  y = LN(p)·γ + β
//!   backward dp = LN'ᵀ(dy);  dc = out'ᵀ(dp);  (dq, dk, dv) = attention'ᵀ(dc);  dq ← dq·s
//!            dx = dp + query'ᵀ(dq) + key'ᵀ(dk) + value'ᵀ(dv)
//! feed-fwd   u = up(y),  a = gelu(u),  p = y + down(a),  z = LN(p)·γ + β
//!   backward dp = LN'ᵀ(dz);  da = down'ᵀ(dp);  du = da ⊙ gelu'(u);  dy = dp + up'ᵀ(du)
//! ```
//! (`L'ᵀ(g) = g W + s (g B) A`, with the factors' gradients as in `linear_lora`.) The layer
//! norm is `norm`'s row arithmetic, the attention core `attention`'s, GELU `gelu`'s erf form.
//!
//! Why one op each: as separate ops a BERT layer is twelve graph nodes with sixteen
//! activation-sized edges, and candle's backward gives each edge an `add` (and each node's
//! first edge a `zeros_like`) on the calling thread while the other cores wait; here the layer
//! is two nodes. The ops keep what their backward reads (the split `q`, `k`, `v`, the context,
//! `u`, `a` and the pre-norm sums) from the forward, the memory the graph would hold for them
//! anyway; a second backward over the same graph recomputes them. On an input that tracks no
//! gradient (the first layer's) the backward skips the products only `dL/dx` needs. CPU and f32 activations
//! only (the weights in any type the frozen kernels read), and only when each layer is a
//! frozen linear with at most one LoRA delta; the caller checks that.

use std::sync::OnceLock;

use candle_core::Tensor;

use super::attention::{self, Split, from_heads, to_heads};
use super::block_layers::{BlockLayers, FusedLinearParts, add_into};
use super::blocks::zeros;
use super::gelu::{gelu_erf_grad_values, gelu_erf_values};
use super::norm::{NormKind, RowNorm};
use super::saved::{SavingKernel, SavingOp};
use super::slices::{with_optional_values, with_values};
use crate::error::Result;

const ATTENTION_OP: &str = "bert-attention-block";
const FEED_FORWARD_OP: &str = "bert-feed-forward-block";

/// A post-norm layer norm's frozen operands: `γ`, `β` (each `[H]`) and epsilon.
#[derive(Clone, Debug)]
pub(crate) struct LayerNormParts {
    /// `γ: [H]`.
    pub(crate) weight: Tensor,
    /// `β: [H]`.
    pub(crate) bias: Tensor,
    /// Added to the variance.
    pub(crate) eps: f64,
}

impl LayerNormParts {
    fn detached(&self) -> Result<Self> {
        Ok(Self {
            weight: self.weight.contiguous()?.detach(),
            bias: self.bias.contiguous()?.detach(),
            eps: self.eps,
        })
    }

    fn rows(&self) -> RowNorm {
        RowNorm {
            kind: NormKind::LayerNorm,
            eps: self.eps,
        }
    }

    /// `(γ, β)` as values, each checked to be `hidden` long.
    fn values(&self, op: &str, hidden: usize) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let read = |t: &Tensor, what: &str| {
            let v = with_values(op, what, t, |v| Ok(v.to_vec()))?;
            if v.len() != hidden {
                candle_core::bail!("{op}: {what} has {} values, hidden size {hidden}", v.len());
            }
            Ok(v)
        };
        Ok((
            read(&self.weight, "the norm weight")?,
            read(&self.bias, "the norm bias")?,
        ))
    }

    /// `LN(p)·γ + β`.
    fn forward(&self, op: &str, p: &[f32], hidden: usize) -> candle_core::Result<Vec<f32>> {
        let (gamma, beta) = self.values(op, hidden)?;
        Ok(self.rows().forward(p, &gamma, Some(&beta)))
    }

    /// `dL/dp` for the output gradient `dy`.
    fn backward(
        &self,
        op: &str,
        p: &[f32],
        dy: &[f32],
        hidden: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let (gamma, _) = self.values(op, hidden)?;
        Ok(self.rows().backward(p, dy, &gamma))
    }
}

/// Checks that `x` is rows of `hidden` values and `dout` (if any) has its length; the row count.
fn check_rows(
    op: &str,
    x: &[f32],
    dout: Option<&[f32]>,
    hidden: usize,
) -> candle_core::Result<usize> {
    if hidden == 0 || !x.len().is_multiple_of(hidden) {
        candle_core::bail!(
            "{op}: input of {} values is not rows of hidden size {hidden}",
            x.len()
        );
    }
    if let Some(d) = dout
        && d.len() != x.len()
    {
        candle_core::bail!(
            "{op}: output gradient of {} values for an input of {}",
            d.len(),
            x.len()
        );
    }
    Ok(x.len() / hidden)
}

/// What the attention block's backward reads, kept from its forward.
struct AttentionSaved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    context: Vec<f32>,
    pre_norm: Vec<f32>,
}

struct AttentionBlock {
    norm: LayerNormParts,
    split: Split,
    mask: Option<Tensor>,
    dims: attention::Dims,
    /// `query`, `key`, `value`, `out`.
    layers: BlockLayers,
    /// The attention core's tiling, from the mask on first use.
    plan: OnceLock<attention::Plan>,
}

impl AttentionBlock {
    fn hidden(&self) -> usize {
        self.split.heads * self.split.head_dim
    }

    fn query_scale(&self) -> f32 {
        1.0 / (self.split.head_dim as f32).sqrt()
    }

    fn with_mask<R>(
        &self,
        f: impl FnOnce(Option<&[f32]>, &attention::Plan) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        with_optional_values(ATTENTION_OP, "the mask", self.mask.as_ref(), |mask| {
            f(mask, self.plan.get_or_init(|| self.dims.plan(mask)))
        })
    }
}

impl SavingKernel for AttentionBlock {
    type Saved = AttentionSaved;

    const NAME: &'static str = ATTENTION_OP;

    fn forward(&self, x: &[f32], pack: &[f32]) -> candle_core::Result<(Vec<f32>, Self::Saved)> {
        let hidden = self.hidden();
        let rows = check_rows(ATTENTION_OP, x, None, hidden)?;
        if rows != self.split.batch * self.split.seq {
            candle_core::bail!(
                "{ATTENTION_OP}: {rows} rows of input, expected [{}, {}, {hidden}]",
                self.split.batch,
                self.split.seq
            );
        }
        self.layers.with_linears(pack, |linears| {
            let [q_l, k_l, v_l, o_l] = linears else {
                candle_core::bail!("{ATTENTION_OP}: expected four layers");
            };
            let q = to_heads(&q_l.forward(x, rows)?, self.split, self.query_scale());
            let k = to_heads(&k_l.forward(x, rows)?, self.split, 1.0);
            let v = v_l.forward(x, rows)?;
            let context = self.with_mask(|mask, plan| self.dims.forward(plan, &q, &k, &v, mask))?;
            let mut pre_norm = o_l.forward(&context, rows)?;
            add_into(&mut pre_norm, x);
            let out = self.norm.forward(ATTENTION_OP, &pre_norm, hidden)?;
            let saved = AttentionSaved {
                q,
                k,
                v,
                context,
                pre_norm,
            };
            Ok((out, saved))
        })
    }

    fn backward(
        &self,
        x: &[f32],
        pack: &[f32],
        dout: &[f32],
        saved: Self::Saved,
        need_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let hidden = self.hidden();
        let rows = check_rows(ATTENTION_OP, x, Some(dout), hidden)?;
        let AttentionSaved {
            q,
            k,
            v,
            context,
            pre_norm,
        } = saved;
        let dpre = self.norm.backward(ATTENTION_OP, &pre_norm, dout, hidden)?;
        drop(pre_norm);
        let mut dpack = vec![0f32; pack.len()];
        let mut dx = self.layers.with_linears(pack, |linears| {
            let [_, _, _, o_l] = linears else {
                candle_core::bail!("{ATTENTION_OP}: expected four layers");
            };
            let mut dcontext = zeros(context.len());
            let grads = o_l.backward(&context, &dpre, rows, &mut dcontext, false)?;
            self.layers.put_grads(&mut dpack, 3, grads)?;
            drop(context);
            let (dq, dk, dv) =
                self.with_mask(|mask, plan| self.dims.backward(plan, &q, &k, &v, mask, &dcontext))?;
            drop((q, k, v, dcontext));
            // d(s·q)/dq = s.
            let dq = from_heads(&dq, self.split, self.query_scale());
            let dk = from_heads(&dk, self.split, 1.0);
            let output_grads = [(0, &dq[..]), (1, &dk[..]), (2, &dv[..])];
            // Without need_dx the three products g·W for dL/dx are skipped, not the factors'
            // gradients.
            self.layers
                .shared_input_backward(linears, &mut dpack, x, rows, &output_grads, need_dx)
        })?;
        if need_dx {
            add_into(&mut dx, &dpre);
        }
        Ok((dx, dpack))
    }

    fn layers(&self) -> &BlockLayers {
        &self.layers
    }
}

/// `LN(x + out(attention(query(x), key(x), value(x))))·γ + β` as one op, on the layers'
/// operands (`query`, `key`, `value`, `out`), `heads` attention heads and the frozen additive
/// mask `[B, 1, 1 | T, T]` (already broadcast over the batch); `None` when the operands do not
/// fit each other (the separate ops then report the mismatch). CPU f32 activations only: the
/// caller checks that.
pub(crate) fn attention_block_forward(
    x: &Tensor,
    norm: &LayerNormParts,
    [query, key, value, out]: [FusedLinearParts; 4],
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (batch, seq, hidden) = x.dims3()?;
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Ok(None);
    }
    let split = Split {
        batch,
        seq,
        heads,
        head_dim: hidden / heads,
    };
    let (d, h) = (split.head_dim, hidden);
    let dims = attention::check_dims(
        &[batch, heads, seq, d],
        &[batch, heads, seq, d],
        &[batch, seq, heads, d],
        mask.map(|m| m.dims()),
        heads,
    )?;
    let parts = vec![
        ("query", query, (h, h)),
        ("key", key, (h, h)),
        ("value", value, (h, h)),
        ("out", out, (h, h)),
    ];
    let Some((layers, pack)) = BlockLayers::new(ATTENTION_OP, parts, x.device())? else {
        return Ok(None);
    };
    let op = AttentionBlock {
        norm: norm.detached()?,
        split,
        mask: mask
            .map(|m| m.contiguous().map(|m| m.detach()))
            .transpose()?,
        dims,
        layers,
        plan: OnceLock::new(),
    };
    Ok(Some(x.contiguous()?.apply_op2(&pack, SavingOp::new(op))?))
}

/// What the feed-forward block's backward reads, kept from its forward.
struct FeedForwardSaved {
    up: Vec<f32>,
    act: Vec<f32>,
    pre_norm: Vec<f32>,
}

struct FeedForwardBlock {
    norm: LayerNormParts,
    hidden: usize,
    /// `up` (`intermediate.dense`), `down` (`output.dense`).
    layers: BlockLayers,
}

impl SavingKernel for FeedForwardBlock {
    type Saved = FeedForwardSaved;

    const NAME: &'static str = FEED_FORWARD_OP;

    fn forward(&self, y: &[f32], pack: &[f32]) -> candle_core::Result<(Vec<f32>, Self::Saved)> {
        let rows = check_rows(FEED_FORWARD_OP, y, None, self.hidden)?;
        self.layers.with_linears(pack, |linears| {
            let [up_l, down_l] = linears else {
                candle_core::bail!("{FEED_FORWARD_OP}: expected two layers");
            };
            let up = up_l.forward(y, rows)?;
            let act = gelu_erf_values(&up);
            let mut pre_norm = down_l.forward(&act, rows)?;
            add_into(&mut pre_norm, y);
            let out = self.norm.forward(FEED_FORWARD_OP, &pre_norm, self.hidden)?;
            Ok((out, FeedForwardSaved { up, act, pre_norm }))
        })
    }

    fn backward(
        &self,
        y: &[f32],
        pack: &[f32],
        dout: &[f32],
        saved: Self::Saved,
        need_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let rows = check_rows(FEED_FORWARD_OP, y, Some(dout), self.hidden)?;
        let FeedForwardSaved { up, act, pre_norm } = saved;
        let dpre = self
            .norm
            .backward(FEED_FORWARD_OP, &pre_norm, dout, self.hidden)?;
        drop(pre_norm);
        let mut dpack = vec![0f32; pack.len()];
        let mut dy = self.layers.with_linears(pack, |linears| {
            let [_, down_l] = linears else {
                candle_core::bail!("{FEED_FORWARD_OP}: expected two layers");
            };
            let mut dact = zeros(act.len());
            let grads = down_l.backward(&act, &dpre, rows, &mut dact, false)?;
            self.layers.put_grads(&mut dpack, 1, grads)?;
            drop(act);
            let dup = gelu_erf_grad_values(&up, &dact);
            drop((up, dact));
            self.layers
                .shared_input_backward(linears, &mut dpack, y, rows, &[(0, &dup)], need_dx)
        })?;
        if need_dx {
            add_into(&mut dy, &dpre);
        }
        Ok((dy, dpack))
    }

    fn layers(&self) -> &BlockLayers {
        &self.layers
    }
}

/// `LN(y + down(gelu(up(y))))·γ + β` as one op, GELU in its exact (erf) form, on the layers'
/// operands (`up`, `down`); `None` when they do not fit each other (the separate ops then
/// report the mismatch). CPU f32 activations only: the caller checks that.
pub(crate) fn feed_forward_block_forward(
    y: &Tensor,
    norm: &LayerNormParts,
    [up, down]: [FusedLinearParts; 2],
) -> Result<Option<Tensor>> {
    let hidden = y.dim(candle_core::D::Minus1)?;
    let intermediate = up.weight.dims().first().copied().unwrap_or(0);
    let parts = vec![
        ("intermediate", up, (intermediate, hidden)),
        ("output", down, (hidden, intermediate)),
    ];
    let Some((layers, pack)) = BlockLayers::new(FEED_FORWARD_OP, parts, y.device())? else {
        return Ok(None);
    };
    let op = FeedForwardBlock {
        norm: norm.detached()?,
        hidden,
        layers,
    };
    Ok(Some(y.contiguous()?.apply_op2(&pack, SavingOp::new(op))?))
}

#[cfg(test)]
mod tests;
