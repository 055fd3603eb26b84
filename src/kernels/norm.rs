//! Layer norm and RMS norm over the last dim with frozen weights, one pass each way.
//!
//! Over the last dim, `LayerNorm: y = (x − μ)·r·γ + β` with `r = 1/√(var + eps)`, or
//! `RmsNorm: y = x·r·γ` with `r = 1/√(mean(x²) + eps)`. Backward with `x̂ = (x − μ)·r` (or `x·r`)
//! and `g' = g·γ`: LayerNorm `dx = r·(g' − mean(g') − x̂·mean(g'·x̂))`, RmsNorm
//! `dx = r·(g' − x̂·mean(g'·x̂))`. `γ` and `β` are frozen: the backward returns `dL/dx` only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor};

use super::blocks::{BLOCK, ROWS_PER_TASK, collect_rows};
#[cfg(feature = "cuda")]
use super::cuda::{cuda_tensor, into_cuda};
use super::simd::{LANES, lanes_to_f64, simd_kernel};
use super::slices::{
    f32_input, grad_operands, output_storage, with_f32_values, with_optional_f32_values,
};

/// Which normalisation `norm` computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `(x − μ)·r·γ + β`, `r = 1/√(var + eps)`.
    LayerNorm,
    /// `x·r·γ`, `r = 1/√(mean(x²) + eps)`.
    RmsNorm,
}

struct Norm {
    gamma: Tensor,
    beta: Option<Tensor>,
    eps: f64,
    kind: NormKind,
}

impl Norm {
    /// The same math with candle's tensor ops: the fallback for dtypes and devices the CPU
    /// kernel does not cover, and what backward recomputes `x̂` and `r` with.
    fn normalized(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let x = x.to_dtype(DType::F32)?;
        let centered = match self.kind {
            NormKind::LayerNorm => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
            NormKind::RmsNorm => x,
        };
        let r = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        Ok((centered.broadcast_mul(&r)?, r))
    }

    #[cfg(feature = "cuda")]
    fn tensor_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (xhat, _) = self.normalized(x)?;
        let y = xhat.broadcast_mul(&self.gamma.to_dtype(DType::F32)?)?;
        let y = match &self.beta {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => y,
        };
        y.to_dtype(x.dtype())
    }
}

/// The per-row arithmetic of one norm kind and epsilon, shared by the op and the fused blocks
/// that normalise rows of values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowNorm {
    pub(crate) kind: NormKind,
    pub(crate) eps: f64,
}

impl RowNorm {
    /// `(μ, r)` of one row.
    fn row_stats(&self, row: &[f32]) -> (f32, f32) {
        let mean = self.row_mean(row);
        (mean, self.inv_rms(sum_sq_dev(row, mean), row.len()))
    }

    fn row_mean(&self, row: &[f32]) -> f32 {
        match self.kind {
            NormKind::LayerNorm => (sum(row) / row.len() as f64) as f32,
            NormKind::RmsNorm => 0.0,
        }
    }

    /// `r = 1/√(Σc²/n + eps)`. The backward recomputes `Σc²` with the forward's arithmetic, so
    /// it gets the forward's `r` bit for bit.
    fn inv_rms(&self, sum_sq: f64, n: usize) -> f32 {
        (1.0 / (sum_sq / n as f64 + self.eps).sqrt()) as f32
    }

    /// The normalised rows of `x` (width `gamma.len()`, which must be positive and divide
    /// `x.len()`), times `γ` (plus `β`).
    pub(crate) fn forward(&self, x: &[f32], gamma: &[f32], beta: Option<&[f32]>) -> Vec<f32> {
        let dim = gamma.len();
        let head = |i: usize| self.row_stats(&x[i * dim..(i + 1) * dim]);
        let fill = |&(mean, r): &(f32, f32), i: usize, start: usize, dst: &mut [f32]| {
            let at = i * dim + start;
            let beta = beta.map(|b| &b[start..]);
            norm_block(dst, &x[at..], &gamma[start..], beta, mean, r);
        };
        collect_rows(x.len() / dim, dim, ROWS_PER_TASK, head, fill)
    }

    /// `dL/dx` of [`Self::forward`] for the output gradient `g` (`x`'s length), one pass per
    /// row after its sums. With `c = x − μ` (`x` for RmsNorm), `x̂ = c·r` and `g' = g·γ`, the
    /// backward in the module doc expands to `dx = r·g' − r·mean(g') − c·r³·mean(g'·c)`: one
    /// pass for `Σc²` (which gives `r`), `Σg'` and `Σg'·c` (after one for `μ` with LayerNorm),
    /// then one multiply-add per element.
    pub(crate) fn backward(&self, x: &[f32], g: &[f32], gamma: &[f32]) -> Vec<f32> {
        let dim = gamma.len();
        let n = dim as f64;
        let head = |i: usize| {
            let (row, grad) = (&x[i * dim..(i + 1) * dim], &g[i * dim..(i + 1) * dim]);
            let mean = self.row_mean(row);
            let sums = norm_grad_sums(row, grad, gamma, mean);
            let r = self.inv_rms(sums.sq, dim);
            let r64 = f64::from(r);
            let shift = match self.kind {
                NormKind::LayerNorm => (-r64 * sums.g / n) as f32,
                NormKind::RmsNorm => 0.0,
            };
            let slope = (-r64 * r64 * r64 * sums.gc / n) as f32;
            NormGradRow {
                mean,
                r,
                slope,
                shift,
            }
        };
        let fill = |row: &NormGradRow, i: usize, start: usize, dst: &mut [f32]| {
            let at = i * dim + start;
            norm_grad_block(dst, &x[at..], &g[at..], &gamma[start..], row);
        };
        collect_rows(x.len() / dim, dim, ROWS_PER_TASK, head, fill)
    }
}

impl Norm {
    fn rows(&self) -> RowNorm {
        RowNorm {
            kind: self.kind,
            eps: self.eps,
        }
    }

    /// `dx` with candle's tensor ops: what devices other than the CPU run.
    fn tensor_backward(&self, x: &Tensor, grad_y: &Tensor) -> candle_core::Result<Tensor> {
        let (xhat, r) = self.normalized(x)?;
        let g = grad_y
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.gamma.to_dtype(DType::F32)?)?;
        let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        let mut inner = g.broadcast_sub(&xhat.broadcast_mul(&proj)?)?;
        if self.kind == NormKind::LayerNorm {
            inner = inner.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
        }
        inner.broadcast_mul(&r)?.to_dtype(x.dtype())
    }
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        "frozen-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = layout.shape().clone();
        let mut converted = None;
        let src = f32_input(x, layout, &mut converted)?;
        let dim = shape.dims().last().copied().unwrap_or(1);
        if dim == 0 {
            return Ok((output_storage(Vec::new(), &shape, x.dtype())?, shape));
        }
        let out = with_f32_values(self.name(), &self.gamma, dim, |gamma| {
            with_optional_f32_values(self.name(), self.beta.as_ref(), dim, |beta| {
                Ok(self.rows().forward(src, gamma, beta))
            })
        })?;
        Ok((output_storage(out, &shape, x.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let t = cuda_tensor(x, layout)?;
        into_cuda(self.tensor_forward(&t)?)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if x.device().is_cpu() {
            return Ok(Some(x.apply_op2_no_bwd(grad_y, &NormGrad(self))?));
        }
        Ok(Some(self.tensor_backward(x, grad_y)?))
    }
}

/// `dx` of [`Norm`] from `(x, dL/dy)` ([`RowNorm::backward`]).
struct NormGrad<'a>(&'a Norm);

impl candle_core::CustomOp2 for NormGrad<'_> {
    fn name(&self) -> &'static str {
        "frozen-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (mut cx, mut cg) = (None, None);
        let (shape, xs, gs) = grad_operands(
            "frozen-norm-grad",
            x,
            x_layout,
            g,
            g_layout,
            &mut cx,
            &mut cg,
        )?;
        let dim = shape.dims().last().copied().unwrap_or(1);
        if dim == 0 {
            return Ok((output_storage(Vec::new(), &shape, x.dtype())?, shape));
        }
        let norm = self.0;
        let out = with_f32_values(self.name(), &norm.gamma, dim, |gamma| {
            Ok(norm.rows().backward(xs, gs, gamma))
        })?;
        Ok((output_storage(out, &shape, x.dtype())?, shape))
    }
}

/// Per row of the norm backward: `dx = r·g·γ + slope·(x − mean) + shift`.
struct NormGradRow {
    mean: f32,
    r: f32,
    slope: f32,
    shift: f32,
}

simd_kernel! {
    /// `Σ v`.
    fn sum(v: &[f32]) -> f64 {
        let mut total = 0f64;
        for block in v.chunks(BLOCK) {
            let mut acc = [0f32; LANES];
            let mut chunks = block.chunks_exact(LANES);
            for c in &mut chunks {
                for (a, &x) in acc.iter_mut().zip(c) {
                    *a += x;
                }
            }
            total += lanes_to_f64(&acc, chunks.remainder().iter().sum());
        }
        total
    }
}

simd_kernel! {
    /// `Σ (v − mean)²`, the same arithmetic as the `sq` of [`norm_grad_sums`].
    fn sum_sq_dev(v: &[f32], mean: f32) -> f64 {
        let mut total = 0f64;
        for block in v.chunks(BLOCK) {
            let mut acc = [0f32; LANES];
            let mut chunks = block.chunks_exact(LANES);
            for c in &mut chunks {
                for (a, &x) in acc.iter_mut().zip(c) {
                    let d = x - mean;
                    *a += d * d;
                }
            }
            let tail = chunks.remainder().iter().map(|&x| (x - mean) * (x - mean)).sum();
            total += lanes_to_f64(&acc, tail);
        }
        total
    }
}

/// The row sums of the norm backward.
struct GradSums {
    /// `Σ c²` with `c = x − μ`, accumulated exactly as [`sum_sq_dev`] does.
    sq: f64,
    /// `Σ g'` with `g' = g·γ`.
    g: f64,
    /// `Σ g'·c`.
    gc: f64,
}

simd_kernel! {
    fn norm_grad_sums(x: &[f32], g: &[f32], gamma: &[f32], mean: f32) -> GradSums {
        let mut sums = GradSums { sq: 0.0, g: 0.0, gc: 0.0 };
        let blocks = x.chunks(BLOCK).zip(g.chunks(BLOCK)).zip(gamma.chunks(BLOCK));
        for ((xb, gb), wb) in blocks {
            let (mut sq, mut sg, mut sgc) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
            let (mut xc, mut gc, mut wc) = (
                xb.chunks_exact(LANES),
                gb.chunks_exact(LANES),
                wb.chunks_exact(LANES),
            );
            for ((xs, gs), ws) in (&mut xc).zip(&mut gc).zip(&mut wc) {
                for lane in 0..LANES {
                    let c = xs[lane] - mean;
                    let gp = gs[lane] * ws[lane];
                    sq[lane] += c * c;
                    sg[lane] += gp;
                    sgc[lane] += gp * c;
                }
            }
            let (mut tsq, mut tg, mut tgc) = (0f32, 0f32, 0f32);
            let tails = xc.remainder().iter().zip(gc.remainder()).zip(wc.remainder());
            for ((&xv, &gv), &w) in tails {
                let c = xv - mean;
                let gp = gv * w;
                tsq += c * c;
                tg += gp;
                tgc += gp * c;
            }
            sums.sq += lanes_to_f64(&sq, tsq);
            sums.g += lanes_to_f64(&sg, tg);
            sums.gc += lanes_to_f64(&sgc, tgc);
        }
        sums
    }
}

simd_kernel! {
    /// `dst = (x − mean)·r·γ (+ β)` over `dst`'s length.
    fn norm_block(
        dst: &mut [f32],
        x: &[f32],
        gamma: &[f32],
        beta: Option<&[f32]>,
        mean: f32,
        r: f32,
    ) {
        for ((d, &v), &g) in dst.iter_mut().zip(x).zip(gamma) {
            *d = (v - mean) * r * g;
        }
        if let Some(beta) = beta {
            for (d, &b) in dst.iter_mut().zip(beta) {
                *d += b;
            }
        }
    }
}

simd_kernel! {
    /// `dst = r·g·γ + slope·(x − mean) + shift` over `dst`'s length.
    fn norm_grad_block(dst: &mut [f32], x: &[f32], g: &[f32], gamma: &[f32], row: &NormGradRow) {
        let &NormGradRow { mean, r, slope, shift } = row;
        for (((d, &v), &gv), &w) in dst.iter_mut().zip(x).zip(g).zip(gamma) {
            *d = r * gv * w + slope * (v - mean) + shift;
        }
    }
}

/// Layer norm or RMS norm over the last dim with frozen `gamma` (and `beta`); gradient for `x`
/// only.
pub fn norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f64,
    kind: NormKind,
) -> candle_core::Result<Tensor> {
    let op = Norm {
        gamma: gamma.detach(),
        beta: beta.map(Tensor::detach),
        eps,
        kind,
    };
    x.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::kernels::timing::{best_of, random, reps};

    #[test]
    #[ignore]
    fn norm() -> candle_core::Result<()> {
        let x = random(&[512, 576], 1);
        let g = random(&[512, 576], 2);
        let gamma = ((random(&[576], 3) * 0.5)? + 1.0)?;
        for (kind, beta) in [
            (NormKind::RmsNorm, None),
            (NormKind::LayerNorm, Some(gamma.clone())),
        ] {
            let op = Norm {
                gamma: gamma.clone(),
                beta,
                eps: 1e-5,
                kind,
            };
            let y = x.apply_op1_no_bwd(&op)?;
            let fwd = best_of(reps(), || x.apply_op1_no_bwd(&op));
            let bwd = best_of(reps(), || op.bwd(&x, &y, &g));
            let ops = best_of(reps(), || op.tensor_backward(&x, &g));
            println!("{kind:?} [512, 576]: forward {fwd:?}, backward {bwd:?} (tensor ops {ops:?})");
        }
        Ok(())
    }
}
