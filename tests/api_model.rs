//! The library as a user of their own model meets it: `PeftBuilder` initialising missing weights
//! as candle-nn does, `Conv2dParams` from candle-nn's config, and `PeftModel`'s adapter handling
//! (the scoped disable guard, deleting the active adapter, the typed no-gradient error, configs
//! that need calibration).

mod common;

use std::sync::{Arc, Mutex};

use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Conv2dConfig, Init, VarBuilder, VarMap, var_builder::SimpleBackend};
use candle_peft::adapters::corda::CordaConfig;
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::data_init::with_base_model;
use candle_peft::{
    Conv2dParams, EvalReport, LoraConfig, NoGradientCause, PeftBuilder, PeftError, PeftModel,
    TrainConfig, TrainTask, Trainer,
};
use common::tiny::{Tiny, bits, lora_random_b, tiny_image, tiny_input, tiny_model};

// ---------------------------------------------------------------------------------------------
// PeftBuilder: candle-nn's init hints
// ---------------------------------------------------------------------------------------------

/// A `VarBuilder` backend that records every `(name, shape, init hint)` it is asked for and
/// returns zeros: it shows which hints a layer constructor passes.
/// `(tensor name, shape, init hint)`.
type Request = (String, Vec<usize>, String);

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Request>>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), s.dims().to_vec(), format!("{h:?}")));
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected get_unchecked({name})")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

impl Recorder {
    fn vb(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[test]
fn builder_asks_for_the_init_hints_candle_nn_asks_for() {
    let rec = Recorder::default();
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        dilation: 1,
        groups: 2,
        cudnn_fwd_algo: None,
    };
    let b = PeftBuilder::new(rec.vb());

    candle_nn::linear(7, 5, rec.vb().pp("fc")).unwrap();
    let want = rec.take();
    b.linear(7, 5, true, "fc").unwrap();
    assert_eq!(rec.take(), want);
    // Kaiming-normal weight, U(±1/√7) bias: the hints are what make a fresh VarMap non-zero.
    assert!(
        want[0].2.contains("Kaiming") && want[0].2.contains("Normal"),
        "{want:?}"
    );
    assert!(want[1].2.contains("Uniform"), "{want:?}");

    candle_nn::linear_no_bias(7, 5, rec.vb().pp("fc")).unwrap();
    let want = rec.take();
    b.linear(7, 5, false, "fc").unwrap();
    assert_eq!(rec.take(), want);

    candle_nn::conv2d(4, 6, 3, cfg, rec.vb().pp("c")).unwrap();
    let want = rec.take();
    b.conv2d(4, 6, (3, 3), cfg, true, "c").unwrap();
    assert_eq!(rec.take(), want);
    assert_eq!(want[0].1, vec![6, 2, 3, 3]);

    candle_nn::conv2d_no_bias(4, 6, 3, cfg, rec.vb().pp("c")).unwrap();
    let want = rec.take();
    b.conv2d(4, 6, (3, 3), cfg, false, "c").unwrap();
    assert_eq!(rec.take(), want);
}

/// Mean and standard deviation of `t`'s values.
fn moments(t: &Tensor) -> (f64, f64, f64) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let max = v.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
    (mean, var.sqrt(), max)
}

#[test]
fn builder_over_a_fresh_varmap_draws_candle_nn_distributions_not_zeros() {
    let varmap = VarMap::new();
    let b = PeftBuilder::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    let (fan_in, out) = (512, 256);
    let lin = b.linear(fan_in, out, true, "fc").unwrap();
    // Weight: N(0, 2 / fan_in) (Kaiming normal, ReLU gain); 131072 draws pin the std to ~0.2%.
    let (mean, std, _) = moments(&lin.handle().weight().unwrap());
    let want = (2.0 / fan_in as f64).sqrt();
    assert!(mean.abs() < 0.02 * want, "weight mean {mean}");
    assert!(
        (std / want - 1.0).abs() < 0.02,
        "weight std {std}, want {want}"
    );
    // Bias: U(-1/√in, 1/√in), std bound/√3.
    let bound = 1.0 / (fan_in as f64).sqrt();
    let (_, std, max) = moments(&lin.handle().bias().unwrap());
    assert!(
        max <= bound && max > 0.9 * bound,
        "bias max {max}, bound {bound}"
    );
    assert!(
        (std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.15,
        "bias std {std}"
    );

    // Conv: fan in = in/groups · kh · kw for the weight; candle-nn's bias bound uses in_channels.
    let cfg = Conv2dConfig {
        groups: 2,
        ..Default::default()
    };
    let conv = b.conv2d(64, 128, (5, 5), cfg, true, "conv").unwrap();
    let (_, std, _) = moments(&conv.handle().weight().unwrap());
    let want = (2.0f64 / (32.0 * 25.0)).sqrt();
    assert!(
        (std / want - 1.0).abs() < 0.02,
        "conv weight std {std}, want {want}"
    );
    let bound = 1.0 / 64f64.sqrt();
    let (_, _, max) = moments(&conv.handle().bias().unwrap());
    assert!(
        max <= bound && max > 0.8 * bound,
        "conv bias max {max}, bound {bound}"
    );
    // The VarMap holds the same (frozen) values the layer uses.
    let stored = varmap.data().lock().unwrap()["fc.weight"]
        .as_tensor()
        .clone();
    assert_eq!(
        common::max_abs_diff(&stored, &lin.handle().weight().unwrap()),
        0.0,
        "the layer's weight is the VarMap's"
    );
}

#[test]
fn conv2d_params_from_candle_nn_config() {
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        dilation: 3,
        groups: 4,
        cudnn_fwd_algo: None,
    };
    assert_eq!(
        Conv2dParams::from(cfg),
        Conv2dParams {
            stride: 2,
            padding: 1,
            dilation: 3,
            groups: 4,
        }
    );
    assert_eq!(
        Conv2dParams::from(Conv2dConfig::default()),
        Conv2dParams::default()
    );
}

// ---------------------------------------------------------------------------------------------
// PeftModel: the disable guard
// ---------------------------------------------------------------------------------------------

/// Everything the guard must put back: outputs (linear and conv paths), every layer's weight
/// bits, merged list, switch and active set, and the model's active set and switch.
#[derive(Debug, PartialEq)]
struct Snapshot {
    y: Vec<u32>,
    conv: Vec<u32>,
    layers: Vec<LayerSnapshot>,
    active: Vec<String>,
    enabled: bool,
}

/// A layer's name, weight bits, merged adapters, switch and active adapters.
type LayerSnapshot = (String, Vec<u32>, Vec<String>, bool, Vec<String>);

fn snapshot(pm: &PeftModel<Tiny>) -> Snapshot {
    Snapshot {
        y: bits(&pm.forward(&tiny_input(3)).unwrap()),
        conv: bits(&pm.conv_forward(&tiny_image(4)).unwrap()),
        layers: pm
            .layers()
            .iter()
            .map(|l| {
                (
                    l.name(),
                    bits(&l.weight().unwrap()),
                    l.merged_adapters(),
                    l.is_enabled(),
                    l.active_adapters(),
                )
            })
            .collect(),
        active: pm.active_adapters().to_vec(),
        enabled: pm.is_enabled(),
    }
}

/// The tiny model with adapter `a` (q, v, conv) merged and `b` (q, head) live, both active.
fn merged_and_live() -> PeftModel<Tiny> {
    let mut pm = tiny_model(1, 2);
    pm.add_adapter("a", lora_random_b(&["q", "v", "conv"], 2, 4.0))
        .unwrap();
    pm.add_adapter("b", lora_random_b(&["q", "head"], 2, 8.0))
        .unwrap();
    pm.merge().unwrap(); // merges the active one: a
    pm.set_active(&["a", "b"]).unwrap();
    pm
}

/// The base output of the tiny model: the same weights, no adapter.
fn base_output() -> Tensor {
    tiny_model(1, 2).forward(&tiny_input(3)).unwrap()
}

#[test]
fn disable_guard_restores_merged_live_and_active_state_bit_identically() {
    let mut pm = merged_and_live();
    let before = snapshot(&pm);
    assert_eq!(before.layers[0].2, vec!["a".to_string()], "a is merged");
    assert!(common::max_abs_diff(&pm.forward(&tiny_input(3)).unwrap(), &base_output()) > 1e-3);
    {
        let base = pm.disable_adapter().unwrap();
        // The base model: `a` unmerged (to rounding) and `b` off.
        let y = base.forward(&tiny_input(3)).unwrap();
        assert!(common::max_abs_diff(&y, &base_output()) < 1e-5);
        assert!(!base.is_enabled());
        assert!(base.layers().iter().all(|l| l.merged_adapters().is_empty()));
    }
    assert_eq!(snapshot(&pm), before);

    // The closure form, twice (a failing closure restores too), and `restore()`.
    let y: Tensor = pm
        .with_disabled(|m| Ok::<_, PeftError>(m.forward(&tiny_input(3))?))
        .unwrap();
    assert!(common::max_abs_diff(&y, &base_output()) < 1e-5);
    assert_eq!(snapshot(&pm), before);
    let err = pm
        .with_disabled(|_| -> candle_peft::Result<()> { Err(PeftError::Unsupported("x".into())) })
        .unwrap_err();
    assert!(matches!(err, PeftError::Unsupported(_)));
    assert_eq!(snapshot(&pm), before);
    pm.disable_adapter().unwrap().restore();
    assert_eq!(snapshot(&pm), before);

    // The calibration pass's base-model scope uses the guard: the merge survives it.
    with_base_model(&mut pm, |m| {
        assert!(common::max_abs_diff(&m.forward(&tiny_input(3))?, &base_output()) < 1e-5);
        Ok(())
    })
    .unwrap();
    assert_eq!(snapshot(&pm), before);
}

#[test]
fn disable_guard_on_a_disabled_model_leaves_it_disabled() {
    let mut pm = merged_and_live();
    pm.disable().unwrap();
    let before = snapshot(&pm);
    drop(pm.disable_adapter().unwrap());
    assert_eq!(snapshot(&pm), before);
    assert!(!pm.is_enabled());
}

// ---------------------------------------------------------------------------------------------
// PeftModel: delete_adapter, Deref, model_mut, save/load argument order
// ---------------------------------------------------------------------------------------------

#[test]
fn deleting_the_active_adapter_activates_the_first_remaining_by_name() {
    let mut pm = tiny_model(1, 2);
    for name in ["zeta", "alpha", "mid"] {
        pm.add_adapter(name, lora_random_b(&["q"], 2, 4.0)).unwrap();
    }
    pm.set_adapter("mid").unwrap();
    // As PEFT: the only active adapter deleted → the first remaining in name order.
    assert_eq!(pm.delete_adapter("mid").unwrap(), vec!["alpha".to_string()]);
    assert_eq!(pm.active_adapters(), &["alpha".to_string()]);
    let q = pm.layer("model.blocks.0.q").unwrap();
    assert_eq!(q.active_adapters(), vec!["alpha".to_string()]);
    // Its output is the alpha-only model's.
    let mut alpha_only = tiny_model(1, 2);
    for name in ["zeta", "alpha"] {
        alpha_only
            .add_adapter(name, lora_random_b(&["q"], 2, 4.0))
            .unwrap();
    }
    alpha_only.set_adapter("alpha").unwrap();
    assert_eq!(
        bits(&pm.forward(&tiny_input(3)).unwrap()),
        bits(&alpha_only.forward(&tiny_input(3)).unwrap())
    );
    // Another active adapter remains: it stays the active set.
    pm.add_adapter("beta", lora_random_b(&["q"], 2, 4.0))
        .unwrap();
    pm.set_active(&["alpha", "zeta"]).unwrap();
    assert_eq!(
        pm.delete_adapter("alpha").unwrap(),
        vec!["zeta".to_string()]
    );
    // An inactive one: nothing changes.
    assert_eq!(pm.delete_adapter("beta").unwrap(), vec!["zeta".to_string()]);
    // The last one: none active.
    assert!(pm.delete_adapter("zeta").unwrap().is_empty());
    assert!(pm.active_adapters().is_empty());
    assert!(matches!(
        pm.delete_adapter("zeta"),
        Err(PeftError::UnknownAdapter { .. })
    ));
}

#[test]
fn peft_model_derefs_to_the_model_and_saves_with_load_adapters_argument_order() {
    let mut pm = tiny_model(1, 2);
    pm.add_adapter("one", lora_random_b(&["q", "v"], 2, 4.0))
        .unwrap();
    // Deref: the model's own forward and fields.
    assert_eq!(
        bits(&pm.forward(&tiny_input(3)).unwrap()),
        bits(&pm.model().forward(&tiny_input(3)).unwrap())
    );
    assert_eq!(pm.blocks.len(), 2);
    let y = pm.forward(&tiny_input(3)).unwrap();
    pm.model_mut().norm = (pm.norm.clone() * 0.0).unwrap();
    assert!(common::max_abs_diff(&pm.forward(&tiny_input(3)).unwrap(), &y) > 1e-3);
    pm.model_mut().norm = tiny_model(1, 2).norm.clone();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("one");
    pm.save_adapter(&out, "one").unwrap();
    pm.load_adapter(&out, "two").unwrap();
    let y_one = pm.forward(&tiny_input(3)).unwrap();
    pm.set_adapter("two").unwrap();
    assert_eq!(bits(&pm.forward(&tiny_input(3)).unwrap()), bits(&y_one));
}

// ---------------------------------------------------------------------------------------------
// Typed error: training a merged or disabled adapter
// ---------------------------------------------------------------------------------------------

/// A regression task over the tiny model that checks its adapters as the built-in tasks do.
struct Fit(PeftModel<Tiny>);

impl TrainTask for Fit {
    type Example = Tensor;

    fn loss(&self, batch: &[&Tensor]) -> candle_peft::Result<(Tensor, usize)> {
        let x = Tensor::stack(batch, 0)?;
        Ok((self.0.forward(&x)?.sqr()?.mean_all()?, batch.len()))
    }

    fn evaluate(&self, _: &[Tensor]) -> candle_peft::Result<EvalReport> {
        Ok(EvalReport::default())
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.0.trainable_vars()
    }

    fn save_adapter(&self, dir: &Path) -> candle_peft::Result<()> {
        self.0.save_adapter(dir, "fit")
    }

    fn check_trainable(&self) -> candle_peft::Result<()> {
        self.0.check_trainable()
    }
}

fn fit(task: &Fit) -> candle_peft::Result<Vec<f64>> {
    let data: Vec<Tensor> = (0..4).map(|i| tiny_input(10 + i).get(0).unwrap()).collect();
    let cfg = TrainConfig {
        steps: 3,
        batch_size: 2,
        lr: 1e-2,
        quiet: true,
        ..TrainConfig::default()
    };
    Ok(Trainer::new(cfg)?.run(task, &data, None)?.losses)
}

#[test]
fn training_a_merged_or_disabled_adapter_is_a_typed_error_naming_it() {
    let mut pm = tiny_model(1, 2);
    pm.add_adapter("fit", lora_random_b(&["q", "v"], 2, 4.0))
        .unwrap();
    pm.merge().unwrap();
    let err = fit(&Fit(pm)).unwrap_err();
    match &err {
        PeftError::NoGradient {
            adapter,
            module,
            cause: NoGradientCause::Merged,
        } => {
            assert_eq!(adapter, "fit");
            assert_eq!(module, "model.blocks.0.q");
        }
        other => panic!("expected NoGradient(Merged), got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("`fit` is merged") && msg.contains("unmerge"),
        "{msg}"
    );

    let mut pm = tiny_model(1, 2);
    pm.add_adapter("fit", lora_random_b(&["q", "v"], 2, 4.0))
        .unwrap();
    pm.disable().unwrap();
    let err = fit(&Fit(pm)).unwrap_err();
    assert!(
        matches!(
            &err,
            PeftError::NoGradient { adapter, cause: NoGradientCause::Disabled, .. } if adapter == "fit"
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("`fit` is disabled"), "{err}");

    // Unmerged and enabled again, it trains.
    let mut pm = tiny_model(1, 2);
    pm.add_adapter("fit", lora_random_b(&["q", "v"], 2, 4.0))
        .unwrap();
    pm.merge().unwrap();
    pm.unmerge().unwrap();
    pm.disable().unwrap();
    pm.enable().unwrap();
    assert!(pm.check_trainable().is_ok());
    let losses = fit(&Fit(pm)).unwrap();
    assert!(losses[2] < losses[0], "{losses:?}");
}

// ---------------------------------------------------------------------------------------------
// Configs that need calibration
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_add_adapter_rejects_inits_that_need_calibration_naming_the_call() {
    let mut pm = tiny_model(1, 2);
    let mut eva = LoraConfig::new(&["q"], 2, 4.0);
    eva.init_lora_weights = InitLoraWeights::Named("eva".into());
    let err = pm.add_adapter("x", eva).unwrap_err();
    assert!(
        matches!(&err, PeftError::InvalidConfig { field, .. } if field == "init_lora_weights"),
        "{err:?}"
    );
    assert!(err.to_string().contains("add_eva_adapter"), "{err}");
    let err = pm
        .add_adapter("x", CordaConfig::new(&["q"], 2, 4.0))
        .unwrap_err();
    assert!(err.to_string().contains("add_corda_adapter"), "{err}");
    // Nothing was added.
    assert!(pm.adapter_names().is_empty());
    assert!(pm.layers().iter().all(|l| l.adapter_names().is_empty()));
}
