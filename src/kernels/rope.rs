//! RoPE with the head transpose and a scale, as one op with an exact backward:
//! `x: [B, T, H, d]` → `y: [B, H, T, d]`, `y₁ = s·(x₁ cos θ − x₂ sin θ)`,
//! `y₂ = s·(x₂ cos θ + x₁ sin θ)` (halves `x₁ = x[..d/2]`, `x₂ = x[d/2..]`, θ per position and
//! frequency). The map is a rotation (times `s`), so its adjoint is the rotation by −θ (times
//! `s`) with the transpose undone: the backward is the same kernel run the other way.
//!
//! Candle's own `rotary_emb::rope` has no backward; this takes one pass each way. Other devices
//! and dtypes use the same math in plain (differentiable) candle ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::slices::f32_slice;
use crate::error::Result;

/// Rows per rayon task: small tensors stay on one thread.
const ROWS_PER_TASK: usize = 64;

/// `cos θ`, `sin θ` for the positions of one forward, `[T, d/2]` each: as tensors for the
/// plain-ops path and as values for the fused kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RopeAngles<'a> {
    /// `cos θ` as a tensor.
    pub(crate) cos: &'a Tensor,
    /// `sin θ` as a tensor.
    pub(crate) sin: &'a Tensor,
    /// `cos θ` as values, row-major.
    pub(crate) cos_values: &'a Arc<Vec<f32>>,
    /// `sin θ` as values, row-major.
    pub(crate) sin_values: &'a Arc<Vec<f32>>,
}

/// Whether the CPU kernels cover `x` (f32 on the CPU); the rest takes the plain ops.
pub(crate) fn fused(x: &Tensor) -> bool {
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
        let x = f32_slice(self.name(), "the input", s, l)?;
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
pub(crate) fn rope_values(
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
pub(crate) fn rope(x: &Tensor, angles: &RopeAngles<'_>, scale: f64) -> Result<Tensor> {
    if !fused(x) {
        return rope_reference(x, angles.cos, angles.sin, scale);
    }
    let op = Rope {
        cos: angles.cos_values.clone(),
        sin: angles.sin_values.clone(),
        scale: scale as f32,
        inverse: false,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}
