//! The `minilm-lora-train` workload: all-MiniLM-L6-v2, LoRA r = 8, α = 16 on query and value,
//! batch 16 × 64 tokens, loss = mean of last_hidden_state², AdamW lr 1e-4; the median ms/step
//! of steps 3..12 (1-based). Token ids come from a seeded RNG: the cost of a step does not
//! depend on which tokens they are.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_peft::io::source;
use candle_peft::models::bert::BertModel;
use candle_peft::optim::{AdamW, AdamWConfig};
use candle_peft::{BaseDType, LoadOptions, LoraConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::measure::{BenchResult, median_after, rss_mb, train_details};

pub fn minilm_lora_train(model: &str, base_dtype: BaseDType) -> Result<BenchResult> {
    let device = Device::Cpu;
    let src = source::resolve(model)?;
    let opts = LoadOptions {
        device: device.clone(),
        base_dtype,
    };
    let (mut model, cfg) = BertModel::from_source(&src, DType::F32, opts)?;
    let model_rss_mb = rss_mb()?;
    model.set_seed(0);
    model.add_adapter("default", LoraConfig::new(&["query", "value"], 8, 16.0))?;
    model.train();
    let (batch, seq) = (16, 64);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(1000..cfg.vocab_size as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &device)?;
    // PyTorch's AdamW defaults (weight decay 0.01), as in the reference measurement.
    let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default())?;
    let (mut steps_ms, mut losses) = (Vec::new(), Vec::new());
    for _ in 0..12 {
        let started = Instant::now();
        let hidden = model.model().forward(&ids, None, None)?;
        let loss = hidden.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-4)?;
        // Reading the loss waits for the step to finish on any device.
        losses.push(loss.to_scalar::<f32>()?);
        steps_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let details = train_details(model_rss_mb, &losses, &steps_ms);
    Ok(BenchResult {
        metric: "ms_per_step",
        value: median_after(&steps_ms, 2),
        unit: "ms/step",
        how: format!("median of steps 3..{}", steps_ms.len()),
        details,
    })
}
