//! What the tiled products share: running tiles on rayon or on the calling thread, per-thread
//! scratch buffers that outlive one call, and an output that tiles write disjoint rectangles of.
//!
//! Tiles write straight into the caller's output instead of returning parts to be summed: each
//! tile owns a rectangle of `dst`, and a reduction across tiles would cost an extra pass and an
//! allocation per call.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::gemm::Threads;

/// Buffers a tile needs, kept per thread so that no tile allocates once they have grown.
#[derive(Default)]
pub(super) struct Scratch {
    /// A widened weight panel.
    pub(super) panel: Vec<f32>,
    /// A tile's product before it goes into `dst`.
    pub(super) part: Vec<f32>,
    /// Misaligned ggml bytes, copied to an aligned place.
    pub(super) bytes: Vec<u64>,
}

/// Buffers a whole product prepares once for all its tiles (the native bf16 path's rounded
/// activations and packed weight panels), kept per calling thread. Separate from [`Scratch`]
/// because a product's tiles may run on the calling thread while these are lent out.
#[derive(Default)]
pub(super) struct ProductScratch {
    /// Activations rounded to bf16.
    pub(super) act: Vec<u16>,
    /// Weight rows interleaved in pairs.
    pub(super) pairs: Vec<u16>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static PRODUCT: RefCell<ProductScratch> = RefCell::new(ProductScratch::default());
}

/// Runs `f` with this thread's product buffers (fresh ones if they are already in use).
pub(super) fn with_product_scratch<R>(f: impl FnOnce(&mut ProductScratch) -> R) -> R {
    PRODUCT.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut ProductScratch::default()),
    })
}

/// Runs `f` with this thread's scratch (a fresh one if it is already in use further up the stack).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// The first `len` values of `buf`, grown (never shrunk) to hold them.
pub(super) fn prefix<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    &mut buf[..len]
}

/// Runs `tile(0..count)` on candle's threads or on this one; the first error wins.
pub(super) fn for_each_tile(
    threads: Threads,
    count: usize,
    tile: impl Fn(usize) -> candle_core::Result<()> + Sync + Send,
) -> candle_core::Result<()> {
    if threads == Threads::Candle && count > 1 && candle_core::utils::get_num_threads() > 1 {
        (0..count).into_par_iter().try_for_each(tile)
    } else {
        (0..count).try_for_each(tile)
    }
}

/// Splits `len` into tiles of about `target` (the last one shorter), returning the tile size.
pub(super) fn tile_len(len: usize, target: usize, quantum: usize) -> usize {
    let target = target.max(quantum).div_ceil(quantum) * quantum;
    target.min(len.div_ceil(quantum) * quantum).max(quantum)
}

/// One dimension of a tiled output: its length, the tile size that suits the kernel, the
/// smallest tile worth a task, and the multiple tiles must be.
#[derive(Clone, Copy)]
pub(super) struct Dim {
    pub(super) len: usize,
    pub(super) target: usize,
    pub(super) min: usize,
    pub(super) quantum: usize,
}

/// Tile sizes for an `a × b` output: the kernel's preferred sizes, halved (the larger first)
/// until there are 4 tiles per thread or the tiles reach their minimum. Small products on many
/// threads would otherwise run as a few tiles on a few threads while the rest wait.
pub(super) fn split(threads: Threads, a: Dim, b: Dim) -> (usize, usize) {
    let want = match threads {
        Threads::Candle => 4 * candle_core::utils::get_num_threads(),
        Threads::Single => 1,
    };
    let mut ta = tile_len(a.len, a.target, a.quantum);
    let mut tb = tile_len(b.len, b.target, b.quantum);
    let shrink = |d: Dim, t: usize| {
        let smaller = tile_len(d.len, t / 2, d.quantum);
        (smaller < t && smaller >= d.min).then_some(smaller)
    };
    while a.len.div_ceil(ta) * b.len.div_ceil(tb) < want {
        let (sa, sb) = (shrink(a, ta), shrink(b, tb));
        match (sa, sb) {
            (Some(na), Some(_)) if ta >= tb => ta = na,
            (_, Some(nb)) => tb = nb,
            (Some(na), None) => ta = na,
            (None, None) => break,
        }
    }
    (ta, tb)
}

/// A row-major `rows × cols` output that tiles on several threads write, each its own rectangle.
pub(super) struct SharedOut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    _dst: PhantomData<&'a mut [f32]>,
}

// SAFETY: the pointer comes from a `&mut [f32]` held for 'a; threads only reach it through
// `row`, whose contract keeps their rectangles disjoint.
unsafe impl Send for SharedOut<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    /// `dst` must hold `rows × cols` values (checked by the callers' shape checks).
    pub(super) fn new(dst: &'a mut [f32], rows: usize, cols: usize) -> Option<Self> {
        (dst.len() == rows * cols).then_some(Self {
            ptr: dst.as_mut_ptr(),
            rows,
            cols,
            _dst: PhantomData,
        })
    }

    /// Row `row`, columns `cols`, or None when outside the output.
    ///
    /// # Safety
    /// No two live slices from this output may overlap: each tile asks only for its own rectangle.
    // A `&self` that hands out `&mut` is the point: tiles share the output, and the disjointness
    // that makes it sound is this function's safety contract.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn row(&self, row: usize, cols: Range<usize>) -> Option<&mut [f32]> {
        if row >= self.rows || cols.start > cols.end || cols.end > self.cols {
            return None;
        }
        // SAFETY: in bounds (checked above) of the exclusively borrowed `dst`; disjointness is
        // the caller's contract.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(row * self.cols + cols.start), cols.len())
        })
    }
}

impl SharedOut<'_> {
    /// A pointer to `out[rows.start, cols.start]` for a tile that writes the rectangle
    /// `rows × cols` through it (rows `cols` of the output apart), or None when the rectangle is
    /// not inside the output.
    ///
    /// # Safety
    /// The rectangle belongs to the calling tile alone, and it writes nothing outside it.
    pub(super) unsafe fn rect(&self, rows: Range<usize>, cols: Range<usize>) -> Option<*mut f32> {
        if rows.start > rows.end
            || rows.end > self.rows
            || cols.start > cols.end
            || cols.end > self.cols
        {
            return None;
        }
        // SAFETY: in bounds (checked above) of the exclusively borrowed `dst`.
        Some(unsafe { self.ptr.add(rows.start * self.cols + cols.start) })
    }
}

/// Writes (or with `add`, adds) `part` (`rows.len() × cols.len()`) into `out[rows, cols]`.
///
/// # Safety
/// The rectangle belongs to the calling tile alone.
pub(super) unsafe fn store(
    op: &str,
    out: &SharedOut<'_>,
    rows: Range<usize>,
    cols: Range<usize>,
    part: &[f32],
    add: bool,
) -> candle_core::Result<()> {
    let width = cols.len();
    for (i, src) in rows.zip(part.chunks_exact(width.max(1))) {
        // SAFETY: this tile's own rectangle (the caller's contract).
        let Some(dst) = (unsafe { out.row(i, cols.clone()) }) else {
            candle_core::bail!("{op}: a tile outside its {}×{} output", out.rows, out.cols);
        };
        if add {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
        } else {
            dst.copy_from_slice(&src[..width]);
        }
    }
    Ok(())
}
