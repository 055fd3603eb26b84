//! GELU in its exact (erf) form: `y = x·Φ(x) = ½x(1 + erf(x/√2))`, backward
//! `dx = g·(Φ(x) + x·φ(x))`, with `erf` from Abramowitz–Stegun 7.1.26 (absolute error
//! ≤ 1.5e-7), one pass each way.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::blocks::{BLOCK, collect_blocks};
#[cfg(feature = "cuda")]
use super::cuda::{cuda_tensor, into_cuda};
use super::fast_exp;
use super::slices::{f32_input, grad_operands, output_storage};

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

/// `x·Φ(x)` of each value, on rayon's threads: the op's forward on values.
pub(crate) fn gelu_erf_values(x: &[f32]) -> Vec<f32> {
    collect_blocks(x.len(), |start, dst| {
        let xs = &x[start..start + dst.len()];
        let mut pdf = [0f32; BLOCK];
        normal_cdf_pdf_block(xs, dst, &mut pdf[..xs.len()]);
        for (d, &v) in dst.iter_mut().zip(xs) {
            *d *= v;
        }
    })
}

/// `g·(Φ(x) + x·φ(x))`, the gradient of [`gelu_erf_values`] for the output gradient `g`
/// (`x`'s length).
pub(crate) fn gelu_erf_grad_values(x: &[f32], g: &[f32]) -> Vec<f32> {
    collect_blocks(x.len(), |start, dst| {
        let end = start + dst.len();
        let (xb, gb) = (&x[start..end], &g[start..end]);
        let mut pdf = [0f32; BLOCK];
        let pdf = &mut pdf[..xb.len()];
        normal_cdf_pdf_block(xb, dst, pdf);
        for (((d, &v), &p), &g) in dst.iter_mut().zip(xb).zip(pdf.iter()).zip(gb) {
            *d = g * (*d + v * p);
        }
    })
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
        let out = gelu_erf_values(src);
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
        let (mut cx, mut cg) = (None, None);
        let (shape, xs, gs) =
            grad_operands("gelu-erf-grad", x, x_layout, g, g_layout, &mut cx, &mut cg)?;
        let out = gelu_erf_grad_values(xs, gs);
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

#[cfg(test)]
mod timing {
    use super::*;
    use crate::kernels::timing::{best_of, random, reps};

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
}
