//! LoLDU: identity at init, activation-space forward against the dense `W + ΔW`, merge/unmerge,
//! finite differences, the LU identities `P L diag(D) Ū = W`, the closed form of ΔW, parameter
//! counts, save/load, the CLI (train, merge, inspect) and bad input (zero pivots included).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_peft::adapters::loldu::LolduConfig;
use candle_peft::linalg::Precision;
use candle_peft::{AdapterConfig, PeftBuilder, PeftError, PeftModel};
use common::decomp;
use common::decomp::*;
use common::tiny::*;

fn config(r: usize) -> AdapterConfig {
    LolduConfig::new(&["lin", "conv", "q", "v"], r).into()
}

/// `P L_r` from the saved `L_r` and `perm`: `(P L)[perm[i], :] = L[i, :]`.
fn permuted(l: &Tensor, perm: &Tensor) -> Tensor {
    let perm = perm.to_vec1::<u32>().unwrap();
    let mut inverse = vec![0u32; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p as usize] = i as u32;
    }
    let inverse = Tensor::new(inverse.as_slice(), &Device::Cpu).unwrap();
    l.index_select(&inverse, 0).unwrap()
}

#[test]
fn identity_at_init_on_linear_and_conv() {
    identity_at_init(|| config(3));
}

#[test]
fn identity_at_init_on_minilm() {
    identity_at_init_minilm(LolduConfig::new(&["query", "value"], 16).into());
}

#[test]
fn forward_equals_dense_weight_after_perturbation() {
    forward_matches_dense(|| config(3));
}

#[test]
fn merge_unmerge_restores_the_weight() {
    merge_unmerge_round_trip(|| config(4));
}

#[test]
fn gradients_match_finite_differences() {
    decomp::gradients_match_finite_differences(|| config(3), 1e-2, 1e-3, |_| true);
}

#[test]
fn save_load_round_trip_is_bit_identical() {
    save_load_round_trip(|| config(2));
}

#[test]
fn full_rank_factors_reconstruct_the_weight() {
    for (in_f, out_f) in [(6, 6), (7, 5), (5, 7)] {
        let k = in_f.min(out_f);
        let mut pm = single_linear(in_f, out_f, 1);
        pm.add_adapter(ADAPTER, LolduConfig::new(&["lin"], k))
            .unwrap();
        let layer = pm.layer("lin").unwrap();
        let s = saved(layer);
        let (l, u_bar, d, perm) = (
            &s["loldu_L.weight"],
            &s["loldu_U.weight"],
            &s["loldu_D.weight"],
            &s["loldu_perm.weight"],
        );
        assert_eq!(perm.dtype(), DType::U32);
        assert_eq!(perm.dims(), &[out_f]);
        assert_eq!(l.dims(), &[out_f, k]);
        assert_eq!(u_bar.dims(), &[k, in_f]);
        // P L diag(D) Ū = W
        let recon = permuted(l, perm)
            .broadcast_mul(&d.reshape((1, k)).unwrap())
            .unwrap()
            .matmul(u_bar)
            .unwrap();
        let w = layer.weight().unwrap();
        let err = max_abs_diff(&recon, &w) / max_abs(&w);
        assert!(err <= 1e-6, "{in_f}x{out_f}: {err}");
        // Unit diagonals, triangular shapes, multipliers ≤ 1 (partial pivoting).
        let (lv, uv) = (l.to_vec2::<f32>().unwrap(), u_bar.to_vec2::<f32>().unwrap());
        for (i, row) in lv.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                if j > i {
                    assert_eq!(v, 0.0);
                } else if j == i {
                    assert_eq!(v, 1.0);
                } else {
                    assert!(v.abs() <= 1.0);
                }
            }
        }
        for (i, row) in uv.iter().enumerate() {
            assert!(row[..i].iter().all(|&v| v == 0.0));
            assert!((row[i] - 1.0).abs() <= 1e-6);
        }
        // z starts at the pivots D.
        assert_eq!(bits(vars(layer)["loldu_z.weight"].as_tensor()), bits(d));
    }
}

#[test]
fn delta_is_sigma_pl_diag_z_minus_d_u() {
    let r = 3;
    let mut pm = single_linear(6, 5, 2);
    pm.add_adapter(ADAPTER, LolduConfig::new(&["lin"], r))
        .unwrap();
    perturb(&pm, 3);
    let layer = pm.layer("lin").unwrap();
    let s = saved(layer);
    let z = vars(layer)["loldu_z.weight"].as_tensor().clone();
    let shift = ((z - &s["loldu_D.weight"]).unwrap() * (1.0 / r as f64)).unwrap();
    let expected = permuted(&s["loldu_L.weight"], &s["loldu_perm.weight"])
        .broadcast_mul(&shift.reshape((1, r)).unwrap())
        .unwrap()
        .matmul(&s["loldu_U.weight"])
        .unwrap();
    assert!(max_abs(&expected) > 1e-2);
    assert!(max_abs_diff(&delta(layer), &expected) <= 1e-6);

    // lora_alpha scales it: σ = α / r.
    let mut pm2 = single_linear(6, 5, 2);
    let mut c = LolduConfig::new(&["lin"], r);
    c.lora_alpha = 4.0;
    assert_eq!(c.scaling(), 4.0 / 3.0);
    pm2.add_adapter(ADAPTER, c).unwrap();
    let l2 = pm2.layer("lin").unwrap();
    vars(l2)["loldu_z.weight"]
        .set(&vars(layer)["loldu_z.weight"])
        .unwrap();
    let err = max_abs_diff(&delta(l2), &(delta(layer) * 4.0).unwrap());
    assert!(err <= 1e-6, "{err}");
}

#[test]
fn lu_in_f32_matches_f64_pivots() {
    let mut pm = single_linear(8, 8, 4);
    let mut c = LolduConfig::new(&["lin"], 8);
    c.lu_dtype = Precision::F32;
    pm.add_adapter(ADAPTER, c).unwrap();
    let mut pm64 = single_linear(8, 8, 4);
    pm64.add_adapter(ADAPTER, LolduConfig::new(&["lin"], 8))
        .unwrap();
    let (a, b) = (
        saved(pm.layer("lin").unwrap()),
        saved(pm64.layer("lin").unwrap()),
    );
    assert_eq!(
        a["loldu_perm.weight"].to_vec1::<u32>().unwrap(),
        b["loldu_perm.weight"].to_vec1::<u32>().unwrap()
    );
    assert!(max_abs_diff(&a["loldu_D.weight"], &b["loldu_D.weight"]) <= 1e-5);
}

#[test]
fn trainable_count_is_r_per_matrix() {
    let mut pm = tiny_model(7, 8);
    pm.add_adapter(ADAPTER, LolduConfig::new(&["q", "v", "conv"], 3))
        .unwrap();
    assert_eq!(pm.num_trainable_parameters(), 6 * 3);
    let names: Vec<String> = pm.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert!(
        names.iter().all(|n| n.ends_with("loldu_z.default.weight")),
        "{names:?}"
    );
}

/// A model with one linear layer `lin` whose weight is `w` (`[out, in]`, no bias).
fn linear_with(w: Vec<f32>, out_f: usize, in_f: usize) -> PeftModel<candle_peft::PeftLinear> {
    let weights = HashMap::from([(
        "lin.weight".to_string(),
        Tensor::from_vec(w, (out_f, in_f), &Device::Cpu).unwrap(),
    )]);
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let lin = b.linear(in_f, out_f, false, "lin").unwrap();
    PeftModel::new(lin, &b)
}

#[test]
fn zero_pivots_are_refused_naming_the_layer_and_pivot() {
    // An all-zero first column: the first pivot is 0.
    let w = vec![
        0.0, 1.0, 2.0, //
        0.0, 3.0, 1.0, //
        0.0, 2.0, 5.0, //
    ];
    let mut pm = linear_with(w, 3, 3);
    let err = pm
        .add_adapter(ADAPTER, LolduConfig::new(&["lin"], 1))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::InvalidLayer { .. }), "{msg}");
    assert!(msg.contains("`lin`") && msg.contains("pivot 0"), "{msg}");

    // Rank 2 (row 3 = row 1 + row 2): pivots 0 and 1 are fine, pivot 2 is zero.
    let w = vec![
        1.0, 2.0, 3.0, //
        4.0, 1.0, 2.0, //
        5.0, 3.0, 5.0, //
    ];
    let mut pm = linear_with(w, 3, 3);
    pm.add_adapter(ADAPTER, LolduConfig::new(&["lin"], 2))
        .unwrap();
    pm.delete_adapter(ADAPTER).unwrap();
    let msg = pm
        .add_adapter(ADAPTER, LolduConfig::new(&["lin"], 3))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("pivot 2") && msg.contains("at most 2"),
        "{msg}"
    );
}

#[test]
fn bad_input_is_refused_clearly() {
    let mut pm = tiny_model(1, 2);
    let err = pm
        .add_adapter(ADAPTER, LolduConfig::new(&["head"], 4))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("`head`") && msg.contains("rank 4") && msg.contains("= 3"),
        "{msg}"
    );
    let msg = pm
        .add_adapter(ADAPTER, LolduConfig::new(&["q"], 0))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("at least 1"), "{msg}");
    nan_weight_is_refused(LolduConfig::new(&["lin"], 2).into());

    // A file whose perm is not a permutation.
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = single_linear(4, 4, 5);
    pm.add_adapter(ADAPTER, LolduConfig::new(&["lin"], 2))
        .unwrap();
    pm.save_adapter(tmp.path(), ADAPTER).unwrap();
    let path = tmp.path().join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert(
        "base_model.model.lin.loldu_perm.weight".into(),
        Tensor::new(&[0u32, 1, 1, 3], &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let mut fresh = single_linear(4, 4, 5);
    let msg = fresh
        .load_adapter(tmp.path(), ADAPTER)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`lin`") && msg.contains("not a permutation"),
        "{msg}"
    );
}

#[test]
fn config_json_round_trip() {
    let mut c = LolduConfig::new(&["q", "v"], 5);
    c.lora_alpha = 2.5;
    let json = AdapterConfig::from(c.clone()).to_json().unwrap();
    assert_eq!(json["peft_type"], "LOLDU");
    assert_eq!(json["r"], 5);
    assert_eq!(json["lora_alpha"], 2.5);
    assert_eq!(json["lu_dtype"], "float64");
    assert_eq!(
        AdapterConfig::from_json(&json).unwrap(),
        AdapterConfig::from(c)
    );
}

#[test]
fn cli_train_merge_and_inspect() {
    let inspect = cli_train_merge_inspect("loldu", &["--rank", "32"], "LOLDU");
    assert_eq!(inspect["method"], "loldu");
    // The trainables of the 12 query/value matrices plus the classifier (2 × 384 + 2); the
    // frozen factors are listed but not counted.
    assert_eq!(inspect["trainable_params"], 12 * 32 + 770);
}

#[test]
fn cli_merge_without_model_code_matches_the_adapted_model() {
    cli_merge_matches_adapted_minilm(LolduConfig::new(&["query", "value"], 16).into());
}
