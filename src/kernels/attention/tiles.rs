//! The attention core's kernel: the key-skipping plan from the mask, and the forward and
//! backward over tiles of query positions (see the parent module for the math).

use rayon::prelude::*;

use super::Dims;
use crate::kernels::blocks::zeros;
use crate::kernels::fast_exp;
use crate::kernels::gemm::{self, Strided, Threads};

/// `dst = [dst +] lhs · rhs` on the calling thread: the callers already run one rayon task per
/// (batch, key/value head), and the matrices (`T = 128`, `d = 64`) are too small for gemm's own
/// threading to pay.
fn gemm_f32(
    dst: &mut [f32],
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    mnk: (usize, usize, usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    gemm::gemm_f32(
        "llama-attention",
        dst,
        lhs,
        rhs,
        mnk,
        accumulate,
        Threads::Single,
    )
}

/// Mask entries at or below this count as masked when choosing the keys a query row may skip.
/// Skipping is exact: a row only skips keys before its first or past its last entry above
/// `MASKED`, and any f32 above
/// `-1e30` exceeds any at or below it by at least one ulp of `1e30` (≈ 7.6·10²²), so a skipped
/// key's score lies that far under the row's maximum and its exponential is 0 in f32 (for scores
/// of any magnitude a model produces). A row with no entry above it is kept whole: it is
/// uniform, as in `masked_softmax`, only because every key takes part.
const MASKED: f32 = -1e30;

/// Query positions per tile. A tile reads the keys from the first of its rows' visible starts
/// to the last of their visible ends, so under a causal mask it computes a fraction
/// `(T + TILE) / 2T` of the scores, and under a sliding window of `W` keys about
/// `(W + TILE) / T`; smaller tiles skip more but make more, smaller products. At `T = 128`, `d = 64`, `G = 3` on AVX2, 16 and 32
/// are within noise of each other and 64 is ~10% slower; 32 keeps the products of a model
/// without grouped heads (`G = 1`) from getting thinner.
const TILE: usize = 32;

/// Query positions `[t0, t1)` of every head of a group, reading keys `[start, end)`. Its rows of the
/// group matrix, `j·T + t` for each head `j`, are `G` runs of `t1 − t0`; they take part in the
/// products as one `[G·(t1 − t0), ·]` matrix, gathered head-major, since the heads of a group
/// share their keys and mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tile {
    t0: usize,
    t1: usize,
    start: usize,
    end: usize,
}

impl Tile {
    fn positions(&self) -> usize {
        self.t1 - self.t0
    }

    /// The number of keys the tile reads, `end − start`: the columns of its `P` and `dS`.
    fn keys(&self) -> usize {
        self.end.saturating_sub(self.start)
    }
}

/// `max_i row[i]` after `row += mask`, with eight running maxima so the loop vectorises.
fn add_mask_and_max(row: &mut [f32], mask: Option<&[f32]>) -> f32 {
    if let Some(m) = mask {
        row.iter_mut().zip(m).for_each(|(s, &mv)| *s += mv);
    }
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        lanes
            .iter_mut()
            .zip(chunk)
            .for_each(|(l, &x)| *l = l.max(x));
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(tail, f32::max)
}

/// `Σ a[i] b[i]` with eight partial sums, so the loop vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        // Not `mul_add`: the crate is built for baseline x86-64, where it is a libm call.
        for ((l, &xi), &yi) in lanes.iter_mut().zip(x).zip(y) {
            *l += xi * yi;
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// Which keys each query row reads, from the mask alone: built once per call (the mask is
/// frozen) and shared by the forward and the backward.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Per batch row and mask row (`[B, mask_rows]`), the keys `[start, end)` the row reads: from
    /// its first to `1 +` its last key whose mask entry is above [`MASKED`], or `[0, T_k)` for a
    /// fully masked row. Empty without a mask.
    spans: Vec<(usize, usize)>,
    /// Per batch row, the tiles of its group matrices.
    tiles: Vec<Vec<Tile>>,
}

/// The operands of one (batch row, key/value head) task.
struct Group<'a> {
    /// `Q_g`: `[G·T, d]`, contiguous.
    q: &'a [f32],
    /// `K_g`: `[T_k, d]`, contiguous.
    k: &'a [f32],
    /// `V_g`: `[T_k, d]` with row stride `n_kv·d`, starting at its first element.
    v: Strided<'a>,
    /// This batch row's mask, `[mask_rows, T_k]`.
    mask: Option<&'a [f32]>,
    /// This batch row's [`Plan::spans`], `[mask_rows]` (empty without a mask).
    spans: &'a [(usize, usize)],
    /// The query positions of the group, in tiles.
    tiles: &'a [Tile],
}

/// Per-task scratch, sized for the task's largest tile.
struct Scratch {
    /// `P`, `[rows, keys]`.
    p: Vec<f32>,
    /// `dP`, then `dS`, `[rows, keys]`.
    ds: Vec<f32>,
    /// A gathered `[rows, d]` operand (`Q` of the tile).
    a: Vec<f32>,
    /// Another (`dC` of the tile, or a product's rows before they are scattered).
    b: Vec<f32>,
    /// A product's `[rows, d]` result before it is scattered.
    c: Vec<f32>,
}

impl Dims {
    /// Rows of a tile's matrix, `G·(t1 − t0)`.
    fn tile_rows(&self, tile: Tile) -> usize {
        self.groups() * tile.positions()
    }

    /// Whether a tile's rows are contiguous in the group matrix, from row `t0`: all of it, or a
    /// single head.
    fn tile_is_contiguous(&self, tile: Tile) -> bool {
        tile.positions() == self.seq || self.groups() == 1
    }

    /// The tile's rows of a `[G·T, d]` group matrix: in place where contiguous, else gathered
    /// into `buf`.
    fn tile_of<'a>(&self, src: &'a [f32], tile: Tile, buf: &'a mut [f32]) -> &'a [f32] {
        let (d, n) = (self.head_dim, tile.positions());
        if self.tile_is_contiguous(tile) {
            return &src[tile.t0 * d..(tile.t0 + self.tile_rows(tile)) * d];
        }
        for (j, dst) in buf[..self.tile_rows(tile) * d]
            .chunks_exact_mut(n * d)
            .enumerate()
        {
            let at = (j * self.seq + tile.t0) * d;
            dst.copy_from_slice(&src[at..at + n * d]);
        }
        buf
    }

    /// Runs `f` on the tile's `[rows, d]` block of the group matrix `dst`: in place where
    /// contiguous, else on `buf` scattered into `dst` afterwards.
    fn write_tile_of(
        &self,
        dst: &mut [f32],
        tile: Tile,
        buf: &mut [f32],
        f: impl FnOnce(&mut [f32]) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let (d, n, m) = (self.head_dim, tile.positions(), self.tile_rows(tile));
        if self.tile_is_contiguous(tile) {
            return f(&mut dst[tile.t0 * d..(tile.t0 + m) * d]);
        }
        let buf = &mut buf[..m * d];
        f(buf)?;
        for (j, src) in buf.chunks_exact(n * d).enumerate() {
            let at = (j * self.seq + tile.t0) * d;
            dst[at..at + n * d].copy_from_slice(src);
        }
        Ok(())
    }

    /// The query position of row `i` of a tile's matrix.
    fn tile_position(&self, tile: Tile, i: usize) -> usize {
        tile.t0 + i % tile.positions()
    }

    /// The mask row of query position `t`.
    fn mask_row(&self, t: usize) -> usize {
        if self.mask_rows == 1 { 0 } else { t }
    }

    /// The keys query position `t` reads, as `[start, end)` counted from its tile's first key
    /// (within `[0, tile.keys()]`, `start ≤ end`): the whole tile without a mask.
    fn row_span(&self, grp: &Group<'_>, t: usize, tile: Tile) -> (usize, usize) {
        let n = tile.keys();
        let (s, e) = grp.spans.get(self.mask_row(t)).map_or((0, n), |&(s, e)| {
            (s.saturating_sub(tile.start), e.saturating_sub(tile.start))
        });
        let e = e.min(n);
        (s.min(e), e)
    }

    /// Rows `[tile.start, tile.end)` of a `[T_k, d]` matrix stored row-major: `K_g`, `dK_g`,
    /// `dV_g`.
    fn key_rows<'a>(&self, x: &'a [f32], tile: Tile) -> &'a [f32] {
        let d = self.head_dim;
        x.get(tile.start * d..tile.end * d).unwrap_or(&[])
    }

    /// [`Self::key_rows`] for writing.
    fn key_rows_mut<'a>(&self, x: &'a mut [f32], tile: Tile) -> &'a mut [f32] {
        let d = self.head_dim;
        x.get_mut(tile.start * d..tile.end * d).unwrap_or(&mut [])
    }

    /// `V_g`'s rows from the tile's first key on (same strides as `v`).
    fn value_rows<'a>(&self, v: Strided<'a>, tile: Tile) -> Strided<'a> {
        Strided {
            values: v.values.get(tile.start * v.row_stride..).unwrap_or(&[]),
            ..v
        }
    }

    /// The [`Plan`] for `mask` (`[B, mask_rows, T_k]`, or none).
    pub(crate) fn plan(&self, mask: Option<&[f32]>) -> Plan {
        let tk = self.kv_seq;
        // Per mask row, the first visible key and `1 +` the last; `None` for a fully masked row.
        let visible: Vec<Option<(usize, usize)>> = match mask {
            None => Vec::new(),
            Some(m) if tk == 0 => vec![None; m.len()],
            Some(m) => m
                .chunks_exact(tk)
                .map(|row| {
                    // A NaN entry counts as visible, so it reaches the softmax.
                    let seen = |x: &f32| *x > MASKED || x.is_nan();
                    let start = row.iter().position(seen)?;
                    let end = row.iter().rposition(seen)?;
                    Some((start, end + 1))
                })
                .collect(),
        };
        let tiles = (0..self.batch)
            .map(|b| {
                let rows = b * self.mask_rows..(b + 1) * self.mask_rows;
                self.tiles(visible.get(rows).unwrap_or(&[]))
            })
            .collect();
        Plan {
            spans: visible.iter().map(|e| e.unwrap_or((0, tk))).collect(),
            tiles,
        }
    }

    /// The tiles of one batch row, from its mask rows' visible spans (`visible`:
    /// `[mask_rows]`, empty without a mask): runs of up to [`TILE`] positions, a fully masked
    /// position never sharing a tile with a visible one (it reads every key), each reading from
    /// the first start to the last end of its rows. Neighbours that read the same keys are
    /// merged, so without a mask, or with one broadcast over the queries, the group is one tile.
    fn tiles(&self, visible: &[Option<(usize, usize)>]) -> Vec<Tile> {
        let (seq, tk) = (self.seq, self.kv_seq);
        let span_of = |t: usize| {
            if visible.is_empty() {
                Some((0, tk))
            } else {
                visible.get(self.mask_row(t)).copied().flatten()
            }
        };
        let mut tiles: Vec<Tile> = Vec::new();
        let mut t0 = 0;
        while t0 < seq {
            let full = span_of(t0).is_none();
            let mut t1 = t0 + 1;
            while t1 < seq && t1 - t0 < TILE && span_of(t1).is_none() == full {
                t1 += 1;
            }
            let (start, end) = (t0..t1)
                .map(|t| span_of(t).unwrap_or((0, tk)))
                .fold((tk, 0), |(s, e), (st, et)| (s.min(st), e.max(et)));
            match tiles.last_mut() {
                Some(last) if (last.start, last.end) == (start, end) => last.t1 = t1,
                _ => tiles.push(Tile { t0, t1, start, end }),
            }
            t0 = t1;
        }
        tiles
    }

    fn group<'a>(
        &self,
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        mask: Option<&'a [f32]>,
        plan: &'a Plan,
        task: usize,
    ) -> Group<'a> {
        let (b, g) = (task / self.kv_heads, task % self.kv_heads);
        let (d, tk) = (self.head_dim, self.kv_seq);
        let q_len = self.group_rows() * d;
        let v_start = (b * tk * self.kv_heads + g) * d;
        let mask_len = self.mask_rows * tk;
        let spans = b * self.mask_rows..(b + 1) * self.mask_rows;
        Group {
            q: &q[task * q_len..(task + 1) * q_len],
            k: &k[task * tk * d..(task + 1) * tk * d],
            v: Strided {
                values: &v[v_start..],
                col_stride: 1,
                row_stride: self.kv_heads * d,
            },
            mask: mask.map(|m| &m[b * mask_len..(b + 1) * mask_len]),
            spans: plan.spans.get(spans).unwrap_or(&[]),
            tiles: plan.tiles.get(b).map_or(&[], Vec::as_slice),
        }
    }

    /// Scratch for `grp`'s tiles.
    fn scratch(&self, grp: &Group<'_>) -> Scratch {
        let (rows, block) = grp.tiles.iter().fold((0, 0), |(r, b), &t| {
            let m = self.tile_rows(t);
            (r.max(m), b.max(m * t.keys()))
        });
        let rows = rows * self.head_dim;
        Scratch {
            p: vec![0f32; block],
            ds: vec![0f32; block],
            a: vec![0f32; rows],
            b: vec![0f32; rows],
            c: vec![0f32; rows],
        }
    }

    /// `P = softmax_rows(Q_tile K[start..end]ᵀ + M)` into `p` (`[rows, keys]`), with
    /// `masked_softmax`'s arithmetic. Outside its own span a row is masked, its probabilities 0
    /// (see [`MASKED`]): written as such, not computed.
    fn tile_probs(
        &self,
        grp: &Group<'_>,
        tile: Tile,
        q_t: &[f32],
        p: &mut [f32],
    ) -> candle_core::Result<()> {
        let (d, tk, n) = (self.head_dim, self.kv_seq, tile.keys());
        gemm_f32(
            p,
            Strided::rows(q_t, d),
            Strided::transposed(self.key_rows(grp.k, tile), d),
            (self.tile_rows(tile), n, d),
            false,
        )?;
        if n == 0 {
            return Ok(());
        }
        for (i, row) in p.chunks_exact_mut(n).enumerate() {
            let t = self.tile_position(tile, i);
            let (s, e) = self.row_span(grp, t, tile);
            let (before, rest) = row.split_at_mut(s);
            let (row, after) = rest.split_at_mut(e - s);
            before.fill(0.0);
            after.fill(0.0);
            let mask_row = grp.mask.map(|m| {
                let at = self.mask_row(t) * tk + tile.start + s;
                &m[at..at + row.len()]
            });
            let max = add_mask_and_max(row, mask_row);
            let inv = 1.0 / fast_exp::exp_shifted_sum(row, max);
            row.iter_mut().for_each(|s| *s *= inv);
        }
        Ok(())
    }

    /// Output row `(b, t)`, head `g·G + j`, in `[B, T, n_h·d]`, for row `j·T + t` of group
    /// task `task`.
    fn context_offset(&self, task: usize, row: usize) -> usize {
        let (b, g) = (task / self.kv_heads, task % self.kv_heads);
        let (j, t) = (row / self.seq, row % self.seq);
        ((b * self.seq + t) * self.heads + g * self.groups() + j) * self.head_dim
    }

    /// Whether some operand has no elements (then so has the output, or it is all zero).
    fn is_empty(&self) -> bool {
        self.batch * self.kv_heads * self.group_rows() * self.kv_seq * self.head_dim == 0
    }

    pub(crate) fn forward(
        &self,
        plan: &Plan,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        let (rows, d) = (self.group_rows(), self.head_dim);
        let mut out = zeros(self.batch * self.seq * self.heads * d);
        if self.is_empty() {
            // An empty softmax row has no probabilities: nothing is added to the zero context.
            return Ok(out);
        }
        let contexts = (0..self.batch * self.kv_heads)
            .into_par_iter()
            .map(|task| {
                let grp = self.group(q, k, v, mask, plan, task);
                let mut s = self.scratch(&grp);
                let mut c = vec![0f32; rows * d];
                for &tile in grp.tiles {
                    let (m, n) = (self.tile_rows(tile), tile.keys());
                    let p = &mut s.p[..m * n];
                    self.tile_probs(&grp, tile, self.tile_of(grp.q, tile, &mut s.a), p)?;
                    let v = self.value_rows(grp.v, tile);
                    self.write_tile_of(&mut c, tile, &mut s.c, |c_t| {
                        gemm_f32(c_t, Strided::rows(p, n), v, (m, d, n), false)
                    })?;
                }
                Ok(c)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Scattered afterwards, one batch row per task: a task's rows interleave with those of
        // the batch row's other key/value heads.
        out.par_chunks_exact_mut(self.seq * self.heads * d)
            .zip(contexts.par_chunks_exact(self.kv_heads))
            .enumerate()
            .for_each(|(b, (dst, cs))| {
                let base = b * self.seq * self.heads * d;
                for (g, c) in cs.iter().enumerate() {
                    let task = b * self.kv_heads + g;
                    for (row, src) in c.chunks_exact(d).enumerate() {
                        let at = self.context_offset(task, row) - base;
                        dst[at..at + d].copy_from_slice(src);
                    }
                }
            });
        Ok(out)
    }

    /// `(dq, dk, dv)` in the layouts of `q`, `k`, `v`, for the context gradient `grad`.
    pub(crate) fn backward(
        &self,
        plan: &Plan,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
        grad: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (rows, d, tk) = (self.group_rows(), self.head_dim, self.kv_seq);
        let mut dq = zeros(q.len());
        let mut dk = zeros(k.len());
        let mut dv = zeros(v.len());
        if self.is_empty() {
            // Zero-sized chunks would panic below; the gradients are zero (or empty).
            return Ok((dq, dk, dv));
        }
        // dq and dk are chunked by task as q and k are; dv's rows interleave across key/value
        // heads, so each task returns its `dV_g` to be scattered afterwards.
        let dv_groups = dq
            .par_chunks_exact_mut(rows * d)
            .zip(dk.par_chunks_exact_mut(tk * d))
            .enumerate()
            .map(|(task, (dq_g, dk_g))| {
                let grp = self.group(q, k, v, mask, plan, task);
                let mut s = self.scratch(&grp);
                let mut dv_g = vec![0f32; tk * d];
                for &tile in grp.tiles {
                    let (m, n) = (self.tile_rows(tile), tile.keys());
                    let (p, ds) = (&mut s.p[..m * n], &mut s.ds[..m * n]);
                    let v = self.value_rows(grp.v, tile);
                    let v_t = Strided {
                        values: v.values,
                        col_stride: v.row_stride,
                        row_stride: 1,
                    };
                    let k_t = self.key_rows(grp.k, tile);
                    let q_t = self.tile_of(grp.q, tile, &mut s.a);
                    // dC of the tile's rows, gathered from the context gradient's layout.
                    let dc_t = &mut s.b[..m * d];
                    for (i, dst) in dc_t.chunks_exact_mut(d).enumerate() {
                        let row = (i / tile.positions()) * self.seq + self.tile_position(tile, i);
                        let at = self.context_offset(task, row);
                        dst.copy_from_slice(&grad[at..at + d]);
                    }
                    let dc_t = &*dc_t;
                    self.tile_probs(&grp, tile, q_t, p)?;
                    // dP = dC V_gᵀ.
                    gemm_f32(ds, Strided::rows(dc_t, d), v_t, (m, n, d), false)?;
                    // dV_g += Pᵀ dC (summed over the group's query heads: they are its rows).
                    gemm_f32(
                        self.key_rows_mut(&mut dv_g, tile),
                        Strided::transposed(p, n),
                        Strided::rows(dc_t, d),
                        (n, d, m),
                        true,
                    )?;
                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)), in place over dP; 0 where P is.
                    if n > 0 {
                        for (i, (ds_row, p_row)) in
                            ds.chunks_exact_mut(n).zip(p.chunks_exact(n)).enumerate()
                        {
                            let (s, e) = self.row_span(&grp, self.tile_position(tile, i), tile);
                            let (before, rest) = ds_row.split_at_mut(s);
                            let (ds_row, after) = rest.split_at_mut(e - s);
                            before.fill(0.0);
                            after.fill(0.0);
                            let p_row = &p_row[s..e];
                            let rowsum = dot(ds_row, p_row);
                            ds_row
                                .iter_mut()
                                .zip(p_row)
                                .for_each(|(s, &pv)| *s = pv * (*s - rowsum));
                        }
                    }
                    let ds = &*ds;
                    // dQ_tile = dS K_g, dK_g += dSᵀ Q_tile.
                    self.write_tile_of(dq_g, tile, &mut s.c, |dq_t| {
                        gemm_f32(
                            dq_t,
                            Strided::rows(ds, n),
                            Strided::rows(k_t, d),
                            (m, d, n),
                            false,
                        )
                    })?;
                    gemm_f32(
                        self.key_rows_mut(dk_g, tile),
                        Strided::transposed(ds, n),
                        Strided::rows(q_t, d),
                        (n, d, m),
                        true,
                    )?;
                }
                Ok(dv_g)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        dv.par_chunks_exact_mut(tk * self.kv_heads * d)
            .zip(dv_groups.par_chunks_exact(self.kv_heads))
            .for_each(|(dst, dv_gs)| {
                for (g, dv_g) in dv_gs.iter().enumerate() {
                    for (j, src) in dv_g.chunks_exact(d).enumerate() {
                        let at = (j * self.kv_heads + g) * d;
                        dst[at..at + d].copy_from_slice(src);
                    }
                }
            });
        Ok((dq, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One batch row, one group of two heads, `T = T_k = 70`, a mask row per query.
    fn dims(seq: usize, kv_seq: usize, mask_rows: usize) -> Dims {
        Dims {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            seq,
            kv_seq,
            head_dim: 4,
            mask_rows,
        }
    }

    /// `[T, T_k]`: query `i` (at position `T_k − T + i`) sees key `j` iff `j ≤ pos`,
    /// `pos − j < window` and `j ≥ left`.
    fn window_mask(seq: usize, kv_seq: usize, window: usize, left: usize) -> Vec<f32> {
        let mut m = vec![f32::MIN; seq * kv_seq];
        for i in 0..seq {
            let pos = kv_seq - seq + i;
            for j in left..=pos {
                if pos - j < window {
                    m[i * kv_seq + j] = 0.0;
                }
            }
        }
        m
    }

    fn tile(t0: usize, t1: usize, start: usize, end: usize) -> Tile {
        Tile { t0, t1, start, end }
    }

    #[test]
    fn a_sliding_window_skips_the_keys_before_it() {
        let d = dims(70, 70, 70);
        let plan = d.plan(Some(&window_mask(70, 70, 8, 0)));
        // Each tile from its first row's window start to its last row's end.
        assert_eq!(
            plan.tiles,
            vec![vec![
                tile(0, 32, 0, 32),
                tile(32, 64, 25, 64),
                tile(64, 70, 57, 70)
            ]]
        );
        for (t, &span) in plan.spans.iter().enumerate() {
            assert_eq!(span, (t.saturating_sub(7), t + 1), "row {t}");
        }
        // A window of one key: every tile reads its own positions only.
        let plan = d.plan(Some(&window_mask(70, 70, 1, 0)));
        assert_eq!(
            plan.tiles,
            vec![vec![
                tile(0, 32, 0, 32),
                tile(32, 64, 32, 64),
                tile(64, 70, 64, 70)
            ]]
        );
        // Causal (a window of at least T): every tile from key 0, as without a window.
        let plan = d.plan(Some(&window_mask(70, 70, 70, 0)));
        assert_eq!(
            plan.tiles,
            vec![vec![
                tile(0, 32, 0, 32),
                tile(32, 64, 0, 64),
                tile(64, 70, 0, 70)
            ]]
        );
    }

    #[test]
    fn fully_masked_rows_read_every_key_in_tiles_of_their_own() {
        // Left padding of 40 under a window of 8: queries 0..40 see nothing (uniform over all
        // keys), the rest start at the padding or the window, whichever is later.
        let d = dims(70, 70, 70);
        let plan = d.plan(Some(&window_mask(70, 70, 8, 40)));
        assert_eq!(
            plan.tiles,
            vec![vec![tile(0, 40, 0, 70), tile(40, 70, 40, 70)]]
        );
        assert_eq!(plan.spans[39], (0, 70));
        assert_eq!(plan.spans[45], (40, 46));
        assert_eq!(plan.spans[69], (62, 70));
    }

    #[test]
    fn cached_keys_and_broadcast_masks_get_their_starts() {
        // 10 queries at positions 40..50 over 50 keys, window 4: keys [37, 50) only.
        let plan = dims(10, 50, 10).plan(Some(&window_mask(10, 50, 4, 0)));
        assert_eq!(plan.tiles, vec![vec![tile(0, 10, 37, 50)]]);
        // One mask row for every query: left padding of 3 and right padding of 2.
        let mut m = vec![0f32; 50];
        m[..3].fill(f32::MIN);
        m[48..].fill(f32::MIN);
        let plan = dims(10, 50, 1).plan(Some(&m));
        assert_eq!(plan.spans, vec![(3, 48)]);
        assert_eq!(plan.tiles, vec![vec![tile(0, 10, 3, 48)]]);
        // Without a mask: every key.
        let plan = dims(10, 50, 0).plan(None);
        assert_eq!(plan.tiles, vec![vec![tile(0, 10, 0, 50)]]);
    }
}
