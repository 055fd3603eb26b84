//! CorDA: the covariance-oriented decomposition reconstructs W, IPM and KPM pick the largest and
//! smallest components, the damping loop inverts a singular covariance, the adapted model is the
//! base model at init, the CORDA file round-trips, `convert --to peft-lora` reproduces the
//! fine-tuned model on the original base, bad calibration data names the layer, and the CLI runs
//! end to end on all-MiniLM-L6-v2.
mod common;
use common::bin;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_peft::adapters::corda::{CordaConfig, CordaMethod};
use candle_peft::data::{load_tokenizer, read_tsv};
use candle_peft::data_init::convert;
use candle_peft::data_init::corda::{
    self, CordaOptions, CovarianceStatistic, damped_inverse, oriented_svd, split_factors,
};
use candle_peft::data_init::{
    self as calibrate, CalibrationBatch, CalibrationOptions, RowStatistic, text_batches,
};
use candle_peft::linalg::{self, Precision};
use candle_peft::{AdapterConfig, BertModel, PeftBuilder, PeftLinear, PeftModel, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use common::{max_abs_diff, run_err, run_ok};

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(candle_peft::init::normal(rng, n, std), shape, &Device::Cpu).unwrap()
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

/// The covariance CorDA accumulates from `batches` of rows.
fn covariance(batches: &[Tensor]) -> Tensor {
    let mut stat = CovarianceStatistic::new("w");
    for b in batches {
        stat.update(b).unwrap();
    }
    stat.covariance().unwrap()
}

#[test]
fn covariance_follows_the_reference_normalisation() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x1 = randn(&mut rng, &[7, 5], 1.0);
    let x2 = (randn(&mut rng, &[4, 5], 1.0) - 3.0).unwrap();
    let got = covariance(&[x1.clone(), x2.clone()]);
    // Each update is one sequence: C = mean over them of (X/|max X|)ᵀ (X/|max X|), with the
    // signed max.
    let term = |x: &Tensor| {
        let x = f64_of(x);
        let m = x
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let x = (x / m.abs()).unwrap();
        x.t().unwrap().matmul(&x).unwrap()
    };
    let want = ((term(&x1) + term(&x2)).unwrap() / 2.0).unwrap();
    // The products and their sum run in f32.
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap() as f32;
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-6 * scale, "{diff} (largest entry {scale})");
}

/// PEFT's covariance of three sequences (`scripts/fixtures/corda_covariance.py`): the inputs
/// `[3, 6, 5]`, the sequence count and `C: [5, 5]`.
fn peft_covariance_fixture() -> (Vec<f32>, usize, Tensor) {
    let path = common::fixture("corda_covariance.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/fixtures/corda_covariance.py)",
            path.display()
        )
    });
    let v: Value = serde_json::from_str(&text).unwrap();
    let flat = |v: &Value| -> Vec<f64> {
        fn walk(v: &Value, out: &mut Vec<f64>) {
            match v {
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                x => out.push(x.as_f64().unwrap()),
            }
        }
        let mut out = Vec::new();
        walk(v, &mut out);
        out
    };
    let inputs: Vec<f32> = flat(&v["inputs"]).into_iter().map(|x| x as f32).collect();
    assert_eq!(inputs.len(), 3 * 6 * 5);
    let cov = Tensor::from_vec(flat(&v["covariance"]), (5, 5), &Device::Cpu).unwrap();
    (inputs, v["sequences"].as_u64().unwrap() as usize, cov)
}

/// The covariance of the shared input of the toy's `a` and `c` after one calibration pass.
fn pass_covariance(batch: CalibrationBatch) -> (Tensor, usize) {
    let model = toy(5);
    let (layers, _) =
        calibrate::target_layers(&model, &toy_config(2, CordaMethod::Ipm).targeting).unwrap();
    let mut groups = calibrate::collect(
        layers,
        &[batch],
        |b| toy_forward(model.model(), b),
        |g, _| Ok(CovarianceStatistic::new(format!("{:?}", g.members))),
        &CalibrationOptions { quiet: true },
        "CorDA",
    )
    .unwrap();
    let (group, stat, _) = groups.remove(0);
    assert_eq!(group.members, vec![0, 2], "a and c share the input");
    (stat.covariance().unwrap(), stat.sequences())
}

fn assert_close_rel(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    let (diff, scale) = (max_abs_diff(got, want), common::tensors::max_abs(want));
    println!("{what}: max |Δ| {diff:.3e} (largest entry {scale:.3e})");
    assert!(
        diff <= tol * scale,
        "{what}: max |Δ| {diff} vs largest entry {scale}"
    );
}

/// A batch of three sequences gives PEFT's covariance: each sequence divided by its own |max|,
/// the sum divided by the number of sequences. (Divided by the batch's |max| and by 1 batch, it
/// would not: the sequences have different scales.) Padding changes nothing: padded positions
/// take no part, neither in the products nor in the maxima.
#[test]
fn covariance_of_a_batch_matches_peft_per_sequence() {
    let (inputs, sequences, want) = peft_covariance_fixture();
    assert_eq!(sequences, 3);
    let x = Tensor::from_vec(inputs.clone(), (3, 6, 5), &Device::Cpu).unwrap();
    let mask = Tensor::ones((3, 6), DType::U32, &Device::Cpu).unwrap();
    let (got, n) = pass_covariance(CalibrationBatch::new(x, mask));
    assert_eq!(n, 3);
    assert_close_rel(&got, &want, 1e-5, "unpadded batch vs PEFT");

    // The same sequences in a batch of 8 positions: sequences 0 and 2 right-padded, sequence 1
    // left-padded, padding holding large values that would set the maximum if they counted.
    let mut padded = vec![50f32; 3 * 8 * 5];
    let mut mask = vec![0u32; 3 * 8];
    for s in 0..3 {
        let offset = if s == 1 { 2 } else { 0 };
        for t in 0..6 {
            let src = (s * 6 + t) * 5;
            let dst = (s * 8 + t + offset) * 5;
            padded[dst..dst + 5].copy_from_slice(&inputs[src..src + 5]);
            mask[s * 8 + t + offset] = 1;
        }
    }
    let x = Tensor::from_vec(padded, (3, 8, 5), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (3, 8), &Device::Cpu).unwrap();
    let (got, n) = pass_covariance(CalibrationBatch::new(x, mask));
    assert_eq!(n, 3);
    assert_close_rel(&got, &want, 1e-5, "padded batch vs PEFT");

    // The normalisation by the whole batch's |max| would be another matrix.
    let x = Tensor::from_vec(inputs, (18, 5), &Device::Cpu).unwrap();
    let per_batch = covariance(&[x]);
    let diff = max_abs_diff(&per_batch, &want);
    assert!(
        diff > 1e-2,
        "per-batch normalisation is indistinguishable ({diff})"
    );
}

#[test]
fn oriented_svd_reconstructs_w() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (out, inp) = (10, 8);
    let w = randn(&mut rng, &[out, inp], 0.5);
    let c = covariance(&[randn(&mut rng, &[40, inp], 1.0)]);
    let damped = damped_inverse(&c, "w").unwrap();
    assert_eq!(
        damped.damp, 0.01,
        "a well-conditioned C needs no extra damping"
    );
    assert!(damped.inverse_error < 1e-10);
    let dec = oriented_svd(&w, &damped).unwrap();
    assert_eq!(dec.u.dims(), &[out, inp]);
    assert_eq!(dec.v.dims(), &[inp, inp]);
    // W = U diag(S) Vᵀ exactly (up to f64 rounding), though V is not orthonormal …
    let usv = dec.u.broadcast_mul(&dec.s.unsqueeze(0).unwrap()).unwrap();
    let rebuilt = usv.matmul(&dec.v.t().unwrap()).unwrap();
    assert!(max_abs_diff(&rebuilt, &f64_of(&w)) < 1e-10);
    let eye = Tensor::eye(inp, DType::F64, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&dec.v.t().unwrap().matmul(&dec.v).unwrap(), &eye) > 1e-3);
    // … Ĉ V is, and U is.
    let cv = damped.damped.matmul(&dec.v).unwrap();
    assert!(max_abs_diff(&cv.t().unwrap().matmul(&cv).unwrap(), &eye) < 1e-10);
    assert!(max_abs_diff(&dec.u.t().unwrap().matmul(&dec.u).unwrap(), &eye) < 1e-10);
    let s = dec.s.to_vec1::<f64>().unwrap();
    assert!(s.windows(2).all(|p| p[0] >= p[1]));
}

#[test]
fn ipm_and_kpm_take_the_largest_and_smallest_components() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (out, inp, r) = (9, 7, 3);
    let w = randn(&mut rng, &[out, inp], 0.5);
    let c = covariance(&[randn(&mut rng, &[30, inp], 1.0)]);
    let dec = oriented_svd(&w, &damped_inverse(&c, "w").unwrap()).unwrap();
    let s = dec.s.to_vec1::<f64>().unwrap();
    let scaling = 16.0 / r as f64;
    for (method, start) in [(CordaMethod::Ipm, 0), (CordaMethod::Kpm, inp - r)] {
        let f = split_factors(&dec, r, method, scaling, "w").unwrap();
        assert_eq!(f.a.dims(), &[r, inp]);
        assert_eq!(f.b.dims(), &[out, r]);
        // s·B A = U_r diag(S_r) V_rᵀ for the chosen r components.
        let got = (f64_of(&f.b).matmul(&f64_of(&f.a)).unwrap() * scaling).unwrap();
        let u = dec.u.narrow(1, start, r).unwrap();
        let sr = dec.s.narrow(0, start, r).unwrap();
        let v = dec.v.narrow(1, start, r).unwrap();
        let want = u
            .broadcast_mul(&sr.unsqueeze(0).unwrap())
            .unwrap()
            .matmul(&v.t().unwrap())
            .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5, "{method}");
        // B = U_r diag(√(S_r/s)): its column norms are √(S_r/s).
        let norms = f64_of(&f.b).sqr().unwrap().sum(0).unwrap().sqrt().unwrap();
        for (i, n) in norms.to_vec1::<f64>().unwrap().iter().enumerate() {
            assert!(
                (n - (s[start + i] / scaling).sqrt()).abs() < 1e-5,
                "{method} column {i}"
            );
        }
    }
    assert!(s[r - 1] >= s[inp - r], "IPM's smallest ≥ KPM's largest");
    let err = split_factors(&dec, inp + 1, CordaMethod::Ipm, 1.0, "w")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("module `w`") && err.contains("rank 8"),
        "{err}"
    );
}

#[test]
fn damping_inverts_a_singular_covariance() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // 3 rows in 12 dimensions: C has rank 3.
    let c = covariance(&[randn(&mut rng, &[3, 12], 1.0)]);
    let rank = linalg::singular_values(&c, Precision::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .filter(|&&v| v > 1e-5)
        .count();
    assert_eq!(rank, 3);
    let d = damped_inverse(&c, "w").unwrap();
    assert!(d.inverse_error < 0.05);
    assert!(d.damp >= 0.01);
    assert!(linalg::first_non_finite(&d.inverse).unwrap().is_none());
    let eye = Tensor::eye(12, DType::F64, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&d.damped.matmul(&d.inverse).unwrap(), &eye) < 1e-6);
    // A covariance without signal is an error naming the layer.
    let zero = Tensor::zeros((4, 4), DType::F64, &Device::Cpu).unwrap();
    let err = damped_inverse(&zero, "layer.x").unwrap_err().to_string();
    assert!(err.contains("module `layer.x`"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// A toy model: layers `a` and `c` read the input (one shared tensor), `b` reads a·x.

struct Toy {
    a: PeftLinear,
    b: PeftLinear,
    c: PeftLinear,
}

impl Toy {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ya = self.a.forward_peft(x)?;
        let yc = self.c.forward_peft(x)?;
        let yb = self.b.forward_peft(&ya.tanh()?)?;
        Ok(Tensor::cat(&[yb, yc], D::Minus1)?)
    }
}

fn toy(d: usize) -> PeftModel<Toy> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut w = HashMap::new();
    for name in ["a", "b", "c"] {
        w.insert(format!("{name}.weight"), randn(&mut rng, &[d, d], 0.3));
        w.insert(format!("{name}.bias"), randn(&mut rng, &[d], 0.1));
    }
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let model = Toy {
        a: b.linear(d, d, true, "a").unwrap(),
        b: b.linear(d, d, true, "b").unwrap(),
        c: b.linear(d, d, true, "c").unwrap(),
    };
    PeftModel::new(model, &b)
}

fn toy_forward(m: &Toy, b: &CalibrationBatch) -> Result<()> {
    m.forward(&b.input_ids).map(|_| ())
}

fn toy_batches(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Vec<CalibrationBatch> {
    (0..n)
        .map(|_| {
            let x = (randn(rng, &[3, 8, d], 1.0) + 0.5).unwrap();
            CalibrationBatch::new(x, Tensor::ones((3, 8), DType::U32, &Device::Cpu).unwrap())
        })
        .collect()
}

fn quiet() -> CordaOptions {
    CordaOptions {
        calibration: CalibrationOptions { quiet: true },
    }
}

fn toy_config(r: usize, method: CordaMethod) -> CordaConfig {
    let mut c = CordaConfig::new(&["a", "b", "c"], r, 2.0 * r as f64);
    c.corda_method = method;
    c
}

#[test]
fn init_is_the_base_model_and_the_file_round_trips() {
    let d = 12;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let batches = toy_batches(&mut rng, 4, d);
    let probe = randn(&mut rng, &[2, 5, d], 1.0);
    for method in [CordaMethod::Ipm, CordaMethod::Kpm] {
        let mut model = toy(d);
        let base = model.model().forward(&probe).unwrap();
        let state = corda::add_corda_adapter(
            &mut model,
            "default",
            toy_config(3, method),
            &batches,
            toy_forward,
            &quiet(),
        )
        .unwrap();
        assert_eq!(
            state.shared_inputs,
            vec![vec!["a".to_string(), "c".to_string()]]
        );
        assert_eq!(state.layers["a"].0, 4 * 24, "usable rows");
        let init = model.model().forward(&probe).unwrap();
        assert_eq!(max_abs_diff(&base, &init), 0.0, "{method}: Δ ≠ 0 at init");

        // Every adapter gets a gradient (B = U√S ≠ 0 and A = √S Vᵀ ≠ 0).
        model.train();
        let loss = model
            .model()
            .forward(&probe)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = model.trainable_vars();
        assert_eq!(vars.len(), 6);
        for (name, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no grad for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name}: zero gradient");
        }
        model.eval();

        // "Train": move A and B; then save, reload on a fresh base, merge and unmerge.
        for (_, var) in &vars {
            let moved = (var.as_tensor() + randn(&mut rng, var.dims(), 0.05)).unwrap();
            var.set(&moved).unwrap();
        }
        let tuned = model.model().forward(&probe).unwrap();
        assert!(max_abs_diff(&tuned, &base) > 1e-3);
        let tmp = tempfile::tempdir().unwrap();
        model.save_adapter(tmp.path(), "default").unwrap();
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(json["peft_type"], "CORDA");
        assert_eq!(json["corda_config"]["corda_method"], method.to_string());
        let mut fresh = toy(d);
        fresh.load_adapter(tmp.path(), "default").unwrap();
        let reloaded = fresh.model().forward(&probe).unwrap();
        assert_eq!(max_abs_diff(&tuned, &reloaded), 0.0);
        match fresh.adapter_config("default").unwrap() {
            AdapterConfig::Corda(c) => assert_eq!(c.corda_method, method),
            other => panic!("reloaded as {other:?}"),
        }
        fresh.merge().unwrap();
        let merged = fresh.model().forward(&probe).unwrap();
        assert!(max_abs_diff(&tuned, &merged) < 1e-5);
        fresh.unmerge().unwrap();
        fresh.disable().unwrap();
        let pristine = fresh.model().forward(&probe).unwrap();
        assert!(max_abs_diff(&base, &pristine) < 1e-5, "disabled ≠ base");
    }
}

#[test]
fn convert_to_peft_lora_reproduces_the_tuned_model() {
    let d = 10;
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let batches = toy_batches(&mut rng, 3, d);
    let probe = randn(&mut rng, &[2, 4, d], 1.0);
    let mut model = toy(d);
    let mut config = toy_config(2, CordaMethod::Kpm);
    config.rank_pattern.insert("b".into(), 3);
    config.alpha_pattern.insert("c".into(), 5.0);
    corda::add_corda_adapter(
        &mut model,
        "default",
        config,
        &batches,
        toy_forward,
        &quiet(),
    )
    .unwrap();
    for (_, var) in model.trainable_vars() {
        let moved = (var.as_tensor() + randn(&mut rng, var.dims(), 0.05)).unwrap();
        var.set(&moved).unwrap();
    }
    let tuned = model.model().forward(&probe).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let corda_dir = tmp.path().join("corda");
    model.save_adapter(&corda_dir, "default").unwrap();
    let (config, tensors) = {
        let file = candle_peft::io::peft_format::read_adapter_dir(&corda_dir).unwrap();
        match file.config {
            AdapterConfig::Corda(c) => (c, file.tensors),
            other => panic!("{other:?}"),
        }
    };
    let (out, report) = convert::to_peft_lora(&config, tensors).unwrap();
    let lora = report.config.clone();
    assert_eq!(lora.r, 4);
    assert_eq!(lora.lora_alpha, 8.0);
    assert_eq!(lora.rank_pattern.get("b"), Some(&6));
    assert_eq!(lora.alpha_pattern.get("c"), Some(&10.0));
    assert_eq!(report.modules, vec!["a", "b", "c"]);
    let lora_dir = tmp.path().join("lora");
    candle_peft::io::peft_format::write_adapter_dir(&lora_dir, &AdapterConfig::Lora(lora), &out)
        .unwrap();
    let mut fresh = toy(d);
    fresh.load_adapter(&lora_dir, "default").unwrap();
    let as_lora = fresh.model().forward(&probe).unwrap();
    assert!(max_abs_diff(&tuned, &as_lora) <= 1e-5);
    fresh.merge().unwrap();
    let merged = fresh.model().forward(&probe).unwrap();
    assert!(
        max_abs_diff(&tuned, &merged) <= 1e-5,
        "convert then merge ≠ tuned model"
    );
}

#[test]
fn bad_calibration_data_names_the_layer() {
    let d = 8;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = randn(&mut rng, &[2, 4, d], 1.0);
    let mut model = toy(d);
    let empty = vec![CalibrationBatch::new(
        x.clone(),
        Tensor::zeros((2, 4), DType::U32, &Device::Cpu).unwrap(),
    )];
    let err = corda::add_corda_adapter(
        &mut model,
        "default",
        toy_config(2, CordaMethod::Ipm),
        &empty,
        toy_forward,
        &quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("module `a, c; b`:") && err.contains("no usable token"),
        "{err}"
    );

    // Three usable rows in all, for rank 4.
    let mask = Tensor::from_vec(vec![1u32, 1, 0, 0, 1, 0, 0, 0], (2, 4), &Device::Cpu).unwrap();
    let few = vec![CalibrationBatch::new(x, mask)];
    let err = corda::add_corda_adapter(
        &mut model,
        "default",
        toy_config(4, CordaMethod::Ipm),
        &few,
        toy_forward,
        &quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("module `a`:") && err.contains("3 usable rows") && err.contains("rank 4"),
        "{err}"
    );
    assert!(model.adapter_names().is_empty());
    // Without a calibration, the config alone cannot build the adapter.
    let err = model
        .add_adapter("default", toy_config(2, CordaMethod::Ipm))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("module `a`") && err.contains("calibration"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// all-MiniLM-L6-v2

fn sst2() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sst2/train.tsv")
}

fn sst2_texts(n: usize) -> Vec<String> {
    read_tsv(sst2())
        .unwrap()
        .examples
        .into_iter()
        .take(n)
        .map(|e| e.text)
        .collect()
}

#[test]
fn minilm_corda_init_is_exact() {
    let dir = common::minilm_dir();
    let (mut model, _) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    let tok = load_tokenizer(dir.join("tokenizer.json"), 48).unwrap();
    let texts = sst2_texts(24);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batches = text_batches(&tok, &refs, 8, 3, 48, &Device::Cpu).unwrap();
    let b0 = &batches[0];
    let forward = |m: &BertModel, b: &CalibrationBatch| {
        m.forward(&b.input_ids, None, Some(&b.attention_mask))
            .map(|_| ())
    };
    let run = |m: &PeftModel<BertModel>| {
        m.model()
            .forward(&b0.input_ids, None, Some(&b0.attention_mask))
            .unwrap()
    };
    // The adapted layers run as separate ops (CorDA has no fused form), so the base output to
    // compare with is the separate ops' too: a layer with an input observer is never fused.
    let fused_base = run(&model);
    let set_observers = |m: &PeftModel<BertModel>, on: bool| {
        for layer in m.model().linears() {
            let noop: candle_peft::layer::InputObserver = std::sync::Arc::new(|_| Ok(()));
            layer.handle().set_input_observer(on.then_some(noop));
        }
    };
    set_observers(&model, true);
    let base = run(&model);
    set_observers(&model, false);
    // The fused encoder blocks run the separate ops' kernels in the same order: the same bits.
    assert_eq!(max_abs_diff(&fused_base, &base), 0.0);
    let targets = [
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
    ];
    let config = CordaConfig::new(&targets, 4, 8.0);
    let state =
        corda::add_corda_adapter(&mut model, "default", config, &batches, forward, &quiet())
            .unwrap();
    // q/k/v of a block share an input; the two dense layers each have their own.
    assert_eq!(state.factors.len(), 6 * 5);
    assert_eq!(state.shared_inputs.len(), 6);
    assert_eq!(max_abs_diff(&base, &run(&model)), 0.0);
}

#[test]
fn cli_train_corda_convert_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 40);
    let out = tmp.path().join("run");
    let minilm = common::minilm_dir();
    let minilm_s = minilm.to_str().unwrap();
    let train = |extra: &[&str]| {
        let mut cmd = bin();
        cmd.args([
            "train",
            "--model",
            minilm_s,
            "--task",
            "classify",
            "--data",
            data.to_str().unwrap(),
            "--method",
            "corda",
            "--rank",
            "4",
            "--batch",
            "8",
            "--seq",
            "32",
            "--calib-batches",
            "3",
            "--quiet",
        ]);
        cmd.args(extra);
        cmd
    };
    run_ok(&mut train(&[
        "--corda-mode",
        "kpm",
        "--steps",
        "2",
        "--merge",
        "--out",
        out.to_str().unwrap(),
    ]));
    let adapter = out.join("adapter");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "CORDA");
    assert_eq!(json["corda_config"]["corda_method"], "kpm");
    // inspect counts A and B (r = 4 on 12 query/value layers of 384 → 384) and the classifier
    // (384·2 + 2), not the frozen A0 and B0.
    let inspected = run_ok(bin().arg("inspect").arg(&adapter).arg("--json"));
    let report: Value =
        serde_json::from_str(String::from_utf8_lossy(&inspected.stdout).trim()).unwrap();
    assert_eq!(
        report["trainable_params"],
        12 * (4 * 384 + 384 * 4) + 770,
        "{report}"
    );

    // convert --to peft-lora, then reload both on the original base.
    let lora_dir = tmp.path().join("lora");
    let converted = run_ok(bin().args([
        "convert",
        adapter.to_str().unwrap(),
        "--to",
        "peft-lora",
        "--base",
        minilm_s,
        "--out",
        lora_dir.to_str().unwrap(),
    ]));
    assert!(String::from_utf8_lossy(&converted.stdout).contains("rank-8"));
    let lora_json: Value = serde_json::from_str(
        &std::fs::read_to_string(lora_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(lora_json["peft_type"], "LORA");
    assert_eq!(lora_json["r"], 8);
    assert_eq!(lora_json["lora_alpha"], 32);

    let texts = sst2_texts(8);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let labels = vec!["0".to_string(), "1".to_string()];
    let source = candle_peft::io::source::resolve_local(&minilm).unwrap();
    let task_with = |dir: &Path| {
        let mut t = candle_peft::ClassifyTask::from_source(
            source.clone(),
            &labels,
            candle_peft::tasks::TaskOptions {
                seq_len: 32,
                seed: 0,
                ..Default::default()
            },
        )
        .unwrap();
        t.load_adapter(dir, "default").unwrap();
        t
    };
    let tuned = task_with(&adapter).logits(&refs).unwrap();
    let mut as_lora = task_with(&lora_dir);
    assert!(max_abs_diff(&tuned, &as_lora.logits(&refs).unwrap()) <= 1e-5);
    as_lora.model_mut().merge().unwrap();
    assert!(
        max_abs_diff(&tuned, &as_lora.logits(&refs).unwrap()) <= 1e-5,
        "convert then merge ≠ the fine-tuned model"
    );
    // The merged export of `train --merge` predicts the same.
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
    assert!(max_abs_diff(&tuned, &exported.logits(&refs).unwrap()) < 1e-4);

    // --steps 0 saves the initial adapter, whose Δ is exactly 0.
    let init = tmp.path().join("init");
    run_ok(&mut train(&[
        "--out",
        init.to_str().unwrap(),
        "--steps",
        "0",
    ]));
    let file = candle_peft::io::peft_format::read_adapter_dir(&init.join("adapter")).unwrap();
    let t = &file.tensors;
    let key = "base_model.model.bert.encoder.layer.0.attention.self.query";
    assert_eq!(
        max_abs_diff(
            &t[&format!("{key}.lora_A.weight")],
            &t[&format!("{key}.corda_A0.weight")]
        ),
        0.0
    );

    // Bad flags and inputs fail with a clear message.
    let err = run_err(&mut train(&[
        "--corda-mode",
        "xyz",
        "--out",
        init.to_str().unwrap(),
    ]));
    assert!(err.contains("xyz") && err.contains("ipm or kpm"), "{err}");
    let err = run_err(bin().args([
        "convert",
        lora_dir.to_str().unwrap(),
        "--to",
        "peft-lora",
        "--base",
        minilm_s,
        "--out",
        tmp.path().join("again").to_str().unwrap(),
    ]));
    assert!(err.contains("only CorDA adapters"), "{err}");
}
