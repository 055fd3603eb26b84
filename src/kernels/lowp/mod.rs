//! Products with a frozen weight matrix kept in its stored type: f32, bf16, f16 or ggml blocks
//! (a GGUF file's quantized types). The frozen ops need two: the forward `y = x·Wᵀ` and the input
//! gradient `dL/dx = g·W`, each on a range of W's rows (the fused head works on blocks of the
//! vocabulary). Activations, gradients and outputs are f32; the weight is never widened whole.
//!
//! The paths, chosen at run time ([`Path::best`]) or forced (`xwt_with`, `gw_with`, for tests):
//! - f32 weights go straight to the f32 gemm (`kernels::gemm`) on every path.
//! - bf16 on [`Path::Avx512Bf16`]: `vdpbf16ps` kernels read the weight natively and round the
//!   activations to bf16 per tile (`bf16.rs`); twice the multiply-adds per instruction of f32.
//! - bf16 and f16 elsewhere, and every ggml type: each tile widens (or dequantises) its part of
//!   W into a cache-sized f32 panel from a per-thread scratch and runs the f32 gemm on it
//!   (`widened.rs`, `convert.rs`, `quant.rs`). The activations stay f32 there, so on bf16
//!   weights this path is more accurate than the native one: the two agree up to the bf16
//!   rounding of the activations (≤ 2⁻⁹ relative per term), not bit for bit.
//!
//! Why our own kernels: the `gemm` crate has no bf16 dot-product kernel (it widens bf16 inside
//! its f32 micro-kernel) and candle's bf16 CPU matmul widens the same way. Candle's quantized
//! matmul could serve `x·Wᵀ` on ggml weights, but it rounds x to 8-bit blocks (Q8_0/Q8_K):
//! measured (`timing.rs`) on MiniLM and SmolLM2 shapes with Q8_0, Q4_1 and Q4_K, it was slower
//! than dequantising on most of the 16 (Q4_1 by 8–20×; faster, by up to 1.4×, only for Q8_0 or
//! Q4_K at k = 1536) and its outputs always differed by 5e-3 to 1.5e-2 of max |y|, past the 1e-3
//! that issue #17 allows. So ggml weights are dequantised.

#[cfg(target_arch = "x86_64")]
mod bf16;
mod convert;
mod quant;
mod tasks;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod timing;
mod widened;

use std::ops::Range;

use candle_core::quantized::GgmlDType;

use super::gemm::{self, Strided, Threads};

/// The values of a weight matrix `[rows, cols]`, row-major, in their stored type.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightValues<'a> {
    /// Plain f32: the products go straight to the f32 gemm.
    F32(&'a [f32]),
    /// bfloat16.
    Bf16(&'a [half::bf16]),
    /// IEEE half.
    F16(&'a [half::f16]),
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
                if !cols.is_multiple_of(block) {
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

    fn check_rows(&self, op: &str, rows: &Range<usize>) -> candle_core::Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            candle_core::bail!("{op}: rows {rows:?} of a {}-row weight", self.rows);
        }
        Ok(())
    }

    /// Columns of a column tile must be a multiple of this: a ggml block, or 1.
    fn col_quantum(&self) -> usize {
        match self.values {
            WeightValues::Quantized { dtype, .. } => dtype.block_size(),
            _ => 1,
        }
    }

    /// `dst (m × |rows|) = [dst +] x (m × cols) · W[rows]ᵀ`, on the fastest path this CPU has.
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
        self.xwt_with(Path::best(), op, dst, x, m, rows, accumulate, threads)
    }

    /// `xwt` on `path`; an error if this CPU cannot run it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn xwt_with(
        &self,
        path: Path,
        op: &str,
        dst: &mut [f32],
        x: &[f32],
        m: usize,
        rows: Range<usize>,
        accumulate: bool,
        threads: Threads,
    ) -> candle_core::Result<()> {
        path.check(op)?;
        self.check_rows(op, &rows)?;
        let (k, n) = (self.cols, rows.len());
        if dst.len() != m * n || x.len() != m * k {
            candle_core::bail!("{op}: x·Wᵀ operands are not {m}×{k} and {m}×{n}");
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if !accumulate {
                dst.fill(0.0);
            }
            return Ok(());
        }
        match self.values {
            WeightValues::F32(w) => gemm::gemm_f32(
                op,
                dst,
                Strided::rows(x, k),
                Strided::transposed(&w[rows.start * k..rows.end * k], k),
                (m, n, k),
                accumulate,
                threads,
            ),
            #[cfg(target_arch = "x86_64")]
            WeightValues::Bf16(w) if path == Path::Avx512Bf16 => {
                let w = &w[rows.start * k..rows.end * k];
                bf16::xwt(op, dst, x, w, (m, n, k), accumulate, threads)
            }
            _ => widened::xwt(self, path, op, dst, x, m, rows, accumulate, threads),
        }
    }

    /// `dst (m × cols) = [dst +] g (m × |rows|) · W[rows]`, on the fastest path this CPU has.
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
        self.gw_with(Path::best(), op, dst, g, m, rows, accumulate, threads)
    }

    /// `gw` on `path`; an error if this CPU cannot run it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gw_with(
        &self,
        path: Path,
        op: &str,
        dst: &mut [f32],
        g: &[f32],
        m: usize,
        rows: Range<usize>,
        accumulate: bool,
        threads: Threads,
    ) -> candle_core::Result<()> {
        path.check(op)?;
        self.check_rows(op, &rows)?;
        let (k, n) = (self.cols, rows.len());
        if dst.len() != m * k || g.len() != m * n {
            candle_core::bail!("{op}: g·W operands are not {m}×{n} and {m}×{k}");
        }
        if m == 0 || k == 0 {
            return Ok(());
        }
        if n == 0 {
            if !accumulate {
                dst.fill(0.0);
            }
            return Ok(());
        }
        match self.values {
            WeightValues::F32(w) => gemm::gemm_f32(
                op,
                dst,
                Strided::rows(g, n),
                Strided::rows(&w[rows.start * k..rows.end * k], k),
                (m, k, n),
                accumulate,
                threads,
            ),
            #[cfg(target_arch = "x86_64")]
            WeightValues::Bf16(w) if path == Path::Avx512Bf16 => {
                let w = &w[rows.start * k..rows.end * k];
                bf16::gw(op, dst, g, w, (m, n, k), accumulate, threads)
            }
            _ => widened::gw(self, path, op, dst, g, m, rows, accumulate, threads),
        }
    }

    /// Writes rows `rows` of `W` as f32 into `out` (`|rows| × cols`): the tests' reference.
    #[cfg(test)]
    pub(crate) fn widen_rows(
        &self,
        op: &str,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        tasks::with_scratch(|s| {
            self.widen_rect(op, Path::best(), rows, 0..self.cols, out, &mut s.bytes)
        })
    }

    /// Writes `W[rows, cols]` as f32 into `out` (`|rows| × |cols|`, row-major) with `path`'s
    /// conversions; for ggml blocks, `cols` must start and end on block boundaries.
    fn widen_rect(
        &self,
        op: &str,
        path: Path,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [f32],
        bytes: &mut Vec<u64>,
    ) -> candle_core::Result<()> {
        self.check_rows(op, &rows)?;
        let (k, width) = (self.cols, cols.len());
        if cols.start > cols.end || cols.end > k || out.len() != rows.len() * width {
            candle_core::bail!(
                "{op}: a panel of {} values for rows {rows:?} × columns {cols:?} of a {}×{k} weight",
                out.len(),
                self.rows
            );
        }
        if width == 0 {
            return Ok(());
        }
        let row_values = |r: usize| r * k + cols.start..r * k + cols.end;
        match self.values {
            WeightValues::F32(v) => {
                for (r, o) in rows.zip(out.chunks_exact_mut(width)) {
                    o.copy_from_slice(&v[row_values(r)]);
                }
            }
            WeightValues::Bf16(v) => {
                for (r, o) in rows.zip(out.chunks_exact_mut(width)) {
                    convert::widen_bf16(path, &v[row_values(r)], o);
                }
            }
            WeightValues::F16(v) => {
                for (r, o) in rows.zip(out.chunks_exact_mut(width)) {
                    convert::widen_f16(path, &v[row_values(r)], o);
                }
            }
            WeightValues::Quantized { dtype, bytes: b } => {
                quant::dequantise(op, dtype, b, k, rows, cols, out, bytes)?;
            }
        }
        Ok(())
    }
}

/// The instruction set a product runs on. Only the bf16 and f16 conversions and the native bf16
/// kernels depend on it: f32 products go to the `gemm` crate, which picks its own kernel, and
/// ggml blocks are dequantised by candle's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// bf16 weights are read by `vdpbf16ps` (activations rounded to bf16); others as `Avx512`.
    Avx512Bf16,
    /// AVX-512F conversions to f32 panels.
    Avx512,
    /// AVX2 + F16C conversions to f32 panels.
    Avx2,
    /// Portable Rust.
    Scalar,
}

impl Path {
    /// Every path, fastest first.
    pub(crate) const ALL: [Path; 4] = [Path::Avx512Bf16, Path::Avx512, Path::Avx2, Path::Scalar];

    /// Whether this CPU has the instructions the path uses.
    pub(crate) fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Path::Avx512Bf16 => {
                    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512bf16")
                }
                Path::Avx512 => has!("avx512f"),
                Path::Avx2 => has!("avx2") && has!("f16c"),
                Path::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Path::Scalar
        }
    }

    /// The fastest path this CPU has.
    pub(crate) fn best() -> Path {
        Path::ALL
            .into_iter()
            .find(|p| p.is_supported())
            .unwrap_or(Path::Scalar)
    }

    /// The path's name in notes: the instructions it uses.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Path::Avx512Bf16 => "AVX512-BF16",
            Path::Avx512 => "AVX-512",
            Path::Avx2 => "AVX2",
            Path::Scalar => "portable code",
        }
    }

    fn check(self, op: &str) -> candle_core::Result<()> {
        if !self.is_supported() {
            candle_core::bail!("{op}: this CPU cannot run the {self:?} path");
        }
        Ok(())
    }
}
