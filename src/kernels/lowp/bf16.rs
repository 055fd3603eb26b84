//! Native bf16 products on CPUs with AVX512-BF16: `vdpbf16ps` multiplies 32 pairs of bf16 and
//! adds each pair's sum into one of 16 f32 lanes, twice the multiply-adds of an f32 FMA per
//! instruction, and reads the weight at half the bytes.
//!
//! Both operands must be bf16, so each product rounds its activation rows (x for `x·Wᵀ`, g for
//! `g·W`) to bf16 once, to nearest even, as PyTorch's autocast does; products and sums stay f32.
//! Against the exact product on the stored weights, each term `x·w` carries at most the relative
//! rounding error of x, 2⁻⁹ (half an ulp of an 8-bit significand), so
//! `|err| ≤ 2⁻⁹·Σ|x||w| + f32 summation error`. The widening path keeps f32 activations and is
//! exact up to f32 summation: the two paths agree only up to that rounding.
//!
//! Why our own kernels: the `gemm` crate has no bf16 dot-product kernel (its bf16/f16 gemm
//! widens to f32 inside the micro-kernel), and candle's bf16 CPU matmul goes through the same
//! widening, so neither reaches `vdpbf16ps`.
//!
//! `x·Wᵀ` reduces along rows that are contiguous in both operands (x's and W's), so it needs no
//! packing: a 4 × 4 block of dot products keeps 16 accumulators of 16 lanes and sums each
//! accumulator's lanes at the end. `g·W` reduces along W's rows, across its memory layout, so
//! each product first interleaves pairs of W rows (`[W[r,c], W[r+1,c]]` for each c) into packed
//! panels, one per strip of output columns, which puts `vdpbf16ps`'s pairs along the reduction;
//! a 6 × 64 block of the output then takes one broadcast pair of g per row and four vectors of
//! the panel per step, like an f32 gemm micro-kernel. The rounding and the packing are done once
//! per product, not per tile: every tile along the other dimension reads the same values.

use std::arch::x86_64::*;
use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use super::Path;
use super::convert::x86::round_bf16;
use super::tasks::{self, SharedOut};
use crate::kernels::gemm::Threads;

/// x rows and W rows per `x·Wᵀ` tile: 64 rows of x and W at k ≈ 1–2 K stay in L2.
const XWT_TILE: usize = 64;
/// g rows per `g·W` tile: a multiple of the micro-kernel's 6.
const GW_M_TILE: usize = 96;
/// W columns per `g·W` tile: two 64-column strips.
const GW_C_TILE: usize = 128;
/// W rows per packed `g·W` panel: 64 pairs × 64 columns of bf16 pairs is 16 KiB, half of L1.
const GW_R_CHUNK: usize = 128;
/// Values rounded per task when activations are rounded to bf16 before a product.
const ROUND_BLOCK: usize = 1 << 15;

/// The raw bits of bf16 values (bf16 is a transparent u16).
fn bits(v: &[bf16]) -> &[u16] {
    // SAFETY: `half::bf16` is `#[repr(transparent)]` over u16: same size, alignment and validity.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u16>(), v.len()) }
}

fn dim(len: usize, target: usize, min: usize, quantum: usize) -> tasks::Dim {
    tasks::Dim {
        len,
        target,
        min,
        quantum,
    }
}

fn check_cpu(op: &str) -> candle_core::Result<()> {
    if !Path::Avx512Bf16.is_supported() {
        candle_core::bail!("{op}: this CPU has no AVX512-BF16 for the native bf16 kernels");
    }
    Ok(())
}

/// `dst (m × n) = [dst +] x (m × k) · Wᵀ`, `w` the bf16 rows `n × k`.
pub(super) fn xwt(
    op: &str,
    dst: &mut [f32],
    x: &[f32],
    w: &[bf16],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
) -> candle_core::Result<()> {
    check_cpu(op)?;
    if x.len() != m * k || w.len() != n * k {
        candle_core::bail!("{op}: bf16 x·Wᵀ operands are not {m}×{k} and {n}×{k}");
    }
    let w = bits(w);
    tasks::with_product_scratch(|p| {
        let xb = rounded_rows(threads, x, (m, k), k, &mut p.act);
        let (mt, nt) = tasks::split(threads, dim(m, XWT_TILE, 16, 4), dim(n, XWT_TILE, 16, 4));
        let (m_tiles, n_tiles) = (m.div_ceil(mt), n.div_ceil(nt));
        let Some(out) = SharedOut::new(dst, m, n) else {
            candle_core::bail!("{op}: bf16 x·Wᵀ output is not {m}×{n}");
        };
        tasks::for_each_tile(threads, m_tiles * n_tiles, |t| {
            let (i0, j0) = (t / n_tiles * mt, t % n_tiles * nt);
            let (i1, j1) = ((i0 + mt).min(m), (j0 + nt).min(n));
            let (mi, width) = (i1 - i0, j1 - j0);
            // SAFETY: tile t alone owns rows i0..i1 × columns j0..j1 of the output.
            let Some(dst) = (unsafe { out.rect(i0..i1, j0..j1) }) else {
                candle_core::bail!("{op}: a tile outside its {m}×{n} output");
            };
            // SAFETY: check_cpu found AVX512-BF16 (and F, BW, VL); xb and w hold mi × k and
            // width × k values, and `dst` is this tile's rectangle, rows n apart.
            if !unsafe {
                xwt_tile(
                    &xb[i0 * k..i1 * k],
                    &w[j0 * k..j1 * k],
                    (mi, width, k),
                    (dst, n),
                    accumulate,
                )
            } {
                candle_core::bail!("{op}: bf16 x·Wᵀ tile buffers do not match {mi}×{width}×{k}");
            }
            Ok(())
        })
    })
}

/// `src` (`rows × cols` f32) rounded to bf16 bits into `buf`, each row padded with zeros to
/// `stride` values, on candle's threads. Done once per product: every tile along the other operand reads
/// the same rows, and rounding them per tile cost up to 24 passes over the activations.
fn rounded_rows<'b>(
    threads: Threads,
    src: &[f32],
    (rows, cols): (usize, usize),
    stride: usize,
    buf: &'b mut Vec<u16>,
) -> &'b [u16] {
    let dst = tasks::prefix(buf, rows * stride);
    let block = (ROUND_BLOCK / stride.max(1)).max(1);
    let round = |(i, d): (usize, &mut [u16])| {
        for (r, row) in d.chunks_exact_mut(stride).enumerate() {
            let at = (i * block + r) * cols;
            // SAFETY: the callers ran check_cpu, which found AVX512-BF16 (and F, BW, VL).
            unsafe { round_bf16(&src[at..at + cols], &mut row[..cols]) };
            // The buffer is reused: the padding must be zeroed again.
            row[cols..].fill(0);
        }
    };
    if threads == Threads::Candle && rows > block && candle_core::utils::get_num_threads() > 1 {
        dst.par_chunks_mut(block * stride)
            .enumerate()
            .for_each(round);
    } else {
        dst.chunks_mut(block * stride).enumerate().for_each(round);
    }
    dst
}

/// `out (mi × width, rows os apart) = [out +] xb (mi × k) · wᵀ (k × width)`; both operands
/// bf16 bits, rows of k. The tile writes straight into the product's output: a tile-sized
/// buffer copied afterwards cost a pass over the output per product.
///
/// # Safety
/// AVX512-BF16 is present; `out` points at mi rows of width writable f32, os apart, that no
/// other thread touches during the call.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[must_use]
unsafe fn xwt_tile(
    xb: &[u16],
    w: &[u16],
    (mi, width, k): (usize, usize, usize),
    (out, os): (*mut f32, usize),
    add: bool,
) -> bool {
    if xb.len() < mi * k || w.len() < width * k || os < width {
        return false;
    }
    let (x, w) = (xb.as_ptr(), w.as_ptr());
    // SAFETY (every call below): rows i..i+MR of x, j..j+NR of w lie inside the slices, whose
    // lengths were checked above, and the MR × NR outputs inside the rectangle (the caller's
    // contract).
    let mut j = 0;
    while j + 4 <= width {
        let mut i = 0;
        while i + 4 <= mi {
            unsafe { dot::<4, 4>(x.add(i * k), w.add(j * k), k, out.add(i * os + j), os, add) };
            i += 4;
        }
        while i < mi {
            unsafe { dot::<1, 4>(x.add(i * k), w.add(j * k), k, out.add(i * os + j), os, add) };
            i += 1;
        }
        j += 4;
    }
    while j < width {
        let mut i = 0;
        while i + 4 <= mi {
            unsafe { dot::<4, 1>(x.add(i * k), w.add(j * k), k, out.add(i * os + j), os, add) };
            i += 4;
        }
        while i < mi {
            unsafe { dot::<1, 1>(x.add(i * k), w.add(j * k), k, out.add(i * os + j), os, add) };
            i += 1;
        }
        j += 1;
    }
    true
}

/// `out[i·os + j] = [out[i·os + j] +] Σ_c x[i·k + c] · w[j·k + c]` for i < MR, j < NR.
///
/// # Safety
/// AVX512-BF16 is present; `x` holds MR rows and `w` NR rows of k bf16 values; `out` reaches
/// (MR - 1)·os + NR values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dot<const MR: usize, const NR: usize>(
    x: *const u16,
    w: *const u16,
    k: usize,
    out: *mut f32,
    os: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    for c in (0..k).step_by(32) {
        // A full mask but for the last, partial step (a predictable branch).
        let mask: __mmask32 = if c + 32 <= k {
            !0
        } else {
            (1u32 << (k - c)) - 1
        };
        // SAFETY: columns c..c+32 under `mask` lie inside each row (the caller's contract);
        // masked-off lanes are not read. __m512i and __m512bh are both 64 plain bytes.
        unsafe {
            let mut wv = [_mm512_setzero_si512(); NR];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_epi16(mask, w.add(j * k + c).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_maskz_loadu_epi16(mask, x.add(i * k + c).cast()));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, std::mem::transmute::<__m512i, __m512bh>(*v));
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        if NR == 4 {
            let sums = sum4(row[0], row[1], row[2], row[3]);
            // SAFETY: out + i·os .. +4 is inside the output (the caller's contract).
            unsafe {
                let at = out.add(i * os);
                let sums = if add {
                    _mm_add_ps(_mm_loadu_ps(at), sums)
                } else {
                    sums
                };
                _mm_storeu_ps(at, sums)
            };
        } else {
            for (j, a) in row.iter().enumerate() {
                // SAFETY: as above.
                unsafe {
                    let at = out.add(i * os + j);
                    let sum = _mm512_reduce_add_ps(*a);
                    *at = if add { *at + sum } else { sum };
                }
            }
        }
    }
}

/// The lane sums of four vectors, `[Σa, Σb, Σc, Σd]`, with 3 shuffles per pair of inputs instead
/// of a full reduction per vector.
#[target_feature(enable = "avx512f")]
fn sum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // Per lane: [a, b, c, d] partial sums.
    let v = _mm512_add_ps(
        _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
        _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
    );
    // Sum the four 128-bit lanes.
    let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b11_10_11_10>(v, v));
    let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b01_01_01_01>(v, v));
    _mm512_castps512_ps128(v)
}

/// `dst (m × k) = [dst +] g (m × n) · W`, `w` the bf16 rows `n × k`.
pub(super) fn gw(
    op: &str,
    dst: &mut [f32],
    g: &[f32],
    w: &[bf16],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
) -> candle_core::Result<()> {
    check_cpu(op)?;
    if g.len() != m * n || w.len() != n * k {
        candle_core::bail!("{op}: bf16 g·W operands are not {m}×{n} and {n}×{k}");
    }
    let w = bits(w);
    let (mt, ct) = tasks::split(threads, dim(m, GW_M_TILE, 24, 6), dim(k, GW_C_TILE, 32, 16));
    let (m_tiles, c_tiles) = (m.div_ceil(mt), k.div_ceil(ct));
    let Some(out) = SharedOut::new(dst, m, k) else {
        candle_core::bail!("{op}: bf16 g·W output is not {m}×{k}");
    };
    // g rounded and W packed once per product, not once per tile: every tile of a column strip
    // reads the same packed W rows, and every tile of a row strip the same rounded g. An odd n
    // pairs its last row with a zero (a zero column of g, a zero row of the panel).
    let pairs_all = n.div_ceil(2);
    tasks::with_product_scratch(|p| {
        let gb = rounded_rows(threads, g, (m, n), 2 * pairs_all, &mut p.act);
        let panels = PackedPanels::new(threads, w, (n, k), ct, &mut p.pairs)?;
        tasks::for_each_tile(threads, m_tiles * c_tiles, |t| {
            let (ti, tc) = (t / c_tiles, t % c_tiles);
            let (i0, c0) = (ti * mt, tc * ct);
            let (i1, c1) = ((i0 + mt).min(m), (c0 + ct).min(k));
            let (mi, width) = (i1 - i0, c1 - c0);
            let (panel, padded) = panels.strip(tc);
            tasks::with_scratch(|s| {
                let part = tasks::prefix(&mut s.part, mi * width);
                for r0 in (0..n).step_by(GW_R_CHUNK) {
                    let r1 = (r0 + GW_R_CHUNK).min(n);
                    let shape = GwShape {
                        mi,
                        width,
                        padded,
                        pairs: (r1 - r0).div_ceil(2),
                        g_stride: 2 * pairs_all,
                    };
                    let rows = &gb[i0 * 2 * pairs_all + r0..];
                    // GW_R_CHUNK is even, so r0 starts a pair.
                    let panel = &panel[r0 / 2 * padded * 2..];
                    // SAFETY: check_cpu found AVX512-BF16 (and F, BW, VL); gw_tile checks that the
                    // slices hold `shape`.
                    if !unsafe { gw_tile(rows, panel, shape, part, r0 > 0) } {
                        candle_core::bail!("{op}: bf16 g·W tile buffers do not match {mi}×{width}");
                    }
                }
                // SAFETY: tile t alone owns rows i0..i1 × columns c0..c1 of the output.
                unsafe { tasks::store(op, &out, i0..i1, c0..c1, part, accumulate) }
            })
        })
    })
}

/// W (`n × k`) packed for `g·W`, one panel per strip of `strip` columns: each holds all row
/// pairs of its columns (see [`pack_pairs`]), padded to a multiple of 16 columns.
struct PackedPanels<'a> {
    values: &'a [u16],
    strip: usize,
    k: usize,
    pairs: usize,
}

impl<'a> PackedPanels<'a> {
    /// Packs W into `buf` (grown as needed; pack_pairs writes every value a tile reads).
    fn new(
        threads: Threads,
        w: &[u16],
        (n, k): (usize, usize),
        strip: usize,
        buf: &'a mut Vec<u16>,
    ) -> candle_core::Result<Self> {
        let pairs = n.div_ceil(2);
        let per_strip = pairs * strip.div_ceil(16) * 16 * 2;
        let values = tasks::prefix(buf, per_strip * k.div_ceil(strip));
        let pack = |(j, out): (usize, &mut [u16])| {
            let cols = j * strip..((j + 1) * strip).min(k);
            let padded = cols.len().div_ceil(16) * 16;
            // SAFETY: the callers ran check_cpu, which found AVX512-BF16 (and F, BW, VL).
            unsafe { pack_pairs(w, k, 0..n, cols, out, padded) }
        };
        let parallel = threads == Threads::Candle && candle_core::utils::get_num_threads() > 1;
        let packed = if parallel && k > strip {
            values.par_chunks_mut(per_strip).enumerate().all(pack)
        } else {
            values.chunks_mut(per_strip).enumerate().all(pack)
        };
        if !packed {
            candle_core::bail!("bf16 g·W: W ({n}×{k}) does not fit its packed panels");
        }
        Ok(Self {
            values: &*values,
            strip,
            k,
            pairs,
        })
    }

    /// Strip `j`'s panel and its padded width.
    fn strip(&self, j: usize) -> (&[u16], usize) {
        let full = self.strip.div_ceil(16) * 16;
        let width = self.strip.min(self.k - j * self.strip);
        let start = j * self.pairs * full * 2;
        (
            &self.values[start..start + self.pairs * full * 2],
            width.div_ceil(16) * 16,
        )
    }
}

/// Writes `out[(q·padded + c)·2 + h] = w[(rows.start + 2q + h)·k + cols.start + c]`, zero past
/// the rows' end and for c ≥ |cols|: each 32-bit word holds the pair `vdpbf16ps` multiplies by
/// a pair of g.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn pack_pairs(
    w: &[u16],
    k: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    out: &mut [u16],
    padded: usize,
) -> bool {
    let pairs = rows.len().div_ceil(2);
    if rows.end * k > w.len() || cols.end > k || out.len() < pairs * padded * 2 {
        return false;
    }
    /// Columns c.. c+16 of row r (zeros past the rows' end and the columns' end).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn load(
        w: &[u16],
        k: usize,
        rows: &Range<usize>,
        cols: &Range<usize>,
        r: usize,
        c: usize,
    ) -> __m256i {
        let valid = cols.len().saturating_sub(c).min(16);
        if r >= rows.end || valid == 0 || r * k + cols.end > w.len() {
            return _mm256_setzero_si256();
        }
        let mask = ((1u32 << valid) - 1) as __mmask16;
        // SAFETY: row r's columns cols.start + c .. + valid are inside w (checked above);
        // masked-off lanes are not read.
        unsafe { _mm256_maskz_loadu_epi16(mask, w.as_ptr().add(r * k + cols.start + c).cast()) }
    }
    for q in 0..pairs {
        let r = rows.start + 2 * q;
        for c in (0..padded).step_by(16) {
            let lo = _mm512_cvtepu16_epi32(load(w, k, &rows, &cols, r, c));
            let hi =
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(load(w, k, &rows, &cols, r + 1, c)));
            // SAFETY: (q·padded + c)·2 + 32 ≤ pairs·padded·2 ≤ out.len() (checked above).
            unsafe {
                _mm512_storeu_si512(
                    out.as_mut_ptr().add((q * padded + c) * 2).cast(),
                    _mm512_or_si512(lo, hi),
                )
            };
        }
    }
    true
}

#[derive(Clone, Copy)]
struct GwShape {
    /// Rows of g and of the part.
    mi: usize,
    /// Columns of the part.
    width: usize,
    /// Columns of the panel (width rounded up to 16).
    padded: usize,
    /// Row pairs in the chunk.
    pairs: usize,
    /// Values from one row of g to the next (at least 2·pairs).
    g_stride: usize,
}

/// `part (mi × width) = [part +] gb (mi × 2·pairs, rows g_stride apart) · panel`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[must_use]
fn gw_tile(gb: &[u16], panel: &[u16], s: GwShape, part: &mut [f32], add: bool) -> bool {
    let GwShape {
        mi,
        width,
        padded,
        pairs,
        g_stride,
    } = s;
    let g_len = mi.saturating_sub(1) * g_stride + pairs * 2;
    if g_stride < pairs * 2
        || gb.len() < g_len
        || panel.len() < pairs * padded * 2
        || part.len() < mi * width
    {
        return false;
    }
    let strips = padded / 16;
    let full_strips = width / 16;
    let last_mask = if width % 16 == 0 {
        0xFFFF
    } else {
        ((1u32 << (width % 16)) - 1) as u16
    };
    let mut i = 0;
    while i < mi {
        let mr = (mi - i).min(6);
        let a = gb[i * g_stride..].as_ptr();
        let mut j = 0;
        while j < strips {
            let nr = if j + 4 <= full_strips { 4 } else { 1 };
            let mask = if j < full_strips { 0xFFFF } else { last_mask };
            let args = MicroArgs {
                a,
                a_stride: g_stride,
                pairs,
                b: panel[j * 32..].as_ptr(),
                b_stride: padded * 2,
                out: part[i * width + j * 16..].as_mut_ptr(),
                out_stride: width,
                last_mask: mask,
                add,
            };
            // SAFETY: rows i..i+mr of gb, strips j..j+nr of the panel and the matching outputs
            // (the last strip only under its mask) lie inside the slices checked above.
            unsafe {
                match (mr, nr) {
                    (6, 4) => micro::<6, 4>(args),
                    (5, 4) => micro::<5, 4>(args),
                    (4, 4) => micro::<4, 4>(args),
                    (3, 4) => micro::<3, 4>(args),
                    (2, 4) => micro::<2, 4>(args),
                    (1, 4) => micro::<1, 4>(args),
                    (6, _) => micro::<6, 1>(args),
                    (5, _) => micro::<5, 1>(args),
                    (4, _) => micro::<4, 1>(args),
                    (3, _) => micro::<3, 1>(args),
                    (2, _) => micro::<2, 1>(args),
                    _ => micro::<1, 1>(args),
                }
            }
            j += nr;
        }
        i += mr;
    }
    true
}

#[derive(Clone, Copy)]
struct MicroArgs {
    a: *const u16,
    a_stride: usize,
    pairs: usize,
    b: *const u16,
    b_stride: usize,
    out: *mut f32,
    out_stride: usize,
    last_mask: u16,
    add: bool,
}

/// `out[i, 16·j + l] = [out +] Σ_q a[i, 2q..2q+2] · b[q, j, l, 0..2]` for i < MR, j < NR, the
/// last strip's lanes under `last_mask`.
///
/// # Safety
/// AVX512-BF16 is present; `a` holds MR rows of 2·pairs bf16 (stride a_stride), `b` pairs rows
/// of NR·32 bf16 (stride b_stride), `out` MR rows (stride out_stride) of NR·16 f32, the last 16
/// only where `last_mask` is set.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn micro<const MR: usize, const NR: usize>(p: MicroArgs) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    for q in 0..p.pairs {
        // SAFETY: pair q of each row and strip is inside the operands (the caller's contract);
        // __m512i and __m512bh are both 64 plain bytes.
        unsafe {
            let mut bv = [_mm512_setzero_si512(); NR];
            for (j, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(p.b.add(q * p.b_stride + j * 32).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let pair = std::ptr::read_unaligned(p.a.add(i * p.a_stride + 2 * q).cast::<i32>());
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                for (c, v) in row.iter_mut().zip(&bv) {
                    *c = _mm512_dpbf16_ps(*c, av, std::mem::transmute::<__m512i, __m512bh>(*v));
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let mask = if j + 1 == NR { p.last_mask } else { 0xFFFF };
            // SAFETY: output row i, strip j under `mask` is inside `out` (the caller's contract).
            unsafe {
                let ptr = p.out.add(i * p.out_stride + j * 16);
                let v = if p.add {
                    _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, ptr))
                } else {
                    v
                };
                _mm512_mask_storeu_ps(ptr, mask, v);
            }
        }
    }
}
