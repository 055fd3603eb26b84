//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_`.
//!
//! The global norm is `‖g‖ = √(Σ_p Σ_i g_{p,i}²)` over the gradients of the given vars (vars
//! without a gradient contribute nothing). When `max_norm / (‖g‖ + 10⁻⁶) < 1`, every gradient is
//! multiplied by that coefficient in place in the `GradStore`; otherwise nothing changes.
//! Squares are summed in f32 per tensor and in f64 across tensors.

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

use crate::error::{PeftError, Result};

/// The global L2 norm of the gradients of `vars` in `grads`.
pub fn grad_norm(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    let mut sum = 0f64;
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let sq = g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            sum += sq;
        }
    }
    Ok(sum.sqrt())
}

/// Clips the gradients of `vars` to a global L2 norm of at most `max_norm` (in place) and
/// returns the norm before clipping. A non-finite norm is returned as it is and the gradients
/// are left alone: the caller decides what a NaN/inf gradient means.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(PeftError::config(
            "max_grad_norm",
            format!("must be finite and > 0, got {max_norm}"),
        ));
    }
    let norm = grad_norm(grads, vars)?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, var) in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}
