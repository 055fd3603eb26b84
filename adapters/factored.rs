//! Shared plumbing of the adapters that factor the base weight (SVFit, LoLDU, SALT).
//!
//! Each of them writes its update as `ΔW = B · C · A` with frozen factors `A: [k, in_flat]`
//! (input directions as rows), `B: [out, k]` (output directions as columns) and a small trained
//! core `C` (a diagonal for SVFit and LoLDU, a block-diagonal `k × k` matrix for SALT). Conv2d
//! weights are flattened to `[out, in_g·kh·kw]` (row-major: column `c·kh·kw + h·kw + w`).
//!
//! The forward never forms `ΔW`: `Δ(x) = B · C · (A x)`.
//! - linear: `h = x Aᵀ` (`[.., k]`), then the core on the last axis, then `h Bᵀ`;
//! - conv2d: `A` reshaped to `k` filters `[k, in_g, kh, kw]` is applied to every group of input
//!   channels (one grouped conv with the filters tiled `groups` times), the core mixes the `k`
//!   channels of each group, and `B` is a grouped 1×1 conv. With `groups = 1` this is the plain
//!   conv → 1×1 conv chain. The stride, padding and dilation are the base conv's.
//!
//! Both projections go through [`crate::ops::frozen_matmul`] or [`crate::ops::frozen_conv2d`],
//! so backward computes no gradient for the frozen factors; only the core's ops are ordinary
//! (differentiable) candle ops.

use candle_core::{DType, Tensor};

use crate::adapter::{LayerGeometry, OptionKind, OptionSpec};
use crate::adapters::support::{flat_dims, option};
use crate::error::{PeftError, Result};
use crate::kernels::frozen::{frozen_conv2d, frozen_matmul};
use crate::linalg::{self, Precision};

/// The weight of a layer as a 2-D f32 matrix `[out, in_g·kh·kw]` (conv flattened), after
/// checking that every entry is finite: a decomposition of a NaN weight is meaningless, and
/// the error names the layer.
pub(crate) fn weight_matrix(
    module: &str,
    geometry: LayerGeometry,
    weight: &Tensor,
) -> Result<Tensor> {
    let expected = geometry.weight_shape();
    if weight.dims() != expected.as_slice() {
        return Err(PeftError::ShapeMismatch {
            key: format!("{module}.weight"),
            expected,
            got: weight.dims().to_vec(),
        });
    }
    let out = geometry.out_features();
    let w = weight.to_dtype(DType::F32)?.reshape((out, ()))?;
    if let Some((i, v)) = linalg::first_non_finite(&w)? {
        let cols = w.dims()[1].max(1);
        return Err(PeftError::layer(
            module,
            format!(
                "the base weight has a non-finite entry ({v} at row {}, column {} of the \
                 flattened weight); it cannot be decomposed",
                i / cols,
                i % cols
            ),
        ));
    }
    Ok(w)
}

/// Frozen factors `A: [k, in_flat]`, `B: [out, k]` of one layer, laid out for the forward.
#[derive(Debug)]
pub(crate) struct Factors {
    geometry: LayerGeometry,
    k: usize,
    /// `A`, 2-D.
    input_rows: Tensor,
    /// `B`, 2-D.
    output_cols: Tensor,
    /// conv2d: `A` as filters tiled once per group, `[groups·k, in_g, kh, kw]`.
    input_kernel: Option<Tensor>,
    /// conv2d: `B` as a grouped 1×1 kernel `[out, k, 1, 1]`.
    output_kernel: Option<Tensor>,
}

impl Factors {
    /// `a: [k, in_flat]`, `b: [out, k]`, f32 on the layer's device.
    pub(crate) fn new(geometry: LayerGeometry, a: Tensor, b: Tensor) -> Result<Self> {
        let (out, in_flat) = flat_dims(geometry);
        let k = a.dim(0)?;
        if a.dims() != [k, in_flat] || b.dims() != [out, k] {
            return Err(PeftError::Unsupported(format!(
                "factor shapes {:?} and {:?} do not fit a weight [{out}, {in_flat}]",
                a.dims(),
                b.dims()
            )));
        }
        let a = a.to_dtype(DType::F32)?.contiguous()?;
        let b = b.to_dtype(DType::F32)?.contiguous()?;
        let (input_kernel, output_kernel) = match geometry {
            LayerGeometry::Linear { .. } => (None, None),
            LayerGeometry::Conv2d {
                out_channels,
                kernel,
                params,
                ..
            } => {
                let groups = params.groups;
                if out_channels % groups != 0 {
                    return Err(PeftError::Unsupported(format!(
                        "a conv with {out_channels} output channels cannot have {groups} groups"
                    )));
                }
                let filters =
                    a.reshape((k, in_flat / (kernel.0 * kernel.1), kernel.0, kernel.1))?;
                let tiled = Tensor::cat(&vec![filters; groups], 0)?;
                (Some(tiled), Some(b.reshape((out, k, 1, 1))?))
            }
        };
        Ok(Self {
            geometry,
            k,
            input_rows: a,
            output_cols: b,
            input_kernel,
            output_kernel,
        })
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// `A: [k, in_flat]`.
    pub(crate) fn a(&self) -> &Tensor {
        &self.input_rows
    }

    /// `B: [out, k]`.
    pub(crate) fn b(&self) -> &Tensor {
        &self.output_cols
    }

    fn groups(&self) -> usize {
        match self.geometry {
            LayerGeometry::Linear { .. } => 1,
            LayerGeometry::Conv2d { params, .. } => params.groups,
        }
    }

    /// `A x` with the `k` coordinates on the last axis: `[.., k]` for a linear layer,
    /// `[N, groups, H'·W', k]` for a conv (then `spatial` gives `(H', W')`).
    pub(crate) fn project_in(&self, x: &Tensor) -> Result<(Tensor, Option<(usize, usize)>)> {
        let x = x.to_dtype(DType::F32)?;
        match (self.geometry, &self.input_kernel) {
            (LayerGeometry::Conv2d { params, .. }, Some(kernel)) => {
                let h = frozen_conv2d(
                    &x,
                    kernel,
                    None,
                    params.padding,
                    params.stride,
                    params.dilation,
                    params.groups,
                )?;
                let (n, _, oh, ow) = h.dims4()?;
                let h = h
                    .reshape((n, self.groups(), self.k, oh * ow))?
                    .transpose(2, 3)?;
                Ok((h, Some((oh, ow))))
            }
            _ => Ok((frozen_matmul(&x, &self.input_rows, None)?, None)),
        }
    }

    /// `B h` for `h` as [`Self::project_in`] lays it out: `[.., out]` or `[N, out, H', W']`.
    pub(crate) fn project_out(
        &self,
        h: &Tensor,
        spatial: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        match (&self.output_kernel, spatial) {
            (Some(kernel), Some((oh, ow))) => {
                let n = h.dim(0)?;
                let h = h.transpose(2, 3)?.contiguous()?.reshape((
                    n,
                    self.groups() * self.k,
                    oh,
                    ow,
                ))?;
                Ok(frozen_conv2d(&h, kernel, None, 0, 1, 1, self.groups())?)
            }
            _ => Ok(frozen_matmul(h, &self.output_cols, None)?),
        }
    }

    /// `ΔW = B diag(d) A`, in the base weight's shape.
    pub(crate) fn dense_diag(&self, d: &Tensor) -> Result<Tensor> {
        let scaled = self.output_cols.broadcast_mul(&d.reshape((1, self.k))?)?;
        self.to_weight_shape(scaled.matmul(&self.input_rows)?)
    }

    /// `ΔW = B C A` for a `k × k` core, in the base weight's shape.
    pub(crate) fn dense(&self, core: &Tensor) -> Result<Tensor> {
        let bc = self.output_cols.matmul(core)?;
        self.to_weight_shape(bc.matmul(&self.input_rows)?)
    }

    fn to_weight_shape(&self, flat: Tensor) -> Result<Tensor> {
        Ok(flat.reshape(self.geometry.weight_shape())?)
    }
}

/// `x · 1[x > 0]`: a ReLU whose gradient at 0 is 0, as PyTorch's (candle's `relu` passes the
/// gradient at 0). The mask is a constant of the graph.
pub(crate) fn relu_zero_grad(x: &Tensor) -> Result<Tensor> {
    let mask = x.gt(0f64)?.to_dtype(x.dtype())?.detach();
    Ok(x.mul(&mask)?)
}

/// `‖v‖₂` over all entries with gradient `v / ‖v‖` (0 at `v = 0`): the norm's value times a
/// detached unit direction, since candle's `sqrt` backward is infinite at 0.
pub(crate) fn safe_norm(v: &Tensor) -> Result<Tensor> {
    let norm = v
        .detach()
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if norm == 0.0 {
        return Ok(v.sum_all()?.affine(0.0, 0.0)?);
    }
    let direction = (v.detach() / norm)?;
    Ok(v.mul(&direction)?.sum_all()?)
}

/// `--opt svd_dtype=float32|float64`, shared by the SVD-based methods.
pub(crate) const SVD_DTYPE: OptionSpec = option(
    "svd_dtype",
    OptionKind::Str,
    "precision of the SVD: float64 (default) or float32",
);

/// serde's default of a precision field: f64.
pub(crate) fn f64_precision() -> Precision {
    Precision::F64
}

/// serde's `deserialize_with` for a precision field (`float32`/`float64`; `null`: f64).
pub(crate) fn precision_or_f64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Precision, D::Error> {
    use serde::Deserialize;
    match Option::<String>::deserialize(d)? {
        None => Ok(Precision::F64),
        Some(v) => Precision::from_name(&v).ok_or_else(|| {
            serde::de::Error::custom(format!("`{v}` is not a precision (float32 or float64)"))
        }),
    }
}
