//! Reading and comparing tensors in tests.

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// All elements as f32, in row-major order.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The bit patterns of [`flat`], for bit-exact comparisons.
pub fn bits(t: &Tensor) -> Vec<u32> {
    flat(t).iter().map(|v| v.to_bits()).collect()
}

/// `max |t|` over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    flat(t).iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// `max |a − b|` over all elements (as f32); the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    flat(a)
        .iter()
        .zip(flat(b))
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// A tensor of `shape` with elements uniform in `[-scale, scale)`.
pub fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
