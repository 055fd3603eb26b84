//! Small synthetic models for the core tests: every layer comes from `PeftBuilder` over a
//! `VarBuilder::from_tensors` map of seeded random weights, so no downloaded model is needed.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::{Conv2dParams, LoraConfig, PeftBuilder, PeftConv2d, PeftLinear, PeftModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use super::tensors::{bits, flat, max_abs, max_abs_diff};

pub const HIDDEN: usize = 6;
pub const OUT: usize = 3;
pub const IN_CH: usize = 3;
pub const OUT_CH: usize = 4;

/// The stride-2, padding-1 convolution of the tiny model.
pub const CONV_PARAMS: Conv2dParams = Conv2dParams {
    stride: 2,
    padding: 1,
    dilation: 1,
    groups: 1,
};

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `U(-scale, scale)` values of `shape`, f32 on the CPU.
pub fn rand_tensor(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| scale * (2.0 * rng.random::<f32>() - 1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A LoRA config with random B (`init_lora_weights = false`) so that the adapter is not the
/// identity.
pub fn lora_random_b(targets: &[&str], r: usize, alpha: f64) -> LoraConfig {
    let mut c = LoraConfig::new(targets, r, alpha);
    c.init_lora_weights = InitLoraWeights::Bool(false);
    c
}

// ---------------------------------------------------------------------------------------------
// The tiny model
// ---------------------------------------------------------------------------------------------

/// One block: three linears `q`, `v`, `xq` (`xq` must never match the suffix `q`).
pub struct Block {
    pub q: PeftLinear,
    pub v: PeftLinear,
    pub xq: PeftLinear,
}

/// Layers, in build order:
/// `model.blocks.0.{q,v,xq}`, `model.blocks.1.{q,v,xq}`, `model.extra.0.q`, `model.conv`, `head`,
/// plus the non-adaptable `model.norm.weight`.
pub struct Tiny {
    pub blocks: Vec<Block>,
    pub extra_q: PeftLinear,
    pub conv: PeftConv2d,
    pub norm: Tensor,
    pub head: PeftLinear,
}

/// Module paths of the tiny model's adaptable layers, in build order.
pub const TINY_LAYERS: [&str; 9] = [
    "model.blocks.0.q",
    "model.blocks.0.v",
    "model.blocks.0.xq",
    "model.blocks.1.q",
    "model.blocks.1.v",
    "model.blocks.1.xq",
    "model.extra.0.q",
    "model.conv",
    "head",
];

/// The weights of the tiny model, drawn from `seed`.
pub fn tiny_weights(seed: u64) -> HashMap<String, Tensor> {
    let mut r = rng(seed);
    let mut w = HashMap::new();
    let s = 1.0 / (HIDDEN as f32).sqrt();
    for i in 0..2 {
        for (name, bias) in [("q", true), ("v", false), ("xq", true)] {
            let p = format!("model.blocks.{i}.{name}");
            w.insert(
                format!("{p}.weight"),
                rand_tensor(&mut r, &[HIDDEN, HIDDEN], s),
            );
            if bias {
                w.insert(format!("{p}.bias"), rand_tensor(&mut r, &[HIDDEN], s));
            }
        }
    }
    w.insert(
        "model.extra.0.q.weight".into(),
        rand_tensor(&mut r, &[HIDDEN, HIDDEN], s),
    );
    w.insert(
        "model.extra.0.q.bias".into(),
        rand_tensor(&mut r, &[HIDDEN], s),
    );
    w.insert(
        "model.conv.weight".into(),
        rand_tensor(&mut r, &[OUT_CH, IN_CH, 3, 3], 0.3),
    );
    w.insert(
        "model.conv.bias".into(),
        rand_tensor(&mut r, &[OUT_CH], 0.3),
    );
    w.insert(
        "model.norm.weight".into(),
        (rand_tensor(&mut r, &[HIDDEN], 0.2) + 1.0).unwrap(),
    );
    w.insert("head.weight".into(), rand_tensor(&mut r, &[OUT, HIDDEN], s));
    w.insert("head.bias".into(), rand_tensor(&mut r, &[OUT], s));
    w
}

/// Number of base parameters of the tiny model (every tensor of `tiny_weights`).
pub fn tiny_base_params() -> usize {
    tiny_weights(0).values().map(|t| t.elem_count()).sum()
}

impl Tiny {
    pub fn new(b: &PeftBuilder<'_>) -> candle_peft::Result<Self> {
        let m = b.pp("model");
        let mut blocks = Vec::new();
        for i in 0..2 {
            let bb = m.pp("blocks").pp(i);
            blocks.push(Block {
                q: bb.linear(HIDDEN, HIDDEN, true, "q")?,
                v: bb.linear(HIDDEN, HIDDEN, false, "v")?,
                xq: bb.linear(HIDDEN, HIDDEN, true, "xq")?,
            });
        }
        let extra_q = m.pp("extra").pp(0).linear(HIDDEN, HIDDEN, true, "q")?;
        let conv = m.conv2d(IN_CH, OUT_CH, (3, 3), CONV_PARAMS, true, "conv")?;
        let norm = m.get(HIDDEN, "norm.weight")?;
        let head = b.linear(HIDDEN, OUT, true, "head")?;
        Ok(Self {
            blocks,
            extra_q,
            conv,
            norm,
            head,
        })
    }

    /// `x: [B, T, HIDDEN]` → `[B, T, OUT]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for blk in &self.blocks {
            let q = blk.q.forward(&h)?.tanh()?;
            let v = (blk.v.forward(&h)? * 0.5)?;
            let xq = (blk.xq.forward(&h)? * 0.25)?;
            h = (((h + q)? + v)? + xq)?;
        }
        let h = self.extra_q.forward(&h)?.tanh()?;
        let h = h.broadcast_mul(&self.norm)?;
        self.head.forward(&h)
    }

    /// `img: [N, IN_CH, H, W]` → `[N, OUT_CH, H', W']`.
    pub fn conv_forward(&self, img: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(img)
    }

    /// A scalar that depends on both paths (for gradient tests).
    pub fn loss(&self, x: &Tensor, img: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.forward(x)?.sqr()?.mean_all()?;
        let b = self.conv_forward(img)?.sqr()?.mean_all()?;
        a + b
    }
}

/// A `PeftModel` over the tiny model with weights from `weight_seed` and adapter seed
/// `adapter_seed`.
pub fn tiny_model(weight_seed: u64, adapter_seed: u64) -> PeftModel<Tiny> {
    let vb = VarBuilder::from_tensors(tiny_weights(weight_seed), DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let model = Tiny::new(&b).unwrap();
    let mut pm = PeftModel::new(model, &b);
    pm.set_seed(adapter_seed);
    pm
}

/// Tokens per teacher example.
pub const TEACHER_TOKENS: usize = 5;

/// One regression example: an input `[TEACHER_TOKENS, HIDDEN]` and its teacher's output.
pub struct Example {
    pub x: Tensor,
    pub y: Tensor,
}

/// `n` examples: random inputs from `seed` and the outputs a teacher gives them, the tiny
/// model (weights seed 1) with a random-B LoRA (seed 77, r 2, α 4) on `teacher_targets`.
pub fn teacher_examples(n: usize, seed: u64, teacher_targets: &[&str]) -> Vec<Example> {
    let mut teacher = tiny_model(1, 77);
    teacher
        .add_adapter(
            candle_peft::DEFAULT_ADAPTER,
            lora_random_b(teacher_targets, 2, 4.0),
        )
        .unwrap();
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            let x = rand_tensor(&mut r, &[TEACHER_TOKENS, HIDDEN], 1.0);
            let y = teacher
                .model()
                .forward(&x.unsqueeze(0).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap();
            Example { x, y }
        })
        .collect()
}

/// The mean squared error of `student` on a batch of examples.
pub fn student_mse(student: &Tiny, batch: &[&Example]) -> candle_peft::Result<Tensor> {
    let x = Tensor::stack(&batch.iter().map(|e| e.x.clone()).collect::<Vec<_>>(), 0)?;
    let y = Tensor::stack(&batch.iter().map(|e| e.y.clone()).collect::<Vec<_>>(), 0)?;
    let pred = student.forward(&x)?;
    Ok(pred.sub(&y)?.sqr()?.mean_all()?)
}

/// A fixed input `[2, 5, HIDDEN]`.
pub fn tiny_input(seed: u64) -> Tensor {
    rand_tensor(&mut rng(seed), &[2, 5, HIDDEN], 1.0)
}

/// A fixed image `[2, IN_CH, 9, 7]` (odd sizes).
pub fn tiny_image(seed: u64) -> Tensor {
    rand_tensor(&mut rng(seed), &[2, IN_CH, 9, 7], 1.0)
}

// ---------------------------------------------------------------------------------------------
// Single-layer models (gradient and conv tests)
// ---------------------------------------------------------------------------------------------

/// One linear layer `lin` (`in → out`, with bias).
pub fn single_linear(in_f: usize, out_f: usize, seed: u64) -> PeftModel<PeftLinear> {
    let mut r = rng(seed);
    let w = HashMap::from([
        (
            "lin.weight".to_string(),
            rand_tensor(&mut r, &[out_f, in_f], 0.5),
        ),
        ("lin.bias".to_string(), rand_tensor(&mut r, &[out_f], 0.5)),
    ]);
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let lin = b.linear(in_f, out_f, true, "lin").unwrap();
    PeftModel::new(lin, &b)
}

/// One conv layer `conv` with a bias.
pub fn single_conv(
    in_ch: usize,
    out_ch: usize,
    kernel: (usize, usize),
    params: Conv2dParams,
    seed: u64,
) -> PeftModel<PeftConv2d> {
    let mut r = rng(seed);
    let w = HashMap::from([
        (
            "conv.weight".to_string(),
            rand_tensor(
                &mut r,
                &[out_ch, in_ch / params.groups, kernel.0, kernel.1],
                0.5,
            ),
        ),
        ("conv.bias".to_string(), rand_tensor(&mut r, &[out_ch], 0.5)),
    ]);
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let conv = b
        .conv2d(in_ch, out_ch, kernel, params, true, "conv")
        .unwrap();
    PeftModel::new(conv, &b)
}

// ---------------------------------------------------------------------------------------------
// Finite differences
// ---------------------------------------------------------------------------------------------

/// A smooth scalar loss of an output: `Σ c⊙y + ¼ Σ y²` with fixed random `c`.
/// Quadratic in anything `y` is linear in, so central differences have no truncation error there.
pub struct QuadLoss {
    pub c: Tensor,
}

impl QuadLoss {
    pub fn new(shape: &[usize], seed: u64) -> Self {
        Self {
            c: rand_tensor(&mut rng(seed), shape, 1.0),
        }
    }

    /// On the graph, for `backward`.
    pub fn tensor(&self, y: &Tensor) -> Tensor {
        let lin = (y * &self.c).unwrap().sum_all().unwrap();
        let quad = (y.sqr().unwrap().sum_all().unwrap() * 0.25).unwrap();
        (lin + quad).unwrap()
    }

    /// Computed in f64 on the host, for finite differences.
    pub fn value(&self, y: &Tensor) -> f64 {
        let y = flat(y);
        let c = flat(&self.c);
        y.iter()
            .zip(c)
            .map(|(&y, c)| f64::from(c) * f64::from(y) + 0.25 * f64::from(y) * f64::from(y))
            .sum()
    }
}

/// The outcome of comparing an analytic gradient with central differences.
#[derive(Debug)]
pub struct FdReport {
    /// `‖g_fd − g‖ / ‖g‖`.
    pub rel_norm: f64,
    /// `max_i |g_fd,i − g_i| / (|g_i| + 0.05·max|g|)`.
    pub worst_elem: f64,
    pub grad_norm: f64,
    pub n: usize,
}

impl FdReport {
    pub fn assert_within(&self, tol: f64, what: &str) {
        assert!(self.grad_norm > 1e-3, "{what}: gradient is ~0 ({self:?})");
        assert!(
            self.rel_norm <= tol && self.worst_elem <= tol,
            "{what}: analytic and finite-difference gradients disagree: {self:?}"
        );
    }
}

/// Central differences of `loss` w.r.t. every element of `var`, compared with `analytic`.
pub fn finite_differences(
    var: &Var,
    analytic: &Tensor,
    eps: f32,
    mut loss: impl FnMut() -> f64,
) -> FdReport {
    assert_eq!(var.dims(), analytic.dims());
    let shape = var.shape().clone();
    let orig = flat(var.as_tensor());
    let g = flat(analytic);
    let mut fd = Vec::with_capacity(orig.len());
    for i in 0..orig.len() {
        let mut v = orig.clone();
        let plus = orig[i] + eps;
        let minus = orig[i] - eps;
        v[i] = plus;
        var.set(&Tensor::from_vec(v.clone(), &shape, &Device::Cpu).unwrap())
            .unwrap();
        let lp = loss();
        v[i] = minus;
        var.set(&Tensor::from_vec(v, &shape, &Device::Cpu).unwrap())
            .unwrap();
        let lm = loss();
        fd.push((lp - lm) / f64::from(plus - minus));
    }
    var.set(&Tensor::from_vec(orig, &shape, &Device::Cpu).unwrap())
        .unwrap();
    let grad_norm = g.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let diff_norm = g
        .iter()
        .zip(&fd)
        .map(|(&a, &b)| (f64::from(a) - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let gmax = g.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
    let worst_elem = g
        .iter()
        .zip(&fd)
        .map(|(&a, &b)| (f64::from(a) - b).abs() / (f64::from(a).abs() + 0.05 * gmax))
        .fold(0f64, f64::max);
    FdReport {
        rel_norm: diff_norm / grad_norm,
        worst_elem,
        grad_norm,
        n: g.len(),
    }
}

/// The analytic gradient of `var` in `grads`, which must be there.
pub fn grad_of(grads: &candle_core::backprop::GradStore, var: &Var, what: &str) -> Tensor {
    grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("no gradient for {what}"))
        .clone()
}
