//! SVFit: identity at init, activation-space forward against the dense `W + ΔW`, merge/unmerge,
//! finite-difference and closed-form gradients, the SVD identities, parameter counts, save/load,
//! the CLI (train, merge, inspect) and bad input.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_peft::adapters::svfit::SvfitConfig;
use candle_peft::linalg::{self, Precision, rank_for_energy};
use candle_peft::{AdapterConfig, PeftError};
use common::decomp;
use common::decomp::*;
use common::tiny::*;

fn fixed(r: usize) -> AdapterConfig {
    SvfitConfig::with_rank(&["lin", "conv", "q", "v"], r).into()
}

/// The adapter's frozen state `(U_r, V_rᵀ, σ_r)` on the single layer of `pm`.
fn factors(layer: &candle_peft::LayerHandle) -> (Tensor, Tensor, Tensor) {
    let s = saved(layer);
    (
        s["svfit_U.weight"].clone(),
        s["svfit_Vh.weight"].clone(),
        s["svfit_S0.weight"].clone(),
    )
}

#[test]
fn identity_at_init_on_linear_and_conv() {
    identity_at_init(|| fixed(3));
    // The energy rule (the default) too.
    identity_at_init(|| SvfitConfig::new(&["lin", "conv"]).into());
}

#[test]
fn identity_at_init_on_minilm() {
    identity_at_init_minilm(SvfitConfig::new(&["query", "value"]).into());
}

#[test]
fn forward_equals_dense_weight_after_perturbation() {
    forward_matches_dense(|| fixed(3));
}

#[test]
fn merge_unmerge_restores_the_weight() {
    merge_unmerge_round_trip(|| fixed(4));
}

#[test]
fn gradients_match_finite_differences() {
    decomp::gradients_match_finite_differences(|| fixed(3), 1e-2, 1e-3, |_| true);
}

#[test]
fn save_load_round_trip_is_bit_identical() {
    save_load_round_trip(|| fixed(2));
    save_load_round_trip(|| SvfitConfig::new(&["q", "v", "conv"]).into());
}

#[test]
fn full_rank_factors_reconstruct_the_weight() {
    for (in_f, out_f) in [(7, 5), (5, 7)] {
        let k = in_f.min(out_f);
        let mut pm = single_linear(in_f, out_f, 1);
        let mut c = SvfitConfig::with_rank(&["lin"], k);
        c.svd_dtype = Precision::F64;
        pm.add_adapter(ADAPTER, c).unwrap();
        let layer = pm.layer("lin").unwrap();
        let (u, vh, s) = factors(layer);
        assert_eq!(u.dims(), &[out_f, k]);
        assert_eq!(vh.dims(), &[k, in_f]);
        let recon = u
            .broadcast_mul(&s.reshape((1, k)).unwrap())
            .unwrap()
            .matmul(&vh)
            .unwrap();
        let w = layer.weight().unwrap();
        assert!(max_abs_diff(&recon, &w) <= 1e-6 * max_abs(&w).max(1.0));
        let eye = Tensor::eye(k, DType::F32, &Device::Cpu).unwrap();
        assert!(max_abs_diff(&u.t().unwrap().matmul(&u).unwrap(), &eye) <= 1e-6);
        assert!(max_abs_diff(&vh.matmul(&vh.t().unwrap()).unwrap(), &eye) <= 1e-6);
        let sv = flat(&s);
        assert!(sv.windows(2).all(|p| p[0] >= p[1]) && sv[k - 1] >= 0.0);
        // The trainable starts at the pretrained singular values.
        assert_eq!(bits(vars(layer)["svfit_S.weight"].as_tensor()), bits(&s));
    }
}

#[test]
fn sigma_gradient_is_the_diagonal_of_ut_g_v() {
    let mut pm = single_linear(6, 5, 2);
    pm.add_adapter(ADAPTER, fixed(3)).unwrap();
    perturb(&pm, 3);
    let layer = pm.layer("lin").unwrap();
    let (u, vh, _) = factors(layer);
    let x = rand_tensor(&mut rng(4), &[3, 4, 6], 1.0);
    let loss = QuadLoss::new(&[3, 4, 5], 5);
    let sigma = vars(layer)["svfit_S.weight"].clone();
    let grads = loss
        .tensor(&pm.model().forward(&x).unwrap())
        .backward()
        .unwrap();
    let g_sigma = grad_of(&grads, &sigma, "σ'");

    // G = ∂L/∂W_eff from a dense layer with the same effective weight.
    let w_eff = Var::from_tensor(&(layer.weight().unwrap() + delta(layer)).unwrap()).unwrap();
    let y = x
        .broadcast_matmul(&w_eff.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(&layer.bias().unwrap())
        .unwrap();
    let g = grad_of(&loss.tensor(&y).backward().unwrap(), &w_eff, "W");
    let utgv = u
        .t()
        .unwrap()
        .matmul(&g)
        .unwrap()
        .matmul(&vh.t().unwrap())
        .unwrap();
    let diag: Vec<f32> = (0..3)
        .map(|i| {
            utgv.get(i)
                .unwrap()
                .get(i)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .collect();
    let expected = Tensor::new(diag.as_slice(), &Device::Cpu).unwrap();
    assert!(max_abs(&g_sigma) > 1e-2);
    assert!(
        max_abs_diff(&g_sigma, &expected) <= 1e-4 * max_abs(&expected),
        "{:?} vs {:?}",
        flat(&g_sigma),
        flat(&expected)
    );
}

#[test]
fn energy_rule_picks_the_smallest_rank_holding_the_share() {
    for energy in [0.5, 0.9, 0.99, 1.0] {
        let mut pm = single_linear(9, 7, 6);
        let mut c = SvfitConfig::new(&["lin"]);
        c.energy = energy;
        pm.add_adapter(ADAPTER, c).unwrap();
        let layer = pm.layer("lin").unwrap();
        let s = linalg::singular_values(&layer.weight().unwrap(), Precision::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let total: f64 = s.iter().map(|v| v * v).sum();
        let r = saved(layer)["svfit_S.weight"].dim(0).unwrap();
        assert_eq!(r, rank_for_energy(&s, total, energy), "energy {energy}");
        if energy == 1.0 {
            assert_eq!(r, 7);
        }
    }
}

#[test]
fn trainable_count_is_the_sum_of_ranks() {
    let mut pm = tiny_model(7, 8);
    pm.add_adapter(ADAPTER, SvfitConfig::with_rank(&["q", "v", "conv"], 3))
        .unwrap();
    // q, v in two blocks, extra.0.q and the conv: 6 matrices, 3 values each.
    assert_eq!(pm.num_trainable_parameters(), 6 * 3);
    let mut pm = tiny_model(7, 8);
    pm.add_adapter(ADAPTER, SvfitConfig::new(&["q", "v", "conv"]))
        .unwrap();
    let ranks: usize = pm
        .layers()
        .iter()
        .filter(|l| l.has_adapter(ADAPTER))
        .map(|l| saved(l)["svfit_S.weight"].dim(0).unwrap())
        .sum();
    assert_eq!(pm.num_trainable_parameters(), ranks);
    assert_eq!(pm.trainable_vars().len(), 6);
}

#[test]
fn bad_input_is_refused_clearly() {
    // Rank above min(out, in): the head is 6 → 3.
    let mut pm = tiny_model(1, 2);
    let err = pm
        .add_adapter(ADAPTER, SvfitConfig::with_rank(&["head"], 4))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::InvalidLayer { .. }), "{msg}");
    assert!(
        msg.contains("`head`") && msg.contains("rank 4") && msg.contains("3"),
        "{msg}"
    );

    for energy in [0.0, -0.5, 1.5, f64::NAN] {
        let mut c = SvfitConfig::new(&["q"]);
        c.energy = energy;
        let msg = pm.add_adapter(ADAPTER, c).unwrap_err().to_string();
        assert!(msg.contains("energy") && msg.contains("(0, 1]"), "{msg}");
    }
    let json = serde_json::json!({"peft_type": "SVFIT", "target_modules": ["q"], "energy": 1.2});
    let msg = AdapterConfig::from_json(&json).unwrap_err().to_string();
    assert!(msg.contains("energy"), "{msg}");
    let msg = pm
        .add_adapter(ADAPTER, SvfitConfig::with_rank(&["q"], 0))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("at least 1"), "{msg}");

    nan_weight_is_refused(SvfitConfig::with_rank(&["lin"], 2).into());
    nan_weight_is_refused(SvfitConfig::new(&["lin"]).into());
}

#[test]
fn config_json_round_trip() {
    let mut c = SvfitConfig::with_rank(&["q", "v"], 5);
    c.svd_dtype = Precision::F64;
    let json = AdapterConfig::from(c.clone()).to_json().unwrap();
    assert_eq!(json["peft_type"], "SVFIT");
    assert_eq!(json["r"], 5);
    assert_eq!(json["svd_dtype"], "float64");
    assert_eq!(
        AdapterConfig::from_json(&json).unwrap(),
        AdapterConfig::from(c)
    );
    let energy = AdapterConfig::from(SvfitConfig::new(&["q"]))
        .to_json()
        .unwrap();
    assert!(energy["r"].is_null());
    assert_eq!(energy["energy"], 0.99);
}

#[test]
fn cli_train_merge_and_inspect() {
    let inspect = cli_train_merge_inspect("svfit", &["--opt", "energy=0.5"], "SVFIT");
    assert_eq!(inspect["method"], "svfit");
}

#[test]
fn cli_merge_without_model_code_matches_the_adapted_model() {
    cli_merge_matches_adapted_minilm(SvfitConfig::with_rank(&["query", "value"], 16).into());
}
