//! The decoder workloads (SmolLM2 and Gemma 3).
//!
//! `smollm2-lora-train` and `gemma3-lora-train`: SmolLM2-135M or Gemma 3 270M (linear weights in
//! `--base-dtype`, f32 by default), LoRA r = 16, α = 32 on q, k, v, o, gate, up and down, batch
//! 4 × 128 tokens, next-token cross-entropy through the tied head as one fused op
//! (`LlamaForCausalLM::token_losses`, as the causal-LM task uses it),
//! AdamW lr 1e-4; the median ms/step of
//! steps 3..8 (1-based). Token ids come from a seeded RNG: a step's cost does not depend on them.
//!
//! `smollm2-merge`: the base as an HF folder (written once from the GGUF, untimed) plus that LoRA
//! with a random B (`init_lora_weights = false`), merged by `candle-peft merge` in a child process;
//! the child's wall time and its own peak resident memory (VmHWM, reported by `merge --json`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::io::source;
use candle_peft::models::llama::LLAMA_TARGET_MODULES;
use candle_peft::models::llama::LlamaForCausalLM;
use candle_peft::optim::{AdamW, AdamWConfig};
use candle_peft::{BaseDType, DEFAULT_ADAPTER, LoadOptions, LoraConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::measure::{BenchResult, median_after, rss_mb, train_details};

/// Where `scripts/fetch-models.sh` leaves SmolLM2.
const SMOLLM2_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Where `scripts/fetch-models.sh` leaves Gemma 3 270M.
const GEMMA3_GGUF: &str = "models/gemma-3-270m-q4_k_m.gguf";
const TARGETS: &[&str] = &LLAMA_TARGET_MODULES;

fn lora() -> LoraConfig {
    LoraConfig::new(TARGETS, 16, 32.0)
}

fn default_model(model: Option<&str>) -> String {
    model_or(model, SMOLLM2_GGUF)
}

/// `model`, else the repository's copy of `default_file`.
fn model_or(model: Option<&str>, default_file: &str) -> String {
    model.map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(default_file)
                .display()
                .to_string()
        },
        str::to_string,
    )
}

pub fn smollm2_lora_train(model: Option<&str>, base_dtype: BaseDType) -> Result<BenchResult> {
    decoder_lora_train(&default_model(model), base_dtype)
}

pub fn gemma3_lora_train(model: Option<&str>, base_dtype: BaseDType) -> Result<BenchResult> {
    decoder_lora_train(&model_or(model, GEMMA3_GGUF), base_dtype)
}

/// LoRA training steps on a decoder from `spec` (see the module docs).
fn decoder_lora_train(spec: &str, base_dtype: BaseDType) -> Result<BenchResult> {
    let spec = spec.to_string();
    let device = Device::Cpu;
    let src = source::resolve(&spec).with_context(|| format!("resolving {spec}"))?;
    let opts = LoadOptions {
        device: device.clone(),
        base_dtype,
    };
    let (mut model, cfg) = LlamaForCausalLM::from_source(&src, DType::F32, opts)?;
    let model_rss_mb = rss_mb()?;
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
    let (mut steps_ms, mut losses) = (Vec::new(), Vec::new());
    let (mut forward_ms, mut backward_ms, mut optimizer_ms) = (Vec::new(), Vec::new(), Vec::new());
    let ms_since = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    for _ in 0..8 {
        let started = Instant::now();
        let hidden = model.model().forward_hidden(&inputs, None)?;
        let hidden = hidden.reshape((batch * seq, cfg.hidden_size))?;
        let loss = model.model().token_losses(&hidden, &targets)?.mean_all()?;
        forward_ms.push(ms_since(started));
        let phase = Instant::now();
        let grads = loss.backward()?;
        backward_ms.push(ms_since(phase));
        let phase = Instant::now();
        opt.step(&grads, 1e-4)?;
        losses.push(loss.to_scalar::<f32>()?);
        optimizer_ms.push(ms_since(phase));
        steps_ms.push(ms_since(started));
    }
    let mut details = train_details(model_rss_mb, &losses, &steps_ms);
    details.insert("forward_ms".into(), median_after(&forward_ms, 2).into());
    details.insert("backward_ms".into(), median_after(&backward_ms, 2).into());
    details.insert("optimizer_ms".into(), median_after(&optimizer_ms, 2).into());
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
        model.save_adapter(&adapter_dir, DEFAULT_ADAPTER)?;
    }
    let exe = std::env::current_exe().context("locating the candle-peft binary")?;
    let started = Instant::now();
    let output = Command::new(exe)
        .arg("merge")
        .arg("--base")
        .arg(&base_dir)
        .arg("--adapter")
        .arg(&adapter_dir)
        .arg("--out")
        .arg(&out_dir)
        .arg("--json")
        .output()
        .context("running candle-peft merge")?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "candle-peft merge failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The child's own VmHWM: getrusage(RUSAGE_CHILDREN) would also count the pages it shared
    // with this (model-sized) process between fork and exec.
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("reading the JSON line of candle-peft merge")?;
    let child_peak_mb = report["peak_rss_mb"]
        .as_f64()
        .context("candle-peft merge --json gave no peak_rss_mb")?;
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
