//! The attention half of a decoder layer as one fused op (`crate::kernels::attn_block`), when
//! every projection is a frozen linear with at most one LoRA delta.

use candle_core::{DType, Tensor};

use super::{LlamaAttention, RopeTables};
use crate::error::Result;
use crate::kernels::attn_block::block_forward;

/// `x + self_attn(RMSNorm(x)·γ)` as one op when `x` is CPU f32 and each projection is a frozen
/// linear with at most one LoRA delta; `None` sends the caller to the separate ops.
pub(super) fn try_forward(
    x: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    attn: &LlamaAttention,
    rope: &RopeTables,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !cpu_f32(x) || !cpu_f32(norm_weight) || mask.is_some_and(|m| !cpu_f32(m)) {
        return Ok(None);
    }
    let layers = [&attn.q_proj, &attn.k_proj, &attn.v_proj, &attn.o_proj];
    let [Some(q), Some(k), Some(v), Some(o)] = layers.map(|l| l.handle().fused_parts()) else {
        return Ok(None);
    };
    let heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
    block_forward(
        x,
        norm_weight,
        eps,
        [q, k, v, o],
        heads,
        &rope.angles(),
        mask,
    )
}
