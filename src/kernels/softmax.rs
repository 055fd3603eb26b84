//! `y = softmax(x + mask)` over the last dim, with a frozen additive mask `[B, 1, 1 | Tq, Tk]`
//! broadcast over `x: [B, H, Tq, Tk]`; backward `dx = y·(g − Σ g·y)`, one pass each way.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::blocks::ROWS_PER_TASK;
#[cfg(feature = "cuda")]
use super::cuda::{cuda_tensor, into_cuda};
use super::fast_exp;
use super::simd::{dot_f32, row_max};
use super::slices::{f32_input, grad_operands, output_storage};

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
                let max = row_max(dst);
                let inv = 1.0 / fast_exp::exp_shifted_sum(dst, max);
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
        if y.device().is_cpu() {
            return Ok(Some(y.apply_op2_no_bwd(grad_y, &SoftmaxGrad)?));
        }
        let dot = (grad_y * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * grad_y.broadcast_sub(&dot)?)?))
    }
}

/// `dx = y·(g − Σ g·y)` per row of the last dim, from `(y, g)`, in one pass.
struct SoftmaxGrad;

impl candle_core::CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        y_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (mut cy, mut cg) = (None, None);
        let (shape, ys, gs) = grad_operands(
            "masked-softmax-grad",
            y,
            y_layout,
            g,
            g_layout,
            &mut cy,
            &mut cg,
        )?;
        let tk = shape.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; ys.len()];
        if tk == 0 {
            return Ok((output_storage(out, &shape, y.dtype())?, shape));
        }
        out.par_chunks_exact_mut(tk)
            .zip(ys.par_chunks_exact(tk).zip(gs.par_chunks_exact(tk)))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(dst, (yr, gr))| {
                let dot = dot_f32(yr, gr);
                for ((d, &yv), &gv) in dst.iter_mut().zip(yr).zip(gr) {
                    *d = yv * (gv - dot);
                }
            });
        Ok((output_storage(out, &shape, y.dtype())?, shape))
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

#[cfg(test)]
mod timing {
    use super::*;
    use crate::kernels::timing::{best_of, random, reps};

    #[test]
    #[ignore]
    fn softmax() -> candle_core::Result<()> {
        let s = (random(&[4, 9, 128, 128], 6) * 5.0)?;
        let op = MaskedSoftmax { mask: None };
        let y = s.apply_op1_no_bwd(&op)?;
        let g = random(&[4, 9, 128, 128], 7);
        let fwd = best_of(reps(), || s.apply_op1_no_bwd(&op));
        let bwd = best_of(reps(), || op.bwd(&s, &y, &g));
        println!("MaskedSoftmax [4, 9, 128, 128]: forward {fwd:?}, backward {bwd:?}");
        Ok(())
    }
}
