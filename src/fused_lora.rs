//! The frozen linear layer and its LoRA delta as one op: `y = x Wᵀ + b + s (x Aᵀ) Bᵀ`.
//!
//! Shapes: `x: [.., in]`, frozen `W: [out, in]` and `b: [out]`, trainable `A: [r, in]` and
//! `B: [out, r]`, scaling `s`. Written as separate candle ops, the LoRA path costs the training
//! step an output-sized add in the forward and, in the backward, candle's gradient bookkeeping
//! for every intermediate (each starts from `zeros_like` and an `add`): the add's two inputs,
//! the scaled rank-r product, and a second contribution to `dL/dx`. One op keeps a single output
//! and a single `dL/dx`:
//!
//! - forward (CPU, f32): `y = x Wᵀ`, then `y += (s x Aᵀ) Bᵀ` accumulated by gemm in place, then
//!   the bias;
//! - backward (CPU, f32), with `g = dL/dy` and `h = s x Aᵀ` (recomputed), `u = s g B` (both
//!   `[N, r]`): `dL/dx = g W` with `u A` accumulated by gemm in place, `dL/dA = uᵀ x`,
//!   `dL/dB = gᵀ h`.
//!
//! `W` and `b` get no gradient (see `crate::frozen`). CPU only: `LoraAdapter` uses it for linear
//! layers on the CPU in f32 when it is the layer's only live adapter and dropout is off; every
//! other case (CUDA included) takes the base op plus `forward_delta`.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::cpu_gemm::{self, Strided, Threads};

struct FrozenLinearLora {
    weight: Tensor,
    bias: Option<Tensor>,
    scaling: f64,
}

/// A contiguous f32 CPU slice of `storage` under `layout`, or an error naming `what`.
fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("frozen-linear-lora: {what} must be f32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("frozen-linear-lora: {what} must be contiguous"),
    }
}

/// `dst = [dst +] lhs · rhs` on candle's threads.
fn gemm_f32(
    dst: &mut [f32],
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    mnk: (usize, usize, usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    cpu_gemm::gemm_f32(
        "frozen-linear-lora",
        dst,
        lhs,
        rhs,
        mnk,
        accumulate,
        Threads::Candle,
    )
}

impl CustomOp3 for FrozenLinearLora {
    fn name(&self) -> &'static str {
        "frozen-linear-lora"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = self.weight.dims2()?;
        let (rank, a_in) = a_layout.shape().dims2()?;
        let (b_out, b_rank) = b_layout.shape().dims2()?;
        let Some((&last, lead)) = x_layout.dims().split_last() else {
            candle_core::bail!("frozen-linear-lora: scalar input");
        };
        if last != in_f || a_in != in_f || b_out != out_f || b_rank != rank {
            candle_core::bail!(
                "frozen-linear-lora: x [.., {last}], A [{rank}, {a_in}], B [{b_out}, {b_rank}] do not fit W [{out_f}, {in_f}]"
            );
        }
        let rows: usize = lead.iter().product();
        let x = f32_slice(x, x_layout, "the input")?;
        let a = f32_slice(a, a_layout, "lora_A")?;
        let b = f32_slice(b, b_layout, "lora_B")?;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen-linear-lora: the weight is not on the CPU");
        };
        let w = f32_slice(w, w_layout, "the weight")?;

        // h = s x Aᵀ: scaling the rank-r intermediate costs r/out of scaling the output.
        let mut h = vec![0f32; rows * rank];
        gemm_f32(
            &mut h,
            Strided::rows(x, in_f),
            Strided::transposed(a, in_f),
            (rows, rank, in_f),
            false,
        )?;
        let s = self.scaling as f32;
        h.iter_mut().for_each(|v| *v *= s);

        let mut y = vec![0f32; rows * out_f];
        gemm_f32(
            &mut y,
            Strided::rows(x, in_f),
            Strided::transposed(w, in_f),
            (rows, out_f, in_f),
            false,
        )?;
        gemm_f32(
            &mut y,
            Strided::rows(&h, rank),
            Strided::transposed(b, rank),
            (rows, out_f, rank),
            true,
        )?;
        if let Some(bias) = &self.bias {
            let (bias_storage, bias_layout) = bias.storage_and_layout();
            let candle_core::Storage::Cpu(bias) = &*bias_storage else {
                candle_core::bail!("frozen-linear-lora: the bias is not on the CPU");
            };
            let bias = f32_slice(bias, bias_layout, "the bias")?;
            for row in y.chunks_exact_mut(out_f) {
                row.iter_mut().zip(bias).for_each(|(v, &c)| *v += c);
            }
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(out_f);
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients built from tracked tensors would carry this step's graph into
        // whatever keeps them (an optimiser's moments), and with it every activation.
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let g = grad_y.detach().contiguous()?;
        let (grad_x, grad_a, grad_b) = self.cpu_bwd(&x, &a, &b, &g)?;
        Ok((Some(grad_x), Some(grad_a), Some(grad_b)))
    }
}

impl FrozenLinearLora {
    /// The backward on the CPU in f32, with `h = s x Aᵀ` recomputed (`r` columns): gemm writes
    /// `dL/dx = g W` and accumulates `u A` into it in place, and no product is kept beyond the
    /// three gradients.
    fn cpu_bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (out_f, in_f) = self.weight.dims2()?;
        let (rank, _) = a.dims2()?;
        let rows = x.elem_count() / in_f.max(1);
        let s = self.scaling as f32;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (a_storage, a_layout) = a.storage_and_layout();
        let (b_storage, b_layout) = b.storage_and_layout();
        let (g_storage, g_layout) = g.storage_and_layout();
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let (
            candle_core::Storage::Cpu(xs),
            candle_core::Storage::Cpu(a_s),
            candle_core::Storage::Cpu(bs),
            candle_core::Storage::Cpu(gs),
            candle_core::Storage::Cpu(ws),
        ) = (
            &*x_storage,
            &*a_storage,
            &*b_storage,
            &*g_storage,
            &*w_storage,
        )
        else {
            candle_core::bail!("frozen-linear-lora: backward operands are not all on the CPU");
        };
        let xv = f32_slice(xs, x_layout, "the input")?;
        let av = f32_slice(a_s, a_layout, "lora_A")?;
        let bv = f32_slice(bs, b_layout, "lora_B")?;
        let gv = f32_slice(gs, g_layout, "the output gradient")?;
        let wv = f32_slice(ws, w_layout, "the weight")?;

        let mut h = vec![0f32; rows * rank];
        gemm_f32(
            &mut h,
            Strided::rows(xv, in_f),
            Strided::transposed(av, in_f),
            (rows, rank, in_f),
            false,
        )?;
        let mut u = vec![0f32; rows * rank];
        gemm_f32(
            &mut u,
            Strided::rows(gv, out_f),
            Strided::rows(bv, rank),
            (rows, rank, out_f),
            false,
        )?;
        h.iter_mut().chain(u.iter_mut()).for_each(|v| *v *= s);

        let mut grad_x = vec![0f32; rows * in_f];
        gemm_f32(
            &mut grad_x,
            Strided::rows(gv, out_f),
            Strided::rows(wv, in_f),
            (rows, in_f, out_f),
            false,
        )?;
        gemm_f32(
            &mut grad_x,
            Strided::rows(&u, rank),
            Strided::rows(av, in_f),
            (rows, in_f, rank),
            true,
        )?;
        let mut grad_a = vec![0f32; rank * in_f];
        gemm_f32(
            &mut grad_a,
            Strided::transposed(&u, rank),
            Strided::rows(xv, in_f),
            (rank, in_f, rows),
            false,
        )?;
        let mut grad_b = vec![0f32; out_f * rank];
        gemm_f32(
            &mut grad_b,
            Strided::transposed(gv, out_f),
            Strided::rows(&h, rank),
            (out_f, rank, rows),
            false,
        )?;
        let device = x.device();
        Ok((
            Tensor::from_vec(grad_x, x.shape(), device)?,
            Tensor::from_vec(grad_a, (rank, in_f), device)?,
            Tensor::from_vec(grad_b, (out_f, rank), device)?,
        ))
    }
}

/// `x Wᵀ + b + s (x Aᵀ) Bᵀ` as one op whose backward gives `dL/dx`, `dL/dA` and `dL/dB` (none
/// for the frozen `W` and `b`). CPU, f32 throughout: `x: [.., in]`, `W: [out, in]`, `b: [out]`,
/// `A: [r, in]`, `B: [out, r]`.
pub fn frozen_linear_lora(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora_a: &Tensor,
    lora_b: &Tensor,
    scaling: f64,
) -> candle_core::Result<Tensor> {
    let op = FrozenLinearLora {
        weight: weight.contiguous()?.detach(),
        bias: match bias {
            Some(b) => Some(b.contiguous()?.detach()),
            None => None,
        },
        scaling,
    };
    x.contiguous()?
        .apply_op3(&lora_a.contiguous()?, &lora_b.contiguous()?, op)
}
