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

/// `len` zeros, written on rayon's tasks. `vec![0.0; len]` zeroes on the calling thread (freed
/// memory is reused, so that is a real pass over it) while the pool's threads wait; the fused
/// ops allocate their activation-sized outputs and gradients from the calling thread.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    collect_blocks(len, |_, dst| dst.fill(0.0))
}

/// `rows` rows of `width` values, row `r` being `scale · src(r)` (zero-padded where `src(r)` is
/// shorter than `width`), written once on rayon's tasks of at least `min_rows` rows: a gather
/// (a transpose of heads, a broadcast bias) without first zeroing the output.
pub(crate) fn gather_rows<'a>(
    rows: usize,
    width: usize,
    min_rows: usize,
    scale: f32,
    src: impl Fn(usize) -> &'a [f32] + Sync,
) -> Vec<f32> {
    let len = rows * width;
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_exact_mut(width)
        .enumerate()
        .with_min_len(min_rows.max(1))
        .for_each(|(r, dst)| {
            let row = src(r);
            let (head, tail) = dst.split_at_mut(row.len().min(width));
            for (d, &v) in head.iter_mut().zip(row) {
                d.write(v * scale);
            }
            for d in tail {
                d.write(0.0);
            }
        });
    // SAFETY: the chunks above cover `out[..len]` (`len` is a multiple of `width`, which is
    // non-zero here) and each chunk's two parts, `head` and `tail`, are written in full.
    unsafe { out.set_len(len) };
    out
}

/// Writes all of `dst` (at most [`BLOCK`] long: a chunk of `chunks_mut(BLOCK)`) from `buf`.
fn copy_out(dst: &mut [std::mem::MaybeUninit<f32>], buf: &[f32; BLOCK]) {
    for (d, &v) in dst.iter_mut().zip(buf) {
        d.write(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_rows_scales_and_pads_each_row() {
        let src = [1f32, 2., 3., 4., 5.];
        // Row r reads r + 1 values; width 3 pads the short rows and cuts the long one.
        let out = gather_rows(4, 3, 1, 2.0, |r| &src[..r + 1]);
        let expected = [2., 0., 0., 2., 4., 0., 2., 4., 6., 2., 4., 6.];
        assert_eq!(out, expected);
        assert!(gather_rows(0, 3, 1, 1.0, |_| &src[..]).is_empty());
        assert!(gather_rows(3, 0, 1, 1.0, |_| &src[..]).is_empty());
        let z = zeros(3 * BLOCK + 5);
        assert!(z.len() == 3 * BLOCK + 5 && z.iter().all(|&v| v == 0.0));
    }
}
