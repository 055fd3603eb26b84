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

use crate::fast_exp;

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

impl Norm {
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
                let head = |i: usize| self.row_stats(&src[i * dim..(i + 1) * dim]);
                let fill = |&(mean, r): &(f32, f32), i: usize, start: usize, dst: &mut [f32]| {
                    let at = i * dim + start;
                    let beta = beta.map(|b| &b[start..]);
                    norm_block(dst, &src[at..], &gamma[start..], beta, mean, r);
                };
                Ok(collect_rows(
                    src.len() / dim,
                    dim,
                    ROWS_PER_TASK,
                    head,
                    fill,
                ))
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

/// `dx` of [`Norm`] from `(x, dL/dy)`, one pass per row after its sums. With `c = x − μ` (`x`
/// for RmsNorm), `x̂ = c·r` and `g' = g·γ`, the formula in the module doc expands to
/// `dx = r·g' − r·mean(g') − c·r³·mean(g'·c)`: one pass for `Σc²` (which gives `r`), `Σg'`
/// and `Σg'·c` (after one for `μ` with LayerNorm), then one multiply-add per element.
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
        let shape = x_layout.shape().clone();
        if g_layout.shape() != &shape {
            candle_core::bail!(
                "frozen-norm-grad: gradient {:?} vs input {:?}",
                g_layout.shape(),
                shape
            );
        }
        let (mut cx, mut cg) = (None, None);
        let xs = f32_input(x, x_layout, &mut cx)?;
        let gs = f32_input(g, g_layout, &mut cg)?;
        let dim = shape.dims().last().copied().unwrap_or(1);
        if dim == 0 {
            return Ok((output_storage(Vec::new(), &shape, x.dtype())?, shape));
        }
        let norm = self.0;
        let n = dim as f64;
        let out = with_f32_values(self.name(), &norm.gamma, dim, |gamma| {
            let head = |i: usize| {
                let (row, grad) = (&xs[i * dim..(i + 1) * dim], &gs[i * dim..(i + 1) * dim]);
                let mean = norm.row_mean(row);
                let sums = norm_grad_sums(row, grad, gamma, mean);
                let r = norm.inv_rms(sums.sq, dim);
                let r64 = f64::from(r);
                let shift = match norm.kind {
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
                norm_grad_block(dst, &xs[at..], &gs[at..], &gamma[start..], row);
            };
            Ok(collect_rows(xs.len() / dim, dim, ROWS_PER_TASK, head, fill))
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

/// Defines `fn $name` with its body compiled twice: for the crate's baseline target, and with
/// AVX2 and FMA enabled, the second chosen at run time where the CPU has them. The crate is
/// built for baseline x86-64, where the loops vectorise four f32 wide (two f64) instead of
/// eight (four).
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            if $crate::ops::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { avx2($($arg),*) };
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// Whether [`simd_kernel`]s take their AVX2 + FMA copy (the answer is cached by std).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Independent accumulators for the row reductions: one running sum is a chain of dependent
/// adds (an add's latency per element); sixteen chains fill two AVX registers and vectorise.
const LANES: usize = 16;

/// The row sums accumulate in f32 lanes within each [`BLOCK`] (sixteen values per lane, so
/// relative error ≤ 16·2⁻²⁴ there) and in f64 across blocks, so the error does not grow with the
/// row length; whole-row f64 accumulation is several times slower, and f32's error over a
/// block of 256 is already below the f32 result's rounding.
#[inline(always)]
fn lanes_to_f64(acc: &[f32; LANES], tail: f32) -> f64 {
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail)
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

/// `max v` (`-∞` for an empty slice), with independent lanes so it vectorises; NaNs are
/// skipped, as `f32::max` skips them.
fn row_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let lanes = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    chunks.remainder().iter().copied().fold(lanes, f32::max)
}

/// Runs `f` on the `len` f32 values of a (1-D) CPU weight, borrowed when it is contiguous f32
/// already (the usual case: no copy per call), converted otherwise.
fn with_f32_values<R>(
    op: &str,
    t: &Tensor,
    len: usize,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    if t.elem_count() != len {
        candle_core::bail!(
            "{op}: weight has {} elements, input rows {len}",
            t.elem_count()
        );
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return f(&v[start..end]);
        }
    }
    let values = t
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    f(&values)
}

fn with_optional_f32_values<R>(
    op: &str,
    t: Option<&Tensor>,
    len: usize,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_f32_values(op, t, len, |v| f(Some(v))),
        None => f(None),
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

/// Values per block of the blocked kernels: a block's intermediate values (an `exp` pass's
/// output, a row block before it is copied out) stay in a stack buffer, in L1.
pub(crate) const BLOCK: usize = 256;

/// `rows × row_len` values computed on rayon tasks of at least `min_rows` rows:
/// `head(i)` computes row `i`'s state once, then `fill(&state, i, start, block)` sets `block`
/// to the row's values `start..start + block.len()`, for blocks of at most [`BLOCK`].
///
/// Each value is written to the output once: `vec![0.0; n]` followed by the kernel would first
/// zero the whole buffer, an extra pass over memory as large as the output (freed memory is
/// reused, so the zeroing is not free).
fn collect_rows<S>(
    rows: usize,
    row_len: usize,
    min_rows: usize,
    head: impl Fn(usize) -> S + Sync,
    fill: impl Fn(&S, usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let len = rows * row_len;
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_exact_mut(row_len)
        .enumerate()
        .with_min_len(min_rows)
        .for_each(|(i, dst)| {
            let state = head(i);
            let mut buf = [0f32; BLOCK];
            for (b, dst) in dst.chunks_mut(BLOCK).enumerate() {
                fill(&state, i, b * BLOCK, &mut buf[..dst.len()]);
                copy_out(dst, &buf);
            }
        });
    // SAFETY: the chunks above cover `out[..len]` and `copy_out` wrote every element of each.
    unsafe { out.set_len(len) };
    out
}

/// `len` values computed in blocks of [`BLOCK`] on rayon tasks of at least
/// [`ELEMENTS_PER_TASK`] values: `fill(start, block)` sets `block` to values
/// `start..start + block.len()`. Written once, as in [`collect_rows`].
pub(crate) fn collect_blocks(len: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(BLOCK)
        .enumerate()
        .with_min_len(ELEMENTS_PER_TASK / BLOCK)
        .for_each(|(b, dst)| {
            let mut buf = [0f32; BLOCK];
            fill(b * BLOCK, &mut buf[..dst.len()]);
            copy_out(dst, &buf);
        });
    // SAFETY: the chunks above cover `out[..len]` and `copy_out` wrote every element of each.
    unsafe { out.set_len(len) };
    out
}

/// Two outputs of `len` values each, stacked as `[2·len]`, computed together in blocks:
/// `fill(start, first, second)` sets both blocks. Written once, as in [`collect_rows`].
pub(crate) fn collect_block_pairs(
    len: usize,
    fill: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * len);
    let (first, second) = out.spare_capacity_mut()[..2 * len].split_at_mut(len);
    first
        .par_chunks_mut(BLOCK)
        .zip(second.par_chunks_mut(BLOCK))
        .enumerate()
        .with_min_len(ELEMENTS_PER_TASK / BLOCK)
        .for_each(|(b, (d1, d2))| {
            let (mut buf1, mut buf2) = ([0f32; BLOCK], [0f32; BLOCK]);
            fill(b * BLOCK, &mut buf1[..d1.len()], &mut buf2[..d2.len()]);
            copy_out(d1, &buf1);
            copy_out(d2, &buf2);
        });
    // SAFETY: the chunks of both halves cover `out[..2 * len]` and `copy_out` wrote every
    // element of each (the zipped chunks have equal lengths, as the halves do).
    unsafe { out.set_len(2 * len) };
    out
}

/// Writes all of `dst` (at most [`BLOCK`] long: a chunk of `chunks_mut(BLOCK)`) from `buf`.
fn copy_out(dst: &mut [std::mem::MaybeUninit<f32>], buf: &[f32; BLOCK]) {
    for (d, &v) in dst.iter_mut().zip(buf) {
        d.write(v);
    }
}

/// `(Φ(x), φ(x))` for a block of `x`: the standard normal CDF and density. `Φ(x) =
/// ½(1 + erf(x/√2))` with `erf` from Abramowitz–Stegun 7.1.26 (absolute error ≤ 1.5e-7, far
/// below f32 GELU's needs), whose `e^(−z²)` at `z = x/√2` is the density's `e^(−x²/2)`: one
/// vectorised `exp` serves both.
fn normal_cdf_pdf_block(x: &[f32], cdf: &mut [f32], pdf: &mut [f32]) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    for (e, &v) in pdf.iter_mut().zip(x) {
        *e = -0.5 * v * v;
    }
    fast_exp::exp_shifted_in_place(pdf, 0.0);
    for ((c, e), &v) in cdf.iter_mut().zip(pdf.iter_mut()).zip(x) {
        let t = 1.0 / (1.0 + 0.327_591_1 * FRAC_1_SQRT_2 * v.abs());
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
        let erf_abs = 1.0 - poly * *e;
        *c = 0.5 + 0.5 * erf_abs.copysign(v);
        *e *= FRAC_1_SQRT_2PI;
    }
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
        let out = collect_blocks(src.len(), |start, dst| {
            let xs = &src[start..start + dst.len()];
            let mut pdf = [0f32; BLOCK];
            normal_cdf_pdf_block(xs, dst, &mut pdf[..xs.len()]);
            for (d, &v) in dst.iter_mut().zip(xs) {
                *d *= v;
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
        let out = collect_blocks(xs.len(), |start, dst| {
            let end = start + dst.len();
            let (xb, gb) = (&xs[start..end], &gs[start..end]);
            let mut pdf = [0f32; BLOCK];
            let pdf = &mut pdf[..xb.len()];
            normal_cdf_pdf_block(xb, dst, pdf);
            for (((d, &v), &p), &g) in dst.iter_mut().zip(xb).zip(pdf.iter()).zip(gb) {
                *d = g * (*d + v * p);
            }
        });
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
        let shape = y_layout.shape().clone();
        if g_layout.shape() != &shape {
            candle_core::bail!(
                "masked-softmax-grad: gradient {:?} vs output {:?}",
                g_layout.shape(),
                shape
            );
        }
        let (mut cy, mut cg) = (None, None);
        let ys = f32_input(y, y_layout, &mut cy)?;
        let gs = f32_input(g, g_layout, &mut cg)?;
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

/// `Σ a·b` in f32 with independent lanes (see [`LANES`]).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ac, mut bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ac).zip(&mut bc) {
        for lane in 0..LANES {
            acc[lane] += x[lane] * y[lane];
        }
    }
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
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

#[cfg(test)]
mod timing {
    use candle_core::{Device, Tensor};

    use super::*;

    fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> std::time::Duration {
        (0..reps)
            .map(|_| {
                let t = std::time::Instant::now();
                std::hint::black_box(f());
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
    }

    fn reps() -> usize {
        std::env::var("TIMING_REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50)
    }

    // Per-op timings (ignored): `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=2 cargo test --release
    // --lib ops::timing -- --ignored --nocapture --test-threads=1`; `TIMING_REPS` sets the
    // repetitions (the best is printed).

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

    #[test]
    #[ignore]
    fn gelu() -> candle_core::Result<()> {
        let x = (random(&[512, 1536], 4) * 4.0)?;
        let g = random(&[512, 1536], 5);
        let fwd = best_of(reps(), || x.apply_op1_no_bwd(&GeluErf));
        let bwd = best_of(reps(), || x.apply_op2_no_bwd(&g, &GeluErfGrad));
        println!("GeluErf [512, 1536]: forward {fwd:?}, backward {bwd:?}");
        Ok(())
    }

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
