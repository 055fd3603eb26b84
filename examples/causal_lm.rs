//! Causal-LM fine-tuning: SmolLM2-135M-Instruct with LoRA on a Tiny Shakespeare sample.
//!
//! 1. load SmolLM2-135M-Instruct from the GGUF file `scripts/fetch-models.sh` leaves in
//!    `models/` (dequantised to f32, q/k un-permuted, tokenizer rebuilt from the GGUF metadata),
//! 2. measure held-out perplexity on `data/shakespeare/valid.txt` and generate a sample,
//! 3. attach LoRA (r = 16, α = 32) to all seven projections and train on
//!    `data/shakespeare/train.txt` packed into 128-token sequences,
//! 4. measure perplexity again and generate the same sample, save the adapter (PEFT format),
//!    export merged weights (an HF Llama folder), reload that folder as a plain model and check
//!    that its held-out perplexity equals the adapted model's (the example fails otherwise).
//!
//! Run: `bash scripts/fetch-models.sh && cargo run --release --example causal_lm [-- OUT_DIR]`
//! (default OUT_DIR: `out/causal_lm`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use candle_peft::generate::GenerationConfig;
use candle_peft::io::source;
use candle_peft::models::llama::LLAMA_TARGET_MODULES;
use candle_peft::models::llama::LlamaForCausalLM;
use candle_peft::tasks::causal_lm::CausalLmTask;
use candle_peft::{DEFAULT_ADAPTER, LoraConfig, Schedule, TrainConfig, Trainer, Warmup};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SEED: u64 = 42;
const SEQ: usize = 128;
const STEPS: usize = 60;
const BATCH: usize = 4;
const LR: f64 = 1e-3;
const PROMPT: &str = "ROMEO:\n";

fn main() -> Result<()> {
    // Allocator and thread-pool settings for training (see candle_peft::runtime).
    // SAFETY: first statement of `main`; no other thread has been started.
    unsafe { candle_peft::runtime::tune_cpu_runtime() };
    let started = Instant::now();
    let out: PathBuf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/causal_lm".into())
        .into();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model_source = source::resolve(&gguf.display().to_string()).with_context(|| {
        format!(
            "{} (run `bash scripts/fetch-models.sh` first)",
            gguf.display()
        )
    })?;
    let device = Device::Cpu;
    let mut task = CausalLmTask::from_source(&model_source, SEQ, SEED, &device)?;
    let train = task.read_examples(&root.join("data/shakespeare/train.txt"), false)?;
    let valid = task.read_examples(&root.join("data/shakespeare/valid.txt"), true)?;
    println!(
        "model: SmolLM2-135M-Instruct (GGUF, dequantised to f32); data: {} training and {} \
         held-out sequences of ≤ {SEQ} tokens",
        train.len(),
        valid.len()
    );
    let greedy = GenerationConfig {
        max_new_tokens: 40,
        temperature: 0.0,
        top_p: 1.0,
        seed: SEED,
        stop_tokens: task.eos_token_ids().to_vec(),
    };

    let before = task.evaluate_lm(&valid)?;
    let sample_before = task.generate_text(PROMPT, &greedy)?;
    println!(
        "before: held-out perplexity {:.2} ({} tokens)",
        before.perplexity, before.tokens
    );
    println!("before: {PROMPT:?} → {sample_before:?}");

    let lora = LoraConfig::new(&LLAMA_TARGET_MODULES, 16, 32.0);
    task.add_adapter(DEFAULT_ADAPTER, lora)?;
    println!(
        "LoRA r=16 α=32 on all seven projections: {} trainable of {} parameters",
        task.model().num_trainable_parameters(),
        task.model().num_total_parameters()
    );
    let config = TrainConfig {
        steps: STEPS,
        batch_size: BATCH,
        lr: LR,
        schedule: Schedule::Cosine,
        warmup: Warmup::Ratio(0.1),
        seed: SEED,
        ..TrainConfig::default()
    };
    let report = Trainer::new(config)?.run(&task, &train, None)?;
    println!(
        "trained {STEPS} steps of {BATCH} sequences in {:.0}s: loss {:.3} → {:.3}",
        report.seconds,
        report.losses.first().copied().unwrap_or(f64::NAN),
        report.losses.last().copied().unwrap_or(f64::NAN)
    );

    let after = task.evaluate_lm(&valid)?;
    let sample_after = task.generate_text(PROMPT, &greedy)?;
    println!("after: held-out perplexity {:.2}", after.perplexity);
    println!("after: {PROMPT:?} → {sample_after:?}");
    if after.perplexity >= before.perplexity {
        bail!(
            "fine-tuning did not lower the held-out perplexity ({:.2} → {:.2})",
            before.perplexity,
            after.perplexity
        );
    }

    let adapter_dir = out.join("adapter");
    task.model().save_adapter(&adapter_dir, DEFAULT_ADAPTER)?;
    println!("adapter saved to {}", adapter_dir.display());
    let merged_dir = out.join("merged");
    LlamaForCausalLM::export_merged(task.into_model(), &model_source, &merged_dir, DType::F32)?;
    println!("merged model written to {}", merged_dir.display());

    let merged_source = source::resolve(&merged_dir.display().to_string())?;
    let merged = CausalLmTask::from_source(&merged_source, SEQ, SEED, &device)?;
    let reloaded = merged.evaluate_lm(&valid)?;
    println!(
        "merged folder reloaded: held-out perplexity {:.2}",
        reloaded.perplexity
    );
    let rel = (reloaded.perplexity - after.perplexity).abs() / after.perplexity;
    if rel > 1e-3 {
        bail!(
            "the merged model's perplexity {:.4} differs from the adapted model's {:.4}",
            reloaded.perplexity,
            after.perplexity
        );
    }
    println!("done in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}
