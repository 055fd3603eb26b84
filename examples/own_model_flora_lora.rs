//! A model of your own: a small conv net written as candle code, its layers built through
//! `PeftBuilder`, FLoRA on the conv and LoRA on the linear head, both active and trained
//! together for a few steps on a synthetic task (which quadrant of the image is brightest).
//!
//! Run: `cargo run --release --example own_model_flora_lora`

use anyhow::{Result, ensure};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap, loss::cross_entropy};
use candle_peft::{AdamW, AdamWConfig, FloraConfig, LoraConfig, OneOrMany};
use candle_peft::{PeftBuilder, PeftConv2d, PeftLinear, PeftModel};
use rand::{Rng, SeedableRng};

/// conv 3×3 (3 → 8 channels) → ReLU → 4×4 average pool → linear (8·2·2 → 4 classes).
pub struct Net {
    conv: PeftConv2d,
    head: PeftLinear,
}

impl Net {
    /// The layers, by the names an adapter config targets (was: `candle_nn::conv2d(3, 8, 3,
    /// cfg, vb.pp("conv"))` and `candle_nn::linear(32, 4, vb.pp("head"))`).
    pub fn new(b: &PeftBuilder) -> candle_peft::Result<Self> {
        let padded = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv: b.conv2d(3, 8, (3, 3), padded, true, "conv")?,
            head: b.linear(32, 4, true, "head")?,
        })
    }

    /// Logits `[N, 4]` of images `[N, 3, 8, 8]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv.forward(x)?.relu()?;
        self.head.forward(&h.avg_pool2d(4)?.flatten_from(1)?)
    }
}

/// `n` seeded random images `[n, 3, 8, 8]`, each labelled by the quadrant (0–3) whose first
/// channel is lit (+1).
fn quadrant_data(n: usize) -> Result<(Tensor, Tensor)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..4)).collect();
    let pixels: Vec<f32> = (0..n * 192)
        .map(|i| {
            let (image, channel, y, x) = (i / 192, i / 64 % 3, i / 8 % 8, i % 8);
            let lit = channel == 0 && (y / 4 * 2 + x / 4) as u32 == labels[image];
            rng.random::<f32>() + if lit { 1.0 } else { 0.0 }
        })
        .collect();
    let images = Tensor::from_vec(pixels, (n, 3, 8, 8), &Device::Cpu)?;
    Ok((images, Tensor::new(labels, &Device::Cpu)?))
}

/// Redraws the fresh weights from a seeded RNG (`U(−1/√fan_in, 1/√fan_in)` as PyTorch's default
/// init, biases with fan_in 8), so runs repeat: candle's CPU RNG cannot be seeded. The layers
/// share the vars' storage, so they see the new values.
fn reseed(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let bound = 1.0 / (var.dims()[1..].iter().product::<usize>().max(8) as f32).sqrt();
        let values = (0..var.elem_count()).map(|_| rng.random_range(-bound..bound));
        var.set(&Tensor::from_iter(values, &Device::Cpu)?.reshape(var.shape())?)?;
    }
    Ok(())
}

/// Builds the net, adds both adapters and trains them `steps` full-batch steps on `n` images;
/// returns the loss before each step.
pub fn run(n: usize, steps: usize) -> Result<Vec<f32>> {
    // Fresh base weights (reseeded below); for trained ones, a VarBuilder over your checkpoint
    // (VarBuilder::from_mmaped_safetensors).
    let varmap = VarMap::new();
    let b = PeftBuilder::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    let net = Net::new(&b)?;
    reseed(&varmap, 0)?;
    let mut model = PeftModel::new(net, &b);
    model.add_adapter("flora", FloraConfig::new(&["conv"], OneOrMany::One(2), 1.0))?;
    model.add_adapter("lora", LoraConfig::new(&["head"], 4, 8.0))?;
    model.set_active(&["flora", "lora"])?;

    let (images, labels) = quadrant_data(n)?;
    let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default())?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let loss = cross_entropy(&model.forward(&images)?, &labels)?;
        losses.push(loss.to_scalar::<f32>()?);
        opt.step(&loss.backward()?, 5e-3)?;
    }
    Ok(losses)
}

fn main() -> Result<()> {
    let losses = run(256, 60)?;
    println!("loss {:.4} → {:.4}", losses[0], losses[59]);
    ensure!(losses[59] < 0.7 * losses[0], "the adapters did not learn");
    Ok(())
}
