//! The fused ops with a backward (`candle_peft::ops`) and the frozen matmul with bias, against
//! candle's differentiable compositions: same values, same input gradient.

mod common;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_peft::ops::frozen_linear_lora;
use candle_peft::ops::frozen_matmul;
use candle_peft::ops::{NormKind, cross_entropy_rows, masked_softmax, norm};
use common::grad::value_and_grad;
use common::tensors::{max_abs_diff, random};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn layer_norm_matches_layer_norm_slow() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = (random(&mut rng, &[3, 5, 24], 2.0) + 0.7).unwrap();
    let gamma = random(&mut rng, &[24], 1.0);
    let beta = random(&mut rng, &[24], 1.0);
    let c = random(&mut rng, &[3, 5, 24], 1.0);
    let (y, gx) = value_and_grad(&x, &c, |x| {
        norm(x, &gamma, Some(&beta), 1e-5, NormKind::LayerNorm).unwrap()
    });
    let (y_ref, gx_ref) = value_and_grad(&x, &c, |x| {
        candle_nn::ops::layer_norm_slow(x, &gamma, &beta, 1e-5).unwrap()
    });
    assert!(
        max_abs_diff(&y, &y_ref) < 1e-5,
        "value {}",
        max_abs_diff(&y, &y_ref)
    );
    assert!(
        max_abs_diff(&gx, &gx_ref) < 1e-5,
        "grad {}",
        max_abs_diff(&gx, &gx_ref)
    );
    assert!(
        gx.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-2
    );
}

#[test]
fn rms_norm_matches_rms_norm_slow() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = random(&mut rng, &[4, 7, 16], 3.0);
    let gamma = random(&mut rng, &[16], 1.0);
    let c = random(&mut rng, &[4, 7, 16], 1.0);
    let (y, gx) = value_and_grad(&x, &c, |x| {
        norm(x, &gamma, None, 1e-6, NormKind::RmsNorm).unwrap()
    });
    let (y_ref, gx_ref) = value_and_grad(&x, &c, |x| {
        candle_nn::ops::rms_norm_slow(x, &gamma, 1e-6).unwrap()
    });
    assert!(
        max_abs_diff(&y, &y_ref) < 1e-5,
        "value {}",
        max_abs_diff(&y, &y_ref)
    );
    assert!(
        max_abs_diff(&gx, &gx_ref) < 1e-5,
        "grad {}",
        max_abs_diff(&gx, &gx_ref)
    );
}

#[test]
fn norm_on_f16_and_strided_input() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random(&mut rng, &[6, 8], 2.0);
    let gamma = random(&mut rng, &[6], 1.0);
    let beta = random(&mut rng, &[6], 1.0);
    // A transposed (non-contiguous) input.
    let xt = x.t().unwrap();
    let y = norm(&xt, &gamma, Some(&beta), 1e-5, NormKind::LayerNorm).unwrap();
    let y_ref =
        candle_nn::ops::layer_norm_slow(&xt.contiguous().unwrap(), &gamma, &beta, 1e-5).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);
    let y16 = norm(
        &xt.to_dtype(DType::F16).unwrap(),
        &gamma,
        Some(&beta),
        1e-5,
        NormKind::LayerNorm,
    )
    .unwrap();
    assert_eq!(y16.dtype(), DType::F16);
    assert!(max_abs_diff(&y16.to_dtype(DType::F32).unwrap(), &y_ref) < 1e-2);
}

#[test]
fn masked_softmax_matches_softmax_of_masked_scores() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (b, h, t) = (2, 3, 5);
    let x = random(&mut rng, &[b, h, t, t], 4.0);
    let c = random(&mut rng, &[b, h, t, t], 1.0);
    // A padding mask [B, 1, 1, T] (last two keys of batch 1 masked) and a causal one [B, 1, T, T].
    let mut pad = vec![0f32; b * t];
    pad[t + 3] = f32::MIN;
    pad[t + 4] = f32::MIN;
    let pad = Tensor::from_vec(pad, (b, 1, 1, t), &Device::Cpu).unwrap();
    let causal: Vec<f32> = (0..b * t * t)
        .map(|i| if (i % t) > (i / t) % t { -1e9 } else { 0.0 })
        .collect();
    let causal = Tensor::from_vec(causal, (b, 1, t, t), &Device::Cpu).unwrap();
    for mask in [None, Some(&pad), Some(&causal)] {
        let (y, gx) = value_and_grad(&x, &c, |x| masked_softmax(x, mask).unwrap());
        let (y_ref, gx_ref) = value_and_grad(&x, &c, |x| {
            let s = match mask {
                Some(m) => x.broadcast_add(m).unwrap(),
                None => x.clone(),
            };
            candle_nn::ops::softmax(&s, D::Minus1).unwrap()
        });
        assert!(
            max_abs_diff(&y, &y_ref) < 1e-6,
            "value {}",
            max_abs_diff(&y, &y_ref)
        );
        assert!(
            max_abs_diff(&gx, &gx_ref) < 1e-6,
            "grad {}",
            max_abs_diff(&gx, &gx_ref)
        );
    }
    // Masked keys get zero probability.
    let y = masked_softmax(&x, Some(&pad)).unwrap();
    let masked = y.narrow(0, 1, 1).unwrap().narrow(3, 3, 2).unwrap();
    assert_eq!(
        masked
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn masked_softmax_rejects_a_mask_that_does_not_broadcast() {
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::zeros((2, 3, 1, 4), DType::F32, &Device::Cpu).unwrap();
    let err = masked_softmax(&x, Some(&bad)).unwrap_err().to_string();
    assert!(err.contains("does not broadcast"), "{err}");
}

#[test]
fn frozen_matmul_with_bias_matches_linear_and_gives_only_the_input_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = random(&mut rng, &[2, 3, 8], 1.0);
    let w = random(&mut rng, &[5, 8], 1.0);
    let bias = random(&mut rng, &[5], 1.0);
    let c = random(&mut rng, &[2, 3, 5], 1.0);
    let (y, gx) = value_and_grad(&x, &c, |x| frozen_matmul(x, &w, Some(&bias)).unwrap());
    let (y_ref, gx_ref) = value_and_grad(&x, &c, |x| {
        x.broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
    });
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);
    assert!(max_abs_diff(&gx, &gx_ref) < 1e-5);
    // The only gradient in the store is the input's: no weight-, bias- or output-sized entries.
    let var = Var::from_tensor(&x).unwrap();
    let loss = (frozen_matmul(var.as_tensor(), &w, Some(&bias)).unwrap() * &c)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let sizes: Vec<usize> = grads
        .get_ids()
        .map(|id| grads.get_id(*id).unwrap().elem_count())
        .filter(|&n| n != 1)
        .collect();
    assert!(
        !sizes.contains(&40) && !sizes.contains(&5),
        "gradient sizes {sizes:?}"
    );
}

/// The fused frozen-linear + LoRA op against the same expression in candle's differentiable
/// ops: value, and the gradients of x, A and B (none for W and b).
fn check_frozen_linear_lora(lead: &[usize], with_bias: bool) {
    let (d_in, d_out, r, s) = (24, 17, 4, 0.75);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut x_shape = lead.to_vec();
    x_shape.push(d_in);
    let mut y_shape = lead.to_vec();
    y_shape.push(d_out);
    let x = random(&mut rng, &x_shape, 1.0);
    let w = random(&mut rng, &[d_out, d_in], 1.0);
    let bias = with_bias.then(|| random(&mut rng, &[d_out], 1.0));
    let a = Var::from_tensor(&random(&mut rng, &[r, d_in], 1.0)).unwrap();
    let b = Var::from_tensor(&random(&mut rng, &[d_out, r], 1.0)).unwrap();
    let c = random(&mut rng, &y_shape, 1.0);
    let run = |fused: bool| {
        let xv = Var::from_tensor(&x).unwrap();
        let y = if fused {
            frozen_linear_lora(
                xv.as_tensor(),
                &w,
                bias.as_ref(),
                a.as_tensor(),
                b.as_tensor(),
                s,
            )
            .unwrap()
        } else {
            let base = xv.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
            let base = match &bias {
                Some(bias) => base.broadcast_add(bias).unwrap(),
                None => base,
            };
            let delta = xv
                .as_tensor()
                .broadcast_matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_matmul(&b.as_tensor().t().unwrap())
                .unwrap();
            (base + (delta * s).unwrap()).unwrap()
        };
        let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g = |t: &Tensor| grads.get(t).unwrap().clone();
        (y, g(xv.as_tensor()), g(a.as_tensor()), g(b.as_tensor()))
    };
    let (y, gx, ga, gb) = run(true);
    let (y_ref, gx_ref, ga_ref, gb_ref) = run(false);
    assert_eq!(y.dims(), y_ref.dims());
    for (what, got, want) in [
        ("y", &y, &y_ref),
        ("dL/dx", &gx, &gx_ref),
        ("dL/dA", &ga, &ga_ref),
        ("dL/dB", &gb, &gb_ref),
    ] {
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = max_abs_diff(got, want);
        assert!(
            err <= 1e-5 * scale.max(1.0),
            "{what}: max |diff| {err} (scale {scale})"
        );
    }
}

#[test]
fn frozen_linear_lora_matches_the_separate_ops_in_value_and_gradients() {
    check_frozen_linear_lora(&[2, 5], true);
    check_frozen_linear_lora(&[7], false);
}

#[test]
fn frozen_linear_lora_names_the_operand_that_does_not_fit() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((5, 8), DType::F32, &dev).unwrap();
    let a = Tensor::zeros((2, 7), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((5, 2), DType::F32, &dev).unwrap();
    let err = frozen_linear_lora(&x, &w, None, &a, &b, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("A [2, 7]") && err.contains("W [5, 8]"),
        "{err}"
    );
    let x64 = Tensor::zeros((3, 8), DType::F64, &dev).unwrap();
    let a = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let err = frozen_linear_lora(&x64, &w, None, &a, &b, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the input must be f32"), "{err}");
}

#[test]
fn gelu_erf_matches_candle_value_and_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x = random(&mut rng, &[4, 33], 6.0);
    let c = random(&mut rng, &[4, 33], 1.0);
    let (y, gx) = value_and_grad(&x, &c, |x| candle_peft::ops::gelu_erf(x).unwrap());
    let (y_ref, gx_ref) = value_and_grad(&x, &c, |x| x.gelu_erf().unwrap());
    assert!(
        max_abs_diff(&y, &y_ref) < 2e-6,
        "value {}",
        max_abs_diff(&y, &y_ref)
    );
    assert!(
        max_abs_diff(&gx, &gx_ref) < 2e-6,
        "grad {}",
        max_abs_diff(&gx, &gx_ref)
    );
    let x16 = x.to_dtype(DType::F16).unwrap();
    let y16 = candle_peft::ops::gelu_erf(&x16).unwrap();
    assert_eq!(y16.dtype(), DType::F16);
    assert!(max_abs_diff(&y16.to_dtype(DType::F32).unwrap(), &y_ref) < 1e-2);
}

#[test]
fn cross_entropy_rows_matches_candle_cross_entropy_and_its_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (n, v) = (9, 301);
    // Large logits check the max-shift; a non-contiguous view checks the layout handling.
    let x = random(&mut rng, &[v, n], 30.0).t().unwrap();
    let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let weights = random(&mut rng, &[n], 1.0);
    let weighted = |rows: &Tensor| (rows * &weights).unwrap().sum_all().unwrap();

    let ours_var = Var::from_tensor(&x).unwrap();
    let rows = cross_entropy_rows(ours_var.as_tensor(), &targets).unwrap();
    let ours_grad = weighted(&rows).backward().unwrap();
    let ours_grad = ours_grad.get(ours_var.as_tensor()).unwrap();

    let ref_var = Var::from_tensor(&x).unwrap();
    let log_probs = candle_nn::ops::log_softmax(ref_var.as_tensor(), D::Minus1).unwrap();
    let ref_rows = log_probs
        .gather(&t.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .neg()
        .unwrap();
    let ref_grad = weighted(&ref_rows).backward().unwrap();
    let ref_grad = ref_grad.get(ref_var.as_tensor()).unwrap();

    assert!(max_abs_diff(&rows, &ref_rows) < 1e-4);
    assert!(max_abs_diff(ours_grad, ref_grad) < 1e-5);
    let mean = rows.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let candle_mean = candle_nn::loss::cross_entropy(&x, &t)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((mean - candle_mean).abs() < 1e-4, "{mean} vs {candle_mean}");
}

#[test]
fn cross_entropy_rows_rejects_out_of_range_targets() {
    let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let e = cross_entropy_rows(&x, &[1, 5]).unwrap_err().to_string();
    assert!(e.contains("target 5 is out of range for 5 classes"), "{e}");
    let e = cross_entropy_rows(&x, &[1]).unwrap_err().to_string();
    assert!(e.contains("1 targets for 2 rows"), "{e}");
}
