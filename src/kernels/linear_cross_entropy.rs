//! A frozen linear head and the per-row cross-entropy as one op: a causal LM's loss without a
//! `[N, V]` logits tensor in the graph.
//!
//! Shapes: `hidden x: [N, H]`, frozen `W: [V, H]` (a tied embedding table or an `lm_head`),
//! optional frozen `b: [V]`, targets `t: [N]`.
//!
//! ```text
//! z_i  = x_i Wᵀ + b                         (logits, [N, V])
//! m_i  = max_j z_ij,   lse_i = m_i + ln Σ_j exp(z_ij − m_i)
//! ℓ_i  = lse_i − z_i[t_i]                    (the output, [N])
//! dz_ij = g_i · (exp(z_ij − lse_i) − [j = t_i])   for g = dL/dℓ
//! dL/dx = dz · W                             (no gradient for W or b)
//! ```
//!
//! Written as `cross_entropy_rows(frozen_matmul(x, W, b))`, candle's autograd gives the
//! cross-entropy's backward a fresh `[N, V]` gradient, then accumulates it into a `zeros_like`
//! buffer with an `add` (two more `[N, V]` allocations and passes) before the product. Here the
//! forward keeps its logits (as much memory as the logits tensor the composition keeps for its
//! own backward) and the backward turns them into `dz` in place, so no `[N, V]` buffer is
//! allocated after the forward; the buffer is released once the backward has used it (a second
//! backward through the same graph recomputes it).
//!
//! Both passes work on column blocks of the vocabulary (`z` is stored block by block). Forward:
//! each block's gemm, then per row its `m_ib = max z` and `s_ib = Σ exp(z − m_ib)` over the
//! block while it is in cache, merged as `lse_i = M_i + ln Σ_b s_ib·exp(m_ib − M_i)` with
//! `M_i = max_b m_ib`. Backward: each block's `dz`, then its product accumulated into `dL/dx`.
//!
//! CPU f32 only; other devices and dtypes run the composition, which is the same math.

use std::sync::{Mutex, MutexGuard};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cross_entropy::cross_entropy_rows;
use super::fast_exp;
use super::frozen::frozen_matmul_weight;
use super::frozen_weight::FrozenWeight;
use super::gemm::Threads;
use super::slices::{f32_slice, with_values};

const OP: &str = "frozen-linear-cross-entropy";

/// Logits per block, about 1 MiB: a block stays in a core's L2 cache between its gemm and its
/// row statistics (forward) or its `dz` and its product (backward). Each block is one
/// single-threaded gemm and one rayon task, so the threads never synchronise inside a product:
/// on 2 threads with N = 512, V = 49152, H = 576 the backward took about 205 ms this way,
/// against about 270 ms with one 2-thread gemm call over the whole `dz` (and 370 ms for the
/// candle composition).
const BLOCK_VALUES: usize = 1 << 18;

/// Block width in vocabulary columns for `rows` rows and `vocab` columns.
fn block_columns(rows: usize, vocab: usize) -> usize {
    (BLOCK_VALUES / rows.max(1))
        .clamp(256, 4096)
        .min(vocab)
        .max(1)
}

/// The logits `[N, V]` in column blocks: block `b` holds columns `b·w .. min((b+1)·w, V)` of
/// every row as its own row-major `[N, w_b]` matrix, at offset `b·N·w`.
struct Blocked {
    values: Vec<f32>,
    rows: usize,
    vocab: usize,
    width: usize,
}

impl Blocked {
    /// Values per block (the last one may hold fewer).
    fn block_len(&self) -> usize {
        self.rows * self.width
    }

    /// Logit `z_ij`.
    fn at(&self, i: usize, j: usize) -> f32 {
        let b = j / self.width;
        let start = b * self.width;
        let wb = self.width.min(self.vocab - start);
        self.values[b * self.block_len() + i * wb + (j - start)]
    }
}

/// The forward's logits (bias included) and each row's log-sum-exp, kept for the backward.
struct Kept {
    logits: Blocked,
    lse: Vec<f32>,
}

struct FrozenLinearCrossEntropy {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    targets: Vec<u32>,
    kept: Mutex<Option<Kept>>,
}

/// `ln Σ_b s_b·exp(m_b)` from per-block maxima `m_b` and shifted sums `s_b = Σ exp(z − m_b)`.
fn merge_log_sum_exp(parts: impl Iterator<Item = (f32, f32)> + Clone) -> f32 {
    let max = parts.clone().fold(f32::NEG_INFINITY, |m, (b, _)| m.max(b));
    let sum: f32 = parts.map(|(m, s)| s * (m - max).exp()).sum();
    max + sum.ln()
}

impl FrozenLinearCrossEntropy {
    fn lock(&self) -> MutexGuard<'_, Option<Kept>> {
        // The slot is only ever replaced whole: a panic elsewhere cannot leave it half-written.
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `(V, H)` of the weight.
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self.weight.dims() {
            &[v, h] => Ok((v, h)),
            dims => candle_core::bail!("{OP}: weight must be [V, H], got {dims:?}"),
        }
    }

    /// Logits `x Wᵀ + b` of the `[N, H]` rows `x`, and each row's log-sum-exp.
    fn logits_and_lse(&self, x: &[f32]) -> candle_core::Result<Kept> {
        let (v, h) = self.dims()?;
        let n = self.targets.len();
        if x.len() != n * h {
            candle_core::bail!("{OP}: input holds {} values, not {n}×{h}", x.len());
        }
        let mut logits = Blocked {
            values: vec![0f32; n * v],
            rows: n,
            vocab: v,
            width: block_columns(n, v),
        };
        if n == 0 || v == 0 {
            return Ok(Kept {
                logits,
                lse: vec![f32::NEG_INFINITY; n],
            });
        }
        let bias = match &self.bias {
            Some(b) => Some(with_values(OP, "bias", b, |b| Ok(b.to_vec()))?),
            None => None,
        };
        let (block_len, width) = (logits.block_len(), logits.width);
        // Per block, each row's (max, Σ exp(z − max)) over the block's columns.
        let row_stats = |block: &mut [f32], start: usize, wb: usize| -> Vec<(f32, f32)> {
            block
                .chunks_exact_mut(wb)
                .map(|row| {
                    if let Some(bias) = &bias {
                        for (z, &c) in row.iter_mut().zip(&bias[start..]) {
                            *z += c;
                        }
                    }
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    (max, fast_exp::sum_exp_shifted(row, max))
                })
                .collect()
        };
        let w_values = self.weight.values()?;
        let w = w_values.matrix(OP, "weight", (v, h))?;
        let stats = {
            logits
                .values
                .par_chunks_mut(block_len)
                .enumerate()
                .map(|(b, block)| {
                    let start = b * width;
                    let wb = block.len() / n;
                    w.xwt(OP, block, x, n, start..start + wb, false, Threads::Single)?;
                    Ok(row_stats(block, start, wb))
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let lse = (0..n)
            .map(|i| merge_log_sum_exp(stats.iter().map(|s| s[i])))
            .collect();
        Ok(Kept { logits, lse })
    }

    /// `dL/dx = dz · W`, turning the kept logits into `dz` in place, block by block, for the
    /// upstream gradient `g`. Each thread takes a fixed run of blocks and sums its products in
    /// its own buffer; the buffers are added in order, so the result does not depend on
    /// scheduling.
    fn input_grad(&self, kept: Kept, g: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (_, h) = self.dims()?;
        let n = self.targets.len();
        let Kept { mut logits, lse } = kept;
        if n == 0 || logits.vocab == 0 {
            return Ok(vec![0f32; n * h]);
        }
        let (block_len, width) = (logits.block_len(), logits.width);
        let blocks = logits.vocab.div_ceil(width);
        let parts = candle_core::utils::get_num_threads().clamp(1, blocks);
        let mut runs = Vec::with_capacity(parts);
        let mut rest = logits.values.as_mut_slice();
        for p in 0..parts {
            let (first, end) = (p * blocks / parts, (p + 1) * blocks / parts);
            let len = ((end - first) * block_len).min(rest.len());
            let (run, tail) = rest.split_at_mut(len);
            runs.push((first, run));
            rest = tail;
        }
        let w_values = self.weight.values()?;
        let w = w_values.matrix(OP, "weight", (logits.vocab, h))?;
        let partials = {
            runs.into_par_iter()
                .map(|(first, run)| {
                    let mut dx = vec![0f32; n * h];
                    for (k, block) in run.chunks_mut(block_len).enumerate() {
                        let start = (first + k) * width;
                        let wb = block.len() / n;
                        for (i, row) in block.chunks_exact_mut(wb).enumerate() {
                            let t = (self.targets[i] as usize).wrapping_sub(start);
                            softmax_minus_onehot(row, lse[i], g[i], (t < wb).then_some(t));
                        }
                        w.gw(
                            OP,
                            &mut dx,
                            block,
                            n,
                            start..start + wb,
                            k > 0,
                            Threads::Single,
                        )?;
                    }
                    Ok(dx)
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let mut partials = partials.into_iter();
        let mut dx = partials.next().unwrap_or_else(|| vec![0f32; n * h]);
        for part in partials {
            for (a, b) in dx.iter_mut().zip(&part) {
                *a += b;
            }
        }
        Ok(dx)
    }
}

/// `row = g·(exp(row − lse) − onehot(t))` in place, for one row (or a segment of one row, with
/// `t` relative to the segment's start; `None` when the target lies outside it).
fn softmax_minus_onehot(row: &mut [f32], lse: f32, g: f32, t: Option<usize>) {
    fast_exp::exp_shifted_in_place(row, lse);
    if g != 1.0 {
        for z in row.iter_mut() {
            *z *= g;
        }
    }
    if let Some(t) = t {
        row[t] -= g;
    }
}

impl CustomOp1 for FrozenLinearCrossEntropy {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(OP, "hidden", x, layout)?;
        let kept = self.logits_and_lse(x)?;
        let losses = kept
            .lse
            .iter()
            .zip(&self.targets)
            .enumerate()
            .map(|(i, (&lse, &t))| lse - kept.logits.at(i, t as usize))
            .collect();
        *self.lock() = Some(kept);
        Ok((CpuStorage::F32(losses), Shape::from(self.targets.len())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = self.targets.len();
        let (_, h) = self.dims()?;
        if grad.dims() != [n] {
            candle_core::bail!("{OP}: gradient {:?} for {n} rows", grad.dims());
        }
        let g = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let kept = self.lock().take();
        let kept = match kept {
            Some(kept) => kept,
            None => with_values(OP, "hidden", x, |x| self.logits_and_lse(x))?,
        };
        let dx = self.input_grad(kept, &g)?;
        Ok(Some(Tensor::from_vec(dx, (n, h), x.device())?))
    }
}

/// Per-row cross-entropy `lse(x_i Wᵀ + b) − (x_i Wᵀ + b)[t_i]` of `hidden: [N, H]` through the
/// frozen linear head `weight: [V, H]` (and `bias: [V]`), `[N]`; the gradient reaches `hidden`
/// only. Equal to `cross_entropy_rows(&frozen_matmul(hidden, weight, bias)?, targets)`, which
/// it runs for anything but f32 on the CPU.
pub fn frozen_linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &[u32],
) -> candle_core::Result<Tensor> {
    frozen_linear_cross_entropy_weight(hidden, &FrozenWeight::Dense(weight.clone()), bias, targets)
}

/// [`frozen_linear_cross_entropy`] with the head's `W` in its stored type (f32, f16, bf16 or
/// ggml blocks, read block by block): the fused path for f32 `hidden` on the CPU.
pub fn frozen_linear_cross_entropy_weight(
    hidden: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    targets: &[u32],
) -> candle_core::Result<Tensor> {
    let &[n, h] = hidden.dims() else {
        candle_core::bail!("{OP}: hidden must be [N, H], got {:?}", hidden.dims());
    };
    let &[v, wh] = weight.dims() else {
        candle_core::bail!("{OP}: weight must be [V, H], got {:?}", weight.dims());
    };
    if wh != h {
        candle_core::bail!(
            "{OP}: hidden {:?} does not match weight {:?} (H differs)",
            hidden.dims(),
            weight.dims()
        );
    }
    if let Some(b) = bias
        && b.dims() != [v]
    {
        candle_core::bail!(
            "{OP}: bias {:?} does not match weight {:?}",
            b.dims(),
            weight.dims()
        );
    }
    if targets.len() != n {
        candle_core::bail!("{OP}: {} targets for {n} rows of hidden", targets.len());
    }
    if let Some((i, t)) = targets.iter().enumerate().find(|&(_, &t)| t as usize >= v) {
        candle_core::bail!("{OP}: target {t} of row {i} is out of range for a vocabulary of {v}");
    }
    let fast = hidden.device().is_cpu()
        && weight.is_cpu_matrix()
        && hidden.dtype() == DType::F32
        && bias.is_none_or(|b| b.device().is_cpu());
    if !fast {
        let logits = frozen_matmul_weight(hidden, weight, bias)?;
        return cross_entropy_rows(&logits, targets);
    }
    let op = FrozenLinearCrossEntropy {
        weight: match weight {
            FrozenWeight::Dense(w) => FrozenWeight::Dense(w.contiguous()?.detach()),
            quantized => quantized.clone(),
        },
        bias: match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?.detach()),
            None => None,
        },
        targets: targets.to_vec(),
        kept: Mutex::new(None),
    };
    hidden.contiguous()?.apply_op1(op)
}
