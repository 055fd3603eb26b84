//! Every storage type on every path this CPU can run, against an f64 product on the weights as
//! `widen_rows` gives them (the dequantised values), with awkward shapes.
//!
//! Tolerances, with `S = Σ|x||w|` for each output:
//! - native bf16 (`Path::Avx512Bf16` on bf16 weights): the activations are rounded to bf16, a
//!   relative error of at most 2⁻⁹ per term, so `|err| ≤ 2⁻⁹·S` plus f32 summation; we allow
//!   `2⁻⁸·S`;
//! - everything else widens the weight exactly and sums in f32: `|err| ≤ 1e-5·S`.
//!
//! Plus, with `accumulate`, the f32 rounding of adding the product to `dst`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};

use super::{Path, WeightMatrix, WeightValues};
use crate::kernels::gemm::Threads;

/// Deterministic values in [-1, 1) (xorshift), with an occasional large one so that sums mix
/// magnitudes.
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            if i % 97 == 3 { v * 8.0 } else { v }
        })
        .collect()
}

/// A weight in every storage form the kernels take.
enum Stored {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Quantized(GgmlDType, Vec<u8>),
}

impl Stored {
    fn new(kind: &str, values: &[f32], rows: usize, cols: usize) -> Self {
        match kind {
            "f32" => Stored::F32(values.to_vec()),
            "bf16" => Stored::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
            "f16" => Stored::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            _ => {
                let dtype = quant_type(kind);
                let t = Tensor::from_slice(values, (rows, cols), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&t, dtype).unwrap();
                Stored::Quantized(dtype, q.data().unwrap().into_owned())
            }
        }
    }

    fn values(&self) -> WeightValues<'_> {
        match self {
            Stored::F32(v) => WeightValues::F32(v),
            Stored::Bf16(v) => WeightValues::Bf16(v),
            Stored::F16(v) => WeightValues::F16(v),
            Stored::Quantized(dtype, bytes) => WeightValues::Quantized {
                dtype: *dtype,
                bytes,
            },
        }
    }
}

fn quant_type(kind: &str) -> GgmlDType {
    match kind {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2k" => GgmlDType::Q2K,
        "q3k" => GgmlDType::Q3K,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        other => panic!("unknown storage {other}"),
    }
}

const FLOATS: [&str; 3] = ["f32", "bf16", "f16"];
const QUANTS: [&str; 10] = [
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k",
];

/// The paths this CPU runs; the others must be refused.
fn paths() -> Vec<Path> {
    let (ran, missing): (Vec<Path>, Vec<Path>) = Path::ALL.iter().partition(|p| p.is_supported());
    eprintln!("lowp paths run: {ran:?}; not on this CPU: {missing:?}");
    ran
}

/// One comparison: `w` (rows × cols, stored as `kind`), the products over `range` with `m`
/// activation rows, on every path.
fn check(kind: &str, rows: usize, cols: usize, m: usize, range: std::ops::Range<usize>) {
    let stored = Stored::new(kind, &random(rows * cols, 1), rows, cols);
    let w = WeightMatrix::new("test", "w", stored.values(), rows, cols).unwrap();
    let mut dense = vec![0f32; rows * cols];
    w.widen_rows("test", 0..rows, &mut dense).unwrap();
    let n = range.len();
    let x = random(m * cols, 2);
    let g = random(m * n, 3);
    // f64 references and Σ|x||w| bounds.
    let mut xwt_ref = vec![(0f64, 0f64); m * n];
    for i in 0..m {
        for j in 0..n {
            let wr = &dense[(range.start + j) * cols..(range.start + j + 1) * cols];
            let xr = &x[i * cols..(i + 1) * cols];
            xwt_ref[i * n + j] = xr.iter().zip(wr).fold((0.0, 0.0), |(s, b), (&a, &c)| {
                (s + a as f64 * c as f64, b + (a as f64 * c as f64).abs())
            });
        }
    }
    let mut gw_ref = vec![(0f64, 0f64); m * cols];
    for i in 0..m {
        for (j, &gv) in g[i * n..(i + 1) * n].iter().enumerate() {
            let wr = &dense[(range.start + j) * cols..(range.start + j + 1) * cols];
            for (c, &wv) in wr.iter().enumerate() {
                let p = gv as f64 * wv as f64;
                let e = &mut gw_ref[i * cols + c];
                *e = (e.0 + p, e.1 + p.abs());
            }
        }
    }
    for path in paths() {
        let native = path == Path::Avx512Bf16 && kind == "bf16";
        let rel = if native { 2f64.powi(-8) } else { 1e-5 };
        for accumulate in [false, true] {
            for threads in [Threads::Candle, Threads::Single] {
                let what =
                    format!("{kind} {rows}×{cols} m={m} rows {range:?} {path:?} acc={accumulate}");
                let start = random(m * n.max(cols), 4);
                let mut dst = start[..m * n].to_vec();
                w.xwt_with(
                    path,
                    "test",
                    &mut dst,
                    &x,
                    m,
                    range.clone(),
                    accumulate,
                    threads,
                )
                .unwrap();
                compare(
                    &format!("xwt {what}"),
                    &dst,
                    &xwt_ref,
                    &start,
                    accumulate,
                    rel,
                );
                let mut dst = start[..m * cols].to_vec();
                w.gw_with(
                    path,
                    "test",
                    &mut dst,
                    &g,
                    m,
                    range.clone(),
                    accumulate,
                    threads,
                )
                .unwrap();
                compare(
                    &format!("gw {what}"),
                    &dst,
                    &gw_ref,
                    &start,
                    accumulate,
                    rel,
                );
            }
        }
    }
}

fn compare(what: &str, got: &[f32], want: &[(f64, f64)], start: &[f32], acc: bool, rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &(v, bound))) in got.iter().zip(want).enumerate() {
        let (v, slack) = if acc {
            let s = start[i] as f64;
            (v + s, (v + s).abs() * 2e-7)
        } else {
            (v, 0.0)
        };
        let tol = rel * bound + slack + 1e-30;
        assert!(
            (g as f64 - v).abs() <= tol,
            "{what}: [{i}] {g} vs {v} (tolerance {tol:e})"
        );
    }
}

#[test]
fn float_weights_small_shapes_on_every_path() {
    for kind in FLOATS {
        for m in [1, 3, 17, 64] {
            check(kind, 37, 75, m, 0..37);
            check(kind, 37, 75, m, 5..34);
            check(kind, 9, 1, m, 2..9);
            check(kind, 6, 33, m, 1..6);
        }
    }
}

#[test]
fn float_weights_several_tiles_on_every_path() {
    // Enough rows, columns and activations for several tiles and reduction chunks in each
    // kernel, none of them a multiple of the tile sizes.
    for kind in FLOATS {
        check(kind, 290, 520, 100, 7..290);
    }
}

#[test]
fn quantized_weights_on_every_path() {
    for kind in QUANTS {
        let cols = if kind.ends_with('k') { 512 } else { 96 };
        for m in [1, 17] {
            check(kind, 21, cols, m, 3..20);
        }
        check(kind, 270, cols, 64, 1..270);
    }
}

#[test]
fn misaligned_quantized_bytes_dequantise_the_same() {
    let (rows, cols) = (5, 64);
    let Stored::Quantized(dtype, bytes) = Stored::new("q4_1", &random(rows * cols, 5), rows, cols)
    else {
        unreachable!()
    };
    let mut shifted = vec![0u8; bytes.len() + 1];
    shifted[1..].copy_from_slice(&bytes);
    let mut outs = Vec::new();
    for b in [&bytes[..], &shifted[1..]] {
        let values = WeightValues::Quantized { dtype, bytes: b };
        let w = WeightMatrix::new("test", "w", values, rows, cols).unwrap();
        let mut out = vec![0f32; rows * cols];
        w.widen_rows("test", 0..rows, &mut out).unwrap();
        outs.push(out);
    }
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn paths_the_cpu_lacks_are_refused() {
    let values = random(4 * 8, 6);
    let w = WeightMatrix::new("test", "w", WeightValues::F32(&values), 4, 8).unwrap();
    for path in Path::ALL {
        let mut dst = vec![0f32; 2 * 4];
        let r = w.xwt_with(
            path,
            "test",
            &mut dst,
            &[0.5; 16],
            2,
            0..4,
            false,
            Threads::Single,
        );
        assert_eq!(r.is_ok(), path.is_supported(), "{path:?}");
        if let Err(e) = r {
            assert!(e.to_string().contains(&format!("{path:?}")), "{e}");
        }
    }
    assert!(Path::best().is_supported());
}

#[test]
fn bad_shapes_are_errors() {
    let values: Vec<bf16> = random(4 * 8, 7)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let w = WeightMatrix::new("op", "w", WeightValues::Bf16(&values), 4, 8).unwrap();
    let mut dst = vec![0f32; 6];
    let e = w.xwt("op", &mut dst, &[0.0; 16], 2, 1..5, false, Threads::Single);
    assert!(e.unwrap_err().to_string().contains("rows 1..5"));
    let e = w.gw("op", &mut dst, &[0.0; 6], 2, 0..3, false, Threads::Single);
    assert!(e.is_err());
    let e = WeightMatrix::new("op", "w", WeightValues::Bf16(&values), 4, 9);
    assert!(
        e.unwrap_err()
            .to_string()
            .contains("op: w holds 32 bf16 values")
    );
}

#[test]
fn tiles_shrink_to_feed_the_threads_and_keep_their_quantum() {
    use super::tasks::{Dim, split};
    let dim = |len, target, min, quantum| Dim {
        len,
        target,
        min,
        quantum,
    };
    // One thread: the kernel's sizes, clipped to the lengths.
    assert_eq!(
        split(Threads::Single, dim(256, 96, 24, 6), dim(384, 128, 32, 16)),
        (96, 128)
    );
    assert_eq!(
        split(Threads::Single, dim(3, 64, 16, 4), dim(5, 64, 16, 4)),
        (4, 8)
    );
    // Many tiles wanted: never below the minimum, always a multiple of the quantum, and the
    // loop ends even when a quantum is larger than half the tile.
    let threads = candle_core::utils::get_num_threads();
    for (a, b) in [
        (dim(256, 96, 24, 6), dim(384, 128, 32, 16)),
        (dim(64, 256, 32, 1), dim(512, 512, 256, 256)),
        (dim(1, 64, 16, 4), dim(1, 64, 16, 4)),
    ] {
        let (ta, tb) = split(Threads::Candle, a, b);
        assert!(ta % a.quantum == 0 && tb % b.quantum == 0, "{ta} {tb}");
        let tiles = a.len.div_ceil(ta) * b.len.div_ceil(tb);
        let at_min = |d: Dim, t: usize| t / 2 < d.min || t <= d.quantum;
        assert!(
            tiles >= 4 * threads || (at_min(a, ta) && at_min(b, tb)),
            "{ta} {tb}"
        );
    }
}
