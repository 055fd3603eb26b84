//! The library as a user of their own model meets it: `PeftBuilder` initialising missing weights
//! as candle-nn does, `Conv2dParams` from candle-nn's config, and `PeftModel`'s adapter handling
//! (the scoped disable guard, deleting the active adapter, the typed no-gradient error, configs
//! that need calibration).

mod common;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Conv2dConfig, Init, VarBuilder, VarMap, var_builder::SimpleBackend};
use candle_peft::{Conv2dParams, PeftBuilder};

// ---------------------------------------------------------------------------------------------
// PeftBuilder: candle-nn's init hints
// ---------------------------------------------------------------------------------------------

/// A `VarBuilder` backend that records every `(name, shape, init hint)` it is asked for and
/// returns zeros: it shows which hints a layer constructor passes.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, Vec<usize>, String)>>>);

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

    fn take(&self) -> Vec<(String, Vec<usize>, String)> {
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
    assert!(want[0].2.contains("Kaiming") && want[0].2.contains("Normal"), "{want:?}");
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
    let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
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
    let (mean, std, _) = moments(&lin.handle().weight());
    let want = (2.0 / fan_in as f64).sqrt();
    assert!(mean.abs() < 0.02 * want, "weight mean {mean}");
    assert!((std / want - 1.0).abs() < 0.02, "weight std {std}, want {want}");
    // Bias: U(-1/√in, 1/√in), std bound/√3.
    let bound = 1.0 / (fan_in as f64).sqrt();
    let (_, std, max) = moments(&lin.handle().bias().unwrap());
    assert!(max <= bound && max > 0.9 * bound, "bias max {max}, bound {bound}");
    assert!((std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.15, "bias std {std}");

    // Conv: fan in = in/groups · kh · kw for the weight; candle-nn's bias bound uses in_channels.
    let cfg = Conv2dConfig {
        groups: 2,
        ..Default::default()
    };
    let conv = b.conv2d(64, 128, (5, 5), cfg, true, "conv").unwrap();
    let (_, std, _) = moments(&conv.handle().weight());
    let want = (2.0f64 / (32.0 * 25.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.02, "conv weight std {std}, want {want}");
    let bound = 1.0 / 64f64.sqrt();
    let (_, _, max) = moments(&conv.handle().bias().unwrap());
    assert!(max <= bound && max > 0.8 * bound, "conv bias max {max}, bound {bound}");
    // The VarMap holds the same (frozen) values the layer uses.
    let stored = varmap.data().lock().unwrap()["fc.weight"].as_tensor().clone();
    assert_eq!(
        common::max_abs_diff(&stored, &lin.handle().weight()),
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
