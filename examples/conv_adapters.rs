//! Conv adapters on a real image task: scikit-learn's 8×8 handwritten digits (1,797 images,
//! fetched by `scripts/fetch-models.sh` into `models/digits.csv`).
//!
//! 1. Pretrain a small conv net from scratch on digits 0–4 (plain candle training of all
//!    weights; 70 % of each digit for training, 30 % for testing).
//! 2. Load those weights through `PeftBuilder`, so the convs are adaptable, and adapt to digits
//!    5–9 (relabelled 0–4) from only 20 training images per digit, three ways, each with a
//!    fresh trainable copy of the head (`modules_to_save`): the head alone (a linear probe on
//!    frozen features), FLoRA on the three convs (Tucker cores, per-mode ranks), and LoRA on
//!    the three convs. Same optimiser, learning rate and epochs for all; nothing is tuned on
//!    the test set.
//! 3. Report test accuracy and trainable parameter counts, and check that merging each adapter
//!    into the conv kernels leaves the predictions unchanged.
//!
//! `cargo run --release --example conv_adapters [-- --seed N] [--json]` (under a minute on 2
//! CPU cores). `--seed` (default 2024) seeds the split, the pretraining and the adaptation;
//! `--json` ends with one line `{"seed", "runs": [{"name", "adapter_params", "head_params",
//! "accuracy"}]}` (the method study reads it).
//! `CANDLE_PEFT_MODELS` overrides the models folder.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_peft::adapters::flora::FloraConfig;
use candle_peft::config::OneOrMany;
use candle_peft::{
    AdapterConfig, Conv2dParams, LoraConfig, PeftBuilder, PeftConv2d, PeftLinear, PeftModel,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `(in, out, stride)` of the three 3×3, padding-1 convs: 8×8 → 8×8 → 4×4 → 2×2.
const CONVS: [(usize, usize, usize); 3] = [(1, 16, 1), (16, 32, 2), (32, 32, 2)];
const CONV_NAMES: [&str; 3] = ["conv1", "conv2", "conv3"];
const FEATURES: usize = 32 * 2 * 2;
const CLASSES: usize = 5;
/// Training images per digit for the adaptation: a low-data regime.
const ADAPT_PER_DIGIT: usize = 20;

/// Three conv + ReLU stages and a linear head, generic over the layer types so that the same
/// code runs the plain candle net (pretraining) and the adaptable one.
struct Net<C, L> {
    convs: Vec<C>,
    head: L,
}

impl<C: Module, L: Module> Net<C, L> {
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward(&h)?.relu()?;
        }
        Ok(h.flatten_from(1)?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(&self.features(x)?)?)
    }
}

/// Images `[N, 1, 8, 8]` scaled to [0, 1] and labels `[N]`.
struct Split {
    images: Tensor,
    labels: Tensor,
}

impl Split {
    fn len(&self) -> usize {
        self.labels.dim(0).unwrap_or(0)
    }
}

/// `(train, test)` for digits `lo..lo+5`, relabelled 0–4: 30 % of each digit for testing, and of
/// the rest at most `train_per_digit` for training; shuffled.
fn load_digits(lo: u32, train_per_digit: usize, rng: &mut ChaCha8Rng) -> Result<(Split, Split)> {
    let dir = std::env::var_os("CANDLE_PEFT_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let path = dir.join("digits.csv");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (run scripts/fetch-models.sh first)",
            path.display()
        )
    })?;
    let mut by_digit: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 10];
    for (i, line) in text.lines().enumerate() {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("{}:{}: not numbers", path.display(), i + 1))?;
        if values.len() != 65 {
            bail!(
                "{}:{}: expected 64 pixels and a label",
                path.display(),
                i + 1
            );
        }
        let label = values[64] as usize;
        if label > 9 {
            bail!("{}:{}: label {label}", path.display(), i + 1);
        }
        by_digit[label].push(values[..64].iter().map(|p| p / 16.0).collect());
    }
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (offset, digit) in (lo..lo + CLASSES as u32).enumerate() {
        let mut images = by_digit[digit as usize].clone();
        images.shuffle(rng);
        let cut = images.len() * 7 / 10;
        for (i, img) in images.into_iter().enumerate() {
            if i >= cut {
                test.push((img, offset as u32));
            } else if i < train_per_digit {
                train.push((img, offset as u32));
            }
        }
    }
    train.shuffle(rng);
    let to_split = |rows: Vec<(Vec<f32>, u32)>| -> Result<Split> {
        let n = rows.len();
        let (pixels, labels): (Vec<Vec<f32>>, Vec<u32>) = rows.into_iter().unzip();
        let pixels: Vec<f32> = pixels.into_iter().flatten().collect();
        Ok(Split {
            images: Tensor::from_vec(pixels, (n, 1, 8, 8), &Device::Cpu)?,
            labels: Tensor::from_vec(labels, n, &Device::Cpu)?,
        })
    };
    Ok((to_split(train)?, to_split(test)?))
}

/// Mini-batch AdamW on cross-entropy; returns the last epoch's mean loss.
fn train(
    vars: Vec<Var>,
    forward: impl Fn(&Tensor) -> Result<Tensor>,
    data: &Split,
    epochs: usize,
    lr: f64,
    rng: &mut ChaCha8Rng,
) -> Result<f32> {
    let params = ParamsAdamW {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars, params)?;
    let batch = 32;
    let mut last = 0.0;
    for _ in 0..epochs {
        let mut order: Vec<u32> = (0..data.len() as u32).collect();
        order.shuffle(rng);
        let mut total = 0.0;
        let mut batches = 0;
        for chunk in order.chunks(batch) {
            let idx = Tensor::new(chunk, &Device::Cpu)?;
            let x = data.images.index_select(&idx, 0)?;
            let y = data.labels.index_select(&idx, 0)?;
            let loss = candle_nn::loss::cross_entropy(&forward(&x)?, &y)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()?;
            batches += 1;
        }
        last = total / batches as f32;
    }
    Ok(last)
}

fn accuracy(forward: impl Fn(&Tensor) -> Result<Tensor>, data: &Split) -> Result<f64> {
    let predicted = forward(&data.images)?.argmax(D::Minus1)?;
    let correct = predicted
        .eq(&data.labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(f64::from(correct) / data.len() as f64)
}

/// PyTorch's default init for the pretraining net, from a seeded RNG (candle's CPU RNG cannot
/// be seeded): `U(−1/√fan_in, 1/√fan_in)` for weights and biases.
fn seeded_varmap(rng: &mut ChaCha8Rng) -> Result<VarMap> {
    let varmap = VarMap::new();
    let mut add = |name: String, shape: Vec<usize>, fan_in: usize| -> Result<()> {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| bound * (2.0 * rng.random::<f32>() - 1.0))
            .collect();
        let var = Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)?;
        varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("var map lock poisoned"))?
            .insert(name, var);
        Ok(())
    };
    for (name, (cin, cout, _)) in CONV_NAMES.iter().zip(CONVS) {
        add(format!("{name}.weight"), vec![cout, cin, 3, 3], cin * 9)?;
        add(format!("{name}.bias"), vec![cout], cin * 9)?;
    }
    add("head.weight".into(), vec![CLASSES, FEATURES], FEATURES)?;
    add("head.bias".into(), vec![CLASSES], FEATURES)?;
    Ok(varmap)
}

/// Pretrains on digits 0–4; returns the weights by name.
fn pretrain(rng: &mut ChaCha8Rng) -> Result<HashMap<String, Tensor>> {
    let (train_set, test_set) = load_digits(0, usize::MAX, rng)?;
    let varmap = seeded_varmap(rng)?;
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mut convs = Vec::new();
    for (name, (cin, cout, stride)) in CONV_NAMES.iter().zip(CONVS) {
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        convs.push(candle_nn::conv2d(cin, cout, 3, cfg, vb.pp(*name))?);
    }
    let head = candle_nn::linear(FEATURES, CLASSES, vb.pp("head"))?;
    let net = Net { convs, head };
    let loss = train(
        varmap.all_vars(),
        |x| net.forward(x),
        &train_set,
        30,
        3e-3,
        rng,
    )?;
    let acc = accuracy(|x| net.forward(x), &test_set)?;
    println!(
        "pretrain on digits 0-4: {} train / {} test images, final loss {loss:.4}, \
         test accuracy {:.1}%",
        train_set.len(),
        test_set.len(),
        100.0 * acc
    );
    let weights = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("var map lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(weights)
}

/// The pretrained net with adaptable layers, wrapped in a `PeftModel`.
fn adaptable(weights: &HashMap<String, Tensor>) -> Result<PeftModel<Net<PeftConv2d, PeftLinear>>> {
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let mut convs = Vec::new();
    for (name, (cin, cout, stride)) in CONV_NAMES.iter().zip(CONVS) {
        let params = Conv2dParams {
            stride,
            padding: 1,
            dilation: 1,
            groups: 1,
        };
        convs.push(b.conv2d(cin, cout, (3, 3), params, true, name)?);
    }
    let head = b.linear(FEATURES, CLASSES, true, "head")?;
    Ok(PeftModel::new(Net { convs, head }, &b))
}

struct Outcome {
    name: String,
    adapter_params: usize,
    head_params: usize,
    accuracy: f64,
}

/// Adapts to digits 5–9 with `config` on the convs (or the head alone when `None`).
fn adapt(
    name: &str,
    weights: &HashMap<String, Tensor>,
    config: Option<AdapterConfig>,
    lr: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Outcome> {
    let (train_set, test_set) = load_digits(5, ADAPT_PER_DIGIT, rng)?;
    let mut pm = adaptable(weights)?;
    let head_params = FEATURES * CLASSES + CLASSES;
    // An adapter needs a target: for the probe, an untrained LoRA on conv1 (B = 0, the
    // identity) carries the head copy, and only the head's vars are trained.
    let probe_only = config.is_none();
    let mut config = config.unwrap_or_else(|| LoraConfig::new(&["conv1"], 1, 1.0).into());
    config.targeting_mut().modules_to_save = Some(vec!["head".into()]);
    pm.add_adapter("digits", config)?;
    let mut vars = pm.trainable_vars();
    if probe_only {
        vars.retain(|(n, _)| n.starts_with("base_model.model.head."));
    }
    let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    pm.train();
    let forward = |x: &Tensor| pm.model().forward(x);
    let loss = train(
        vars.into_iter().map(|(_, v)| v).collect(),
        forward,
        &train_set,
        30,
        lr,
        rng,
    )?;
    pm.eval();
    let acc = accuracy(|x| pm.model().forward(x), &test_set)?;
    // Merging folds the conv deltas into the kernels; predictions must not change.
    if !probe_only {
        let before = pm.model().forward(&test_set.images)?;
        pm.merge()?;
        let after = pm.model().forward(&test_set.images)?;
        let diff = (before - after)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if diff > 1e-3 {
            bail!("{name}: merged logits differ by {diff}");
        }
    }
    println!("  {name:<10} final train loss {loss:.4}");
    Ok(Outcome {
        name: name.to_string(),
        adapter_params: trainable - head_params,
        head_params,
        accuracy: acc,
    })
}

fn main() -> Result<()> {
    let mut seed = 2024u64;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seed" => seed = args.next().context("--seed needs a value")?.parse()?,
            "--json" => json = true,
            other => bail!("unknown argument `{other}` (expected --seed N or --json)"),
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let weights = pretrain(&mut rng)?;
    let base_params: usize = weights.values().map(|t| t.elem_count()).sum();

    println!("adapt to digits 5-9 (30 epochs, head trained in every run):");
    let flora = FloraConfig::new(&CONV_NAMES, OneOrMany::Many(vec![4, 8, 3, 3]), 1.0);
    flora.validate()?;
    // conv1 has one input channel: a mode-0 rank above 1 adds nothing there, but one config
    // serves all three convs.
    let runs: Vec<(&str, Option<AdapterConfig>, f64)> = vec![
        ("head only", None, 1e-2),
        ("FLoRA", Some(flora.into()), 1e-2),
        (
            "LoRA-conv",
            Some(LoraConfig::new(&CONV_NAMES, 4, 8.0).into()),
            1e-2,
        ),
    ];
    let mut outcomes = Vec::new();
    for (name, config, lr) in runs {
        let mut run_rng = ChaCha8Rng::seed_from_u64(rng.random());
        outcomes.push(adapt(name, &weights, config, lr, &mut run_rng)?);
    }
    println!("\nbase net: {base_params} parameters (convs + head)");
    println!(
        "{:<10} {:>15} {:>12} {:>14}",
        "method", "conv adapter", "head copy", "test accuracy"
    );
    for o in &outcomes {
        println!(
            "{:<10} {:>15} {:>12} {:>13.1}%",
            o.name,
            o.adapter_params,
            o.head_params,
            100.0 * o.accuracy
        );
    }
    if json {
        let runs: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|o| {
                serde_json::json!({
                    "name": o.name,
                    "adapter_params": o.adapter_params,
                    "head_params": o.head_params,
                    "accuracy": o.accuracy,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "seed": seed, "runs": runs }));
    }
    Ok(())
}
