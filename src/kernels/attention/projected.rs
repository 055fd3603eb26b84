//! The attention core on the projections as the linear layers give them:
//! `context = softmax(s·q kᵀ + M) v` with `q: [B, T, n_h·d]`, `k`, `v: [B, T_k, n_kv·d]` and
//! the scale `s` (usually `1/√d`) inside the op, output `[B, T, n_h·d]`.
//!
//! The op moves q (times `s`) and k into the head-major layout the core's tiles read
//! (`[B, n, T, d]`), runs the same forward and backward as [`super::attention_core`], and moves
//! `dq` (times `s`) and `dk` back; `v` and `dv` are already in the core's layout. The results
//! are those of scaling q, reshaping and transposing q and k in candle ops, then calling
//! `attention_core`, to the bit.
//!
//! Why: as candle ops, the scaling, the reshapes, the transposes and the copies are seven graph
//! nodes per layer around the core, and the backward gives each node's input an
//! activation-sized zero-fill and add on the calling thread, beside the copies themselves. Here
//! they are one node, and the moves run on all threads (BERT's step: see docs/PERFORMANCE.md).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::{Dims, Plan, check_dims, fused, with_backward_values};
use crate::error::Result;
use crate::kernels::blocks::gather_rows;
use crate::kernels::slices::{f32_slice, with_optional_values};

/// The op's name, for candle and for errors.
const OP: &str = "attention-projected";

/// The sizes of a `[B, T, n·d]` projection split into `n` heads of `d`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Split {
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
}

/// Rows of `d` values per rayon task in the head moves.
const ROWS_PER_TASK: usize = 256;

/// `x: [B, T, n, d]` → `[B, n, T, d]`, each value times `scale`.
pub(crate) fn to_heads(x: &[f32], s: Split, scale: f32) -> Vec<f32> {
    let (t, n, d) = (s.seq, s.heads, s.head_dim);
    let rows = s.batch * n * t;
    gather_rows(rows, d, ROWS_PER_TASK, scale, |r| {
        // Row r of the output is (b, h, ti).
        let (bh, ti) = (r / t, r % t);
        let (b, h) = (bh / n, bh % n);
        let at = ((b * t + ti) * n + h) * d;
        x.get(at..at + d).unwrap_or(&[])
    })
}

/// `x: [B, n, T, d]` → `[B, T, n, d]`, each value times `scale`.
pub(crate) fn from_heads(x: &[f32], s: Split, scale: f32) -> Vec<f32> {
    let (t, n, d) = (s.seq, s.heads, s.head_dim);
    let rows = s.batch * t * n;
    gather_rows(rows, d, ROWS_PER_TASK, scale, |r| {
        // Row r of the output is (b, ti, h).
        let (bt, h) = (r / n, r % n);
        let (b, ti) = (bt / t, bt % t);
        let at = ((b * n + h) * t + ti) * d;
        x.get(at..at + d).unwrap_or(&[])
    })
}

struct ProjectedAttention {
    mask: Option<Tensor>,
    heads: usize,
    kv_heads: usize,
    scale: f32,
    /// Built from the mask on first use; the shapes are the same in both passes.
    plan: OnceLock<Plan>,
}

impl ProjectedAttention {
    /// The core's sizes and the two splits (queries, keys/values), checked.
    fn dims(
        &self,
        q: &[usize],
        k: &[usize],
        v: &[usize],
    ) -> candle_core::Result<(Dims, Split, Split)> {
        let &[batch, seq, q_width] = q else {
            candle_core::bail!("{OP}: q must be [B, T, n_h·d], got {q:?}");
        };
        let &[_, kv_seq, kv_width] = k else {
            candle_core::bail!("{OP}: k must be [B, T_k, n_kv·d], got {k:?}");
        };
        if v != k {
            candle_core::bail!("{OP}: v {v:?} must have k's shape {k:?}");
        }
        if self.heads == 0 || !q_width.is_multiple_of(self.heads) {
            candle_core::bail!("{OP}: q {q:?} does not split into {} heads", self.heads);
        }
        let head_dim = q_width / self.heads;
        if kv_width != self.kv_heads * head_dim {
            candle_core::bail!(
                "{OP}: k {k:?} is not {} key/value heads of q's head size {head_dim} (q {q:?})",
                self.kv_heads
            );
        }
        let dims = check_dims(
            &[batch, self.heads, seq, head_dim],
            &[k[0], self.kv_heads, kv_seq, head_dim],
            &[k[0], kv_seq, self.kv_heads, head_dim],
            self.mask.as_ref().map(|m| m.dims()),
            self.kv_heads,
        )?;
        let split = |seq, heads| Split {
            batch,
            seq,
            heads,
            head_dim,
        };
        Ok((dims, split(seq, self.heads), split(kv_seq, self.kv_heads)))
    }

    fn plan(&self, dims: &Dims, mask: Option<&[f32]>) -> &Plan {
        self.plan.get_or_init(|| dims.plan(mask))
    }
}

impl CustomOp3 for ProjectedAttention {
    fn name(&self) -> &'static str {
        OP
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
        let (dims, qsplit, ksplit) = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        let q = to_heads(f32_slice(OP, "q", qs, ql)?, qsplit, self.scale);
        let k = to_heads(f32_slice(OP, "k", ks, kl)?, ksplit, 1.0);
        let v = f32_slice(OP, "v", vs, vl)?;
        let out = with_optional_values(OP, "the mask", self.mask.as_ref(), |mask| {
            dims.forward(self.plan(&dims, mask), &q, &k, v, mask)
        })?;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _context: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dims, qsplit, ksplit) = self.dims(q.dims(), k.dims(), v.dims())?;
        if grad.dims() != q.dims() {
            candle_core::bail!(
                "{OP}: context gradient {:?}, expected {:?}",
                grad.dims(),
                q.dims()
            );
        }
        let operands = [q, k, v, grad];
        let (dq, dk, dv) = with_backward_values(
            OP,
            operands,
            self.mask.as_ref(),
            |[qv, kv, vv, gv], mask| {
                let qh = to_heads(qv, qsplit, self.scale);
                let kh = to_heads(kv, ksplit, 1.0);
                let (dq, dk, dv) = dims.backward(self.plan(&dims, mask), &qh, &kh, vv, mask, gv)?;
                // d(s·q)/dq = s.
                Ok((
                    from_heads(&dq, qsplit, self.scale),
                    from_heads(&dk, ksplit, 1.0),
                    dv,
                ))
            },
        )?;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

/// `softmax(scale · q kᵀ + mask) v` on the projections as the linear layers give them:
/// `q: [B, T, n_h·d]`, `k` and `v: [B, T_k, n_kv·d]`, `mask`: additive `[B, 1, T | 1, T_k]`
/// (frozen), output `[B, T, n_h·d]` (the input of the output projection). Query head `h`
/// reads key/value head `h / (n_h / n_kv)`.
///
/// The same values as scaling q, splitting q and k into heads (`[B, n, T, d]`) and calling
/// [`super::attention_core`], with one graph node instead of eight. Differentiable in `q`, `k`
/// and `v`; one fused op on the CPU in f32, those candle ops otherwise. Operands of the wrong
/// shape are an error naming the operand.
pub fn attention_core_projected(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    (num_heads, num_kv_heads): (usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let op = ProjectedAttention {
        mask: None,
        heads: num_heads,
        kv_heads: num_kv_heads,
        scale: scale as f32,
        plan: OnceLock::new(),
    };
    let (_, qsplit, ksplit) = op.dims(q.dims(), k.dims(), v.dims())?;
    if !(fused(q) && fused(k) && fused(v)) {
        let split = |x: &Tensor, s: Split| x.reshape((s.batch, s.seq, s.heads, s.head_dim));
        let q = split(&q.affine(scale, 0.0)?, qsplit)?
            .transpose(1, 2)?
            .contiguous()?;
        let k = split(k, ksplit)?.transpose(1, 2)?.contiguous()?;
        let v = split(v, ksplit)?;
        return super::attention_core(&q, &k, &v, mask, num_kv_heads);
    }
    let mask = match mask {
        // Frozen, and read as f32 values by the kernel.
        Some(m) => Some(m.detach().to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    if mask.as_ref().is_some_and(|m| !m.device().is_cpu()) {
        return Err(candle_core::Error::Msg(format!(
            "{OP}: the mask is not on the CPU with q, k and v"
        ))
        .into());
    }
    let op = ProjectedAttention { mask, ..op };
    // The mask's shape is checked against q and k here, before the op runs.
    op.dims(q.dims(), k.dims(), v.dims())?;
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values::{tensor, var};

    #[test]
    fn head_moves_are_inverse_transposes() {
        let s = Split {
            batch: 2,
            seq: 3,
            heads: 4,
            head_dim: 5,
        };
        let x: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let h = to_heads(&x, s, 2.0);
        // [b, t, n, d] = [1, 2, 3, 4] lands at [b, n, t, d] = [1, 3, 2, 4], doubled.
        let at_src = ((3 + 2) * 4 + 3) * 5 + 4;
        let at_dst = ((4 + 3) * 3 + 2) * 5 + 4;
        assert_eq!(h[at_dst], 2.0 * x[at_src]);
        assert_eq!(from_heads(&h, s, 0.5), x);
    }

    #[test]
    fn bad_shapes_name_the_operand() {
        let t = |dims: &[usize]| tensor(dims, 1);
        let err = |q: &[usize], k: &[usize], v: &[usize], heads: (usize, usize)| {
            attention_core_projected(&t(q), &t(k), &t(v), None, heads, 1.0)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[2, 3, 8], &[2, 3, 8], &[2, 3, 4], (2, 2)).contains("v [2, 3, 4]"));
        assert!(err(&[2, 3, 9], &[2, 3, 9], &[2, 3, 9], (2, 2)).contains("2 heads"));
        assert!(err(&[2, 3, 8], &[2, 3, 6], &[2, 3, 6], (2, 2)).contains("key/value heads"));
        assert!(err(&[2, 3], &[2, 3, 8], &[2, 3, 8], (2, 2)).contains("q must be"));
    }

    /// Against scaling q and splitting q and k into heads in candle ops, then the core: the
    /// same values and gradients to the bit, with grouped key/value heads and a per-query mask
    /// that hides some keys.
    #[test]
    fn equals_the_head_split_in_candle_ops() {
        let (b, t, heads, kv_heads, d) = (2, 5, 4, 2, 3);
        let q = var(&[b, t, heads * d], 1);
        let k = var(&[b, t, kv_heads * d], 2);
        let v = var(&[b, t, kv_heads * d], 3);
        // Query i sees keys 0..=i except key 1 in batch row 1.
        let mask: Vec<f32> = (0..b * t * t)
            .map(|at| {
                let (row, i, j) = (at / (t * t), at / t % t, at % t);
                if j > i || (row == 1 && j == 1 && i > 1) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &candle_core::Device::Cpu).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let weights = tensor(&[b, t, heads * d], 4);
        let ours = attention_core_projected(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            Some(&mask),
            (heads, kv_heads),
            scale,
        )
        .unwrap();
        let split = |x: &Tensor, n: usize| {
            x.reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let theirs = super::super::attention_core(
            &split(&q.as_tensor().affine(scale, 0.0).unwrap(), heads),
            &split(k.as_tensor(), kv_heads),
            &v.as_tensor().reshape((b, t, kv_heads, d)).unwrap(),
            Some(&mask),
            kv_heads,
        )
        .unwrap();
        assert_eq!(ours.dims(), &[b, t, heads * d]);
        let values = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&ours), values(&theirs));
        let grads = |c: &Tensor| {
            let g = (c * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            [&q, &k, &v].map(|x| values(g.get(x.as_tensor()).unwrap()))
        };
        let (g_ours, g_theirs) = (grads(&ours), grads(&theirs));
        for (name, (a, b)) in ["q", "k", "v"].iter().zip(g_ours.iter().zip(&g_theirs)) {
            assert_eq!(a, b, "d{name}");
            assert!(a.iter().any(|&x| x != 0.0), "d{name} is all zero");
        }
    }
}
