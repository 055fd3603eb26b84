//! Deterministic inputs and comparisons shared by the kernels' unit tests (and the model
//! layers' tests that check a fused op against its plain composition).

use candle_core::{Device, Tensor, Var};

/// `n` smooth values in `[-0.9, 0.9]`, different for each `seed`.
pub(crate) fn sine_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.618 + seed as f32 * 1.37).sin() * 0.9)
        .collect()
}

/// `n` scattered values on a grid of 1/500 in `[-1, 1)`, different for each `seed`.
pub(crate) fn grid_values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// A CPU tensor of [`sine_values`].
pub(crate) fn tensor(shape: &[usize], seed: u32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(sine_values(n, seed), shape, &Device::Cpu).unwrap()
}

/// A variable holding [`tensor`]`(shape, seed)`.
pub(crate) fn var(shape: &[usize], seed: u32) -> Var {
    Var::from_tensor(&tensor(shape, seed)).unwrap()
}

/// `max |a − b|` over every element.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// `max |a|` over every element.
pub(crate) fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
