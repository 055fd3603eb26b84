//! The MLP half of a decoder layer as one fused op (`crate::kernels::mlp_block`), when each of
//! its layers is a frozen linear with at most one LoRA delta.

use candle_core::{DType, Tensor};

use super::LlamaMlp;
use crate::error::Result;
use crate::kernels::mlp_block::block_forward;

/// `h + mlp(RMSNorm(h)·γ)` as one op when `h` is CPU f32 and each of the MLP's layers is a
/// frozen linear with at most one LoRA delta; `None` sends the caller to the separate ops.
pub(super) fn try_forward(
    h: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    mlp: &LlamaMlp,
) -> Result<Option<Tensor>> {
    if !h.device().is_cpu() || h.dtype() != DType::F32 || norm_weight.dtype() != DType::F32 {
        return Ok(None);
    }
    let parts = [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj].map(|l| l.handle().fused_parts());
    let [Some(gate), Some(up), Some(down)] = parts else {
        return Ok(None);
    };
    block_forward(h, norm_weight, eps, [gate, up, down])
}
