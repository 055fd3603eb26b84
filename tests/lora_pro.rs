//! LoRA-Pro: the identities of methods-a §1(h) in f64 on random matrices, per-layer scaling
//! against a hand computation, full-FT equivalence at r = in, the trainer integration (exact
//! resume, gradient accumulation), and bad input.

mod common;

use std::cell::Cell;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_peft::adapter::{Adapter, Method};
use candle_peft::adapters::lora_pro::{
    LoraProFactors, SmallMatrix, solve_sylvester, symmetric_eigen,
};
use candle_peft::optim::{LoraPair, LoraPro, LoraProConfig, LoraProMode};
use candle_peft::train::{OPTIMIZER_FILE, OptimizerKind};
use candle_peft::{
    Conv2dParams, DEFAULT_ADAPTER, EvalReport, LoraConfig, PeftError, PeftModel, Schedule,
    TrainConfig, TrainTask, Trainer, Warmup,
};
use common::tiny as support;
use common::tiny::{
    Example, HIDDEN, TEACHER_TOKENS, Tiny, bits, flat, lora_random_b, rand_tensor, rng,
    single_conv, student_mse, teacher_examples, tiny_model,
};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// f64 helpers: random matrices, a dense inverse and dense solves independent of the library
// ---------------------------------------------------------------------------------------------

fn rand64(r: &mut ChaCha8Rng, rows: usize, cols: usize) -> Tensor {
    let v: Vec<f64> = (0..rows * cols)
        .map(|_| 2.0 * r.random::<f64>() - 1.0)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn max_abs64(t: &Tensor) -> f64 {
    vals(t).iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn diff64(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    vals(a)
        .iter()
        .zip(vals(b))
        .fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn mm(a: &Tensor, b: &Tensor) -> Tensor {
    a.matmul(b).unwrap()
}

fn tt(a: &Tensor) -> Tensor {
    a.t().unwrap().contiguous().unwrap()
}

fn eye(n: usize) -> Tensor {
    Tensor::eye(n, DType::F64, &Device::Cpu).unwrap()
}

/// Solves `M·X = R` by Gauss–Jordan elimination with partial pivoting (f64).
fn solve_dense(m: &[f64], n: usize, rhs: &[f64], k: usize) -> Vec<f64> {
    let mut a = m.to_vec();
    let mut x = rhs.to_vec();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .unwrap();
        assert!(a[piv * n + col].abs() > 1e-300, "singular matrix");
        for j in 0..n {
            a.swap(col * n + j, piv * n + j);
        }
        for j in 0..k {
            x.swap(col * k + j, piv * k + j);
        }
        let d = a[col * n + col];
        for j in 0..n {
            a[col * n + j] /= d;
        }
        for j in 0..k {
            x[col * k + j] /= d;
        }
        for i in 0..n {
            if i != col {
                let f = a[i * n + col];
                if f != 0.0 {
                    for j in 0..n {
                        a[i * n + j] -= f * a[col * n + j];
                    }
                    for j in 0..k {
                        x[i * k + j] -= f * x[col * k + j];
                    }
                }
            }
        }
    }
    x
}

fn inv(t: &Tensor) -> Tensor {
    let (n, _) = t.dims2().unwrap();
    let id = vals(&eye(n));
    Tensor::from_vec(solve_dense(&vals(t), n, &id, n), (n, n), &Device::Cpu).unwrap()
}

/// `X` with `P·X + X·Q = C`, from the dense r²×r² system `(P ⊗ I + I ⊗ Qᵀ)·vec(X) = vec(C)`
/// (row-major vec).
fn sylvester_dense(p: &Tensor, q: &Tensor, c: &Tensor) -> Tensor {
    let (r, k) = c.dims2().unwrap();
    let (pv, qv) = (vals(p), vals(q));
    let n = r * k;
    let mut big = vec![0.0; n * n];
    for i in 0..r {
        for j in 0..k {
            let row = i * k + j;
            for l in 0..r {
                big[row * n + l * k + j] += pv[i * r + l];
            }
            for l in 0..k {
                big[row * n + i * k + l] += qv[l * k + j];
            }
        }
    }
    Tensor::from_vec(solve_dense(&big, n, &vals(c), 1), (r, k), &Device::Cpu).unwrap()
}

fn small(m: &SmallMatrix) -> Tensor {
    m.to_tensor(DType::F64, &Device::Cpu).unwrap()
}

/// A random `(A [r,in], B [out,r], G [out,in])` in f64.
fn problem(seed: u64, out: usize, inp: usize, r: usize) -> (Tensor, Tensor, Tensor) {
    let mut g = rng(seed);
    (
        rand64(&mut g, r, inp),
        rand64(&mut g, out, r),
        rand64(&mut g, out, inp),
    )
}

/// `P_B·G + G·P_A − P_B·G·P_A` with dense inverses.
fn projected(a: &Tensor, b: &Tensor, g: &Tensor) -> Tensor {
    let pb = mm(&mm(b, &inv(&mm(&tt(b), b))), &tt(b));
    let pa = mm(&mm(&tt(a), &inv(&mm(a, &tt(a)))), a);
    let pbg = mm(&pb, g);
    ((&pbg + mm(g, &pa)).unwrap() - mm(&pbg, &pa)).unwrap()
}

/// `s·B·g^A + s·g^B·A`.
fn effective(a: &Tensor, b: &Tensor, s: f64, ga: &Tensor, gb: &Tensor) -> Tensor {
    ((mm(b, ga) + mm(gb, a)).unwrap() * s).unwrap()
}

const S: f64 = 2.0;

// ---------------------------------------------------------------------------------------------
// Identities (methods-a §1(h)), out = 12, in = 9, r = 3, s = 2
// ---------------------------------------------------------------------------------------------

#[test]
fn equivalent_gradient_is_the_tangent_projection_of_g() {
    let (a, b, g) = problem(1, 12, 9, 3);
    let f = LoraProFactors::new(&a, &b, S, 0.0).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    assert!(diff64(&ga, &(mm(&tt(&b), &g) * S).unwrap()) < 1e-14);
    let want = projected(&a, &b, &g);
    let scale = max_abs64(&want);
    let got = f.equivalent_gradient(&ga, &gb).unwrap();
    let err = diff64(&got, &want) / scale;
    println!("equivalent gradient vs P_B G + G P_A − P_B G P_A: rel err {err:.2e}");
    assert!(err < 1e-12, "rel err {err}");

    // The same through the adjusted gradients with X = 0.
    let (ga_adj, gb_adj) = f
        .adjusted_gradients(&ga, &gb, &SmallMatrix::zeros(3, 3))
        .unwrap();
    let err = diff64(&effective(&a, &b, S, &ga_adj, &gb_adj), &want) / scale;
    assert!(err < 1e-12, "projection identity with X = 0: rel err {err}");

    // g̃ is not G itself (r < min(out, in)): the test can tell them apart.
    assert!(diff64(&want, &g) > 0.1);
}

#[test]
fn equivalent_gradient_does_not_depend_on_x() {
    let (a, b, g) = problem(2, 12, 9, 3);
    let f = LoraProFactors::new(&a, &b, S, 0.0).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    let base = f.equivalent_gradient(&ga, &gb).unwrap();
    let mut r = rng(20);
    for trial in 0..4 {
        let x = SmallMatrix::from_vec(3, 3, vals(&(rand64(&mut r, 3, 3) * 5.0).unwrap())).unwrap();
        let (ga_adj, gb_adj) = f.adjusted_gradients(&ga, &gb, &x).unwrap();
        let err = diff64(&effective(&a, &b, S, &ga_adj, &gb_adj), &base) / max_abs64(&base);
        assert!(err < 1e-12, "trial {trial}: rel err {err}");
        // X does change the factors' gradients themselves.
        let (ga0, _) = f
            .adjusted_gradients(&ga, &gb, &SmallMatrix::zeros(3, 3))
            .unwrap();
        assert!(diff64(&ga_adj, &ga0) > 1e-3);
    }
}

#[test]
fn sylvester_x_solves_its_equation_and_minimises_the_distance_to_the_lora_gradients() {
    let (a, b, g) = problem(3, 12, 9, 3);
    let f = LoraProFactors::new(&a, &b, S, 0.0).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    let x = f.sylvester_x(&ga).unwrap();
    let btb = mm(&tt(&b), &b);
    let aat = mm(&a, &tt(&a));
    let c = (mm(&mm(&inv(&btb), &ga), &tt(&a)) * (-1.0 / (S * S))).unwrap();
    let xt = small(&x);
    let residual = diff64(&(mm(&btb, &xt) + mm(&xt, &aat)).unwrap(), &c);
    println!("Sylvester residual ‖BᵀB X + X AAᵀ − C‖∞ = {residual:.2e}");
    assert!(residual <= 1e-10, "residual {residual}");

    // The closed form equals a direct dense solve of the same equation.
    let dense = sylvester_dense(&btb, &aat, &c);
    let err = diff64(&xt, &dense);
    println!("closed form vs dense Kronecker solve: {err:.2e}");
    assert!(err < 1e-10, "closed form vs dense: {err}");

    // Theorem 2.3: no other X brings (g^A, g^B) closer to (g_A, g_B).
    let dist = |x: &SmallMatrix| {
        let (p, q) = f.adjusted_gradients(&ga, &gb, x).unwrap();
        let d = |u: &Tensor, v: &Tensor| vals(&(u - v).unwrap()).iter().map(|e| e * e).sum::<f64>();
        d(&p, &ga) + d(&q, &gb)
    };
    let best = dist(&x);
    let mut r = rng(30);
    for _ in 0..20 {
        let bump =
            SmallMatrix::from_vec(3, 3, vals(&(rand64(&mut r, 3, 3) * 1e-3).unwrap())).unwrap();
        let other = dist(&x.add(&bump).unwrap());
        assert!(other >= best * (1.0 - 1e-12), "{other} < {best}");
    }
}

#[test]
fn symmetric_eigen_and_sylvester_on_random_spd_matrices() {
    let mut r = rng(4);
    for n in [1usize, 2, 5, 8] {
        let m = rand64(&mut r, n, n + 3);
        let spd = mm(&m, &tt(&m));
        let sm = SmallMatrix::from_tensor(&spd).unwrap();
        let eig = symmetric_eigen(&sm).unwrap();
        assert!(eig.values.windows(2).all(|w| w[0] <= w[1]), "not ascending");
        let back = small(&eig.reconstruct(|l| l));
        assert!(diff64(&back, &spd) < 1e-12, "n = {n}: QΛQᵀ ≠ M");
        let q = small(&eig.vectors);
        assert!(
            diff64(&mm(&tt(&q), &q), &eye(n)) < 1e-12,
            "n = {n}: Q not orthonormal"
        );

        let m2 = rand64(&mut r, n + 1, n + 4);
        let spd2 = mm(&m2, &tt(&m2));
        let eig2 = symmetric_eigen(&SmallMatrix::from_tensor(&spd2).unwrap()).unwrap();
        let c = rand64(&mut r, n, n + 1);
        let x = solve_sylvester(&eig, &eig2, &SmallMatrix::from_tensor(&c).unwrap()).unwrap();
        let dense = sylvester_dense(&spd, &spd2, &c);
        assert!(diff64(&small(&x), &dense) < 1e-10, "n = {n}: Sylvester");
    }
    // Repeated eigenvalues and the zero matrix.
    let eig = symmetric_eigen(&SmallMatrix::identity(4).scale(3.0)).unwrap();
    assert_eq!(eig.values, vec![3.0; 4]);
    let eig = symmetric_eigen(&SmallMatrix::zeros(3, 3)).unwrap();
    assert_eq!(eig.values, vec![0.0; 3]);
}

#[test]
fn first_step_from_b_zero_moves_only_b_and_realises_g_pa() {
    let (a, _, g_hat) = problem(5, 12, 9, 3);
    let b = Tensor::zeros((12, 3), DType::F64, &Device::Cpu).unwrap();
    let pa = mm(&mm(&tt(&a), &inv(&mm(&a, &tt(&a)))), &a);
    let want = mm(&g_hat, &pa);
    for damping in [0.0, 1e-8] {
        let f = LoraProFactors::new(&a, &b, S, damping).unwrap();
        assert!(f.b_is_zero());
        let (ga, gb) = f.lora_gradients(&g_hat).unwrap();
        assert_eq!(max_abs64(&ga), 0.0, "g_A = s·Bᵀ·Ĝ must be 0 when B = 0");
        let (delta_a, delta_b) = f.adjust(&ga, &gb).unwrap();
        assert_eq!(max_abs64(&delta_a), 0.0, "Δ_A must be exactly 0");
        let err = diff64(&(mm(&delta_b, &a) * S).unwrap(), &want) / max_abs64(&want);
        println!("δ = {damping:e}: s·Δ_B·A vs Ĝ·P_A rel err {err:.2e}");
        let tol = if damping == 0.0 { 1e-12 } else { 1e-6 };
        assert!(err < tol, "δ = {damping}: rel err {err}");
        let gt = f.equivalent_gradient(&ga, &gb).unwrap();
        assert!(diff64(&gt, &want) / max_abs64(&want) < tol);
    }
}

#[test]
fn rank_deficient_and_tiny_b_stay_finite_and_projected() {
    // B of rank 1 with r = 3 and no damping: the pseudo-inverse gives the projector onto B's
    // column space, so g̃ is still P_B G + G P_A − P_B G P_A.
    let mut r = rng(6);
    let (a, _, g) = problem(6, 12, 9, 3);
    let u = rand64(&mut r, 12, 1);
    let v = rand64(&mut r, 1, 3);
    let b = mm(&u, &v);
    let f = LoraProFactors::new(&a, &b, S, 0.0).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    let gt = f.equivalent_gradient(&ga, &gb).unwrap();
    let pb = (mm(&u, &tt(&u)) / vals(&mm(&tt(&u), &u))[0]).unwrap();
    let pa = mm(&mm(&tt(&a), &inv(&mm(&a, &tt(&a)))), &a);
    let pbg = mm(&pb, &g);
    let want = ((&pbg + mm(&g, &pa)).unwrap() - mm(&pbg, &pa)).unwrap();
    let err = diff64(&gt, &want) / max_abs64(&want);
    println!("rank-1 B: rel err {err:.2e}");
    assert!(err < 1e-8, "rank-deficient B: rel err {err}");

    // B ≈ 1e-7 (the state right after the first steps) with the default damping: the
    // realised update stays bounded by the projection of G.
    let (a, b, g) = problem(7, 12, 9, 3);
    let b = (b * 1e-7).unwrap();
    let f = LoraProFactors::new(&a, &b, S, 1e-8).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    let (da, db) = f.adjust(&ga, &gb).unwrap();
    let realised = effective(&a, &b, S, &da, &db);
    assert!(vals(&realised).iter().all(|v| v.is_finite()));
    assert!(max_abs64(&realised) < 3.0 * max_abs64(&g));
}

// ---------------------------------------------------------------------------------------------
// The optimiser on bare vars
// ---------------------------------------------------------------------------------------------

fn var64(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

fn pair(a: &Var, b: &Var, s: f64) -> LoraPair {
    LoraPair {
        module: "layer".into(),
        adapter: "default".into(),
        a: a.clone(),
        b: b.clone(),
        scaling: s,
    }
}

fn no_decay(mode: LoraProMode) -> LoraProConfig {
    LoraProConfig {
        mode,
        weight_decay: 0.0,
        ..LoraProConfig::default()
    }
}

#[test]
fn full_mode_first_step_from_b_zero_matches_the_projected_adam_step() {
    let (a0, _, g) = problem(8, 12, 9, 3);
    let a = var64(&a0);
    let b = var64(&Tensor::zeros((12, 3), DType::F64, &Device::Cpu).unwrap());
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut opt = LoraPro::new(vars, vec![pair(&a, &b, S)], no_decay(LoraProMode::Full)).unwrap();
    let f = LoraProFactors::new(&a0, b.as_tensor(), S, 0.0).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    let mut grads = GradStore::default();
    grads.insert(a.as_tensor(), ga);
    grads.insert(b.as_tensor(), gb);
    let lr = 1e-3;
    let stats = opt.step(&grads, lr).unwrap();
    assert_eq!(stats.updated, 2);
    assert_eq!(vals(a.as_tensor()), vals(&a0), "A moved on the first step");

    // t = 1: m̂ = g̃, v̂ = g̃², so Ĝ = g̃ / (|g̃| + ε) with g̃ = G·P_A.
    let pa = mm(&mm(&tt(&a0), &inv(&mm(&a0, &tt(&a0)))), &a0);
    let gt = mm(&g, &pa);
    let g_hat = (&gt / (gt.abs().unwrap() + 1e-8).unwrap()).unwrap();
    let dw = (mm(b.as_tensor(), &a0) * S).unwrap();
    let want = (mm(&g_hat, &pa) * (-lr)).unwrap();
    let err = diff64(&dw, &want) / max_abs64(&want);
    println!("first full-mode step: ΔW vs −η·Ĝ·P_A rel err {err:.2e}");
    assert!(err < 1e-6, "rel err {err}");
    let (m, v, t) = opt.pair_state("layer", "default").unwrap();
    assert_eq!(t, 1);
    // (The optimiser damps its inverses with δ = 1e-8; the reference here is undamped.)
    assert!(diff64(&m, &(&gt * 0.1).unwrap()) < 1e-7 * max_abs64(&m));
    assert!(diff64(&v, &(gt.sqr().unwrap() * 1e-3).unwrap()) < 1e-7 * max_abs64(&v));
    assert_eq!(opt.full_state_len(), 2 * 12 * 9);
}

/// One LoRA-Pro step with r = in from random (A, B) and full-FT AdamW's step on the full weight
/// `W = s·B·A` with the same gradient: `(ΔW_lorapro − ΔW_adamw)/η = O(η)`.
fn full_ft_gap(lr: f64) -> (f64, f64) {
    let (out, inp) = (7, 4);
    let (a0, b0, g) = problem(9, out, inp, inp);
    let s = 1.5;
    let a = var64(&a0);
    let b = var64(&b0);
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut opt = LoraPro::new(vars, vec![pair(&a, &b, s)], no_decay(LoraProMode::Full)).unwrap();
    let f = LoraProFactors::new(&a0, &b0, s, 0.0).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    // r = in: P_A = I, so g̃ = G.
    let gt = f.equivalent_gradient(&ga, &gb).unwrap();
    assert!(diff64(&gt, &g) < 1e-12, "g̃ ≠ G at r = in");
    let mut grads = GradStore::default();
    grads.insert(a.as_tensor(), ga);
    grads.insert(b.as_tensor(), gb);
    opt.step(&grads, lr).unwrap();
    let w0 = (mm(&b0, &a0) * s).unwrap();
    let dw_lp = ((mm(b.as_tensor(), a.as_tensor()) * s).unwrap() - &w0).unwrap();

    // Full-FT AdamW's first step (λ = 0): m̂ = G, v̂ = G², so ΔW = −η·G/(|G| + ε).
    let dw_ft = ((&g / (g.abs().unwrap() + 1e-8).unwrap()).unwrap() * (-lr)).unwrap();
    (diff64(&dw_lp, &dw_ft) / lr, max_abs64(&dw_ft) / lr)
}

#[test]
fn full_mode_at_rank_in_equals_full_ft_adamw_to_first_order() {
    let (gap3, size) = full_ft_gap(1e-3);
    let (gap4, _) = full_ft_gap(1e-4);
    println!(
        "‖ΔW_lp − ΔW_ft‖∞/η: η=1e-3 → {gap3:.3e}, η=1e-4 → {gap4:.3e} (‖ΔW_ft‖∞/η = {size:.3})"
    );
    assert!(size > 0.5, "the AdamW step is ~sign(G)");
    assert!(gap3 < 0.05 * size, "first-order gap too large: {gap3}");
    // O(η): the gap is the second-order term η·s·Δ_B·Δ_A, ten times smaller at ten times
    // smaller η.
    let ratio = gap3 / gap4;
    assert!((ratio - 10.0).abs() < 0.5, "gap ratio {ratio}: not O(η)");
}

#[test]
fn efficient_mode_is_adamw_on_the_adjusted_gradients() {
    let (a0, b0, g) = problem(10, 12, 9, 3);
    let a = var64(&a0);
    let b = var64(&b0);
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let cfg = LoraProConfig {
        mode: LoraProMode::Efficient,
        weight_decay: 0.1,
        ..LoraProConfig::default()
    };
    let mut opt = LoraPro::new(vars, vec![pair(&a, &b, S)], cfg).unwrap();
    assert_eq!(opt.full_state_len(), 0);
    let f = LoraProFactors::new(&a0, &b0, S, cfg.damping).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    let (ga_adj, gb_adj) = f.adjust(&ga, &gb).unwrap();
    let mut grads = GradStore::default();
    grads.insert(a.as_tensor(), ga);
    grads.insert(b.as_tensor(), gb);
    let lr = 1e-2;
    opt.step(&grads, lr).unwrap();
    // AdamW's first step: θ·(1 − ηλ) − η·g/(|g| + ε).
    for (var, theta, g) in [(&a, &a0, &ga_adj), (&b, &b0, &gb_adj)] {
        let want = ((theta * (1.0 - lr * 0.1)).unwrap()
            - ((g / (g.abs().unwrap() + 1e-8).unwrap()).unwrap() * lr).unwrap())
        .unwrap();
        assert!(diff64(var.as_tensor(), &want) < 1e-6);
    }
}

// ---------------------------------------------------------------------------------------------
// Per-layer scaling on a model, against a hand computation
// ---------------------------------------------------------------------------------------------

/// The full-mode first step of one pair with raw LoRA gradients `(ga, gb)`, written out with
/// dense inverses and a dense Sylvester solve: returns `(A', B')`.
fn hand_full_step(
    a: &Tensor,
    b: &Tensor,
    s: f64,
    ga: &Tensor,
    gb: &Tensor,
    lr: f64,
) -> (Tensor, Tensor) {
    let (r, _) = a.dims2().unwrap();
    let (out, _) = b.dims2().unwrap();
    let delta = 1e-8;
    let mb_inv = inv(&(mm(&tt(b), b) + (eye(r) * delta).unwrap()).unwrap());
    let ma_inv = inv(&(mm(a, &tt(a)) + (eye(r) * delta).unwrap()).unwrap());
    let proj_out = (eye(out) - mm(&mm(b, &mb_inv), &tt(b))).unwrap();
    let s2 = 1.0 / (s * s);
    let adj = |ga: &Tensor, gb: &Tensor, x: &Tensor| {
        let ga_adj = ((mm(&mb_inv, ga) * s2).unwrap() + mm(x, a)).unwrap();
        let gb_adj = ((mm(&mm(&proj_out, gb), &ma_inv) * s2).unwrap() - mm(b, x)).unwrap();
        (ga_adj, gb_adj)
    };
    let (ga0, gb0) = adj(
        ga,
        gb,
        &Tensor::zeros((r, r), DType::F64, &Device::Cpu).unwrap(),
    );
    let gt = effective(a, b, s, &ga0, &gb0);
    // t = 1
    let m = (&gt * 0.1).unwrap();
    let v = (gt.sqr().unwrap() * 1e-3).unwrap();
    let g_hat = ((&m / 0.1).unwrap()
        / ((v.sqrt().unwrap() / 1e-3f64.sqrt()).unwrap() + 1e-8).unwrap())
    .unwrap();
    let ga_h = (mm(&tt(b), &g_hat) * s).unwrap();
    let gb_h = (mm(&g_hat, &tt(a)) * s).unwrap();
    let c = (mm(&mm(&mb_inv, &ga_h), &tt(a)) * (-s2)).unwrap();
    let x = sylvester_dense(&mm(&tt(b), b), &mm(a, &tt(a)), &c);
    let (da, db) = adj(&ga_h, &gb_h, &x);
    (
        (a - (da * lr).unwrap()).unwrap(),
        (b - (db * lr).unwrap()).unwrap(),
    )
}

/// Full mode with weight decay against the documented rule (the reference's SGD decay, on A and
/// B each): `A' = A·(1 − ηλ) − η·Δ_A`, `B' = B·(1 − ηλ) − η·Δ_B`, `Δ` being the λ = 0 step's. A
/// step whose gradients are zero only decays: `s·B'·A' = (1 − ηλ)²·s·B·A`, about `2ηλ` per step.
#[test]
fn full_mode_weight_decay_decays_a_and_b_each() {
    assert_eq!(LoraProConfig::default().weight_decay, 0.0, "the paper's λ");
    let (a0, b0, g) = problem(11, 12, 9, 3);
    let (lr, wd) = (1e-2, 0.3);
    let cfg = LoraProConfig {
        weight_decay: wd,
        ..LoraProConfig::default()
    };
    let a = var64(&a0);
    let b = var64(&b0);
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut opt = LoraPro::new(vars, vec![pair(&a, &b, S)], cfg).unwrap();
    let f = LoraProFactors::new(&a0, &b0, S, 0.0).unwrap();
    let (ga, gb) = f.lora_gradients(&g).unwrap();
    let mut grads = GradStore::default();
    grads.insert(a.as_tensor(), ga.clone());
    grads.insert(b.as_tensor(), gb.clone());
    opt.step(&grads, lr).unwrap();
    let (a_step, b_step) = hand_full_step(&a0, &b0, S, &ga, &gb, lr);
    for (what, var, theta, stepped) in [("A", &a, &a0, &a_step), ("B", &b, &b0, &b_step)] {
        let want = (stepped - (theta * (lr * wd)).unwrap()).unwrap();
        let decay = max_abs64(theta) * lr * wd;
        let err = diff64(var.as_tensor(), &want);
        println!("{what}: err {err:.2e} vs the decay term {decay:.2e}");
        assert!(err < 1e-6 * decay, "{what}: err {err}");
    }

    // Zero gradients into fresh moments: Ĝ = 0, Δ = 0, the factors only decay.
    let (a1, b1) = (a.as_tensor().copy().unwrap(), b.as_tensor().copy().unwrap());
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut opt = LoraPro::new(vars, vec![pair(&a, &b, S)], cfg).unwrap();
    let mut zeros = GradStore::default();
    zeros.insert(a.as_tensor(), a1.zeros_like().unwrap());
    zeros.insert(b.as_tensor(), b1.zeros_like().unwrap());
    opt.step(&zeros, lr).unwrap();
    let before = (mm(&b1, &a1) * S).unwrap();
    let after = (mm(b.as_tensor(), a.as_tensor()) * S).unwrap();
    let factor = (1.0 - lr * wd) * (1.0 - lr * wd);
    let err = diff64(&after, &(&before * factor).unwrap()) / max_abs64(&before);
    assert!(
        err < 1e-12,
        "s·B·A after a zero-gradient step: rel err {err}"
    );
}

#[test]
fn two_layers_with_different_scaling_each_match_a_hand_computation() {
    let mut pm = tiny_model(1, 3);
    let mut cfg = lora_random_b(&["q"], 2, 4.0);
    cfg.alpha_pattern = candle_peft::config::PatternMap::from([("blocks.1.q".to_string(), 12.0)]);
    cfg.rank_pattern = candle_peft::config::PatternMap::from([("extra.0.q".to_string(), 3)]);
    cfg.targeting.modules_to_save = Some(vec!["head".to_string()]);
    pm.add_adapter(DEFAULT_ADAPTER, cfg).unwrap();
    let pairs = candle_peft::optim::lora_pairs(&pm).unwrap();
    let scalings: Vec<(String, f64)> = pairs
        .iter()
        .map(|p| (p.module.clone(), p.scaling))
        .collect();
    assert_eq!(
        scalings,
        vec![
            ("model.blocks.0.q".to_string(), 2.0),
            ("model.blocks.1.q".to_string(), 6.0),
            ("model.extra.0.q".to_string(), 4.0 / 3.0),
        ]
    );

    let x = rand_tensor(&mut rng(40), &[2, 5, HIDDEN], 1.0);
    let loss = pm
        .model()
        .forward(&x)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let before: Vec<(Tensor, Tensor)> = pairs
        .iter()
        .map(|p| {
            (
                p.a.as_tensor().copy().unwrap(),
                p.b.as_tensor().copy().unwrap(),
            )
        })
        .collect();
    let head = pm.layer("head").unwrap().trainable_vars(DEFAULT_ADAPTER);
    let head_w = head[0].1.clone();
    let head_before = head_w.as_tensor().copy().unwrap();
    let head_grad = grads.get(head_w.as_tensor()).unwrap().clone();

    let lr = 1e-2;
    let mut opt = LoraPro::new(
        pm.trainable_vars(),
        pairs.clone(),
        no_decay(LoraProMode::Full),
    )
    .unwrap();
    opt.step(&grads, lr).unwrap();

    let f64t = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    for (p, (a0, b0)) in pairs.iter().zip(&before) {
        let ga = f64t(grads.get(p.a.as_tensor()).unwrap());
        let gb = f64t(grads.get(p.b.as_tensor()).unwrap());
        let (a0, b0) = (f64t(a0), f64t(b0));
        let (a1, b1) = hand_full_step(&a0, &b0, p.scaling, &ga, &gb, lr);
        let (got_a, got_b) = (f64t(p.a.as_tensor()), f64t(p.b.as_tensor()));
        let step = diff64(&a1, &a0).max(diff64(&b1, &b0));
        let err = diff64(&got_a, &a1).max(diff64(&got_b, &b1));
        println!(
            "{} (s = {}): step {step:.3e}, err {err:.3e}",
            p.module, p.scaling
        );
        assert!(err < 1e-3 * step, "{}: err {err} vs step {step}", p.module);
        // Another layer's s gives another update: the comparison can fail.
        let other = if p.scaling == 2.0 { 6.0 } else { 2.0 };
        let (wa, wb) = hand_full_step(&a0, &b0, other, &ga, &gb, lr);
        let wrong = diff64(&got_a, &wa).max(diff64(&got_b, &wb));
        assert!(
            wrong > 20.0 * err,
            "{}: s = {other} matches as well",
            p.module
        );
    }
    // The classifier-like head (modules_to_save) gets plain AdamW: θ − η·g/(|g| + ε).
    let want = (&head_before
        - ((&head_grad / (head_grad.abs().unwrap() + 1e-8).unwrap()).unwrap() * lr).unwrap())
    .unwrap();
    assert!(support::max_abs_diff(head_w.as_tensor(), &want) < 1e-6);
}

#[test]
fn conv_adapters_use_their_flattened_factors() {
    let params = Conv2dParams {
        stride: 1,
        padding: 1,
        dilation: 1,
        groups: 1,
    };
    let mut pm = single_conv(3, 5, (3, 3), params, 11);
    pm.add_adapter(DEFAULT_ADAPTER, LoraConfig::new(&["conv"], 2, 4.0))
        .unwrap();
    let pairs = candle_peft::optim::lora_pairs(&pm).unwrap();
    assert_eq!(pairs.len(), 1);
    let p = &pairs[0];
    assert_eq!(p.a.dims(), &[2, 3, 3, 3]);
    let img = rand_tensor(&mut rng(12), &[2, 3, 6, 5], 1.0);
    let loss = pm
        .model()
        .forward_peft(&img)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let a0 = p.a.as_tensor().copy().unwrap();
    let b0 = p.b.as_tensor().copy().unwrap();
    let lr = 1e-2;
    let mut opt = LoraPro::new(
        pm.trainable_vars(),
        pairs.clone(),
        no_decay(LoraProMode::Full),
    )
    .unwrap();
    opt.step(&grads, lr).unwrap();
    assert_eq!(
        bits(p.a.as_tensor()),
        bits(&a0),
        "A moved on the first step from B = 0"
    );

    let a2 = a0.reshape((2, 27)).unwrap();
    let b2 = b0.reshape((5, 2)).unwrap();
    let ga = grads
        .get(p.a.as_tensor())
        .unwrap()
        .reshape((2, 27))
        .unwrap();
    let gb = grads.get(p.b.as_tensor()).unwrap().reshape((5, 2)).unwrap();
    let f = LoraProFactors::new(&a2, &b2, 2.0, 1e-8).unwrap();
    let gt = f.equivalent_gradient(&ga, &gb).unwrap();
    let g_hat = (&gt / (gt.abs().unwrap() + 1e-8).unwrap()).unwrap();
    let (hg_a, hg_b) = f.lora_gradients(&g_hat).unwrap();
    let (_, db) = f.adjust(&hg_a, &hg_b).unwrap();
    let want = (&b2 - (db * lr).unwrap())
        .unwrap()
        .reshape((5, 2, 1, 1))
        .unwrap();
    assert!(support::max_abs(&want) > 1e-4);
    assert!(support::max_abs_diff(p.b.as_tensor(), &want) < 1e-5);
}

// ---------------------------------------------------------------------------------------------
// The trainer: resume, accumulation, loss decrease
// ---------------------------------------------------------------------------------------------

fn examples(n: usize, seed: u64) -> Vec<Example> {
    teacher_examples(n, seed, &["q", "v"])
}

/// The student: PEFT's default LoRA init (B = 0) on q and v, the head trained whole.
struct Regression {
    pm: PeftModel<Tiny>,
    expose_pairs: bool,
    calls: Cell<usize>,
}

impl Regression {
    fn new() -> Self {
        let mut pm = tiny_model(1, 5);
        let mut cfg = LoraConfig::new(&["q", "v"], 2, 4.0);
        cfg.targeting.modules_to_save = Some(vec!["head".to_string()]);
        pm.add_adapter(DEFAULT_ADAPTER, cfg).unwrap();
        Self {
            pm,
            expose_pairs: true,
            calls: Cell::new(0),
        }
    }
}

impl TrainTask for Regression {
    type Example = Example;

    fn loss(&self, batch: &[&Example]) -> candle_peft::Result<(Tensor, usize)> {
        self.calls.set(self.calls.get() + 1);
        Ok((
            student_mse(self.pm.model(), batch)?,
            batch.len() * TEACHER_TOKENS,
        ))
    }

    fn evaluate(&self, _examples: &[Example]) -> candle_peft::Result<EvalReport> {
        Ok(EvalReport::default())
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.pm.trainable_vars()
    }

    fn save_adapter(&self, dir: &Path) -> candle_peft::Result<()> {
        self.pm.save_adapter(dir, DEFAULT_ADAPTER)
    }

    fn lora_pairs(&self) -> candle_peft::Result<Vec<LoraPair>> {
        if self.expose_pairs {
            candle_peft::optim::lora_pairs(&self.pm)
        } else {
            Ok(Vec::new())
        }
    }
}

fn lp_config(steps: usize, mode: LoraProMode) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 4,
        grad_accum: 2,
        lr: 1e-2,
        weight_decay: 0.01,
        schedule: Schedule::Cosine,
        warmup: Warmup::Steps(1),
        max_grad_norm: Some(1.0),
        optimizer: OptimizerKind::LoraPro(mode),
        seed: 7,
        quiet: true,
        ..TrainConfig::default()
    }
}

fn values(task: &Regression) -> Vec<(String, Vec<u32>)> {
    task.trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, bits(v.as_tensor())))
        .collect()
}

#[test]
fn lora_pro_training_lowers_the_loss_in_both_modes() {
    let data = examples(32, 3);
    for mode in [LoraProMode::Full, LoraProMode::Efficient] {
        let task = Regression::new();
        let cfg = TrainConfig {
            warmup: Warmup::Steps(0),
            ..lp_config(24, mode)
        };
        let report = Trainer::new(cfg).unwrap().run(&task, &data, None).unwrap();
        let first: f64 = report.losses[..4].iter().sum::<f64>() / 4.0;
        let last: f64 = report.losses[20..].iter().sum::<f64>() / 4.0;
        println!("{mode}: first-epoch loss {first:.5}, last {last:.5}");
        assert!(last < 0.8 * first, "{mode}: {first} → {last}");
        assert!(report.vars_without_grad.is_empty());
    }
}

#[test]
fn resume_from_saved_state_reproduces_the_uninterrupted_run() {
    let data = examples(32, 4);
    for mode in [LoraProMode::Full, LoraProMode::Efficient] {
        let dir = tempfile::tempdir().unwrap();
        let whole = Regression::new();
        let report = Trainer::new(TrainConfig {
            checkpoint_every: Some(3),
            out_dir: Some(dir.path().to_path_buf()),
            ..lp_config(6, mode)
        })
        .unwrap()
        .run(&whole, &data, None)
        .unwrap();
        assert_eq!(report.checkpoints.len(), 2);
        let state = dir.path().join("checkpoint-3").join(OPTIMIZER_FILE);
        let meta = safetensors::SafeTensors::read_metadata(&std::fs::read(&state).unwrap())
            .unwrap()
            .1;
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["optimizer"], "LoraPro");
        assert_eq!(meta["mode"], mode.to_string());

        let resumed = Regression::new();
        let r2 = Trainer::new(TrainConfig {
            resume_from: Some(dir.path().join("checkpoint-3")),
            ..lp_config(6, mode)
        })
        .unwrap()
        .run(&resumed, &data, None)
        .unwrap();
        assert_eq!(r2.start_step, 3);
        assert_eq!(resumed.calls.get(), 3 * 2, "the resumed run redid steps");
        assert_eq!(values(&whole), values(&resumed), "{mode}: resume differs");
        let lb = |l: &[f64]| l.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(lb(&report.losses), lb(&r2.losses));

        // A run that does not load the state (fresh moments, same vars) takes another path.
        let fresh = Regression::new();
        let cp = dir.path().join("checkpoint-3");
        let saved = candle_peft::io::peft_format::read_safetensors(
            &cp.join(candle_peft::train::TRAINABLE_FILE),
            &Device::Cpu,
        )
        .unwrap();
        for (name, var) in fresh.trainable_vars() {
            var.set(&saved[&name]).unwrap();
        }
        let mut opt = LoraPro::new(
            fresh.trainable_vars(),
            fresh.lora_pairs().unwrap(),
            lp_config(6, mode).lora_pro(mode),
        )
        .unwrap();
        let mut reloaded = LoraPro::new(
            fresh.trainable_vars(),
            fresh.lora_pairs().unwrap(),
            lp_config(6, mode).lora_pro(mode),
        )
        .unwrap();
        reloaded.load_state(&cp.join(OPTIMIZER_FILE)).unwrap();
        assert_eq!(reloaded.steps_taken(), 3);
        assert_eq!(opt.steps_taken(), 0);
        if mode == LoraProMode::Full {
            let (m, _, t) = reloaded
                .pair_state("model.blocks.0.q", DEFAULT_ADAPTER)
                .unwrap();
            assert_eq!(t, 3);
            assert!(support::max_abs(&m) > 0.0);
        }
        // Save → load round trip keeps every state tensor.
        let again = dir.path().join("again.safetensors");
        reloaded.save_state(&again).unwrap();
        opt.load_state(&again).unwrap();
        let a = std::fs::read(cp.join(OPTIMIZER_FILE)).unwrap();
        let b = std::fs::read(&again).unwrap();
        let ta = candle_core::safetensors::load_buffer(&a, &Device::Cpu).unwrap();
        let tb = candle_core::safetensors::load_buffer(&b, &Device::Cpu).unwrap();
        assert_eq!(ta.len(), tb.len());
        for (k, t) in &ta {
            assert_eq!(flat(t), flat(&tb[k]), "{k}");
        }
    }
}

#[test]
fn gradient_accumulation_adjusts_the_mean_gradient_once_per_step() {
    let data = examples(32, 5);
    for mode in [LoraProMode::Full, LoraProMode::Efficient] {
        let accum = Regression::new();
        Trainer::new(lp_config(5, mode))
            .unwrap()
            .run(&accum, &data, None)
            .unwrap();
        let whole = Regression::new();
        Trainer::new(TrainConfig {
            batch_size: 8,
            grad_accum: 1,
            ..lp_config(5, mode)
        })
        .unwrap()
        .run(&whole, &data, None)
        .unwrap();
        let mut worst = 0f32;
        for ((n, a), (_, b)) in accum.trainable_vars().iter().zip(whole.trainable_vars()) {
            let d = support::max_abs_diff(a.as_tensor(), b.as_tensor())
                / support::max_abs(a.as_tensor());
            assert!(d < 2e-4, "{mode} {n}: rel diff {d}");
            worst = worst.max(d);
        }
        // Stepping once per micro-batch instead would have moved the vars far apart.
        let fresh = Regression::new();
        let moved = support::max_abs_diff(
            accum.trainable_vars()[0].1.as_tensor(),
            fresh.trainable_vars()[0].1.as_tensor(),
        );
        assert!(
            moved > 1e-3,
            "{mode}: training did not move lora_A ({moved})"
        );
        println!("{mode}: 2×4 accumulated vs 1×8: max relative diff {worst:.2e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// An adapter that is not LoRA (a stand-in for SVFit and friends).
#[derive(Debug)]
struct NotLora {
    s: Var,
}

impl Adapter for NotLora {
    fn method(&self) -> Method {
        candle_peft::adapters::svfit::METHOD
    }

    fn forward_delta(&self, x: &Tensor, _train: bool) -> candle_peft::Result<Tensor> {
        Ok(x.zeros_like()?)
    }

    fn delta_weight(&self) -> candle_peft::Result<Tensor> {
        Ok(Tensor::zeros((HIDDEN, HIDDEN), DType::F32, &Device::Cpu)?)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![("svfit_s".to_string(), self.s.clone())]
    }

    fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![("svfit_s".to_string(), self.s.as_tensor().clone())]
    }
}

#[test]
fn lora_pro_on_a_non_lora_adapter_is_a_clear_error() {
    let mut pm = tiny_model(1, 3);
    pm.add_adapter(DEFAULT_ADAPTER, LoraConfig::new(&["q"], 2, 4.0))
        .unwrap();
    let s = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    pm.layer("model.blocks.0.v")
        .unwrap()
        .add_adapter(DEFAULT_ADAPTER, Box::new(NotLora { s }))
        .unwrap();
    let err = candle_peft::optim::lora_pairs(&pm).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        matches!(err, PeftError::InvalidLayer { ref module, .. } if module == "model.blocks.0.v")
    );
    assert!(msg.contains("LoRA-Pro") && msg.contains("svfit"), "{msg}");

    // A task that reports no LoRA pairs cannot train with LoRA-Pro.
    let data = examples(8, 6);
    let mut task = Regression::new();
    task.expose_pairs = false;
    let err = Trainer::new(lp_config(2, LoraProMode::Full))
        .unwrap()
        .run(&task, &data, None)
        .unwrap_err();
    assert!(
        err.to_string().contains("needs at least one LoRA adapter"),
        "{err}"
    );

    // Grouped conv LoRA is not s·B·A.
    let params = Conv2dParams {
        stride: 1,
        padding: 0,
        dilation: 1,
        groups: 2,
    };
    let mut pm = single_conv(4, 4, (1, 1), params, 1);
    pm.add_adapter(DEFAULT_ADAPTER, LoraConfig::new(&["conv"], 2, 4.0))
        .unwrap();
    let err = candle_peft::optim::lora_pairs(&pm).unwrap_err().to_string();
    assert!(err.contains("conv") && err.contains("groups = 2"), "{err}");

    // A checkpoint written with AdamW does not resume under LoRA-Pro (or the other mode).
    let dir = tempfile::tempdir().unwrap();
    let adam_task = Regression::new();
    Trainer::new(TrainConfig {
        out_dir: Some(dir.path().to_path_buf()),
        optimizer: OptimizerKind::AdamW,
        ..lp_config(2, LoraProMode::Full)
    })
    .unwrap()
    .run(&adam_task, &data, None)
    .unwrap();
    let cp = dir.path().join("checkpoint-2");
    for kind in [
        OptimizerKind::LoraPro(LoraProMode::Full),
        OptimizerKind::LoraPro(LoraProMode::Efficient),
    ] {
        let err = Trainer::new(TrainConfig {
            steps: 4,
            resume_from: Some(cp.clone()),
            optimizer: kind,
            ..lp_config(4, LoraProMode::Full)
        })
        .unwrap()
        .run(&Regression::new(), &data, None)
        .unwrap_err()
        .to_string();
        assert!(err.contains("AdamW") && err.contains("LoraPro"), "{err}");
    }
    let lp_dir = tempfile::tempdir().unwrap();
    Trainer::new(TrainConfig {
        out_dir: Some(lp_dir.path().to_path_buf()),
        ..lp_config(2, LoraProMode::Full)
    })
    .unwrap()
    .run(&Regression::new(), &data, None)
    .unwrap();
    let err = Trainer::new(TrainConfig {
        resume_from: Some(lp_dir.path().join("checkpoint-2")),
        ..lp_config(4, LoraProMode::Efficient)
    })
    .unwrap()
    .run(&Regression::new(), &data, None)
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("full-mode") && err.contains("efficient"),
        "{err}"
    );

    // Factor shapes that do not pair, and a zero scaling.
    let a = Tensor::zeros((2, 5), DType::F64, &Device::Cpu).unwrap();
    let b = Tensor::zeros((4, 3), DType::F64, &Device::Cpu).unwrap();
    assert!(LoraProFactors::new(&a, &b, 1.0, 0.0).is_err());
    let b = Tensor::zeros((4, 2), DType::F64, &Device::Cpu).unwrap();
    let err = LoraProFactors::new(&a, &b, 0.0, 0.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("scaling"), "{err}");
    assert!(
        "fast"
            .parse::<LoraProMode>()
            .unwrap_err()
            .to_string()
            .contains("full, efficient")
    );
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

/// `candle-peft train --method lora-pro` on 24 SST-2 sentences, 2 steps of 4.
fn cli_train(out: &Path, extra: &[&str]) -> std::process::Command {
    let data = common::sst2_subset(out, "train.tsv", 24);
    let mut cmd = common::bin();
    cmd.args([
        "train",
        "--model",
        &common::minilm_dir().display().to_string(),
        "--task",
        "classify",
        "--data",
        &data.display().to_string(),
        "--method",
        "lora-pro",
        "--steps",
        "2",
        "--batch",
        "4",
        "--seq",
        "32",
        "--lr",
        "1e-4",
        "--quiet",
        "--json",
        "--out",
        &out.join("run").display().to_string(),
    ]);
    cmd.args(extra);
    cmd
}

#[test]
fn cli_trains_lora_pro_in_both_modes_and_writes_a_peft_lora_adapter() {
    let dir = tempfile::tempdir().unwrap();
    for extra in [&[][..], &["--lora-pro-mode", "efficient"][..]] {
        let mut cmd = cli_train(dir.path(), extra);
        cmd.args(["--checkpoint-every", "2"]);
        let out = common::run_ok(&mut cmd);
        let line: serde_json::Value =
            serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(line["steps"], 2, "{line}");
        let adapter = dir.path().join("run/adapter");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        let tensors = candle_peft::io::peft_format::read_safetensors(
            &adapter.join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let b =
            &tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"];
        assert!(
            support::max_abs(b) > 0.0,
            "{extra:?}: lora_B was not trained"
        );
        // No --weight-decay: LoRA-Pro's default is the paper's λ = 0 (AdamW's is 0.01).
        let state = dir.path().join("run/checkpoint-2").join(OPTIMIZER_FILE);
        let bytes = std::fs::read(&state).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["optimizer"], "LoraPro");
        assert_eq!(meta["weight_decay"], "0", "{extra:?}");
        std::fs::remove_dir_all(dir.path().join("run")).unwrap();
    }
    // A bad mode is refused by the argument parser (exit 2, clap's usage error).
    let out = cli_train(dir.path(), &["--lora-pro-mode", "fast"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("full, efficient"), "{err}");
    let lora = cli_train(dir.path(), &["--lora-pro-mode", "full"]);
    let args: Vec<String> = lora
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .map(|a| if a == "lora-pro" { "lora".into() } else { a })
        .collect();
    let mut lora = std::process::Command::new(lora.get_program());
    lora.env("HF_HUB_OFFLINE", "1").args(args);
    let err = common::run_err(&mut lora);
    assert!(
        err.contains("--lora-pro-mode needs --method lora-pro"),
        "{err}"
    );
}
