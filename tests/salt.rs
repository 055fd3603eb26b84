//! SALT: identity at init, activation-space forward against the dense `W + ΔW` and against the
//! reference's `U ReLU(S_new) Vᵀ`, merge/unmerge, finite differences, ReLU's zero gradient at 0,
//! the SVD identities and the sign canonicalisation, the regulariser, parameter counts,
//! save/load with and without stored factors, the CLI (train, merge, inspect) and bad input;
//! `reg_weight`: the trainer adds `λ · reg` to the training loss (library and CLI).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_peft::adapters::salt::{self, SaltConfig};
use candle_peft::data::read_tsv;
use candle_peft::io::source::{self, ModelSource};
use candle_peft::{
    AdapterConfig, ClassifyTask, LayerHandle, PeftError, PeftLinear, PeftModel, TrainConfig,
    TrainTask, Trainer, Warmup,
};
use common::bin;
use common::decomp;
use common::decomp::*;
use common::tiny::*;
use rand::Rng;

const TARGETS: &[&str] = &["lin", "conv", "q", "v"];

fn config(r_t: usize, r_lora: usize) -> AdapterConfig {
    let mut c = SaltConfig::new(TARGETS, r_lora);
    c.r_t = Some(r_t);
    c.into()
}

/// Every tensor of the adapter on `layer` (trainables and factors), by local name.
fn state(layer: &LayerHandle) -> BTreeMap<String, Tensor> {
    saved(layer)
}

fn relu(t: &Tensor) -> Tensor {
    t.relu().unwrap()
}

/// The reference's `S_new = blockdiag(diag(α ⊙ σ_t + β), diag(σ_s) + X Y)`, `[k, k]`.
fn s_new(s: &BTreeMap<String, Tensor>) -> Tensor {
    let sigma = &s["salt_S.weight"];
    let k = sigma.dim(0).unwrap();
    let alpha = &s["salt_scale.weight"];
    let r_t = alpha.dim(0).unwrap();
    let top = (alpha * sigma.narrow(0, 0, r_t).unwrap()).unwrap() + &s["salt_shift.weight"];
    let top = top.unwrap();
    let mut m = vec![vec![0f32; k]; k];
    for (i, v) in flat(&top).into_iter().enumerate() {
        m[i][i] = v;
    }
    if let (Some(x), Some(y)) = (s.get("salt_X.weight"), s.get("salt_Y.weight")) {
        let xy = x.matmul(y).unwrap().to_vec2::<f32>().unwrap();
        let sv = flat(sigma);
        for a in 0..k - r_t {
            for b in 0..k - r_t {
                m[r_t + a][r_t + b] = xy[a][b] + if a == b { sv[r_t + a] } else { 0.0 };
            }
        }
    }
    Tensor::new(m, &Device::Cpu).unwrap()
}

/// `U (ReLU(S_new) − diag(σ)) Vᵀ` from the tensors alone (no canonicalisation).
fn delta_from(s: &BTreeMap<String, Tensor>) -> Tensor {
    let sigma = &s["salt_S.weight"];
    let k = sigma.dim(0).unwrap();
    let diag = Tensor::eye(k, DType::F32, &Device::Cpu)
        .unwrap()
        .broadcast_mul(&sigma.reshape((1, k)).unwrap())
        .unwrap();
    let core = (relu(&s_new(s)) - diag).unwrap();
    s["salt_U.weight"]
        .matmul(&core)
        .unwrap()
        .matmul(&s["salt_Vh.weight"])
        .unwrap()
}

/// Smallest |entry| of the non-zero pattern of `S_new` (its diagonal and the residual block):
/// central differences need every one of them away from ReLU's kink.
fn kink_margin(layer: &LayerHandle) -> f32 {
    let s = state(layer);
    let m = s_new(&s).to_vec2::<f32>().unwrap();
    let r_t = s["salt_scale.weight"].dim(0).unwrap();
    let mut margin = f32::INFINITY;
    for (i, row) in m.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            if i == j || (i >= r_t && j >= r_t) {
                margin = margin.min(v.abs());
            }
        }
    }
    margin
}

#[test]
fn identity_at_init_on_linear_and_conv() {
    identity_at_init(|| config(2, 2));
    // r_t from ratio_salt (⌊0.1·k⌋ clamped to ≥ 1).
    identity_at_init(|| SaltConfig::new(TARGETS, 3).into());
}

#[test]
fn identity_at_init_on_minilm() {
    identity_at_init_minilm(SaltConfig::new(&["query", "value"], 4).into());
}

#[test]
fn forward_equals_dense_weight_after_perturbation() {
    forward_matches_dense(|| config(2, 2));
}

#[test]
fn forward_equals_the_reference_reconstruction() {
    // y = x (U ReLU(S_new) Vᵀ)ᵀ + b, the reference's weight-space form.
    let mut pm = single_linear(7, 6, 1);
    pm.add_adapter(ADAPTER, config(2, 3)).unwrap();
    perturb(&pm, 2);
    let layer = pm.layer("lin").unwrap();
    let s = state(layer);
    let w_ref = s["salt_U.weight"]
        .matmul(&relu(&s_new(&s)))
        .unwrap()
        .matmul(&s["salt_Vh.weight"])
        .unwrap();
    // ReLU clips entries of the residual block: the test exercises the clipping.
    let clipped = flat(&s_new(&s)).iter().filter(|v| **v < 0.0).count();
    assert!(clipped > 0);
    let x = rand_tensor(&mut rng(3), &[4, 7], 1.0);
    let y_ref = x
        .matmul(&w_ref.t().unwrap())
        .unwrap()
        .broadcast_add(&layer.bias().unwrap())
        .unwrap();
    let y = pm.model().forward(&x).unwrap();
    let err = max_abs_diff(&y, &y_ref) / max_abs(&y_ref);
    assert!(err <= 1e-5, "{err}");
    // ΔW is the closed form U (ReLU(S_new) − diag σ) Vᵀ.
    assert!(max_abs_diff(&delta(layer), &delta_from(&s)) <= 1e-6);
}

#[test]
fn merge_unmerge_restores_the_weight() {
    merge_unmerge_round_trip(|| config(2, 2));
}

#[test]
fn gradients_match_finite_differences() {
    decomp::gradients_match_finite_differences(
        || config(2, 2),
        1e-2,
        1e-3,
        |l| kink_margin(l) > 0.05,
    );
}

#[test]
fn relu_has_zero_gradient_at_zero() {
    // At init Y = 0: X gets no gradient, and Y's gradient flows only through the diagonal of
    // the residual block (its off-diagonal entries sit exactly at ReLU's kink), so
    // ∂L/∂Y = Xᵀ diag(g) with g = diag(U_sᵀ G V_s). candle's own relu would pass the
    // off-diagonal gradient too.
    let mut pm = single_linear(6, 5, 4);
    pm.add_adapter(ADAPTER, config(1, 2)).unwrap();
    let layer = pm.layer("lin").unwrap();
    let x = rand_tensor(&mut rng(5), &[3, 6], 1.0);
    let loss = QuadLoss::new(&[3, 5], 6);
    let grads = loss
        .tensor(&pm.model().forward(&x).unwrap())
        .backward()
        .unwrap();
    let v = vars(layer);
    let gx = grad_of(&grads, &v["salt_X.weight"], "X");
    assert_eq!(max_abs(&gx), 0.0);
    let gy = grad_of(&grads, &v["salt_Y.weight"], "Y");
    assert!(max_abs(&gy) > 1e-3);

    let w = Var::from_tensor(&layer.weight().unwrap()).unwrap();
    let y = x
        .matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(&layer.bias().unwrap())
        .unwrap();
    let g = grad_of(&loss.tensor(&y).backward().unwrap(), &w, "W");
    let s = state(layer);
    let (r_t, k) = (1, 5);
    let us = s["salt_U.weight"].narrow(1, r_t, k - r_t).unwrap();
    let vs = s["salt_Vh.weight"].narrow(0, r_t, k - r_t).unwrap();
    let gs = us
        .t()
        .unwrap()
        .matmul(&g)
        .unwrap()
        .matmul(&vs.t().unwrap())
        .unwrap();
    let gs = gs.to_vec2::<f32>().unwrap();
    let diag: Vec<f32> = (0..k - r_t).map(|i| gs[i][i]).collect();
    let diag = Tensor::new(diag.as_slice(), &Device::Cpu).unwrap();
    let expected = s["salt_X.weight"]
        .t()
        .unwrap()
        .broadcast_mul(&diag.reshape((1, k - r_t)).unwrap())
        .unwrap();
    let err = max_abs_diff(&gy, &expected) / max_abs(&expected);
    assert!(
        err <= 1e-4,
        "∂L/∂Y {:?} vs Xᵀ diag(g) {:?}",
        flat(&gy),
        flat(&expected)
    );
    // With a pass-through gradient at 0, the off-diagonal terms would add Xᵀ (G_s − diag(g)).
    let full = s["salt_X.weight"]
        .t()
        .unwrap()
        .matmul(&Tensor::new(gs, &Device::Cpu).unwrap());
    assert!(max_abs_diff(&full.unwrap(), &expected) > 1e-2);
}

#[test]
fn save_load_round_trip_is_bit_identical() {
    save_load_round_trip(|| config(2, 2));
}

#[test]
fn without_stored_factors_the_svd_is_redone_from_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let make = || {
        let mut c = SaltConfig::new(&["q", "v", "conv"], 2);
        c.store_factors = false;
        c
    };
    let mut pm = tiny_model(1, 2);
    pm.add_adapter(ADAPTER, make()).unwrap();
    perturb(&pm, 3);
    let x = tiny_input(4);
    let y = pm.model().forward(&x).unwrap();
    pm.save_adapter(tmp.path(), ADAPTER).unwrap();
    let file =
        candle_core::safetensors::load(tmp.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(
        file.keys()
            .all(|k| !k.contains("salt_U") && !k.contains("salt_Vh"))
    );
    assert!(file.keys().any(|k| k.ends_with("salt_X.weight")));
    let mut fresh = tiny_model(1, 9);
    fresh.load_adapter(tmp.path(), ADAPTER).unwrap();
    let err = max_abs_diff(&fresh.model().forward(&x).unwrap(), &y) / max_abs(&y);
    assert!(err <= 1e-6, "{err}");
}

#[test]
fn init_is_canonical_and_a_flipped_residual_pair_is_another_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = single_linear(7, 6, 7);
    pm.add_adapter(ADAPTER, config(2, 3)).unwrap();
    perturb(&pm, 8);
    let layer = pm.layer("lin").unwrap();
    let before = delta(layer);
    let mut s = state(layer);
    // Canonical: the entry of largest magnitude of each column of U is positive.
    let u = s["salt_U.weight"].to_vec2::<f32>().unwrap();
    for j in 0..6 {
        let col: Vec<f32> = u.iter().map(|r| r[j]).collect();
        let m = col.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(*col.iter().find(|v| v.abs() == m).unwrap() > 0.0);
    }
    // Flip residual pair j = 3: W = U diag(σ) Vᵀ is unchanged ...
    let mut signs = vec![1f32; 6];
    signs[3] = -1.0;
    let signs = Tensor::new(signs.as_slice(), &Device::Cpu).unwrap();
    let flipped_u = s["salt_U.weight"]
        .broadcast_mul(&signs.reshape((1, 6)).unwrap())
        .unwrap();
    let flipped_vh = s["salt_Vh.weight"]
        .broadcast_mul(&signs.reshape((6, 1)).unwrap())
        .unwrap();
    let recon = |u: &Tensor, vh: &Tensor| {
        u.broadcast_mul(&s["salt_S.weight"].reshape((1, 6)).unwrap())
            .unwrap()
            .matmul(vh)
            .unwrap()
    };
    let w_flipped = recon(&flipped_u, &flipped_vh);
    assert!(
        max_abs_diff(
            &w_flipped,
            &recon(&s["salt_U.weight"], &s["salt_Vh.weight"])
        ) <= 1e-6
    );
    s.insert("salt_U.weight".into(), flipped_u);
    s.insert("salt_Vh.weight".into(), flipped_vh);
    // ... but without canonicalisation ΔW changes (X Y is not diagonal and ReLU sees signs).
    let naive = delta_from(&s);
    assert!(
        max_abs_diff(&naive, &before) > 1e-2,
        "the flip should matter"
    );

    // A file holding the flipped factors is that other adapter: loading keeps the stored signs.
    pm.save_adapter(tmp.path(), ADAPTER).unwrap();
    let path = tmp.path().join("adapter_model.safetensors");
    let mut file = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for name in ["salt_U.weight", "salt_Vh.weight"] {
        file.insert(format!("base_model.model.lin.{name}"), s[name].clone());
    }
    candle_core::safetensors::save(&file, &path).unwrap();
    let mut fresh = single_linear(7, 6, 7);
    fresh.load_adapter(tmp.path(), ADAPTER).unwrap();
    let after = delta(fresh.layer("lin").unwrap());
    assert!(max_abs_diff(&after, &naive) <= 1e-6 * max_abs(&naive));
}

/// SALT's factors `U`, `Vᵀ` with column 3 of `U` rewritten so that its two largest-magnitude
/// entries are tied, the negative one first: re-applying the sign rule to them would flip the
/// residual pair 3 (what a load did when init's f64 choice and the f32 factors disagreed).
fn tied_factors(pm: &PeftModel<PeftLinear>) -> BTreeMap<String, Tensor> {
    let mut s = state(pm.layer("lin").unwrap());
    let mut u = s["salt_U.weight"].to_vec2::<f32>().unwrap();
    let m = 1.5 * u.iter().fold(0f32, |m, row| m.max(row[3].abs()));
    u[0][3] = -m;
    u[1][3] = m;
    s.insert(
        "salt_U.weight".into(),
        Tensor::new(u, &Device::Cpu).unwrap(),
    );
    s
}

#[test]
fn stored_factors_are_used_as_stored_on_load_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, again) = (tmp.path().join("tied"), tmp.path().join("again"));
    let mut pm = single_linear(7, 6, 7);
    pm.add_adapter(ADAPTER, config(2, 3)).unwrap();
    perturb(&pm, 8);
    let s = tied_factors(&pm);
    let want = delta_from(&s);
    // Re-canonicalising would change the layer: the flip matters.
    let (cu, cv) = candle_peft::linalg::canonicalize_svd_signs(
        &s["salt_U.weight"],
        &s["salt_Vh.weight"].t().unwrap(),
    )
    .unwrap();
    let mut flipped = s.clone();
    flipped.insert("salt_U.weight".into(), cu);
    flipped.insert("salt_Vh.weight".into(), cv.t().unwrap());
    assert!(max_abs_diff(&delta_from(&flipped), &want) > 1e-2 * max_abs(&want));

    // The adapter file with the tied factors.
    pm.save_adapter(&dir, ADAPTER).unwrap();
    let path = dir.join("adapter_model.safetensors");
    let mut file = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for (name, t) in &s {
        file.insert(format!("base_model.model.lin.{name}"), t.clone());
    }
    candle_core::safetensors::save(&file, &path).unwrap();

    // Load: every tensor as stored, bit for bit; ΔW from them; save → load is bit-identical.
    let x = rand_tensor(&mut rng(9), &[4, 7], 1.0);
    let mut fresh = single_linear(7, 6, 7);
    fresh.load_adapter(&dir, ADAPTER).unwrap();
    let loaded = state(fresh.layer("lin").unwrap());
    assert_eq!(
        loaded.keys().collect::<Vec<_>>(),
        s.keys().collect::<Vec<_>>()
    );
    for (name, t) in &s {
        assert_eq!(bits(&loaded[name]), bits(t), "{name}");
    }
    let got = delta(fresh.layer("lin").unwrap());
    assert!(max_abs_diff(&got, &want) <= 1e-6 * max_abs(&want));
    let y = fresh.model().forward(&x).unwrap();
    fresh.save_adapter(&again, ADAPTER).unwrap();
    let resaved =
        candle_core::safetensors::load(again.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(resaved.len(), file.len());
    for (key, t) in &file {
        assert_eq!(bits(&resaved[key]), bits(t), "{key}");
    }
    let mut twice = single_linear(7, 6, 7);
    twice.load_adapter(&again, ADAPTER).unwrap();
    assert_eq!(bits(&twice.model().forward(&x).unwrap()), bits(&y));

    // Merge in memory and the streaming merge from files: W + ΔW of the stored factors.
    let w = fresh.layer("lin").unwrap().weight().unwrap();
    let merged_want = (&w + &want).unwrap();
    fresh.merge().unwrap();
    let merged = fresh.layer("lin").unwrap().weight().unwrap();
    assert!(max_abs_diff(&merged, &merged_want) <= 1e-6 * max_abs(&merged_want));
    let base = tmp.path().join("base.safetensors");
    let base_file = std::collections::HashMap::from([("lin.weight".to_string(), w)]);
    candle_core::safetensors::save(&base_file, &base).unwrap();
    let out = tmp.path().join("merged");
    candle_peft::io::export::merge_adapter_into_base(&base, &dir, &out, Default::default())
        .unwrap();
    let streamed = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("lin.weight")
        .unwrap();
    assert_eq!(bits(&streamed), bits(&merged));
}

#[test]
fn full_svd_factors_reconstruct_the_weight() {
    for (in_f, out_f) in [(7, 5), (5, 7)] {
        let k = in_f.min(out_f);
        let mut pm = single_linear(in_f, out_f, 9);
        pm.add_adapter(ADAPTER, config(1, 2)).unwrap();
        let layer = pm.layer("lin").unwrap();
        let s = state(layer);
        let (u, sigma, vh) = (
            &s["salt_U.weight"],
            &s["salt_S.weight"],
            &s["salt_Vh.weight"],
        );
        assert_eq!(u.dims(), &[out_f, k]);
        assert_eq!(vh.dims(), &[k, in_f]);
        let recon = u
            .broadcast_mul(&sigma.reshape((1, k)).unwrap())
            .unwrap()
            .matmul(vh)
            .unwrap();
        let w = layer.weight().unwrap();
        let err = max_abs_diff(&recon, &w) / max_abs(&w);
        assert!(err <= 1e-6, "{err}");
        let eye = Tensor::eye(k, DType::F32, &Device::Cpu).unwrap();
        assert!(max_abs_diff(&u.t().unwrap().matmul(u).unwrap(), &eye) <= 1e-6);
        let sv = flat(sigma);
        assert!(sv.windows(2).all(|p| p[0] >= p[1]) && sv[k - 1] >= 0.0);
    }
}

#[test]
fn regularizer_is_the_two_norms_with_finite_gradients() {
    let mut pm = single_linear(7, 6, 10);
    pm.add_adapter(ADAPTER, config(2, 3)).unwrap();
    // At init both norms are 0, and the gradient is 0, not NaN.
    let reg = pm.adapter_regularizer(ADAPTER).unwrap().unwrap();
    assert_eq!(reg.to_scalar::<f32>().unwrap(), 0.0);
    let grads = reg.backward().unwrap();
    for (name, var) in pm.trainable_vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            assert!(flat(g).iter().all(|v| *v == 0.0), "{name}");
        }
    }
    perturb(&pm, 11);
    let layer = pm.layer("lin").unwrap();
    let s = state(layer);
    let sigma_t = s["salt_S.weight"].narrow(0, 0, 2).unwrap();
    let top = ((&s["salt_scale.weight"] * &sigma_t).unwrap() + &s["salt_shift.weight"])
        .unwrap()
        .sub(&sigma_t)
        .unwrap();
    let xy = s["salt_X.weight"].matmul(&s["salt_Y.weight"]).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let expected = norm(&top) + norm(&xy);
    let reg = pm.adapter_regularizer(ADAPTER).unwrap().unwrap();
    assert!((reg.to_scalar::<f32>().unwrap() - expected).abs() <= 1e-5 * expected);
    // ∂reg/∂β = top / ‖top‖.
    let grads = reg.backward().unwrap();
    let g_shift = grad_of(&grads, &vars(layer)["salt_shift.weight"], "β");
    let want = (top.clone() / f64::from(norm(&top))).unwrap();
    assert!(max_abs_diff(&g_shift, &want) <= 1e-5);
    // A model without SALT adapters has no regulariser.
    let mut other = single_linear(4, 4, 1);
    other
        .add_adapter(ADAPTER, candle_peft::LoraConfig::new(&["lin"], 2, 4.0))
        .unwrap();
    assert!(other.adapter_regularizer(ADAPTER).unwrap().is_none());
}

#[test]
fn trainable_count_follows_the_formula() {
    // k = 6 for the 6×6 tiny linears, 4 for the conv (4 out, 3·3·3 in).
    let mut pm = tiny_model(7, 8);
    pm.add_adapter(ADAPTER, {
        let mut c = SaltConfig::new(&["q", "v", "conv"], 2);
        c.r_t = Some(2);
        c
    })
    .unwrap();
    let count = |k: usize, r_t: usize, r_lora: usize| 2 * r_t + 2 * (k - r_t) * r_lora;
    assert_eq!(
        pm.num_trainable_parameters(),
        5 * count(6, 2, 2) + count(4, 2, 2)
    );
    // r_lora above k − r_t is used as given, as in the reference: X is [k − r_t, r_lora].
    let mut pm = tiny_model(7, 8);
    pm.add_adapter(ADAPTER, {
        let mut c = SaltConfig::new(&["q", "v", "conv"], 10);
        c.r_t = Some(2);
        c
    })
    .unwrap();
    assert_eq!(
        pm.num_trainable_parameters(),
        5 * count(6, 2, 10) + count(4, 2, 10)
    );
    let s = state(pm.layer("model.conv").unwrap());
    assert_eq!(s["salt_X.weight"].dims(), &[2, 10]);
    assert_eq!(s["salt_Y.weight"].dims(), &[10, 2]);
    // X ~ U(±√(6/r_lora)) (Kaiming-uniform for ReLU with fan-in r_lora), Y = 0.
    let bound = (6.0f32 / 10.0).sqrt();
    let x = flat(&s["salt_X.weight"]);
    assert!(x.iter().all(|v| v.abs() <= bound), "{x:?}");
    assert!(x.iter().any(|v| v.abs() > 0.5 * bound), "{x:?}");
    assert_eq!(max_abs(&s["salt_Y.weight"]), 0.0);
    assert_eq!(max_abs(&delta(pm.layer("model.conv").unwrap())), 0.0);
    // r_t = k leaves no residual block: scale and shift only.
    let mut pm = single_linear(5, 4, 1);
    pm.add_adapter(ADAPTER, config(4, 2)).unwrap();
    assert_eq!(pm.num_trainable_parameters(), 2 * 4);
    assert_eq!(max_abs(&delta(pm.layer("lin").unwrap())), 0.0);
}

#[test]
fn bad_input_is_refused_clearly() {
    let mut pm = tiny_model(1, 2);
    let mut c = SaltConfig::new(&["head"], 2);
    c.r_t = Some(4);
    let err = pm.add_adapter(ADAPTER, c).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::InvalidLayer { .. }), "{msg}");
    assert!(
        msg.contains("`head`") && msg.contains("r_t = 4") && msg.contains("= 3"),
        "{msg}"
    );
    for ratio in [0.0, 1.5] {
        let mut c = SaltConfig::new(&["q"], 2);
        c.ratio_salt = ratio;
        let msg = pm.add_adapter(ADAPTER, c).unwrap_err().to_string();
        assert!(msg.contains("ratio_salt"), "{msg}");
    }
    let msg = pm
        .add_adapter(ADAPTER, SaltConfig::new(&["q"], 0))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("r_lora"), "{msg}");
    for w in [-1.0, f64::NAN] {
        let mut c = SaltConfig::new(&["q"], 2);
        c.reg_weight = w;
        let msg = pm.add_adapter(ADAPTER, c).unwrap_err().to_string();
        assert!(msg.contains("reg_weight"), "{msg}");
    }
    nan_weight_is_refused(SaltConfig::new(&["lin"], 2).into());
}

#[test]
fn config_json_round_trip() {
    let mut c = SaltConfig::new(&["q", "v"], 4);
    c.r_t = Some(3);
    c.store_factors = false;
    c.reg_weight = 0.25;
    let mut json = AdapterConfig::from(c.clone()).to_json().unwrap();
    assert_eq!(json["peft_type"], "SALT");
    assert_eq!(json["r_t"], 3);
    assert_eq!(json["r_lora"], 4);
    assert_eq!(json["store_factors"], false);
    assert_eq!(json["reg_weight"], 0.25);
    assert_eq!(json["svd_sign_rule"], salt::SVD_SIGN_RULE);
    let back = AdapterConfig::from_json(&json).unwrap();
    assert_eq!(back.regularizer_weight(), 0.25);
    assert_eq!(back, AdapterConfig::from(c.clone()));
    // Files written before the field existed load with no regulariser.
    json.as_object_mut().unwrap().remove("reg_weight");
    let old = AdapterConfig::from_json(&json).unwrap();
    assert_eq!(old.regularizer_weight(), 0.0);
    assert_eq!(
        old,
        AdapterConfig::from(SaltConfig {
            reg_weight: 0.0,
            ..c
        })
    );
}

/// `Σ_layers ‖α ⊙ σ_t + β − σ_t‖₂ + ‖X Y‖_F` in f64, from the tensors alone, over groups of
/// (local name → tensor) per layer.
fn reg_by_hand<'a>(layers: impl IntoIterator<Item = &'a BTreeMap<String, Tensor>>) -> f64 {
    let v = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut total = 0.0;
    for s in layers {
        let sigma = v(&s["salt_S.weight"]);
        let alpha = v(&s["salt_scale.weight"]);
        let beta = v(&s["salt_shift.weight"]);
        let top: f64 = (0..alpha.len())
            .map(|i| (alpha[i] * sigma[i] + beta[i] - sigma[i]).powi(2))
            .sum();
        let x = s["salt_X.weight"].to_dtype(DType::F64).unwrap();
        let y = s["salt_Y.weight"].to_dtype(DType::F64).unwrap();
        let xy: f64 = v(&x.matmul(&y).unwrap()).iter().map(|e| e * e).sum();
        total += top.sqrt() + xy.sqrt();
    }
    total
}

/// MiniLM with the classifier's dropout off (an edited copy of its config.json): a
/// training-mode loss is then a function of the vars and the batch alone.
fn minilm_without_dropout(dir: &Path) -> ModelSource {
    let mut src = source::resolve_local(&common::minilm_dir()).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&src.config).unwrap()).unwrap();
    config["classifier_dropout"] = serde_json::json!(0.0);
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    src.config = path;
    src
}

/// SALT (r_t 4, r_lora 2) on MiniLM's six `query` layers with `reg_weight`, every SALT
/// trainable then moved off its init by the same seeded amounts (at init the regulariser is
/// exactly 0, which would make the comparison vacuous).
fn salt_classify_task(src: &ModelSource, reg_weight: f64) -> ClassifyTask {
    let labels = vec!["0".to_string(), "1".to_string()];
    let mut task = ClassifyTask::from_source(
        src.clone(),
        labels,
        candle_peft::tasks::TaskOptions {
            seq_len: 32,
            seed: 7,
            ..Default::default()
        },
    )
    .unwrap();
    let mut c = SaltConfig::new(&["query"], 2);
    c.r_t = Some(4);
    c.reg_weight = reg_weight;
    task.add_adapter(ADAPTER, c).unwrap();
    let at_init = task.model().adapter_regularizer(ADAPTER).unwrap().unwrap();
    assert_eq!(at_init.to_scalar::<f32>().unwrap(), 0.0);
    let mut r = rng(21);
    for (name, var) in task.model().trainable_vars() {
        let amount = if name.contains("salt_scale") {
            0.2
        } else if name.contains("salt_shift") {
            0.1
        } else if name.contains("salt_Y") {
            0.02
        } else {
            continue;
        };
        let v: Vec<f32> = flat(var.as_tensor())
            .iter()
            .map(|x| x + amount * (2.0 * r.random::<f32>() - 1.0))
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    task
}

#[test]
fn trainer_loss_adds_the_weighted_regulariser() {
    let tmp = tempfile::tempdir().unwrap();
    let src = minilm_without_dropout(tmp.path());
    let data = read_tsv(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sst2/train.tsv")).unwrap();
    let examples: Vec<_> = data.examples.into_iter().take(8).collect();
    let lambda = 0.01;
    let cfg = TrainConfig {
        steps: 1,
        batch_size: examples.len(),
        lr: 1e-3,
        warmup: Warmup::Steps(0),
        quiet: true,
        ..TrainConfig::default()
    };

    let with_reg = salt_classify_task(&src, lambda);
    // Both sides on their own: the task's loss on the whole batch (step 1 sees the same
    // examples, shuffled), and the regulariser from the saved tensors.
    with_reg.set_training(true);
    let refs: Vec<_> = examples.iter().collect();
    let task_loss = f64::from(with_reg.loss(&refs).unwrap().0.to_scalar::<f32>().unwrap());
    let per_layer: Vec<BTreeMap<String, Tensor>> = with_reg
        .model()
        .layers()
        .iter()
        .map(saved)
        // The classifier carries the adapter too, as a `modules_to_save` copy.
        .filter(|s| s.contains_key("salt_S.weight"))
        .collect();
    assert_eq!(per_layer.len(), 6);
    let reg = reg_by_hand(&per_layer);
    assert!(
        lambda * reg > 1e-2,
        "λ·reg = {} is too small to test",
        lambda * reg
    );
    let term = with_reg.regularization_loss().unwrap().unwrap();
    let term = f64::from(term.to_scalar::<f32>().unwrap());
    assert!(
        (term - lambda * reg).abs() <= 1e-5,
        "{term} vs {}",
        lambda * reg
    );

    let report = Trainer::new(cfg.clone())
        .unwrap()
        .run(&with_reg, &examples, None)
        .unwrap();
    let want = task_loss + lambda * reg;
    assert!(
        (report.losses[0] - want).abs() <= 1e-5,
        "step 1 loss {} vs task {task_loss} + λ·reg {}",
        report.losses[0],
        lambda * reg
    );

    // λ = 0: no term at all, and the step-1 loss is the task's.
    let without = salt_classify_task(&src, 0.0);
    assert!(without.regularization_loss().unwrap().is_none());
    let report = Trainer::new(cfg)
        .unwrap()
        .run(&without, &examples, None)
        .unwrap();
    assert!(
        (report.losses[0] - task_loss).abs() <= 1e-5,
        "{} vs {task_loss}",
        report.losses[0]
    );
}

/// The JSON line of a `--json` run.
fn json_out(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap();
    serde_json::from_str(line).unwrap()
}

#[test]
fn cli_reg_weight_adds_the_regulariser_to_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sst2/train.tsv"))
            .unwrap();
    let mut rows = vec!["label\tsentence"];
    rows.extend(text.lines().skip(1).take(8));
    let data = tmp.path().join("train.tsv");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let train = |out: &Path, extra: &[&str]| {
        let mut cmd = bin();
        cmd.args(["train", "--model"])
            .arg(common::minilm_dir())
            .args(["--task", "classify", "--data"])
            .arg(&data)
            .args(["--method", "salt", "--targets", "query", "--rank", "2"])
            .args([
                "--opt", "r_t=4", "--steps", "2", "--batch", "8", "--lr", "1e-2",
            ])
            .args([
                "--warmup",
                "0",
                "--checkpoint-every",
                "1",
                "--json",
                "--quiet",
            ])
            .arg("--out")
            .arg(out)
            .args(extra);
        cmd
    };
    let lambda = 0.5;
    let (out_reg, out_plain) = (tmp.path().join("reg"), tmp.path().join("plain"));
    let with_reg = json_out(&common::run_ok(&mut train(
        &out_reg,
        &["--opt", "reg_weight=0.5"],
    )));
    let plain = json_out(&common::run_ok(&mut train(&out_plain, &[])));
    let losses = |v: &serde_json::Value| -> Vec<f64> {
        v["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_f64().unwrap())
            .collect()
    };
    let (l_reg, l_plain) = (losses(&with_reg), losses(&plain));
    // At init the regulariser and its gradient are 0: step 1 is the same in both runs (same
    // seed, same dropout masks), so step 2 starts from the same vars and differs by λ·reg.
    assert_eq!(l_reg[0], l_plain[0]);
    let adapter = out_reg.join("checkpoint-1/adapter/adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&adapter, &Device::Cpu).unwrap();
    let mut per_layer: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    for (key, t) in tensors {
        if let Some(at) = key.find(".salt_") {
            per_layer
                .entry(key[..at].to_string())
                .or_default()
                .insert(key[at + 1..].to_string(), t);
        }
    }
    assert_eq!(per_layer.len(), 6);
    let reg = reg_by_hand(per_layer.values());
    assert!(lambda * reg > 1e-3, "λ·reg = {}", lambda * reg);
    let diff = l_reg[1] - l_plain[1];
    assert!(
        (diff - lambda * reg).abs() <= 1e-5,
        "step-2 difference {diff} vs λ·reg {}",
        lambda * reg
    );
    let config = |out: &Path| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(config(&out_reg)["reg_weight"], lambda);
    assert_eq!(config(&out_plain)["reg_weight"], 0.0);
    let msg = common::run_err(&mut train(
        &tmp.path().join("bad"),
        &["--opt", "reg_weight=-1"],
    ));
    assert!(msg.contains("reg_weight"), "{msg}");
}

#[test]
fn cli_train_merge_and_inspect() {
    let inspect = cli_train_merge_inspect("salt", &["--rank", "4", "--opt", "r_t=8"], "SALT");
    assert_eq!(inspect["method"], "salt");
    // The trainables of the 12 query/value matrices plus the classifier (2 × 384 + 2); the
    // frozen factors are listed but not counted.
    assert_eq!(
        inspect["trainable_params"],
        12 * (2 * 8 + 2 * (384 - 8) * 4) + 770
    );
}

#[test]
fn cli_merge_without_model_code_matches_the_adapted_model() {
    cli_merge_matches_adapted_minilm(SaltConfig::new(&["query", "value"], 4).into());
}

#[test]
fn cli_merge_without_stored_factors_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let minilm = common::minilm_dir();
    let (mut pm, _) = candle_peft::BertModel::from_dir(&minilm, &Device::Cpu).unwrap();
    let mut c = SaltConfig::new(&["query"], 2);
    c.store_factors = false;
    pm.add_adapter(ADAPTER, c).unwrap();
    let adapter = tmp.path().join("adapter");
    pm.save_adapter(&adapter, ADAPTER).unwrap();
    let msg = common::run_err(
        bin()
            .args(["merge", "--base"])
            .arg(&minilm)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(tmp.path().join("out")),
    );
    assert!(
        msg.contains("store_factors") && msg.contains("base weight"),
        "{msg}"
    );
    assert!(!tmp.path().join("out").join("model.safetensors").exists());
}
