//! The main job: sentiment classification on the bundled SST-2 sample with all-MiniLM-L6-v2.
//!
//! 1. load the model by hub id (from the HF cache that `scripts/fetch-models.sh` fills; no network)
//!    as transformers' `BertForSequenceClassification`: pooler + a new, seeded classifier,
//! 2. measure validation accuracy with the untrained head (about chance),
//! 3. attach LoRA (r = 8, α = 16) to every query and value projection, train the classifier as a
//!    `modules_to_save` module, and fine-tune with AdamW (linear schedule, 10% warmup) on the
//!    4000 training sentences,
//! 4. measure validation accuracy again, save the adapter (PEFT format), export merged weights
//!    (a `BertForSequenceClassification` folder Python's `AutoModelForSequenceClassification`
//!    loads), reload the merged folder as a plain model, and check that it predicts exactly what
//!    the adapted model predicts (the example fails otherwise).
//!
//! Run: `bash scripts/fetch-models.sh && cargo run --release --example quickstart [-- OUT_DIR]`
//! (default OUT_DIR: `out/quickstart`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_peft::data::{read_tsv, read_tsv_with_labels};
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::classify::{self, ClassifyTask};
use candle_peft::{DEFAULT_ADAPTER, LoraConfig, Schedule, TrainConfig, Trainer, Warmup};

// mimalloc keeps freed activation buffers instead of returning them to the kernel (see the
// binary's note in src/bin/candle-peft.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
const SEED: u64 = 42;
const MAX_LEN: usize = 128;
const STEPS: usize = 500;
const BATCH: usize = 16;
const LR: f64 = 1e-3;

fn main() -> Result<()> {
    // Allocator and thread-pool settings for training (see candle_peft::runtime).
    // SAFETY: first statement of `main`; no other thread has been started.
    unsafe { candle_peft::runtime::tune_cpu_runtime() };
    let started = Instant::now();
    let out: PathBuf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/quickstart".into())
        .into();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sst2");
    let train = read_tsv(data.join("train.tsv"))?;
    let valid = read_tsv_with_labels(data.join("valid.tsv"), &train.labels)?;
    let labels = train.labels.clone();

    let opts = TaskOptions {
        seq_len: MAX_LEN,
        seed: SEED,
        ..TaskOptions::default()
    };
    let mut task = ClassifyTask::from_pretrained(MODEL, &labels, opts.clone())
        .with_context(|| format!("{MODEL} (run `bash scripts/fetch-models.sh` first)"))?;
    if let Some(source) = task.source() {
        println!("model: {MODEL} at {}", source.dir.display());
    }
    println!(
        "data: {} training and {} validation sentences, labels {}",
        train.len(),
        valid.len(),
        labels.join(", ")
    );

    let before = task.evaluate_full(&valid.examples)?;
    println!(
        "validation accuracy before fine-tuning (untrained head): {:.1}%",
        100.0 * before.accuracy
    );

    task.add_adapter(
        DEFAULT_ADAPTER,
        LoraConfig::new(&["query", "value"], 8, 16.0),
    )?;
    let model = task.model();
    println!(
        "LoRA r=8 α=16 on query,value + classifier (modules_to_save): {} trainable of {} \
         parameters ({:.3}%)",
        model.num_trainable_parameters(),
        model.num_total_parameters(),
        100.0 * model.num_trainable_parameters() as f64 / model.num_total_parameters() as f64
    );

    let trainer = Trainer::new(TrainConfig {
        steps: STEPS,
        batch_size: BATCH,
        lr: LR,
        weight_decay: 0.01,
        schedule: Schedule::Linear,
        warmup: Warmup::Ratio(0.1),
        max_grad_norm: Some(1.0),
        seed: SEED,
        log_every: 50,
        ..TrainConfig::default()
    })?;
    let report = trainer.run(&task, &train.examples, None)?;
    println!(
        "trained {STEPS} steps of {BATCH} in {:.1}s ({:.0} ms/step), final loss {:.4}",
        report.seconds,
        1000.0 * report.seconds / STEPS as f64,
        report.losses.last().copied().unwrap_or(f64::NAN)
    );

    let after = task.evaluate_full(&valid.examples)?;
    println!(
        "validation accuracy after fine-tuning: {:.1}% (was {:.1}%), loss {:.4}",
        100.0 * after.accuracy,
        100.0 * before.accuracy,
        after.loss
    );

    let adapter_dir = out.join("adapter");
    task.save_adapter(&adapter_dir)?;
    println!("adapter saved to {}", adapter_dir.display());

    let merged_dir = out.join("merged");
    task.export_merged(&merged_dir)?;
    println!("merged model written to {}", merged_dir.display());

    // The merged folder is a plain classification model: its own classifier and label names,
    // no adapter. Another seed proves the head comes from the file.
    let merged_spec = merged_dir.display().to_string();
    let merged_labels = classify::known_labels(&merged_spec, None)?
        .context("the merged config.json has no id2label")?;
    let opts = TaskOptions {
        seed: SEED + 1,
        ..opts
    };
    let merged = ClassifyTask::from_pretrained(&merged_spec, merged_labels, opts)?;
    let reloaded = merged.evaluate_full(&valid.examples)?;
    let differ = after
        .predictions
        .iter()
        .zip(&reloaded.predictions)
        .filter(|(a, b)| a != b)
        .count();
    println!(
        "reloaded merged model: validation accuracy {:.1}%, loss {:.4}, {differ} of {} \
         predictions differ from the adapted model",
        100.0 * reloaded.accuracy,
        reloaded.loss,
        valid.len()
    );
    if differ != 0 || merged.labels() != labels.as_slice() {
        bail!(
            "the merged export does not reproduce the adapted model ({differ} predictions differ)"
        );
    }
    println!("done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
