//! The CPU kernels of the fused element-wise ops (`candle_peft::ops::{norm, gelu_erf,
//! masked_softmax, cross_entropy_rows}` and the Llama SwiGLU) against the same math in plain
//! candle ops evaluated in f64: values and input gradients, on shapes whose rows are not a
//! multiple of the SIMD width and with enough rows for rayon to split the work.

mod common;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_peft::ops::swiglu;
use candle_peft::ops::{NormKind, cross_entropy_rows, gelu_erf, masked_softmax, norm};
use common::grad::value_and_grad;
use common::tensors::random;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a − b| / (1 + |b|)`: relative error for large values, absolute for small ones.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (flat(a), flat(b));
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            assert!(x.is_finite() && y.is_finite(), "{x} vs {y}");
            (x - y).abs() / (1.0 + y.abs())
        })
        .fold(0.0, f64::max)
}

/// Layer norm or RMS norm in plain f64 candle ops.
fn norm_reference(
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f64,
    kind: NormKind,
) -> Tensor {
    let centered = match kind {
        NormKind::LayerNorm => x
            .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
            .unwrap(),
        NormKind::RmsNorm => x.clone(),
    };
    let r = (centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    let y = centered
        .broadcast_mul(&r)
        .unwrap()
        .broadcast_mul(&gamma.to_dtype(DType::F64).unwrap())
        .unwrap();
    match beta {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F64).unwrap()).unwrap(),
        None => y,
    }
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

/// Shapes: a row shorter than 8, rows that are not a multiple of 8, and more rows than one
/// rayon task takes (64), so that the row loop splits.
const NORM_SHAPES: [&[usize]; 4] = [&[3, 5], &[2, 7, 13], &[200, 37], &[130, 576]];

#[test]
fn norm_kernels_match_the_plain_ops_in_value_and_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for shape in NORM_SHAPES {
        let dim = *shape.last().unwrap();
        // An offset mean makes the layer norm's centring matter.
        let x = (random(&mut rng, shape, 2.0) + 0.7).unwrap();
        let c = random(&mut rng, shape, 1.0);
        let gamma = (random(&mut rng, &[dim], 0.5) + 1.0).unwrap();
        let beta = random(&mut rng, &[dim], 0.3);
        for (kind, beta) in [
            (NormKind::LayerNorm, Some(&beta)),
            (NormKind::RmsNorm, None),
        ] {
            let eps = 1e-5;
            let (y, dx) = value_and_grad(&x, &c, |x| norm(x, &gamma, beta, eps, kind).unwrap());
            let (y_ref, dx_ref) = value_and_grad(&f64_of(&x), &c, |x| {
                norm_reference(x, &gamma, beta, eps, kind)
            });
            assert_eq!(y.dtype(), DType::F32);
            assert_eq!(dx.dtype(), DType::F32);
            let (ey, edx) = (rel_err(&y, &y_ref), rel_err(&dx, &dx_ref));
            assert!(ey < 2e-6, "{kind:?} {shape:?}: value differs by {ey}");
            assert!(edx < 2e-5, "{kind:?} {shape:?}: gradient differs by {edx}");
        }
    }
}

#[test]
fn norm_gradient_matches_finite_differences() {
    // In f64 the op still computes in f32, so the step is large enough for f32 rounding of the
    // loss (~1e-7 relative) to stay well below the truncation error of central differences.
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (rows, dim) = (3, 11);
    let x = f64_of(&(random(&mut rng, &[rows, dim], 1.5) + 0.4).unwrap());
    let c = f64_of(&random(&mut rng, &[rows, dim], 1.0));
    let gamma = (random(&mut rng, &[dim], 0.5) + 1.0).unwrap();
    let beta = random(&mut rng, &[dim], 0.3);
    for (kind, beta) in [
        (NormKind::LayerNorm, Some(&beta)),
        (NormKind::RmsNorm, None),
    ] {
        let loss = |x: &Tensor| -> f64 {
            let y = norm(x, &gamma, beta, 1e-6, kind).unwrap();
            (y * &c).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let (_, dx) = value_and_grad(&x, &c, |x| norm(x, &gamma, beta, 1e-6, kind).unwrap());
        assert_eq!(dx.dtype(), DType::F64);
        let dx = flat(&dx);
        let xs = flat(&x);
        let h = 1e-2;
        for i in [0, 5, dim + 3, 2 * dim + 10] {
            let mut plus = xs.clone();
            plus[i] += h;
            let mut minus = xs.clone();
            minus[i] -= h;
            let at = |v: Vec<f64>| loss(&Tensor::from_vec(v, (rows, dim), &Device::Cpu).unwrap());
            let fd = (at(plus) - at(minus)) / (2.0 * h);
            assert!(
                (fd - dx[i]).abs() < 2e-4 * (1.0 + fd.abs()),
                "{kind:?} element {i}: finite difference {fd}, gradient {}",
                dx[i]
            );
        }
    }
}

#[test]
fn norm_on_strided_gradient_and_f16() {
    // A transposed upstream gradient reaches the backward kernel non-contiguous; f16 goes
    // through f32 and back.
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let x = random(&mut rng, &[70, 24], 1.0);
    let gamma = (random(&mut rng, &[24], 0.5) + 1.0).unwrap();
    let c_t = random(&mut rng, &[24, 70], 1.0);
    let var = Var::from_tensor(&x).unwrap();
    let y = norm(var.as_tensor(), &gamma, None, 1e-5, NormKind::RmsNorm).unwrap();
    let loss = y.t().unwrap().mul(&c_t).unwrap().sum_all().unwrap();
    let dx = loss
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .clone();
    let c = c_t.t().unwrap().contiguous().unwrap();
    let (_, dx_ref) = value_and_grad(&f64_of(&x), &c, |x| {
        norm_reference(x, &gamma, None, 1e-5, NormKind::RmsNorm)
    });
    assert!(rel_err(&dx, &dx_ref) < 2e-5);

    let x16 = x.to_dtype(DType::F16).unwrap();
    let (y16, dx16) = value_and_grad(&x16, &c, |x| {
        norm(x, &gamma, None, 1e-5, NormKind::RmsNorm).unwrap()
    });
    assert_eq!((y16.dtype(), dx16.dtype()), (DType::F16, DType::F16));
    let (y_ref, dx_ref) = value_and_grad(&f64_of(&x16), &c.to_dtype(DType::F16).unwrap(), |x| {
        norm_reference(x, &gamma, None, 1e-5, NormKind::RmsNorm)
    });
    assert!(rel_err(&y16, &y_ref) < 2e-3);
    assert!(rel_err(&dx16, &dx_ref) < 5e-3);
}

/// `silu(g) ⊙ u` in f64 candle ops.
fn swiglu_reference(g: &Tensor, u: &Tensor) -> Tensor {
    (g.silu().unwrap() * u).unwrap()
}

#[test]
fn swiglu_kernel_matches_the_plain_ops_in_value_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // 300·129 elements: more than two rayon tasks of 16 Ki, and not a multiple of 8.
    for (shape, scale) in [
        (&[3usize, 5][..], 4.0),
        (&[2, 7, 13], 8.0),
        (&[300, 129], 6.0),
    ] {
        let mut gate = random(&mut rng, shape, scale);
        if shape[0] == 300 {
            // Saturated gates, where e^(−g) under- or overflows.
            let mut g = gate.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            g[..6].copy_from_slice(&[-100.0, -88.9, -87.0, 40.0, 88.9, 100.0]);
            gate = Tensor::from_vec(g, shape, &Device::Cpu).unwrap();
        }
        let up = random(&mut rng, shape, 2.0);
        let c = random(&mut rng, shape, 1.0);
        let (gv, uv) = (
            Var::from_tensor(&gate).unwrap(),
            Var::from_tensor(&up).unwrap(),
        );
        let y = swiglu(gv.as_tensor(), uv.as_tensor()).unwrap();
        let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let (gr, ur) = (
            Var::from_tensor(&f64_of(&gate)).unwrap(),
            Var::from_tensor(&f64_of(&up)).unwrap(),
        );
        let y_ref = swiglu_reference(gr.as_tensor(), ur.as_tensor());
        let grads_ref = (&y_ref * f64_of(&c))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let e = rel_err(&y, &y_ref);
        assert!(e < 1e-6, "{shape:?}: value differs by {e}");
        for (name, ours, theirs) in [
            (
                "gate",
                grads.get(gv.as_tensor()),
                grads_ref.get(gr.as_tensor()),
            ),
            (
                "up",
                grads.get(uv.as_tensor()),
                grads_ref.get(ur.as_tensor()),
            ),
        ] {
            let e = rel_err(ours.unwrap(), theirs.unwrap());
            assert!(e < 1e-6, "{shape:?}: d{name} differs by {e}");
        }
    }
}

#[test]
fn gelu_erf_kernel_matches_the_closed_form() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for shape in [&[5usize][..], &[3, 7, 13], &[200, 173]] {
        let x = random(&mut rng, shape, 6.0);
        let c = random(&mut rng, shape, 1.0);
        let (y, dx) = value_and_grad(&x, &c, |x| gelu_erf(x).unwrap());
        // y = x·Φ(x), dy/dx = Φ(x) + x·φ(x), in f64 with candle's erf.
        let x64 = f64_of(&x);
        let cdf = (((&x64 * std::f64::consts::FRAC_1_SQRT_2)
            .unwrap()
            .erf()
            .unwrap()
            + 1.0)
            .unwrap()
            * 0.5)
            .unwrap();
        let pdf = ((x64.sqr().unwrap() * -0.5).unwrap().exp().unwrap()
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))
            .unwrap();
        let y_ref = (&x64 * &cdf).unwrap();
        let dx_ref = ((cdf + (&x64 * pdf).unwrap()).unwrap() * f64_of(&c)).unwrap();
        let (ey, edx) = (rel_err(&y, &y_ref), rel_err(&dx, &dx_ref));
        // Abramowitz–Stegun's erf is good to 1.5e-7 absolute; |x| ≤ 6 scales that.
        assert!(ey < 1e-6, "{shape:?}: value differs by {ey}");
        assert!(edx < 2e-6, "{shape:?}: gradient differs by {edx}");
    }
}

#[test]
fn masked_softmax_kernel_matches_the_plain_ops() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    // [B, H, Tq, Tk] with Tk = 37 and B·H·Tq = 180 rows (> 64, so rayon splits).
    let (b, h, tq, tk) = (2, 3, 30, 37);
    let x = random(&mut rng, &[b, h, tq, tk], 5.0);
    let c = random(&mut rng, &[b, h, tq, tk], 1.0);
    // A causal mask with f32::MIN for batch 0, -1e9 for batch 1, whose query 0 sees nothing.
    let mut m = vec![0f32; b * tq * tk];
    for bi in 0..b {
        for q in 0..tq {
            for k in 0..tk {
                let hidden = k > q || (bi == 1 && q == 0);
                if hidden {
                    m[(bi * tq + q) * tk + k] = if bi == 0 { f32::MIN } else { -1e9 };
                }
            }
        }
    }
    let mask = Tensor::from_vec(m, (b, 1, tq, tk), &Device::Cpu).unwrap();
    let (y, dx) = value_and_grad(&x, &c, |x| masked_softmax(x, Some(&mask)).unwrap());
    // The reference adds the mask in f32 (as the op does) and runs the softmax in f64.
    let (y_ref, dx_ref) = value_and_grad(&x, &c, |x| {
        let s = f64_of(&x.broadcast_add(&mask).unwrap());
        candle_nn::ops::softmax(&s, D::Minus1).unwrap()
    });
    let (ey, edx) = (rel_err(&y, &y_ref), rel_err(&dx, &dx_ref));
    assert!(ey < 1e-6, "value differs by {ey}");
    assert!(edx < 1e-6, "gradient differs by {edx}");
    let row = flat(&y.get(1).unwrap().get(2).unwrap().get(0).unwrap());
    assert!(
        row.iter().all(|&p| (p - 1.0 / tk as f64).abs() < 1e-7),
        "{row:?}"
    );

    let (y, _) = value_and_grad(&x, &c, |x| masked_softmax(x, None).unwrap());
    let y_ref = candle_nn::ops::softmax(&f64_of(&x), D::Minus1).unwrap();
    assert!(rel_err(&y, &y_ref) < 1e-6);
}

#[test]
fn cross_entropy_kernel_matches_the_plain_ops_with_extreme_logits() {
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    let (n, v) = (70, 1003);
    let mut logits = random(&mut rng, &[n, v], 8.0)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let targets: Vec<u32> = (0..n).map(|i| ((i * 131 + 7) % v) as u32).collect();
    // Row 0: one huge logit elsewhere, so the target's probability underflows (loss 1e4).
    logits[5] = 1e4;
    // Row 1: the target dominates (loss ≈ 0).
    logits[v + targets[1] as usize] = 500.0;
    // Row 2: everything very negative.
    for l in &mut logits[2 * v..3 * v] {
        *l -= 3e4;
    }
    // Row 3: a large spread of values well past exp's range.
    for (j, l) in logits[3 * v..4 * v].iter_mut().enumerate() {
        *l = (j as f32 - 500.0) * 0.9;
    }
    let x = Tensor::from_vec(logits, (n, v), &Device::Cpu).unwrap();
    let c = random(&mut rng, &[n], 1.0);
    let (rows, dx) = value_and_grad(&x, &c, |x| cross_entropy_rows(x, &targets).unwrap());
    let t = Tensor::new(targets.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let (rows_ref, dx_ref) = value_and_grad(&f64_of(&x), &c, |x| {
        let lsm = candle_nn::ops::log_softmax(x, D::Minus1).unwrap();
        lsm.gather(&t, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap()
    });
    // Row 0's loss is 1e4 − x[t] up to e^(x − 1e4) terms, far below f32's resolution.
    let x0t = flat(&x)[targets[0] as usize];
    assert!(
        (flat(&rows)[0] - (1e4 - x0t)).abs() < 1e-2,
        "{}",
        flat(&rows)[0]
    );
    // `lse − x[t]` is rounded to f32 at the scale of the row's largest logit (3e4 in row 2).
    let scale = flat(&x.abs().unwrap().max_keepdim(1).unwrap());
    let ulp = |i: usize| 2.0 * f64::from(f32::EPSILON) * scale[i];
    for (i, (a, b)) in flat(&rows).iter().zip(flat(&rows_ref)).enumerate() {
        let tol = 1e-6 * (1.0 + b.abs()) + ulp(i);
        assert!((a - b).abs() <= tol, "row {i}: loss {a} vs {b}");
    }
    // The gradient e^(x − lse) inherits lse's rounding as a relative error.
    for (k, (a, b)) in flat(&dx).iter().zip(flat(&dx_ref)).enumerate() {
        let tol = 1e-7 + b.abs() * (1e-6 + 2.0 * ulp(k / v));
        assert!(
            (a - b).abs() <= tol,
            "row {}, class {}: {a} vs {b}",
            k / v,
            k % v
        );
    }
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> std::time::Duration {
    (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Micro-timings (ignored): `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=2 cargo test --release
/// --test fused_ops_fast timings -- --ignored --nocapture`.
#[test]
#[ignore]
fn timings() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let x = random(&mut rng, &[512, 576], 1.0);
    let c = random(&mut rng, &[512, 576], 1.0);
    let gamma = (random(&mut rng, &[576], 0.5) + 1.0).unwrap();
    let var = Var::from_tensor(&x).unwrap();
    let reps = 50;
    let fwd = best_of(reps, || {
        norm(var.as_tensor(), &gamma, None, 1e-5, NormKind::RmsNorm).unwrap()
    });
    let y = norm(var.as_tensor(), &gamma, None, 1e-5, NormKind::RmsNorm).unwrap();
    let loss = (&y * &c).unwrap().sum_all().unwrap();
    let bwd = best_of(reps, || loss.backward().unwrap());
    // The same backward through `x ⊙ 1` instead of the norm: the glue `Σ y ⊙ c` costs.
    let glue_y = (var.as_tensor() * 1.0).unwrap();
    let glue = (&glue_y * &c).unwrap().sum_all().unwrap();
    let glue_bwd = best_of(reps, || glue.backward().unwrap());
    println!(
        "RmsNorm [512, 576]: forward {fwd:?}, backward of Σ y⊙c {bwd:?} (glue alone {glue_bwd:?})"
    );
    let y = norm(
        var.as_tensor(),
        &gamma,
        Some(&gamma),
        1e-5,
        NormKind::LayerNorm,
    )
    .unwrap();
    let loss = (&y * &c).unwrap().sum_all().unwrap();
    let bwd = best_of(reps, || loss.backward().unwrap());
    println!("LayerNorm [512, 576]: backward of Σ y⊙c {bwd:?}");

    let gate = random(&mut rng, &[512, 1536], 4.0);
    let up = random(&mut rng, &[512, 1536], 1.0);
    let c = random(&mut rng, &[512, 1536], 1.0);
    let (gv, uv) = (
        Var::from_tensor(&gate).unwrap(),
        Var::from_tensor(&up).unwrap(),
    );
    let fwd = best_of(reps, || swiglu(gv.as_tensor(), uv.as_tensor()).unwrap());
    let y = swiglu(gv.as_tensor(), uv.as_tensor()).unwrap();
    let loss = (&y * &c).unwrap().sum_all().unwrap();
    let bwd = best_of(reps, || loss.backward().unwrap());
    let glue_y = (gv.as_tensor() * uv.as_tensor()).unwrap();
    let glue = (&glue_y * &c).unwrap().sum_all().unwrap();
    let glue_bwd = best_of(reps, || glue.backward().unwrap());
    println!(
        "SwiGLU [512, 1536]: forward {fwd:?}, backward of Σ y⊙c {bwd:?} (glue g⊙u alone {glue_bwd:?})"
    );

    let x = random(&mut rng, &[512, 1536], 4.0);
    let fwd = best_of(reps, || gelu_erf(&x).unwrap());
    println!("GeluErf [512, 1536]: forward {fwd:?}");

    let logits = random(&mut rng, &[512, 49152], 5.0);
    let targets: Vec<u32> = (0..512).map(|i| (i * 97 % 49152) as u32).collect();
    let lv = Var::from_tensor(&logits).unwrap();
    let fwd = best_of(5, || cross_entropy_rows(lv.as_tensor(), &targets).unwrap());
    let loss = cross_entropy_rows(lv.as_tensor(), &targets)
        .unwrap()
        .mean_all()
        .unwrap();
    let bwd = best_of(5, || loss.backward().unwrap());
    println!("cross_entropy_rows [512, 49152]: forward {fwd:?}, backward of mean {bwd:?}");

    let s = random(&mut rng, &[4, 9, 128, 128], 5.0);
    let fwd = best_of(reps, || masked_softmax(&s, None).unwrap());
    let sv = Var::from_tensor(&s).unwrap();
    let p = masked_softmax(sv.as_tensor(), None).unwrap();
    let cs = random(&mut rng, &[4, 9, 128, 128], 1.0);
    let loss = (&p * &cs).unwrap().sum_all().unwrap();
    let bwd = best_of(reps, || loss.backward().unwrap());
    println!("masked_softmax [4, 9, 128, 128]: forward {fwd:?}, backward of Σ y⊙c {bwd:?}");
}
