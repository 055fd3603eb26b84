//! Fused CPU ops of the Llama forward, each with an exact backward.
//!
//! - RoPE with the head transpose and a scale: `x: [B, T, H, d]` → `y: [B, H, T, d]`,
//!   `y₁ = s·(x₁ cos θ − x₂ sin θ)`, `y₂ = s·(x₂ cos θ + x₁ sin θ)` (halves `x₁ = x[..d/2]`,
//!   `x₂ = x[d/2..]`, θ per position and frequency). The map is a rotation (times `s`), so its
//!   adjoint is the rotation by −θ (times `s`) with the transpose undone: the backward is the same
//!   kernel run the other way.
//! - SwiGLU: `y = silu(g) ⊙ u`; backward `dg = dy ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`,
//!   `du = dy ⊙ silu(g)`, both in one pass.
//!
//! Candle's own `rotary_emb::rope` has no backward and `silu(g) * u` takes a dozen passes through
//! backward; these take one each way. Other devices and dtypes use the same math in plain
//! (differentiable) candle ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::RopeTables;
use crate::error::Result;
use crate::ops::{collect_block_pairs, collect_blocks, simd_kernel};

/// Rows per rayon task: small tensors stay on one thread (the element-wise kernels take their
/// task size from `crate::ops::collect_blocks`).
const ROWS_PER_TASK: usize = 64;

/// The contiguous f32 elements of a CPU tensor, or an error naming the op.
fn f32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: input must be contiguous"),
        _ => candle_core::bail!("{op}: only f32 inputs are fused"),
    }
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// RoPE over `[B, T, H, d]` (`inverse = false`, output `[B, H, T, d]`) or its adjoint over
/// `[B, H, T, d]` (`inverse = true`, output `[B, T, H, d]`).
#[derive(Clone)]
struct Rope {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    scale: f32,
    inverse: bool,
}

impl Rope {
    fn adjoint(&self) -> Self {
        Self {
            inverse: !self.inverse,
            ..self.clone()
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "llama-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), s, l)?;
        let &[b, a1, a2, d] = l.dims() else {
            candle_core::bail!("llama-rope: expected a 4-D input, got {:?}", l.dims());
        };
        let out = rope_values(
            x,
            [b, a1, a2, d],
            &self.cos,
            &self.sin,
            self.scale,
            self.inverse,
        )?;
        Ok((CpuStorage::F32(out), Shape::from((b, a2, a1, d))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&self.adjoint())?))
    }
}

/// `scale·RoPE` on values: `x: [B, T, H, d]` → `[B, H, T, d]`, or with `inverse` its adjoint
/// `[B, H, T, d]` → `[B, T, H, d]` (the rotation by −θ), with `cos`/`sin` `[T, d/2]`.
pub(super) fn rope_values(
    x: &[f32],
    [b, a1, a2, d]: [usize; 4],
    cos: &[f32],
    sin: &[f32],
    scale: f32,
    inverse: bool,
) -> candle_core::Result<Vec<f32>> {
    // Input [b, a1, a2, d] is [B, T, H, d] forward and [B, H, T, d] for the adjoint.
    let (t, h) = if inverse { (a2, a1) } else { (a1, a2) };
    let half = d / 2;
    if d % 2 != 0 || cos.len() != t * half || sin.len() != t * half {
        candle_core::bail!(
            "llama-rope: tables of {} entries for {t} positions × {half} frequencies",
            cos.len()
        );
    }
    if x.len() != b * t * h * d {
        candle_core::bail!("llama-rope: {} values for [{b}, {a1}, {a2}, {d}]", x.len());
    }
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut out = vec![0f32; x.len()];
    if d == 0 {
        return Ok(out);
    }
    out.par_chunks_exact_mut(d)
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(row, dst)| {
            // Output row `row` of [B, H, T] (forward) or [B, T, H] (adjoint), and its
            // source row in the other layout.
            let (ti, src_row) = if inverse {
                let (bi, ti, hi) = (row / (t * h), (row / h) % t, row % h);
                (ti, (bi * h + hi) * t + ti)
            } else {
                let (bi, hi, ti) = (row / (h * t), (row / t) % h, row % t);
                (ti, (bi * t + ti) * h + hi)
            };
            let src = &x[src_row * d..(src_row + 1) * d];
            let cos = &cos[ti * half..(ti + 1) * half];
            let sin = &sin[ti * half..(ti + 1) * half];
            let (x1, x2) = src.split_at(half);
            let (y1, y2) = dst.split_at_mut(half);
            for i in 0..half {
                let s = sign * sin[i];
                y1[i] = scale * (x1[i] * cos[i] - x2[i] * s);
                y2[i] = scale * (x2[i] * cos[i] + x1[i] * s);
            }
        });
    Ok(out)
}

/// RoPE with plain candle ops: `x: [B, T, H, d]`, `cos`/`sin: [T, d/2]` → `s·RoPE(x)` as
/// `[B, H, T, d]`. Differentiable on every device and dtype; the reference for the fused op.
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    let d = x.dim(3)?;
    let half = d / 2;
    let x = x.transpose(1, 2)?;
    let cos = Tensor::cat(&[cos, cos], 1)?.to_dtype(x.dtype())?;
    let sin = Tensor::cat(&[sin, sin], 1)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    let y = (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    Ok((y * scale)?.contiguous()?)
}

/// `scale·RoPE(x)` for `x: [B, T, H, d]` at the tables' positions, as `[B, H, T, d]`.
pub(crate) fn rope(x: &Tensor, tables: &RopeTables, scale: f64) -> Result<Tensor> {
    if !fused(x) {
        return rope_reference(x, &tables.cos, &tables.sin, scale);
    }
    let op = Rope {
        cos: tables.cos_values.clone(),
        sin: tables.sin_values.clone(),
        scale: scale as f32,
        inverse: false,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `dst = e^(−g)` for a block of gates, by the vectorised `exp`.
fn exp_neg_block(gate: &[f32], dst: &mut [f32]) {
    for (d, &g) in dst.iter_mut().zip(gate) {
        *d = -g;
    }
    crate::fast_exp::exp_shifted_in_place(dst, 0.0);
}

// With `e = e^(−g)`, `σ(g) = 1/(1 + e)`: `e = +∞` gives 0 and `e = 0` gives 1, so saturated
// gates need no branch.

simd_kernel! {
    /// `y = g·u·σ(g)` over a block, `y` holding `e^(−g)` on entry.
    fn swiglu_block(y: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            *y = g * u / (1.0 + *y);
        }
    }
}

simd_kernel! {
    /// `dg = dy·u·σ(1 + g(1 − σ))`, `du = dy·g·σ` over a block, `dg` holding `e^(−g)` on entry.
    fn swiglu_grad_block(dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32], dy: &[f32]) {
        let blocks = dg.iter_mut().zip(du.iter_mut()).zip(gate.iter().zip(up).zip(dy));
        for ((dg, du), ((&g, &u), &dy)) in blocks {
            let sigmoid = 1.0 / (1.0 + *dg);
            let silu = g * sigmoid;
            *du = dy * silu;
            *dg = dy * u * (sigmoid + silu * (1.0 - sigmoid));
        }
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "llama-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("llama-swiglu: gate {:?} vs up {:?}", l1.dims(), l2.dims());
        }
        let gate = f32_slice(self.name(), s1, l1)?;
        let up = f32_slice(self.name(), s2, l2)?;
        let out = collect_blocks(gate.len(), |start, dst| {
            let end = start + dst.len();
            let (gb, ub) = (&gate[start..end], &up[start..end]);
            exp_neg_block(gb, dst);
            swiglu_block(dst, gb, ub);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `(dg, du)` of SwiGLU stacked as `[2, ..]`.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "llama-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!(
                "llama-swiglu-grad: shapes {:?}, {:?}, {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let gate = f32_slice(self.name(), s1, l1)?;
        let up = f32_slice(self.name(), s2, l2)?;
        let grad = f32_slice(self.name(), s3, l3)?;
        let n = gate.len();
        let out = collect_block_pairs(n, |start, dgb, dub| {
            let end = start + dgb.len();
            let (gb, ub, dyb) = (&gate[start..end], &up[start..end], &grad[start..end]);
            exp_neg_block(gb, dgb);
            swiglu_grad_block(dgb, dub, gb, ub, dyb);
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `silu(gate) ⊙ up`, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !(fused(gate) && fused(up)) {
        return Ok((gate.silu()? * up)?);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

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
        let fused = rope(&x, &tables, 0.7).unwrap();
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

    #[test]
    fn swiglu_matches_the_plain_ops_forward_and_backward() {
        let shape = (3, 4, 10);
        let gate = Var::from_vec(values(120, 3), shape, &Device::Cpu).unwrap();
        let up = Var::from_vec(values(120, 4), shape, &Device::Cpu).unwrap();
        let fused = swiglu(&gate, &up).unwrap();
        let plain = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-6);
        let w = Tensor::from_vec(values(120, 5), shape, &Device::Cpu).unwrap();
        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&gate, &up] {
            let d = max_diff(
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-6, "{d}");
        }
    }

    /// SwiGLU timings (ignored): `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=2 cargo test --release
    /// --lib kernels::tests::swiglu_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn swiglu_timing() {
        let shape = (512, 1536);
        let n = 512 * 1536;
        let gate = Tensor::from_vec(values(n, 6), shape, &Device::Cpu).unwrap();
        let gate = (gate * 4.0).unwrap();
        let up = Tensor::from_vec(values(n, 7), shape, &Device::Cpu).unwrap();
        let dy = Tensor::from_vec(values(n, 8), shape, &Device::Cpu).unwrap();
        let best_of = |f: &dyn Fn()| {
            (0..50)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed()
                })
                .min()
                .unwrap()
        };
        let y = gate.apply_op2_no_bwd(&up, &SwiGlu).unwrap();
        let fwd = best_of(&|| {
            std::hint::black_box(gate.apply_op2_no_bwd(&up, &SwiGlu).unwrap());
        });
        let bwd = best_of(&|| {
            std::hint::black_box(SwiGlu.bwd(&gate, &up, &y, &dy).unwrap());
        });
        println!("SwiGLU [512, 1536]: forward {fwd:?}, backward {bwd:?}");
    }
}
