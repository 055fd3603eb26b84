//! Fused ops with a backward, for training paths.
//!
//! candle's fused `layer_norm`, `rms_norm` and `softmax_last_dim` have no backward (the gradient
//! silently stops), and the differentiable compositions (`layer_norm_slow`, `ops::softmax`) run
//! five to eight separate passes, each allocating, and give every frozen operand (norm weights,
//! the attention mask) an activation-sized gradient nobody reads. These ops run one pass on the
//! CPU (in f32, converting other dtypes; on CUDA they run candle's tensor ops inside the op) and their
//! backward returns only `dL/dx`: norm weights and masks are frozen.
//!
//! - `norm(x, γ, β, eps, kind)`: over the last dim, `LayerNorm: y = (x − μ)·r·γ + β` with
//!   `r = 1/√(var + eps)`, or `RmsNorm: y = x·r·γ` with `r = 1/√(mean(x²) + eps)`.
//!   Backward with `x̂ = (x − μ)·r` (or `x·r`) and `g' = g·γ`:
//!   LayerNorm `dx = r·(g' − mean(g') − x̂·mean(g'·x̂))`, RmsNorm `dx = r·(g' − x̂·mean(g'·x̂))`.
//! - `gelu_erf(x)`: `y = x·Φ(x) = ½x(1 + erf(x/√2))`, backward `dx = g·(Φ(x) + x·φ(x))`, with
//!   `erf` from Abramowitz–Stegun 7.1.26 (absolute error ≤ 1.5e-7), one pass each way.
//! - `masked_softmax(x, mask)`: `y = softmax(x + mask)` over the last dim, with a frozen additive
//!   mask `[B, 1, 1 | Tq, Tk]` broadcast over `x: [B, H, Tq, Tk]`. Backward
//!   `dx = y·(g − Σ g·y)`.
//! - `cross_entropy_rows(logits, targets)`: per-row `ℓ_i = lse(x_i) − x_i[t_i]` with
//!   `lse(x) = m + ln Σ_j exp(x_j − m)`, `m = max_j x_j`, over `logits: [N, V]`; backward
//!   `dx_ij = g_i·(exp(x_ij − lse_i) − [j = t_i])`, with `lse_i = ℓ_i + x_i[t_i]` recovered from
//!   the output, so neither pass materialises a softmax or log-softmax. For a language model's
//!   `[B·T, vocab]` logits this replaces five full-size passes (and their gradients) by two.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Work per rayon task in the CPU kernels: small tensors stay on one thread.
const ROWS_PER_TASK: usize = 64;
const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// Which normalisation `norm` computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    LayerNorm,
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

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        "frozen-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = layout.shape().clone();
        let mut converted = None;
        let src = f32_input(x, layout, &mut converted)?;
        let dim = shape.dims().last().copied().unwrap_or(1);
        let gamma = self.gamma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let beta = match &self.beta {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        if gamma.len() != dim || beta.as_ref().is_some_and(|b| b.len() != dim) {
            candle_core::bail!(
                "frozen-norm: weight has {} elements, input rows {dim}",
                gamma.len()
            );
        }
        let mut out = vec![0f32; src.len()];
        let rows = src.par_chunks_exact(dim).zip(out.par_chunks_exact_mut(dim));
        rows.with_min_len(ROWS_PER_TASK).for_each(|(row, dst)| {
            let mean = match self.kind {
                NormKind::LayerNorm => row.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64,
                NormKind::RmsNorm => 0.0,
            };
            let var = row
                .iter()
                .map(|&v| {
                    let c = f64::from(v) - mean;
                    c * c
                })
                .sum::<f64>()
                / dim as f64;
            let r = 1.0 / (var + self.eps).sqrt();
            let (mean, r) = (mean as f32, r as f32);
            match &beta {
                Some(beta) => {
                    for (((d, &v), &g), &b) in dst.iter_mut().zip(row).zip(&gamma).zip(beta) {
                        *d = (v - mean) * r * g + b;
                    }
                }
                None => {
                    for ((d, &v), &g) in dst.iter_mut().zip(row).zip(&gamma) {
                        *d = (v - mean) * r * g;
                    }
                }
            }
        });
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
        let (xhat, r) = self.normalized(x)?;
        let g = grad_y
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.gamma.to_dtype(DType::F32)?)?;
        let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        let mut inner = g.broadcast_sub(&xhat.broadcast_mul(&proj)?)?;
        if self.kind == NormKind::LayerNorm {
            inner = inner.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
        }
        Ok(Some(inner.broadcast_mul(&r)?.to_dtype(x.dtype())?))
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

/// `erf(x)`, Abramowitz–Stegun 7.1.26: absolute error ≤ 1.5e-7, far below f32 GELU's needs and
/// several times cheaper than libm's.
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * (-x * x).exp();
    if x < 0.0 { -y } else { y }
}

/// `Φ(x)` and `φ(x)`: the standard normal CDF and density.
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    (
        0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)),
        FRAC_1_SQRT_2PI * (-0.5 * x * x).exp(),
    )
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = layout.shape().clone();
        let mut converted = None;
        let src = f32_input(x, layout, &mut converted)?;
        let out = src
            .par_iter()
            .with_min_len(ELEMENTS_PER_TASK)
            .map(|&v| v * normal_cdf_pdf(v).0)
            .collect();
        Ok((output_storage(out, &shape, x.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let t = cuda_tensor(x, layout)?;
        into_cuda(t.gelu_erf()?)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(grad_y, &GeluErfGrad)?))
    }
}

/// `g·(Φ(x) + x·φ(x))`: GELU's backward in one pass.
struct GeluErfGrad;

impl candle_core::CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = x_layout.shape().clone();
        if g_layout.shape() != &shape {
            candle_core::bail!(
                "gelu-erf-grad: gradient {:?} vs input {:?}",
                g_layout.shape(),
                shape
            );
        }
        let (mut cx, mut cg) = (None, None);
        let xs = f32_input(x, x_layout, &mut cx)?;
        let gs = f32_input(g, g_layout, &mut cg)?;
        let out = xs
            .par_iter()
            .zip(gs)
            .with_min_len(ELEMENTS_PER_TASK)
            .map(|(&v, &g)| {
                let (cdf, pdf) = normal_cdf_pdf(v);
                g * (cdf + v * pdf)
            })
            .collect();
        Ok((output_storage(out, &shape, g.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        g: &candle_core::CudaStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = cuda_tensor(x, x_layout)?;
        let g = cuda_tensor(g, g_layout)?;
        let cdf = ((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
        let pdf = ((x.sqr()? * -0.5)?.exp()?
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        into_cuda(((cdf? + (&x * pdf)?)? * g)?)
    }
}

/// GELU with the exact (erf) form, as BERT uses it; gradient in one fused pass.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

struct MaskedSoftmax {
    mask: Option<Tensor>,
}

impl MaskedSoftmax {
    #[cfg(feature = "cuda")]
    fn tensor_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = match &self.mask {
            Some(m) => x.broadcast_add(&m.to_dtype(x.dtype())?)?,
            None => x.clone(),
        };
        candle_nn::ops::softmax_last_dim(&x)
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = layout.shape().clone();
        let dims = shape.dims();
        let &[b, h, tq, tk] = dims else {
            candle_core::bail!("masked-softmax: expected [B, H, Tq, Tk], got {dims:?}");
        };
        // The mask as `[B, Mq, Tk]` with Mq = 1 or Tq.
        let mask = match &self.mask {
            Some(m) => {
                let (mb, mh, mq, mk) = m.dims4()?;
                if mb != b || mh != 1 || (mq != 1 && mq != tq) || mk != tk {
                    candle_core::bail!(
                        "masked-softmax: mask {:?} does not broadcast to {dims:?}",
                        m.dims()
                    );
                }
                Some((m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, mq))
            }
            None => None,
        };
        let mut converted = None;
        let src = f32_input(x, layout, &mut converted)?;
        let mut out = vec![0f32; src.len()];
        let rows = src.par_chunks_exact(tk).zip(out.par_chunks_exact_mut(tk));
        rows.enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(row_idx, (row, dst))| {
                let q = row_idx % tq;
                let batch = row_idx / (h * tq);
                let mask_row = mask.as_ref().map(|(m, mq)| {
                    let mq_idx = if *mq == 1 { 0 } else { q };
                    let offset = (batch * mq + mq_idx) * tk;
                    &m[offset..offset + tk]
                });
                match mask_row {
                    Some(m) => {
                        for ((d, &v), &mv) in dst.iter_mut().zip(row).zip(m) {
                            *d = v + mv;
                        }
                    }
                    None => dst.copy_from_slice(row),
                }
                let max = dst.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for d in dst.iter_mut() {
                    *d = (*d - max).exp();
                    sum += *d;
                }
                let inv = 1.0 / sum;
                for d in dst.iter_mut() {
                    *d *= inv;
                }
            });
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

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dot = (grad_y * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * grad_y.broadcast_sub(&dot)?)?))
    }
}

/// `softmax(x + mask)` over the last dim of `x: [B, H, Tq, Tk]`, with a frozen additive `mask`
/// of shape `[B, 1, 1 | Tq, Tk]`; gradient for `x` only.
pub fn masked_softmax(x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let op = MaskedSoftmax {
        mask: mask.map(|m| m.detach()),
    };
    x.contiguous()?.apply_op1(op)
}

struct CrossEntropyRows {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = layout.shape().dims2()?;
        check_targets(&self.targets, n, v)?;
        let mut converted = None;
        let src = f32_input(x, layout, &mut converted)?;
        let out: Vec<f32> = src
            .par_chunks_exact(v)
            .zip(&self.targets)
            .with_min_len(4)
            .map(|(row, &t)| log_sum_exp(row) - row[t as usize])
            .collect();
        let shape = Shape::from(n);
        Ok((output_storage(out, &shape, x.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = cuda_tensor(x, layout)?.to_dtype(DType::F32)?;
        let targets = Tensor::new(self.targets.as_slice(), x.device())?;
        let lse = candle_nn::ops::log_softmax(&x, D::Minus1)?;
        let picked = lse.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        into_cuda(picked.neg()?)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let targets = Tensor::new(self.targets.as_slice(), x.device())?;
        let x_t = x
            .to_dtype(DType::F32)?
            .gather(&targets.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        let lse = (y.to_dtype(DType::F32)? + x_t)?;
        let op = CrossEntropyGrad {
            targets: self.targets.clone(),
            lse: lse.to_vec1::<f32>()?,
        };
        Ok(Some(x.apply_op2_no_bwd(grad_y, &op)?))
    }
}

fn check_targets(targets: &[u32], n: usize, v: usize) -> candle_core::Result<()> {
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross-entropy: target {t} is out of range for {v} classes");
    }
    Ok(())
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

/// `g_i·(softmax(x_i) − onehot(t_i))`: the cross-entropy backward in one pass.
struct CrossEntropyGrad {
    targets: Vec<u32>,
    lse: Vec<f32>,
}

impl candle_core::CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = x_layout.shape().clone();
        let (n, v) = shape.dims2()?;
        check_targets(&self.targets, n, v)?;
        if g_layout.shape().dims() != [n] {
            candle_core::bail!(
                "cross-entropy-grad: gradient {:?} for {n} rows",
                g_layout.shape()
            );
        }
        let (mut cx, mut cg) = (None, None);
        let xs = f32_input(x, x_layout, &mut cx)?;
        let gs = f32_input(g, g_layout, &mut cg)?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_exact_mut(v)
            .zip(xs.par_chunks_exact(v))
            .enumerate()
            .with_min_len(4)
            .for_each(|(i, (dst, row))| {
                let (gi, lse) = (gs[i], self.lse[i]);
                for (d, &xv) in dst.iter_mut().zip(row) {
                    *d = gi * (xv - lse).exp();
                }
                dst[self.targets[i] as usize] -= gi;
            });
        Ok((output_storage(out, &shape, x.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        g: &candle_core::CudaStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = cuda_tensor(x, x_layout)?;
        let g = cuda_tensor(g, g_layout)?.to_dtype(DType::F32)?;
        let (n, v) = x.dims2()?;
        let lse = Tensor::new(self.lse.as_slice(), x.device())?;
        let probs = x
            .to_dtype(DType::F32)?
            .broadcast_sub(&lse.unsqueeze(1)?)?
            .exp()?;
        let targets = Tensor::new(self.targets.as_slice(), x.device())?;
        let onehot = candle_nn::encoding::one_hot(targets, v, 1f32, 0f32)?;
        let dx = (probs - onehot)?.broadcast_mul(&g.reshape((n, 1))?)?;
        into_cuda(dx.to_dtype(x.dtype())?)
    }
}

/// Per-row cross-entropy `lse(x_i) − x_i[t_i]` of `logits: [N, V]` against `targets` (N class
/// ids), `[N]` in the logits' dtype; one fused pass each way (gradient for the logits only).
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropyRows {
        targets: targets.to_vec(),
    })
}

/// The input as contiguous f32 values: borrowed when it already is, converted otherwise.
fn f32_input<'a>(
    x: &'a CpuStorage,
    layout: &Layout,
    converted: &'a mut Option<CpuStorage>,
) -> candle_core::Result<&'a [f32]> {
    if let (CpuStorage::F32(data), Some((start, end))) = (x, layout.contiguous_offsets()) {
        return Ok(&data[start..end]);
    }
    let c = converted.insert(x.to_dtype(layout, DType::F32)?);
    match c {
        CpuStorage::F32(data) => Ok(data.as_slice()),
        _ => candle_core::bail!("fused op: conversion to f32 failed"),
    }
}

/// The f32 result in the input's dtype.
fn output_storage(out: Vec<f32>, shape: &Shape, dtype: DType) -> candle_core::Result<CpuStorage> {
    let out = CpuStorage::F32(out);
    if dtype == DType::F32 {
        return Ok(out);
    }
    out.to_dtype(&Layout::contiguous(shape), dtype)
}

/// A contiguous copy, at offset 0, of the elements `layout` selects.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_contiguous(
    x: &candle_core::CudaStorage,
    layout: &Layout,
) -> candle_core::Result<candle_core::CudaStorage> {
    use candle_core::backend::BackendDevice;
    // SAFETY: every element of the fresh buffer is written by copy_strided_src below.
    let mut dst = unsafe { x.device().alloc_uninit(layout.shape(), x.dtype())? };
    x.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

#[cfg(feature = "cuda")]
fn cuda_tensor(x: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<Tensor> {
    Ok(Tensor::from_storage(
        candle_core::Storage::Cuda(cuda_contiguous(x, layout)?),
        layout.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

#[cfg(feature = "cuda")]
fn into_cuda(t: Tensor) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    let shape = t.shape().clone();
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        candle_core::bail!("fused op: result left the GPU");
    };
    Ok((cuda_contiguous(s, layout)?, shape))
}
