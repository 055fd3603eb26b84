//! Gemma 3 270M answers "positive" or "negative": LoRA on SST-2 prompt/response pairs, from the
//! quantized GGUF base.
//!
//! 1. load Gemma 3 270M from the Q4_K_M GGUF `scripts/fetch-models.sh` leaves in `models/`,
//!    keeping the file's quantized blocks as the frozen base (`BaseDType::Gguf`);
//! 2. ask it about held-out sentences of `data/sst2/valid.tsv`: the answer is the model's greedy
//!    continuation of the prompt (two tokens), correct when it reads the label word;
//! 3. attach LoRA (r = 8, α = 16) to all seven projections and train on prompt/response pairs
//!    from `data/sst2/train.tsv` (the loss on the response only);
//! 4. ask again, save the adapter (PEFT format), export the merged model as an HF folder and as a
//!    GGUF with the adapted tensors re-quantised to their original types.
//!
//! Run: `bash scripts/fetch-models.sh && cargo run --release --example gemma_sentiment
//! [-- OUT_DIR [STEPS [EVAL_N]]]` (defaults: `out/gemma_sentiment`, 120 steps, the first 400
//! held-out sentences).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_peft::data::PromptResponse;
use candle_peft::generate::GenerationConfig;
use candle_peft::io::export::merge_adapter_into_gguf;
use candle_peft::models::llama::LLAMA_TARGET_MODULES;
use candle_peft::tasks::{CausalLmTask, TaskOptions};
use candle_peft::{BaseDType, DEFAULT_ADAPTER, LoraConfig, Schedule, TrainConfig, Trainer, Warmup};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SEED: u64 = 42;
const SEQ: usize = 96;
const BATCH: usize = 8;
const LR: f64 = 3e-4;
const GEMMA_GGUF: &str = "models/gemma-3-270m-q4_k_m.gguf";

/// The question asked about each sentence; the answer follows it.
fn prompt(sentence: &str) -> String {
    format!("Review: {sentence}\nIs this review positive or negative?\nAnswer:")
}

fn label_word(label: u8) -> &'static str {
    if label == 1 { "positive" } else { "negative" }
}

/// `(label, sentence)` rows of an SST-2 TSV file (a header, then `label<TAB>sentence`).
fn read_sst2(path: &Path) -> Result<Vec<(u8, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let (label, sentence) = line
            .split_once('\t')
            .with_context(|| format!("{}:{}: no tab", path.display(), i + 1))?;
        let label = match label {
            "0" => 0,
            "1" => 1,
            other => bail!(
                "{}:{}: label `{other}` is not 0 or 1",
                path.display(),
                i + 1
            ),
        };
        rows.push((label, sentence.to_string()));
    }
    Ok(rows)
}

/// The share of `rows` whose greedy answer starts with the label word.
fn accuracy(task: &CausalLmTask, rows: &[(u8, String)]) -> Result<f64> {
    let greedy = GenerationConfig {
        max_new_tokens: 2,
        temperature: 0.0,
        top_p: 1.0,
        seed: SEED,
        stop_tokens: task.eos_token_ids().to_vec(),
    };
    let mut correct = 0;
    for (label, sentence) in rows {
        let answer = task.generate_text(&prompt(sentence), &greedy)?;
        if answer.trim().to_lowercase().starts_with(label_word(*label)) {
            correct += 1;
        }
    }
    Ok(correct as f64 / rows.len().max(1) as f64)
}

/// This process's peak resident memory (`VmHWM`), in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> Result<()> {
    // SAFETY: first statement of `main`; no other thread has been started.
    unsafe { candle_peft::runtime::tune_cpu_runtime() };
    let started = Instant::now();
    let mut args = std::env::args().skip(1);
    let out: PathBuf = args
        .next()
        .unwrap_or_else(|| "out/gemma_sentiment".into())
        .into();
    let steps: usize = args.next().map_or(Ok(120), |s| s.parse())?;
    let eval_n: usize = args.next().map_or(Ok(400), |s| s.parse())?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join(GEMMA_GGUF);

    let opts = TaskOptions {
        seq_len: SEQ,
        seed: SEED,
        base_dtype: BaseDType::Gguf,
        ..TaskOptions::default()
    };
    let mut task = CausalLmTask::from_pretrained(&gguf.display().to_string(), opts)
        .with_context(|| format!("{} (run `bash scripts/fetch-models.sh`)", gguf.display()))?;
    let pairs: Vec<PromptResponse> = read_sst2(&root.join("data/sst2/train.tsv"))?
        .into_iter()
        .map(|(label, sentence)| PromptResponse {
            prompt: prompt(&sentence),
            response: format!(" {}", label_word(label)),
        })
        .collect();
    let train = task.pair_examples(&pairs)?;
    let mut valid = read_sst2(&root.join("data/sst2/valid.tsv"))?;
    valid.truncate(eval_n);
    println!(
        "model: Gemma 3 270M (GGUF Q4_K_M, blocks kept); {} training pairs, {} held-out sentences",
        train.len(),
        valid.len()
    );

    let eval_started = Instant::now();
    let before = accuracy(&task, &valid)?;
    println!(
        "before: held-out accuracy {:.1}% ({:.0}s)",
        100.0 * before,
        eval_started.elapsed().as_secs_f64()
    );

    task.add_adapter(
        DEFAULT_ADAPTER,
        LoraConfig::new(&LLAMA_TARGET_MODULES, 8, 16.0),
    )?;
    println!(
        "LoRA r=8 α=16 on all seven projections: {} trainable parameters",
        task.model().num_trainable_parameters()
    );
    let config = TrainConfig {
        steps,
        batch_size: BATCH,
        lr: LR,
        schedule: Schedule::Cosine,
        warmup: Warmup::Ratio(0.1),
        seed: SEED,
        ..TrainConfig::default()
    };
    let report = Trainer::new(config)?.run(&task, &train, None)?;
    println!(
        "trained {steps} steps of {BATCH} pairs in {:.0}s: loss {:.3} → {:.3}",
        report.seconds,
        report.losses.first().copied().unwrap_or(f64::NAN),
        report.losses.last().copied().unwrap_or(f64::NAN)
    );

    let after = accuracy(&task, &valid)?;
    println!("after: held-out accuracy {:.1}%", 100.0 * after);
    if after <= before {
        bail!(
            "fine-tuning did not raise the held-out accuracy ({:.1}% → {:.1}%)",
            100.0 * before,
            100.0 * after
        );
    }

    let adapter_dir = out.join("adapter");
    task.save_adapter(&adapter_dir)?;
    println!("adapter saved to {}", adapter_dir.display());
    let merged_gguf = out.join("gemma-3-270m-sst2.gguf");
    let merge = merge_adapter_into_gguf(&gguf, &adapter_dir, &merged_gguf)?;
    println!(
        "merged GGUF written to {} ({} tensors re-quantised)",
        merged_gguf.display(),
        merge.merged.len()
    );
    let merged_dir = out.join("merged");
    task.export_merged(&merged_dir)?;
    println!("merged HF folder written to {}", merged_dir.display());
    println!(
        "done in {:.0}s, peak resident memory {:.0} MB",
        started.elapsed().as_secs_f64(),
        peak_rss_mb()
    );
    Ok(())
}
