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
//! `masked_softmax`'s, operation for operation (a fully masked row is uniform), with
//! `fast_exp`'s exponential (≤ 2 ulp from libm's, and no slow path for the masked scores
//! that underflow).
//!
//! Masked keys are skipped. For each query position `t` the mask gives the span `[s_t, e_t)` of
//! its keys: `s_t` its first key whose entry is above `tiles::MASKED`, `e_t` `1 +` its last
//! (`[0, T_k)` for a fully masked row, which is uniform over all keys); every probability outside
//! the span is exactly 0 in f32, so is every term of the products that it scales. The query
//! positions go in tiles of up to `tiles::TILE`, all `G` heads of the group together (they share
//! keys and mask), and every product of a tile runs over the keys `[min s_t, max e_t)` only.
//! Under a causal mask (`s_t = 0`) that is `(T + TILE) / 2T` of the work; under a sliding window
//! of `W` keys (key `j` visible to query `i` iff `j ≤ i` and `i − j < W`, so `s_t = t − W + 1`)
//! a tile reads at most `W + TILE − 1` keys, about `(W + TILE) / T` of the work for
//! `W + TILE ≪ T`. Left padding raises `s_t` the same way. Inside a tile, a row's keys outside
//! its own `[s_t, e_t)` get probability 0 (and `dS` 0) without an exponential. The window is
//! read from the mask alone: nothing else in the op knows of it. Where every tile starts at key
//! 0 (causal, right padding, no mask) the arithmetic is exactly that of reading from key 0;
//! otherwise only exact-zero terms are dropped, and the grouping of the remaining sums (gemm's
//! blocks, the softmax's lanes) may move by f32 rounding.
//!
//! Why: as separate candle ops (reshapes, transposes, two matmuls, the softmax) every node of the
//! graph costs the backward an activation-sized `zeros_like` and `add` for its input's gradient,
//! and the forward a `[B, T_k, n_kv, d] → [B, n_kv, T_k, d]` copy of `v` and a
//! `[B, n_h, T, d] → [B, T, n_h, d]` copy of the context. One op keeps a single node, and the
//! backward keeps no state: `P` is recomputed from `q` and `k`.
//!
//! CPU and f32 only; other devices and dtypes take the same math in plain candle ops.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::Result;
use crate::kernels::slices::{f32_slice, with_optional_values, with_values};
use crate::kernels::softmax::masked_softmax;

mod projected;
mod tiles;

pub use projected::attention_core_projected;
pub(crate) use projected::{Split, from_heads, to_heads};

pub(crate) use tiles::Plan;

/// The op's name, for candle and for errors.
const OP: &str = "llama-attention";

/// The sizes of one call, checked against each other.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
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
pub(crate) fn check_dims(
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

/// The fused op; the mask is frozen (no gradient) and read from the tensor it holds.
struct AttentionCore {
    mask: Option<Tensor>,
    kv_heads: usize,
    /// Built from the mask on first use; q, k and v have the same shapes in both passes.
    plan: OnceLock<Plan>,
}

impl AttentionCore {
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Dims> {
        check_dims(q, k, v, self.mask.as_ref().map(|m| m.dims()), self.kv_heads)
    }

    fn plan(&self, dims: &Dims, mask: Option<&[f32]>) -> &Plan {
        self.plan.get_or_init(|| dims.plan(mask))
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
        let q = f32_slice(OP, "q", qs, ql)?;
        let k = f32_slice(OP, "k", ks, kl)?;
        let v = f32_slice(OP, "v", vs, vl)?;
        let out = with_optional_values(OP, "the mask", self.mask.as_ref(), |mask| {
            dims.forward(self.plan(&dims, mask), q, k, v, mask)
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
        let dims = self.dims(q.dims(), k.dims(), v.dims())?;
        let expected = [dims.batch, dims.seq, dims.heads * dims.head_dim];
        if grad.dims() != expected {
            candle_core::bail!(
                "llama-attention: context gradient {:?}, expected {expected:?}",
                grad.dims()
            );
        }
        let (dq, dk, dv) = with_backward_values(
            OP,
            [q, k, v, grad],
            self.mask.as_ref(),
            |[qv, kv, vv, gv], mask| dims.backward(self.plan(&dims, mask), qv, kv, vv, mask, gv),
        )?;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

/// Runs `f` on the values of `[q, k, v, context gradient]` and of the mask, each detached
/// and made contiguous: gradients built from tracked tensors would carry the step's graph into
/// whatever keeps them (an optimiser's moments), and with it every activation.
fn with_backward_values<R>(
    op: &str,
    operands: [&Tensor; 4],
    mask: Option<&Tensor>,
    f: impl FnOnce([&[f32]; 4], Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let [q, k, v, g] = operands.map(|t| t.detach().contiguous());
    let (q, k, v, g) = (q?, k?, v?, g?);
    with_values(op, "q", &q, |qv| {
        with_values(op, "k", &k, |kv| {
            with_values(op, "v", &v, |vv| {
                with_values(op, "the context gradient", &g, |gv| {
                    with_optional_values(op, "the mask", mask, |m| f([qv, kv, vv, gv], m))
                })
            })
        })
    })
}

/// Whether the CPU kernel covers `x` (f32 on the CPU); the rest takes the plain ops.
pub(crate) fn fused(x: &Tensor) -> bool {
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
    let probs = masked_softmax(&scores, mask)?;
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
        plan: OnceLock::new(),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}
