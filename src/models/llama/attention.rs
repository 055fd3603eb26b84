//! The attention core of the Llama forward as one op with an exact backward:
//! `context = softmax(q kᵀ + M) v`, laid out for `o_proj`.
//!
//! Shapes: `q: [B, n_h, T, d]` (rotated and already scaled by `1/√d`), `k: [B, n_kv, T_k, d]`
//! (rotated), `v: [B, T_k, n_kv, d]` (`v_proj`'s output reshaped, not transposed), an optional
//! frozen additive mask `M: [B, 1, 1 | T, T_k]`, and the output `[B, T, n_h·d]`. Query head `h`
//! reads key/value head `g = h / G`, `G = n_h / n_kv`.
//!
//! Per batch row and key/value head `g` (one rayon task each), the `G` query heads of the group
//! are the `G·T` rows of one matrix `Q_g` (contiguous in `q`), so with `V_g` read in place
//! through its row stride `n_kv·d`:
//!
//! ```text
//! forward   S = Q_g K_gᵀ (+ M),  P = softmax_rows(S),  C = P V_g
//! backward  P recomputed,  dP = dC V_gᵀ,  dV_g = Pᵀ dC,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),
//!           dQ_g = dS K_g,  dK_g = dSᵀ Q_g
//! ```
//!
//! `dK_g`/`dV_g` sum over the group's query heads because the group is one matrix. The softmax is
//! `crate::ops::masked_softmax`'s, operation for operation (a fully masked row is uniform).
//!
//! Why: as separate candle ops (reshapes, transposes, two matmuls, the softmax) every node of the
//! graph costs the backward an activation-sized `zeros_like` and `add` for its input's gradient,
//! and the forward a `[B, T_k, n_kv, d] → [B, n_kv, T_k, d]` copy of `v` and a
//! `[B, n_h, T, d] → [B, T, n_h, d]` copy of the context. One op keeps a single node, and the
//! backward keeps no state: `P` is recomputed from `q` and `k`.
//!
//! CPU and f32 only; other devices and dtypes take the same math in plain candle ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu_gemm::{self, Strided, Threads};
use crate::error::Result;

/// `dst = lhs · rhs` on the calling thread: the callers already run one rayon task per (batch,
/// key/value head), and the matrices (`T = 128`, `d = 64`) are too small for gemm's own
/// threading to pay.
fn gemm_f32(
    dst: &mut [f32],
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    mnk: (usize, usize, usize),
) -> candle_core::Result<()> {
    cpu_gemm::gemm_f32(
        "llama-attention",
        dst,
        lhs,
        rhs,
        mnk,
        false,
        Threads::Single,
    )
}

/// The sizes of one call, checked against each other.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    kv_seq: usize,
    head_dim: usize,
    /// Rows of the mask per batch row: 1 (broadcast over queries) or `seq`.
    mask_rows: usize,
}

impl Dims {
    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Rows of one group's query matrix, `G·T`.
    fn group_rows(&self) -> usize {
        self.groups() * self.seq
    }
}

/// Checks the operands' shapes against each other, naming the one that does not fit.
fn check_dims(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    mask: Option<&[usize]>,
    kv_heads: usize,
) -> candle_core::Result<Dims> {
    let &[batch, heads, seq, head_dim] = q else {
        candle_core::bail!("llama-attention: q must be [B, n_h, T, d], got {q:?}");
    };
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!(
            "llama-attention: {heads} query heads (q {q:?}) are not a multiple of {kv_heads} key/value heads"
        );
    }
    let &[kb, kh, kv_seq, kd] = k else {
        candle_core::bail!("llama-attention: k must be [B, n_kv, T_k, d], got {k:?}");
    };
    if (kb, kh, kd) != (batch, kv_heads, head_dim) {
        candle_core::bail!(
            "llama-attention: k {k:?} does not fit [B = {batch}, n_kv = {kv_heads}, T_k, d = {head_dim}] (q {q:?})"
        );
    }
    if v != [batch, kv_seq, kv_heads, head_dim] {
        candle_core::bail!(
            "llama-attention: v must be [B, T_k, n_kv, d] = {:?}, got {v:?}",
            [batch, kv_seq, kv_heads, head_dim]
        );
    }
    let mask_rows = match mask {
        None => 0,
        Some(&[mb, 1, mq, mk]) if mb == batch && (mq == 1 || mq == seq) && mk == kv_seq => mq,
        Some(m) => candle_core::bail!(
            "llama-attention: mask must be [B, 1, T | 1, T_k] = [{batch}, 1, {seq}, {kv_seq}], got {m:?}"
        ),
    };
    Ok(Dims {
        batch,
        heads,
        kv_heads,
        seq,
        kv_seq,
        head_dim,
        mask_rows,
    })
}

/// The contiguous f32 values of a CPU storage, or an error naming the operand.
fn f32_slice<'a>(what: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (CpuStorage::F32(_), None) => {
            candle_core::bail!("llama-attention: {what} must be contiguous")
        }
        _ => candle_core::bail!("llama-attention: {what} must be f32"),
    }
}

/// Runs `f` on the values of a CPU tensor (the storage stays read-locked meanwhile).
fn with_values<R>(
    what: &str,
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else {
        candle_core::bail!("llama-attention: {what} is not on the CPU");
    };
    f(f32_slice(what, s, layout)?)
}

/// [`with_values`] for an optional tensor.
fn with_optional<R>(
    what: &str,
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_values(what, t, |v| f(Some(v))),
        None => f(None),
    }
}

/// The operands of one (batch row, key/value head) task.
struct Group<'a> {
    /// `Q_g`: `[G·T, d]`, contiguous.
    q: &'a [f32],
    /// `K_g`: `[T_k, d]`, contiguous.
    k: &'a [f32],
    /// `V_g`: `[T_k, d]` with row stride `n_kv·d`, starting at its first element.
    v: Strided<'a>,
    /// This batch row's mask, `[mask_rows, T_k]`.
    mask: Option<&'a [f32]>,
}

impl Dims {
    fn group<'a>(
        &self,
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        mask: Option<&'a [f32]>,
        task: usize,
    ) -> Group<'a> {
        let (b, g) = (task / self.kv_heads, task % self.kv_heads);
        let (d, tk) = (self.head_dim, self.kv_seq);
        let q_len = self.group_rows() * d;
        let v_start = (b * tk * self.kv_heads + g) * d;
        let mask_len = self.mask_rows * tk;
        Group {
            q: &q[task * q_len..(task + 1) * q_len],
            k: &k[task * tk * d..(task + 1) * tk * d],
            v: Strided {
                values: &v[v_start..],
                col_stride: 1,
                row_stride: self.kv_heads * d,
            },
            mask: mask.map(|m| &m[b * mask_len..(b + 1) * mask_len]),
        }
    }

    /// `P = softmax_rows(Q_g K_gᵀ + M)`, `[G·T, T_k]`, with `masked_softmax`'s arithmetic.
    fn probs(&self, grp: &Group<'_>) -> candle_core::Result<Vec<f32>> {
        let (rows, tk, d) = (self.group_rows(), self.kv_seq, self.head_dim);
        let mut p = vec![0f32; rows * tk];
        gemm_f32(
            &mut p,
            Strided::rows(grp.q, d),
            Strided::transposed(grp.k, d),
            (rows, tk, d),
        )?;
        if tk == 0 {
            return Ok(p);
        }
        for (r, row) in p.chunks_exact_mut(tk).enumerate() {
            if let Some(m) = grp.mask {
                let mq = if self.mask_rows == 1 { 0 } else { r % self.seq };
                row.iter_mut()
                    .zip(&m[mq * tk..(mq + 1) * tk])
                    .for_each(|(s, &mv)| *s += mv);
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|s| *s *= inv);
        }
        Ok(p)
    }

    /// Output row `(b, t)`, head `g·G + j`, in `[B, T, n_h·d]`, for row `j·T + t` of group
    /// task `task`.
    fn context_offset(&self, task: usize, row: usize) -> usize {
        let (b, g) = (task / self.kv_heads, task % self.kv_heads);
        let (j, t) = (row / self.seq, row % self.seq);
        ((b * self.seq + t) * self.heads + g * self.groups() + j) * self.head_dim
    }

    /// Whether some operand has no elements (then so has the output, or it is all zero).
    fn is_empty(&self) -> bool {
        self.batch * self.kv_heads * self.group_rows() * self.kv_seq * self.head_dim == 0
    }

    fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        let (rows, d, tk) = (self.group_rows(), self.head_dim, self.kv_seq);
        let mut out = vec![0f32; self.batch * self.seq * self.heads * d];
        if self.is_empty() {
            // An empty softmax row has no probabilities: nothing is added to the zero context.
            return Ok(out);
        }
        let contexts = (0..self.batch * self.kv_heads)
            .into_par_iter()
            .map(|task| {
                let grp = self.group(q, k, v, mask, task);
                let p = self.probs(&grp)?;
                let mut c = vec![0f32; rows * d];
                gemm_f32(&mut c, Strided::rows(&p, tk), grp.v, (rows, d, tk))?;
                Ok(c)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Scattered serially: the context is small next to the products, and its rows for one
        // task interleave with every other task's.
        for (task, c) in contexts.iter().enumerate() {
            for (row, src) in c.chunks_exact(d).enumerate() {
                let at = self.context_offset(task, row);
                out[at..at + d].copy_from_slice(src);
            }
        }
        Ok(out)
    }

    /// `(dq, dk, dv)` in the layouts of `q`, `k`, `v`, for the context gradient `grad`.
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
        grad: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (rows, d, tk) = (self.group_rows(), self.head_dim, self.kv_seq);
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        if self.is_empty() {
            // Zero-sized chunks would panic below; the gradients are zero (or empty).
            return Ok((dq, dk, vec![0f32; v.len()]));
        }
        // dq and dk are chunked by task as q and k are; dv's rows interleave across key/value
        // heads, so each task returns its `dV_g` to be scattered afterwards.
        let dv_groups = dq
            .par_chunks_exact_mut(rows * d)
            .zip(dk.par_chunks_exact_mut(tk * d))
            .enumerate()
            .map(|(task, (dq_g, dk_g))| {
                let grp = self.group(q, k, v, mask, task);
                let p = self.probs(&grp)?;
                let mut dc = vec![0f32; rows * d];
                for (row, dst) in dc.chunks_exact_mut(d).enumerate() {
                    let at = self.context_offset(task, row);
                    dst.copy_from_slice(&grad[at..at + d]);
                }
                // dP = dC V_gᵀ.
                let v_t = Strided {
                    values: grp.v.values,
                    col_stride: grp.v.row_stride,
                    row_stride: 1,
                };
                let mut ds = vec![0f32; rows * tk];
                gemm_f32(&mut ds, Strided::rows(&dc, d), v_t, (rows, tk, d))?;
                // dV_g = Pᵀ dC (summed over the group's query heads: they are its rows).
                let mut dv_g = vec![0f32; tk * d];
                gemm_f32(
                    &mut dv_g,
                    Strided::transposed(&p, tk),
                    Strided::rows(&dc, d),
                    (tk, d, rows),
                )?;
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)), in place over dP.
                if tk > 0 {
                    for (ds_row, p_row) in ds.chunks_exact_mut(tk).zip(p.chunks_exact(tk)) {
                        let dot: f32 = ds_row.iter().zip(p_row).map(|(a, b)| a * b).sum();
                        ds_row
                            .iter_mut()
                            .zip(p_row)
                            .for_each(|(s, &pv)| *s = pv * (*s - dot));
                    }
                }
                // dQ_g = dS K_g, dK_g = dSᵀ Q_g.
                gemm_f32(
                    dq_g,
                    Strided::rows(&ds, tk),
                    Strided::rows(grp.k, d),
                    (rows, d, tk),
                )?;
                gemm_f32(
                    dk_g,
                    Strided::transposed(&ds, tk),
                    Strided::rows(grp.q, d),
                    (tk, d, rows),
                )?;
                Ok(dv_g)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut dv = vec![0f32; v.len()];
        for (task, dv_g) in dv_groups.iter().enumerate() {
            let (b, g) = (task / self.kv_heads, task % self.kv_heads);
            for (j, src) in dv_g.chunks_exact(d).enumerate() {
                let at = ((b * tk + j) * self.kv_heads + g) * d;
                dv[at..at + d].copy_from_slice(src);
            }
        }
        Ok((dq, dk, dv))
    }
}

/// The fused op; the mask is frozen (no gradient) and read from the tensor it holds.
struct AttentionCore {
    mask: Option<Tensor>,
    kv_heads: usize,
}

impl AttentionCore {
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Dims> {
        check_dims(q, k, v, self.mask.as_ref().map(|m| m.dims()), self.kv_heads)
    }
}

impl CustomOp3 for AttentionCore {
    fn name(&self) -> &'static str {
        "llama-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        let q = f32_slice("q", qs, ql)?;
        let k = f32_slice("k", ks, kl)?;
        let v = f32_slice("v", vs, vl)?;
        let out = with_optional("the mask", self.mask.as_ref(), |mask| {
            dims.forward(q, k, v, mask)
        })?;
        let shape = Shape::from((dims.batch, dims.seq, dims.heads * dims.head_dim));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _context: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients built from tracked tensors would carry this step's graph into
        // whatever keeps them, and with it every activation.
        let (q, k, v) = (
            q.detach().contiguous()?,
            k.detach().contiguous()?,
            v.detach().contiguous()?,
        );
        let grad = grad.detach().contiguous()?;
        let dims = self.dims(q.dims(), k.dims(), v.dims())?;
        let expected = [dims.batch, dims.seq, dims.heads * dims.head_dim];
        if grad.dims() != expected {
            candle_core::bail!(
                "llama-attention: context gradient {:?}, expected {expected:?}",
                grad.dims()
            );
        }
        let (dq, dk, dv) = with_values("q", &q, |qv| {
            with_values("k", &k, |kv| {
                with_values("v", &v, |vv| {
                    with_values("the context gradient", &grad, |gv| {
                        with_optional("the mask", self.mask.as_ref(), |mask| {
                            dims.backward(qv, kv, vv, mask, gv)
                        })
                    })
                })
            })
        })?;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

/// Whether the CPU kernel covers `x` (f32 on the CPU); the rest takes the plain ops.
pub(super) fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The same attention in plain (differentiable) candle ops, for devices and dtypes the fused op
/// does not cover: the composition `LlamaAttention::forward` uses with a KV cache.
fn attention_plain(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    dims: &Dims,
) -> Result<Tensor> {
    let (b, nkv, t, tk, d) = (
        dims.batch,
        dims.kv_heads,
        dims.seq,
        dims.kv_seq,
        dims.head_dim,
    );
    let v = v.transpose(1, 2)?.contiguous()?;
    let q = q.contiguous()?.reshape((b, nkv, dims.group_rows(), d))?;
    let scores = q
        .matmul(&k.contiguous()?.t()?)?
        .reshape((b, dims.heads, t, tk))?;
    let probs = crate::ops::masked_softmax(&scores, mask)?;
    Ok(probs
        .reshape((b, nkv, dims.group_rows(), tk))?
        .matmul(&v)?
        .reshape((b, dims.heads, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, dims.heads * d))?)
}

/// `softmax(q kᵀ + mask) v` for every query head, as `[B, T, n_h·d]` (the input of `o_proj`).
///
/// `q: [B, n_h, T, d]` (rotated, scaled by `1/√d`), `k: [B, n_kv, T_k, d]` (rotated),
/// `v: [B, T_k, n_kv, d]` (not transposed), `mask`: additive `[B, 1, T | 1, T_k]` (0 or the
/// dtype's minimum), frozen. Query head `h` reads key/value head `h / (n_h / n_kv)`.
/// Differentiable in `q`, `k` and `v`: one fused op on the CPU in f32, plain candle ops
/// otherwise. Operands of the wrong shape are an error naming the operand.
pub fn attention_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    num_kv_heads: usize,
) -> Result<Tensor> {
    let dims = check_dims(
        q.dims(),
        k.dims(),
        v.dims(),
        mask.map(|m| m.dims()),
        num_kv_heads,
    )?;
    if !(fused(q) && fused(k) && fused(v)) {
        return attention_plain(q, k, v, mask, &dims);
    }
    let mask = match mask {
        // Frozen, and read as f32 values by the kernel.
        Some(m) => Some(m.detach().to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    if mask.as_ref().is_some_and(|m| !m.device().is_cpu()) {
        return Err(candle_core::Error::Msg(
            "llama-attention: the mask is not on the CPU with q, k and v".into(),
        )
        .into());
    }
    let op = AttentionCore {
        mask,
        kv_heads: num_kv_heads,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}
