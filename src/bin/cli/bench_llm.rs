//! The SmolLM2 workloads of DESIGN.md.
//!
//! `smollm2-lora-train`: SmolLM2-135M in f32, LoRA r = 16, α = 32 on q, k, v, o, gate, up and
//! down, batch 4 × 128 tokens, next-token cross-entropy (the fused op the causal-LM task uses),
//! AdamW lr 1e-4; the median ms/step of
//! steps 3..8 (1-based). Token ids come from a seeded RNG: a step's cost does not depend on them.
//!
//! `smollm2-merge`: the base as an HF folder (written once from the GGUF, untimed) plus that LoRA
//! with a random B (`init_lora_weights = false`), merged by `candle-peft merge` in a child process;
//! the child's wall time and peak resident memory (so the setup's memory is not counted).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::io::source;
use candle_peft::models::llama::LlamaForCausalLM;
use candle_peft::ops::cross_entropy_rows;
use candle_peft::optim::{AdamW, AdamWConfig};
use candle_peft::{DEFAULT_ADAPTER, LoraConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::bench::{BenchResult, median_after};

/// Where `scripts/fetch-models.sh` leaves SmolLM2.
const SMOLLM2_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn lora() -> LoraConfig {
    LoraConfig::new(TARGETS, 16, 32.0)
}

fn default_model(model: Option<&str>) -> String {
    model.map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(SMOLLM2_GGUF)
                .display()
                .to_string()
        },
        str::to_string,
    )
}

pub fn smollm2_lora_train(model: Option<&str>) -> Result<BenchResult> {
    let spec = default_model(model);
    let device = Device::Cpu;
    let src = source::resolve(&spec).with_context(|| format!("resolving {spec}"))?;
    let (mut model, cfg) = LlamaForCausalLM::from_source(&src, DType::F32, &device)?;
    model.set_seed(0);
    model.add_adapter(DEFAULT_ADAPTER, lora())?;
    model.train();
    let (batch, seq) = (4, 128);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch * (seq + 1))
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq + 1), &device)?;
    let inputs = ids.narrow(1, 0, seq)?.contiguous()?;
    let targets = ids.narrow(1, 1, seq)?.flatten_all()?.to_vec1::<u32>()?;
    let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default())?;
    let mut steps_ms = Vec::new();
    for _ in 0..8 {
        let started = Instant::now();
        let logits = model.model().forward(&inputs, None)?;
        let logits = logits.reshape((batch * seq, cfg.vocab_size))?;
        let loss = cross_entropy_rows(&logits, &targets)?.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-4)?;
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

/// The folder the merge workload prepares its inputs in.
fn work_dir() -> PathBuf {
    std::env::temp_dir().join("candle-peft-bench-smollm2-merge")
}

pub fn smollm2_merge(model: Option<&str>) -> Result<BenchResult> {
    let spec = default_model(model);
    let work = work_dir();
    let base_dir = work.join("base");
    let adapter_dir = work.join("adapter");
    let out_dir = work.join("merged");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    let device = Device::Cpu;
    let src = source::resolve(&spec).with_context(|| format!("resolving {spec}"))?;
    {
        let (base, _) = LlamaForCausalLM::from_source(&src, DType::F32, &device)?;
        LlamaForCausalLM::export_merged(base, &src, &base_dir, DType::F32)?;
    }
    {
        let (mut model, _) = LlamaForCausalLM::from_source(&src, DType::F32, &device)?;
        model.set_seed(0);
        let mut config = lora();
        config.init_lora_weights = InitLoraWeights::Bool(false);
        model.add_adapter(DEFAULT_ADAPTER, config)?;
        model.save_adapter(DEFAULT_ADAPTER, &adapter_dir)?;
    }
    let exe = std::env::current_exe().context("locating the candle-peft binary")?;
    let started = Instant::now();
    let status = Command::new(exe)
        .arg("merge")
        .arg("--base")
        .arg(&base_dir)
        .arg("--adapter")
        .arg(&adapter_dir)
        .arg("--out")
        .arg(&out_dir)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running candle-peft merge")?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("candle-peft merge failed: {status}");
    }
    let child_peak_mb = children_peak_rss_mb()?;
    let merged_bytes: u64 = std::fs::read_dir(&out_dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let _ = std::fs::remove_dir_all(&work);
    let mut details = serde_json::Map::new();
    details.insert("merge_peak_rss_mb".into(), child_peak_mb.into());
    details.insert("merged_mb".into(), (merged_bytes as f64 / 1e6).into());
    Ok(BenchResult {
        metric: "seconds",
        value: seconds,
        unit: "s",
        how: format!("wall time of `candle-peft merge`, whose peak RSS was {child_peak_mb:.0} MB"),
        details,
    })
}

/// The largest peak resident set size of any waited-for child process, in MB.
fn children_peak_rss_mb() -> Result<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a full `rusage` into the pointer it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    if rc != 0 {
        bail!("getrusage failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call above.
    let usage = unsafe { usage.assume_init() };
    // Linux reports ru_maxrss in kilobytes.
    Ok(usage.ru_maxrss as f64 / 1024.0)
}
