//! Per-row cross-entropy `ℓ_i = lse(x_i) − x_i[t_i]` with `lse(x) = m + ln Σ_j exp(x_j − m)`,
//! `m = max_j x_j`, over `logits: [N, V]`; backward `dx_ij = g_i·(exp(x_ij − lse_i) − [j = t_i])`,
//! with `lse_i = ℓ_i + x_i[t_i]` recovered from the output, so neither pass materialises a
//! softmax or log-softmax. For a language model's `[B·T, vocab]` logits this replaces five
//! full-size passes (and their gradients) by two.

#[cfg(feature = "cuda")]
use candle_core::D;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::blocks::collect_rows;
#[cfg(feature = "cuda")]
use super::cuda::{cuda_tensor, into_cuda};
use super::fast_exp;
use super::simd::row_max;
use super::slices::{f32_input, output_storage};

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
    let max = row_max(row);
    max + fast_exp::sum_exp_shifted(row, max).ln()
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
        let fill = |&(): &(), i: usize, start: usize, dst: &mut [f32]| {
            let (gi, lse) = (gs[i], self.lse[i]);
            dst.copy_from_slice(&xs[i * v + start..i * v + start + dst.len()]);
            fast_exp::exp_shifted_in_place(dst, lse);
            for d in dst.iter_mut() {
                *d *= gi;
            }
            if let Some(d) = (self.targets[i] as usize)
                .checked_sub(start)
                .and_then(|t| dst.get_mut(t))
            {
                *d -= gi;
            }
        };
        let out = collect_rows(n, v, 4, |_| (), fill);
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

#[cfg(test)]
mod timing {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::kernels::timing::{best_of, random, reps};

    #[test]
    #[ignore]
    fn cross_entropy() -> candle_core::Result<()> {
        let (n, v) = (512, 49152);
        let logits = (random(&[n, v], 8) * 5.0)?;
        let targets: Vec<u32> = (0..n).map(|i| (i * 97 % v) as u32).collect();
        let op = CrossEntropyRows {
            targets: targets.clone(),
        };
        let y = logits.apply_op1_no_bwd(&op)?;
        let g = Tensor::full(1.0 / n as f32, n, &Device::Cpu)?;
        let reps = reps().min(10);
        let fwd = best_of(reps, || logits.apply_op1_no_bwd(&op));
        let bwd = best_of(reps, || op.bwd(&logits, &y, &g));
        println!("CrossEntropyRows [{n}, {v}]: forward {fwd:?}, backward {bwd:?}");
        Ok(())
    }
}
