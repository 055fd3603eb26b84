//! What the element-wise kernels share for vectorising: the `simd_kernel!` macro (a body
//! compiled for baseline x86-64 and for AVX2 + FMA, chosen at run time) and lane-parallel
//! reductions.

/// Defines `fn $name` with its body compiled twice: for the crate's baseline target, and with
/// AVX2 and FMA enabled, the second chosen at run time where the CPU has them. The crate is
/// built for baseline x86-64, where the loops vectorise four f32 wide (two f64) instead of
/// eight (four).
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::simd::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { avx2($($arg),*) };
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// Whether [`simd_kernel`]s take their AVX2 + FMA copy (the answer is cached by std).
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Independent accumulators for the row reductions: one running sum is a chain of dependent
/// adds (an add's latency per element); sixteen chains fill two AVX registers and vectorise.
pub(crate) const LANES: usize = 16;

/// The row sums accumulate in f32 lanes within each [`BLOCK`](super::blocks::BLOCK) (sixteen values per lane, so
/// relative error ≤ 16·2⁻²⁴ there) and in f64 across blocks, so the error does not grow with the
/// row length; whole-row f64 accumulation is several times slower, and f32's error over a
/// block of 256 is already below the f32 result's rounding.
#[inline(always)]
pub(crate) fn lanes_to_f64(acc: &[f32; LANES], tail: f32) -> f64 {
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail)
}

/// `max v` (`-∞` for an empty slice), with independent lanes so it vectorises; NaNs are
/// skipped, as `f32::max` skips them.
#[inline]
pub(crate) fn row_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let lanes = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    chunks.remainder().iter().copied().fold(lanes, f32::max)
}

/// `Σ a·b` in f32 with independent lanes (see [`LANES`]).
#[inline]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ac, mut bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ac).zip(&mut bc) {
        for lane in 0..LANES {
            acc[lane] += x[lane] * y[lane];
        }
    }
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}
