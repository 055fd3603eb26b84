//! `candle-peft bench <workload>`: the fixed benchmark workloads of DESIGN.md.
//!
//! `minilm-lora-train`: all-MiniLM-L6-v2, LoRA r = 8, α = 16 on query and value, batch 16 × 64
//! tokens, loss = mean of last_hidden_state², AdamW lr 1e-4; the median ms/step of steps 3..12
//! (1-based) and the process's peak resident memory. Token ids come from a seeded RNG: the cost
//! of a step does not depend on which tokens they are.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_peft::LoraConfig;
use candle_peft::io::source;
use candle_peft::models::bert::BertModel;
use candle_peft::optim::{AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The workload: minilm-lora-train.
    pub workload: String,
    /// The model to run it on (hub id or folder).
    #[arg(long)]
    pub model: Option<String>,
    /// Print one JSON line: {"workload", "ms_per_step", "peak_rss_mb", …}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let result = match args.workload.as_str() {
        "minilm-lora-train" => minilm_lora_train(args.model.as_deref().unwrap_or(MINILM))?,
        other => bail!("unknown workload `{other}` (available: minilm-lora-train)"),
    };
    let peak_rss_mb = peak_rss_mb()?;
    if args.json {
        let line = serde_json::json!({
            "workload": args.workload,
            "ms_per_step": result.median_ms,
            "peak_rss_mb": peak_rss_mb,
            "steps_ms": result.steps_ms,
            "threads": candle_core::utils::get_num_threads(),
        });
        super::print_stdout(&format!("{line}\n"))
    } else {
        super::print_stdout(&format!(
            "{}: {:.1} ms/step (median of steps 3..{}), peak RSS {peak_rss_mb:.0} MB, {} threads\n",
            args.workload,
            result.median_ms,
            result.steps_ms.len(),
            candle_core::utils::get_num_threads()
        ))
    }
}

struct StepTimes {
    median_ms: f64,
    steps_ms: Vec<f64>,
}

fn minilm_lora_train(model: &str) -> Result<StepTimes> {
    let device = Device::Cpu;
    let src = source::resolve(model)?;
    let (mut model, cfg) = BertModel::from_source(&src, DType::F32, &device)?;
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
    let mut steps_ms = Vec::new();
    for _ in 0..12 {
        let started = Instant::now();
        let hidden = model.model().forward(&ids, None, None)?;
        let loss = hidden.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-4)?;
        // Reading the loss waits for the step to finish on any device.
        loss.to_scalar::<f32>()?;
        steps_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut timed = steps_ms[2..].to_vec();
    timed.sort_by(f64::total_cmp);
    let median_ms = (timed[timed.len() / 2 - 1] + timed[timed.len() / 2]) / 2.0;
    Ok(StepTimes {
        median_ms,
        steps_ms,
    })
}

/// Peak resident set size of this process (`VmHWM`), in MB.
fn peak_rss_mb() -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kb / 1024.0)
}
