//! `exp` over f32 slices, vectorised: the softmax, cross-entropy and SiLU kernels spend most of
//! their time in it, and libm's `expf` is scalar (and takes a slow path with `errno` for every
//! argument that underflows, such as a masked attention score).
//!
//! The method is Cephes' `expf`: `x = n ln 2 + r` with `n = round(x / ln 2)` and `|r| ≤ ln 2 / 2`
//! (`ln 2` split in two parts so `r` is exact), `e^r ≈ 1 + r + r² P(r)` with a degree-5 `P`, and
//! `2ⁿ` put into the exponent bits. Relative error ≤ 2 ulp on `[-87.3, 88.7]`; below that range
//! the result is 0 (as `expf` underflows to), above it `+∞`, and NaN stays NaN.
//!
//! The loops are plain branch-free Rust; on x86-64 a copy compiled with AVX2 and FMA is chosen at
//! run time (the crate is built for the baseline target), which LLVM vectorises 8 wide.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this `e^x` is under f32's smallest normal; the result is flushed to 0.
const MIN_ARG: f32 = -87.336_55;
/// Above this `e^x` overflows f32.
const MAX_ARG: f32 = 88.722_84;

/// `e^x`, branch-free so that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let clamped = x.clamp(MIN_ARG, MAX_ARG);
    let n = (clamped * LOG2_E).round_ties_even();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    // Separate multiplies and adds: `mul_add` is a libm call on the baseline target. The
    // vector path fuses them, which can change the last bit.
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r2 + r + 1.0;
    // n ∈ [-126, 128]: 2ⁿ as exponent bits (n = 128 only for x near MAX_ARG, handled below).
    let scale = f32::from_bits((((n as i32).min(127) + 127) as u32) << 23);
    let y = e_r * scale;
    let y = if n > 127.0 { y * 2.0 } else { y };
    if x.is_nan() {
        x
    } else if x < MIN_ARG {
        0.0
    } else if x > MAX_ARG {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{LN2_HI, LN2_LO, LOG2_E, MAX_ARG, MIN_ARG};

    /// Eight lanes of [`super::exp`], the same operations in the same order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        let clamped = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(MIN_ARG)),
            _mm256_set1_ps(MAX_ARG),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(clamped, _mm256_set1_ps(LOG2_E)),
        );
        let r = _mm256_sub_ps(clamped, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI)));
        let r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)));
        let r2 = _mm256_mul_ps(r, r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e_r = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let n_int = _mm256_cvtps_epi32(n);
        let capped = _mm256_min_epi32(n_int, _mm256_set1_epi32(127));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            capped,
            _mm256_set1_epi32(127),
        )));
        let y = _mm256_mul_ps(e_r, scale);
        let doubled = _mm256_cmp_ps::<_CMP_GT_OQ>(n, _mm256_set1_ps(127.0));
        let y = _mm256_blendv_ps(y, _mm256_add_ps(y, y), doubled);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(MIN_ARG));
        let y = _mm256_andnot_ps(under, y);
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(MAX_ARG));
        let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over);
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        _mm256_blendv_ps(y, x, nan)
    }

    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted(v: &mut [f32], shift: f32, write: bool) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = v.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds eight f32.
            let x = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            let y = exp8(_mm256_sub_ps(x, s));
            if write {
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), y) };
            }
            acc = _mm256_add_ps(acc, y);
        }
        let mut sum = sum8(acc);
        for value in chunks.into_remainder() {
            let y = super::exp(*value - shift);
            if write {
                *value = y;
            }
            sum += y;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn neg_exp_into(src: &[f32], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (src, dst) = (&src[..n], &mut dst[..n]);
        let zero = _mm256_setzero_ps();
        let mut d_chunks = dst.chunks_exact_mut(8);
        let mut s_chunks = src.chunks_exact(8);
        for (d, s) in (&mut d_chunks).zip(&mut s_chunks) {
            // SAFETY: both chunks hold eight f32.
            unsafe {
                let x = _mm256_loadu_ps(s.as_ptr());
                _mm256_storeu_ps(d.as_mut_ptr(), exp8(_mm256_sub_ps(zero, x)));
            }
        }
        for (d, &x) in d_chunks
            .into_remainder()
            .iter_mut()
            .zip(s_chunks.remainder())
        {
            *d = super::exp(-x);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_exp_shifted(v: &[f32], shift: f32) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = v.chunks_exact(8);
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds eight f32.
            let x = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(x, s)));
        }
        let mut sum = sum8(acc);
        for &value in chunks.remainder() {
            sum += super::exp(value - shift);
        }
        sum
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `v[i] = e^(v[i] − shift)`, returning `Σ v[i]` after the update (a softmax numerator and its
/// sum in one pass).
pub(crate) fn exp_shifted_sum(v: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::exp_shifted(v, shift, true) };
    }
    v.iter_mut()
        .map(|value| {
            *value = exp(*value - shift);
            *value
        })
        .sum()
}

/// `Σ e^(v[i] − shift)`, leaving `v` alone.
pub(crate) fn sum_exp_shifted(v: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::sum_exp_shifted(v, shift) };
    }
    v.iter().map(|&value| exp(value - shift)).sum()
}

/// `v[i] = e^(v[i] − shift)`.
pub(crate) fn exp_shifted_in_place(v: &mut [f32], shift: f32) {
    exp_shifted_sum(v, shift);
}

/// `dst[i] = e^(−src[i])` (the sigmoid's `e^(−x)`), over the shorter of the two.
pub(crate) fn neg_exp_into(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::neg_exp_into(src, dst) };
    }
    dst.iter_mut().zip(src).for_each(|(d, &x)| *d = exp(-x));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn matches_libm_within_two_ulp() {
        let mut x = -87.3f32;
        let mut worst = 0;
        while x < 88.7 {
            let (ours, libm) = (exp(x), f64::from(x).exp() as f32);
            worst = worst.max(ulps(ours, libm));
            x += 0.0137;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!((exp(88.7) / f64::from(88.7f32).exp() as f32 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn slices_agree_with_scalar() {
        let values: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let shift = 3.5;
        let mut v = values.clone();
        let sum = exp_shifted_sum(&mut v, shift);
        let mut expected = 0f64;
        for (&got, &x) in v.iter().zip(&values) {
            let scalar = exp(x - shift);
            assert!(ulps(got, scalar) <= 1, "{got} against {scalar} at {x}");
            expected += f64::from(got);
        }
        let mut negated = vec![0f32; values.len()];
        neg_exp_into(&values, &mut negated);
        for (&got, &x) in negated.iter().zip(&values) {
            assert!(ulps(got, exp(-x)) <= 1, "e^-x at {x}");
        }
        assert!((f64::from(sum) / expected - 1.0).abs() < 1e-6);
        let sum2 = sum_exp_shifted(&values, shift);
        assert!((f64::from(sum2) / expected - 1.0).abs() < 1e-6);
        let mut w = values.clone();
        exp_shifted_in_place(&mut w, shift);
        assert_eq!(w, v);
    }
}

/// Throughput probe (ignored): `cargo test --release --lib fast_exp::speed -- --ignored --nocapture`.
#[cfg(test)]
#[test]
#[ignore]
fn speed() {
    let values: Vec<f32> = (0..1 << 20)
        .map(|i| (i as f32 * 0.37).sin() * 30.0)
        .collect();
    let mut v = values.clone();
    let t = std::time::Instant::now();
    let mut s = 0.0;
    for _ in 0..20 {
        v.copy_from_slice(&values);
        s += exp_shifted_sum(&mut v, 1.0);
    }
    let fast = t.elapsed();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        v.copy_from_slice(&values);
        s += v
            .iter_mut()
            .map(|x| {
                *x = (*x - 1.0).exp();
                *x
            })
            .sum::<f32>();
    }
    println!("fast {fast:?} libm {:?} ({s})", t.elapsed());
}
