//! `eva-corda-init-smollm2`: the data-driven inits on SmolLM2-135M (f32), all seven projections
//! of every block targeted (r = 16, α = 32), 32 calibration batches of 4 × 128 tokens of
//! `data/shakespeare/train.txt`. EVA (ρ = 2, τ = 0.99, PEFT's randomised SVD; the batches cycle
//! until its components converge) and CorDA (IPM) each run in a child process
//! (`eva-init-smollm2`, `corda-init-smollm2`), so that each one's peak resident memory is its
//! own: the time is the whole init (calibration, decompositions, adapter creation), without
//! loading the model; the peak is the child's, model included, next to the child's resident
//! memory once the model is loaded.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_peft::adapters::corda::CordaConfig;
use candle_peft::adapters::eva::EvaConfig;
use candle_peft::data::pad_batch;
use candle_peft::data_init::corda::{self, CordaOptions};
use candle_peft::data_init::eva::{self, EvaOptions};
use candle_peft::data_init::{CalibrationBatch, CalibrationOptions};
use candle_peft::io::source;
use candle_peft::models::llama::LLAMA_TARGET_MODULES;
use candle_peft::models::llama::LlamaForCausalLM;
use candle_peft::tasks::causal_lm::CausalLmTask;
use candle_peft::{DEFAULT_ADAPTER, LoraConfig};
use serde_json::Value;

use super::measure::{BenchResult, peak_rss_mb};

const SMOLLM2_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const TEXT: &str = "data/shakespeare/train.txt";
const TARGETS: &[&str] = &LLAMA_TARGET_MODULES;
const BATCHES: usize = 32;
const BATCH: usize = 4;
const SEQ: usize = 128;

/// The workloads this file runs (`bench.rs` routes them here).
pub fn run(workload: &str, model: Option<&str>) -> Result<BenchResult> {
    match workload {
        "eva-init-smollm2" => init_in_process(Init::Eva, model),
        "corda-init-smollm2" => init_in_process(Init::Corda, model),
        _ => both(model),
    }
}

#[derive(Clone, Copy)]
enum Init {
    Eva,
    Corda,
}

fn model_spec(model: Option<&str>) -> String {
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

/// 32 batches of 4 consecutive 128-token pieces of the text.
fn batches(task: &CausalLmTask) -> Result<Vec<CalibrationBatch>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(TEXT);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let examples = task.text_examples(&text, false)?;
    if examples.len() < BATCHES * BATCH {
        bail!(
            "{} gives {} sequences of {SEQ} tokens; the workload needs {}",
            path.display(),
            examples.len(),
            BATCHES * BATCH
        );
    }
    let pad = candle_peft::data::pad_id(task.tokenizer());
    examples
        .chunks(BATCH)
        .take(BATCHES)
        .map(|chunk| {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|e| e.ids.clone()).collect();
            let b = pad_batch(&seqs, pad, &Device::Cpu)?;
            Ok(CalibrationBatch::new(b.input_ids, b.attention_mask))
        })
        .collect()
}

fn forward(m: &LlamaForCausalLM, b: &CalibrationBatch) -> candle_peft::Result<()> {
    m.forward_hidden(&b.input_ids, Some(&b.attention_mask))
        .map(|_| ())
}

fn init_in_process(init: Init, model: Option<&str>) -> Result<BenchResult> {
    let spec = model_spec(model);
    let src = source::resolve(&spec).with_context(|| format!("resolving {spec}"))?;
    let opts = candle_peft::tasks::TaskOptions {
        seq_len: SEQ,
        seed: 0,
        device: Device::Cpu,
        ..Default::default()
    };
    let mut task = CausalLmTask::from_source(src, opts)?;
    let batches = batches(&task)?;
    let loaded_rss = peak_rss_mb()?;
    let calibration = CalibrationOptions { quiet: true };
    let started = Instant::now();
    let cpu_started = cpu_seconds()?;
    let mut details = serde_json::Map::new();
    match init {
        Init::Eva => {
            let mut config = LoraConfig::new(TARGETS, 16, 32.0);
            config.eva_config = Some(EvaConfig::default());
            let options = EvaOptions {
                calibration,
                ..EvaOptions::default()
            };
            let report = eva::add_eva_adapter(
                task.model_mut(),
                DEFAULT_ADAPTER,
                config,
                &batches,
                forward,
                &options,
            )?;
            let ranks = report.state.ranks();
            details.insert("iterations".into(), report.state.iterations.into());
            details.insert(
                "adapted_layers".into(),
                ranks.values().filter(|&&r| r > 0).count().into(),
            );
            details.insert(
                "max_rank".into(),
                ranks.values().max().copied().unwrap_or(0).into(),
            );
        }
        Init::Corda => {
            let config = CordaConfig::new(TARGETS, 16, 32.0);
            let options = CordaOptions { calibration };
            let state = corda::add_corda_adapter(
                task.model_mut(),
                DEFAULT_ADAPTER,
                config,
                &batches,
                forward,
                &options,
            )?;
            details.insert("layers".into(), state.factors.len().into());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    details.insert("cpu_seconds".into(), (cpu_seconds()? - cpu_started).into());
    details.insert("model_rss_mb".into(), loaded_rss.into());
    Ok(BenchResult {
        metric: "seconds",
        value: seconds,
        unit: "s",
        how: format!("{BATCHES} calibration batches of {BATCH} × {SEQ} tokens, model loaded"),
        details,
    })
}

/// User plus system CPU time of this process so far: on a shared machine, steadier than the wall
/// time.
fn cpu_seconds() -> Result<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a full `rusage` into the pointer it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        bail!("getrusage failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call above.
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// Runs `workload` in a child process and returns its JSON line.
fn child(workload: &str, model: Option<&str>) -> Result<Value> {
    let exe = std::env::current_exe().context("locating the candle-peft binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", workload, "--json"]);
    if let Some(m) = model {
        cmd.args(["--model", m]);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running bench {workload}"))?;
    if !out.status.success() {
        bail!(
            "bench {workload} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .context("the child printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn both(model: Option<&str>) -> Result<BenchResult> {
    let eva = child("eva-init-smollm2", model)?;
    let corda = child("corda-init-smollm2", model)?;
    let get = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let mut details = serde_json::Map::new();
    for (name, v) in [("eva", &eva), ("corda", &corda)] {
        details.insert(format!("{name}_seconds"), get(v, "seconds").into());
        details.insert(format!("{name}_cpu_seconds"), get(v, "cpu_seconds").into());
        details.insert(format!("{name}_peak_rss_mb"), get(v, "peak_rss_mb").into());
        details.insert(
            format!("{name}_model_rss_mb"),
            get(v, "model_rss_mb").into(),
        );
    }
    details.insert("eva_iterations".into(), get(&eva, "iterations").into());
    let total = get(&eva, "seconds") + get(&corda, "seconds");
    Ok(BenchResult {
        metric: "seconds",
        value: total,
        unit: "s",
        how: format!(
            "EVA {:.1} s ({:.0} s CPU) over {} batches, peak RSS {:.0} MB; CorDA {:.1} s \
             ({:.0} s CPU), peak RSS {:.0} MB; model alone {:.0} MB",
            get(&eva, "seconds"),
            get(&eva, "cpu_seconds"),
            get(&eva, "iterations"),
            get(&eva, "peak_rss_mb"),
            get(&corda, "seconds"),
            get(&corda, "cpu_seconds"),
            get(&corda, "peak_rss_mb"),
            get(&corda, "model_rss_mb"),
        ),
        details,
    })
}
