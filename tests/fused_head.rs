//! The fused frozen-head cross-entropy (`candle_peft::ops::frozen_linear_cross_entropy`):
//! per-row losses and `dL/dx` against `cross_entropy_rows(frozen_matmul(..))` and against an f64 log-softmax built from
//! plain candle ops, a second backward through the same graph (the op recomputes its logits),
//! the dtype fallback, input errors, and `LlamaForCausalLM::token_losses` on tied and untied
//! heads, with and without a LoRA on the untied head.
mod common;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_peft::ops::cross_entropy_rows;
use candle_peft::ops::frozen_linear_cross_entropy;
use candle_peft::ops::frozen_matmul;
use candle_peft::{DEFAULT_ADAPTER, LoraConfig};
use common::llama as llama_support;
use common::tensors::random;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// Losses and `dL/dx` of `L = Σ_i c_i · loss(x)_i`.
fn losses_and_grad(x: &Tensor, c: &Tensor, loss: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let losses = loss(var.as_tensor());
    let total = (&losses * c.to_dtype(losses.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = total.backward().unwrap();
    (losses, grads.get(var.as_tensor()).unwrap().clone())
}

/// `−log softmax(x Wᵀ + b)[t]` per row in f64 with plain candle ops (matmul, log_softmax,
/// gather): an oracle sharing no code with either fused op.
fn oracle(x: &Tensor, w: &Tensor, b: Option<&Tensor>, targets: &[u32]) -> Tensor {
    let w = w.to_dtype(DType::F64).unwrap();
    let mut z = x.matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = b {
        z = z.broadcast_add(&b.to_dtype(DType::F64).unwrap()).unwrap();
    }
    let lp = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
    let t = Tensor::new(targets, &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    lp.gather(&t, 1).unwrap().squeeze(1).unwrap().neg().unwrap()
}

struct Case {
    x: Tensor,
    w: Tensor,
    b: Option<Tensor>,
    targets: Vec<u32>,
    /// Upstream weights: nonuniform, one negative and one zero.
    c: Tensor,
}

fn case(seed: u64, (n, h, v): (usize, usize, usize), bias: bool, scale: f32) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = random(&mut rng, &[n, h], scale);
    let w = random(&mut rng, &[v, h], 0.5);
    let b = bias.then(|| random(&mut rng, &[v], 2.0));
    let targets = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    let mut c: Vec<f32> = (0..n).map(|_| rng.random::<f32>() + 0.25).collect();
    c[0] = -0.7;
    c[n / 2] = 0.0;
    Case {
        x,
        w,
        b,
        targets,
        c: Tensor::from_vec(c, n, &Device::Cpu).unwrap(),
    }
}

fn check_against_composition(case: &Case) {
    let Case {
        x,
        w,
        b,
        targets,
        c,
    } = case;
    let (losses, gx) = losses_and_grad(x, c, |x| {
        frozen_linear_cross_entropy(x, w, b.as_ref(), targets).unwrap()
    });
    let (losses_ref, gx_ref) = losses_and_grad(x, c, |x| {
        cross_entropy_rows(&frozen_matmul(x, w, b.as_ref()).unwrap(), targets).unwrap()
    });
    let (losses_f64, gx_f64) = losses_and_grad(&x.to_dtype(DType::F64).unwrap(), c, |x| {
        oracle(x, w, b.as_ref(), targets)
    });
    assert_eq!(losses.dims(), [targets.len()]);
    assert_eq!(losses.dtype(), DType::F32);
    let scale = max_abs(&gx_f64);
    assert!(scale > 1e-2, "the oracle gradient is degenerate: {scale}");
    for (name, l, g) in [
        ("composition", &losses_ref, &gx_ref),
        ("f64 oracle", &losses_f64, &gx_f64),
    ] {
        let dl = max_abs_diff(&losses, l);
        let dg = max_abs_diff(&gx, g);
        assert!(dl < 2e-5 * max_abs(l).max(1.0), "losses vs {name}: {dl}");
        assert!(dg < 2e-5 * scale, "dL/dx vs {name}: {dg} (scale {scale})");
    }
    // Row n/2 has a zero upstream weight: its gradient row is exactly zero.
    let zero_row = gx.get(targets.len() / 2).unwrap();
    assert_eq!(max_abs(&zero_row), 0.0);
}

#[test]
fn matches_the_composition_without_bias() {
    check_against_composition(&case(1, (37, 24, 1000), false, 1.0));
}

#[test]
fn matches_the_composition_with_bias() {
    check_against_composition(&case(2, (37, 24, 1000), true, 1.0));
}

#[test]
fn matches_the_composition_with_large_logits() {
    // Logits spread over about ±100: most probabilities underflow, the max must be shifted out.
    check_against_composition(&case(3, (19, 16, 300), true, 25.0));
}

#[test]
fn matches_over_several_uneven_column_blocks() {
    // The op cuts the vocabulary into blocks of about 2^18 / N columns (at least 256, at most
    // 4096), split between the threads: 300 rows over 3001 columns give blocks of 873, 873,
    // 873 and 382; 9 rows over 5003 give 4096 and 907.
    check_against_composition(&case(4, (300, 16, 3001), true, 1.0));
    check_against_composition(&case(9, (9, 40, 5003), false, 1.0));
}

#[test]
fn zero_rows_give_no_losses() {
    let case = case(10, (4, 8, 30), false, 1.0);
    let x = case.x.narrow(0, 0, 0).unwrap();
    let losses = frozen_linear_cross_entropy(&x, &case.w, None, &[]).unwrap();
    assert_eq!(losses.dims(), [0]);
}

#[test]
fn non_contiguous_hidden_is_accepted() {
    let case = case(5, (11, 24, 200), true, 1.0);
    let xt = case.x.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!xt.is_contiguous());
    let a = frozen_linear_cross_entropy(&xt, &case.w, case.b.as_ref(), &case.targets).unwrap();
    let b = frozen_linear_cross_entropy(&case.x, &case.w, case.b.as_ref(), &case.targets).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);
}

#[test]
fn a_second_backward_recomputes_the_logits() {
    let Case {
        x,
        w,
        b,
        targets,
        c,
    } = case(6, (23, 16, 700), true, 1.0);
    let var = Var::from_tensor(&x).unwrap();
    let losses = frozen_linear_cross_entropy(var.as_tensor(), &w, b.as_ref(), &targets).unwrap();
    let total = (&losses * &c).unwrap().sum_all().unwrap();
    // The first backward consumes the kept logits; the second must rebuild them.
    let first = total.backward().unwrap();
    let second = total.backward().unwrap();
    let g1 = first.get(var.as_tensor()).unwrap();
    let g2 = second.get(var.as_tensor()).unwrap();
    assert!(max_abs(g1) > 1e-2);
    assert_eq!(max_abs_diff(g1, g2), 0.0);
    let (_, g_ref) = losses_and_grad(&x, &c, |x| {
        cross_entropy_rows(&frozen_matmul(x, &w, b.as_ref()).unwrap(), &targets).unwrap()
    });
    assert!(max_abs_diff(g2, &g_ref) < 2e-5 * max_abs(&g_ref));
}

#[test]
fn f64_falls_back_to_the_composition() {
    let Case {
        x,
        w,
        b,
        targets,
        c,
    } = case(7, (13, 8, 120), true, 1.0);
    let (x, w, b) = (
        x.to_dtype(DType::F64).unwrap(),
        w.to_dtype(DType::F64).unwrap(),
        b.map(|b| b.to_dtype(DType::F64).unwrap()),
    );
    let (losses, gx) = losses_and_grad(&x, &c, |x| {
        frozen_linear_cross_entropy(x, &w, b.as_ref(), &targets).unwrap()
    });
    let (losses_ref, gx_ref) = losses_and_grad(&x, &c, |x| {
        cross_entropy_rows(&frozen_matmul(x, &w, b.as_ref()).unwrap(), &targets).unwrap()
    });
    assert_eq!(losses.dtype(), DType::F64);
    assert_eq!(max_abs_diff(&losses, &losses_ref), 0.0);
    assert_eq!(max_abs_diff(&gx, &gx_ref), 0.0);
    let (losses_oracle, _) = losses_and_grad(&x, &c, |x| oracle(x, &w, b.as_ref(), &targets));
    assert!(max_abs_diff(&losses, &losses_oracle) < 1e-5);
}

#[test]
fn bad_inputs_are_named() {
    let Case { x, w, b, .. } = case(8, (6, 8, 50), true, 1.0);
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let mut targets = vec![3u32, 1, 4, 1, 5, 9];
    targets[4] = 50;
    let e = err(frozen_linear_cross_entropy(&x, &w, b.as_ref(), &targets));
    assert!(
        e.contains("target 50") && e.contains("row 4") && e.contains("50"),
        "{e}"
    );
    let e = err(frozen_linear_cross_entropy(&x, &w, b.as_ref(), &[1, 2, 3]));
    assert!(e.contains("3 targets") && e.contains("6 rows"), "{e}");
    let w_bad = w.narrow(1, 0, 7).unwrap();
    let e = err(frozen_linear_cross_entropy(&x, &w_bad, None, &[0; 6]));
    assert!(e.contains("[6, 8]") && e.contains("[50, 7]"), "{e}");
    let b_bad = b.as_ref().unwrap().narrow(0, 0, 49).unwrap();
    let e = err(frozen_linear_cross_entropy(&x, &w, Some(&b_bad), &[0; 6]));
    assert!(e.contains("[49]") && e.contains("[50, 8]"), "{e}");
    let e = err(frozen_linear_cross_entropy(
        &x.unsqueeze(0).unwrap(),
        &w,
        None,
        &[0; 6],
    ));
    assert!(e.contains("[1, 6, 8]"), "{e}");
}

/// `token_losses` against `cross_entropy_rows(logits)`, values and the gradient of every
/// trainable var, under nonuniform upstream weights; returns the names of the vars compared.
fn check_token_losses(
    model: &candle_peft::PeftModel<candle_peft::LlamaForCausalLM>,
) -> Vec<String> {
    let vocab = model.model().config().vocab_size;
    let ids = llama_support::ids(&llama_support::token_ids(2 * 9, vocab, 11))
        .reshape((2, 9))
        .unwrap();
    let hidden = model.model().forward_hidden(&ids, None).unwrap();
    let hidden = hidden.reshape((18, ())).unwrap();
    let targets = llama_support::token_ids(18, vocab, 12);
    let c = Tensor::from_vec(
        (0..18).map(|i| 0.1 + 0.05 * i as f32).collect::<Vec<_>>(),
        18,
        &Device::Cpu,
    )
    .unwrap();
    let fused = model.model().token_losses(&hidden, &targets).unwrap();
    let composed = cross_entropy_rows(&model.model().logits(&hidden).unwrap(), &targets).unwrap();
    assert!(max_abs_diff(&fused, &composed) < 1e-5);
    let g_fused = (&fused * &c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_comp = (&composed * &c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut compared = Vec::new();
    for (name, var) in model.trainable_vars() {
        let (a, b) = match (g_fused.get(var.as_tensor()), g_comp.get(var.as_tensor())) {
            (Some(a), Some(b)) => (a, b),
            (None, None) => continue, // an inactive adapter's var
            _ => panic!("{name}: a gradient on one side only"),
        };
        let scale = max_abs(b);
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(
            max_abs_diff(a, b) <= 1e-4 * scale,
            "{name}: {} (scale {scale})",
            max_abs_diff(a, b)
        );
        compared.push(name);
    }
    compared
}

fn lora(targets: &[&str]) -> LoraConfig {
    let mut config = LoraConfig::new(targets, 4, 8.0);
    config.init_lora_weights = candle_peft::adapters::lora::InitLoraWeights::Bool(false);
    config
}

#[test]
fn token_losses_match_the_logits_on_a_tied_head() {
    let (mut model, _) = llama_support::tiny(&llama_support::tiny_llama_json(true), 21);
    model.set_seed(1);
    model
        .add_adapter(DEFAULT_ADAPTER, lora(&["q_proj", "v_proj", "down_proj"]))
        .unwrap();
    model.train();
    assert!(model.model().lm_head().is_none());
    assert!(check_token_losses(&model).len() >= 6);
}

#[test]
fn token_losses_match_the_logits_on_an_untied_head_with_and_without_its_lora() {
    let (mut model, _) = llama_support::tiny(&llama_support::tiny_llama_json(false), 22);
    model.set_seed(2);
    model
        .add_adapter(DEFAULT_ADAPTER, lora(&["q_proj", "up_proj"]))
        .unwrap();
    model.train();
    assert!(model.model().lm_head().is_some());
    assert!(check_token_losses(&model).len() >= 4);
    // A LoRA on the head itself: token_losses must take the composition (the head's factors
    // get gradients, which check_token_losses compares).
    model
        .add_adapter("head", lora(&["lm_head", "q_proj"]))
        .unwrap();
    model.set_adapter("head").unwrap();
    let compared = check_token_losses(&model);
    assert!(
        compared.iter().any(|n| n.contains("lm_head")),
        "{compared:?}"
    );
}
