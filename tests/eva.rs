//! EVA: incremental PCA against a batch SVD, recovery of a planted subspace, the rank budget and
//! its redistribution, padding invariance, identity at init, the PEFT-format config, and bad
//! calibration data. Synthetic layers (whose inputs are the test's data) for exact checks;
//! all-MiniLM-L6-v2 for the real pass, the file round trip and the CLI end to end.
mod common;
use common::bin;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_peft::adapters::eva::EvaConfig;
use candle_peft::config::ModuleSelector;
use candle_peft::data::{load_tokenizer, read_tsv};
use candle_peft::data_init::eva::{self, EvaOptions, rank_distribution};
use candle_peft::data_init::{CalibrationBatch, CalibrationOptions, text_batches};
use candle_peft::linalg::{self, IncrementalPca, PcaSvd, Precision};
use candle_peft::{
    AdapterConfig, BertModel, LoraAdapter, LoraConfig, PeftBuilder, PeftLinear, PeftModel, Result,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use common::{max_abs_diff, run_ok};

// ---------------------------------------------------------------------------------------------
// Synthetic data and a toy model whose layer inputs are the data itself.

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(candle_peft::init::normal(rng, n, std), shape, &Device::Cpu).unwrap()
}

/// A `[d, m]` matrix with orthonormal columns.
fn orthonormal(rng: &mut ChaCha8Rng, d: usize, m: usize) -> Tensor {
    linalg::qr(&randn(rng, &[d, m], 1.0), Precision::F64)
        .unwrap()
        .q
        .to_dtype(DType::F32)
        .unwrap()
}

/// `n` rows `μ + z diag(σ) Pᵀ + noise·ε` in `d` dimensions: variance planted in the span of `P`.
fn planted_rows(rng: &mut ChaCha8Rng, n: usize, p: &Tensor, sigma: &[f32], noise: f32) -> Tensor {
    let (d, m) = p.dims2().unwrap();
    let z = randn(rng, &[n, m], 1.0);
    let s = Tensor::from_vec(sigma.to_vec(), (1, m), &Device::Cpu).unwrap();
    let mean = Tensor::from_vec(
        (0..d).map(|i| 0.3 * i as f32 - 1.0).collect::<Vec<_>>(),
        (1, d),
        &Device::Cpu,
    )
    .unwrap();
    let signal = z
        .broadcast_mul(&s)
        .unwrap()
        .matmul(&p.t().unwrap())
        .unwrap();
    (signal.broadcast_add(&mean).unwrap() + randn(rng, &[n, d], noise)).unwrap()
}

/// Layers `a` and `c` read the first `d` input features (the same tensor: one input group),
/// `b` reads the last `d`.
struct Toy {
    a: PeftLinear,
    b: PeftLinear,
    c: PeftLinear,
    d: usize,
}

impl Toy {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xa = x.narrow(D::Minus1, 0, self.d)?;
        let xb = x.narrow(D::Minus1, self.d, self.d)?;
        let ya = self.a.forward_peft(&xa)?;
        let yc = self.c.forward_peft(&xa)?;
        let yb = self.b.forward_peft(&xb)?;
        Ok(Tensor::cat(&[ya, yb, yc], D::Minus1)?)
    }
}

fn toy(d: usize, out: usize) -> PeftModel<Toy> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut w = HashMap::new();
    for name in ["a", "b", "c"] {
        w.insert(format!("{name}.weight"), randn(&mut rng, &[out, d], 0.2));
    }
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let model = Toy {
        a: b.linear(d, out, false, "a").unwrap(),
        b: b.linear(d, out, false, "b").unwrap(),
        c: b.linear(d, out, false, "c").unwrap(),
        d,
    };
    PeftModel::new(model, &b)
}

fn toy_forward(m: &Toy, batch: &CalibrationBatch) -> Result<()> {
    m.forward(&batch.input_ids).map(|_| ())
}

/// Batches `[B, T, 2d]` whose first half follows `pa` and second half `pb` (all tokens real).
fn toy_batches(
    rng: &mut ChaCha8Rng,
    n: usize,
    (b, t): (usize, usize),
    a: (&Tensor, &[f32]),
    bb: (&Tensor, &[f32]),
) -> Vec<CalibrationBatch> {
    (0..n)
        .map(|_| {
            let xa = planted_rows(rng, b * t, a.0, a.1, 0.01);
            let xb = planted_rows(rng, b * t, bb.0, bb.1, 0.01);
            let x = Tensor::cat(&[xa, xb], 1)
                .unwrap()
                .reshape((b, t, ()))
                .unwrap();
            let mask = Tensor::ones((b, t), DType::U32, &Device::Cpu).unwrap();
            CalibrationBatch::new(x, mask)
        })
        .collect()
}

fn eva_config(targets: &[&str], r: usize, rho: f64) -> LoraConfig {
    let mut c = LoraConfig::new(targets, r, 2.0 * r as f64);
    c.eva_config = Some(EvaConfig {
        rho,
        ..EvaConfig::default()
    });
    c
}

fn quiet(max_iterations: usize) -> EvaOptions {
    EvaOptions {
        max_iterations: Some(max_iterations),
        svd: None,
        calibration: CalibrationOptions { quiet: true },
    }
}

/// The cosines of the principal angles between the row spaces of `a: [r, d]` (orthonormal rows)
/// and the columns of `p: [d, m]` (orthonormal): the singular values of `a p`.
fn principal_cosines(a: &Tensor, p: &Tensor) -> Vec<f64> {
    let m = a.to_dtype(DType::F64).unwrap();
    let p = p.to_dtype(DType::F64).unwrap();
    linalg::singular_values(&m.matmul(&p).unwrap(), Precision::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn gram_error(a: &Tensor) -> f32 {
    let (r, _) = a.dims2().unwrap();
    let g = a.matmul(&a.t().unwrap()).unwrap();
    max_abs_diff(&g, &Tensor::eye(r, DType::F32, &Device::Cpu).unwrap())
}

fn lora_a(model: &PeftModel<impl Sized>, module: &str) -> Tensor {
    model
        .layer(module)
        .unwrap()
        .trainable_vars("default")
        .into_iter()
        .find(|(n, _)| n == "lora_A.weight")
        .map(|(_, v)| v.as_tensor().clone())
        .unwrap_or_else(|| panic!("{module} has no lora_A"))
}

// ---------------------------------------------------------------------------------------------
// Incremental PCA

/// PCA of the stacked, centred rows: `(components [k, d], explained variance ratios)`.
fn batch_pca(rows: &Tensor, k: usize) -> (Tensor, Vec<f64>) {
    let x = rows.to_dtype(DType::F64).unwrap();
    let mean = x.mean_keepdim(0).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let total = xc
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let svd = linalg::thin_svd(&xc, Precision::F64).unwrap();
    let s = svd.s.to_vec1::<f64>().unwrap();
    let ratios = s.iter().take(k).map(|v| v * v / total).collect();
    (svd.v.narrow(1, 0, k).unwrap().t().unwrap(), ratios)
}

/// `‖P_a − P_b‖_max` for the projectors on the row spaces of `a` and `b` (orthonormal rows).
fn subspace_distance(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let pa = a.t().unwrap().matmul(&a).unwrap();
    let pb = b.t().unwrap().matmul(&b).unwrap();
    max_abs_diff(&pa, &pb)
}

#[test]
fn ipca_over_batches_equals_batch_pca() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let d = 10;
    let p = orthonormal(&mut rng, d, d);
    let sigma: Vec<f32> = (0..d).map(|i| 10.0 / (1.0 + i as f32)).collect();
    let batches: Vec<Tensor> = (0..6)
        .map(|_| planted_rows(&mut rng, 25, &p, &sigma, 0.0))
        .collect();
    let stacked = Tensor::cat(&batches, 0).unwrap();

    // All components: IPCA is exact, whatever the batching.
    let mut pca = IncrementalPca::new(d, d, PcaSvd::Exact).unwrap();
    for b in &batches {
        pca.partial_fit(b).unwrap();
    }
    let (expected, ratios) = batch_pca(&stacked, d);
    for k in [1, 3, 6] {
        let got = pca.components().unwrap().narrow(0, 0, k).unwrap();
        let want = expected.narrow(0, 0, k).unwrap();
        let dist = subspace_distance(&got, &want);
        assert!(dist <= 1e-4, "top-{k} subspace differs by {dist}");
    }
    let got_ratios = pca
        .explained_variance_ratio()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (g, w) in got_ratios.iter().zip(&ratios) {
        assert!((g - w).abs() < 1e-9, "ratio {g} vs {w}");
    }
    assert_eq!(pca.n_samples_seen(), 150);
    let mean = stacked.to_dtype(DType::F64).unwrap().mean(0).unwrap();
    assert!(max_abs_diff(pca.mean().unwrap(), &mean) < 1e-9);

    // Fewer components than features on data of lower rank: the truncation drops nothing.
    let p3 = orthonormal(&mut rng, 16, 3);
    let low: Vec<Tensor> = (0..5)
        .map(|_| planted_rows(&mut rng, 20, &p3, &[6.0, 3.0, 1.5], 0.0))
        .collect();
    let mut pca = IncrementalPca::new(5, 16, PcaSvd::Exact).unwrap();
    for b in &low {
        pca.partial_fit(b).unwrap();
    }
    let (expected, _) = batch_pca(&Tensor::cat(&low, 0).unwrap(), 3);
    let got = pca.components().unwrap().narrow(0, 0, 3).unwrap();
    let dist = subspace_distance(&got, &expected);
    assert!(dist <= 1e-4, "planted rank-3 subspace differs by {dist}");

    // The randomised SVD (PEFT's default) agrees where the spectrum has a gap.
    let mut fast = IncrementalPca::new(3, 16, PcaSvd::peft(3)).unwrap();
    for b in &low {
        fast.partial_fit(b).unwrap();
    }
    let dist = subspace_distance(fast.components().unwrap(), &expected);
    assert!(dist <= 1e-4, "randomised IPCA differs by {dist}");

    // Components are orthonormal rows, each with its largest-magnitude entry positive.
    let c = pca.components().unwrap().to_dtype(DType::F32).unwrap();
    assert!(gram_error(&c) < 1e-5);
    for row in c.to_vec2::<f32>().unwrap() {
        let big = row
            .iter()
            .copied()
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        assert!(big > 0.0, "svd_flip: largest entry {big} is negative");
    }
}

#[test]
fn rank_distribution_keeps_the_budget() {
    // Two layers of rank 2, ρ = 2: four ratios each. Layer 0's spectrum decays fast.
    let ratios = vec![vec![0.6, 0.3, 0.05, 0.01], vec![0.2, 0.19, 0.18, 0.17]];
    let ranks = rank_distribution(&ratios, 4, &[0, 1]);
    assert_eq!(ranks, vec![2, 2]);
    let ratios = vec![vec![0.6, 0.3, 0.25, 0.21], vec![0.2, 0.19, 0.18, 0.17]];
    assert_eq!(rank_distribution(&ratios, 4, &[0, 1]), vec![4, 0]);
    // A member that would get more than its leader swaps with it.
    let ratios = vec![vec![0.1, 0.05], vec![0.5, 0.4], vec![0.3, 0.2]];
    let ranks = rank_distribution(&ratios, 3, &[0, 0, 2]);
    assert_eq!(ranks.iter().sum::<usize>(), 3);
    assert_eq!(ranks, vec![2, 0, 1]);
    // ρ = 1: every value fits in the budget, nothing moves.
    let ratios = vec![vec![0.9, 0.01], vec![0.2, 0.1], vec![0.5, 0.4]];
    assert_eq!(rank_distribution(&ratios, 6, &[0, 1, 2]), vec![2, 2, 2]);
}

// ---------------------------------------------------------------------------------------------
// EVA on the toy model

#[test]
fn planted_subspace_is_recovered_and_ranks_follow_the_variance() {
    let (d, out, r) = (16, 12, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let pa = orthonormal(&mut rng, d, 3);
    let pb = orthonormal(&mut rng, d, d);
    let flat: Vec<f32> = (0..d).map(|i| 1.0 + 0.01 * i as f32).collect();
    let batches = toy_batches(&mut rng, 6, (4, 16), (&pa, &[10.0, 7.0, 5.0]), (&pb, &flat));

    let mut model = toy(d, out);
    let probe = batches[0].input_ids.clone();
    let before = model.model().forward(&probe).unwrap();
    let report = eva::add_eva_adapter(
        &mut model,
        "default",
        eva_config(&["a", "b", "c"], r, 2.0),
        &batches,
        toy_forward,
        &quiet(200),
    )
    .unwrap();

    // Budget 3 layers × r = 6; `a` and `c` share one PCA whose 3 strong components win it all,
    // and the flat spectrum of `b` gets rank 0: no adapter.
    let ranks = report.state.ranks();
    assert_eq!(ranks.values().sum::<usize>(), 3 * r);
    assert_eq!(ranks["a"], 3);
    assert_eq!(ranks["c"], 3);
    assert_eq!(ranks["b"], 0);
    assert_eq!(
        report.state.shared_inputs,
        vec![vec!["a".to_string(), "c".to_string()]]
    );
    assert!(!model.layer("b").unwrap().has_adapter("default"));
    assert_eq!(
        report.config.targeting.target_modules,
        Some(ModuleSelector::List(vec!["a".into(), "c".into()]))
    );
    assert_eq!(
        report.config.rank_pattern,
        candle_peft::config::PatternMap::from([("a".into(), 3), ("c".into(), 3)])
    );
    // adjust_scaling_factors: α_l = α·r_l/r, so s = α/r = 2 everywhere.
    assert_eq!(
        report.config.alpha_pattern,
        candle_peft::config::PatternMap::from([("a".into(), 6.0), ("c".into(), 6.0)])
    );
    for module in ["a", "c"] {
        let s = model
            .layer(module)
            .unwrap()
            .with_adapter("default", |a| {
                a.as_any()
                    .and_then(|x| x.downcast_ref::<LoraAdapter>())
                    .map(LoraAdapter::scaling)
            })
            .flatten()
            .unwrap();
        assert_eq!(s, 2.0);
    }

    // A is the planted subspace (principal-angle cosines ≥ 0.99), orthonormal, shared by a and c.
    let a = lora_a(&model, "a");
    assert_eq!(a.dims(), &[3, d]);
    assert!(gram_error(&a) < 1e-5, "A Aᵀ ≠ I");
    for c in principal_cosines(&a, &pa) {
        assert!(c >= 0.99, "principal-angle cosine {c}");
    }
    assert_eq!(max_abs_diff(&a, &lora_a(&model, "c")), 0.0);

    // B = 0: the adapted model is the base model exactly.
    let after = model.model().forward(&probe).unwrap();
    assert_eq!(max_abs_diff(&before, &after), 0.0);
}

#[test]
fn rho_one_keeps_every_rank() {
    let (d, out, r) = (12, 10, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let pa = orthonormal(&mut rng, d, 4);
    let pb = orthonormal(&mut rng, d, 4);
    let batches = toy_batches(
        &mut rng,
        4,
        (2, 16),
        (&pa, &[9.0, 6.0, 4.0, 0.5]),
        (&pb, &[2.0, 1.0, 0.5, 0.1]),
    );
    let mut model = toy(d, out);
    let report = eva::add_eva_adapter(
        &mut model,
        "default",
        eva_config(&["a", "b", "c"], r, 1.0),
        &batches,
        toy_forward,
        &quiet(200),
    )
    .unwrap();
    for (name, rank) in report.state.ranks() {
        assert_eq!(rank, r, "{name}");
        assert_eq!(lora_a(&model, &name).dims(), &[r, d]);
    }
    assert!(report.config.rank_pattern.is_empty());
    assert!(report.config.alpha_pattern.is_empty());
}

#[test]
fn padding_tokens_do_not_change_the_result() {
    let (d, out, r) = (12, 8, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let pa = orthonormal(&mut rng, d, 3);
    let pb = orthonormal(&mut rng, d, 3);
    let batches = toy_batches(
        &mut rng,
        4,
        (3, 10),
        (&pa, &[8.0, 4.0, 2.0]),
        (&pb, &[5.0, 3.0, 1.0]),
    );
    // The same batches with 6 garbage positions appended to every sequence, masked out.
    let padded: Vec<CalibrationBatch> = batches
        .iter()
        .map(|b| {
            let garbage = (randn(&mut rng, &[3, 6, 2 * d], 50.0) + 7.0).unwrap();
            let x = Tensor::cat(&[&b.input_ids, &garbage], 1).unwrap();
            let mask = Tensor::cat(
                &[
                    Tensor::ones((3, 10), DType::U32, &Device::Cpu).unwrap(),
                    Tensor::zeros((3, 6), DType::U32, &Device::Cpu).unwrap(),
                ],
                1,
            )
            .unwrap();
            CalibrationBatch::new(x, mask)
        })
        .collect();
    let run = |batches: &[CalibrationBatch]| {
        let mut model = toy(d, out);
        let report = eva::add_eva_adapter(
            &mut model,
            "default",
            eva_config(&["a", "b"], r, 2.0),
            batches,
            toy_forward,
            &quiet(200),
        )
        .unwrap();
        (report, lora_a(&model, "a"), lora_a(&model, "b"))
    };
    let (plain, a1, b1) = run(&batches);
    let (masked, a2, b2) = run(&padded);
    assert_eq!(plain.state.ranks(), masked.state.ranks());
    assert_eq!(plain.state.iterations, masked.state.iterations);
    assert_eq!(max_abs_diff(&a1, &a2), 0.0);
    assert_eq!(max_abs_diff(&b1, &b2), 0.0);
}

#[test]
fn bad_calibration_data_names_the_layer() {
    let (d, out) = (8, 6);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x = randn(&mut rng, &[2, 5, 2 * d], 1.0);

    // No usable token at all.
    let empty = vec![CalibrationBatch::new(
        x.clone(),
        Tensor::zeros((2, 5), DType::U32, &Device::Cpu).unwrap(),
    )];
    let mut model = toy(d, out);
    let err = eva::add_eva_adapter(
        &mut model,
        "default",
        eva_config(&["a", "b"], 2, 2.0),
        &empty,
        toy_forward,
        &quiet(20),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("module `a; b`:") && err.contains("no usable token"),
        "{err}"
    );
    assert!(model.adapter_names().is_empty());

    // Two usable tokens per batch, but EVA computes round(ρ·r) = 4 components per layer.
    let mask =
        Tensor::from_vec(vec![1u32, 1, 0, 0, 0, 0, 0, 0, 0, 0], (2, 5), &Device::Cpu).unwrap();
    let few = vec![CalibrationBatch::new(x, mask); 3];
    let err = eva::add_eva_adapter(
        &mut model,
        "default",
        eva_config(&["b"], 2, 2.0),
        &few,
        toy_forward,
        &quiet(20),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`b`") && err.contains("at least 4 usable rows") && err.contains("at most 2"),
        "{err}"
    );
}

#[test]
fn unconverged_layers_are_an_error_past_the_cap() {
    let (d, out) = (10, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    // Isotropic inputs: the components keep turning, τ = 0.999999 is never met in 3 batches.
    let p = orthonormal(&mut rng, d, d);
    let flat = vec![1.0f32; d];
    let batches = toy_batches(&mut rng, 3, (2, 10), (&p, &flat), (&p, &flat));
    let mut config = eva_config(&["a"], 2, 2.0);
    if let Some(e) = config.eva_config.as_mut() {
        e.tau = 0.999_999;
    }
    let mut model = toy(d, out);
    let err = eva::add_eva_adapter(
        &mut model,
        "default",
        config,
        &batches,
        toy_forward,
        &quiet(3),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("module `a`:")
            && err.contains("did not converge within 3")
            && err.contains("converged: 0/2"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// all-MiniLM-L6-v2

fn sst2_texts(n: usize) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sst2/train.tsv");
    read_tsv(&path)
        .unwrap()
        .examples
        .into_iter()
        .take(n)
        .map(|e| e.text)
        .collect()
}

fn minilm_batches(n: usize, batch: usize) -> Vec<CalibrationBatch> {
    let dir = common::minilm_dir();
    let tok = load_tokenizer(dir.join("tokenizer.json"), 64).unwrap();
    let texts = sst2_texts(n * batch);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    text_batches(&tok, &refs, batch, n, 64, &Device::Cpu).unwrap()
}

fn bert_forward(m: &BertModel, b: &CalibrationBatch) -> Result<()> {
    m.forward(&b.input_ids, None, Some(&b.attention_mask))
        .map(|_| ())
}

#[test]
fn minilm_eva_init_save_and_reload() {
    let dir = common::minilm_dir();
    let (mut model, _) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    let batches = minilm_batches(4, 16);
    let probe = &batches[0];
    let before = model
        .model()
        .forward(&probe.input_ids, None, Some(&probe.attention_mask))
        .unwrap();
    let mut config = eva_config(&["query", "key", "value"], 4, 2.0);
    config.lora_alpha = 8.0;
    let report = eva::add_eva_adapter(
        &mut model,
        "default",
        config,
        &batches,
        bert_forward,
        &quiet(80),
    )
    .unwrap();
    let after = model
        .model()
        .forward(&probe.input_ids, None, Some(&probe.attention_mask))
        .unwrap();
    assert_eq!(
        max_abs_diff(&before, &after),
        0.0,
        "EVA init changed the output"
    );

    let ranks = report.state.ranks();
    assert_eq!(ranks.len(), 18);
    assert_eq!(ranks.values().sum::<usize>(), 18 * 4, "{ranks:?}");
    assert!(ranks.values().all(|&r| r <= 8));
    // q, k and v of a block share one PCA; query leads and holds the largest rank.
    assert_eq!(report.state.shared_inputs.len(), 6);
    for i in 0..6 {
        let q = ranks[&format!("encoder.layer.{i}.attention.self.query")];
        for m in ["key", "value"] {
            assert!(q >= ranks[&format!("encoder.layer.{i}.attention.self.{m}")]);
        }
    }
    for (name, &r) in &ranks {
        if r > 0 {
            let a = lora_a(&model, name);
            assert_eq!(a.dims(), &[r, 384]);
            assert!(gram_error(&a) < 1e-5, "{name}: A Aᵀ ≠ I");
        }
    }

    // Saved as PEFT writes EVA adapters.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("eva");
    // A non-zero B, so the round trip compares something.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (name, var) in model.trainable_vars() {
        if name.contains("lora_B") {
            var.set(&randn(&mut rng, var.dims(), 0.05)).unwrap();
        }
    }
    let adapted = model
        .model()
        .forward(&probe.input_ids, None, Some(&probe.attention_mask))
        .unwrap();
    model.save_adapter(&out, "default").unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["init_lora_weights"], "eva");
    assert_eq!(json["eva_config"]["rho"], 2.0);
    assert_eq!(json["eva_config"]["tau"], 0.99);
    assert_eq!(json["r"], 4);
    let targets = json["target_modules"].as_array().unwrap();
    assert_eq!(targets.len(), ranks.values().filter(|&&r| r > 0).count());
    for (k, v) in json["rank_pattern"].as_object().unwrap() {
        assert_eq!(v.as_u64().unwrap() as usize, ranks[k]);
        assert_ne!(ranks[k], 4);
    }
    for (k, v) in json["alpha_pattern"].as_object().unwrap() {
        assert!((v.as_f64().unwrap() - 2.0 * ranks[k] as f64).abs() < 1e-12);
    }

    let (mut fresh, _) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    fresh.load_adapter(&out, "default").unwrap();
    let reloaded = fresh
        .model()
        .forward(&probe.input_ids, None, Some(&probe.attention_mask))
        .unwrap();
    assert!(max_abs_diff(&adapted, &reloaded) < 1e-6);
    match fresh.adapter_config("default").unwrap() {
        AdapterConfig::Lora(c) => assert_eq!(c.eva_config, Some(EvaConfig::default())),
        other => panic!("reloaded as {other:?}"),
    }
    fresh.merge().unwrap();
    let merged = fresh
        .model()
        .forward(&probe.input_ids, None, Some(&probe.attention_mask))
        .unwrap();
    assert!(max_abs_diff(&adapted, &merged) < 1e-4);
}

// ---------------------------------------------------------------------------------------------
// The CLI, end to end

#[test]
fn cli_train_eva_then_reload_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 48);
    let out = tmp.path().join("run");
    let minilm = common::minilm_dir();
    let run = run_ok(bin().args([
        "train",
        "--model",
        minilm.to_str().unwrap(),
        "--task",
        "classify",
        "--data",
        data.to_str().unwrap(),
        "--method",
        "eva",
        "--targets",
        "query,value",
        "--rank",
        "4",
        "--steps",
        "2",
        "--batch",
        "8",
        "--seq",
        "32",
        "--calib-batches",
        "4",
        "--merge",
        "--quiet",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]));
    let line: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(line["steps"], 2);
    let adapter = out.join("adapter");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["init_lora_weights"], "eva");
    assert_eq!(json["task_type"], "SEQ_CLS");
    let ranks: usize = json["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            json["rank_pattern"]
                .get(m.as_str().unwrap())
                .and_then(Value::as_u64)
                .unwrap_or(4) as usize
        })
        .sum();
    assert_eq!(ranks, 12 * 4, "the rank budget is kept");

    // Reload: the adapter on the base predicts what the merged export predicts.
    let texts = sst2_texts(8);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let labels = vec!["0".to_string(), "1".to_string()];
    let source = candle_peft::io::source::resolve_local(&minilm).unwrap();
    let mut task = candle_peft::ClassifyTask::from_source(
        source,
        &labels,
        candle_peft::tasks::TaskOptions {
            seq_len: 32,
            seed: 0,
            ..Default::default()
        },
    )
    .unwrap();
    task.load_adapter(&adapter, "default").unwrap();
    let with_adapter = task.logits(&refs).unwrap();
    task.model_mut().merge().unwrap();
    let merged_in_memory = task.logits(&refs).unwrap();
    assert!(max_abs_diff(&with_adapter, &merged_in_memory) < 1e-4);
    let merged_src = candle_peft::io::source::resolve_local(&out.join("merged")).unwrap();
    let exported = candle_peft::ClassifyTask::from_source(
        merged_src,
        labels,
        candle_peft::tasks::TaskOptions {
            seq_len: 32,
            seed: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let from_export = exported.logits(&refs).unwrap();
    assert!(max_abs_diff(&with_adapter, &from_export) < 1e-4);
}

// ---------------------------------------------------------------------------------------------
// Grouped-query attention: a member's rank can pass its `out`, as in PEFT

#[test]
fn components_are_round_r_rho_capped_by_in_only() {
    let eva = EvaConfig {
        rho: 1.2,
        ..EvaConfig::default()
    };
    // PEFT: `max_components[name] = round(layer_rank * rho)`; no min(in, out) cap.
    assert_eq!(eva::layer_components(&eva, 200, 576), 240);
    assert_eq!(eva::layer_components(&eva, 5, 576), 6);
    // A PCA over `in` features has at most `in` components.
    assert_eq!(eva::layer_components(&eva, 200, 100), 100);
}

/// SmolLM2's `v_proj` (576 → 192) shares its input with `q_proj` (576 → 576) and `k_proj`
/// (576 → 192). With r = 200 and ρ = 1.2 each asks round(240) components, the group computes 240,
/// and the budget of 600 splits evenly over the three (their ratios are the same numbers), so
/// `v_proj` gets rank 200 > 192: PEFT builds `A: [200, 576]`, `B: [192, 200]`, and so do we.
#[test]
fn smollm2_v_proj_takes_a_rank_above_its_out_as_in_peft() {
    let opts = candle_peft::tasks::TaskOptions {
        seq_len: 128,
        seed: 3,
        ..Default::default()
    };
    let mut task = candle_peft::tasks::CausalLmTask::from_pretrained(
        common::smollm2_gguf().to_str().unwrap(),
        opts,
    )
    .unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let examples = task
        .read_examples(&root.join("data/shakespeare/train.txt"), false)
        .unwrap();
    // One batch of 2 × 128 = 256 tokens (≥ 240 components), cycled: with the exact SVD the
    // second fit of the same rows reproduces the components, so every component converges.
    let batches: Vec<CalibrationBatch> = examples
        .chunks(2)
        .take(1)
        .map(|chunk| {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|e| e.ids.clone()).collect();
            let b = candle_peft::data::pad_batch(&seqs, 0, &Device::Cpu).unwrap();
            CalibrationBatch::new(b.input_ids, b.attention_mask)
        })
        .collect();
    // Block 2: the inputs of block 0 are per-token embeddings, whose repeats leave ratios of 0.
    let block = "model.layers.2.self_attn";
    let modules: Vec<String> = ["q_proj", "k_proj", "v_proj"]
        .iter()
        .map(|m| format!("{block}.{m}"))
        .collect();
    let targets: Vec<&str> = modules.iter().map(String::as_str).collect();
    let config = eva_config(&targets, 200, 1.2);
    let probe = Tensor::new(&examples[0].ids[..16], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let before = task.model().model().forward(&probe, None).unwrap();

    let report = eva::add_eva_adapter(
        task.model_mut(),
        "default",
        config,
        &batches,
        |m, b| {
            m.forward_hidden(&b.input_ids, Some(&b.attention_mask))
                .map(|_| ())
        },
        &EvaOptions {
            svd: Some(PcaSvd::Exact),
            ..quiet(4)
        },
    )
    .expect("EVA on a grouped-query block");
    assert_eq!(report.state.iterations, 2);

    assert_eq!(report.state.shared_inputs, vec![modules.clone()]);
    // PEFT's rule, computed here: the three members pool the same 240 ratios (any strictly
    // decreasing values), the 600 largest are taken, the leader keeps the most.
    let ratios: Vec<f64> = (0..240).map(|i| 1.0 / (i + 1) as f64).collect();
    let want = rank_distribution(&vec![ratios; 3], 600, &[0, 0, 0]);
    assert_eq!(want, vec![200, 200, 200]);
    let got: Vec<usize> = modules.iter().map(|m| report.state.ranks()[m]).collect();
    assert_eq!(got, want);

    let v = format!("{block}.v_proj");
    let vars = task.model().layer(&v).unwrap().trainable_vars("default");
    let shape = |name: &str| {
        vars.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.dims().to_vec())
            .unwrap()
    };
    assert_eq!(shape("lora_A.weight"), vec![200, 576]);
    assert_eq!(shape("lora_B.weight"), vec![192, 200]);
    // A = the PCA's orthonormal rows, B = 0: the model is the base model.
    assert!(gram_error(&lora_a(task.model(), &v)) < 1e-4);
    let after = task.model().model().forward(&probe, None).unwrap();
    assert!(max_abs_diff(&before, &after) < 1e-4);
    // r = 200 everywhere: no rank_pattern; α unchanged.
    assert!(
        report.config.rank_pattern.is_empty(),
        "{:?}",
        report.config.rank_pattern
    );
}
