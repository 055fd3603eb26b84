//! The first half of a Llama decoder layer as one op with an exact backward:
//! `out = x + o_proj(attention(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))`,
//! `n = RMSNorm(x)·γ`.
//!
//! Shapes: `x: [B, T, H]`; `q_proj: H → n_h·d`, `k_proj`, `v_proj: H → n_kv·d`,
//! `o_proj: n_h·d → H`, each a frozen linear with an optional LoRA delta whose factors reach the
//! op packed into one operand (see `block_layers`). The attention core is `attention`'s (causal and
//! padding mask, grouped heads), RoPE is `rope`'s (`1/√d` folded into the queries).
//!
//! ```text
//! forward   n = RMSNorm(x)·γ,  q = RoPE(q_proj(n))/√d,  k = RoPE(k_proj(n)),  v = v_proj(n),
//!           c = softmax(q kᵀ + M) v,  out = x + o_proj(c)
//! backward  dc = o_proj'ᵀ(dout);  (dq, dk, dv) = attention'ᵀ(dc);  RoPE's adjoint on dq, dk;
//!           dn = q_proj'ᵀ(dq) + k_proj'ᵀ(dk) + v_proj'ᵀ(dv);  dx = dout + RMSNorm'ᵀ(dn)
//! ```
//! (`L'ᵀ(g) = g W + s (g B) A`, with the factors' gradients as in `linear_lora`.)
//!
//! Why one op: as separate ops the half-layer has eleven activation-sized edges, and candle's
//! backward gives each a `zeros_like` and an `add` on the main thread while the other core
//! waits. The op keeps what its backward reads (`n`, `r`, the rotated `q`, `k`, `v`, `c`) from
//! its forward, the memory the graph would hold for them anyway. A second backward over the
//! same graph recomputes them. CPU and f32 only, training and evaluation (no KV cache), and only
//! when each projection is a frozen linear with at most one LoRA delta.

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use super::attention;
use super::block_layers::{
    BlockLayers, FusedLinearParts, add_into, rms_backward_into, rms_forward,
};
use super::blocks::zeros;
use super::rope::{RopeAngles, rope_values};
use super::saved::{SavingKernel, SavingOp};
use super::slices::{with_optional_values, with_values};
use crate::error::Result;

const OP: &str = "llama-attention-block";

/// The activations the backward reads, kept from the forward.
struct Saved {
    normed: Vec<f32>,
    inv_rms: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    context: Vec<f32>,
}

struct AttentionBlock {
    norm_weight: Tensor,
    eps: f64,
    hidden: usize,
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    mask: Option<Tensor>,
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj`.
    layers: BlockLayers,
    /// The attention core's tiling, from the mask on first use.
    plan: OnceLock<attention::Plan>,
}

impl AttentionBlock {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }

    fn query_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn gamma(&self) -> candle_core::Result<Vec<f32>> {
        let gamma = with_values(OP, "the norm weight", &self.norm_weight, |g| Ok(g.to_vec()))?;
        if gamma.len() != self.hidden {
            candle_core::bail!(
                "{OP}: norm weight has {} values, hidden size {}",
                gamma.len(),
                self.hidden
            );
        }
        Ok(gamma)
    }

    fn check_input(&self, x: &[f32]) -> candle_core::Result<()> {
        if x.len() != self.rows() * self.hidden {
            candle_core::bail!(
                "{OP}: input of {} values, expected [{}, {}, {}]",
                x.len(),
                self.batch,
                self.seq,
                self.hidden
            );
        }
        Ok(())
    }

    /// RoPE (`inverse`: its adjoint) over `[B, T, n, d]` ↔ `[B, n, T, d]` values.
    fn rope(
        &self,
        x: &[f32],
        heads: usize,
        scale: f32,
        inverse: bool,
    ) -> candle_core::Result<Vec<f32>> {
        let (b, t, d) = (self.batch, self.seq, self.head_dim);
        let dims = if inverse {
            [b, heads, t, d]
        } else {
            [b, t, heads, d]
        };
        rope_values(x, dims, &self.cos, &self.sin, scale, inverse)
    }

    fn attention_dims(&self) -> candle_core::Result<attention::Dims> {
        let (b, t, d) = (self.batch, self.seq, self.head_dim);
        attention::check_dims(
            &[b, self.heads, t, d],
            &[b, self.kv_heads, t, d],
            &[b, t, self.kv_heads, d],
            self.mask.as_ref().map(|m| m.dims()),
            self.kv_heads,
        )
    }

    fn with_mask<R>(
        &self,
        f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        with_optional_values(OP, "the mask", self.mask.as_ref(), f)
    }
}

impl SavingKernel for AttentionBlock {
    type Saved = Saved;

    const NAME: &'static str = OP;

    fn forward(&self, x: &[f32], pack: &[f32]) -> candle_core::Result<(Vec<f32>, Saved)> {
        self.check_input(x)?;
        let rows = self.rows();
        let dims = self.attention_dims()?;
        let (normed, inv_rms) = rms_forward(x, &self.gamma()?, self.eps);
        self.layers.with_linears(pack, |linears| {
            let [q_l, k_l, v_l, o_l] = linears else {
                candle_core::bail!("{OP}: expected four layers");
            };
            let q = self.rope(
                &q_l.forward(&normed, rows)?,
                self.heads,
                self.query_scale(),
                false,
            )?;
            let k = self.rope(&k_l.forward(&normed, rows)?, self.kv_heads, 1.0, false)?;
            let v = v_l.forward(&normed, rows)?;
            let context = self.with_mask(|mask| {
                let plan = self.plan.get_or_init(|| dims.plan(mask));
                dims.forward(plan, &q, &k, &v, mask)
            })?;
            let mut out = o_l.forward(&context, rows)?;
            add_into(&mut out, x);
            Ok((
                out,
                Saved {
                    normed,
                    inv_rms,
                    q,
                    k,
                    v,
                    context,
                },
            ))
        })
    }

    fn backward(
        &self,
        x: &[f32],
        pack: &[f32],
        dout: &[f32],
        saved: Saved,
        _need_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        self.check_input(x)?;
        if dout.len() != x.len() {
            candle_core::bail!(
                "{OP}: output gradient of {} values for an input of {}",
                dout.len(),
                x.len()
            );
        }
        let rows = self.rows();
        let dims = self.attention_dims()?;
        let Saved {
            normed,
            inv_rms,
            q,
            k,
            v,
            context,
        } = saved;
        let mut dpack = vec![0f32; pack.len()];
        let mut dx = self.layers.with_linears(pack, |linears| {
            let [_, _, _, o_l] = linears else {
                candle_core::bail!("{OP}: expected four layers");
            };
            let mut dcontext = zeros(context.len());
            let grads = o_l.backward(&context, dout, rows, &mut dcontext, false)?;
            self.layers.put_grads(&mut dpack, 3, grads)?;
            drop(context);
            let (dq, dk, dv) = self.with_mask(|mask| {
                let plan = self.plan.get_or_init(|| dims.plan(mask));
                dims.backward(plan, &q, &k, &v, mask, &dcontext)
            })?;
            drop((q, k, v, dcontext));
            let dq = self.rope(&dq, self.heads, self.query_scale(), true)?;
            let dk = self.rope(&dk, self.kv_heads, 1.0, true)?;
            let output_grads = [(0, &dq[..]), (1, &dk[..]), (2, &dv[..])];
            self.layers.shared_input_backward(
                linears,
                &mut dpack,
                &normed,
                rows,
                &output_grads,
                true,
            )
        })?;
        rms_backward_into(&mut dx, x, &self.gamma()?, &inv_rms, dout);
        Ok((dx, dpack))
    }

    fn layers(&self) -> &BlockLayers {
        &self.layers
    }
}

/// `x + self_attn(RMSNorm(x)·γ)` as one op, on the projections' operands (`q`, `k`, `v`, `o`),
/// the head counts `(n_h, n_kv, d)` and the rotary angles of `x`'s positions; `None` when the
/// operands do not fit each other (the separate ops then report the mismatch). CPU f32 only:
/// the caller checks that.
pub(crate) fn block_forward(
    x: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    [q, k, v, o]: [FusedLinearParts; 4],
    (heads, kv_heads, head_dim): (usize, usize, usize),
    rope: &RopeAngles<'_>,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (batch, seq, hidden) = x.dims3()?;
    if rope.cos_values.len() != seq * (head_dim / 2) {
        return Ok(None);
    }
    let parts = vec![
        ("q_proj", q, (heads * head_dim, hidden)),
        ("k_proj", k, (kv_heads * head_dim, hidden)),
        ("v_proj", v, (kv_heads * head_dim, hidden)),
        ("o_proj", o, (hidden, heads * head_dim)),
    ];
    let Some((layers, pack)) = BlockLayers::new(OP, parts, x.device())? else {
        return Ok(None);
    };
    let op = AttentionBlock {
        norm_weight: norm_weight.contiguous()?.detach(),
        eps,
        hidden,
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
        cos: rope.cos_values.clone(),
        sin: rope.sin_values.clone(),
        mask: mask
            .map(|m| m.contiguous().map(|m| m.detach()))
            .transpose()?,
        layers,
        plan: OnceLock::new(),
    };
    // The op checks its operands' sizes against each other (heads, mask) when it runs.
    op.attention_dims()?;
    Ok(Some(x.contiguous()?.apply_op2(&pack, SavingOp::new(op))?))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::frozen::frozen_matmul_weight;
    use crate::kernels::frozen_weight::FrozenWeight;
    use crate::kernels::linear_lora::frozen_linear_lora_weight;
    use crate::kernels::norm::{NormKind, norm};
    use crate::kernels::rope::rope;
    use crate::kernels::test_values::{max_abs, max_diff, tensor, var};

    /// Rotary angles of positions `0..len` at frequencies `freqs`, as a Llama model builds them.
    struct Tables {
        cos: Tensor,
        sin: Tensor,
        cos_values: Arc<Vec<f32>>,
        sin_values: Arc<Vec<f32>>,
    }

    impl Tables {
        fn new(freqs: &[f32], len: usize) -> Self {
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for p in 0..len {
                for &w in freqs {
                    let angle = f64::from(p as f32 * w);
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
            let shape = (len, freqs.len());
            Self {
                cos: Tensor::from_slice(&cos, shape, &Device::Cpu).unwrap(),
                sin: Tensor::from_slice(&sin, shape, &Device::Cpu).unwrap(),
                cos_values: Arc::new(cos),
                sin_values: Arc::new(sin),
            }
        }

        fn angles(&self) -> RopeAngles<'_> {
            RopeAngles {
                cos: &self.cos,
                sin: &self.sin,
                cos_values: &self.cos_values,
                sin_values: &self.sin_values,
            }
        }
    }

    /// The causal mask `[B, 1, T, T]` with padded keys (`padding[b·T + j] == 0`) masked too.
    fn causal_mask(batch: usize, seq: usize, padding: Option<&[f32]>) -> Tensor {
        let mut mask = vec![0f32; batch * seq * seq];
        for b in 0..batch {
            for i in 0..seq {
                for j in 0..seq {
                    if j > i || padding.is_some_and(|p| p[b * seq + j] == 0.0) {
                        mask[(b * seq + i) * seq + j] = f32::MIN;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (batch, 1, seq, seq), &Device::Cpu).unwrap()
    }

    struct Setup {
        parts: [FusedLinearParts; 4],
        vars: Vec<Var>,
        heads: (usize, usize, usize),
    }

    fn setup(
        hidden: usize,
        heads: (usize, usize, usize),
        with_lora: [bool; 4],
        bias: bool,
    ) -> Setup {
        let (nh, nkv, d) = heads;
        let shapes = [
            (nh * d, hidden),
            (nkv * d, hidden),
            (nkv * d, hidden),
            (hidden, nh * d),
        ];
        let mut vars = Vec::new();
        let mut parts = Vec::new();
        for (i, &(out, inp)) in shapes.iter().enumerate() {
            let lora = with_lora[i].then(|| {
                let a = var(&[2, inp], 10 + i as u32);
                let b = var(&[out, 2], 20 + i as u32);
                let factors = (a.as_tensor().clone(), b.as_tensor().clone(), 0.5 + i as f64);
                vars.push(a);
                vars.push(b);
                factors
            });
            parts.push(FusedLinearParts {
                weight: FrozenWeight::Dense((tensor(&[out, inp], 30 + i as u32) * 0.3).unwrap()),
                bias: (bias && i < 3).then(|| tensor(&[out], 40 + i as u32)),
                lora,
            });
        }
        let Ok(parts) = <[FusedLinearParts; 4]>::try_from(parts) else {
            unreachable!("four layers")
        };
        Setup { parts, vars, heads }
    }

    /// The separate ops the block replaces.
    fn composed(
        x: &Tensor,
        gamma: &Tensor,
        s: &Setup,
        rope_angles: &RopeAngles<'_>,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (b, t, _) = x.dims3().unwrap();
        let (nh, nkv, d) = s.heads;
        let linear = |x: &Tensor, p: &FusedLinearParts| match &p.lora {
            Some((a, bb, sc)) => {
                frozen_linear_lora_weight(x, &p.weight, p.bias.as_ref(), a, bb, *sc).unwrap()
            }
            None => frozen_matmul_weight(x, &p.weight, p.bias.as_ref()).unwrap(),
        };
        let n = norm(x, gamma, None, 1e-5, NormKind::RmsNorm).unwrap();
        let q = linear(&n, &s.parts[0]).reshape((b, t, nh, d)).unwrap();
        let k = linear(&n, &s.parts[1]).reshape((b, t, nkv, d)).unwrap();
        let v = linear(&n, &s.parts[2]).reshape((b, t, nkv, d)).unwrap();
        let q = rope(&q, rope_angles, 1.0 / (d as f64).sqrt()).unwrap();
        let k = rope(&k, rope_angles, 1.0).unwrap();
        let c = attention::attention_core(&q, &k, &v, mask, nkv).unwrap();
        (x + linear(&c, &s.parts[3])).unwrap()
    }

    fn check(
        batch: usize,
        seq: usize,
        with_lora: [bool; 4],
        bias: bool,
        padding: Option<Vec<f32>>,
    ) {
        let hidden = 12;
        let s = setup(hidden, (4, 2, 6), with_lora, bias);
        let x = var(&[batch, seq, hidden], 1);
        let gamma = (tensor(&[hidden], 2) + 1.0).unwrap();
        let freqs: Vec<f32> = (0..3)
            .map(|i| 1.0 / 10000f32.powf(i as f32 / 3.0))
            .collect();
        let tables = Tables::new(&freqs, seq);
        let rope = tables.angles();
        let mask = causal_mask(batch, seq, padding.as_deref());
        let fused = block_forward(
            x.as_tensor(),
            &gamma,
            1e-5,
            s.parts.clone(),
            s.heads,
            &rope,
            Some(&mask),
        )
        .unwrap()
        .expect("CPU f32 operands take the fused block");
        let plain = composed(x.as_tensor(), &gamma, &s, &rope, Some(&mask));
        let scale = max_abs(&plain).max(1.0);
        assert!(
            max_diff(&fused, &plain) <= 1e-5 * scale,
            "output {}",
            max_diff(&fused, &plain)
        );
        let weights = tensor(&[batch, seq, hidden], 3);
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let fused_loss = loss(&fused);
        let plain_grads = loss(&plain).backward().unwrap();
        // Twice: the second backward recomputes the activations the first one consumed.
        for pass in 0..2 {
            let fused_grads = fused_loss.backward().unwrap();
            let mut all = vec![x.clone()];
            all.extend(s.vars.iter().cloned());
            for (i, v) in all.iter().enumerate() {
                let f = fused_grads.get(v.as_tensor()).expect("fused gradient");
                let p = plain_grads.get(v.as_tensor()).expect("plain gradient");
                let scale = max_abs(p).max(1.0);
                assert!(
                    max_diff(f, p) <= 1e-5 * scale,
                    "pass {pass}, gradient {i}: {} (scale {scale})",
                    max_diff(f, p)
                );
            }
        }
    }

    #[test]
    fn block_matches_the_separate_ops_with_lora_everywhere() {
        check(2, 7, [true; 4], false, None);
        check(3, 19, [true; 4], true, None);
    }

    #[test]
    fn block_matches_the_separate_ops_with_padding() {
        let mut padding = vec![1f32; 2 * 9];
        padding[..3].fill(0.0);
        padding[9 + 7..].fill(0.0);
        check(2, 9, [true, false, true, false], false, Some(padding));
    }

    #[test]
    fn block_matches_the_separate_ops_without_lora() {
        check(1, 5, [false; 4], true, None);
    }

    #[test]
    fn mismatched_operands_fall_back_and_a_wrong_pack_is_an_error() {
        let s = setup(12, (4, 2, 6), [true; 4], false);
        let gamma = tensor(&[12], 2);
        let freqs = vec![1.0f32, 0.1, 0.01];
        let tables = Tables::new(&freqs, 5);
        let rope = tables.angles();
        // Tables for 5 positions, 4 in the input: the separate ops report it.
        let x = tensor(&[1, 4, 12], 1);
        let fallback = block_forward(&x, &gamma, 1e-5, s.parts.clone(), s.heads, &rope, None);
        assert!(fallback.unwrap().is_none());
        let x = tensor(&[1, 5, 12], 1);
        let parts = s
            .parts
            .clone()
            .map(|p| FusedLinearParts { lora: None, ..p });
        let shapes = [(24, 12), (12, 12), (12, 12), (12, 24)];
        let names = ["q_proj", "k_proj", "v_proj", "o_proj"];
        let list = parts
            .into_iter()
            .zip(names)
            .zip(shapes)
            .map(|((p, n), sh)| (n, p, sh))
            .collect();
        let (layers, _) = BlockLayers::new(OP, list, &Device::Cpu).unwrap().unwrap();
        let op = AttentionBlock {
            norm_weight: gamma,
            eps: 1e-5,
            hidden: 12,
            batch: 1,
            seq: 5,
            heads: 4,
            kv_heads: 2,
            head_dim: 6,
            cos: rope.cos_values.clone(),
            sin: rope.sin_values.clone(),
            mask: None,
            layers,
            plan: OnceLock::new(),
        };
        let err = x
            .apply_op2(&tensor(&[3], 1), SavingOp::new(op))
            .unwrap_err()
            .to_string();
        assert!(err.contains(OP) && err.contains("pack"), "{err}");
    }
}
