//! LoRA with a rank above `min(in, out)`, as PEFT allows it: PEFT 0.21 adapters on a tiny model
//! (`scripts/fixtures/peft_lora_rank_above_min.py`), loaded and merged in memory and by the
//! streaming merge, against the weights PEFT's `merge_and_unload()` wrote.
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_peft::io::export::{MergeOptions, merge_adapter_into_base};
use candle_peft::{Conv2dParams, LoraAdapter, PeftBuilder, PeftConv2d, PeftLinear, PeftModel};
use common::tiny::{max_abs, max_abs_diff, rand_tensor, rng};

/// `wide`: Linear 8 → 3, `tall`: Linear 3 → 8, `conv`: Conv2d 2 → 3, 3×3, padding 1.
type Tiny = (PeftLinear, PeftLinear, PeftConv2d);

const CONV: Conv2dParams = Conv2dParams {
    stride: 1,
    padding: 1,
    dilation: 1,
    groups: 1,
};

fn dir() -> PathBuf {
    common::fixture("peft-lora-rank-above-min")
}

fn load(path: PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn tiny() -> PeftModel<Tiny> {
    let vb = VarBuilder::from_tensors(
        load(dir().join("base.safetensors")),
        DType::F32,
        &Device::Cpu,
    );
    let b = PeftBuilder::new(vb);
    let model = (
        b.linear(8, 3, true, "wide").unwrap(),
        b.linear(3, 8, true, "tall").unwrap(),
        b.conv2d(2, 3, (3, 3), CONV, true, "conv").unwrap(),
    );
    PeftModel::new(model, &b)
}

/// Loads adapter `name`, checks each layer's rank and scaling, that the adapted forward is the
/// forward of PEFT's merged weights, and that both merges give those weights.
fn check(name: &str, ranks: [(&str, usize, f64); 3]) {
    let adapter = dir().join(name);
    let want = load(adapter.join("merged.safetensors"));
    let mut pm = tiny();
    pm.load_adapter(&adapter, "default").unwrap();
    for (module, r, scaling) in ranks {
        let layer = pm.layer(module).unwrap();
        let (got_r, got_s) = layer
            .with_adapter("default", |a| {
                let lora = a.as_any().unwrap().downcast_ref::<LoraAdapter>().unwrap();
                (lora.rank(), lora.scaling())
            })
            .unwrap();
        assert_eq!(got_r, r, "{module}");
        assert!(
            (got_s - scaling).abs() <= 1e-12,
            "{module}: {got_s} vs {scaling}"
        );
    }

    // The adapted forward equals the merged layer's.
    let x = rand_tensor(&mut rng(1), &[4, 8], 1.0);
    let h = rand_tensor(&mut rng(2), &[4, 3], 1.0);
    let img = rand_tensor(&mut rng(3), &[2, 2, 5, 4], 1.0);
    let (wide, tall, conv) = pm.model();
    let (y_wide, y_tall, y_conv) = (
        wide.forward(&x).unwrap(),
        tall.forward(&h).unwrap(),
        conv.forward(&img).unwrap(),
    );
    let linear = |x: &Tensor, m: &str| {
        x.matmul(&want[&format!("{m}.weight")].t().unwrap())
            .unwrap()
            .broadcast_add(&want[&format!("{m}.bias")])
            .unwrap()
    };
    let conv_want = img
        .conv2d(&want["conv.weight"], 1, 1, 1, 1)
        .unwrap()
        .broadcast_add(&want["conv.bias"].reshape((1, 3, 1, 1)).unwrap())
        .unwrap();
    for (got, expected, what) in [
        (&y_wide, &linear(&x, "wide"), "wide"),
        (&y_tall, &linear(&h, "tall"), "tall"),
        (&y_conv, &conv_want, "conv"),
    ] {
        let err = max_abs_diff(got, expected) / max_abs(expected);
        assert!(err <= 1e-5, "{name} forward {what}: {err:e}");
    }

    // Merge in memory.
    pm.merge().unwrap();
    for module in ["wide", "tall", "conv"] {
        let got = pm.layer(module).unwrap().weight().unwrap();
        let expected = &want[&format!("{module}.weight")];
        let err = max_abs_diff(&got, expected) / max_abs(expected);
        assert!(err <= 1e-6, "{name} merge {module}: {err:e}");
    }

    // The streaming merge from files, without model code.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge_adapter_into_base(
        &dir().join("base.safetensors"),
        &adapter,
        &out,
        MergeOptions::default(),
    )
    .unwrap();
    let streamed = load(out.join("model.safetensors"));
    assert_eq!(streamed.len(), want.len());
    for (key, expected) in &want {
        let err = max_abs_diff(&streamed[key], expected) / max_abs(expected);
        assert!(err <= 1e-6, "{name} streamed {key}: {err:e}");
    }
}

#[test]
fn rank_above_min_in_out_matches_peft() {
    // r = 5 (α 10), rank_pattern tall → 6, alpha_pattern conv → 7: s = α/r.
    check(
        "plain",
        [
            ("wide", 5, 10.0 / 5.0),
            ("tall", 6, 10.0 / 6.0),
            ("conv", 5, 7.0 / 5.0),
        ],
    );
    // rsLoRA, r = 4 (α 6), rank_pattern wide → 7: s = α/√r.
    check(
        "rslora",
        [
            ("wide", 7, 6.0 / 7f64.sqrt()),
            ("tall", 4, 6.0 / 2.0),
            ("conv", 4, 6.0 / 2.0),
        ],
    );
}

#[test]
fn fresh_adapter_with_rank_above_min_in_out() {
    // r = 5 on Linear 8 → 3 and 3 → 8: A is [r, in], B is [out, r]; ΔW = s·B·A has rank ≤ 3.
    let mut pm = tiny();
    let mut c = candle_peft::LoraConfig::new(&["wide", "tall"], 5, 10.0);
    c.init_lora_weights = candle_peft::adapters::lora::InitLoraWeights::Bool(false);
    pm.add_adapter("default", c).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = pm
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().dims().to_vec()))
        .collect();
    let find = |suffix: &str| {
        shapes
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix} in {shapes:?}"))
            .1
            .clone()
    };
    assert_eq!(find("wide.lora_A.default.weight"), vec![5, 8]);
    assert_eq!(find("wide.lora_B.default.weight"), vec![3, 5]);
    assert_eq!(find("tall.lora_A.default.weight"), vec![5, 3]);
    assert_eq!(find("tall.lora_B.default.weight"), vec![8, 5]);
    let layer = pm.layer("wide").unwrap();
    let delta = layer
        .with_adapter("default", |a| a.delta_weight().unwrap())
        .unwrap();
    let (a, b) = layer
        .with_adapter("default", |a| {
            let lora = a.as_any().unwrap().downcast_ref::<LoraAdapter>().unwrap();
            (
                lora.lora_a().as_tensor().clone(),
                lora.lora_b().as_tensor().clone(),
            )
        })
        .unwrap();
    let expected = (b.matmul(&a).unwrap() * 2.0).unwrap();
    assert!(max_abs_diff(&delta, &expected) <= 1e-6 * max_abs(&expected));
    assert!(max_abs(&delta) > 0.0);
}
