//! Checks shared by the tests of the decomposition adapters (SVFit, LoLDU, SALT): each takes an
//! adapter config and asserts one property of the list on small synthetic layers or on
//! MiniLM. The method-specific identities live in each method's test file.
#![allow(dead_code)]

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_peft::{AdapterConfig, Conv2dParams, LayerHandle, PeftModel};
use rand::Rng;

use super::cli::bin;
use super::tiny::*;

pub const ADAPTER: &str = "default";

/// A conv case: `(in, out, kernel, params, image H×W)`.
pub type ConvCase = (usize, usize, (usize, usize), Conv2dParams, (usize, usize));

/// Conv cases: strided and padded, dilated, grouped.
pub fn conv_cases() -> Vec<ConvCase> {
    let p = |stride, padding, dilation, groups| Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    };
    vec![
        (3, 4, (3, 3), p(2, 1, 1, 1), (9, 7)),
        (4, 6, (3, 2), p(1, 1, 2, 1), (8, 9)),
        (4, 6, (3, 3), p(2, 1, 1, 2), (9, 8)),
    ]
}

/// Every trainable of the model's adapters, moved away from its init: `v(1 + 0.5u) + 0.2u'`
/// with `u, u' ~ U(−1, 1)`, so that no adapter is the identity any more.
pub fn perturb<M>(pm: &PeftModel<M>, seed: u64) {
    let mut r = rng(seed);
    for (_, var) in pm.trainable_vars() {
        perturb_var(&var, &mut r);
    }
}

pub fn perturb_var(var: &Var, r: &mut rand_chacha::ChaCha8Rng) {
    let v = flat(var.as_tensor());
    let new: Vec<f32> = v
        .iter()
        .map(|x| {
            let a = 2.0 * r.random::<f32>() - 1.0;
            let b = 2.0 * r.random::<f32>() - 1.0;
            x * (1.0 + 0.5 * a) + 0.2 * b
        })
        .collect();
    var.set(&Tensor::from_vec(new, var.shape(), &Device::Cpu).unwrap())
        .unwrap();
}

/// Perturbs the trainables (from their current values) until `accept` holds on `layer`.
pub fn perturb_until<M>(
    pm: &PeftModel<M>,
    layer: &str,
    seed: u64,
    accept: fn(&LayerHandle) -> bool,
) {
    let init: Vec<(Var, Tensor)> = pm
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| {
            let t = v.as_tensor().copy().unwrap();
            (v, t)
        })
        .collect();
    for attempt in 0..50 {
        for (v, t) in &init {
            v.set(t).unwrap();
        }
        perturb(pm, seed + 1000 * attempt);
        if accept(pm.layer(layer).unwrap()) {
            return;
        }
    }
    panic!("no accepted perturbation in 50 tries");
}

/// `ΔW` of adapter `name` on `layer`.
pub fn delta(layer: &LayerHandle) -> Tensor {
    layer
        .with_adapter(ADAPTER, |a| a.delta_weight().unwrap())
        .expect("no adapter on the layer")
}

/// The trainable vars of the adapter on `layer`, by local name.
pub fn vars(layer: &LayerHandle) -> BTreeMap<String, Var> {
    layer.trainable_vars(ADAPTER).into_iter().collect()
}

/// The saved tensors of the adapter on `layer`, by local name.
pub fn saved(layer: &LayerHandle) -> BTreeMap<String, Tensor> {
    layer.tensors_to_save(ADAPTER).into_iter().collect()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b).max(1e-12)
}

/// At init the outputs are bitwise those of the base, on a linear layer (tall and wide) and on
/// every conv case.
pub fn identity_at_init(config: impl Fn() -> AdapterConfig) {
    for (i, (in_f, out_f)) in [(7, 5), (5, 7)].into_iter().enumerate() {
        let mut pm = single_linear(in_f, out_f, 10 + i as u64);
        let x = rand_tensor(&mut rng(20), &[2, 3, in_f], 1.0);
        let before = pm.model().forward(&x).unwrap();
        pm.add_adapter(ADAPTER, config()).unwrap();
        let after = pm.model().forward(&x).unwrap();
        assert_eq!(bits(&before), bits(&after), "linear {in_f}→{out_f}");
        assert_eq!(max_abs(&delta(pm.layer("lin").unwrap())), 0.0);
    }
    for (i, (in_c, out_c, kernel, params, (h, w))) in conv_cases().into_iter().enumerate() {
        let mut pm = single_conv(in_c, out_c, kernel, params, 30 + i as u64);
        let img = rand_tensor(&mut rng(40), &[2, in_c, h, w], 1.0);
        let before = pm.model().forward(&img).unwrap();
        pm.add_adapter(ADAPTER, config()).unwrap();
        let after = pm.model().forward(&img).unwrap();
        assert_eq!(bits(&before), bits(&after), "conv case {i}");
        assert_eq!(max_abs(&delta(pm.layer("conv").unwrap())), 0.0);
    }
}

/// At init MiniLM's hidden states are bitwise those of the base model.
pub fn identity_at_init_minilm(config: AdapterConfig) {
    let (mut pm, _) =
        candle_peft::BertModel::from_dir(crate::common::minilm_dir(), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[101u32, 7592, 2088, 2003, 1037, 3231, 102]], &Device::Cpu).unwrap();
    let before = pm.model().forward(&ids, None, None).unwrap();
    pm.add_adapter(ADAPTER, config).unwrap();
    let adapted = pm
        .layers()
        .iter()
        .filter(|l| l.has_adapter(ADAPTER))
        .count();
    assert_eq!(adapted, 12, "query and value of 6 layers");
    let after = pm.model().forward(&ids, None, None).unwrap();
    assert_eq!(bits(&before), bits(&after));
}

/// After a random perturbation, the activation-space forward equals `x (W + ΔW)ᵀ + b`
/// (linear) and `conv2d(x, W + ΔW) + b` (conv), within 1e-5 of the output's scale.
pub fn forward_matches_dense(config: impl Fn() -> AdapterConfig) {
    for (i, (in_f, out_f)) in [(7, 5), (5, 7)].into_iter().enumerate() {
        let mut pm = single_linear(in_f, out_f, 50 + i as u64);
        pm.add_adapter(ADAPTER, config()).unwrap();
        perturb(&pm, 60 + i as u64);
        let layer = pm.layer("lin").unwrap();
        let w = (layer.weight().unwrap() + delta(layer)).unwrap();
        assert!(
            max_abs(&delta(layer)) > 1e-2,
            "the perturbation left ΔW ≈ 0"
        );
        let x = rand_tensor(&mut rng(70), &[2, 3, in_f], 1.0);
        let dense = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&layer.bias().unwrap())
            .unwrap();
        let y = pm.model().forward(&x).unwrap();
        let err = rel_diff(&y, &dense);
        assert!(err <= 1e-5, "linear {in_f}→{out_f}: {err}");
    }
    for (i, (in_c, out_c, kernel, params, (h, w))) in conv_cases().into_iter().enumerate() {
        let mut pm = single_conv(in_c, out_c, kernel, params, 80 + i as u64);
        pm.add_adapter(ADAPTER, config()).unwrap();
        perturb(&pm, 90 + i as u64);
        let layer = pm.layer("conv").unwrap();
        let wd = (layer.weight().unwrap() + delta(layer)).unwrap();
        let img = rand_tensor(&mut rng(100), &[2, in_c, h, w], 1.0);
        let dense = img
            .conv2d(
                &wd,
                params.padding,
                params.stride,
                params.dilation,
                params.groups,
            )
            .unwrap()
            .broadcast_add(&layer.bias().unwrap().reshape((1, out_c, 1, 1)).unwrap())
            .unwrap();
        let y = pm.model().forward(&img).unwrap();
        let err = rel_diff(&y, &dense);
        assert!(err <= 1e-5, "conv case {i}: {err}");
    }
}

/// Merge gives `W + ΔW` and the adapted outputs; unmerge restores W (1e-6 relative).
pub fn merge_unmerge_round_trip(config: impl Fn() -> AdapterConfig) {
    let mut pm = single_linear(6, 8, 110);
    pm.add_adapter(ADAPTER, config()).unwrap();
    perturb(&pm, 111);
    let x = rand_tensor(&mut rng(112), &[4, 6], 1.0);
    let layer = pm.layer("lin").unwrap().clone();
    let w0 = layer.weight().unwrap();
    let d = delta(&layer);
    let adapted = pm.model().forward(&x).unwrap();
    pm.merge().unwrap();
    assert!(max_abs_diff(&layer.weight().unwrap(), &(&w0 + &d).unwrap()) <= 1e-6);
    let merged = pm.model().forward(&x).unwrap();
    assert!(rel_diff(&merged, &adapted) <= 1e-5, "merged vs adapted");
    pm.unmerge().unwrap();
    let back = layer.weight().unwrap();
    assert!(
        rel_diff(&back, &w0) <= 1e-6,
        "unmerge: {}",
        rel_diff(&back, &w0)
    );
    assert!(rel_diff(&pm.model().forward(&x).unwrap(), &adapted) <= 1e-6);

    let mut pc = single_conv(4, 6, (3, 3), conv_cases()[0].3, 113);
    pc.add_adapter(ADAPTER, config()).unwrap();
    perturb(&pc, 114);
    let img = rand_tensor(&mut rng(115), &[1, 4, 7, 6], 1.0);
    let conv = pc.layer("conv").unwrap().clone();
    let w0 = conv.weight().unwrap();
    let adapted = pc.model().forward(&img).unwrap();
    pc.merge().unwrap();
    assert!(rel_diff(&pc.model().forward(&img).unwrap(), &adapted) <= 1e-5);
    pc.unmerge().unwrap();
    assert!(rel_diff(&conv.weight().unwrap(), &w0) <= 1e-6);

    // Disabling an adapter that was never merged gives the pristine base, bitwise.
    let mut fresh = single_conv(4, 6, (3, 3), conv_cases()[0].3, 113);
    let base = fresh.model().forward(&img).unwrap();
    fresh.add_adapter(ADAPTER, config()).unwrap();
    perturb(&fresh, 116);
    assert!(max_abs_diff(&fresh.model().forward(&img).unwrap(), &base) > 1e-3);
    fresh.disable().unwrap();
    assert_eq!(bits(&fresh.model().forward(&img).unwrap()), bits(&base));
}

/// Central differences of a quadratic loss against backward, for every trainable, on a linear
/// layer and a grouped conv.
/// `accept` may refuse a perturbation (a ReLU kink too close for central differences): the
/// trainables are then perturbed again from their init with the next seed.
pub fn gradients_match_finite_differences(
    config: impl Fn() -> AdapterConfig,
    eps: f32,
    tol: f64,
    accept: fn(&LayerHandle) -> bool,
) {
    let mut pm = single_linear(5, 6, 120);
    pm.add_adapter(ADAPTER, config()).unwrap();
    perturb_until(&pm, "lin", 121, accept);
    let x = rand_tensor(&mut rng(122), &[2, 3, 5], 1.0);
    let loss = QuadLoss::new(&[2, 3, 6], 123);
    let y = pm.model().forward(&x).unwrap();
    let grads = loss.tensor(&y).backward().unwrap();
    for (name, var) in pm.trainable_vars() {
        let g = grad_of(&grads, &var, &name);
        let report = finite_differences(&var, &g, eps, || {
            loss.value(&pm.model().forward(&x).unwrap())
        });
        println!("linear {name}: {report:?}");
        report.assert_within(tol, &name);
    }
    let (in_c, out_c, kernel, params, (h, w)) = conv_cases()[2];
    let mut pc = single_conv(in_c, out_c, kernel, params, 124);
    pc.add_adapter(ADAPTER, config()).unwrap();
    perturb_until(&pc, "conv", 125, accept);
    let img = rand_tensor(&mut rng(126), &[1, in_c, h, w], 1.0);
    let y = pc.model().forward(&img).unwrap();
    let loss = QuadLoss::new(y.dims(), 127);
    let grads = loss.tensor(&y).backward().unwrap();
    for (name, var) in pc.trainable_vars() {
        let g = grad_of(&grads, &var, &name);
        let report = finite_differences(&var, &g, eps, || {
            loss.value(&pc.model().forward(&img).unwrap())
        });
        println!("conv {name}: {report:?}");
        report.assert_within(tol, &name);
    }
}

/// Save, load onto a fresh copy of the same base, and compare: tensors and outputs bitwise.
pub fn save_load_round_trip(config: impl Fn() -> AdapterConfig) {
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = tiny_model(1, 2);
    pm.add_adapter(ADAPTER, config()).unwrap();
    perturb(&pm, 3);
    let (x, img) = (tiny_input(4), tiny_image(5));
    let y = pm.model().forward(&x).unwrap();
    let yc = pm.model().conv_forward(&img).unwrap();
    pm.save_adapter(tmp.path(), ADAPTER).unwrap();

    let mut fresh = tiny_model(1, 99);
    fresh.load_adapter(tmp.path(), ADAPTER).unwrap();
    assert_eq!(bits(&fresh.model().forward(&x).unwrap()), bits(&y));
    assert_eq!(bits(&fresh.model().conv_forward(&img).unwrap()), bits(&yc));
    let a = pm.adapter_tensors(ADAPTER).unwrap();
    let b = fresh.adapter_tensors(ADAPTER).unwrap();
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(ta.dtype(), tb.dtype(), "{ka}");
        assert_eq!(
            ta.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            tb.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            "{ka}"
        );
    }
    // Saving sets inference_mode, as PEFT does; everything else round-trips.
    let mut saved_json = pm.adapter_config(ADAPTER).unwrap().to_json().unwrap();
    saved_json["inference_mode"] = serde_json::Value::Bool(true);
    assert_eq!(
        saved_json,
        fresh.adapter_config(ADAPTER).unwrap().to_json().unwrap()
    );
    let names: Vec<String> = fresh.trainable_vars().into_iter().map(|(n, _)| n).collect();
    let before: Vec<String> = pm.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, before);
}

/// A base weight with a NaN is refused with an error naming the layer.
pub fn nan_weight_is_refused(config: AdapterConfig) {
    let mut r = rng(130);
    let mut w = flat(&rand_tensor(&mut r, &[4, 5], 0.5));
    w[7] = f32::NAN;
    let weights = std::collections::HashMap::from([(
        "lin.weight".to_string(),
        Tensor::from_vec(w, (4, 5), &Device::Cpu).unwrap(),
    )]);
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let b = candle_peft::PeftBuilder::new(vb);
    let lin = b.linear(5, 4, false, "lin").unwrap();
    let mut pm = PeftModel::new(lin, &b);
    let err = pm.add_adapter(ADAPTER, config).unwrap_err().to_string();
    assert!(
        err.contains("`lin`") && err.contains("non-finite") && err.contains("NaN"),
        "{err}"
    );
    assert!(
        pm.adapter_names().is_empty(),
        "a failed add leaves no adapter"
    );
}

/// Trains through the CLI (2 steps on SST-2 rows, `--merge`), then checks: the adapter's
/// `peft_type`, `inspect --json`, and that `eval` of the merged folder equals `eval` of base +
/// adapter (so load, merge and the saved frozen state agree).
pub fn cli_train_merge_inspect(method: &str, extra: &[&str], peft_type: &str) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sst2/train.tsv"),
    )
    .unwrap();
    let mut rows = vec!["label\tsentence"];
    for label in ["0\t", "1\t"] {
        rows.extend(
            text.lines()
                .skip(1)
                .filter(|l| l.starts_with(label))
                .take(8),
        );
    }
    let data = tmp.path().join("train.tsv");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let minilm = crate::common::minilm_dir();
    let out = tmp.path().join("run");
    let mut cmd = bin();
    cmd.args(["train", "--model"])
        .arg(&minilm)
        .args(["--task", "classify", "--data"])
        .arg(&data)
        .args([
            "--method", method, "--steps", "2", "--batch", "8", "--lr", "1e-2",
        ])
        .args(["--warmup", "0", "--merge", "--json", "--out"])
        .arg(&out)
        .args(extra);
    crate::common::run_ok(&mut cmd);
    let adapter = out.join("adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], peft_type);

    let inspect = crate::common::run_ok(bin().arg("inspect").arg(&adapter).arg("--json"));
    let inspect: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&inspect.stdout).trim()).unwrap();
    assert_eq!(inspect["peft_type"], peft_type);

    let eval = |model: &std::path::Path, adapter: Option<&std::path::Path>| {
        let mut cmd = bin();
        cmd.args(["eval", "--model"])
            .arg(model)
            .arg("--data")
            .arg(&data)
            .arg("--json");
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(a);
        }
        let out = crate::common::run_ok(&mut cmd);
        serde_json::from_str::<serde_json::Value>(String::from_utf8_lossy(&out.stdout).trim())
            .unwrap()
    };
    let merged = eval(&out.join("merged"), None);
    let adapted = eval(&minilm, Some(&adapter));
    let dl = (merged["loss"].as_f64().unwrap() - adapted["loss"].as_f64().unwrap()).abs();
    assert!(dl <= 1e-4, "merged vs adapted loss: {merged} {adapted}");
    assert_eq!(merged["accuracy"], adapted["accuracy"]);
    inspect
}

/// `candle-peft merge` (streaming, no model code) of an adapter saved from MiniLM: the merged
/// folder's hidden states equal the adapted model's.
pub fn cli_merge_matches_adapted_minilm(config: AdapterConfig) {
    let tmp = tempfile::tempdir().unwrap();
    let minilm = crate::common::minilm_dir();
    let (mut pm, _) = candle_peft::BertModel::from_dir(&minilm, &Device::Cpu).unwrap();
    pm.add_adapter(ADAPTER, config).unwrap();
    perturb(&pm, 140);
    let ids = Tensor::new(&[[101u32, 2023, 3185, 2003, 2307, 102]], &Device::Cpu).unwrap();
    let adapted = pm.model().forward(&ids, None, None).unwrap();
    let adapter = tmp.path().join("adapter");
    pm.save_adapter(&adapter, ADAPTER).unwrap();
    let out = tmp.path().join("merged");
    crate::common::run_ok(
        bin()
            .args(["merge", "--base"])
            .arg(&minilm)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&out),
    );
    let (merged, _) = candle_peft::BertModel::from_dir(&out, &Device::Cpu).unwrap();
    let y = merged.model().forward(&ids, None, None).unwrap();
    let err = max_abs_diff(&y, &adapted) / max_abs(&adapted);
    assert!(err <= 1e-5, "merged export vs adapted: {err}");
}
