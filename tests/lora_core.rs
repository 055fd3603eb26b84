//! Integration tests of the core (layers, LoRA, PeftModel, PEFT format) on small synthetic models.
//! No downloaded model is needed: every weight is drawn from a seeded ChaCha RNG.

mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_peft::config::{ModuleSelector, OneOrMany};
use candle_peft::{Conv2dParams, LayerHandle, LoraConfig, PeftError, PeftModel};
use common::tiny::*;

const ADAPTER: &str = "default";

/// `(A, B, ΔW)` of adapter `name` on `layer`.
fn lora_parts(layer: &LayerHandle, name: &str) -> (Tensor, Tensor, Tensor) {
    layer
        .with_adapter(name, |a| {
            let vars: BTreeMap<String, Var> = a.trainable_vars().into_iter().collect();
            (
                vars["lora_A.weight"].as_tensor().clone(),
                vars["lora_B.weight"].as_tensor().clone(),
                a.delta_weight().unwrap(),
            )
        })
        .unwrap_or_else(|| panic!("no adapter {name} on {}", layer.name()))
}

/// `B·A` computed here (conv: `[out, r] · [r, in·kh·kw]`), without the scaling.
fn ba_product(a: &Tensor, b: &Tensor, weight_shape: &[usize]) -> Tensor {
    let r = a.dim(0).unwrap();
    let a2 = a.reshape((r, ())).unwrap();
    let b2 = b.reshape((b.dim(0).unwrap(), r)).unwrap();
    b2.matmul(&a2).unwrap().reshape(weight_shape).unwrap()
}

/// The scaling `s` of an adapter, read off `ΔW = s·B·A`.
fn scaling_of(layer: &LayerHandle, name: &str) -> f64 {
    let (a, b, delta) = lora_parts(layer, name);
    let ba = ba_product(&a, &b, delta.dims());
    let num: f64 = flat(&delta)
        .iter()
        .zip(flat(&ba))
        .map(|(d, p)| f64::from(*d) * f64::from(p))
        .sum();
    let den: f64 = flat(&ba).iter().map(|p| f64::from(*p).powi(2)).sum();
    let s = num / den;
    // ΔW must be exactly proportional to B·A.
    let resid = max_abs_diff(&delta, &(ba * s).unwrap());
    assert!(resid < 1e-6, "ΔW is not s·B·A on {}: {resid}", layer.name());
    s
}

fn adapted_layers<M>(pm: &PeftModel<M>, name: &str) -> Vec<String> {
    pm.layers()
        .iter()
        .filter(|l| l.adapter_names().iter().any(|n| n == name))
        .map(|l| l.name())
        .collect()
}

fn outputs(pm: &PeftModel<Tiny>) -> (Tensor, Tensor) {
    let m = pm.model();
    (
        m.forward(&tiny_input(100)).unwrap(),
        m.conv_forward(&tiny_image(101)).unwrap(),
    )
}

// =============================================================================================
// Gradients: analytic (backward) against central finite differences
// =============================================================================================

#[test]
fn linear_lora_gradients_match_finite_differences() {
    let pm = single_linear(5, 4, 1);
    let mut pm = pm;
    pm.add_adapter(ADAPTER, lora_random_b(&["lin"], 2, 3.0))
        .unwrap();
    // A 3-D input exercises the reshape path of the LoRA forward.
    let x = rand_tensor(&mut rng(2), &[2, 3, 5], 1.0);
    let loss = QuadLoss::new(&[2, 3, 4], 3);
    let vars = pm.trainable_vars();
    assert_eq!(vars.len(), 2);
    let y = pm.model().forward(&x).unwrap();
    let grads = loss.tensor(&y).backward().unwrap();
    for (name, var) in &vars {
        let g = grad_of(&grads, var, name);
        let report = finite_differences(var, &g, 1e-2, || {
            loss.value(&pm.model().forward(&x).unwrap())
        });
        println!("linear {name}: {report:?}");
        report.assert_within(1e-3, name);
    }
}

/// (kernel, params, input H×W)
type ConvCase = ((usize, usize), Conv2dParams, (usize, usize));

/// Conv cases: (kernel, params, input H×W). Stride 2 with padding 1 on odd and even sizes, where
/// the striding leaves a different remainder on the two axes (10×7, 9×8, 9×7 with a 3×2 kernel),
/// the same on both (8×8), rows never read at all (padding 0: 12×9 dilated, 9×10), stride 3 with
/// remainders 0 and 2 (10×9), and a grouped conv.
fn conv_cases() -> Vec<ConvCase> {
    let p = |stride, padding, dilation, groups| Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    };
    vec![
        ((3, 3), p(2, 1, 1, 1), (9, 7)),
        ((3, 3), p(2, 1, 1, 1), (10, 7)),
        ((3, 3), p(2, 1, 1, 1), (9, 8)),
        ((3, 3), p(2, 1, 1, 1), (8, 8)),
        ((3, 2), p(2, 1, 1, 1), (9, 7)),
        ((3, 3), p(1, 1, 1, 1), (6, 5)),
        ((3, 3), p(2, 0, 2, 1), (12, 9)),
        ((3, 3), p(2, 1, 1, 2), (9, 7)),
        ((3, 3), p(2, 0, 1, 1), (9, 10)),
        ((3, 3), p(3, 1, 1, 1), (10, 9)),
    ]
}

#[test]
fn conv_lora_gradients_match_finite_differences() {
    let mut failures = Vec::new();
    for (case, (kernel, params, (h, w))) in conv_cases().into_iter().enumerate() {
        let (in_ch, out_ch) = (4, 4);
        let mut pm = single_conv(in_ch, out_ch, kernel, params, 10 + case as u64);
        pm.add_adapter(ADAPTER, lora_random_b(&["conv"], 2, 3.0))
            .unwrap();
        let x = rand_tensor(&mut rng(20 + case as u64), &[2, in_ch, h, w], 1.0);
        let y = match pm.model().forward(&x) {
            Ok(y) => y,
            Err(e) => {
                failures.push(format!(
                    "case {case} {kernel:?} {params:?} {h}x{w}: forward: {e}"
                ));
                continue;
            }
        };
        let loss = QuadLoss::new(y.dims(), 30 + case as u64);
        let grads = match loss.tensor(&y).backward() {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!(
                    "case {case} {kernel:?} {params:?} {h}x{w}: backward: {e}"
                ));
                continue;
            }
        };
        for (name, var) in pm.trainable_vars() {
            let g = grad_of(&grads, &var, &name);
            let report = finite_differences(&var, &g, 1e-2, || {
                loss.value(&pm.model().forward(&x).unwrap())
            });
            println!("conv case {case} {h}x{w} {name}: {report:?}");
            if report.rel_norm > 1e-3 || report.worst_elem > 1e-3 || report.grad_norm < 1e-3 {
                failures.push(format!(
                    "case {case} {kernel:?} {params:?} {h}x{w} {name}: {report:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "conv LoRA gradients wrong:\n{}",
        failures.join("\n")
    );
}

/// A `modules_to_save` conv (a trainable copy through candle's conv2d) on an input whose two
/// axes leave different stride remainders.
#[test]
fn conv_modules_to_save_gradients() {
    let mut pm = tiny_model(61, 62);
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.modules_to_save = Some(vec!["conv".into()]);
    pm.add_adapter(ADAPTER, c).unwrap();
    let vars: HashMap<String, Var> = pm.trainable_vars().into_iter().collect();
    let copy_w = &vars["base_model.model.model.conv.modules_to_save.default.weight"];
    for (h, w) in [(9, 7), (10, 7), (9, 8)] {
        let img = Var::from_tensor(&rand_tensor(&mut rng(63), &[2, IN_CH, h, w], 1.0)).unwrap();
        let y = pm.model().conv_forward(img.as_tensor()).unwrap();
        let loss = QuadLoss::new(y.dims(), 64);
        let grads = loss.tensor(&y).backward().unwrap();
        for (var, what) in [(copy_w, "copy weight"), (&img, "input")] {
            let g = grad_of(&grads, var, what);
            let report = finite_differences(var, &g, 1e-2, || {
                loss.value(&pm.model().conv_forward(img.as_tensor()).unwrap())
            });
            println!("modules_to_save conv {h}x{w} {what}: {report:?}");
            report.assert_within(1e-3, &format!("{h}x{w} {what}"));
        }
    }
}

#[test]
fn input_gradient_through_frozen_linear() {
    let mut pm = single_linear(5, 4, 4);
    let x = Var::from_tensor(&rand_tensor(&mut rng(5), &[2, 3, 5], 1.0)).unwrap();
    let loss = QuadLoss::new(&[2, 3, 4], 6);
    // Base only (no adapter): the frozen matmul alone must give dL/dx.
    let check = |pm: &PeftModel<candle_peft::PeftLinear>, what: &str| {
        let y = pm.model().forward(x.as_tensor()).unwrap();
        let grads = loss.tensor(&y).backward().unwrap();
        let g = grad_of(&grads, &x, "x");
        let report = finite_differences(&x, &g, 1e-2, || {
            loss.value(&pm.model().forward(x.as_tensor()).unwrap())
        });
        println!("linear dL/dx {what}: {report:?}");
        report.assert_within(1e-3, what);
        g
    };
    let g_base = check(&pm, "base only");
    // Closed form for the base: dL/dy = c + y/2, dL/dx = dL/dy · W.
    let w = pm.layers()[0].weight().unwrap();
    let y = pm.model().forward(x.as_tensor()).unwrap();
    let dy = (&loss.c + (&y * 0.5).unwrap()).unwrap();
    let expect = dy.broadcast_matmul(&w).unwrap();
    assert!(max_abs_diff(&g_base, &expect) < 1e-5);

    pm.add_adapter(ADAPTER, lora_random_b(&["lin"], 2, 3.0))
        .unwrap();
    let g_adapted = check(&pm, "base + LoRA");
    assert!(
        max_abs_diff(&g_adapted, &g_base) > 1e-3,
        "LoRA changed nothing in dL/dx"
    );
    pm.disable().unwrap();
    check(&pm, "LoRA disabled");
}

#[test]
fn input_gradient_through_frozen_conv() {
    let mut failures = Vec::new();
    for (case, (kernel, params, (h, w))) in conv_cases().into_iter().enumerate() {
        let (in_ch, out_ch) = (4, 4);
        let mut pm = single_conv(in_ch, out_ch, kernel, params, 40 + case as u64);
        let x = Var::from_tensor(&rand_tensor(
            &mut rng(50 + case as u64),
            &[2, in_ch, h, w],
            1.0,
        ))
        .unwrap();
        let y0 = pm.model().forward(x.as_tensor()).unwrap();
        // The frozen op's output equals candle's conv2d.
        let layer = &pm.layers()[0];
        let plain = x
            .as_tensor()
            .conv2d(
                &layer.weight().unwrap(),
                params.padding,
                params.stride,
                params.dilation,
                params.groups,
            )
            .unwrap()
            .broadcast_add(&layer.bias().unwrap().reshape((1, out_ch, 1, 1)).unwrap())
            .unwrap();
        assert!(
            max_abs_diff(&y0, &plain) < 1e-5,
            "case {case}: frozen conv forward"
        );
        let loss = QuadLoss::new(y0.dims(), 60 + case as u64);
        for with_lora in [false, true] {
            if with_lora {
                pm.add_adapter(ADAPTER, lora_random_b(&["conv"], 2, 3.0))
                    .unwrap();
            }
            let what = format!(
                "case {case} {kernel:?} {params:?} {h}x{w} {}",
                if with_lora {
                    "base + LoRA"
                } else {
                    "base only"
                }
            );
            let y = pm.model().forward(x.as_tensor()).unwrap();
            let grads = match loss.tensor(&y).backward() {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{what}: backward: {e}"));
                    continue;
                }
            };
            let g = grad_of(&grads, &x, "x");
            let report = finite_differences(&x, &g, 1e-2, || {
                loss.value(&pm.model().forward(x.as_tensor()).unwrap())
            });
            println!("conv dL/dx {what}: {report:?}");
            if report.rel_norm > 1e-3 || report.worst_elem > 1e-3 || report.grad_norm < 1e-3 {
                failures.push(format!("{what}: {report:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "conv dL/dx wrong:\n{}",
        failures.join("\n")
    );
}

/// Through the whole tiny model (tanh, residuals, a norm scale), for an adapter deep in the
/// stack: gradients of block 0's LoRA must reach it through every later layer.
#[test]
fn deep_model_gradients_match_finite_differences() {
    let mut pm = tiny_model(7, 8);
    pm.add_adapter(ADAPTER, lora_random_b(&["q", "v", "conv", "head"], 2, 4.0))
        .unwrap();
    let x = tiny_input(9);
    let img = tiny_image(10);
    let loss = pm.model().loss(&x, &img).unwrap();
    let grads = loss.backward().unwrap();
    let vars = pm.trainable_vars();
    assert_eq!(vars.len(), 2 * 7, "q×3, v×2, conv, head; A and B each");
    for (name, var) in &vars {
        let g = grad_of(&grads, var, name);
        assert!(max_abs(&g) > 0.0, "{name}: zero gradient");
    }
    let value = || {
        f64::from(
            pm.model()
                .loss(&x, &img)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    for wanted in [
        "base_model.model.model.blocks.0.q.lora_A.default.weight",
        "base_model.model.model.blocks.0.q.lora_B.default.weight",
        "base_model.model.model.blocks.1.v.lora_A.default.weight",
        "base_model.model.model.conv.lora_A.default.weight",
    ] {
        let (_, var) = vars.iter().find(|(n, _)| n == wanted).unwrap();
        let g = grad_of(&grads, var, wanted);
        let report = finite_differences(var, &g, 1e-2, value);
        println!("deep {wanted}: {report:?}");
        report.assert_within(1e-3, wanted);
    }
}

// =============================================================================================
// The frozen op: no weight-sized gradient
// =============================================================================================

#[test]
fn backward_computes_no_base_weight_gradient() {
    let mut pm = tiny_model(11, 12);
    pm.add_adapter(
        ADAPTER,
        lora_random_b(&["q", "v", "xq", "conv", "head"], 2, 4.0),
    )
    .unwrap();
    let weight_sizes: Vec<usize> = pm
        .layers()
        .iter()
        .map(|l| l.weight().unwrap().elem_count())
        .collect();
    // Sizes that legitimately have gradients (adapter vars, inputs) must not collide with a
    // base weight's size, or the check below would mean nothing.
    let x = tiny_input(13);
    let img = tiny_image(14);
    let mut legit: Vec<usize> = pm
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .collect();
    legit.extend([x.elem_count(), img.elem_count()]);
    for s in &legit {
        assert!(!weight_sizes.contains(s), "test model sizes collide ({s})");
    }
    let grads = pm.model().loss(&x, &img).unwrap().backward().unwrap();
    let mut sizes: Vec<usize> = grads
        .get_ids()
        .map(|id| grads.get_id(*id).unwrap().elem_count())
        .collect();
    sizes.sort();
    println!("grad sizes: {sizes:?}; base weight sizes: {weight_sizes:?}");
    for s in &sizes {
        assert!(
            !weight_sizes.contains(s),
            "a gradient with a base weight's size ({s}) was computed"
        );
    }
    for (name, var) in pm.trainable_vars() {
        grad_of(&grads, &var, &name);
    }
    // Control: candle's own matmul on the same weight does store a weight-sized gradient, so the
    // check above can fail.
    let layer = pm.layer("model.blocks.0.q").unwrap();
    let a = Var::from_tensor(&rand_tensor(&mut rng(15), &[10, HIDDEN], 1.0)).unwrap();
    let y = a
        .as_tensor()
        .matmul(&layer.weight().unwrap().t().unwrap())
        .unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(
        grads
            .get_ids()
            .any(|id| grads.get_id(*id).unwrap().elem_count() == HIDDEN * HIDDEN),
        "control: candle's matmul no longer computes the weight gradient"
    );
}

// =============================================================================================
// Conv2d: adapted forward = merged conv = plain conv with W + ΔW
// =============================================================================================

#[test]
fn conv_adapter_output_equals_merged_conv() {
    let mut pm = tiny_model(16, 17);
    pm.add_adapter(ADAPTER, lora_random_b(&["conv"], 2, 5.0))
        .unwrap();
    let layer = pm.layer("model.conv").unwrap().clone();
    let img = tiny_image(18);
    let base = {
        pm.disable().unwrap();
        let y = pm.model().conv_forward(&img).unwrap();
        pm.enable().unwrap();
        y
    };
    let adapted = pm.model().conv_forward(&img).unwrap();
    assert_eq!(adapted.dims(), &[2, OUT_CH, 5, 4]);
    // ΔW computed here: ΔW[o,i,:,:] = s·Σ_k B[o,k]·A[k,i,:,:], s = α/r = 2.5.
    let (a, b, delta) = lora_parts(&layer, ADAPTER);
    assert_eq!(a.dims(), &[2, IN_CH, 3, 3]);
    assert_eq!(b.dims(), &[OUT_CH, 2, 1, 1]);
    let delta_here = (ba_product(&a, &b, &[OUT_CH, IN_CH, 3, 3]) * 2.5).unwrap();
    assert!(max_abs_diff(&delta, &delta_here) < 1e-6);
    let w = layer.weight().unwrap();
    let plain = img
        .conv2d(&(&w + &delta_here).unwrap(), 1, 2, 1, 1)
        .unwrap()
        .broadcast_add(&layer.bias().unwrap().reshape((1, OUT_CH, 1, 1)).unwrap())
        .unwrap();
    let d_plain = max_abs_diff(&adapted, &plain);
    assert!(
        max_abs_diff(&adapted, &base) > 1e-2,
        "adapter changed nothing"
    );
    pm.merge().unwrap();
    let merged = pm.model().conv_forward(&img).unwrap();
    let d_merged = max_abs_diff(&adapted, &merged);
    println!("conv: |adapted − plain(W+ΔW)| = {d_plain:e}, |adapted − merged| = {d_merged:e}");
    assert!(d_plain < 1e-5, "{d_plain}");
    assert!(d_merged < 1e-5, "{d_merged}");
    assert!(max_abs_diff(&layer.weight().unwrap(), &(&w + &delta_here).unwrap()) < 1e-6);
}

// =============================================================================================
// Identity at init, merge / unmerge
// =============================================================================================

#[test]
fn fresh_lora_leaves_outputs_bitwise_equal() {
    let mut pm = tiny_model(19, 20);
    let (y0, c0) = outputs(&pm);
    pm.add_adapter(
        ADAPTER,
        LoraConfig::new(&["q", "v", "xq", "conv", "head"], 3, 8.0),
    )
    .unwrap();
    assert_eq!(adapted_layers(&pm, ADAPTER).len(), 9);
    let (y1, c1) = outputs(&pm);
    assert_eq!(bits(&y0), bits(&y1), "linear path changed");
    assert_eq!(bits(&c0), bits(&c1), "conv path changed");
    // PEFT's init: B = 0, A ~ U(±1/√fan_in).
    for layer in pm.layers().iter().filter(|l| l.has_adapter(ADAPTER)) {
        let (a, b, _) = lora_parts(layer, ADAPTER);
        assert!(
            flat(&b).iter().all(|v| *v == 0.0),
            "{}: B ≠ 0",
            layer.name()
        );
        let fan_in: usize = a.dims()[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let m = max_abs(&a);
        assert!(
            m <= bound && m > 0.5 * bound,
            "{}: |A| max {m}, bound {bound}",
            layer.name()
        );
    }
    // Against plain candle ops for one linear layer.
    let l = pm.layer("model.blocks.0.q").unwrap();
    let x = tiny_input(21);
    let plain = x
        .broadcast_matmul(&l.weight().unwrap().t().unwrap())
        .unwrap()
        .broadcast_add(&l.bias().unwrap())
        .unwrap();
    let ours = pm.model().blocks[0].q.forward(&x).unwrap();
    assert!(max_abs_diff(&plain, &ours) < 1e-6);
}

#[test]
fn merge_unmerge_round_trip() {
    let mut pm = tiny_model(22, 23);
    pm.add_adapter(ADAPTER, lora_random_b(&["q", "v", "conv", "head"], 2, 4.0))
        .unwrap();
    let before: Vec<(String, Tensor)> = pm.layer_weights().unwrap();
    let (y_adapter, c_adapter) = outputs(&pm);
    pm.merge().unwrap();
    for l in pm.layers() {
        let expect: Vec<String> = if l.has_adapter(ADAPTER) {
            vec![ADAPTER.into()]
        } else {
            vec![]
        };
        assert_eq!(l.merged_adapters(), expect, "{}", l.name());
    }
    let changed = pm
        .layer_weights()
        .unwrap()
        .iter()
        .zip(&before)
        .filter(|((_, a), (_, b))| max_abs_diff(a, b) > 1e-4)
        .count();
    assert_eq!(
        changed, 7,
        "q×3, v×2, conv, head weights change; biases don't"
    );
    let (y_merged, c_merged) = outputs(&pm);
    let dy = max_abs_diff(&y_adapter, &y_merged);
    let dc = max_abs_diff(&c_adapter, &c_merged);
    println!("merged vs adapter: linear {dy:e}, conv {dc:e}");
    assert!(dy < 1e-5 && dc < 1e-5);

    match pm.merge() {
        Err(PeftError::AlreadyMerged { adapter, .. }) => assert_eq!(adapter, ADAPTER),
        other => panic!("merging twice: {other:?}"),
    }
    pm.unmerge().unwrap();
    let mut worst = 0f32;
    for ((k, w1), (_, w0)) in pm.layer_weights().unwrap().iter().zip(&before) {
        let rel = max_abs_diff(w1, w0) / max_abs(w0);
        worst = worst.max(rel);
        assert!(rel <= 1e-6, "{k}: unmerge left relative error {rel}");
    }
    println!("unmerge: worst relative weight error {worst:e}");
    match pm.unmerge() {
        Err(PeftError::NotMerged { .. }) => {}
        other => panic!("unmerging an unmerged model: {other:?}"),
    }
    let (y2, c2) = outputs(&pm);
    assert!(max_abs_diff(&y2, &y_adapter) < 1e-5 && max_abs_diff(&c2, &c_adapter) < 1e-5);
}

// =============================================================================================
// Several adapters
// =============================================================================================

#[test]
fn multiple_adapters_add_disable_enable_delete() {
    let mut pm = tiny_model(24, 25);
    let (y_base, c_base) = outputs(&pm);
    pm.add_adapter("a", lora_random_b(&["q", "conv"], 2, 4.0))
        .unwrap();
    pm.add_adapter("b", lora_random_b(&["q", "v", "conv"], 3, 3.0))
        .unwrap();
    assert_eq!(pm.adapter_names(), vec!["a", "b"]);
    // The first adapter is the active one; adding "b" does not activate it.
    assert_eq!(pm.active_adapters(), &["a".to_string()]);
    let (y_a, c_a) = outputs(&pm);
    pm.set_adapter("b").unwrap();
    let (y_b, c_b) = outputs(&pm);
    pm.set_active(&["a", "b"]).unwrap();
    let (y_ab, c_ab) = outputs(&pm);
    // Deltas add up. On the conv (a single layer) exactly; the linear path is nonlinear across
    // layers, so compare on one layer there.
    let sum_c = ((&c_a - &c_base).unwrap() + (&c_b - &c_base).unwrap()).unwrap();
    let d_c = max_abs_diff(&(&c_ab - &c_base).unwrap(), &sum_c);
    let x = tiny_input(26);
    let q_out = |pm: &mut PeftModel<Tiny>, names: &[&str]| {
        pm.set_active(names).unwrap();
        pm.model().blocks[0].q.forward(&x).unwrap()
    };
    let q_ab = q_out(&mut pm, &["a", "b"]);
    let q_a = q_out(&mut pm, &["a"]);
    let q_b = q_out(&mut pm, &["b"]);
    pm.disable().unwrap();
    let q_base = pm.model().blocks[0].q.forward(&x).unwrap();
    pm.enable().unwrap();
    let sum_q = ((&q_a - &q_base).unwrap() + (&q_b - &q_base).unwrap()).unwrap();
    let d_q = max_abs_diff(&(&q_ab - &q_base).unwrap(), &sum_q);
    println!("two adapters: |Δab − (Δa + Δb)| conv {d_c:e}, q {d_q:e}");
    assert!(d_c < 1e-5 && d_q < 1e-5);
    assert!(max_abs_diff(&y_a, &y_b) > 1e-2 && max_abs_diff(&y_ab, &y_a) > 1e-2);
    assert!(max_abs_diff(&c_a, &c_base) > 1e-2 && max_abs_diff(&c_b, &c_base) > 1e-2);

    // Trainable vars are those of the active adapters.
    pm.set_active(&["a", "b"]).unwrap();
    let names: Vec<String> = pm.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.iter().filter(|n| n.contains(".a.")).count(), 2 * 4);
    assert_eq!(names.iter().filter(|n| n.contains(".b.")).count(), 2 * 6);

    // Disable gives the base bit for bit; enable restores.
    pm.disable().unwrap();
    assert!(!pm.is_enabled());
    let (y_off, c_off) = outputs(&pm);
    assert_eq!(bits(&y_off), bits(&y_base));
    assert_eq!(bits(&c_off), bits(&c_base));
    pm.enable().unwrap();
    let (y_on, c_on) = outputs(&pm);
    assert_eq!(bits(&y_on), bits(&y_ab));
    assert_eq!(bits(&c_on), bits(&c_ab));

    // A duplicate name is refused and leaves the model as it was.
    match pm.add_adapter("a", lora_random_b(&["v"], 2, 4.0)) {
        Err(PeftError::DuplicateAdapter(n)) => assert!(n.contains('a')),
        other => panic!("duplicate adapter: {other:?}"),
    }
    assert_eq!(bits(&outputs(&pm).0), bits(&y_ab));

    // Delete "b": gone from every layer, the model computes "a" alone.
    pm.delete_adapter("b").unwrap();
    assert_eq!(pm.adapter_names(), vec!["a"]);
    assert_eq!(pm.active_adapters(), &["a".to_string()]);
    assert!(pm.layers().iter().all(|l| !l.has_adapter("b")));
    let (y_del, c_del) = outputs(&pm);
    assert_eq!(bits(&y_del), bits(&y_a));
    assert_eq!(bits(&c_del), bits(&c_a));
    assert!(matches!(
        pm.delete_adapter("b"),
        Err(PeftError::UnknownAdapter { .. })
    ));

    // A merged adapter cannot be deleted.
    pm.merge().unwrap();
    match pm.delete_adapter("a") {
        Err(PeftError::AlreadyMerged { adapter, module }) => {
            assert_eq!(adapter, "a");
            assert!(module.contains("q") || module.contains("conv"), "{module}");
        }
        other => panic!("deleting a merged adapter: {other:?}"),
    }
    // Disabling a merged model unmerges and gives the base back (to rounding).
    pm.disable().unwrap();
    let (y_dm, c_dm) = outputs(&pm);
    assert!(max_abs_diff(&y_dm, &y_base) < 1e-5 && max_abs_diff(&c_dm, &c_base) < 1e-5);
    assert!(pm.layers().iter().all(|l| l.merged_adapters().is_empty()));
    pm.enable().unwrap();
    pm.delete_adapter("a").unwrap();
    let (y_none, _) = outputs(&pm);
    assert!(max_abs_diff(&y_none, &y_base) < 1e-5);
}

// =============================================================================================
// Target selection
// =============================================================================================

#[test]
fn target_list_is_a_suffix_match() {
    let mut pm = tiny_model(27, 28);
    pm.add_adapter(ADAPTER, LoraConfig::new(&["q"], 2, 4.0))
        .unwrap();
    assert_eq!(
        adapted_layers(&pm, ADAPTER),
        vec!["model.blocks.0.q", "model.blocks.1.q", "model.extra.0.q"]
    );
    // A full path and a multi-segment suffix.
    let mut pm = tiny_model(27, 28);
    pm.add_adapter(
        ADAPTER,
        LoraConfig::new(&["model.blocks.1.xq", "0.v"], 2, 4.0),
    )
    .unwrap();
    assert_eq!(
        adapted_layers(&pm, ADAPTER),
        vec!["model.blocks.0.v", "model.blocks.1.xq"]
    );
    // A partial segment is not a suffix: `locks.0.q` must not match `blocks.0.q`.
    let mut pm = tiny_model(27, 28);
    let err = pm
        .add_adapter(ADAPTER, LoraConfig::new(&["locks.0.q"], 2, 4.0))
        .unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatch { .. }), "{err}");
}

#[test]
fn target_regex_is_a_full_match() {
    let regex = |p: &str| {
        let mut c = LoraConfig::new(&["unused"], 2, 4.0);
        c.targeting.target_modules = Some(ModuleSelector::Regex(p.into()));
        c
    };
    let mut pm = tiny_model(29, 30);
    pm.add_adapter(ADAPTER, regex(r"model\.blocks\.\d+\.(q|v)"))
        .unwrap();
    assert_eq!(
        adapted_layers(&pm, ADAPTER),
        vec![
            "model.blocks.0.q",
            "model.blocks.0.v",
            "model.blocks.1.q",
            "model.blocks.1.v"
        ]
    );
    // `.*q` matches `xq` too: a regex is not a suffix list.
    let mut pm = tiny_model(29, 30);
    pm.add_adapter(ADAPTER, regex(r".*blocks\.0\..*q")).unwrap();
    assert_eq!(
        adapted_layers(&pm, ADAPTER),
        vec!["model.blocks.0.q", "model.blocks.0.xq"]
    );
    // A regex that matches only part of a name matches nothing (re.fullmatch).
    let mut pm = tiny_model(29, 30);
    let err = pm
        .add_adapter(ADAPTER, regex(r"blocks\.\d+\.q"))
        .unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatch { .. }), "{err}");
    // Nor a prefix.
    let err = pm
        .add_adapter(ADAPTER, regex(r"model\.blocks"))
        .unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatch { .. }), "{err}");
    assert!(pm.adapter_names().is_empty());
}

#[test]
fn exclude_modules_wins_over_targets() {
    let mut pm = tiny_model(31, 32);
    let mut c = LoraConfig::new(&["q", "v"], 2, 4.0);
    c.targeting.exclude_modules = Some(ModuleSelector::list(&["model.blocks.0.v", "extra.0.q"]));
    pm.add_adapter(ADAPTER, c).unwrap();
    assert_eq!(
        adapted_layers(&pm, ADAPTER),
        vec!["model.blocks.0.q", "model.blocks.1.q", "model.blocks.1.v"]
    );
    let mut pm = tiny_model(31, 32);
    let mut c = LoraConfig::new(&["q", "v"], 2, 4.0);
    c.targeting.exclude_modules = Some(ModuleSelector::Regex(r".*\.1\..*".into()));
    pm.add_adapter(ADAPTER, c).unwrap();
    assert_eq!(
        adapted_layers(&pm, ADAPTER),
        vec!["model.blocks.0.q", "model.blocks.0.v", "model.extra.0.q"]
    );
}

#[test]
fn layers_to_transform_and_layers_pattern() {
    let cfg = |layers: OneOrMany<usize>, pattern: Option<&str>| {
        let mut c = LoraConfig::new(&["q", "v"], 2, 4.0);
        c.targeting.layers_to_transform = Some(layers);
        c.targeting.layers_pattern = pattern.map(|p| OneOrMany::One(p.to_string()));
        c
    };
    let adapted = |c: LoraConfig| {
        let mut pm = tiny_model(33, 34);
        pm.add_adapter(ADAPTER, c).unwrap();
        adapted_layers(&pm, ADAPTER)
    };
    assert_eq!(
        adapted(cfg(OneOrMany::One(1), None)),
        vec!["model.blocks.1.q", "model.blocks.1.v"]
    );
    // Without a pattern any `<segment>.<index>.` counts: `extra.0` is layer 0 too.
    assert_eq!(
        adapted(cfg(OneOrMany::Many(vec![0]), None)),
        vec!["model.blocks.0.q", "model.blocks.0.v", "model.extra.0.q"]
    );
    assert_eq!(
        adapted(cfg(OneOrMany::Many(vec![0]), Some("blocks"))),
        vec!["model.blocks.0.q", "model.blocks.0.v"]
    );
    assert_eq!(
        adapted(cfg(OneOrMany::Many(vec![0, 1]), Some("extra"))),
        vec!["model.extra.0.q"]
    );
    assert_eq!(
        adapted(cfg(OneOrMany::Many(vec![1, 0]), Some("blocks"))),
        vec![
            "model.blocks.0.q",
            "model.blocks.0.v",
            "model.blocks.1.q",
            "model.blocks.1.v"
        ]
    );
    // A layer index that does not exist selects nothing: the error names layers_to_transform.
    let mut pm = tiny_model(33, 34);
    let err = pm
        .add_adapter(ADAPTER, cfg(OneOrMany::One(5), None))
        .unwrap_err();
    match &err {
        PeftError::InvalidConfig { field, reason } => {
            assert_eq!(field, "layers_to_transform");
            assert!(reason.starts_with("no layer has index 5:"), "{reason}");
            assert!(reason.ends_with("are in layers 0, 1"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // The choice survives a save/load round trip through adapter_config.json.
    let dir = tempfile::tempdir().unwrap();
    let mut pm = tiny_model(33, 34);
    pm.add_adapter(ADAPTER, cfg(OneOrMany::Many(vec![0]), Some("blocks")))
        .unwrap();
    pm.save_adapter(dir.path(), ADAPTER).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["layers_to_transform"], serde_json::json!([0]));
    assert_eq!(json["layers_pattern"], serde_json::json!("blocks"));
    let mut fresh = tiny_model(33, 99);
    fresh.load_adapter(dir.path(), ADAPTER).unwrap();
    assert_eq!(
        adapted_layers(&fresh, ADAPTER),
        vec!["model.blocks.0.q", "model.blocks.0.v"]
    );
}

#[test]
fn modules_to_save_trainable_copy() {
    let mut pm = tiny_model(35, 36);
    let (y_base, _) = outputs(&pm);
    let head_w0 = pm.layer("head").unwrap().weight().unwrap();
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.modules_to_save = Some(vec!["head".into()]);
    pm.add_adapter(ADAPTER, c).unwrap();
    let names: Vec<String> = pm.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"base_model.model.head.modules_to_save.default.weight".to_string()));
    assert!(names.contains(&"base_model.model.head.modules_to_save.default.bias".to_string()));
    assert!(
        !pm.layer("head")
            .unwrap()
            .adapter_names()
            .contains(&ADAPTER.to_string())
    );
    // The copy starts equal to the base: outputs unchanged (to matmul rounding).
    let (y0, _) = outputs(&pm);
    assert!(max_abs_diff(&y0, &y_base) < 1e-6);
    // Gradient flows into the copy.
    let vars: HashMap<String, Var> = pm.trainable_vars().into_iter().collect();
    let copy_w = &vars["base_model.model.head.modules_to_save.default.weight"];
    let copy_b = &vars["base_model.model.head.modules_to_save.default.bias"];
    let x = tiny_input(37);
    let loss = QuadLoss::new(&[2, 5, OUT], 38);
    let grads = loss
        .tensor(&pm.model().forward(&x).unwrap())
        .backward()
        .unwrap();
    let g = grad_of(&grads, copy_w, "copy weight");
    assert_eq!(g.dims(), &[OUT, HIDDEN]);
    let report = finite_differences(copy_w, &g, 1e-2, || {
        loss.value(&pm.model().forward(&x).unwrap())
    });
    println!("modules_to_save weight: {report:?}");
    report.assert_within(1e-3, "modules_to_save weight");
    assert!(max_abs(&grad_of(&grads, copy_b, "copy bias")) > 0.0);

    // "Train" the copy; the base weight is untouched.
    let trained = (copy_w.as_tensor() + 0.5).unwrap();
    copy_w.set(&trained).unwrap();
    assert_eq!(
        bits(&pm.layer("head").unwrap().weight().unwrap()),
        bits(&head_w0)
    );
    let (y_trained, _) = outputs(&pm);
    assert!(max_abs_diff(&y_trained, &y_base) > 1e-2);
    // Disabling uses the original module.
    pm.disable().unwrap();
    assert_eq!(bits(&outputs(&pm).0), bits(&y_base));
    pm.enable().unwrap();

    // Saved under the module's own key.
    let dir = tempfile::tempdir().unwrap();
    pm.save_adapter(dir.path(), ADAPTER).unwrap();
    let saved =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut keys: Vec<&String> = saved.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "base_model.model.head.bias",
            "base_model.model.head.weight",
            "base_model.model.model.blocks.0.q.lora_A.weight",
            "base_model.model.model.blocks.0.q.lora_B.weight",
            "base_model.model.model.blocks.1.q.lora_A.weight",
            "base_model.model.model.blocks.1.q.lora_B.weight",
            "base_model.model.model.extra.0.q.lora_A.weight",
            "base_model.model.model.extra.0.q.lora_B.weight",
        ]
    );
    assert_eq!(bits(&saved["base_model.model.head.weight"]), bits(&trained));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["modules_to_save"], serde_json::json!(["head"]));

    // Reloaded into a fresh model: same outputs.
    let mut fresh = tiny_model(35, 77);
    fresh.load_adapter(dir.path(), ADAPTER).unwrap();
    assert_eq!(bits(&outputs(&fresh).0), bits(&y_trained));

    // merge_and_unload makes the trained copy the base weight.
    let tiny = pm.merge_and_unload().unwrap();
    assert_eq!(bits(&tiny.head.handle().weight().unwrap()), bits(&trained));
    let y_unloaded = tiny.forward(&tiny_input(100)).unwrap();
    assert!(max_abs_diff(&y_unloaded, &y_trained) < 1e-5);
    assert!(tiny.head.handle().adapter_names().is_empty());
}

// =============================================================================================
// Scaling, patterns, dropout
// =============================================================================================

#[test]
fn rslora_scales_by_alpha_over_sqrt_r() {
    for r in [1usize, 4, 6] {
        let alpha = 3.0;
        let mut plain = tiny_model(39, 40);
        plain
            .add_adapter(ADAPTER, lora_random_b(&["q", "conv"], r, alpha))
            .unwrap();
        let mut rs = tiny_model(39, 40);
        let mut c = lora_random_b(&["q", "conv"], r, alpha);
        c.use_rslora = true;
        rs.add_adapter(ADAPTER, c).unwrap();
        let x = tiny_input(41);
        let layer = "model.blocks.1.q";
        let s_plain = scaling_of(plain.layer(layer).unwrap(), ADAPTER);
        let s_rs = scaling_of(rs.layer(layer).unwrap(), ADAPTER);
        assert!((s_plain - alpha / r as f64).abs() < 1e-6, "α/r: {s_plain}");
        assert!(
            (s_rs - alpha / (r as f64).sqrt()).abs() < 1e-6,
            "α/√r: {s_rs}"
        );
        // Activation-space deltas: same A and B (same seed), ratio √r everywhere.
        let delta = |pm: &mut PeftModel<Tiny>| {
            let on = pm.model().blocks[1].q.forward(&x).unwrap();
            pm.disable().unwrap();
            let off = pm.model().blocks[1].q.forward(&x).unwrap();
            pm.enable().unwrap();
            (on - off).unwrap()
        };
        let d_plain = delta(&mut plain);
        let d_rs = delta(&mut rs);
        let expect = (&d_plain * (r as f64).sqrt()).unwrap();
        let err = max_abs_diff(&d_rs, &expect) / max_abs(&expect);
        println!("rsLoRA r={r}: relative error of Δ_rs vs √r·Δ = {err:e}");
        assert!(err < 1e-5);
        let s_conv = scaling_of(rs.layer("model.conv").unwrap(), ADAPTER);
        assert!((s_conv - alpha / (r as f64).sqrt()).abs() < 1e-6);
    }
}

#[test]
fn rank_pattern_and_alpha_pattern() {
    let mut c = lora_random_b(&["q", "xq", "v", "conv"], 2, 4.0);
    c.rank_pattern = candle_peft::config::PatternMap::from([
        ("blocks.0.q".to_string(), 4),
        ("q".to_string(), 3),
    ]);
    c.alpha_pattern = candle_peft::config::PatternMap::from([
        ("v".to_string(), 10.0),
        ("model.conv".to_string(), 1.0),
    ]);
    let mut pm = tiny_model(42, 43);
    pm.add_adapter(ADAPTER, c).unwrap();
    // (module, r, α)
    let expect = [
        ("model.blocks.0.q", 4, 4.0),
        ("model.blocks.0.v", 2, 10.0),
        ("model.blocks.0.xq", 2, 4.0), // `q` does not match `xq`: `^(.*\.)?(q)$`
        ("model.blocks.1.q", 3, 4.0),
        ("model.blocks.1.v", 2, 10.0),
        ("model.blocks.1.xq", 2, 4.0),
        ("model.extra.0.q", 3, 4.0),
        ("model.conv", 2, 1.0),
    ];
    let check = |pm: &PeftModel<Tiny>| {
        for (module, r, alpha) in expect {
            let layer = pm.layer(module).unwrap();
            let (a, b, _) = lora_parts(layer, ADAPTER);
            assert_eq!(a.dim(0).unwrap(), r, "{module}: rank of A");
            assert_eq!(b.dim(1).unwrap(), r, "{module}: rank of B");
            let s = scaling_of(layer, ADAPTER);
            assert!(
                (s - alpha / r as f64).abs() < 1e-6,
                "{module}: s = {s}, want {alpha}/{r}"
            );
        }
    };
    check(&pm);
    // Round trip: the patterns are written to the config and read back.
    let dir = tempfile::tempdir().unwrap();
    pm.save_adapter(dir.path(), ADAPTER).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        json["rank_pattern"],
        serde_json::json!({"blocks.0.q": 4, "q": 3})
    );
    assert_eq!(
        json["alpha_pattern"],
        serde_json::json!({"v": 10, "model.conv": 1})
    );
    let mut fresh = tiny_model(42, 44);
    fresh.load_adapter(dir.path(), ADAPTER).unwrap();
    check(&fresh);
    assert_eq!(bits(&outputs(&fresh).0), bits(&outputs(&pm).0));
}

#[test]
fn dropout_only_in_training_and_seeded() {
    let with_dropout = |p: f64| {
        let mut c = lora_random_b(&["q", "v", "conv"], 2, 4.0);
        c.lora_dropout = p;
        let mut pm = tiny_model(45, 46);
        pm.add_adapter(ADAPTER, c).unwrap();
        pm
    };
    let none = with_dropout(0.0);
    let half = with_dropout(0.5);
    assert!(!half.is_training());
    // Eval (the default): deterministic and equal to no dropout.
    let (y_none, c_none) = outputs(&none);
    let (y_eval, c_eval) = outputs(&half);
    let (y_eval2, _) = outputs(&half);
    assert_eq!(bits(&y_eval), bits(&y_none));
    assert_eq!(bits(&c_eval), bits(&c_none));
    assert_eq!(bits(&y_eval2), bits(&y_eval));
    // Train: the delta differs from eval, and from one step to the next.
    half.train();
    assert!(half.is_training());
    let (y_t1, c_t1) = outputs(&half);
    let (y_t2, _) = outputs(&half);
    assert!(
        max_abs_diff(&y_t1, &y_eval) > 1e-3,
        "dropout did nothing (linear)"
    );
    assert!(
        max_abs_diff(&c_t1, &c_eval) > 1e-3,
        "dropout did nothing (conv)"
    );
    assert!(max_abs_diff(&y_t1, &y_t2) > 1e-3, "the same mask twice");
    // Two fresh models with the same seed draw the same masks.
    let again = with_dropout(0.5);
    again.train();
    let (y_a1, c_a1) = outputs(&again);
    let (y_a2, _) = outputs(&again);
    assert_eq!(bits(&y_a1), bits(&y_t1));
    assert_eq!(bits(&c_a1), bits(&c_t1));
    assert_eq!(bits(&y_a2), bits(&y_t2));
    // Dropout touches only the adapter's input: with B = 0 the output is the base exactly.
    let mut c = LoraConfig::new(&["q", "v", "conv"], 2, 4.0);
    c.lora_dropout = 0.5;
    let mut zero_b = tiny_model(45, 46);
    let (y_base, c_base) = outputs(&zero_b);
    zero_b.add_adapter(ADAPTER, c).unwrap();
    zero_b.train();
    let (y_zb, c_zb) = outputs(&zero_b);
    assert_eq!(bits(&y_zb), bits(&y_base));
    assert_eq!(bits(&c_zb), bits(&c_base));
    // Back to eval: deterministic again.
    half.eval();
    assert_eq!(bits(&outputs(&half).0), bits(&y_eval));
    // On one layer, inverted dropout keeps E[Δ]: Δ_train = s·B·A·(m⊙x)/(1−p) with m ∈ {0, 1};
    // each input element is either dropped or doubled.
    let lin_c = {
        let mut c = lora_random_b(&["lin"], 2, 2.0);
        c.lora_dropout = 0.5;
        c
    };
    let mut one = single_linear(5, 4, 47);
    one.add_adapter(ADAPTER, lin_c).unwrap();
    let x = rand_tensor(&mut rng(48), &[1, 5], 1.0);
    let (a, b, _) = lora_parts(&one.layers()[0], ADAPTER);
    let base = {
        one.disable().unwrap();
        let y = one.model().forward(&x).unwrap();
        one.enable().unwrap();
        y
    };
    one.train();
    let delta = (one.model().forward(&x).unwrap() - &base).unwrap();
    // Find the mask among the 2^5 candidates.
    let found = (0u32..32).any(|m| {
        let mask: Vec<f32> = (0..5)
            .map(|i| if (m >> i) & 1 == 1 { 2.0 } else { 0.0 })
            .collect();
        let xm = (&x * Tensor::from_vec(mask, (1, 5), &Device::Cpu).unwrap()).unwrap();
        // s = α/r = 2/2 = 1.
        let d = xm
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap();
        max_abs_diff(&d, &delta) < 1e-5
    });
    assert!(
        found,
        "the train-mode delta is not s·B·A·(m⊙x)/(1−p) for any mask m"
    );
}

// =============================================================================================
// Determinism, names, counts
// =============================================================================================

#[test]
fn seeds_names_order_and_counts() {
    let lora_a = |seed: u64| {
        let mut pm = tiny_model(49, seed);
        pm.add_adapter(ADAPTER, LoraConfig::new(&["q", "v"], 2, 4.0))
            .unwrap();
        pm.trainable_vars()
            .into_iter()
            .filter(|(n, _)| n.contains("lora_A"))
            .map(|(_, v)| bits(v.as_tensor()))
            .collect::<Vec<_>>()
    };
    assert_eq!(lora_a(7), lora_a(7), "same seed, different A");
    assert_ne!(lora_a(7), lora_a(8), "different seeds, same A");
    // Different layers draw different values.
    let a = lora_a(7);
    assert_ne!(a[0], a[1]);

    let mut pm = tiny_model(49, 7);
    pm.add_adapter(ADAPTER, LoraConfig::new(&["q", "v", "conv"], 2, 4.0))
        .unwrap();
    let vars = pm.trainable_vars();
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let mut expect = Vec::new();
    for m in [
        "model.blocks.0.q",
        "model.blocks.0.v",
        "model.blocks.1.q",
        "model.blocks.1.v",
        "model.extra.0.q",
        "model.conv",
    ] {
        expect.push(format!("base_model.model.{m}.lora_A.default.weight"));
        expect.push(format!("base_model.model.{m}.lora_B.default.weight"));
    }
    assert_eq!(names, expect);
    // The vars are the adapters' own: setting one changes the output.
    let hand = 5 * (2 * HIDDEN + HIDDEN * 2) + (2 * IN_CH * 9 + OUT_CH * 2);
    assert_eq!(pm.num_trainable_parameters(), hand);
    assert_eq!(hand, 5 * 24 + 54 + 8);
    assert_eq!(pm.num_total_parameters(), tiny_base_params() + hand);
    assert_eq!(
        tiny_base_params(),
        2 * (3 * 36 + 2 * 6) + (36 + 6) + (108 + 4) + 6 + (18 + 3)
    );
    // A second adapter (inactive) counts in the total but is not trainable.
    pm.add_adapter("other", LoraConfig::new(&["head"], 1, 1.0))
        .unwrap();
    assert_eq!(pm.num_trainable_parameters(), hand);
    assert_eq!(
        pm.num_total_parameters(),
        tiny_base_params() + hand + (HIDDEN + OUT)
    );
    // Setting a var through trainable_vars changes the model.
    let (y0, _) = outputs(&pm);
    let (_, b) = &vars[1];
    b.set(&b.as_tensor().ones_like().unwrap()).unwrap();
    let (y1, _) = outputs(&pm);
    assert!(max_abs_diff(&y0, &y1) > 1e-3);
}

// =============================================================================================
// Save / load
// =============================================================================================

fn trained_tiny(seed: u64) -> PeftModel<Tiny> {
    let mut pm = tiny_model(50, seed);
    pm.add_adapter(ADAPTER, lora_random_b(&["q", "v", "conv"], 2, 16.0))
        .unwrap();
    pm
}

#[test]
fn save_load_round_trip() {
    let pm = trained_tiny(51);
    let (y, c) = outputs(&pm);
    let dir = tempfile::tempdir().unwrap();
    let d1 = dir.path().join("one");
    pm.save_adapter(&d1, ADAPTER).unwrap();

    // The safetensors file: PEFT keys, {"format": "pt"}, the adapter's values.
    let bytes = std::fs::read(d1.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().clone().unwrap(),
        HashMap::from([("format".to_string(), "pt".to_string())])
    );
    let mut keys = st.names();
    keys.sort();
    let mut expect = Vec::new();
    for m in [
        "model.blocks.0.q",
        "model.blocks.0.v",
        "model.blocks.1.q",
        "model.blocks.1.v",
        "model.conv",
        "model.extra.0.q",
    ] {
        expect.push(format!("base_model.model.{m}.lora_A.weight"));
        expect.push(format!("base_model.model.{m}.lora_B.weight"));
    }
    expect.sort();
    assert_eq!(keys, expect);
    let conv_a = st
        .tensor("base_model.model.model.conv.lora_A.weight")
        .unwrap();
    assert_eq!(conv_a.shape(), &[2, IN_CH, 3, 3]);
    assert_eq!(conv_a.dtype(), safetensors::Dtype::F32);
    let conv_b = st
        .tensor("base_model.model.model.conv.lora_B.weight")
        .unwrap();
    assert_eq!(conv_b.shape(), &[OUT_CH, 2, 1, 1]);
    let saved = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let (a, _, _) = lora_parts(pm.layer("model.blocks.1.v").unwrap(), ADAPTER);
    assert_eq!(
        bits(&saved["base_model.model.model.blocks.1.v.lora_A.weight"]),
        bits(&a)
    );

    // adapter_config.json: PEFT's fields.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d1.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], serde_json::json!(2));
    assert!(
        json["lora_alpha"].is_i64() || json["lora_alpha"].is_u64(),
        "{}",
        json["lora_alpha"]
    );
    assert_eq!(json["lora_alpha"].as_i64(), Some(16));
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q", "v", "conv"])
    );
    assert_eq!(json["use_rslora"], serde_json::json!(false));
    assert_eq!(json["init_lora_weights"], serde_json::json!(false));
    assert_eq!(json["bias"], "none");
    assert_eq!(json["inference_mode"], serde_json::json!(true));

    // Load into a fresh model with another seed: identical outputs.
    let mut fresh = tiny_model(50, 999);
    fresh.load_adapter(&d1, ADAPTER).unwrap();
    let (y2, c2) = outputs(&fresh);
    assert_eq!(bits(&y2), bits(&y));
    assert_eq!(bits(&c2), bits(&c));
    // Under another name too (the file carries no adapter name).
    let mut other = tiny_model(50, 998);
    other.load_adapter(&d1, "mine").unwrap();
    assert_eq!(other.active_adapters(), &["mine".to_string()]);
    assert_eq!(bits(&outputs(&other).0), bits(&y));
    // The loaded adapter is trainable: same names, gradients reach it.
    let names: Vec<String> = other.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"base_model.model.model.conv.lora_B.mine.weight".to_string()));

    // save → load → save is byte-identical.
    let d2 = dir.path().join("two");
    fresh.save_adapter(&d2, ADAPTER).unwrap();
    assert_eq!(
        std::fs::read(d2.join("adapter_model.safetensors")).unwrap(),
        bytes,
        "re-saved safetensors differ"
    );
    assert_eq!(
        std::fs::read(d2.join("adapter_config.json")).unwrap(),
        std::fs::read(d1.join("adapter_config.json")).unwrap(),
        "re-saved config differs"
    );
    // No temporary files left behind.
    let mut files: Vec<String> = std::fs::read_dir(&d1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec!["adapter_config.json", "adapter_model.safetensors"]
    );
}

#[test]
fn lora_alpha_written_as_int_or_float() {
    let mut pm = tiny_model(52, 53);
    pm.add_adapter(ADAPTER, LoraConfig::new(&["q"], 4, 2.5))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    pm.save_adapter(dir.path(), ADAPTER).unwrap();
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["lora_alpha"].as_f64(), Some(2.5));
    let mut fresh = tiny_model(52, 54);
    fresh.load_adapter(dir.path(), ADAPTER).unwrap();
    // B = 0 here, so read the scaling from the config.
    match fresh.adapter_config(ADAPTER).unwrap() {
        candle_peft::AdapterConfig::Lora(c) => {
            assert_eq!(c.lora_alpha, 2.5);
            assert_eq!(c.resolve("model.blocks.0.q").unwrap(), (4, 2.5, 0.625));
        }
        other => panic!("expected a LoRA config, got {other:?}"),
    }
}

#[test]
fn load_reads_in_memory_keys_with_adapter_name() {
    let mut pm = trained_tiny(55);
    let mut c = lora_random_b(&["q"], 2, 4.0);
    c.targeting.modules_to_save = Some(vec!["head".into()]);
    pm.add_adapter("second", c).unwrap();
    pm.set_active(&[ADAPTER, "second"]).unwrap();
    let vars: HashMap<String, Var> = pm.trainable_vars().into_iter().collect();
    let copy_w = &vars["base_model.model.head.modules_to_save.second.weight"];
    copy_w.set(&(copy_w.as_tensor() * 1.5).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in [ADAPTER, "second"] {
        let d = dir.path().join(name);
        pm.save_adapter(&d, name).unwrap();
        // Rewrite the file with PEFT's in-memory names: `.lora_A.<name>.weight`,
        // `.modules_to_save.<name>.weight`.
        let path = d.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let renamed: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| {
                let k = if let Some(head) = k.strip_suffix(".lora_A.weight") {
                    format!("{head}.lora_A.{name}.weight")
                } else if let Some(head) = k.strip_suffix(".lora_B.weight") {
                    format!("{head}.lora_B.{name}.weight")
                } else if let Some(head) = k.strip_prefix("base_model.model.head.") {
                    format!("base_model.model.head.modules_to_save.{name}.{head}")
                } else {
                    panic!("unexpected key {k}")
                };
                (k, t)
            })
            .collect();
        assert!(renamed.keys().all(|k| k.contains(&format!(".{name}."))));
        candle_core::safetensors::save(&renamed, &path).unwrap();
    }
    let mut fresh = tiny_model(50, 1234);
    fresh
        .load_adapter(dir.path().join(ADAPTER), ADAPTER)
        .unwrap();
    fresh
        .load_adapter(dir.path().join("second"), "second")
        .unwrap();
    for names in [vec![ADAPTER], vec!["second"], vec![ADAPTER, "second"]] {
        pm.set_active(&names).unwrap();
        fresh.set_active(&names).unwrap();
        let (y0, c0) = outputs(&pm);
        let (y1, c1) = outputs(&fresh);
        assert_eq!(bits(&y0), bits(&y1), "{names:?}");
        assert_eq!(bits(&c0), bits(&c1), "{names:?}");
    }
}

#[test]
fn merge_and_unload_and_unload() {
    let pm = trained_tiny(56);
    let (y, c) = outputs(&pm);
    let conv_w0 = pm.layer("model.conv").unwrap().weight().unwrap();
    let tiny = pm.merge_and_unload().unwrap();
    let y2 = tiny.forward(&tiny_input(100)).unwrap();
    let c2 = tiny.conv_forward(&tiny_image(101)).unwrap();
    assert!(max_abs_diff(&y, &y2) < 1e-5 && max_abs_diff(&c, &c2) < 1e-5);
    // The merged conv weight is W + ΔW.
    assert!(max_abs_diff(&tiny.conv.handle().weight().unwrap(), &conv_w0) > 1e-3);
    assert!(tiny.conv.handle().adapter_names().is_empty());

    let pm = trained_tiny(56);
    let (y_base, _) = outputs(&tiny_model(50, 0));
    let tiny = pm.unload().unwrap();
    assert_eq!(
        bits(&tiny.forward(&tiny_input(100)).unwrap()),
        bits(&y_base)
    );
}

#[test]
fn one_dtype_f32_everywhere() {
    // Adapter vars are f32 and on the base's device.
    let pm = trained_tiny(57);
    for (n, v) in pm.trainable_vars() {
        assert_eq!(v.dtype(), DType::F32, "{n}");
        assert!(v.device().is_cpu());
    }
}
