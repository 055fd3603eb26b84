//! Seeded shared random bases: a small basis `A` and a stack of large bases `B`, drawn dense
//! (uniform) or ternary (sparse), then normalised by their standard deviation.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{PeftError, Result};

/// The bases as tensors on `device`: [`draw_bases`], then each [`divide_by_std`] (`keys` name
/// `A` and `B` in its errors). `A: [r, 1, small]`, `B: [big, ⌈small/r⌉, r]`.
pub fn make_bases(
    seed: u64,
    r: usize,
    (small, big): (usize, usize),
    sparsity: Option<f64>,
    keys: (&str, &str),
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (a, b) = draw_bases(seed, r, small, big, sparsity);
    let a = divide_by_std(a, keys.0)?;
    let b = divide_by_std(b, keys.1)?;
    Ok((
        Tensor::from_vec(a, (r, 1, small), device)?,
        Tensor::from_vec(b, (big, small.div_ceil(r), r), device)?,
    ))
}

/// Checks that bases `A` and `B` (shapes as [`make_bases`] makes them, for any `small ≥ k`,
/// `big ≥ big_k`) cover one layer of module `module` with `n` bases of rank `r`, smaller side
/// `k` and larger side `big_k`; the error says what the layer needs.
pub fn check_covers(
    module: &str,
    (a, b): (&Tensor, &Tensor),
    r: usize,
    n: usize,
    (k, big_k): (usize, usize),
) -> Result<()> {
    if !matches!(*a.dims(), [ra, 1, ka] if ra == r && ka >= k) {
        return Err(PeftError::layer(
            module,
            format!(
                "randlora_A has shape {:?}; this layer needs [{r}, 1, ≥{k}] (r = {r}, \
                 min(in, out) = {k})",
                a.dims()
            ),
        ));
    }
    if !matches!(*b.dims(), [kb, nb, rb] if rb == r && kb >= big_k && nb >= n) {
        return Err(PeftError::layer(
            module,
            format!(
                "randlora_B has shape {:?}; this layer needs [≥{big_k}, ≥{n}, {r}] \
                 (max(in, out) = {big_k}, n = ⌈{k}/{r}⌉ = {n})",
                b.dims()
            ),
        ));
    }
    Ok(())
}

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
