//! The second half of a Llama decoder layer as one op with an exact backward:
//! `out = h + down(silu(gate(n)) ⊙ up(n))`, `n = RMSNorm(h)·γ`.
//!
//! Shapes: `h: [B, T, H]`; `gate`, `up`: `H → I`, `down`: `I → H`, each a frozen linear layer
//! `x Wᵀ + b` with an optional LoRA delta `s (x Aᵀ) Bᵀ` (`A: [r, in]`, `B: [out, r]`). The LoRA
//! factors reach the op as one packed operand (`A_gate, B_gate, A_up, B_up, A_down, B_down`,
//! flattened and concatenated, those present only), so the op has two inputs, `h` and the pack.
//!
//! ```text
//! forward   r = 1/√(mean(h²) + ε),  n = h r γ,  g = gate(n),  u = up(n),  a = silu(g) ⊙ u,
//!           out = h + down(a)
//! backward  da = dout W_down + s u_d A_down           (u_d = s dout B_down, as in linear_lora)
//!           dg = da ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),  du = da ⊙ silu(g)
//!           dn = dg W_gate + du W_up + (their LoRA terms)
//!           dh = dout + r (dn γ − n̂ mean(dn γ ⊙ n̂)),  n̂ = h r
//!           and each LoRA's dA = uᵀ x, dB = gᵀ (s x Aᵀ) with its own input x and output grad.
//! ```
//!
//! Why one op: written as separate ops (norm, three LoRA linears, SwiGLU, the residual add),
//! candle's backward gives each of the eight activation-sized edges between them a `zeros_like`
//! and an `add`, serially on the main thread while the other core waits. Here the activations
//! the backward needs (`n`, `g`, `u`, `a`, `r`) are kept by the op itself from its forward
//! (the memory the graph would hold for them anyway), and the backward returns `dh` and the
//! packed LoRA gradient only. A second backward over the same graph recomputes them.
//!
//! CPU and f32 only, and only when each of the three layers is exactly a frozen linear plus at
//! most one LoRA delta (what `LayerHandle::fused_parts` gathers); everything else takes the separate ops.

use candle_core::Tensor;
use rayon::prelude::*;

use super::block_layers::{
    BlockLayers, FusedLinearParts, ROWS_PER_TASK, add_into, rms_backward_into, rms_forward,
};
use super::blocks::zeros;
use super::fast_exp;
use super::saved::{SavingKernel, SavingOp};
use super::slices::with_values;
use crate::error::Result;

const OP: &str = "llama-mlp-block";

/// The activations the backward reads, kept from the forward.
struct Saved {
    normed: Vec<f32>,
    inv_rms: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

struct MlpBlock {
    norm_weight: Tensor,
    eps: f64,
    hidden: usize,
    intermediate: usize,
    /// `gate_proj`, `up_proj`, `down_proj`.
    layers: BlockLayers,
}

impl MlpBlock {
    fn rows(&self, h_len: usize) -> candle_core::Result<usize> {
        if self.hidden == 0 || !h_len.is_multiple_of(self.hidden) {
            candle_core::bail!(
                "{OP}: input of {h_len} values is not rows of hidden size {}",
                self.hidden
            );
        }
        Ok(h_len / self.hidden)
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
}

impl SavingKernel for MlpBlock {
    type Saved = Saved;

    const NAME: &'static str = OP;

    fn forward(&self, h: &[f32], pack: &[f32]) -> candle_core::Result<(Vec<f32>, Saved)> {
        let rows = self.rows(h.len())?;
        let inter = self.intermediate;
        let (normed, inv_rms) = rms_forward(h, &self.gamma()?, self.eps);
        self.layers.with_linears(pack, |linears| {
            let [gate_l, up_l, down_l] = linears else {
                candle_core::bail!("{OP}: expected three layers");
            };
            let gate = gate_l.forward(&normed, rows)?;
            let up = up_l.forward(&normed, rows)?;
            let mut act = zeros(rows * inter);
            let chunk = inter * ROWS_PER_TASK;
            act.par_chunks_mut(chunk)
                .zip(gate.par_chunks(chunk))
                .zip(up.par_chunks(chunk))
                .for_each(|((a, g), u)| {
                    // a = e^(−g) first (vectorised), then silu(g) u = g u / (1 + e^(−g)).
                    fast_exp::neg_exp_into(g, a);
                    for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                        *a = g * u / (1.0 + *a);
                    }
                });
            let mut out = down_l.forward(&act, rows)?;
            add_into(&mut out, h);
            Ok((
                out,
                Saved {
                    normed,
                    inv_rms,
                    gate,
                    up,
                    act,
                },
            ))
        })
    }

    fn backward(
        &self,
        h: &[f32],
        pack: &[f32],
        dout: &[f32],
        saved: Saved,
        _need_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let rows = self.rows(h.len())?;
        let inter = self.intermediate;
        if dout.len() != h.len() {
            candle_core::bail!(
                "{OP}: output gradient of {} values for an input of {}",
                dout.len(),
                h.len()
            );
        }
        let Saved {
            normed,
            inv_rms,
            mut gate,
            mut up,
            act,
        } = saved;
        let mut dpack = vec![0f32; pack.len()];
        let mut dh = self.layers.with_linears(pack, |linears| {
            let [_, _, down_l] = linears else {
                candle_core::bail!("{OP}: expected three layers");
            };
            let mut dact = zeros(rows * inter);
            let grads = down_l.backward(&act, dout, rows, &mut dact, false)?;
            self.layers.put_grads(&mut dpack, 2, grads)?;
            // dg and du overwrite g and u: each element reads both before writing.
            let chunk = inter * ROWS_PER_TASK;
            gate.par_chunks_mut(chunk)
                .zip(up.par_chunks_mut(chunk))
                .zip(dact.par_chunks(chunk))
                .for_each(|((g, u), da)| {
                    let mut neg_exp = vec![0f32; g.len()];
                    fast_exp::neg_exp_into(g, &mut neg_exp);
                    let values = g.iter_mut().zip(u.iter_mut()).zip(da).zip(&neg_exp);
                    for (((g, u), &da), &e) in values {
                        let sg = 1.0 / (1.0 + e);
                        let silu = *g * sg;
                        let dg = da * *u * sg * (1.0 + *g * (1.0 - sg));
                        *u = da * silu;
                        *g = dg;
                    }
                });
            let output_grads = [(0, &gate[..]), (1, &up[..])];
            self.layers.shared_input_backward(
                linears,
                &mut dpack,
                &normed,
                rows,
                &output_grads,
                true,
            )
        })?;
        rms_backward_into(&mut dh, h, &self.gamma()?, &inv_rms, dout);
        Ok((dh, dpack))
    }

    fn layers(&self) -> &BlockLayers {
        &self.layers
    }
}

/// `h + mlp(RMSNorm(h)·γ)` as one op, on the layers' operands (`gate`, `up`, `down`); `None`
/// when they do not fit each other (the separate ops then report the mismatch). CPU f32 only:
/// the caller checks that.
pub(crate) fn block_forward(
    h: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    [gate, up, down]: [FusedLinearParts; 3],
) -> Result<Option<Tensor>> {
    let hidden = h.dim(candle_core::D::Minus1)?;
    let intermediate = gate.weight.dims().first().copied().unwrap_or(0);
    let parts = vec![
        ("gate_proj", gate, (intermediate, hidden)),
        ("up_proj", up, (intermediate, hidden)),
        ("down_proj", down, (hidden, intermediate)),
    ];
    let Some((layers, pack)) = BlockLayers::new(OP, parts, h.device())? else {
        return Ok(None);
    };
    let op = MlpBlock {
        norm_weight: norm_weight.contiguous()?.detach(),
        eps,
        hidden,
        intermediate,
        layers,
    };
    Ok(Some(h.contiguous()?.apply_op2(&pack, SavingOp::new(op))?))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::frozen::frozen_matmul_weight;
    use crate::kernels::frozen_weight::FrozenWeight;
    use crate::kernels::linear_lora::frozen_linear_lora_weight;
    use crate::kernels::norm::{NormKind, norm};
    use crate::kernels::swiglu::swiglu;
    use crate::kernels::test_values::{max_abs, max_diff, tensor, var};

    struct Case {
        parts: [FusedLinearParts; 3],
        vars: Vec<Var>,
    }

    /// gate/up `H → I`, down `I → H`; LoRA (rank 3) on the layers `with_lora` names.
    fn case(hidden: usize, inter: usize, with_lora: [bool; 3], bias: bool) -> Case {
        let mut vars = Vec::new();
        let mut layer = |i: usize, out: usize, inp: usize| {
            let lora = with_lora[i].then(|| {
                let a = var(&[3, inp], 10 + i as u32);
                let b = var(&[out, 3], 20 + i as u32);
                let factors = (
                    a.as_tensor().clone(),
                    b.as_tensor().clone(),
                    0.75 + i as f64,
                );
                vars.push(a);
                vars.push(b);
                factors
            });
            FusedLinearParts {
                weight: FrozenWeight::Dense((tensor(&[out, inp], 30 + i as u32) * 0.2).unwrap()),
                bias: bias.then(|| tensor(&[out], 40 + i as u32)),
                lora,
            }
        };
        let parts = [
            layer(0, inter, hidden),
            layer(1, inter, hidden),
            layer(2, hidden, inter),
        ];
        Case { parts, vars }
    }

    /// The separate ops the block replaces.
    fn composed(h: &Tensor, gamma: &Tensor, eps: f64, parts: &[FusedLinearParts; 3]) -> Tensor {
        let linear = |x: &Tensor, p: &FusedLinearParts| match &p.lora {
            Some((a, b, s)) => {
                frozen_linear_lora_weight(x, &p.weight, p.bias.as_ref(), a, b, *s).unwrap()
            }
            None => frozen_matmul_weight(x, &p.weight, p.bias.as_ref()).unwrap(),
        };
        let n = norm(h, gamma, None, eps, NormKind::RmsNorm).unwrap();
        let act = swiglu(&linear(&n, &parts[0]), &linear(&n, &parts[1])).unwrap();
        (h + linear(&act, &parts[2])).unwrap()
    }

    fn check(rows: (usize, usize), hidden: usize, inter: usize, with_lora: [bool; 3], bias: bool) {
        let Case { parts, vars } = case(hidden, inter, with_lora, bias);
        let h = var(&[rows.0, rows.1, hidden], 1);
        let gamma = (tensor(&[hidden], 2) + 1.0).unwrap();
        let weights = tensor(&[rows.0, rows.1, hidden], 3);
        let fused = block_forward(h.as_tensor(), &gamma, 1e-5, parts.clone())
            .unwrap()
            .expect("CPU f32 operands take the fused block");
        let plain = composed(h.as_tensor(), &gamma, 1e-5, &parts);
        let scale = max_abs(&plain);
        let diff = max_diff(&fused, &plain);
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "output: {diff} (scale {scale})"
        );
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let fused_loss = loss(&fused);
        let plain_grads = loss(&plain).backward().unwrap();
        // Twice: the second backward recomputes the activations the first one consumed.
        for pass in 0..2 {
            let fused_grads = fused_loss.backward().unwrap();
            let mut all = vec![h.clone()];
            all.extend(vars.iter().cloned());
            for (i, v) in all.iter().enumerate() {
                let f = fused_grads.get(v.as_tensor()).expect("fused gradient");
                let p = plain_grads.get(v.as_tensor()).expect("plain gradient");
                let scale = max_abs(p);
                assert!(
                    max_diff(f, p) <= 1e-5 * scale.max(1.0),
                    "pass {pass}, gradient {i}: {} (scale {scale})",
                    max_diff(f, p)
                );
            }
        }
    }

    #[test]
    fn block_matches_the_separate_ops_with_lora_everywhere() {
        check((2, 7), 12, 20, [true, true, true], false);
        check((3, 37), 16, 24, [true, true, true], true);
    }

    #[test]
    fn block_matches_the_separate_ops_with_partial_or_no_lora() {
        check((2, 5), 8, 12, [false, false, true], false);
        check((1, 19), 8, 12, [true, false, false], true);
        check((2, 9), 8, 12, [false, false, false], false);
    }

    #[test]
    fn mismatched_layers_fall_back() {
        let Case { mut parts, .. } = case(8, 12, [true, true, true], false);
        parts[2].weight = FrozenWeight::Dense(tensor(&[8, 11], 5));
        let h = tensor(&[1, 3, 8], 1);
        let gamma = tensor(&[8], 2);
        assert!(block_forward(&h, &gamma, 1e-5, parts).unwrap().is_none());
    }

    #[test]
    fn a_wrong_pack_is_an_error_naming_the_op() {
        let Case { parts, .. } = case(8, 12, [true, false, false], false);
        let h = tensor(&[1, 3, 8], 1);
        let gamma = tensor(&[8], 2);
        let [gate, up, down] = parts;
        let parts = vec![
            ("gate_proj", gate, (12, 8)),
            ("up_proj", up, (12, 8)),
            ("down_proj", down, (8, 12)),
        ];
        let (layers, _) = BlockLayers::new(OP, parts, &Device::Cpu).unwrap().unwrap();
        let op = MlpBlock {
            norm_weight: gamma,
            eps: 1e-5,
            hidden: 8,
            intermediate: 12,
            layers,
        };
        let err = h
            .apply_op2(&tensor(&[7], 3), SavingOp::new(op))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("llama-mlp-block") && err.contains("pack"),
            "{err}"
        );
    }
}
