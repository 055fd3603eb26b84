//! Products with a frozen weight matrix kept in its stored type: f32, bf16, f16 or ggml blocks
//! (a GGUF file's quantized types). The frozen ops need two: the forward `y = x·Wᵀ` and the input
//! gradient `dL/dx = g·W`, each on a range of W's rows (the fused head works on blocks of the
//! vocabulary). Activations, gradients and outputs are f32; the weight is never widened whole,
//! only tile by tile into a cache-sized f32 panel (or, for bf16 on CPUs with AVX512-BF16, read
//! natively by the dot-product instructions).

use std::borrow::Cow;
use std::ops::Range;

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

use super::gemm::{self, Strided, Threads};

/// The values of a weight matrix `[rows, cols]`, row-major, in their stored type.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightValues<'a> {
    /// Plain f32: the products go straight to the f32 gemm.
    F32(&'a [f32]),
    /// bfloat16.
    Bf16(&'a [bf16]),
    /// IEEE half.
    F16(&'a [f16]),
    /// ggml blocks of `dtype`; each row starts on a block boundary.
    Quantized { dtype: GgmlDType, bytes: &'a [u8] },
}

/// A frozen weight matrix `W: [rows, cols]` (a linear layer's `[out, in]`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct WeightMatrix<'a> {
    values: WeightValues<'a>,
    rows: usize,
    cols: usize,
}

/// Rows of `W` widened per panel in the portable path: with `cols` up to a few thousand, a
/// panel stays within the L2 cache.
const PANEL_ROWS: usize = 64;

impl<'a> WeightMatrix<'a> {
    /// Checks that `values` hold exactly `rows × cols` values (for ggml blocks: that each row is
    /// a whole number of blocks). `op` and `name` name the caller and the tensor in errors.
    pub(crate) fn new(
        op: &str,
        name: &str,
        values: WeightValues<'a>,
        rows: usize,
        cols: usize,
    ) -> candle_core::Result<Self> {
        let expected = rows * cols;
        let (got, what) = match values {
            WeightValues::F32(v) => (v.len(), "f32 values"),
            WeightValues::Bf16(v) => (v.len(), "bf16 values"),
            WeightValues::F16(v) => (v.len(), "f16 values"),
            WeightValues::Quantized { dtype, bytes } => {
                let block = dtype.block_size();
                if cols % block != 0 {
                    candle_core::bail!(
                        "{op}: {name} has rows of {cols} values, not a whole number of \
                         {dtype:?} blocks of {block}"
                    );
                }
                let row_bytes = cols / block * dtype.type_size();
                if bytes.len() != rows * row_bytes {
                    candle_core::bail!(
                        "{op}: {name} holds {} bytes of {dtype:?}, expected {} for {rows}×{cols}",
                        bytes.len(),
                        rows * row_bytes
                    );
                }
                return Ok(Self { values, rows, cols });
            }
        };
        if got != expected {
            candle_core::bail!("{op}: {name} holds {got} {what}, expected {rows}×{cols}");
        }
        Ok(Self { values, rows, cols })
    }

    /// `W`'s rows (a linear layer's output features).
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// `W`'s columns (a linear layer's input features).
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The values when they are plain f32.
    pub(crate) fn as_f32(&self) -> Option<&'a [f32]> {
        match self.values {
            WeightValues::F32(v) => Some(v),
            _ => None,
        }
    }

    fn check_rows(&self, op: &str, rows: &Range<usize>) -> candle_core::Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            candle_core::bail!("{op}: rows {rows:?} of a {}-row weight", self.rows);
        }
        Ok(())
    }

    /// `dst (m × |rows|) = [dst +] x (m × cols) · W[rows]ᵀ`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn xwt(
        &self,
        op: &str,
        dst: &mut [f32],
        x: &[f32],
        m: usize,
        rows: Range<usize>,
        accumulate: bool,
        threads: Threads,
    ) -> candle_core::Result<()> {
        self.check_rows(op, &rows)?;
        let (k, n) = (self.cols, rows.len());
        if dst.len() != m * n || x.len() != m * k {
            candle_core::bail!("{op}: x·Wᵀ operands are not {m}×{k} and {m}×{n}");
        }
        if let Some(w) = self.as_f32() {
            let w = &w[rows.start * k..rows.end * k];
            return gemm::gemm_f32(
                op,
                dst,
                Strided::rows(x, k),
                Strided::transposed(w, k),
                (m, n, k),
                accumulate,
                threads,
            );
        }
        let mut panel = vec![0f32; PANEL_ROWS.min(n.max(1)) * k];
        let mut part = vec![0f32; m * PANEL_ROWS.min(n.max(1))];
        let mut start = rows.start;
        while start < rows.end {
            let end = (start + PANEL_ROWS).min(rows.end);
            let width = end - start;
            let panel = &mut panel[..width * k];
            self.widen_rows(op, start..end, panel)?;
            let part = &mut part[..m * width];
            gemm::gemm_f32(
                op,
                part,
                Strided::rows(x, k),
                Strided::transposed(panel, k),
                (m, width, k),
                false,
                threads,
            )?;
            let offset = start - rows.start;
            for (dst_row, part_row) in dst.chunks_exact_mut(n).zip(part.chunks_exact(width)) {
                let dst_row = &mut dst_row[offset..offset + width];
                if accumulate {
                    dst_row.iter_mut().zip(part_row).for_each(|(d, &p)| *d += p);
                } else {
                    dst_row.copy_from_slice(part_row);
                }
            }
            start = end;
        }
        Ok(())
    }

    /// `dst (m × cols) = [dst +] g (m × |rows|) · W[rows]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gw(
        &self,
        op: &str,
        dst: &mut [f32],
        g: &[f32],
        m: usize,
        rows: Range<usize>,
        accumulate: bool,
        threads: Threads,
    ) -> candle_core::Result<()> {
        self.check_rows(op, &rows)?;
        let (k, n) = (self.cols, rows.len());
        if dst.len() != m * k || g.len() != m * n {
            candle_core::bail!("{op}: g·W operands are not {m}×{n} and {m}×{k}");
        }
        if let Some(w) = self.as_f32() {
            let w = &w[rows.start * k..rows.end * k];
            return gemm::gemm_f32(
                op,
                dst,
                Strided::rows(g, n),
                Strided::rows(w, k),
                (m, k, n),
                accumulate,
                threads,
            );
        }
        if !accumulate {
            dst.fill(0.0);
        }
        let mut panel = vec![0f32; PANEL_ROWS.min(n.max(1)) * k];
        let mut start = rows.start;
        while start < rows.end {
            let end = (start + PANEL_ROWS).min(rows.end);
            let width = end - start;
            let panel = &mut panel[..width * k];
            self.widen_rows(op, start..end, panel)?;
            let offset = start - rows.start;
            // g's columns offset..offset+width, as a strided view of g's rows.
            let g_cols = Strided {
                values: &g[offset..],
                col_stride: 1,
                row_stride: n,
            };
            gemm::gemm_f32(
                op,
                dst,
                g_cols,
                Strided::rows(panel, k),
                (m, k, width),
                true,
                threads,
            )?;
            start = end;
        }
        Ok(())
    }

    /// Writes rows `rows` of `W` as f32 into `out` (`|rows| × cols`).
    pub(crate) fn widen_rows(
        &self,
        op: &str,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        self.check_rows(op, &rows)?;
        let k = self.cols;
        if out.len() != rows.len() * k {
            candle_core::bail!(
                "{op}: panel of {} values for {} rows",
                out.len(),
                rows.len()
            );
        }
        let range = rows.start * k..rows.end * k;
        match self.values {
            WeightValues::F32(v) => out.copy_from_slice(&v[range]),
            WeightValues::Bf16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, &w)| *o = w.to_f32()),
            WeightValues::F16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, &w)| *o = w.to_f32()),
            WeightValues::Quantized { dtype, bytes } => {
                let row_bytes = k / dtype.block_size() * dtype.type_size();
                let bytes = &bytes[rows.start * row_bytes..rows.end * row_bytes];
                let blocks = dtype.from_data(Cow::Borrowed(bytes));
                match blocks.dequantize(out.len())? {
                    candle_core::CpuStorage::F32(values) => out.copy_from_slice(&values),
                    _ => candle_core::bail!("{op}: {dtype:?} did not dequantise to f32"),
                }
            }
        }
        Ok(())
    }
}
