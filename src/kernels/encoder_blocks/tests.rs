//! The encoder blocks against the separate ops they replace, forward and backward (twice: the
//! second backward recomputes what the first consumed), with f32 and bf16 base weights.

use candle_core::{DType, Device, Var};

use super::*;
use crate::kernels::attention::attention_core_projected;
use crate::kernels::frozen::frozen_matmul_weight;
use crate::kernels::frozen_weight::FrozenWeight;
use crate::kernels::gelu::gelu_erf;
use crate::kernels::linear_lora::frozen_linear_lora_weight;
use crate::kernels::norm::norm;
use crate::kernels::test_values::{max_abs, max_diff, tensor, var};

/// Layers `(out, in)` with LoRA (rank 2) where `with_lora` says, biases where `bias` says.
fn layers<const N: usize>(
    shapes: [(usize, usize); N],
    with_lora: [bool; N],
    bias: bool,
    weight_dtype: DType,
) -> ([FusedLinearParts; N], Vec<Var>) {
    let mut vars = Vec::new();
    let parts = std::array::from_fn(|i| {
        let (out, inp) = shapes[i];
        let lora = with_lora[i].then(|| {
            let a = var(&[2, inp], 10 + i as u32);
            let b = var(&[out, 2], 20 + i as u32);
            let factors = (a.as_tensor().clone(), b.as_tensor().clone(), 0.5 + i as f64);
            vars.push(a);
            vars.push(b);
            factors
        });
        let weight = (tensor(&[out, inp], 30 + i as u32) * 0.3)
            .and_then(|w| w.to_dtype(weight_dtype))
            .unwrap();
        FusedLinearParts {
            weight: FrozenWeight::Dense(weight),
            bias: bias.then(|| tensor(&[out], 40 + i as u32)),
            lora,
        }
    });
    (parts, vars)
}

fn linear(x: &Tensor, p: &FusedLinearParts) -> Tensor {
    match &p.lora {
        Some((a, b, s)) => {
            frozen_linear_lora_weight(x, &p.weight, p.bias.as_ref(), a, b, *s).unwrap()
        }
        None => frozen_matmul_weight(x, &p.weight, p.bias.as_ref()).unwrap(),
    }
}

fn layer_norm(x: &Tensor, n: &LayerNormParts) -> Tensor {
    norm(x, &n.weight, Some(&n.bias), n.eps, NormKind::LayerNorm).unwrap()
}

fn norm_parts(hidden: usize) -> LayerNormParts {
    LayerNormParts {
        weight: (tensor(&[hidden], 2) + 1.0).unwrap(),
        bias: tensor(&[hidden], 4),
        eps: 1e-12,
    }
}

/// The mask BERT builds from padding (`[B, 1, 1, T]`, 0 or f32's minimum).
fn padding_mask(batch: usize, seq: usize, padded: &[(usize, usize)]) -> Tensor {
    let mut m = vec![0f32; batch * seq];
    for &(b, t) in padded {
        m[b * seq + t] = f32::MIN;
    }
    Tensor::from_vec(m, (batch, 1, 1, seq), &Device::Cpu).unwrap()
}

/// The output's and every gradient's largest deviation, relative to the composition's scale.
fn compare(fused: &Tensor, plain: &Tensor, x: &Var, vars: &[Var], tol: f32) {
    let scale = max_abs(plain).max(1.0);
    assert!(
        max_diff(fused, plain) <= tol * scale,
        "output: {} (scale {scale})",
        max_diff(fused, plain)
    );
    let weights = tensor(plain.dims(), 3);
    let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
    let fused_loss = loss(fused);
    let plain_grads = loss(plain).backward().unwrap();
    for pass in 0..2 {
        let fused_grads = fused_loss.backward().unwrap();
        let all = std::iter::once(x).chain(vars);
        for (i, v) in all.enumerate() {
            let f = fused_grads.get(v.as_tensor()).expect("fused gradient");
            let p = plain_grads.get(v.as_tensor()).expect("plain gradient");
            let scale = max_abs(p).max(1.0);
            assert!(
                max_diff(f, p) <= tol * scale,
                "pass {pass}, gradient {i}: {} (scale {scale})",
                max_diff(f, p)
            );
        }
    }
}

fn check_attention(
    (batch, seq): (usize, usize),
    with_lora: [bool; 4],
    mask: Option<Tensor>,
    weight_dtype: DType,
) {
    let (heads, hidden) = (3, 12);
    let (parts, vars) = layers([(hidden, hidden); 4], with_lora, true, weight_dtype);
    let norm = norm_parts(hidden);
    let x = var(&[batch, seq, hidden], 1);
    let fused = attention_block_forward(x.as_tensor(), &norm, parts.clone(), heads, mask.as_ref())
        .unwrap()
        .expect("CPU f32 operands take the fused block");
    let xt = x.as_tensor();
    let scale = 1.0 / ((hidden / heads) as f64).sqrt();
    let q = linear(xt, &parts[0]);
    let k = linear(xt, &parts[1]);
    let v = linear(xt, &parts[2]);
    let context = attention_core_projected(&q, &k, &v, mask.as_ref(), (heads, heads), scale);
    let pre = (linear(&context.unwrap(), &parts[3]) + xt).unwrap();
    compare(&fused, &layer_norm(&pre, &norm), &x, &vars, 1e-5);
}

fn check_feed_forward(rows: (usize, usize), with_lora: [bool; 2], weight_dtype: DType) {
    let (hidden, inter) = (8, 20);
    let shapes = [(inter, hidden), (hidden, inter)];
    let (parts, vars) = layers(shapes, with_lora, true, weight_dtype);
    let norm = norm_parts(hidden);
    let y = var(&[rows.0, rows.1, hidden], 1);
    let fused = feed_forward_block_forward(y.as_tensor(), &norm, parts.clone())
        .unwrap()
        .expect("CPU f32 operands take the fused block");
    let act = gelu_erf(&linear(y.as_tensor(), &parts[0])).unwrap();
    let pre = (linear(&act, &parts[1]) + y.as_tensor()).unwrap();
    compare(&fused, &layer_norm(&pre, &norm), &y, &vars, 1e-5);
}

#[test]
fn attention_block_matches_the_separate_ops() {
    check_attention((2, 7), [true, false, true, false], None, DType::F32);
    check_attention((1, 5), [true; 4], None, DType::F32);
    check_attention((2, 6), [false; 4], None, DType::F32);
}

#[test]
fn attention_block_matches_the_separate_ops_with_padding() {
    let mask = padding_mask(3, 9, &[(0, 7), (0, 8), (2, 1)]);
    check_attention((3, 9), [true, false, true, false], Some(mask), DType::F32);
}

#[test]
fn attention_block_reads_bf16_weights_as_the_separate_ops_do() {
    let mask = padding_mask(2, 6, &[(1, 5)]);
    check_attention((2, 6), [true, false, true, false], Some(mask), DType::BF16);
}

#[test]
fn feed_forward_block_matches_the_separate_ops() {
    check_feed_forward((2, 7), [true, true], DType::F32);
    check_feed_forward((3, 21), [false, false], DType::F32);
    check_feed_forward((1, 4), [false, true], DType::BF16);
}

#[test]
fn mismatched_operands_fall_back_or_name_the_mask() {
    let (parts, _) = layers([(12, 12); 4], [false; 4], false, DType::F32);
    let norm = norm_parts(12);
    let x = tensor(&[1, 3, 12], 1);
    // Five heads do not divide 12.
    let five = attention_block_forward(&x, &norm, parts.clone(), 5, None).unwrap();
    assert!(five.is_none());
    // A mask for four keys where the input has three.
    let mask = padding_mask(1, 4, &[]);
    let err = attention_block_forward(&x, &norm, parts, 3, Some(&mask)).unwrap_err();
    assert!(err.to_string().contains("mask"), "{err}");
    let (mut ff, _) = layers([(20, 8), (8, 20)], [false; 2], false, DType::F32);
    ff[1].weight = FrozenWeight::Dense(tensor(&[8, 19], 5));
    let y = tensor(&[1, 3, 8], 1);
    let mismatched = feed_forward_block_forward(&y, &norm_parts(8), ff).unwrap();
    assert!(mismatched.is_none());
}

#[test]
fn a_wrong_norm_size_is_an_error_naming_the_op() {
    let (parts, _) = layers([(20, 8), (8, 20)], [false; 2], false, DType::F32);
    let y = tensor(&[1, 3, 8], 1);
    let err = feed_forward_block_forward(&y, &norm_parts(9), parts).unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains(FEED_FORWARD_OP) && err.contains("norm weight"),
        "{err}"
    );
}

/// An input that tracks no gradient (the first layer's): the blocks skip `dL/dx` and still give
/// the factors' gradients of the separate ops.
#[test]
fn blocks_on_an_untracked_input_give_the_factor_gradients() {
    // Without LoRA in the attention block, the feed-forward block's input is untracked too.
    untracked_input_case([true, true, false, true]);
    untracked_input_case([false; 4]);
}

fn untracked_input_case(attention_lora: [bool; 4]) {
    let (heads, hidden, inter) = (3, 12, 20);
    let x = tensor(&[2, 6, hidden], 1);
    let mask = padding_mask(2, 6, &[(1, 5)]);
    let (attn, mut vars) = layers([(hidden, hidden); 4], attention_lora, true, DType::F32);
    let (ff, ff_vars) = layers(
        [(inter, hidden), (hidden, inter)],
        [true, false],
        true,
        DType::F32,
    );
    vars.extend(ff_vars);
    let (n1, n2) = (norm_parts(hidden), norm_parts(hidden));
    let y = attention_block_forward(&x, &n1, attn.clone(), heads, Some(&mask))
        .unwrap()
        .unwrap();
    let fused = feed_forward_block_forward(&y, &n2, ff.clone())
        .unwrap()
        .unwrap();
    let scale = 1.0 / ((hidden / heads) as f64).sqrt();
    let (q, k, v) = (
        linear(&x, &attn[0]),
        linear(&x, &attn[1]),
        linear(&x, &attn[2]),
    );
    let c = attention_core_projected(&q, &k, &v, Some(&mask), (heads, heads), scale).unwrap();
    let y_plain = layer_norm(&(linear(&c, &attn[3]) + &x).unwrap(), &n1);
    let act = gelu_erf(&linear(&y_plain, &ff[0])).unwrap();
    let plain = layer_norm(&(linear(&act, &ff[1]) + &y_plain).unwrap(), &n2);
    assert!(max_diff(&fused, &plain) <= 1e-5 * max_abs(&plain).max(1.0));
    let weights = tensor(plain.dims(), 3);
    let grads = |t: &Tensor| {
        (t * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (fused_grads, plain_grads) = (grads(&fused), grads(&plain));
    assert!(fused_grads.get(&x).is_none());
    for (i, v) in vars.iter().enumerate() {
        let f = fused_grads.get(v.as_tensor()).expect("fused gradient");
        let p = plain_grads.get(v.as_tensor()).expect("plain gradient");
        let scale = max_abs(p).max(1.0);
        assert!(
            max_diff(f, p) <= 1e-5 * scale,
            "factor {i}: {}",
            max_diff(f, p)
        );
    }
}
