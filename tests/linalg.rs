//! `candle_peft::linalg` against closed-form identities: reconstruction, orthonormality, the
//! pivoting and sign conventions, solve/inverse residuals, and the randomised truncated SVD
//! against the exact one.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_peft::linalg::{
    self, Precision, RankRule, SvdMethod, TruncatedSvdOptions, canonicalize_svd_signs,
    rank_for_energy,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_matrix(seed: u64, m: usize, n: usize) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..m * n)
        .map(|_| 2.0 * rng.random::<f64>() - 1.0)
        .collect();
    Tensor::from_vec(v, (m, n), &Device::Cpu).unwrap()
}

fn to_f64(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (to_f64(a) - to_f64(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f64 {
    to_f64(a)
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    to_f64(t).to_vec1::<f64>().unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    to_f64(t).to_vec2::<f64>().unwrap()
}

fn eye(n: usize) -> Tensor {
    Tensor::eye(n, DType::F64, &Device::Cpu).unwrap()
}

/// `U diag(s) Vᵀ`.
fn usvt(u: &Tensor, s: &Tensor, v: &Tensor) -> Tensor {
    let u = to_f64(u);
    let k = s.dim(0).unwrap();
    let us = u
        .broadcast_mul(&to_f64(s).reshape((1, k)).unwrap())
        .unwrap();
    us.matmul(&to_f64(v).t().unwrap()).unwrap()
}

fn gram(q: &Tensor) -> Tensor {
    let q = to_f64(q);
    q.t().unwrap().matmul(&q).unwrap()
}

/// Checks the sign rule: in every column of `u`, the first entry of largest magnitude is > 0.
fn assert_canonical(u: &Tensor) {
    let r = rows(u);
    for j in 0..u.dim(1).unwrap() {
        let col: Vec<f64> = r.iter().map(|row| row[j]).collect();
        let m = col.iter().fold(0f64, |m, v| m.max(v.abs()));
        let first = col.iter().find(|v| v.abs() == m).unwrap();
        assert!(*first > 0.0, "column {j} is not canonical: {col:?}");
    }
}

#[test]
fn thin_svd_reconstructs_with_orthonormal_factors_and_sorted_values() {
    for &(m, n) in &[(7, 4), (4, 7), (6, 6)] {
        let a = rand_matrix(1, m, n);
        let k = m.min(n);
        for (precision, tol) in [(Precision::F64, 1e-12), (Precision::F32, 1e-5)] {
            let svd = linalg::thin_svd(&a, precision).unwrap();
            assert_eq!(svd.u.dtype(), precision.dtype());
            assert_eq!(svd.u.dims(), &[m, k]);
            assert_eq!(svd.s.dims(), &[k]);
            assert_eq!(svd.v.dims(), &[n, k]);
            let recon = usvt(&svd.u, &svd.s, &svd.v);
            assert!(max_abs_diff(&recon, &a) < tol, "{m}x{n} {precision:?}");
            assert!(max_abs_diff(&gram(&svd.u), &eye(k)) < tol);
            assert!(max_abs_diff(&gram(&svd.v), &eye(k)) < tol);
            let s = vec1(&svd.s);
            assert!(
                s.windows(2).all(|w| w[0] >= w[1]) && s[k - 1] >= 0.0,
                "{s:?}"
            );
            assert_canonical(&svd.u);
            // The singular values alone agree with the full decomposition.
            let only = linalg::singular_values(&a, precision).unwrap();
            assert!(max_abs_diff(&only, &svd.s) < tol);
        }
    }
}

#[test]
fn svd_sign_rule_is_restored_after_flipping_pairs() {
    let a = rand_matrix(2, 6, 5);
    let svd = linalg::thin_svd(&a, Precision::F64).unwrap();
    // Flip pairs 1 and 3: the product is unchanged, the factors are not canonical any more.
    let signs = Tensor::new(&[[1f64, -1.0, 1.0, -1.0, 1.0]], &Device::Cpu).unwrap();
    let u = svd.u.broadcast_mul(&signs).unwrap();
    let v = svd.v.broadcast_mul(&signs).unwrap();
    assert!(max_abs_diff(&usvt(&u, &svd.s, &v), &a) < 1e-12);
    assert!(max_abs_diff(&u, &svd.u) > 0.1);
    let (u2, v2) = canonicalize_svd_signs(&u, &v).unwrap();
    assert_eq!(max_abs_diff(&u2, &svd.u), 0.0);
    assert_eq!(max_abs_diff(&v2, &svd.v), 0.0);
    // The SVD of −A has the same U with V negated (σ ≥ 0 is unchanged).
    let neg = linalg::thin_svd(&a.neg().unwrap(), Precision::F64).unwrap();
    assert!(max_abs_diff(&neg.u, &svd.u) < 1e-12);
    assert!(max_abs_diff(&neg.v, &svd.v.neg().unwrap()) < 1e-12);
}

#[test]
fn lu_follows_the_torch_convention_with_max_magnitude_pivots() {
    // Hand-worked: pivot row 1 (|3| > |1|), L = [[1, 0], [1/3, 1]], U = [[3, 4], [0, 2/3]].
    let a = Tensor::new(&[[1f64, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let lu = linalg::lu(&a, Precision::F64).unwrap();
    assert_eq!(lu.perm, vec![1, 0]);
    let l = Tensor::new(&[[1f64, 0.0], [1.0 / 3.0, 1.0]], &Device::Cpu).unwrap();
    let u = Tensor::new(&[[3f64, 4.0], [0.0, 2.0 / 3.0]], &Device::Cpu).unwrap();
    assert!(max_abs_diff(&lu.l, &l) < 1e-15);
    assert!(max_abs_diff(&lu.u, &u) < 1e-15);

    for &(m, n) in &[(6, 6), (8, 5), (5, 8)] {
        let a = rand_matrix(3, m, n);
        let k = m.min(n);
        let lu = linalg::lu(&a, Precision::F64).unwrap();
        assert_eq!(lu.l.dims(), &[m, k]);
        assert_eq!(lu.u.dims(), &[k, n]);
        // A[perm[i], :] = (L U)[i, :]
        let idx = Tensor::new(lu.perm.as_slice(), &Device::Cpu).unwrap();
        let permuted = a.index_select(&idx, 0).unwrap();
        let prod = lu.l.matmul(&lu.u).unwrap();
        assert!(max_abs_diff(&prod, &permuted) < 1e-12, "{m}x{n}");
        let (l, u) = (rows(&lu.l), rows(&lu.u));
        for (i, row) in l.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                match i.cmp(&j) {
                    std::cmp::Ordering::Less => assert_eq!(v, 0.0),
                    std::cmp::Ordering::Equal => assert_eq!(v, 1.0),
                    // Partial pivoting: every multiplier is at most 1 in magnitude.
                    std::cmp::Ordering::Greater => assert!(v.abs() <= 1.0 + 1e-15),
                }
            }
        }
        for (i, row) in u.iter().enumerate() {
            assert!(row[..i].iter().all(|&v| v == 0.0));
        }
        let mut sorted = lu.perm.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..m as u32).collect::<Vec<_>>());
    }
}

#[test]
fn qr_is_orthonormal_times_upper_with_nonnegative_diagonal() {
    for &(m, n) in &[(7, 4), (4, 7)] {
        let a = rand_matrix(4, m, n);
        let k = m.min(n);
        let qr = linalg::qr(&a, Precision::F64).unwrap();
        assert_eq!(qr.q.dims(), &[m, k]);
        assert_eq!(qr.r.dims(), &[k, n]);
        assert!(max_abs_diff(&qr.q.matmul(&qr.r).unwrap(), &a) < 1e-12);
        assert!(max_abs_diff(&gram(&qr.q), &eye(k)) < 1e-12);
        for (i, row) in rows(&qr.r).iter().enumerate() {
            assert!(row[..i].iter().all(|&v| v.abs() < 1e-14));
            assert!(row[i] >= 0.0);
        }
    }
}

#[test]
fn symmetric_eigen_diagonalises_with_descending_values() {
    let b = rand_matrix(5, 6, 6);
    let a = (b.matmul(&b.t().unwrap()).unwrap() - eye(6).affine(2.0, 0.0).unwrap()).unwrap();
    let evd = linalg::symmetric_eigen(&a, Precision::F64).unwrap();
    let q = &evd.vectors;
    let lhs = a.matmul(q).unwrap();
    let rhs = q
        .broadcast_mul(&evd.values.reshape((1, 6)).unwrap())
        .unwrap();
    assert!(max_abs_diff(&lhs, &rhs) < 1e-12);
    assert!(max_abs_diff(&gram(q), &eye(6)) < 1e-12);
    let values = vec1(&evd.values);
    assert!(values.windows(2).all(|w| w[0] >= w[1]), "{values:?}");
    // Negative eigenvalues exist (A = BBᵀ − 2I), and the trace is their sum.
    assert!(values[5] < 0.0);
    let trace: f64 = (0..6).map(|i| rows(&a)[i][i]).sum();
    assert!((values.iter().sum::<f64>() - trace).abs() < 1e-12);
    assert_canonical(q);
}

#[test]
fn solve_and_inverse_have_small_residuals_and_refuse_singular_matrices() {
    let a = rand_matrix(6, 5, 5);
    let b = rand_matrix(7, 5, 3);
    for (precision, tol) in [(Precision::F64, 1e-12), (Precision::F32, 1e-4)] {
        let x = linalg::solve(&a, &b, precision).unwrap();
        assert!(max_abs_diff(&a.matmul(&to_f64(&x)).unwrap(), &b) < tol);
        let inv = linalg::inverse(&a, precision).unwrap();
        assert!(max_abs_diff(&a.matmul(&to_f64(&inv)).unwrap(), &eye(5)) < tol);
    }
    let rhs = Tensor::new(&[1f64, 2.0, 3.0, 4.0, 5.0], &Device::Cpu).unwrap();
    let x = linalg::solve(&a, &rhs, Precision::F64).unwrap();
    assert_eq!(x.dims(), &[5]);
    let back = a
        .matmul(&x.reshape((5, 1)).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap();
    assert!(max_abs_diff(&back, &rhs) < 1e-12);

    let singular = Tensor::new(&[[1f64, 2.0], [2.0, 4.0]], &Device::Cpu).unwrap();
    let err = linalg::inverse(&singular, Precision::F64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("singular"), "{err}");
    let err = linalg::solve(&singular, &singular, Precision::F64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("singular"), "{err}");
}

#[test]
fn non_finite_input_is_an_error_naming_the_entry() {
    let mut v = vec![1f32; 12];
    v[7] = f32::NAN;
    let a = Tensor::from_vec(v, (3, 4), &Device::Cpu).unwrap();
    for err in [
        linalg::thin_svd(&a, Precision::F32).unwrap_err(),
        linalg::lu(&a, Precision::F64).unwrap_err(),
        linalg::qr(&a, Precision::F64).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            msg.contains("non-finite") && msg.contains("row 1, column 3"),
            "{msg}"
        );
    }
}

#[test]
fn results_keep_the_input_device_and_the_requested_precision() {
    let a = rand_matrix(8, 4, 3).to_dtype(DType::F32).unwrap();
    let svd = linalg::thin_svd(&a, Precision::F64).unwrap();
    assert_eq!(svd.u.dtype(), DType::F64);
    assert!(svd.u.device().same_device(a.device()));
    let lu = linalg::lu(&a, Precision::F32).unwrap();
    assert_eq!(lu.l.dtype(), DType::F32);
}

#[test]
fn rank_for_energy_is_the_smallest_rank_reaching_the_share() {
    let s = [3.0, 2.0, 1.0, 0.0];
    let total = 14.0;
    assert_eq!(rank_for_energy(&s, total, 9.0 / 14.0), 1);
    assert_eq!(rank_for_energy(&s, total, 9.5 / 14.0), 2);
    assert_eq!(rank_for_energy(&s, total, 13.0 / 14.0), 2);
    assert_eq!(rank_for_energy(&s, total, 13.5 / 14.0), 3);
    // Energy 1 stops at the last non-zero singular value.
    assert_eq!(rank_for_energy(&s, total, 1.0), 3);
    let a = rand_matrix(9, 10, 8);
    let top = linalg::top_svd(&a, RankRule::Energy(0.9), &TruncatedSvdOptions::default()).unwrap();
    let all = vec1(&linalg::singular_values(&a, Precision::F64).unwrap());
    let total: f64 = all.iter().map(|v| v * v).sum();
    let r = top.s.dim(0).unwrap();
    assert_eq!(r, rank_for_energy(&all, total, 0.9));
    let kept: f64 = all[..r].iter().map(|v| v * v).sum();
    let short: f64 = all[..r - 1].iter().map(|v| v * v).sum();
    assert!(kept >= 0.9 * total && short < 0.9 * total);
}

/// A `m × n` matrix with singular values `s` and random orthonormal bases.
fn with_spectrum(seed: u64, m: usize, n: usize, s: &[f64]) -> Tensor {
    let k = s.len();
    let qu = linalg::qr(&rand_matrix(seed, m, k), Precision::F64)
        .unwrap()
        .q;
    let qv = linalg::qr(&rand_matrix(seed + 1, n, k), Precision::F64)
        .unwrap()
        .q;
    let s = Tensor::new(s, &Device::Cpu).unwrap();
    usvt(&qu, &s, &qv)
}

/// Cosines of the principal angles between the column spans of `a` and `b` (orthonormal).
fn principal_cosines(a: &Tensor, b: &Tensor) -> Vec<f64> {
    let m = to_f64(a).t().unwrap().matmul(&to_f64(b)).unwrap();
    vec1(&linalg::singular_values(&m, Precision::F64).unwrap())
}

#[test]
fn randomized_truncated_svd_matches_the_exact_top_triplets() {
    // A decaying spectrum with a flat tail, the shape of a trained weight's.
    let (m, n, k) = (300, 200, 200);
    let s: Vec<f64> = (0..k)
        .map(|i| 10.0 * (-(i as f64) / 8.0).exp() + 0.05)
        .collect();
    let a = with_spectrum(10, m, n, &s);
    let r = 12;
    let opts = TruncatedSvdOptions::default();
    assert!(((2 * r) as f64) <= k as f64 * opts.max_fraction);
    let approx = linalg::truncated_svd(&a, r, &opts).unwrap();
    assert!(
        matches!(approx.method, SvdMethod::Randomized { .. }),
        "{:?}",
        approx.method
    );
    let exact = linalg::thin_svd(&a, Precision::F64).unwrap();
    let (sa, se) = (vec1(&approx.s), vec1(&exact.s));
    for i in 0..r {
        let rel = (sa[i] - se[i]).abs() / se[i];
        assert!(rel < 1e-8, "σ_{i}: {} vs {} (rel {rel:e})", sa[i], se[i]);
        assert!(
            sa[i] <= se[i] * (1.0 + 1e-12),
            "randomised σ exceeds the exact one"
        );
    }
    assert!(max_abs_diff(&gram(&approx.u), &eye(r)) < 1e-12);
    assert!(max_abs_diff(&gram(&approx.v), &eye(r)) < 1e-12);
    // Same subspaces, and the same vectors once both carry canonical signs.
    let eu = exact.u.narrow(1, 0, r).unwrap();
    let ev = exact.v.narrow(1, 0, r).unwrap();
    for c in principal_cosines(&approx.u, &eu)
        .into_iter()
        .chain(principal_cosines(&approx.v, &ev))
    {
        assert!(c > 1.0 - 1e-8, "principal cosine {c}");
    }
    assert!(max_abs_diff(&approx.u, &eu) < 1e-3);
    assert!(max_abs_diff(&approx.v, &ev) < 1e-3);
    // Deterministic: the seed fixes the test matrix.
    let again = linalg::truncated_svd(&a, r, &opts).unwrap();
    assert_eq!(max_abs_diff(&again.u, &approx.u), 0.0);
    // A rank above the randomised range falls back to the exact SVD.
    let big = linalg::truncated_svd(&a, 150, &opts).unwrap();
    assert_eq!(big.method, SvdMethod::Exact);
    assert!(max_abs_diff(&big.s, &exact.s.narrow(0, 0, 150).unwrap()) < 1e-12);
    assert!(max_abs(&big.u) > 0.0);
}

#[test]
fn truncated_svd_rejects_a_rank_above_min_dims() {
    let a = rand_matrix(11, 5, 3);
    let err = linalg::truncated_svd(&a, 4, &TruncatedSvdOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 4"), "{err}");
}

#[test]
fn top_svd_through_the_gram_matrix_matches_the_exact_svd() {
    // f64 takes the Gram route for an energy rule and for large fixed ranks; compare with the
    // exact thin SVD on tall and wide matrices with a decaying spectrum.
    for &(m, n) in &[(60, 40), (40, 60)] {
        let s: Vec<f64> = (0..40).map(|i| 5.0 * (-(i as f64) / 10.0).exp()).collect();
        let a = with_spectrum(20, m, n, &s);
        let exact = linalg::thin_svd(&a, Precision::F64).unwrap();
        let opts = TruncatedSvdOptions::default();
        for rule in [RankRule::Energy(0.99), RankRule::Fixed(30)] {
            let top = linalg::top_svd(&a, rule, &opts).unwrap();
            assert_eq!(top.method, SvdMethod::Gram);
            let r = top.s.dim(0).unwrap();
            if let RankRule::Energy(e) = rule {
                assert_eq!(r, rank_for_energy(&s, s.iter().map(|v| v * v).sum(), e));
            }
            assert!(max_abs_diff(&top.s, &exact.s.narrow(0, 0, r).unwrap()) < 1e-12);
            assert!(max_abs_diff(&top.u, &exact.u.narrow(1, 0, r).unwrap()) < 1e-9);
            assert!(max_abs_diff(&top.v, &exact.v.narrow(1, 0, r).unwrap()) < 1e-9);
            assert!(max_abs_diff(&gram(&top.v), &eye(r)) < 1e-9);
            assert_canonical(&top.u);
        }
    }
    // Rank deficient: the kept σ would include zeros, so the exact SVD is used; the factors
    // stay orthonormal.
    let a = with_spectrum(21, 30, 20, &[3.0, 2.0, 1.0]);
    let top = linalg::top_svd(&a, RankRule::Fixed(10), &TruncatedSvdOptions::default()).unwrap();
    assert_eq!(top.method, SvdMethod::Exact);
    assert!(max_abs_diff(&gram(&top.u), &eye(10)) < 1e-12);
    assert!(max_abs_diff(&gram(&top.v), &eye(10)) < 1e-12);
    assert!(max_abs_diff(&usvt(&top.u, &top.s, &top.v), &a) < 1e-12);
    // f32 takes the exact thin SVD.
    let f32_top = linalg::top_svd(
        &a,
        RankRule::Energy(0.9999),
        &TruncatedSvdOptions {
            precision: Precision::F32,
            ..TruncatedSvdOptions::default()
        },
    )
    .unwrap();
    assert_eq!(f32_top.s.dim(0).unwrap(), 3);
    assert_eq!(f32_top.s.dtype(), DType::F32);
}

/// One projection matrix of SmolLM2 (the benchmark's matrices), dequantised to f32.
fn smollm2_matrix(name: &str) -> Tensor {
    let path = common::smollm2_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    content
        .tensor(&mut file, name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn fast_top_svd_is_accurate_on_smollm2_matrices() {
    // The benchmark's matrices: the Gram route (energy 0.99, f64) and the truncated SVD (fixed
    // rank 16: randomised where it converges, exact otherwise) against the exact f64 thin SVD.
    for name in [
        "blk.0.attn_q.weight",
        "blk.3.ffn_down.weight",
        "blk.7.attn_k.weight",
    ] {
        let a = smollm2_matrix(name);
        let exact = linalg::thin_svd(&a, Precision::F64).unwrap();
        let se = vec1(&exact.s);
        let opts = TruncatedSvdOptions::default();

        let top = linalg::top_svd(&a, RankRule::Energy(0.99), &opts).unwrap();
        assert_eq!(top.method, SvdMethod::Gram);
        let r = top.s.dim(0).unwrap();
        let total: f64 = se.iter().map(|v| v * v).sum();
        assert_eq!(r, rank_for_energy(&se, total, 0.99), "{name}");
        let worst = vec1(&top.s)
            .iter()
            .zip(&se)
            .map(|(a, e)| (a - e).abs() / e)
            .fold(0f64, f64::max);
        assert!(worst < 1e-9, "{name}: σ relative error {worst:e}");
        let du = max_abs_diff(&top.u, &exact.u.narrow(1, 0, r).unwrap());
        let dv = max_abs_diff(&top.v, &exact.v.narrow(1, 0, r).unwrap());
        println!("{name}: r = {r}, σ rel err {worst:e}, |ΔU| {du:e}, |ΔV| {dv:e}");
        assert!(du < 1e-6 && dv < 1e-6, "{name}: |ΔU| {du:e}, |ΔV| {dv:e}");

        let r = 16;
        let approx = linalg::truncated_svd(&a, r, &opts).unwrap();
        println!("{name}: truncated r = {r} by {:?}", approx.method);
        if name == "blk.0.attn_q.weight" {
            assert!(
                matches!(approx.method, SvdMethod::Randomized { .. }),
                "{:?}",
                approx.method
            );
        }
        let worst = vec1(&approx.s)
            .iter()
            .zip(&se)
            .map(|(a, e)| (e - a) / e)
            .fold(0f64, f64::max);
        let cos = principal_cosines(&approx.u, &exact.u.narrow(1, 0, r).unwrap());
        let min_cos = cos.iter().copied().fold(1f64, f64::min);
        println!("{name}: σ rel err {worst:e}, min principal cosine {min_cos}");
        assert!(worst < 1e-8, "{name}: truncated σ relative error {worst:e}");
        assert!(
            min_cos > 1.0 - 1e-8,
            "{name}: truncated subspace cosine {min_cos}"
        );
    }
}
