//! Side-by-side timings of the products on each storage type against the f32 gemm on the same
//! shapes, for our own measurements (`cargo test --release --lib lowp::timing -- --ignored
//! --nocapture`); nothing here asserts a time.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::bf16;

use super::{Path, WeightMatrix, WeightValues};
use crate::kernels::gemm::Threads;

/// This thread's CPU seconds: on a machine shared with other jobs, a single-threaded product's
/// CPU time is steadier than its wall time.
fn thread_cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Best per-call seconds of `f` over 5 rounds of about 0.1 s each: CPU time of this thread for
/// single-threaded runs, wall time otherwise.
fn time(threads: Threads, mut f: impl FnMut()) -> f64 {
    let clock = || match threads {
        Threads::Single => thread_cpu_seconds(),
        Threads::Candle => epoch_seconds(),
    };
    f();
    let start = clock();
    f();
    let once = (clock() - start).max(1e-6);
    let reps = ((0.1 / once) as usize).clamp(1, 1000);
    (0..5)
        .map(|_| {
            let start = clock();
            for _ in 0..reps {
                f();
            }
            (clock() - start) / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Wall seconds since the first call.
fn epoch_seconds() -> f64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs_f64()
}

#[test]
#[ignore]
fn lowp_products_against_the_f32_gemm() {
    let shapes = [
        (256, 384, 384),
        (256, 1536, 384),
        (256, 384, 1536),
        (2048, 384, 384),
        (512, 576, 576),
        (512, 1536, 576),
        (512, 576, 1536),
    ];
    for threads in [Threads::Single, Threads::Candle] {
        for &(m, n, k) in &shapes {
            let w32: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let t = Tensor::from_slice(&w32, (n, k), &Device::Cpu).unwrap();
            let q: Vec<(GgmlDType, Vec<u8>)> = [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K]
                .into_iter()
                .filter(|d| k % d.block_size() == 0)
                .map(|d| {
                    (
                        d,
                        QTensor::quantize(&t, d)
                            .unwrap()
                            .data()
                            .unwrap()
                            .into_owned(),
                    )
                })
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31) % 101) as f32 / 101.0 - 0.5)
                .collect();
            let g: Vec<f32> = (0..m * n)
                .map(|i| ((i * 37) % 103) as f32 / 103.0 - 0.5)
                .collect();
            let mut weights = vec![
                ("f32", Path::best(), WeightValues::F32(&w32)),
                ("bf16 widened", Path::Avx512, WeightValues::Bf16(&wb)),
                ("bf16 native", Path::Avx512Bf16, WeightValues::Bf16(&wb)),
            ];
            for (d, bytes) in &q {
                weights.push((
                    dtype_name(*d),
                    Path::best(),
                    WeightValues::Quantized { dtype: *d, bytes },
                ));
            }
            if threads == Threads::Candle {
                qmatmul_against_ours(&q, &t, &x, (m, n, k));
            }
            let mut base = (0.0, 0.0);
            for (name, path, values) in weights {
                if !path.is_supported() {
                    continue;
                }
                let w = WeightMatrix::new("t", "w", values, n, k).unwrap();
                let mut y = vec![0f32; m * n];
                let mut dx = vec![0f32; m * k];
                let a = time(threads, || {
                    w.xwt_with(path, "t", &mut y, &x, m, 0..n, false, threads)
                        .unwrap()
                });
                let b = time(threads, || {
                    w.gw_with(path, "t", &mut dx, &g, m, 0..n, false, threads)
                        .unwrap()
                });
                if name == "f32" {
                    base = (a, b);
                }
                let gflops = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
                eprintln!(
                    "{} m={m} n={n} k={k} {name:>12}: xwt {:7.1} GFLOP/s ({:.2}× f32)  gw {:7.1} GFLOP/s ({:.2}× f32)",
                    if threads == Threads::Single {
                        "1 thread"
                    } else {
                        "threads"
                    },
                    gflops(a),
                    base.0 / a,
                    gflops(b),
                    base.1 / b,
                );
            }
        }
    }
}

fn dtype_name(d: GgmlDType) -> &'static str {
    match d {
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q4K => "q4_k",
        _ => "quantized",
    }
}

/// candle's quantized matmul (which rounds x to 8-bit blocks) against our dequantising `x·Wᵀ`:
/// time ratio and the largest difference relative to the largest output.
fn qmatmul_against_ours(
    q: &[(GgmlDType, Vec<u8>)],
    t: &Tensor,
    x: &[f32],
    (m, n, k): (usize, usize, usize),
) {
    let xt = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
    for (d, bytes) in q {
        let values = WeightValues::Quantized { dtype: *d, bytes };
        let w = WeightMatrix::new("t", "w", values, n, k).unwrap();
        let mut y = vec![0f32; m * n];
        let ours = time(Threads::Candle, || {
            w.xwt("t", &mut y, x, m, 0..n, false, Threads::Candle)
                .unwrap()
        });
        let qm = QMatMul::from_qtensor(QTensor::quantize(t, *d).unwrap()).unwrap();
        let theirs = time(Threads::Candle, || {
            qm.forward(&xt).unwrap();
        });
        let yq: Vec<f32> = qm
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = y.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = y
            .iter()
            .zip(&yq)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        eprintln!(
            "qmatmul m={m} n={n} k={k} {:>5}: ours/candle time {:.2} (>1: candle faster), max diff {:.1e} of max |y|",
            dtype_name(*d),
            ours / theirs,
            diff / scale
        );
    }
}
