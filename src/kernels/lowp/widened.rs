//! The portable path: widen (or dequantise) one tile of `W` into an f32 panel and hand it to
//! the f32 gemm, which is already at the machine's f32 peak. Tiles run in parallel, each with its
//! own panel from the per-thread scratch and a single-threaded gemm, so widening is spread over
//! the threads too instead of running between parallel gemms.
//!
//! `x·Wᵀ` tiles the output over (x rows × W rows): a tile widens its W rows over all columns.
//! `g·W` reduces over W's rows, so it tiles the output over (g rows × W columns) and walks the
//! reduction in chunks of W rows; its column tiles are whole ggml blocks.
//!
//! The activations stay f32, so this path is slightly more accurate than the native bf16 path,
//! which rounds them to bf16 (see `bf16.rs`).

use std::ops::Range;

use super::tasks::{self, SharedOut};
use super::{Path, WeightMatrix};
use crate::kernels::gemm::{self, Strided, Threads};

/// Values in a panel: 64 Ki f32 (256 KiB) sits in L2 next to the gemm's packed operands.
const PANEL_VALUES: usize = 64 * 1024;
/// Activation rows per tile: enough that widening a panel is small next to the products.
const M_TILE: usize = 256;

fn dim(len: usize, target: usize, min: usize, quantum: usize) -> tasks::Dim {
    tasks::Dim {
        len,
        target,
        min,
        quantum,
    }
}

/// `dst (m × |rows|) = [dst +] x (m × cols) · W[rows]ᵀ`.
#[allow(clippy::too_many_arguments)]
pub(super) fn xwt(
    w: &WeightMatrix<'_>,
    path: Path,
    op: &str,
    dst: &mut [f32],
    x: &[f32],
    m: usize,
    rows: Range<usize>,
    accumulate: bool,
    threads: Threads,
) -> candle_core::Result<()> {
    let (k, n) = (w.cols(), rows.len());
    let (mt, nt) = tasks::split(
        threads,
        dim(m, M_TILE, 32, 1),
        dim(n, (PANEL_VALUES / k.max(1)).clamp(16, 256), 16, 16),
    );
    let (m_tiles, n_tiles) = (m.div_ceil(mt), n.div_ceil(nt));
    let Some(out) = SharedOut::new(dst, m, n) else {
        candle_core::bail!("{op}: x·Wᵀ output is not {m}×{n}");
    };
    tasks::for_each_tile(threads, m_tiles * n_tiles, |t| {
        let (i0, j0) = (t / n_tiles * mt, t % n_tiles * nt);
        let (i1, j1) = ((i0 + mt).min(m), (j0 + nt).min(n));
        let (mi, width) = (i1 - i0, j1 - j0);
        tasks::with_scratch(|s| {
            let panel = tasks::prefix(&mut s.panel, width * k);
            let w_rows = rows.start + j0..rows.start + j1;
            w.widen_rect(op, path, w_rows, 0..k, panel, &mut s.bytes)?;
            let part = tasks::prefix(&mut s.part, mi * width);
            gemm::gemm_f32(
                op,
                part,
                Strided::rows(&x[i0 * k..i1 * k], k),
                Strided::transposed(panel, k),
                (mi, width, k),
                false,
                Threads::Single,
            )?;
            // SAFETY: tile t alone owns rows i0..i1 × columns j0..j1 of the output.
            unsafe { tasks::store(op, &out, i0..i1, j0..j1, part, accumulate) }
        })
    })
}

/// `dst (m × cols) = [dst +] g (m × |rows|) · W[rows]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gw(
    w: &WeightMatrix<'_>,
    path: Path,
    op: &str,
    dst: &mut [f32],
    g: &[f32],
    m: usize,
    rows: Range<usize>,
    accumulate: bool,
    threads: Threads,
) -> candle_core::Result<()> {
    let (k, n) = (w.cols(), rows.len());
    let quantum = w.col_quantum();
    let (mt, ct) = tasks::split(
        threads,
        dim(m, M_TILE, 32, 1),
        dim(k, 256, 32.max(quantum), quantum),
    );
    let rt = (PANEL_VALUES / ct).clamp(16, 512);
    let (m_tiles, c_tiles) = (m.div_ceil(mt), k.div_ceil(ct));
    let Some(out) = SharedOut::new(dst, m, k) else {
        candle_core::bail!("{op}: g·W output is not {m}×{k}");
    };
    tasks::for_each_tile(threads, m_tiles * c_tiles, |t| {
        let (i0, c0) = (t / c_tiles * mt, t % c_tiles * ct);
        let (i1, c1) = ((i0 + mt).min(m), (c0 + ct).min(k));
        let (mi, width) = (i1 - i0, c1 - c0);
        tasks::with_scratch(|s| {
            let part = tasks::prefix(&mut s.part, mi * width);
            let mut r0 = 0;
            while r0 < n {
                let r1 = (r0 + rt).min(n);
                let panel = tasks::prefix(&mut s.panel, (r1 - r0) * width);
                let w_rows = rows.start + r0..rows.start + r1;
                w.widen_rect(op, path, w_rows, c0..c1, panel, &mut s.bytes)?;
                // g's columns r0..r1 (its rows i0..i1), read in place through the row stride.
                let g_cols = Strided {
                    values: &g[i0 * n + r0..],
                    col_stride: 1,
                    row_stride: n,
                };
                gemm::gemm_f32(
                    op,
                    part,
                    g_cols,
                    Strided::rows(panel, width),
                    (mi, width, r1 - r0),
                    r0 > 0,
                    Threads::Single,
                )?;
                r0 = r1;
            }
            // SAFETY: tile t alone owns rows i0..i1 × columns c0..c1 of the output.
            unsafe { tasks::store(op, &out, i0..i1, c0..c1, part, accumulate) }
        })
    })
}
