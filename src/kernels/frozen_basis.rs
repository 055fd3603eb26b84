//! The forward pass of a low-rank update `ΔW = B·A` (or its transpose) whose factor `B` is a
//! frozen random basis and whose factor `A` is trainable: the frozen product skips the gradient
//! with respect to `B`.

use candle_core::Tensor;

use crate::adapter::Conv2dParams;
use crate::error::Result;
use crate::kernels::frozen::{conv2d_trainable, frozen_conv2d, frozen_matmul};

/// `x2 · ΔW_flatᵀ` for 2-D `x2: [T, in]`. With `in_is_small`, `ΔW_flat = b·a` (`a: [q, in]`,
/// `b: [out, q]`); otherwise `ΔW_flat = (b·a)ᵀ` (`a: [q, out]`, `b: [in, q]`). Unscaled.
pub(crate) fn frozen_basis_linear(
    x2: &Tensor,
    a: &Tensor,
    b: &Tensor,
    in_is_small: bool,
) -> Result<Tensor> {
    Ok(if in_is_small {
        // [T, in]·[in, q] then the frozen [q, out] product.
        let h = x2.matmul(&a.t()?)?;
        frozen_matmul(&h, b, None)?
    } else {
        // The frozen [in, q] product, then [T, q]·[q, out].
        let h = frozen_matmul(x2, &b.t()?, None)?;
        h.matmul(a)?
    })
}

/// The ungrouped conv analogue of [`frozen_basis_linear`]: the `kh×kw` kernel is the first
/// factor (`a` or `bᵀ` reshaped to `[q, in, kh, kw]`, applied with `params`), the second a
/// `1×1` conv. Unscaled.
pub(crate) fn frozen_basis_conv2d(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    in_is_small: bool,
    (in_channels, out_channels): (usize, usize),
    (kh, kw): (usize, usize),
    params: Conv2dParams,
) -> Result<Tensor> {
    let q = if in_is_small { a.dim(0)? } else { b.dim(1)? };
    Ok(if in_is_small {
        let k1 = a.reshape((q, in_channels, kh, kw))?;
        let h = conv2d_trainable(x, &k1, params.padding, params.stride, params.dilation, 1)?;
        let k2 = b.reshape((out_channels, q, 1, 1))?;
        frozen_conv2d(&h, &k2, None, 0, 1, 1, 1)?
    } else {
        let k1 = b.t()?.contiguous()?.reshape((q, in_channels, kh, kw))?;
        let h = frozen_conv2d(
            x,
            &k1,
            None,
            params.padding,
            params.stride,
            params.dilation,
            1,
        )?;
        let k2 = a.t()?.contiguous()?.reshape((out_channels, q, 1, 1))?;
        conv2d_trainable(&h, &k2, 0, 1, 1, 1)?
    })
}
