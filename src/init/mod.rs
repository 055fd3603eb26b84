//! Seeded random draws. candle's CPU RNG cannot be seeded, so every initial value and dropout
//! mask comes from a ChaCha RNG here and enters candle through `Tensor::from_vec`.

pub mod basis;

use std::sync::Mutex;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// `n` draws from `U(lo, hi)`.
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| lo + (hi - lo) * rng.random::<f32>())
        .collect()
}

/// `n` draws from `N(0, std²)` (Box–Muller).
pub fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // 1 − u keeps the log argument in (0, 1].
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        out.push((radius * angle.cos()) as f32 * std);
        if out.len() < n {
            out.push((radius * angle.sin()) as f32 * std);
        }
    }
    out
}

/// Inverted dropout: zero each element with probability `p`, scale the rest by `1/(1−p)`.
pub fn dropout(x: &Tensor, p: f32, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let scale = 1.0 / keep;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.random::<f32>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// An adapter's input dropout: probability `p` and its own seeded stream of masks (one mask
/// per training forward, drawn in call order).
#[derive(Debug)]
pub struct Dropout {
    p: f32,
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    /// Dropout with probability `p`, its masks drawn from a ChaCha RNG seeded with `seed`.
    pub fn new(p: f32, seed: u64) -> Self {
        Self {
            p,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// The mask stream's state, for a checkpoint (resume is then bit-exact).
    pub fn rng_state(&self) -> ChaCha8Rng {
        self.rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts back a mask stream's state saved by [`Self::rng_state`].
    pub fn set_rng_state(&self, rng: ChaCha8Rng) {
        *self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = rng;
    }

    /// The probability `p`.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// Whether a forward with this `train` flag draws a mask (`train` and `p > 0`).
    pub fn is_active(&self, train: bool) -> bool {
        train && self.p > 0.0
    }

    /// `x` with the stream's next mask applied ([`dropout`]) when [`Self::is_active`]; `x`
    /// itself otherwise (no draw).
    pub fn apply(&self, x: Tensor, train: bool) -> Result<Tensor> {
        if !self.is_active(train) {
            return Ok(x);
        }
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        dropout(&x, self.p, &mut rng)
    }
}

/// A stable 64-bit seed from a name (FNV-1a), so per-module streams don't depend on hash maps.
pub fn seed_from_name(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
