//! Dequantising a rectangle of a matrix stored as ggml blocks into an f32 panel.
//!
//! Each row of `W` is `cols / block_size` blocks; a rectangle whose columns start and end on
//! block boundaries is, per row, one contiguous run of blocks. We view that run of bytes as a
//! slice of candle's block structs and let `GgmlType::to_float` (candle's reference dequantiser,
//! the same code its `QTensor::dequantize` runs) write the row of the panel. Going through
//! `GgmlDType::from_data` instead would copy the bytes into a fresh `Vec` for every panel.

use std::mem::{align_of, size_of};
use std::ops::Range;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, GgmlType,
};
use half::{bf16, f16};

/// Writes `W[rows, cols]` as f32 into `out` (`|rows| × |cols|`, row-major). `bytes` holds all of
/// `W` (`k` values a row) as `dtype` blocks; `cols` starts and ends on block boundaries.
/// `scratch` receives the bytes of a row when they are not aligned for the block type.
#[allow(clippy::too_many_arguments)]
pub(super) fn dequantise(
    op: &str,
    dtype: GgmlDType,
    bytes: &[u8],
    k: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<u64>,
) -> candle_core::Result<()> {
    let args = Rect {
        op,
        dtype,
        bytes,
        k,
        rows,
        cols,
    };
    match dtype {
        GgmlDType::F32 => args.run::<f32>(out, scratch),
        GgmlDType::F16 => args.run::<f16>(out, scratch),
        GgmlDType::BF16 => args.run::<bf16>(out, scratch),
        GgmlDType::Q4_0 => args.run::<BlockQ4_0>(out, scratch),
        GgmlDType::Q4_1 => args.run::<BlockQ4_1>(out, scratch),
        GgmlDType::Q5_0 => args.run::<BlockQ5_0>(out, scratch),
        GgmlDType::Q5_1 => args.run::<BlockQ5_1>(out, scratch),
        GgmlDType::Q8_0 => args.run::<BlockQ8_0>(out, scratch),
        GgmlDType::Q8_1 => args.run::<BlockQ8_1>(out, scratch),
        GgmlDType::Q2K => args.run::<BlockQ2K>(out, scratch),
        GgmlDType::Q3K => args.run::<BlockQ3K>(out, scratch),
        GgmlDType::Q4K => args.run::<BlockQ4K>(out, scratch),
        GgmlDType::Q5K => args.run::<BlockQ5K>(out, scratch),
        GgmlDType::Q6K => args.run::<BlockQ6K>(out, scratch),
        GgmlDType::Q8K => args.run::<BlockQ8K>(out, scratch),
    }
}

struct Rect<'a> {
    op: &'a str,
    dtype: GgmlDType,
    bytes: &'a [u8],
    k: usize,
    rows: Range<usize>,
    cols: Range<usize>,
}

impl Rect<'_> {
    /// Only instantiated (in `dequantise`) with candle's block types and f32/f16/bf16: `#[repr(C)]`
    /// structs of integers, integer arrays and floats, for which every bit pattern is a value.
    fn run<B: GgmlType>(&self, out: &mut [f32], scratch: &mut Vec<u64>) -> candle_core::Result<()> {
        let (op, dtype) = (self.op, self.dtype);
        let block = B::BLCK_SIZE;
        let size = size_of::<B>();
        if size != dtype.type_size() || block != dtype.block_size() || align_of::<B>() > 8 {
            candle_core::bail!("{op}: {dtype:?} blocks do not have the size candle reports");
        }
        let (k, rows, cols) = (self.k, self.rows.clone(), self.cols.clone());
        if k % block != 0 || cols.start % block != 0 || cols.end % block != 0 || cols.end > k {
            candle_core::bail!("{op}: columns {cols:?} of {k} do not fall on {dtype:?} blocks");
        }
        let row_bytes = k / block * size;
        let width = cols.len();
        if out.len() != rows.len() * width || self.bytes.len() < rows.end * row_bytes {
            candle_core::bail!(
                "{op}: a {dtype:?} panel of {} values for rows {rows:?} × columns {cols:?}",
                out.len()
            );
        }
        if width == 0 {
            return Ok(());
        }
        let run = cols.start / block * size..cols.end / block * size;
        for (r, out_row) in rows.zip(out.chunks_exact_mut(width)) {
            let row = &self.bytes[r * row_bytes..(r + 1) * row_bytes];
            let blocks = as_blocks::<B>(&row[run.clone()], scratch);
            B::to_float(blocks, out_row);
        }
        Ok(())
    }
}

/// `bytes` (a whole number of `B`s) viewed as `&[B]`: in place when aligned for `B`, otherwise
/// through a copy into `scratch` (8-byte aligned, enough for every block type).
fn as_blocks<'a, B>(bytes: &'a [u8], scratch: &'a mut Vec<u64>) -> &'a [B] {
    let count = bytes.len() / size_of::<B>();
    let ptr = if bytes.as_ptr().align_offset(align_of::<B>()) == 0 {
        bytes.as_ptr()
    } else {
        let words = bytes.len().div_ceil(8);
        if scratch.len() < words {
            scratch.resize(words, 0);
        }
        // SAFETY: `scratch` holds at least bytes.len() bytes and does not overlap `bytes`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                scratch.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            )
        };
        scratch.as_ptr().cast::<u8>()
    };
    // SAFETY: `ptr` is aligned for B (checked, or u64-aligned scratch; `Rect::run` refuses a B
    // that needs more than 8) and points to count · size_of::<B>() initialised bytes that live for 'a and
    // are not written while borrowed. B is one of candle's `#[repr(C)]` block structs or a float
    // type (see `Rect::run`): plain integers and floats with no invalid bit patterns, no
    // references and no Drop, so any bytes are a valid B.
    unsafe { std::slice::from_raw_parts(ptr.cast::<B>(), count) }
}
