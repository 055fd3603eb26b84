//! Conversions between f32 and the 16-bit float types, one function per instruction set.
//!
//! Widening is exact: a bf16 is the top half of an f32 (shift left by 16), and every f16 is an
//! f32 (`vcvtph2ps`). Narrowing f32 → bf16 rounds to nearest, ties to even, as `vcvtneps2bf16`
//! and PyTorch's autocast do; it is used only by the native bf16 path, whose activations must be
//! bf16 to enter `vdpbf16ps`.
//!
//! The widening path runs once per weight tile, so it must keep up with the gemm that consumes
//! the tile: the scalar loop is a fallback for CPUs without AVX2, not a fast path.

use half::{bf16, f16};

use super::Path;

/// `dst = f32(src)`; `src` and `dst` have the same length.
pub(super) fn widen_bf16(path: Path, src: &[bf16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        // The path is checked again here (a cached atomic load) so that no caller can reach an
        // instruction the CPU lacks.
        if matches!(path, Path::Avx512Bf16 | Path::Avx512) && Path::Avx512.is_supported() {
            // SAFETY: AVX-512F is present (checked just above).
            unsafe { x86::widen_bf16_avx512(src, dst) };
            return;
        }
        if path == Path::Avx2 && Path::Avx2.is_supported() {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { x86::widen_bf16_avx2(src, dst) };
            return;
        }
    }
    let _ = path;
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
}

/// `dst = f32(src)`; `src` and `dst` have the same length.
pub(super) fn widen_f16(path: Path, src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(path, Path::Avx512Bf16 | Path::Avx512) && Path::Avx512.is_supported() {
            // SAFETY: AVX-512F is present (checked just above).
            unsafe { x86::widen_f16_avx512(src, dst) };
            return;
        }
        if path == Path::Avx2 && Path::Avx2.is_supported() {
            // SAFETY: AVX2 and F16C are present (Path::Avx2 requires both; checked just above).
            unsafe { x86::widen_f16_avx2(src, dst) };
            return;
        }
    }
    let _ = path;
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    #[target_feature(enable = "avx512f")]
    pub(in super::super) fn widen_bf16_avx512(src: &[bf16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n / 16 * 16;
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ both lengths; bf16 is a transparent u16, unaligned loads and
            // stores are allowed.
            unsafe {
                let v = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v));
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_castsi512_ps(w));
            }
        }
        for i in body..n {
            dst[i] = src[i].to_f32();
        }
    }

    #[target_feature(enable = "avx2")]
    pub(in super::super) fn widen_bf16_avx2(src: &[bf16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ both lengths; unaligned loads and stores are allowed.
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(i).cast());
                let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v));
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(w));
            }
        }
        for i in body..n {
            dst[i] = src[i].to_f32();
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(in super::super) fn widen_f16_avx512(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n / 16 * 16;
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ both lengths; f16 is a transparent u16.
            unsafe {
                let v = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(v));
            }
        }
        for i in body..n {
            dst[i] = src[i].to_f32();
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(in super::super) fn widen_f16_avx2(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ both lengths; f16 is a transparent u16.
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
            }
        }
        for i in body..n {
            dst[i] = src[i].to_f32();
        }
    }

    /// `dst = bf16(src)`, round to nearest even (`vcvtneps2bf16`, which also flushes subnormal
    /// inputs to zero: they are below bf16's useful range for activations anyway).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(in super::super) fn round_bf16(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let body = n / 16 * 16;
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ both lengths; __m256bh and __m256i are both 32 plain bytes.
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(i));
                let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), b);
            }
        }
        if body < n {
            let mask: u16 = (1u16 << (n - body)) - 1;
            // SAFETY: the masked load and store touch only the n - body < 16 lanes left.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(body));
                let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(body).cast(), mask, b);
            }
        }
    }
}
