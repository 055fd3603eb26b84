//! Seeded shared random bases: a small basis `A` and a stack of large bases `B`, drawn dense
//! (uniform) or ternary (sparse), then normalised by their standard deviation.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{PeftError, Result};

/// Draws the bases `A` (`r·small` values, laid out `[r, 1, small]`) and `B` (`big·n·r` values,
/// laid out `[big, n, r]` with `n = ⌈small/r⌉`) from a ChaCha RNG seeded with `seed`, `A` first.
///
/// With `sparsity = Some(s)` both are ternary ([`ternary`] of `U(0, 1)` draws); otherwise `A`
/// is `U(±1/√small)` and `B` is drawn as `n` chunks of `[big, r]` values from `U(±1/√r)`, each
/// chunk filling one slot of dim 1. Not yet normalised (see [`divide_by_std`]).
pub fn draw_bases(
    seed: u64,
    r: usize,
    small: usize,
    big: usize,
    sparsity: Option<f64>,
) -> (Vec<f32>, Vec<f32>) {
    let n_g = small.div_ceil(r);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if let Some(sparsity) = sparsity {
        let a = ternary(&super::uniform(&mut rng, r * small, 0.0, 1.0), sparsity);
        let b = ternary(&super::uniform(&mut rng, big * n_g * r, 0.0, 1.0), sparsity);
        (a, b)
    } else {
        let bound_a = 1.0 / (small as f32).sqrt();
        let a = super::uniform(&mut rng, r * small, -bound_a, bound_a);
        // One `[K_g, 1, r]` chunk per basis, concatenated along dim 1.
        let bound_b = 1.0 / (r as f32).sqrt();
        let mut b = vec![0f32; big * n_g * r];
        for basis in 0..n_g {
            let chunk = super::uniform(&mut rng, big * r, -bound_b, bound_b);
            for p in 0..big {
                let dst = (p * n_g + basis) * r;
                b[dst..dst + r].copy_from_slice(&chunk[p * r..(p + 1) * r]);
            }
        }
        (a, b)
    }
}

/// Maps `U(0, 1)` draws to −1 / 0 / +1 with P(±1) = 1/(2·sparsity) each.
pub fn ternary(u: &[f32], sparsity: f64) -> Vec<f32> {
    let lo = 1.0 / (2.0 * sparsity);
    let hi = 1.0 - lo;
    u.iter()
        .map(|&v| {
            let v = f64::from(v);
            if v < lo {
                -1.0
            } else if v > hi {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// `v / std(v)` with torch's unbiased std over the whole tensor; `key` names the tensor in
/// the error when the std is zero or not finite.
pub fn divide_by_std(mut v: Vec<f32>, key: &str) -> Result<Vec<f32>> {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    let std = var.sqrt();
    if !(std.is_finite() && std > 0.0) {
        return Err(PeftError::config(
            key,
            format!(
                "the random basis has std {std} ({} entries); it cannot be normalised \
                 (use dense bases or larger layers)",
                v.len()
            ),
        ));
    }
    for x in &mut v {
        *x = (f64::from(*x) / std) as f32;
    }
    Ok(v)
}
