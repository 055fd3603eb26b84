//! Optimiser pieces against hand-computed values: AdamW updates and state files, global-norm
//! clipping, the three learning-rate schedules with warmup, and gradient accumulation.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use candle_peft::PeftError;
use candle_peft::optim::{
    AdamW, AdamWConfig, GradAccumulator, LrSchedule, Schedule, Warmup, average_grads,
    clip_grad_norm, grad_norm,
};
use common::tiny as support;
use common::tiny::{flat, lora_random_b, rand_tensor, rng, tiny_model};

fn var(values: &[f32], shape: &[usize]) -> Var {
    Var::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
}

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
}

fn grads_for(pairs: &[(&Var, &Tensor)]) -> GradStore {
    let mut g = GradStore::default();
    for (v, grad) in pairs {
        g.insert(v.as_tensor(), (*grad).clone());
    }
    g
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tol {tol})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// PyTorch's AdamW for one element, in f64: returns (θ', m', v').
fn adamw_ref(theta: f64, m: f64, v: f64, g: f64, t: i32, lr: f64, c: &AdamWConfig) -> [f64; 3] {
    let theta = theta * (1.0 - lr * c.weight_decay);
    let m = c.beta1 * m + (1.0 - c.beta1) * g;
    let v = c.beta2 * v + (1.0 - c.beta2) * g * g;
    let m_hat = m / (1.0 - c.beta1.powi(t));
    let v_hat = v / (1.0 - c.beta2.powi(t));
    [theta - lr * m_hat / (v_hat.sqrt() + c.eps), m, v]
}

#[test]
fn adamw_step_matches_hand_computed_update_from_given_state() {
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let theta = [0.5f32, -1.0, 2.0, 0.0];
    let m = [0.1f32, -0.2, 0.05, 0.0];
    let v = [0.01f32, 0.04, 0.002, 0.0];
    let g = [0.3f32, -0.1, 0.5, 0.2];
    let lr = 0.01;
    let w = var(&theta, &[2, 2]);
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg).unwrap();
    opt.set_state("w", &t(&m, &[2, 2]), &t(&v, &[2, 2]), 3)
        .unwrap();
    let stats = opt.step(&grads_for(&[(&w, &t(&g, &[2, 2]))]), lr).unwrap();
    assert_eq!((stats.updated, stats.skipped), (1, 0));

    let want: Vec<[f64; 3]> = (0..4)
        .map(|i| {
            adamw_ref(
                theta[i].into(),
                m[i].into(),
                v[i].into(),
                g[i].into(),
                4,
                lr,
                &cfg,
            )
        })
        .collect();
    // θ₀' by hand: m' = 0.09 + 0.03 = 0.12, v' = 0.00999 + 0.00009 = 0.01008,
    // m̂ = 0.12 / (1 − 0.9⁴) = 0.12 / 0.3439, v̂ = 0.01008 / (1 − 0.999⁴),
    // θ' = 0.5·(1 − 0.001) − 0.01·m̂/(√v̂ + 1e-8).
    let m_hat = 0.12 / (1.0 - 0.9f64.powi(4));
    let v_hat = 0.01008 / (1.0 - 0.999f64.powi(4));
    let by_hand = 0.5 * 0.999 - 0.01 * m_hat / (v_hat.sqrt() + 1e-8);
    // (The inputs are f32 values, hence the tolerance.)
    assert!((want[0][0] - by_hand).abs() < 1e-8);

    let (m1, v1, step) = opt.state("w").unwrap();
    assert_eq!(step, 4);
    assert_eq!(m1.dtype(), DType::F32);
    assert_close(
        &flat(w.as_tensor()),
        &want.iter().map(|x| x[0]).collect::<Vec<_>>(),
        1e-6,
        "θ",
    );
    assert_close(
        &flat(m1),
        &want.iter().map(|x| x[1]).collect::<Vec<_>>(),
        1e-7,
        "m",
    );
    assert_close(
        &flat(v1),
        &want.iter().map(|x| x[2]).collect::<Vec<_>>(),
        1e-8,
        "v",
    );
    assert_eq!(opt.steps_taken(), 1);
}

#[test]
fn adamw_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
    // With zero state, m̂ = g and v̂ = g², so the step is lr·g/(|g| + ε) ≈ lr·sign(g).
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let w = var(&[1.0, 1.0, 1.0], &[3]);
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg).unwrap();
    opt.step(&grads_for(&[(&w, &t(&[2.0, -0.5, 1e-3], &[3]))]), 0.1)
        .unwrap();
    assert_close(&flat(w.as_tensor()), &[0.9, 1.1, 0.9], 1e-5, "θ");
}

#[test]
fn adamw_matches_candle_nn_adamw_over_several_steps() {
    let cfg = AdamWConfig {
        beta1: 0.85,
        beta2: 0.99,
        eps: 1e-6,
        weight_decay: 0.05,
    };
    let mut r = rng(3);
    let init = rand_tensor(&mut r, &[4, 3], 1.0);
    let ours = Var::from_tensor(&init).unwrap();
    let theirs = Var::from_tensor(&init).unwrap();
    let mut opt = AdamW::new(vec![("p".into(), ours.clone())], cfg).unwrap();
    let mut reference = candle_nn::AdamW::new(
        vec![theirs.clone()],
        candle_nn::ParamsAdamW {
            lr: 0.02,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )
    .unwrap();
    for _ in 0..6 {
        let g = rand_tensor(&mut r, &[4, 3], 1.0);
        opt.step(&grads_for(&[(&ours, &g)]), 0.02).unwrap();
        reference.step(&grads_for(&[(&theirs, &g)])).unwrap();
    }
    let d = support::max_abs_diff(ours.as_tensor(), theirs.as_tensor());
    assert!(d <= 1e-6, "ours and candle-nn's AdamW differ by {d}");
}

#[test]
fn adamw_skips_and_counts_vars_without_gradient() {
    let a = var(&[1.0, 2.0], &[2]);
    let b = var(&[3.0], &[1]);
    let mut opt = AdamW::new(
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    let stats = opt
        .step(&grads_for(&[(&a, &t(&[1.0, 1.0], &[2]))]), 0.1)
        .unwrap();
    assert_eq!((stats.updated, stats.skipped), (1, 1));
    assert_eq!(flat(b.as_tensor()), vec![3.0]);
    assert_eq!(opt.state("b").unwrap().2, 0);
    assert_eq!(opt.state("a").unwrap().2, 1);
}

#[test]
fn adamw_keeps_f32_state_for_bf16_vars() {
    let w = Var::from_tensor(&t(&[1.0, -1.0], &[2]).to_dtype(DType::BF16).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
    let g = t(&[0.5, 0.25], &[2]).to_dtype(DType::BF16).unwrap();
    opt.step(&grads_for(&[(&w, &g)]), 0.01).unwrap();
    let (m, v, _) = opt.state("w").unwrap();
    assert_eq!(
        (m.dtype(), v.dtype(), w.dtype()),
        (DType::F32, DType::F32, DType::BF16)
    );
    assert_close(&flat(m), &[0.05, 0.025], 1e-7, "m");
}

#[test]
fn adamw_rejects_duplicate_names_and_bad_hyperparameters() {
    let a = var(&[1.0], &[1]);
    let dup = AdamW::new(
        vec![("a".into(), a.clone()), ("a".into(), a.clone())],
        AdamWConfig::default(),
    );
    assert!(matches!(dup, Err(PeftError::InvalidConfig { .. })));
    let bad = AdamW::new(
        vec![("a".into(), a)],
        AdamWConfig {
            beta1: 1.0,
            ..AdamWConfig::default()
        },
    );
    match bad {
        Err(PeftError::InvalidConfig { field, .. }) => assert_eq!(field, "beta1"),
        other => panic!("expected InvalidConfig(beta1), got {other:?}"),
    }
}

fn two_vars(seed: u64) -> Vec<(String, Var)> {
    let mut r = rng(seed);
    vec![
        (
            "base_model.model.l.lora_A.default.weight".into(),
            Var::from_tensor(&rand_tensor(&mut r, &[2, 3], 1.0)).unwrap(),
        ),
        (
            "base_model.model.l.lora_B.default.weight".into(),
            Var::from_tensor(&rand_tensor(&mut r, &[3, 2], 1.0)).unwrap(),
        ),
    ]
}

fn random_grads(vars: &[(String, Var)], seed: u64) -> GradStore {
    let mut r = rng(seed);
    let mut g = GradStore::default();
    for (_, v) in vars {
        g.insert(v.as_tensor(), rand_tensor(&mut r, v.dims(), 1.0));
    }
    g
}

#[test]
fn optimizer_state_round_trips_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let vars = two_vars(1);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    for s in 0..3 {
        opt.step(&random_grads(&vars, 10 + s), 0.01).unwrap();
    }
    opt.save_state(&path).unwrap();
    assert!(!candle_peft::io::peft_format::temp_path(&path).exists());

    // New Vars (new ids) with the same names and values, as after rebuilding a model.
    let copies: Vec<(String, Var)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), Var::from_tensor(v.as_tensor()).unwrap()))
        .collect();
    let mut loaded = AdamW::new(copies.clone(), AdamWConfig::default()).unwrap();
    loaded.load_state(&path).unwrap();
    assert_eq!(loaded.steps_taken(), 3);
    for (name, _) in &vars {
        let (m0, v0, s0) = opt.state(name).unwrap();
        let (m1, v1, s1) = loaded.state(name).unwrap();
        assert_eq!(s0, s1);
        assert_eq!(support::bits(m0), support::bits(m1), "{name} exp_avg");
        assert_eq!(support::bits(v0), support::bits(v1), "{name} exp_avg_sq");
    }
    // One more identical step on both gives identical weights.
    opt.step(&random_grads(&vars, 99), 0.01).unwrap();
    loaded.step(&random_grads(&copies, 99), 0.01).unwrap();
    for ((n, a), (_, b)) in vars.iter().zip(&copies) {
        assert_eq!(
            support::bits(a.as_tensor()),
            support::bits(b.as_tensor()),
            "{n}"
        );
    }
}

/// `(name, dtype, shape)` of a tensor in a file.
type TensorEntry = (String, String, Vec<usize>);

/// `(name, dtype, shape)` of every tensor of a safetensors file, by name, and its metadata.
fn layout(path: &std::path::Path) -> (Vec<TensorEntry>, Vec<(String, String)>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<TensorEntry> = meta
        .tensors()
        .into_iter()
        .map(|(n, info)| (n, format!("{:?}", info.dtype), info.shape.clone()))
        .collect();
    tensors.sort();
    let mut metadata: Vec<(String, String)> =
        meta.metadata().clone().unwrap().into_iter().collect();
    metadata.sort();
    (tensors, metadata)
}

/// The state file's layout, which AdamW and LoRA-Pro write through one writer: per var
/// `<name>.exp_avg`, `<name>.exp_avg_sq` (F32, the var's shape) and `<name>.step` (I64 scalar);
/// LoRA-Pro (full) adds `lora_pro.<module>.<adapter>.*` with `[out, in]` moments; metadata
/// `format`, `optimizer`, `step` and the hyper-parameters.
#[test]
fn state_files_keep_their_layout() {
    let dir = tempfile::tempdir().unwrap();
    let vars = two_vars(1);
    let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    let dims: Vec<Vec<usize>> = vars.iter().map(|(_, v)| v.dims().to_vec()).collect();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    opt.step(&random_grads(&vars, 3), 0.01).unwrap();
    let path = dir.path().join("adamw.safetensors");
    opt.save_state(&path).unwrap();
    let (tensors, metadata) = layout(&path);
    let mut want = Vec::new();
    for (n, d) in names.iter().zip(&dims) {
        want.push((format!("{n}.exp_avg"), "F32".to_string(), d.clone()));
        want.push((format!("{n}.exp_avg_sq"), "F32".to_string(), d.clone()));
        want.push((format!("{n}.step"), "I64".to_string(), vec![]));
    }
    want.sort();
    assert_eq!(tensors, want);
    let kv = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        metadata,
        kv(&[
            ("format", "pt"),
            ("optimizer", "AdamW"),
            ("step", "1"),
            ("beta1", "0.9"),
            ("beta2", "0.999"),
            ("eps", "0.00000001"),
            ("weight_decay", "0.01"),
        ])
    );

    // LoRA-Pro (full) over a LoRA model: its pairs' moments, and AdamW's layout for the rest.
    let mut pm = tiny_model(1, 2);
    let mut cfg = lora_random_b(&["q"], 2, 4.0);
    cfg.targeting.modules_to_save = Some(vec!["head".to_string()]);
    pm.add_adapter("default", cfg).unwrap();
    let pairs = candle_peft::optim::lora_pairs(&pm).unwrap();
    let lp_config = candle_peft::optim::LoraProConfig::default();
    let mut lp =
        candle_peft::optim::LoraPro::new(pm.trainable_vars(), pairs.clone(), lp_config).unwrap();
    let grads = random_grads(&pm.trainable_vars(), 4);
    lp.step(&grads, 1e-3).unwrap();
    let path = dir.path().join("lora_pro.safetensors");
    lp.save_state(&path).unwrap();
    let (tensors, metadata) = layout(&path);
    let mut want = Vec::new();
    let paired: Vec<candle_core::TensorId> = pairs
        .iter()
        .flat_map(|p| [p.a.as_tensor().id(), p.b.as_tensor().id()])
        .collect();
    let mut unpaired = 0;
    for (n, v) in pm.trainable_vars() {
        if paired.contains(&v.as_tensor().id()) {
            continue;
        }
        unpaired += 1;
        want.push((format!("{n}.exp_avg"), "F32".to_string(), v.dims().to_vec()));
        want.push((
            format!("{n}.exp_avg_sq"),
            "F32".to_string(),
            v.dims().to_vec(),
        ));
        want.push((format!("{n}.step"), "I64".to_string(), vec![]));
    }
    assert!(
        unpaired > 0,
        "the head (modules_to_save) is outside every pair"
    );
    for p in &pairs {
        let (out, inp) = (p.b.dims()[0], p.a.dims()[1]);
        let prefix = format!("lora_pro.{}.{}", p.module, p.adapter);
        want.push((
            format!("{prefix}.exp_avg"),
            "F32".to_string(),
            vec![out, inp],
        ));
        want.push((
            format!("{prefix}.exp_avg_sq"),
            "F32".to_string(),
            vec![out, inp],
        ));
        want.push((format!("{prefix}.step"), "I64".to_string(), vec![]));
    }
    want.sort();
    assert_eq!(tensors, want);
    assert_eq!(
        metadata,
        kv(&[
            ("format", "pt"),
            ("optimizer", "LoraPro"),
            ("mode", "full"),
            ("step", "1"),
            ("beta1", "0.9"),
            ("beta2", "0.999"),
            ("eps", "0.00000001"),
            ("weight_decay", "0"),
            ("damping", "0.00000001"),
        ])
    );
}

#[test]
fn bad_optimizer_state_is_a_typed_error_naming_the_var() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let vars = two_vars(1);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    opt.step(&random_grads(&vars, 5), 0.01).unwrap();
    opt.save_state(&path).unwrap();
    let a_name = vars[0].0.clone();

    // Wrong shape: same name, transposed var.
    let mut r = rng(2);
    let wrong = vec![
        (
            a_name.clone(),
            Var::from_tensor(&rand_tensor(&mut r, &[3, 2], 1.0)).unwrap(),
        ),
        vars[1].clone(),
    ];
    let mut o = AdamW::new(wrong, AdamWConfig::default()).unwrap();
    match o.load_state(&path) {
        Err(e @ PeftError::ShapeMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("{a_name}.exp_avg")), "{msg}");
            assert!(msg.contains("[2, 3]") && msg.contains("[3, 2]"), "{msg}");
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // Nothing was loaded.
    assert_eq!(o.steps_taken(), 0);
    assert_eq!(o.state(&vars[1].0).unwrap().2, 0);

    // A var the file lacks.
    let mut extra = vars.clone();
    extra.push(("c".into(), var(&[1.0], &[1])));
    let mut o = AdamW::new(extra, AdamWConfig::default()).unwrap();
    match o.load_state(&path) {
        Err(PeftError::MissingTensor { key, .. }) => assert_eq!(key, "c.exp_avg"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    // A var the optimiser lacks.
    let mut o = AdamW::new(vec![vars[1].clone()], AdamWConfig::default()).unwrap();
    match o.load_state(&path) {
        Err(PeftError::UnexpectedTensor { key, .. }) => assert!(key.starts_with(&a_name), "{key}"),
        other => panic!("expected UnexpectedTensor, got {other:?}"),
    }

    // A truncated file.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let mut o = AdamW::new(vars, AdamWConfig::default()).unwrap();
    assert!(matches!(
        o.load_state(&path),
        Err(PeftError::Safetensors { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Clipping
// ---------------------------------------------------------------------------------------------

#[test]
fn clipping_scales_to_max_norm_as_torch_does() {
    // ‖(3, 4, 12)‖ = 13.
    let a = var(&[0.0, 0.0], &[2]);
    let b = var(&[0.0], &[1, 1]);
    let frozen = var(&[0.0], &[1]);
    let vars = vec![
        ("a".to_string(), a.clone()),
        ("b".to_string(), b.clone()),
        ("no_grad".to_string(), frozen),
    ];
    let mut g = grads_for(&[(&a, &t(&[3.0, -4.0], &[2])), (&b, &t(&[12.0], &[1, 1]))]);
    assert!((grad_norm(&g, &vars).unwrap() - 13.0).abs() < 1e-9);

    let norm = clip_grad_norm(&mut g, &vars, 6.5).unwrap();
    assert!((norm - 13.0).abs() < 1e-9, "pre-clip norm {norm}");
    let coef = 6.5 / (13.0 + 1e-6);
    assert_close(
        &flat(g.get(a.as_tensor()).unwrap()),
        &[3.0 * coef, -4.0 * coef],
        1e-6,
        "a",
    );
    assert_close(
        &flat(g.get(b.as_tensor()).unwrap()),
        &[12.0 * coef],
        1e-6,
        "b",
    );
    let after = grad_norm(&g, &vars).unwrap();
    assert!((after - 6.5).abs() < 1e-5, "post-clip norm {after}");

    // Below the threshold: untouched, bit for bit.
    let mut g = grads_for(&[(&a, &t(&[3.0, -4.0], &[2]))]);
    let norm = clip_grad_norm(&mut g, &vars, 5.5).unwrap();
    assert!((norm - 5.0).abs() < 1e-9);
    assert_eq!(flat(g.get(a.as_tensor()).unwrap()), vec![3.0, -4.0]);

    assert!(matches!(
        clip_grad_norm(&mut g, &vars, 0.0),
        Err(PeftError::InvalidConfig { .. })
    ));
}

#[test]
fn clipping_reports_a_non_finite_norm_and_leaves_grads_alone() {
    let a = var(&[0.0, 0.0], &[2]);
    let vars = vec![("a".to_string(), a.clone())];
    let mut g = grads_for(&[(&a, &t(&[f32::NAN, 1.0], &[2]))]);
    let norm = clip_grad_norm(&mut g, &vars, 1.0).unwrap();
    assert!(norm.is_nan());
    assert_eq!(flat(g.get(a.as_tensor()).unwrap())[1], 1.0);
}

// ---------------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------------

fn check_schedule(s: &LrSchedule, expected: &[(usize, f64)]) {
    for &(step, want) in expected {
        let got = s.multiplier(step);
        assert!(
            (got - want).abs() < 1e-12,
            "{:?} step {step}: got {got}, want {want}",
            s.schedule
        );
        assert!((s.lr(step) - s.base_lr * want).abs() < 1e-15);
    }
}

#[test]
fn constant_schedule_with_warmup() {
    let s = LrSchedule::new(Schedule::Constant, 3e-4, Warmup::Steps(4), 10).unwrap();
    check_schedule(
        &s,
        &[
            (0, 0.0),
            (1, 0.25),
            (2, 0.5),
            (3, 0.75),
            (4, 1.0),
            (9, 1.0),
            (20, 1.0),
        ],
    );
    let s = LrSchedule::new(Schedule::Constant, 1.0, Warmup::Steps(0), 10).unwrap();
    check_schedule(&s, &[(0, 1.0), (9, 1.0)]);
}

#[test]
fn linear_schedule_with_warmup() {
    // W = 2, T = 10: warmup 0, ½; then (10 − s)/8.
    let s = LrSchedule::new(Schedule::Linear, 1e-3, Warmup::Steps(2), 10).unwrap();
    check_schedule(
        &s,
        &[
            (0, 0.0),
            (1, 0.5),
            (2, 1.0),
            (3, 0.875),
            (6, 0.5),
            (9, 0.125),
            (10, 0.0),
            (13, 0.0),
        ],
    );
    // No warmup: (T − s)/T.
    let s = LrSchedule::new(Schedule::Linear, 1.0, Warmup::Steps(0), 4).unwrap();
    check_schedule(&s, &[(0, 1.0), (1, 0.75), (3, 0.25)]);
}

#[test]
fn cosine_schedule_with_warmup() {
    // W = 2, T = 10: p = (s − 2)/8, f = ½(1 + cos πp).
    let s = LrSchedule::new(Schedule::Cosine, 1.0, Warmup::Steps(2), 10).unwrap();
    let r = std::f64::consts::FRAC_1_SQRT_2;
    check_schedule(
        &s,
        &[
            (0, 0.0),
            (1, 0.5),
            (2, 1.0),
            (4, 0.5 * (1.0 + r)),
            (6, 0.5),
            (8, 0.5 * (1.0 - r)),
            (10, 0.0),
        ],
    );
    // 0.853553390593…, 0.146446609406… as printed by transformers.
    assert!((s.multiplier(4) - 0.853_553_390_593_273_7).abs() < 1e-12);
    assert!((s.multiplier(8) - 0.146_446_609_406_726_24).abs() < 1e-12);
}

#[test]
fn warmup_ratio_and_parsing() {
    // ⌈0.1·95⌉ = 10, ⌈0.1·100⌉ = 10, ⌈0.25·10⌉ = 3.
    assert_eq!(Warmup::Ratio(0.1).steps(95).unwrap(), 10);
    assert_eq!(Warmup::Ratio(0.1).steps(100).unwrap(), 10);
    assert_eq!(Warmup::Ratio(0.25).steps(10).unwrap(), 3);
    assert!(Warmup::Ratio(1.5).steps(10).is_err());

    let s = LrSchedule::new(Schedule::Linear, 1.0, "0.25".parse().unwrap(), 10).unwrap();
    assert_eq!(s.warmup_steps, 3);
    check_schedule(
        &s,
        &[
            (0, 0.0),
            (1, 1.0 / 3.0),
            (2, 2.0 / 3.0),
            (3, 1.0),
            (5, 5.0 / 7.0),
        ],
    );

    assert_eq!("0.1".parse::<Warmup>().unwrap(), Warmup::Ratio(0.1));
    assert_eq!("1.0".parse::<Warmup>().unwrap(), Warmup::Ratio(1.0));
    assert_eq!("100".parse::<Warmup>().unwrap(), Warmup::Steps(100));
    assert_eq!("0".parse::<Warmup>().unwrap(), Warmup::Steps(0));
    for bad in ["1.5", "-1", "abc", ""] {
        assert!(
            matches!(bad.parse::<Warmup>(), Err(PeftError::InvalidConfig { .. })),
            "{bad:?} should not parse"
        );
    }
    assert_eq!("cosine".parse::<Schedule>().unwrap(), Schedule::Cosine);
    assert_eq!("Linear".parse::<Schedule>().unwrap(), Schedule::Linear);
    assert_eq!("constant".parse::<Schedule>().unwrap(), Schedule::Constant);
    assert!("step".parse::<Schedule>().is_err());
    assert_eq!(Schedule::Cosine.to_string(), "cosine");
}

// ---------------------------------------------------------------------------------------------
// Accumulation
// ---------------------------------------------------------------------------------------------

#[test]
fn accumulation_of_two_halves_equals_the_full_batch_by_hand() {
    // loss(w) = mean_i (w·x_i − y_i)²; ∇ = (2/n) Σ_i (w·x_i − y_i) x_i.
    let w0 = [0.5f32, -0.25, 1.0];
    let w = var(&w0, &[3, 1]);
    let vars = vec![("w".to_string(), w.clone())];
    let mut r = rng(7);
    let x = rand_tensor(&mut r, &[16, 3], 1.0);
    let y = rand_tensor(&mut r, &[16, 1], 1.0);
    let loss = |x: &Tensor, y: &Tensor| {
        x.matmul(w.as_tensor())
            .unwrap()
            .sub(y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let full = loss(&x, &y).backward().unwrap();
    let mut acc = GradAccumulator::new(&vars);
    for half in 0..2 {
        let xs = x.narrow(0, 8 * half, 8).unwrap();
        let ys = y.narrow(0, 8 * half, 8).unwrap();
        acc.add(&loss(&xs, &ys).backward().unwrap()).unwrap();
    }
    assert_eq!(acc.count(), 2);
    let accumulated = acc.finish().unwrap();

    let xv = flat(&x);
    let yv = flat(&y);
    let mut by_hand = [0f64; 3];
    for i in 0..16 {
        let pred: f64 = (0..3)
            .map(|j| f64::from(w0[j]) * f64::from(xv[3 * i + j]))
            .sum();
        let resid = pred - f64::from(yv[i]);
        for j in 0..3 {
            by_hand[j] += 2.0 / 16.0 * resid * f64::from(xv[3 * i + j]);
        }
    }
    assert_close(
        &flat(full.get(w.as_tensor()).unwrap()),
        &by_hand,
        1e-5,
        "1×16",
    );
    assert_close(
        &flat(accumulated.get(w.as_tensor()).unwrap()),
        &by_hand,
        1e-5,
        "2×8",
    );
}

#[test]
fn accumulation_two_by_eight_equals_one_by_sixteen_on_a_lora_model() {
    let mut pm = tiny_model(1, 2);
    pm.add_adapter("default", lora_random_b(&["q", "v", "head"], 2, 4.0))
        .unwrap();
    let vars = pm.trainable_vars();
    let mut r = rng(11);
    let x = rand_tensor(&mut r, &[16, 5, support::HIDDEN], 1.0);
    let y = rand_tensor(&mut r, &[16, 5, support::OUT], 1.0);
    let loss = |x: &Tensor, y: &Tensor| {
        let pred = pm.model().forward(x).unwrap();
        pred.sub(y).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let full = loss(&x, &y).backward().unwrap();
    let halves: Vec<GradStore> = (0..2)
        .map(|h| {
            loss(
                &x.narrow(0, 8 * h, 8).unwrap(),
                &y.narrow(0, 8 * h, 8).unwrap(),
            )
            .backward()
            .unwrap()
        })
        .collect();
    let acc = average_grads(&[&halves[0], &halves[1]], &vars).unwrap();
    let mut worst = 0f32;
    for (name, v) in &vars {
        let a = full
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no grad"));
        let b = acc.get(v.as_tensor()).unwrap();
        let d = support::max_abs_diff(a, b);
        assert!(d <= 1e-5, "{name}: 2×8 and 1×16 differ by {d}");
        worst = worst.max(d);
    }
    println!("2×8 vs 1×16: {} vars, max |Δ| = {worst:e}", vars.len());
    // The accumulated store holds only the trainable vars.
    assert_eq!(acc.get_ids().count(), vars.len());
}

#[test]
fn accumulating_nothing_is_an_error() {
    let vars = vec![("a".to_string(), var(&[1.0], &[1]))];
    assert!(GradAccumulator::new(&vars).finish().is_err());
}
