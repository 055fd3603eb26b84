//! Helpers of the ignored per-op timing tests: `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=2 cargo
//! test --release --lib kernels -- --ignored --nocapture --test-threads=1`; `TIMING_REPS` sets
//! the repetitions (the best is printed).

use candle_core::{Device, Tensor};

pub(crate) fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> std::time::Duration {
    (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn reps() -> usize {
    std::env::var("TIMING_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}
