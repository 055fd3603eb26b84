//! A checked f32 matrix product on CPU slices, for the fused ops' kernels (the LoRA linear, the
//! linear head's cross-entropy, the attention core): `dst = [dst +] lhs · rhs` through the `gemm` crate, with operands
//! given by strides so transposes cost no copy.

/// A matrix operand: its values and its (column, row) strides.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub(crate) values: &'a [f32],
    pub(crate) col_stride: usize,
    pub(crate) row_stride: usize,
}

impl<'a> Strided<'a> {
    /// The row-major matrix `values` with `cols` columns.
    pub(crate) fn rows(values: &'a [f32], cols: usize) -> Self {
        Self {
            values,
            col_stride: 1,
            row_stride: cols,
        }
    }

    /// The transpose of the row-major `[.., cols]` matrix `values`.
    pub(crate) fn transposed(values: &'a [f32], cols: usize) -> Self {
        Self {
            values,
            col_stride: cols,
            row_stride: 1,
        }
    }

    fn reaches(&self, rows: usize, cols: usize) -> bool {
        (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.values.len()
    }
}

/// Which threads a product runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// candle's thread count (rayon's pool).
    Candle,
    /// The calling thread: for callers that already run one rayon task per block.
    Single,
}

/// `dst (m × n, row-major) = [dst +] lhs (m × k) · rhs (k × n)`; `accumulate` adds to `dst`
/// instead of overwriting it. `op` names the caller in errors.
pub(crate) fn gemm_f32(
    op: &str,
    dst: &mut [f32],
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
) -> candle_core::Result<()> {
    if dst.len() != m * n {
        candle_core::bail!("{op}: gemm output is not {m}×{n}");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // gemm writes nothing for an empty product.
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    if !lhs.reaches(m, k) || !rhs.reaches(k, n) {
        candle_core::bail!("{op}: gemm operands do not hold {m}×{k}·{k}×{n}");
    }
    let parallelism = match (threads, candle_core::utils::get_num_threads()) {
        (Threads::Candle, n) if n > 1 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: `reaches` keeps every index the strides produce inside the slices; `dst` is
    // exclusively borrowed, holds m·n values and does not overlap the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.values.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
