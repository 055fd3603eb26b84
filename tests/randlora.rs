//! RandLoRA (adapters/randlora.rs): PEFT's flat-position pairing against an index-level oracle,
//! full rank, identity at init, Λ-only first step, finite-difference gradients, merge/unmerge,
//! the PEFT file layout (model-level bases plus per-layer duplicates) and its save/load round
//! trip, sparse bases, two adapters of different r, the conv extension, trainable counts from
//! geometry (MiniLM and Llama-3.2-3B), bad input, and the CLI (train, inspect, merge).
//!
//! No PEFT-generated RandLoRA fixture is shipped: compatibility is proved by the closed-form
//! checks of methods-b §2(g) instead.

mod common;
use common::bin;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Optimizer;
use candle_peft::adapters::randlora::{
    self, RandLoraConfig, SHARED_A_KEY, SHARED_B_KEY, flat_dims, num_bases,
};
use candle_peft::{BertModel, Conv2dParams, LayerGeometry, LayerHandle, PeftError, PeftModel};
use common::tiny::*;
use serde_json::Value;

const ADAPTER: &str = "default";

/// A config whose Λ is random (`init_weights = false`), so the adapter is not the identity.
fn random_config(targets: &[&str], r: usize, alpha: f64) -> RandLoraConfig {
    let mut c = RandLoraConfig::new(targets, r, alpha);
    c.init_weights = false;
    c
}

/// Λ and Γ of adapter `name` on `layer`, set to `U(-1, 1)` values drawn from `seed`.
fn randomize(layer: &LayerHandle, name: &str, seed: u64) {
    let mut r = rng(seed);
    for (_, var) in layer.trainable_vars(name) {
        var.set(&rand_tensor(&mut r, var.dims(), 1.0)).unwrap();
    }
}

/// Everything needed to recompute one layer's ΔW by hand.
struct Parts {
    lambda: Tensor,
    gamma: Tensor,
    a: Tensor,
    b: Tensor,
    delta: Tensor,
}

fn parts(layer: &LayerHandle, name: &str) -> Parts {
    layer
        .with_adapter(name, |a| {
            let vars: BTreeMap<String, Var> = a.trainable_vars().into_iter().collect();
            let saved: BTreeMap<String, Tensor> = a.tensors_to_save().into_iter().collect();
            Parts {
                lambda: vars["randlora_lambda"].as_tensor().clone(),
                gamma: vars["randlora_gamma"].as_tensor().clone(),
                a: saved["randlora_A"].clone(),
                b: saved["randlora_B"].clone(),
                delta: a.delta_weight().unwrap(),
            }
        })
        .unwrap_or_else(|| panic!("no adapter {name} on {}", layer.name()))
}

/// How the trainables are paired with the bases.
#[derive(Clone, Copy)]
enum Pairing {
    /// PEFT's: row `q = kk·n + b` of Ã with column `q = b·r + kk` of B̃.
    FlatPosition,
    /// The paper's `Σ_b B_b diag(Λ_b) A diag(Γ_b)`: the same (kk, b) on both sides.
    Matched,
}

/// ΔW `[out, in]` (flattened dims) in f64, from the index formulas of methods-b §2(c).
fn oracle_delta(p: &Parts, geometry: LayerGeometry, s: f64, pairing: Pairing) -> Vec<f64> {
    let (out, inp) = flat_dims(geometry);
    let (k, big) = (out.min(inp), out.max(inp));
    let (r, n) = p.lambda.dims2().unwrap();
    let ka = p.a.dim(2).unwrap();
    let (nb, rb) = (p.b.dim(1).unwrap(), p.b.dim(2).unwrap());
    assert_eq!(rb, r);
    let to64 = |t: &Tensor| -> Vec<f64> { flat(t).iter().map(|&v| f64::from(v)).collect() };
    let (lam, gam, a, b) = (to64(&p.lambda), to64(&p.gamma), to64(&p.a), to64(&p.b));
    let a_at = |kk: usize, j: usize| a[kk * ka + j];
    let b_at = |row: usize, basis: usize, kk: usize| b[(row * nb + basis) * r + kk];
    // S[row, j] over K × k.
    let mut s_mat = vec![0f64; big * k];
    for row in 0..big {
        for j in 0..k {
            let mut acc = 0.0;
            for q in 0..r * n {
                let (kk, basis) = (q / n, q % n);
                let a_tilde = lam[kk * n + basis] * a_at(kk, j) * gam[basis * k + j];
                let b_tilde = match pairing {
                    Pairing::FlatPosition => b_at(row, q / r, q % r),
                    Pairing::Matched => b_at(row, basis, kk),
                };
                acc += b_tilde * a_tilde;
            }
            s_mat[row * k + j] = acc;
        }
    }
    let mut delta = vec![0f64; out * inp];
    for o in 0..out {
        for i in 0..inp {
            let v = if inp <= out {
                s_mat[o * k + i]
            } else {
                s_mat[i * k + o]
            };
            delta[o * inp + i] = s * v;
        }
    }
    delta
}

/// `max |a − b| / max |b|`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    flat(t).iter().map(|&v| f64::from(v)).collect()
}

/// Numerical rank by Gaussian elimination with partial pivoting (f64).
fn rank_of(m: &[f64], rows: usize, cols: usize) -> usize {
    let mut a = m.to_vec();
    let scale = a.iter().fold(0f64, |acc, v| acc.max(v.abs()));
    let tol = 1e-9 * scale * rows.max(cols) as f64;
    let mut rank = 0;
    for col in 0..cols {
        if rank == rows {
            break;
        }
        let (piv, val) =
            (rank..rows)
                .map(|r| (r, a[r * cols + col].abs()))
                .fold(
                    (rank, -1.0),
                    |best, cur| if cur.1 > best.1 { cur } else { best },
                );
        if val <= tol {
            continue;
        }
        for c in 0..cols {
            a.swap(rank * cols + c, piv * cols + c);
        }
        for r in rank + 1..rows {
            let f = a[r * cols + col] / a[rank * cols + col];
            for c in col..cols {
                a[r * cols + c] -= f * a[rank * cols + c];
            }
        }
        rank += 1;
    }
    rank
}

// =============================================================================================
// The forward and ΔW against PEFT's index formula
// =============================================================================================

#[test]
fn delta_weight_follows_peft_flat_position_pairing() {
    // (in, out, r): in < out, square, in > out, and k not a multiple of r.
    for (case, (inp, out, r)) in [
        (12, 40, 8),
        (40, 40, 8),
        (40, 12, 8),
        (10, 7, 3),
        (7, 11, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let mut pm = single_linear(inp, out, 100 + case as u64);
        let alpha = 5.0;
        pm.add_adapter(ADAPTER, random_config(&["lin"], r, alpha))
            .unwrap();
        let layer = pm.layers()[0].clone();
        randomize(&layer, ADAPTER, 200 + case as u64);
        let p = parts(&layer, ADAPTER);
        let k = inp.min(out);
        assert_eq!(p.lambda.dims(), &[r, num_bases(k, r)]);
        assert_eq!(p.gamma.dims(), &[num_bases(k, r), k]);
        let geometry = layer.geometry();
        let s = alpha / r as f64;

        let expect = oracle_delta(&p, geometry, s, Pairing::FlatPosition);
        let got = to_f64(&p.delta);
        let err = rel_err(&got, &expect);
        assert!(
            err < 1e-5,
            "case {case} {inp}→{out} r={r}: ΔW rel err {err}"
        );

        // The paper's matched pairing is a different matrix whenever n > 1.
        if num_bases(k, r) > 1 {
            let matched = oracle_delta(&p, geometry, s, Pairing::Matched);
            let diff = rel_err(&matched, &expect);
            assert!(diff > 1e-2, "case {case}: matched pairing agrees ({diff})");
        }

        // y − base(x) = x ΔWᵀ (the forward is the activation-space form, not ΔW).
        let x = rand_tensor(&mut rng(300 + case as u64), &[3, 2, inp], 1.0);
        let y = pm.model().forward(&x).unwrap();
        pm.disable().unwrap();
        let y0 = pm.model().forward(&x).unwrap();
        pm.enable().unwrap();
        let xs = to_f64(&x);
        let mut want = vec![0f64; 6 * out];
        for t in 0..6 {
            for o in 0..out {
                want[t * out + o] = (0..inp)
                    .map(|i| xs[t * inp + i] * expect[o * inp + i])
                    .sum();
            }
        }
        let got = to_f64(&(y - y0).unwrap());
        let err = rel_err(&got, &want);
        assert!(
            err < 1e-4,
            "case {case}: y − base(x) vs x ΔWᵀ rel err {err}"
        );
    }
}

/// Ranks are taken in f64 (an f32 product of rank r carries rounding noise of full rank): the
/// RandLoRA ΔW from the index oracle, which the layer's ΔW is checked to equal first.
#[test]
fn update_is_full_rank() {
    for (inp, out) in [(12, 40), (40, 40), (40, 12)] {
        let mut pm = single_linear(inp, out, 7);
        pm.add_adapter(ADAPTER, random_config(&["lin"], 8, 16.0))
            .unwrap();
        let layer = pm.layers()[0].clone();
        randomize(&layer, ADAPTER, 8);
        let p = parts(&layer, ADAPTER);
        let exact = oracle_delta(&p, layer.geometry(), 2.0, Pairing::FlatPosition);
        assert!(rel_err(&to_f64(&p.delta), &exact) < 1e-5);
        let rank = rank_of(&exact, out, inp);
        assert_eq!(rank, inp.min(out), "RandLoRA {inp}→{out}: rank {rank}");

        // A LoRA of the same r on the same layer stays at rank r.
        let mut pm = single_linear(inp, out, 7);
        pm.add_adapter(ADAPTER, lora_random_b(&["lin"], 8, 16.0))
            .unwrap();
        let vars: BTreeMap<String, Var> =
            pm.layers()[0].trainable_vars(ADAPTER).into_iter().collect();
        let a = to_f64(vars["lora_A.weight"].as_tensor());
        let b = to_f64(vars["lora_B.weight"].as_tensor());
        let mut ba = vec![0f64; out * inp];
        for o in 0..out {
            for i in 0..inp {
                ba[o * inp + i] = (0..8).map(|j| b[o * 8 + j] * a[j * inp + i]).sum();
            }
        }
        assert_eq!(rank_of(&ba, out, inp), 8, "LoRA {inp}→{out}");
    }
}

// =============================================================================================
// Init, first step, gradients
// =============================================================================================

#[test]
fn init_is_the_identity_and_follows_peft() {
    let mut pm = tiny_model(1, 2);
    let (x, img) = (tiny_input(3), tiny_image(4));
    let y0 = pm.model().forward(&x).unwrap();
    let c0 = pm.model().conv_forward(&img).unwrap();
    pm.add_adapter(ADAPTER, RandLoraConfig::new(&["q", "v", "conv"], 2, 8.0))
        .unwrap();
    assert_eq!(bits(&pm.model().forward(&x).unwrap()), bits(&y0));
    assert_eq!(bits(&pm.model().conv_forward(&img).unwrap()), bits(&c0));

    // Bases sized from the largest (out, in): linear 6×6, conv flattened [4, 3·3·3 = 27].
    let shared = pm.shared_tensors(ADAPTER).unwrap();
    let a = &shared[SHARED_A_KEY];
    let b = &shared[SHARED_B_KEY];
    assert_eq!(a.dims(), &[2, 1, 6]);
    assert_eq!(b.dims(), &[27, 3, 2]);
    for t in [a, b] {
        let v = to_f64(t);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
        assert!((std - 1.0).abs() < 1e-5, "basis std {std}");
    }
    for layer in pm.layers() {
        if !layer.has_adapter(ADAPTER) {
            continue;
        }
        let p = parts(layer, ADAPTER);
        let (out, inp) = flat_dims(layer.geometry());
        let k = out.min(inp);
        assert!(flat(&p.lambda).iter().all(|&v| v == 0.0));
        assert!(
            flat(&p.gamma).iter().all(|&v| v == 1.0 / k as f32),
            "Γ = 1/k on {}",
            layer.name()
        );
        assert_eq!(bits(&p.a), bits(a), "per-layer A is the shared basis");
        assert_eq!(bits(&p.b), bits(b), "per-layer B is the shared basis");
    }
    // The bases depend on projection_prng_key only.
    let mut again = tiny_model(1, 99);
    again
        .add_adapter(ADAPTER, RandLoraConfig::new(&["q", "v", "conv"], 2, 8.0))
        .unwrap();
    assert_eq!(
        bits(&again.shared_tensors(ADAPTER).unwrap()[SHARED_A_KEY]),
        bits(a)
    );
    let mut other = tiny_model(1, 2);
    let mut c = RandLoraConfig::new(&["q", "v", "conv"], 2, 8.0);
    c.projection_prng_key = 5;
    other.add_adapter(ADAPTER, c).unwrap();
    assert_ne!(
        bits(&other.shared_tensors(ADAPTER).unwrap()[SHARED_A_KEY]),
        bits(a)
    );
}

#[test]
fn one_step_moves_only_lambda() {
    let mut pm = tiny_model(5, 6);
    pm.add_adapter(ADAPTER, RandLoraConfig::new(&["q", "v", "conv"], 2, 8.0))
        .unwrap();
    let vars = pm.trainable_vars();
    assert_eq!(vars.len(), 2 * 6, "q×3, v×2, conv; Λ and Γ each");
    let before: Vec<Vec<u32>> = vars.iter().map(|(_, v)| bits(v.as_tensor())).collect();
    let loss = pm.model().loss(&tiny_input(7), &tiny_image(8)).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &vars {
        let g = grad_of(&grads, var, name);
        if name.contains("randlora_gamma") {
            assert_eq!(max_abs(&g), 0.0, "{name}: Γ's gradient must be 0 at Λ = 0");
        } else {
            assert!(max_abs(&g) > 0.0, "{name}: Λ has no gradient");
        }
    }
    let mut sgd = candle_nn::SGD::new(vars.iter().map(|(_, v)| v.clone()).collect(), 0.1).unwrap();
    sgd.step(&grads).unwrap();
    for ((name, var), old) in vars.iter().zip(before) {
        let moved = bits(var.as_tensor()) != old;
        assert_eq!(
            moved,
            name.contains("randlora_lambda"),
            "{name} moved: {moved}"
        );
    }
}

/// Compares every trainable's gradient with central differences of a quadratic loss of
/// `forward(x)`; failures are collected.
fn fd_check<M>(
    what: &str,
    pm: &PeftModel<M>,
    forward: impl Fn(&Tensor) -> Tensor,
    x: &Tensor,
    failures: &mut Vec<String>,
) {
    let y = forward(x);
    let loss = QuadLoss::new(y.dims(), 11);
    let grads = loss.tensor(&y).backward().unwrap();
    for (name, var) in pm.trainable_vars() {
        let g = grad_of(&grads, &var, &name);
        let report = finite_differences(&var, &g, 1e-2, || loss.value(&forward(x)));
        println!("{what} {name}: {report:?}");
        if report.rel_norm > 1e-3 || report.worst_elem > 1e-3 || report.grad_norm < 1e-3 {
            failures.push(format!("{what} {name}: {report:?}"));
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let p = |stride, padding, dilation, groups| Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    };
    let mut failures = Vec::new();
    // Linear in < out and in > out.
    for (inp, out) in [(3, 7), (7, 3)] {
        let mut pm = single_linear(inp, out, 21);
        pm.add_adapter(ADAPTER, random_config(&["lin"], 2, 3.0))
            .unwrap();
        randomize(&pm.layers()[0], ADAPTER, 22);
        let x = rand_tensor(&mut rng(23), &[2, 3, inp], 1.0);
        let forward = |x: &Tensor| pm.model().forward(x).unwrap();
        fd_check(
            &format!("linear {inp}→{out}"),
            &pm,
            forward,
            &x,
            &mut failures,
        );
    }
    // Conv (our extension): in_flat ≤ out, in_flat > out with stride or dilation, grouped.
    for (in_ch, out_ch, params, hw) in [
        (1, 12, p(1, 1, 1, 1), (5, 4)),
        (2, 3, p(2, 1, 1, 1), (9, 7)),
        (2, 3, p(1, 2, 2, 1), (7, 7)),
        (4, 4, p(2, 1, 1, 2), (7, 6)),
    ] {
        let mut pm = single_conv(in_ch, out_ch, (3, 3), params, 31);
        pm.add_adapter(ADAPTER, random_config(&["conv"], 2, 3.0))
            .unwrap();
        randomize(&pm.layers()[0], ADAPTER, 32);
        let x = rand_tensor(&mut rng(33), &[2, in_ch, hw.0, hw.1], 1.0);
        let forward = |x: &Tensor| pm.model().forward(x).unwrap();
        let what = format!("conv {in_ch}→{out_ch} {params:?}");
        fd_check(&what, &pm, forward, &x, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// =============================================================================================
// Merge, save/load
// =============================================================================================

#[test]
fn merge_unmerge_round_trip() {
    let mut pm = tiny_model(41, 42);
    pm.add_adapter(ADAPTER, random_config(&["q", "v", "conv"], 2, 4.0))
        .unwrap();
    for (i, layer) in pm.layers().iter().enumerate() {
        if layer.has_adapter(ADAPTER) {
            randomize(layer, ADAPTER, 43 + i as u64);
        }
    }
    let (x, img) = (tiny_input(44), tiny_image(45));
    let weights: Vec<Tensor> = pm.layers().iter().map(|l| l.weight().unwrap()).collect();
    let y = pm.model().forward(&x).unwrap();
    let c = pm.model().conv_forward(&img).unwrap();
    pm.merge().unwrap();
    for (layer, w) in pm.layers().iter().zip(&weights) {
        if layer.has_adapter(ADAPTER) {
            let delta = parts(layer, ADAPTER).delta;
            assert!(max_abs(&delta) > 1e-2, "{}: ΔW ≈ 0", layer.name());
            let want = (w + delta).unwrap();
            assert!(max_abs_diff(&layer.weight().unwrap(), &want) < 1e-6);
        }
    }
    let ym = pm.model().forward(&x).unwrap();
    let cm = pm.model().conv_forward(&img).unwrap();
    assert!(max_abs_diff(&ym, &y) < 1e-5, "merged linear output");
    assert!(max_abs_diff(&cm, &c) < 1e-5, "merged conv output");
    pm.unmerge().unwrap();
    for (layer, w) in pm.layers().iter().zip(&weights) {
        assert!(
            max_abs_diff(&layer.weight().unwrap(), w) < 1e-6,
            "{}",
            layer.name()
        );
    }
    assert!(max_abs_diff(&pm.model().forward(&x).unwrap(), &y) < 1e-6);
}

fn load_file(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn write_file(path: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

#[test]
fn save_load_is_bit_identical_and_peft_shaped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = tiny_model(51, 52);
    pm.add_adapter(ADAPTER, random_config(&["q", "v", "conv"], 2, 4.0))
        .unwrap();
    for (i, layer) in pm.layers().iter().enumerate() {
        if layer.has_adapter(ADAPTER) {
            randomize(layer, ADAPTER, 53 + i as u64);
        }
    }
    let dir = tmp.path().join("a");
    pm.save_adapter(&dir, ADAPTER).unwrap();
    let (x, img) = (tiny_input(54), tiny_image(55));
    let y = pm.model().forward(&x).unwrap();
    let c = pm.model().conv_forward(&img).unwrap();

    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "RANDLORA");
    assert_eq!(config["r"], 2);
    assert_eq!(
        config["randlora_alpha"], 4,
        "written as an int, as PEFT does"
    );
    assert_eq!(config["save_projection"], true);
    assert_eq!(config["projection_prng_key"], 0);
    assert_eq!(config["bias"], "none");

    // PEFT's keys: model-level bases, and per layer Λ, Γ and duplicate bases.
    let file = load_file(&dir.join("adapter_model.safetensors"));
    let shared_a = &file[SHARED_A_KEY];
    let shared_b = &file[SHARED_B_KEY];
    let adapted = [
        "model.blocks.0.q",
        "model.blocks.0.v",
        "model.blocks.1.q",
        "model.blocks.1.v",
        "model.extra.0.q",
        "model.conv",
    ];
    let mut expected_keys = vec![SHARED_A_KEY.to_string(), SHARED_B_KEY.to_string()];
    for m in adapted {
        for t in [
            "randlora_lambda",
            "randlora_gamma",
            "randlora_A",
            "randlora_B",
        ] {
            expected_keys.push(format!("base_model.model.{m}.{t}"));
        }
        assert_eq!(
            bits(&file[&format!("base_model.model.{m}.randlora_A")]),
            bits(shared_a)
        );
        assert_eq!(
            bits(&file[&format!("base_model.model.{m}.randlora_B")]),
            bits(shared_b)
        );
    }
    let mut keys: Vec<String> = file.keys().cloned().collect();
    keys.sort();
    expected_keys.sort();
    assert_eq!(keys, expected_keys);

    let check_loaded = |dir: &Path, what: &str| {
        let mut fresh = tiny_model(51, 999);
        fresh.load_adapter(dir, ADAPTER).unwrap();
        assert_eq!(
            bits(&fresh.model().forward(&x).unwrap()),
            bits(&y),
            "{what}"
        );
        assert_eq!(
            bits(&fresh.model().conv_forward(&img).unwrap()),
            bits(&c),
            "{what}"
        );
        let mut a = pm.adapter_tensors(ADAPTER).unwrap();
        let mut b = fresh.adapter_tensors(ADAPTER).unwrap();
        a.sort_by(|p, q| p.0.cmp(&q.0));
        b.sort_by(|p, q| p.0.cmp(&q.0));
        assert_eq!(a.len(), b.len(), "{what}");
        for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
            assert_eq!(ka, kb, "{what}");
            assert_eq!(bits(ta), bits(tb), "{what}: {ka}");
        }
    };
    check_loaded(&dir, "round trip");

    // A file with only the model-level bases (PEFT loads it too, with a warning).
    let only_shared = tmp.path().join("only_shared");
    std::fs::create_dir_all(&only_shared).unwrap();
    std::fs::copy(
        dir.join("adapter_config.json"),
        only_shared.join("adapter_config.json"),
    )
    .unwrap();
    let stripped: HashMap<String, Tensor> = file
        .iter()
        .filter(|(k, _)| {
            !(k.starts_with("base_model.model.")
                && (k.ends_with(".randlora_A") || k.ends_with(".randlora_B")))
        })
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    write_file(&only_shared.join("adapter_model.safetensors"), &stripped);
    let mut fresh = tiny_model(51, 999);
    fresh.load_adapter(&only_shared, ADAPTER).unwrap();
    assert_eq!(bits(&fresh.model().forward(&x).unwrap()), bits(&y));

    // A file with only the per-layer duplicates.
    let only_layers = tmp.path().join("only_layers");
    std::fs::create_dir_all(&only_layers).unwrap();
    std::fs::copy(
        dir.join("adapter_config.json"),
        only_layers.join("adapter_config.json"),
    )
    .unwrap();
    let stripped: HashMap<String, Tensor> = file
        .iter()
        .filter(|(k, _)| k.starts_with("base_model.model."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    write_file(&only_layers.join("adapter_model.safetensors"), &stripped);
    let mut fresh = tiny_model(51, 999);
    fresh.load_adapter(&only_layers, ADAPTER).unwrap();
    assert_eq!(bits(&fresh.model().forward(&x).unwrap()), bits(&y));
    assert_eq!(bits(&fresh.model().conv_forward(&img).unwrap()), bits(&c));

    // No bases at all (a PEFT file saved with save_projection=false): a clear error.
    let no_bases = tmp.path().join("no_bases");
    std::fs::create_dir_all(&no_bases).unwrap();
    std::fs::copy(
        dir.join("adapter_config.json"),
        no_bases.join("adapter_config.json"),
    )
    .unwrap();
    let stripped: HashMap<String, Tensor> = file
        .iter()
        .filter(|(k, _)| k.contains("randlora_lambda") || k.contains("randlora_gamma"))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    write_file(&no_bases.join("adapter_model.safetensors"), &stripped);
    let err = tiny_model(51, 999)
        .load_adapter(&no_bases, ADAPTER)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("base_model.randlora_A") && msg.contains("save_projection"),
        "{msg}"
    );
}

// =============================================================================================
// Variants, several adapters, conv
// =============================================================================================

#[test]
fn sparse_and_very_sparse_bases() {
    // k_g = 48, K_g = 64, r = 4, n_g = 12.
    let layers = [LayerGeometry::Linear {
        in_features: 64,
        out_features: 48,
    }];
    for (sparse, very_sparse, p_nonzero) in [
        (true, false, 1.0 / 3.0),
        (false, true, 1.0 / 48f64.sqrt()),
        (true, true, 1.0 / 48f64.sqrt()),
    ] {
        let mut c = RandLoraConfig::new(&["lin"], 4, 8.0);
        c.sparse = sparse;
        c.very_sparse = very_sparse;
        let bases = c.make_bases(&layers, &Device::Cpu).unwrap();
        assert_eq!(bases[SHARED_A_KEY].dims(), &[4, 1, 48]);
        assert_eq!(bases[SHARED_B_KEY].dims(), &[64, 12, 4]);
        for key in [SHARED_A_KEY, SHARED_B_KEY] {
            let v = to_f64(&bases[key]);
            let nonzero: Vec<f64> = v.iter().copied().filter(|x| *x != 0.0).collect();
            let c = nonzero[0].abs();
            assert!(
                nonzero.iter().all(|x| (x.abs() - c).abs() < 1e-6),
                "{key}: not ternary"
            );
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let std =
                (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
            assert!((std - 1.0).abs() < 1e-5, "{key}: std {std}");
            if key == SHARED_B_KEY {
                // 3,072 entries: the share of ±1 is within a few standard errors of P(±1)·2.
                let share = nonzero.len() as f64 / v.len() as f64;
                let se = (p_nonzero * (1.0 - p_nonzero) / v.len() as f64).sqrt();
                assert!(
                    (share - p_nonzero).abs() < 5.0 * se,
                    "sparse={sparse} very_sparse={very_sparse}: share {share}, want {p_nonzero}"
                );
            }
        }
    }
}

#[test]
fn two_adapters_with_different_r() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = tiny_model(61, 62);
    pm.add_adapter("a", random_config(&["q", "v"], 2, 4.0))
        .unwrap();
    pm.add_adapter("b", random_config(&["q", "v"], 3, 4.0))
        .unwrap();
    assert_eq!(
        pm.shared_tensors("a").unwrap()[SHARED_A_KEY].dims(),
        &[2, 1, 6]
    );
    assert_eq!(
        pm.shared_tensors("b").unwrap()[SHARED_A_KEY].dims(),
        &[3, 1, 6]
    );
    assert_eq!(
        pm.shared_tensors("b").unwrap()[SHARED_B_KEY].dims(),
        &[6, 2, 3]
    );
    let x = tiny_input(63);
    pm.disable().unwrap();
    let y0 = pm.model().forward(&x).unwrap();
    pm.enable().unwrap();
    pm.set_adapter("a").unwrap();
    let ya = pm.model().forward(&x).unwrap();
    pm.set_adapter("b").unwrap();
    let yb = pm.model().forward(&x).unwrap();
    for y in [&ya, &yb] {
        assert!(max_abs_diff(y, &y0) > 1e-3, "an adapter changes nothing");
    }
    // Both active: each layer adds both deltas (checked on one layer's output).
    let layer = pm.layer("model.blocks.0.q").unwrap().clone();
    let h = rand_tensor(&mut rng(64), &[4, 6], 1.0);
    let lin = pm.model().blocks[0].q.clone();
    pm.set_active(&["a", "b"]).unwrap();
    let both = lin.forward(&h).unwrap();
    let w = layer.weight().unwrap();
    let want = (h
        .matmul(
            &(w + parts(&layer, "a").delta + parts(&layer, "b").delta)
                .unwrap()
                .t()
                .unwrap(),
        )
        .unwrap()
        .broadcast_add(&layer.bias().unwrap()))
    .unwrap();
    assert!(max_abs_diff(&both, &want) < 1e-5);

    // Each saves its own bases and loads back on its own.
    for (name, y) in [("a", &ya), ("b", &yb)] {
        let dir = tmp.path().join(name);
        pm.save_adapter(&dir, name).unwrap();
        let mut fresh = tiny_model(61, 0);
        fresh.load_adapter(&dir, name).unwrap();
        assert_eq!(bits(&fresh.model().forward(&x).unwrap()), bits(y), "{name}");
    }
}

#[test]
fn conv_extension_equals_dense_conv() {
    let p = |stride, padding, dilation, groups| Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    };
    // in_flat = in/g·9: 9 ≤ 12 (Ã first), 18 > 3 (B̃ᵀ first), grouped (dense path), depthwise.
    for (in_ch, out_ch, params) in [
        (1, 12, p(1, 0, 1, 1)),
        (1, 12, p(2, 1, 1, 1)),
        (2, 3, p(1, 2, 2, 1)),
        (2, 3, p(2, 1, 1, 1)),
        (4, 6, p(1, 1, 1, 2)),
        (4, 4, p(2, 1, 1, 4)),
    ] {
        let mut pm = single_conv(in_ch, out_ch, (3, 3), params, 71);
        pm.add_adapter(ADAPTER, random_config(&["conv"], 2, 3.0))
            .unwrap();
        let layer = pm.layers()[0].clone();
        randomize(&layer, ADAPTER, 72);
        let x = rand_tensor(&mut rng(73), &[2, in_ch, 9, 8], 1.0);
        let y = pm.model().forward(&x).unwrap();
        let p = parts(&layer, ADAPTER);
        assert_eq!(p.delta.dims(), layer.weight().unwrap().dims());
        let expect = oracle_delta(&p, layer.geometry(), 1.5, Pairing::FlatPosition);
        let err = rel_err(&to_f64(&p.delta), &expect);
        assert!(err < 1e-5, "{params:?}: conv ΔW rel err {err}");
        let w = (layer.weight().unwrap() + &p.delta).unwrap();
        let dense = x
            .conv2d(
                &w,
                params.padding,
                params.stride,
                params.dilation,
                params.groups,
            )
            .unwrap()
            .broadcast_add(&layer.bias().unwrap().reshape((1, out_ch, 1, 1)).unwrap())
            .unwrap();
        let d = max_abs_diff(&y, &dense);
        assert!(
            d < 1e-4 * max_abs(&dense).max(1.0),
            "{in_ch}→{out_ch} {params:?}: {d}"
        );
    }
}

// =============================================================================================
// Counts
// =============================================================================================

#[test]
fn trainable_counts_from_geometry() {
    let sq = |n| LayerGeometry::Linear {
        in_features: n,
        out_features: n,
    };
    // all-MiniLM-L6-v2 query, value: 6 layers × 2 × 384→384, r = 32.
    let minilm = vec![sq(384); 12];
    assert_eq!(randlora::trainable_parameters(32, &minilm).unwrap(), 59_904);
    // Llama-3.2-3B q_proj (3072→3072) and v_proj (3072→1024), 28 layers, r = 32.
    let mut llama = Vec::new();
    for _ in 0..28 {
        llama.push(sq(3072));
        llama.push(LayerGeometry::Linear {
            in_features: 3072,
            out_features: 1024,
        });
    }
    assert_eq!(
        randlora::trainable_parameters(32, &llama).unwrap(),
        9_289_728
    );
    assert!(randlora::trainable_parameters(0, &minilm).is_err());
}

#[test]
fn minilm_query_value_r32() {
    let (mut pm, _) = BertModel::from_dir(common::minilm_dir(), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[101u32, 7592, 2088, 2003, 1037, 102]], &Device::Cpu).unwrap();
    let y0 = pm.model().forward(&ids, None, None).unwrap();
    let config = RandLoraConfig::new(&["query", "value"], 32, 64.0);
    assert_eq!(config.scaling(), 2.0);
    pm.add_adapter(ADAPTER, config).unwrap();
    assert_eq!(pm.num_trainable_parameters(), 59_904);
    let shared = pm.shared_tensors(ADAPTER).unwrap();
    assert_eq!(shared[SHARED_A_KEY].dims(), &[32, 1, 384]);
    assert_eq!(shared[SHARED_B_KEY].dims(), &[384, 12, 32]);
    // U(−c, c) divided by its std: std 1 and |v| ≤ √3 (up to the sample std).
    for key in [SHARED_A_KEY, SHARED_B_KEY] {
        let v = to_f64(&shared[key]);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
        assert!((var.sqrt() - 1.0).abs() < 1e-5, "{key}: std {}", var.sqrt());
        let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!((1.70..1.76).contains(&max), "{key}: max |v| = {max}");
    }
    let layer = pm
        .layer("encoder.layer.0.attention.self.query")
        .unwrap()
        .clone();
    let p = parts(&layer, ADAPTER);
    assert_eq!(p.lambda.dims(), &[32, 12]);
    assert_eq!(p.gamma.dims(), &[12, 384]);
    assert_eq!(
        bits(&pm.model().forward(&ids, None, None).unwrap()),
        bits(&y0)
    );
}

// =============================================================================================
// Bad input
// =============================================================================================

#[test]
fn bad_input_is_refused_clearly() {
    let err = tiny_model(0, 0)
        .add_adapter(ADAPTER, RandLoraConfig::new(&["q"], 0, 8.0))
        .unwrap_err();
    assert!(err.to_string().contains("`r`"), "{err}");

    let mut c = RandLoraConfig::new(&["q"], 2, 8.0);
    c.randlora_dropout = 1.0;
    assert!(tiny_model(0, 0).add_adapter(ADAPTER, c).is_err());

    let json = serde_json::json!({"peft_type": "RANDLORA", "r": 4, "target_modules": ["q"], "bias": "all"});
    let err = candle_peft::AdapterConfig::from_json(&json).unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");

    // A saved Λ of the wrong shape, and bases too small for a layer.
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = tiny_model(81, 82);
    pm.add_adapter(ADAPTER, RandLoraConfig::new(&["q", "v"], 2, 4.0))
        .unwrap();
    let dir = tmp.path().join("a");
    pm.save_adapter(&dir, ADAPTER).unwrap();
    let file = load_file(&dir.join("adapter_model.safetensors"));
    let key = "base_model.model.model.blocks.0.q.randlora_lambda";
    let mut bad = file.clone();
    bad.insert(
        key.into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    write_file(&dir.join("adapter_model.safetensors"), &bad);
    let err = tiny_model(81, 0).load_adapter(&dir, ADAPTER).unwrap_err();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains(key), "{err}");

    let mut bad = file.clone();
    let small_b = Tensor::zeros((4, 3, 2), DType::F32, &Device::Cpu).unwrap();
    bad.insert(SHARED_B_KEY.into(), small_b);
    write_file(&dir.join("adapter_model.safetensors"), &bad);
    let err = tiny_model(81, 0).load_adapter(&dir, ADAPTER).unwrap_err();
    assert!(err.to_string().contains("randlora_B"), "{err}");

    // The CLI's options (refused before any model is loaded).
    let err = common::run_err(
        bin()
            .args([
                "train", "--model", "unused", "--task", "classify", "--data", "unused",
            ])
            .args([
                "--out",
                "unused",
                "--method",
                "randlora",
                "--targets",
                "q",
                "--opt",
                "use_rslora=true",
            ]),
    );
    assert!(err.contains("use_rslora"), "{err}");
}

// =============================================================================================
// CLI: train, inspect, merge
// =============================================================================================

/// ΔW of `module` rebuilt from an adapter directory's tensors, as the streaming merge builds it.
fn delta_from_dir(adapter: &Path, file_module: &str, geometry: LayerGeometry) -> Tensor {
    let config = candle_peft::io::peft_format::read_config(adapter).unwrap();
    let file = load_file(&adapter.join("adapter_model.safetensors"));
    let mut tensors = BTreeMap::new();
    for t in ["randlora_lambda", "randlora_gamma"] {
        let key = format!("base_model.model.{file_module}.{t}");
        tensors.insert(t.to_string(), file[&key].clone());
    }
    let shared: BTreeMap<String, Tensor> = [SHARED_A_KEY, SHARED_B_KEY]
        .iter()
        .map(|k| (k.to_string(), file[*k].clone()))
        .collect();
    let adapter = config
        .load_adapter(&candle_peft::config::LoadContext {
            module: file_module,
            geometry,
            tensors: &tensors,
            shared: &shared,
            base_weight: None,
            device: &Device::Cpu,
        })
        .unwrap();
    adapter.delta_weight().unwrap()
}

#[test]
fn cli_train_inspect_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 16);
    let out = tmp.path().join("run");
    let minilm = common::minilm_dir();
    common::run_ok(
        bin()
            .args(["train", "--model"])
            .arg(&minilm)
            .args(["--task", "classify", "--data"])
            .arg(&data)
            .args(["--method", "randlora", "--rank", "32", "--alpha", "64"])
            .args(["--steps", "2", "--batch", "8", "--lr", "1e-2", "--quiet"])
            .args(["--merge", "--out"])
            .arg(&out),
    );
    let adapter = out.join("adapter");
    let inspect = common::run_ok(bin().arg("inspect").arg(&adapter).arg("--json"));
    let report: Value =
        serde_json::from_str(String::from_utf8_lossy(&inspect.stdout).trim()).unwrap();
    assert_eq!(report["peft_type"], "RANDLORA");
    assert_eq!(report["r"], 32);
    assert_eq!(report["num_modules"], 12, "query, value ×6");
    // Λ, Γ (59,904) and the classifier (384·2 + 2); the bases are frozen.
    assert_eq!(report["trainable_params"], 59_904 + 770, "{report}");
    common::run_ok(bin().arg("inspect").arg(&adapter));

    // `train --merge`: the merged query weight is W + ΔW of the saved adapter.
    let (pm, _) = BertModel::from_dir(&minilm, &Device::Cpu).unwrap();
    let module = "encoder.layer.3.attention.self.query";
    let layer = pm.layer(module).unwrap().clone();
    let delta = delta_from_dir(&adapter, &format!("bert.{module}"), layer.geometry());
    assert!(max_abs(&delta) > 0.0, "two steps moved nothing");
    let merged = load_file(&out.join("merged/model.safetensors"));
    let want = (layer.weight().unwrap() + &delta).unwrap();
    assert!(max_abs_diff(&merged[&format!("bert.{module}.weight")], &want) < 1e-6);

    // `candle-peft merge` of a library-made adapter on the bare model.
    let mut pm = pm;
    pm.add_adapter(ADAPTER, random_config(&["query", "value"], 32, 64.0))
        .unwrap();
    randomize(&layer, ADAPTER, 91);
    let lib_adapter = tmp.path().join("lib_adapter");
    pm.save_adapter(&lib_adapter, ADAPTER).unwrap();
    let merged_dir = tmp.path().join("merged");
    common::run_ok(
        bin()
            .arg("merge")
            .arg("--base")
            .arg(&minilm)
            .arg("--adapter")
            .arg(&lib_adapter)
            .arg("--out")
            .arg(&merged_dir),
    );
    let merged = load_file(&merged_dir.join("model.safetensors"));
    let delta = parts(&layer, ADAPTER).delta;
    let want = (layer.weight().unwrap() + delta).unwrap();
    assert!(max_abs_diff(&merged[&format!("{module}.weight")], &want) < 1e-6);
}

/// `candle-peft merge` of conv adapters (our extension; plain and grouped) into a bare
/// safetensors file.
#[test]
fn cli_merge_conv() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |stride, padding, dilation, groups| Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    };
    for (case, params) in [p(2, 1, 1, 1), p(1, 1, 1, 2)].into_iter().enumerate() {
        let mut pm = single_conv(4, 6, (3, 3), params, 95);
        pm.add_adapter(ADAPTER, random_config(&["conv"], 3, 2.0))
            .unwrap();
        let layer = pm.layers()[0].clone();
        randomize(&layer, ADAPTER, 96);
        let base = tmp.path().join(format!("base{case}.safetensors"));
        let weights = HashMap::from([
            ("conv.weight".to_string(), layer.weight().unwrap()),
            ("conv.bias".to_string(), layer.bias().unwrap()),
        ]);
        candle_core::safetensors::save(&weights, &base).unwrap();
        let adapter = tmp.path().join(format!("adapter{case}"));
        pm.save_adapter(&adapter, ADAPTER).unwrap();
        let out = tmp.path().join(format!("merged{case}"));
        common::run_ok(
            bin()
                .arg("merge")
                .arg("--base")
                .arg(&base)
                .arg("--adapter")
                .arg(&adapter)
                .arg("--out")
                .arg(&out),
        );
        let merged = load_file(&out.join("model.safetensors"));
        let want = (layer.weight().unwrap() + parts(&layer, ADAPTER).delta).unwrap();
        assert!(
            max_abs_diff(&merged["conv.weight"], &want) < 1e-6,
            "{params:?}"
        );
    }
}
