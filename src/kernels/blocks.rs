//! Outputs computed in blocks on rayon tasks, each value written once.

use rayon::prelude::*;

/// Rows per rayon task in the row-wise kernels: small tensors stay on one thread.
pub(crate) const ROWS_PER_TASK: usize = 64;
/// Values per rayon task in the element-wise kernels.
pub(crate) const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// Values per block of the blocked kernels: a block's intermediate values (an `exp` pass's
/// output, a row block before it is copied out) stay in a stack buffer, in L1.
pub(crate) const BLOCK: usize = 256;

/// `rows × row_len` values computed on rayon tasks of at least `min_rows` rows:
/// `head(i)` computes row `i`'s state once, then `fill(&state, i, start, block)` sets `block`
/// to the row's values `start..start + block.len()`, for blocks of at most [`BLOCK`].
///
/// Each value is written to the output once: `vec![0.0; n]` followed by the kernel would first
/// zero the whole buffer, an extra pass over memory as large as the output (freed memory is
/// reused, so the zeroing is not free).
pub(crate) fn collect_rows<S>(
    rows: usize,
    row_len: usize,
    min_rows: usize,
    head: impl Fn(usize) -> S + Sync,
    fill: impl Fn(&S, usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let len = rows * row_len;
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_exact_mut(row_len)
        .enumerate()
        .with_min_len(min_rows)
        .for_each(|(i, dst)| {
            let state = head(i);
            let mut buf = [0f32; BLOCK];
            for (b, dst) in dst.chunks_mut(BLOCK).enumerate() {
                fill(&state, i, b * BLOCK, &mut buf[..dst.len()]);
                copy_out(dst, &buf);
            }
        });
    // SAFETY: the chunks above cover `out[..len]` and `copy_out` wrote every element of each.
    unsafe { out.set_len(len) };
    out
}

/// `len` values computed in blocks of [`BLOCK`] on rayon tasks of at least
/// [`ELEMENTS_PER_TASK`] values: `fill(start, block)` sets `block` to values
/// `start..start + block.len()`. Written once, as in [`collect_rows`].
pub(crate) fn collect_blocks(len: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(BLOCK)
        .enumerate()
        .with_min_len(ELEMENTS_PER_TASK / BLOCK)
        .for_each(|(b, dst)| {
            let mut buf = [0f32; BLOCK];
            fill(b * BLOCK, &mut buf[..dst.len()]);
            copy_out(dst, &buf);
        });
    // SAFETY: the chunks above cover `out[..len]` and `copy_out` wrote every element of each.
    unsafe { out.set_len(len) };
    out
}

/// Two outputs of `len` values each, stacked as `[2·len]`, computed together in blocks:
/// `fill(start, first, second)` sets both blocks. Written once, as in [`collect_rows`].
pub(crate) fn collect_block_pairs(
    len: usize,
    fill: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * len);
    let (first, second) = out.spare_capacity_mut()[..2 * len].split_at_mut(len);
    first
        .par_chunks_mut(BLOCK)
        .zip(second.par_chunks_mut(BLOCK))
        .enumerate()
        .with_min_len(ELEMENTS_PER_TASK / BLOCK)
        .for_each(|(b, (d1, d2))| {
            let (mut buf1, mut buf2) = ([0f32; BLOCK], [0f32; BLOCK]);
            fill(b * BLOCK, &mut buf1[..d1.len()], &mut buf2[..d2.len()]);
            copy_out(d1, &buf1);
            copy_out(d2, &buf2);
        });
    // SAFETY: the chunks of both halves cover `out[..2 * len]` and `copy_out` wrote every
    // element of each (the zipped chunks have equal lengths, as the halves do).
    unsafe { out.set_len(2 * len) };
    out
}

/// Writes all of `dst` (at most [`BLOCK`] long: a chunk of `chunks_mut(BLOCK)`) from `buf`.
fn copy_out(dst: &mut [std::mem::MaybeUninit<f32>], buf: &[f32; BLOCK]) {
    for (d, &v) in dst.iter_mut().zip(buf) {
        d.write(v);
    }
}
