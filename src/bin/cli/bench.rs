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

/// What a workload reports: its headline figure, and anything else worth printing as JSON.
pub struct BenchResult {
    /// The JSON key of the headline figure (`ms_per_step`, `seconds`).
    pub metric: &'static str,
    pub value: f64,
    /// The unit printed after the value (`ms/step`, `s`).
    pub unit: &'static str,
    /// How the value was taken, for the text line (`median of steps 3..12`).
    pub how: String,
    /// Extra JSON fields (per-step times, sizes).
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// The workloads, for the error message on an unknown name.
const WORKLOADS: &[&str] = &[
    "minilm-lora-train",
    "smollm2-lora-train",
    "smollm2-merge",
    "svd-init-smollm2",
    "eva-corda-init-smollm2",
];

pub fn run(args: BenchArgs) -> Result<()> {
    let result = match args.workload.as_str() {
        "minilm-lora-train" => minilm_lora_train(args.model.as_deref().unwrap_or(MINILM))?,
        "smollm2-lora-train" => super::bench_llm::smollm2_lora_train(args.model.as_deref())?,
        "smollm2-merge" => super::bench_llm::smollm2_merge(args.model.as_deref())?,
        "svd-init-smollm2" => super::bench_svd::svd_init_smollm2(args.model.as_deref())?,
        "eva-corda-init-smollm2" | "eva-init-smollm2" | "corda-init-smollm2" => {
            super::bench_calib::run(&args.workload, args.model.as_deref())?
        }
        other => bail!(
            "unknown workload `{other}` (available: {})",
            WORKLOADS.join(", ")
        ),
    };
    let peak_rss_mb = peak_rss_mb()?;
    let threads = candle_core::utils::get_num_threads();
    if args.json {
        let mut line = serde_json::Map::new();
        line.insert("workload".into(), args.workload.clone().into());
        line.insert(result.metric.into(), result.value.into());
        line.insert("peak_rss_mb".into(), peak_rss_mb.into());
        line.insert("threads".into(), threads.into());
        line.extend(result.details);
        super::print_stdout(&format!("{}\n", serde_json::Value::Object(line)))
    } else {
        super::print_stdout(&format!(
            "{}: {:.1} {} ({}), peak RSS {peak_rss_mb:.0} MB, {threads} threads\n",
            args.workload, result.value, result.unit, result.how,
        ))
    }
}

/// The median of `times[skip..]`.
pub fn median_after(times: &[f64], skip: usize) -> f64 {
    let mut timed = times[skip.min(times.len())..].to_vec();
    if timed.is_empty() {
        return f64::NAN;
    }
    timed.sort_by(f64::total_cmp);
    let n = timed.len();
    if n % 2 == 0 {
        (timed[n / 2 - 1] + timed[n / 2]) / 2.0
    } else {
        timed[n / 2]
    }
}

fn minilm_lora_train(model: &str) -> Result<BenchResult> {
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
    let mut details = serde_json::Map::new();
    details.insert("steps_ms".into(), steps_ms.clone().into());
    Ok(BenchResult {
        metric: "ms_per_step",
        value: median_after(&steps_ms, 2),
        unit: "ms/step",
        how: format!("median of steps 3..{}", steps_ms.len()),
        details,
    })
}

/// Peak resident set size of this process (`VmHWM`), in MB.
pub fn peak_rss_mb() -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kb / 1024.0)
}
