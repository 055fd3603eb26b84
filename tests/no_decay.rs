//! Weight decay skips the trainables that start at a base-model value: AdamW's and LoRA-Pro's
//! exempt sets (bit-identical exempt vars, exactly `(1 − lr·λ)` on the others), each adapter's
//! exempt list through `PeftModel::no_weight_decay_vars`, and a Trainer run (with a resume) on
//! a zero-gradient task that leaves SVFit's σ' untouched while the classifier copy decays.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_peft::adapters::corda::{CordaConfig, CordaFactors};
use candle_peft::adapters::flora::FloraConfig;
use candle_peft::adapters::loldu::LolduConfig;
use candle_peft::adapters::randlora::RandLoraConfig;
use candle_peft::adapters::salt::SaltConfig;
use candle_peft::adapters::svfit::SvfitConfig;
use candle_peft::config::OneOrMany;
use candle_peft::optim::{AdamW, AdamWConfig, LoraPair, LoraPro, LoraProConfig, LoraProMode};
use candle_peft::{
    AdapterConfig, DEFAULT_ADAPTER, EvalReport, LoraConfig, PeftModel, Schedule, TrainConfig,
    TrainTask, Trainer, Warmup,
};
use common::tiny::{HIDDEN, Tiny, bits, flat, rand_tensor, rng, single_linear, tiny_model};

fn var(values: &[f32], shape: &[usize]) -> Var {
    Var::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
}

/// A zero gradient for every var: AdamW's moments stay 0, so only the decay can move a var.
fn zero_grads(vars: &[&Var]) -> GradStore {
    let mut g = GradStore::default();
    for v in vars {
        g.insert(
            v.as_tensor(),
            Tensor::zeros(v.shape(), v.dtype(), v.device()).unwrap(),
        );
    }
    g
}

/// `x · c`, `steps` times, in f32: what decoupled decay with a zero gradient gives.
fn decayed(x: &[f32], c: f32, steps: usize) -> Vec<f32> {
    x.iter()
        .map(|&v| (0..steps).fold(v, |acc, _| acc * c))
        .collect()
}

fn to_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn adamw_leaves_exempt_vars_bit_identical_and_decays_the_rest_exactly() {
    let (lr, wd) = (0.05, 0.1);
    let cfg = AdamWConfig {
        weight_decay: wd,
        ..AdamWConfig::default()
    };
    let kept0 = [1.5f32, -0.75, 3.25];
    let decay0 = [2.0f32, -1.25, 0.3];
    let kept = var(&kept0, &[3]);
    let dec = var(&decay0, &[3]);
    let mut opt = AdamW::with_no_decay(
        vec![("kept".into(), kept.clone()), ("dec".into(), dec.clone())],
        cfg,
        // A name no var has is ignored (a model-wide list may name vars of other optimisers).
        &["kept", "not_a_var"],
    )
    .unwrap();
    assert_eq!(opt.no_decay_vars(), vec!["kept"]);
    let c = (1.0 - lr * wd) as f32;
    for step in 1..=3 {
        let stats = opt.step(&zero_grads(&[&kept, &dec]), lr).unwrap();
        assert_eq!((stats.updated, stats.skipped), (2, 0));
        assert_eq!(bits(kept.as_tensor()), to_bits(&kept0), "step {step}");
        assert_eq!(
            bits(dec.as_tensor()),
            to_bits(&decayed(&decay0, c, step)),
            "step {step}"
        );
    }
    // The shrink is real: 3 steps of (1 − 0.005) on 2.0.
    assert!((flat(dec.as_tensor())[0] as f64 - 2.0 * 0.995f64.powi(3)).abs() < 1e-6);

    // `new` keeps decaying everything.
    let all = var(&kept0, &[3]);
    let mut plain = AdamW::new(vec![("kept".into(), all.clone())], cfg).unwrap();
    assert!(plain.no_decay_vars().is_empty());
    plain.step(&zero_grads(&[&all]), lr).unwrap();
    assert_eq!(bits(all.as_tensor()), to_bits(&decayed(&kept0, c, 1)));
}

#[test]
fn adamw_state_round_trips_with_an_exempt_set() {
    let cfg = AdamWConfig {
        weight_decay: 0.3,
        ..AdamWConfig::default()
    };
    let a = var(&[1.0, 2.0], &[2]);
    let b = var(&[-1.0], &[1]);
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut opt = AdamW::with_no_decay(vars.clone(), cfg, &["a"]).unwrap();
    let mut g = GradStore::default();
    g.insert(
        a.as_tensor(),
        Tensor::new(&[0.5f32, -0.25], &Device::Cpu).unwrap(),
    );
    g.insert(b.as_tensor(), Tensor::new(&[2.0f32], &Device::Cpu).unwrap());
    opt.step(&g, 0.1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("opt.safetensors");
    opt.save_state(&path).unwrap();
    let mut loaded = AdamW::with_no_decay(vars, cfg, &["a"]).unwrap();
    loaded.load_state(&path).unwrap();
    assert_eq!(loaded.steps_taken(), 1);
    assert_eq!(loaded.no_decay_vars(), vec!["a"]);
    for name in ["a", "b"] {
        let (m0, v0, s0) = opt.state(name).unwrap();
        let (m1, v1, s1) = loaded.state(name).unwrap();
        assert_eq!((bits(m0), bits(v0), s0), (bits(m1), bits(v1), s1), "{name}");
    }
}

fn lora_pair(a: &Var, b: &Var) -> LoraPair {
    LoraPair {
        module: "layer".into(),
        adapter: "default".into(),
        a: a.clone(),
        b: b.clone(),
        scaling: 2.0,
    }
}

#[test]
fn lora_pro_passes_the_exempt_set_to_its_adamw_and_its_pairs() {
    let (lr, wd) = (0.1, 0.2);
    let c = (1.0 - lr * wd) as f32;
    let mut r = rng(3);
    for mode in [LoraProMode::Full, LoraProMode::Efficient] {
        let a0 = flat(&rand_tensor(&mut r, &[2, 4], 1.0));
        let b0 = flat(&rand_tensor(&mut r, &[3, 2], 1.0));
        let h0 = flat(&rand_tensor(&mut r, &[5], 1.0));
        let (a, b, head) = (var(&a0, &[2, 4]), var(&b0, &[3, 2]), var(&h0, &[5]));
        let vars = vec![
            ("a".to_string(), a.clone()),
            ("b".to_string(), b.clone()),
            ("head".to_string(), head.clone()),
        ];
        let cfg = LoraProConfig {
            mode,
            weight_decay: wd,
            ..LoraProConfig::default()
        };
        // `head` sits outside the pair (the inner AdamW), `a` inside it.
        let mut opt =
            LoraPro::with_no_decay(vars, vec![lora_pair(&a, &b)], cfg, &["a", "head"]).unwrap();
        for step in 1..=2 {
            opt.step(&zero_grads(&[&a, &b, &head]), lr).unwrap();
            assert_eq!(bits(a.as_tensor()), to_bits(&a0), "{mode} step {step}: A");
            assert_eq!(
                bits(head.as_tensor()),
                to_bits(&h0),
                "{mode} step {step}: head"
            );
            let want = decayed(&b0, c, step);
            let got = flat(b.as_tensor());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{mode} step {step}: B {got:?} vs {want:?}"
                );
            }
            assert_ne!(got, b0, "{mode}: B must decay");
        }
    }
}

/// The exempt list of a one-layer model `lin` under `config`, and its trainable names.
fn exempt_of(config: AdapterConfig) -> (Vec<String>, Vec<String>) {
    let mut pm = single_linear(8, 6, 11);
    pm.add_adapter(DEFAULT_ADAPTER, config).unwrap();
    let names = pm.trainable_vars().into_iter().map(|(n, _)| n).collect();
    (pm.no_weight_decay_vars(), names)
}

#[test]
fn each_adapter_names_exactly_its_base_valued_trainables() {
    let key = |local: &str| format!("base_model.model.lin.{local}");
    let mut salt = SaltConfig::new(&["lin"], 2);
    salt.r_t = Some(2);
    let corda = CordaConfig::new(&["lin"], 2, 4.0).with_init(BTreeMap::from([(
        "lin".to_string(),
        CordaFactors {
            a: rand_tensor(&mut rng(1), &[2, 8], 1.0),
            b: rand_tensor(&mut rng(2), &[6, 2], 1.0),
        },
    )]));
    // (method, config, exempt names, number of trainables)
    let cases: Vec<(&str, AdapterConfig, Vec<String>, usize)> = vec![
        (
            "svfit",
            SvfitConfig::with_rank(&["lin"], 3).into(),
            vec![key("svfit_S.default.weight")],
            1,
        ),
        (
            "loldu",
            LolduConfig::new(&["lin"], 3).into(),
            vec![key("loldu_z.default.weight")],
            1,
        ),
        // SALT: the scale starts at 1 (decay removes σ_t); shift, X and Y may decay.
        (
            "salt",
            salt.into(),
            vec![key("salt_scale.default.weight")],
            4,
        ),
        (
            "corda",
            corda.into(),
            vec![key("lora_A.default.weight"), key("lora_B.default.weight")],
            2,
        ),
        ("lora", LoraConfig::new(&["lin"], 2, 4.0).into(), vec![], 2),
        (
            "randlora",
            RandLoraConfig::new(&["lin"], 2, 4.0).into(),
            vec![],
            2,
        ),
        (
            "flora",
            FloraConfig::new(&["lin"], OneOrMany::One(2), 1.0).into(),
            vec![],
            3,
        ),
    ];
    for (method, config, want, trainables) in cases {
        let (exempt, names) = exempt_of(config);
        assert_eq!(exempt, want, "{method}");
        assert_eq!(names.len(), trainables, "{method}: {names:?}");
        for n in &exempt {
            assert!(names.contains(n), "{method}: {n} is not a trainable var");
        }
    }
}

#[test]
fn modules_to_save_copies_and_inactive_adapters_are_not_exempt() {
    let mut pm = tiny_model(1, 2);
    let mut cfg = SvfitConfig::with_rank(&["q"], 2);
    cfg.targeting.modules_to_save = Some(vec!["head".to_string()]);
    pm.add_adapter(DEFAULT_ADAPTER, cfg).unwrap();
    let want: Vec<String> = ["model.blocks.0.q", "model.blocks.1.q", "model.extra.0.q"]
        .iter()
        .map(|m| format!("base_model.model.{m}.svfit_S.default.weight"))
        .collect();
    assert_eq!(pm.no_weight_decay_vars(), want);
    // A second, inactive adapter adds nothing until it is made active.
    pm.add_adapter("other", LolduConfig::new(&["v"], 2))
        .unwrap();
    assert_eq!(pm.no_weight_decay_vars(), want);
    pm.set_adapter("other").unwrap();
    assert_eq!(
        pm.no_weight_decay_vars(),
        vec![
            "base_model.model.model.blocks.0.v.loldu_z.other.weight".to_string(),
            "base_model.model.model.blocks.1.v.loldu_z.other.weight".to_string(),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// The trainer
// ---------------------------------------------------------------------------------------------

const TOKENS: usize = 4;

/// SVFit on every `q` and `v`, the head trained whole, and a loss whose gradient is exactly 0:
/// every var gets a (zero) gradient, so AdamW's only effect is the decay.
struct ZeroGrad {
    pm: PeftModel<Tiny>,
}

impl ZeroGrad {
    fn new() -> Self {
        let mut pm = tiny_model(1, 2);
        let mut cfg = SvfitConfig::with_rank(&["q", "v"], 2);
        cfg.targeting.modules_to_save = Some(vec!["head".to_string()]);
        pm.add_adapter(DEFAULT_ADAPTER, cfg).unwrap();
        Self { pm }
    }

    fn values(&self) -> BTreeMap<String, Vec<f32>> {
        self.pm
            .trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, flat(v.as_tensor())))
            .collect()
    }
}

impl TrainTask for ZeroGrad {
    type Example = Tensor;

    fn loss(&self, batch: &[&Tensor]) -> candle_peft::Result<(Tensor, usize)> {
        let x = Tensor::stack(batch, 0)?;
        let m = self.pm.model().forward(&x)?.mean_all()?;
        // `m − m`: the two paths' gradients cancel exactly and every var still gets one;
        // `0 · m` would leave them none (candle's backward does not walk through `affine(0, ·)`).
        Ok((m.sub(&m)?, batch.len() * TOKENS))
    }

    fn evaluate(&self, _examples: &[Tensor]) -> candle_peft::Result<EvalReport> {
        Ok(EvalReport::default())
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.pm.trainable_vars()
    }

    fn save_adapter(&self, dir: &Path) -> candle_peft::Result<()> {
        self.pm.save_adapter(dir, DEFAULT_ADAPTER)
    }

    fn no_weight_decay_vars(&self) -> Vec<String> {
        self.pm.no_weight_decay_vars()
    }
}

fn zero_grad_config(steps: usize, lr: f64, wd: f64) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 2,
        lr,
        weight_decay: wd,
        schedule: Schedule::Constant,
        warmup: Warmup::Steps(0),
        max_grad_norm: None,
        quiet: true,
        ..TrainConfig::default()
    }
}

#[test]
fn trainer_never_decays_svfit_sigma_but_decays_the_head_copy() {
    let (lr, wd, steps) = (0.1, 0.5, 3);
    let c = (1.0 - lr * wd) as f32;
    let data: Vec<Tensor> = (0..4)
        .map(|i| rand_tensor(&mut rng(40 + i), &[TOKENS, HIDDEN], 1.0))
        .collect();
    let task = ZeroGrad::new();
    let before = task.values();
    let exempt = task.no_weight_decay_vars();
    // σ' of the three `q` and two `v` layers; the head's weight and bias are not exempt.
    assert_eq!(exempt.len(), 5, "{exempt:?}");
    assert_eq!(before.len(), 7);
    let report = Trainer::new(zero_grad_config(steps, lr, wd))
        .unwrap()
        .run(&task, &data, None)
        .unwrap();
    assert_eq!(report.losses, vec![0.0; steps]);
    assert!(report.vars_without_grad.is_empty());
    let after = task.values();
    let mut decayed_vars = 0;
    for (name, v0) in &before {
        let v1 = &after[name];
        if exempt.contains(name) {
            assert!(name.contains("svfit_S"), "{name}");
            assert_eq!(to_bits(v1), to_bits(v0), "{name} moved");
        } else {
            assert!(name.contains("modules_to_save"), "{name}");
            assert_eq!(to_bits(v1), to_bits(&decayed(v0, c, steps)), "{name}");
            decayed_vars += 1;
        }
    }
    // head.weight and head.bias; 0.95³ ≈ 0.857 of the start.
    assert_eq!(decayed_vars, 2);

    // Resuming from step 1 rebuilds the exempt set: the same end state, σ' still untouched.
    let tmp = tempfile::tempdir().unwrap();
    let first = ZeroGrad::new();
    let mut cfg = zero_grad_config(steps, lr, wd);
    cfg.out_dir = Some(tmp.path().to_path_buf());
    cfg.checkpoint_every = Some(1);
    Trainer::new(cfg.clone())
        .unwrap()
        .run(&first, &data, None)
        .unwrap();
    let resumed = ZeroGrad::new();
    cfg.resume_from = Some(tmp.path().join("checkpoint-1"));
    cfg.out_dir = Some(tmp.path().join("resumed"));
    let report = Trainer::new(cfg)
        .unwrap()
        .run(&resumed, &data, None)
        .unwrap();
    assert_eq!(report.start_step, 1);
    let resumed_values = resumed.values();
    for (name, v) in &after {
        assert_eq!(
            to_bits(&resumed_values[name]),
            to_bits(v),
            "{name} after resume"
        );
    }
}
