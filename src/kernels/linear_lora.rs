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
//! `W` and `b` get no gradient (as in `frozen`). CPU only: `LoraAdapter` uses it for linear
//! layers on the CPU in f32 when it is the layer's only live adapter and dropout is off; every
//! other case (CUDA included) takes the base op plus `forward_delta`.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::blocks::{ROWS_PER_TASK, zeros};
use super::frozen_weight::FrozenWeight;
use super::gemm::{self, Strided, Threads};
use super::lowp::WeightMatrix;
use super::slices::f32_slice;

const OP: &str = "frozen-linear-lora";

struct FrozenLinearLora {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    scaling: f64,
}

/// `dst = [dst +] lhs · rhs` on candle's threads.
fn gemm_f32(
    dst: &mut [f32],
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    mnk: (usize, usize, usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    gemm::gemm_f32(OP, dst, lhs, rhs, mnk, accumulate, Threads::Candle)
}

/// LoRA factors as values: `A: [r, in]`, `B: [out, r]`, scaling `s`.
#[derive(Clone, Copy)]
pub(crate) struct LoraValues<'a> {
    pub(crate) a: &'a [f32],
    pub(crate) b: &'a [f32],
    pub(crate) rank: usize,
    pub(crate) scaling: f32,
}

/// A frozen linear layer, optionally with a LoRA delta, as values: the kernels of this op on
/// slices, for fused ops that chain several layers (the decoder blocks).
#[derive(Clone, Copy)]
pub(crate) struct LinearValues<'a> {
    /// `W: [out, in]` in its stored type.
    pub(crate) weight: WeightMatrix<'a>,
    pub(crate) out_features: usize,
    pub(crate) in_features: usize,
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) lora: Option<LoraValues<'a>>,
}

impl LinearValues<'_> {
    fn check(
        &self,
        what: &str,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> candle_core::Result<()> {
        if values.len() != rows * cols {
            candle_core::bail!(
                "frozen-linear-lora: {what} has {} values, expected {rows}×{cols}",
                values.len()
            );
        }
        Ok(())
    }

    fn check_operands(&self) -> candle_core::Result<()> {
        let (out_f, in_f) = (self.out_features, self.in_features);
        if (self.weight.rows(), self.weight.cols()) != (out_f, in_f) {
            candle_core::bail!(
                "frozen-linear-lora: the weight is {}×{}, expected {out_f}×{in_f}",
                self.weight.rows(),
                self.weight.cols()
            );
        }
        if let Some(bias) = self.bias {
            self.check("the bias", bias, 1, out_f)?;
        }
        if let Some(l) = &self.lora {
            self.check("lora_A", l.a, l.rank, in_f)?;
            self.check("lora_B", l.b, out_f, l.rank)?;
        }
        Ok(())
    }

    /// `s x Aᵀ`, `[rows, r]`: scaling the rank-r intermediate costs r/out of scaling the output.
    fn lora_hidden(
        &self,
        l: &LoraValues<'_>,
        x: &[f32],
        rows: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let mut h = vec![0f32; rows * l.rank];
        gemm_f32(
            &mut h,
            Strided::rows(x, self.in_features),
            Strided::transposed(l.a, self.in_features),
            (rows, l.rank, self.in_features),
            false,
        )?;
        h.iter_mut().for_each(|v| *v *= l.scaling);
        Ok(h)
    }

    /// `y = x Wᵀ + b + s (x Aᵀ) Bᵀ` for `x: [rows, in]`; gemm accumulates the LoRA product into
    /// the base output in place.
    pub(crate) fn forward(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let (out_f, in_f) = (self.out_features, self.in_features);
        self.check_operands()?;
        self.check("the input", x, rows, in_f)?;
        let mut y = zeros(rows * out_f);
        self.weight
            .xwt(OP, &mut y, x, rows, 0..out_f, false, Threads::Candle)?;
        if let Some(l) = &self.lora {
            let h = self.lora_hidden(l, x, rows)?;
            gemm_f32(
                &mut y,
                Strided::rows(&h, l.rank),
                Strided::transposed(l.b, l.rank),
                (rows, out_f, l.rank),
                true,
            )?;
        }
        // Added after the products, as the separate frozen matmul adds it, so a fused block and
        // the separate ops give the same bits.
        if let Some(bias) = self.bias.filter(|_| out_f > 0) {
            y.par_chunks_mut(out_f * ROWS_PER_TASK).for_each(|rows| {
                for row in rows.chunks_exact_mut(out_f) {
                    row.iter_mut().zip(bias).for_each(|(v, &c)| *v += c);
                }
            });
        }
        Ok(y)
    }

    /// For `g = dL/dy`: writes `dL/dx = g W + u A` into `grad_x` (or adds it, with
    /// `accumulate`), with `u = s g B`, and returns `(dL/dA, dL/dB) = (uᵀ x, gᵀ h)` when there
    /// is a LoRA delta (`h = s x Aᵀ`, recomputed).
    pub(crate) fn backward(
        &self,
        x: &[f32],
        g: &[f32],
        rows: usize,
        grad_x: &mut [f32],
        accumulate: bool,
    ) -> candle_core::Result<Option<(Vec<f32>, Vec<f32>)>> {
        let (out_f, in_f) = (self.out_features, self.in_features);
        self.check_operands()?;
        self.check("the input", x, rows, in_f)?;
        self.check("the output gradient", g, rows, out_f)?;
        self.check("the input gradient", grad_x, rows, in_f)?;
        self.weight
            .gw(OP, grad_x, g, rows, 0..out_f, accumulate, Threads::Candle)?;
        self.lora_grads(x, g, rows, Some(grad_x))
    }

    /// The factor gradients of [`Self::backward`] alone, for an input that needs no gradient.
    pub(crate) fn factor_grads(
        &self,
        x: &[f32],
        g: &[f32],
        rows: usize,
    ) -> candle_core::Result<Option<(Vec<f32>, Vec<f32>)>> {
        let (out_f, in_f) = (self.out_features, self.in_features);
        self.check_operands()?;
        self.check("the input", x, rows, in_f)?;
        self.check("the output gradient", g, rows, out_f)?;
        self.lora_grads(x, g, rows, None)
    }

    /// `(dL/dA, dL/dB)` when there is a LoRA delta, adding `u A` to `grad_x` when given.
    fn lora_grads(
        &self,
        x: &[f32],
        g: &[f32],
        rows: usize,
        grad_x: Option<&mut [f32]>,
    ) -> candle_core::Result<Option<(Vec<f32>, Vec<f32>)>> {
        let (out_f, in_f) = (self.out_features, self.in_features);
        let Some(l) = &self.lora else {
            return Ok(None);
        };
        let h = self.lora_hidden(l, x, rows)?;
        let mut u = vec![0f32; rows * l.rank];
        gemm_f32(
            &mut u,
            Strided::rows(g, out_f),
            Strided::rows(l.b, l.rank),
            (rows, l.rank, out_f),
            false,
        )?;
        u.iter_mut().for_each(|v| *v *= l.scaling);
        if let Some(grad_x) = grad_x {
            gemm_f32(
                grad_x,
                Strided::rows(&u, l.rank),
                Strided::rows(l.a, in_f),
                (rows, in_f, l.rank),
                true,
            )?;
        }
        let mut grad_a = vec![0f32; l.rank * in_f];
        gemm_f32(
            &mut grad_a,
            Strided::transposed(&u, l.rank),
            Strided::rows(x, in_f),
            (l.rank, in_f, rows),
            false,
        )?;
        let mut grad_b = vec![0f32; out_f * l.rank];
        gemm_f32(
            &mut grad_b,
            Strided::transposed(g, out_f),
            Strided::rows(&h, l.rank),
            (out_f, l.rank, rows),
            false,
        )?;
        Ok(Some((grad_a, grad_b)))
    }
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
        let (out_f, in_f) = self.weight_dims()?;
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
        let x = f32_slice(OP, "the input", x, x_layout)?;
        let a = f32_slice(OP, "lora_A", a, a_layout)?;
        let b = f32_slice(OP, "lora_B", b, b_layout)?;
        let w_guard = self.weight.values()?;
        let w = w_guard.matrix(OP, "the weight", (out_f, in_f))?;

        let bias_values = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_values {
            Some((storage, layout)) => {
                let candle_core::Storage::Cpu(bias) = &**storage else {
                    candle_core::bail!("frozen-linear-lora: the bias is not on the CPU");
                };
                Some(f32_slice(OP, "the bias", bias, layout)?)
            }
            None => None,
        };
        let linear = LinearValues {
            weight: w,
            out_features: out_f,
            in_features: in_f,
            bias,
            lora: Some(LoraValues {
                a,
                b,
                rank,
                scaling: self.scaling as f32,
            }),
        };
        let y = linear.forward(x, rows)?;
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
    fn weight_dims(&self) -> candle_core::Result<(usize, usize)> {
        match self.weight.dims() {
            &[out_f, in_f] => Ok((out_f, in_f)),
            dims => candle_core::bail!("frozen-linear-lora: the weight is not 2-D: {dims:?}"),
        }
    }

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
        let (out_f, in_f) = self.weight_dims()?;
        let (rank, _) = a.dims2()?;
        let rows = x.elem_count() / in_f.max(1);
        let s = self.scaling as f32;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (a_storage, a_layout) = a.storage_and_layout();
        let (b_storage, b_layout) = b.storage_and_layout();
        let (g_storage, g_layout) = g.storage_and_layout();
        let (
            candle_core::Storage::Cpu(xs),
            candle_core::Storage::Cpu(a_s),
            candle_core::Storage::Cpu(bs),
            candle_core::Storage::Cpu(gs),
        ) = (&*x_storage, &*a_storage, &*b_storage, &*g_storage)
        else {
            candle_core::bail!("frozen-linear-lora: backward operands are not all on the CPU");
        };
        let xv = f32_slice(OP, "the input", xs, x_layout)?;
        let av = f32_slice(OP, "lora_A", a_s, a_layout)?;
        let bv = f32_slice(OP, "lora_B", bs, b_layout)?;
        let gv = f32_slice(OP, "the output gradient", gs, g_layout)?;
        let w_guard = self.weight.values()?;
        let wv = w_guard.matrix(OP, "the weight", (out_f, in_f))?;

        let linear = LinearValues {
            weight: wv,
            out_features: out_f,
            in_features: in_f,
            bias: None,
            lora: Some(LoraValues {
                a: av,
                b: bv,
                rank,
                scaling: s,
            }),
        };
        let mut grad_x = zeros(rows * in_f);
        let Some((grad_a, grad_b)) = linear.backward(xv, gv, rows, &mut grad_x, false)? else {
            candle_core::bail!("frozen-linear-lora: no LoRA gradients");
        };
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
/// `A: [r, in]`, `B: [out, r]`. See [`frozen_linear_lora_weight`] for `W` in another stored type.
pub fn frozen_linear_lora(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora_a: &Tensor,
    lora_b: &Tensor,
    scaling: f64,
) -> candle_core::Result<Tensor> {
    let weight = FrozenWeight::Dense(weight.contiguous()?.detach());
    frozen_linear_lora_weight(x, &weight, bias, lora_a, lora_b, scaling)
}

/// [`frozen_linear_lora`] with `W` in its stored type (f32, f16, bf16 or ggml blocks, read tile
/// by tile); everything else f32 on the CPU.
pub fn frozen_linear_lora_weight(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    lora_a: &Tensor,
    lora_b: &Tensor,
    scaling: f64,
) -> candle_core::Result<Tensor> {
    let weight = match weight {
        FrozenWeight::Dense(w) => FrozenWeight::Dense(w.contiguous()?.detach()),
        quantized => quantized.clone(),
    };
    let op = FrozenLinearLora {
        weight,
        bias: match bias {
            Some(b) => Some(b.contiguous()?.detach()),
            None => None,
        },
        scaling,
    };
    x.contiguous()?
        .apply_op3(&lora_a.contiguous()?, &lora_b.contiguous()?, op)
}
