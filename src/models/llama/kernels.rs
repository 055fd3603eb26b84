//! The Llama forward's RoPE on its rotary tables, and its fused element-wise ops (the kernels
//! live in `crate::kernels`).

use candle_core::Tensor;

use super::RopeTables;
use crate::error::Result;
use crate::kernels::rope::RopeAngles;
pub use crate::kernels::rope::rope_reference;
pub use crate::kernels::swiglu::swiglu;

impl RopeTables {
    /// The tables as the kernels read them.
    pub(crate) fn angles(&self) -> RopeAngles<'_> {
        RopeAngles {
            cos: &self.cos,
            sin: &self.sin,
            cos_values: &self.cos_values,
            sin_values: &self.sin_values,
        }
    }
}

/// `scale·RoPE(x)` for `x: [B, T, H, d]` at the tables' positions, as `[B, H, T, d]`.
pub(crate) fn rope(x: &Tensor, tables: &RopeTables, scale: f64) -> Result<Tensor> {
    crate::kernels::rope::rope(x, &tables.angles(), scale)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `(Σ w ⊙ f(x), dL/dx)` for a fixed weighting `w` of the output.
    fn grad_of(x: &Var, y: &Tensor, seed: usize) -> Tensor {
        let w = Tensor::from_vec(values(y.elem_count(), seed), y.shape(), &Device::Cpu).unwrap();
        let loss = (y * w).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
    }

    #[test]
    fn rope_matches_the_plain_ops_forward_and_backward() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = Var::from_vec(values(b * t * h * d, 1), (b, t, h, d), &Device::Cpu).unwrap();
        let tables = RopeTables::new(&[1.0, 0.3, 0.05, 0.01], 3, t, &Device::Cpu).unwrap();
        let fused = rope(&x, &tables, 0.7).unwrap();
        let plain = rope_reference(&x, &tables.cos, &tables.sin, 0.7).unwrap();
        assert_eq!(fused.dims(), &[b, h, t, d]);
        assert!(max_diff(&fused, &plain) < 1e-6);
        // Position 3 (the first of the table) rotates pair (0, 4) of head 0 by 3 rad, scaled.
        let x0 = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y0 = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (c, s) = (3f32.cos(), 3f32.sin());
        assert!((y0[0] - 0.7 * (x0[0] * c - x0[4] * s)).abs() < 1e-6);
        let g_fused = grad_of(&x, &fused, 2);
        let g_plain = grad_of(&x, &plain, 2);
        assert!(max_diff(&g_fused, &g_plain) < 1e-6);
    }
}
