//! Sentiment classification with all-MiniLM-L6-v2 and EVA: LoRA whose `A` starts from the
//! principal components of each layer's inputs on calibration texts (ranks redistributed), a
//! short fine-tune, then a merged export that must predict what the adapted model predicts.
//!
//! Run: `bash scripts/fetch-models.sh && cargo run --release --example classify_eva_export`

use std::path::Path;

use anyhow::{Result, ensure};
use candle_peft::data::{read_tsv, read_tsv_with_labels};
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::calibrated::EvaInitOptions;
use candle_peft::tasks::classify::{self, ClassifyTask};
use candle_peft::{LoraConfig, TrainConfig, Trainer};

/// Validation loss before and after fine-tuning, accuracy after, and the largest |Δlogit|
/// between the reloaded merged export and the adapted model.
#[derive(Debug)]
pub struct Outcome {
    pub loss: (f64, f64),
    pub accuracy: f64,
    pub merged_vs_adapted: f32,
}

/// EVA-initialised LoRA on MiniLM (`model`), `steps` steps on the first `n` SST-2 training
/// sentences (`data/sst2/*.tsv`), validation on the first `n`; merged export to `out`.
pub fn run(model: &str, data: &Path, n: usize, steps: usize, out: &Path) -> Result<Outcome> {
    let mut train = read_tsv(data.join("train.tsv"))?;
    train.examples.truncate(n);
    let mut valid = read_tsv_with_labels(data.join("valid.tsv"), &train.labels)?;
    valid.examples.truncate(n);
    let opts = TaskOptions {
        seq_len: 64,
        ..TaskOptions::default()
    };
    let mut task = ClassifyTask::from_pretrained(model, &train.labels, opts.clone())?;

    let lora = LoraConfig::new(&["query", "value"], 8, 16.0);
    let eva = EvaInitOptions {
        batch_size: 16,
        max_batches: 8,
        ..EvaInitOptions::default()
    };
    task.add_eva_adapter("default", lora, &train.texts(), &eva)?;

    let before = task.evaluate_full(&valid.examples)?.loss;
    let config = TrainConfig {
        steps,
        batch_size: 16,
        lr: 2e-3,
        quiet: true,
        ..TrainConfig::default()
    };
    Trainer::new(config)?.run(&task, &train.examples, None)?;
    let after = task.evaluate_full(&valid.examples)?;
    let texts = valid.texts();
    let adapted = task.logits(&texts)?;

    task.export_merged(out)?;
    let merged_spec = out.display().to_string();
    let labels = classify::known_labels(&merged_spec, None)?.unwrap_or_default();
    let merged = ClassifyTask::from_pretrained(&merged_spec, labels, opts)?;
    let diff = (merged.logits(&texts)? - adapted)?.abs()?.max_all()?;
    Ok(Outcome {
        loss: (before, after.loss),
        accuracy: after.accuracy,
        merged_vs_adapted: diff.to_scalar()?,
    })
}

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("out/classify_eva_export");
    let model = "sentence-transformers/all-MiniLM-L6-v2";
    let o = run(model, &root.join("data/sst2"), 512, 64, &out)?;
    println!("{o:#?}\nmerged export in {}", out.display());
    ensure!(o.loss.1 < o.loss.0 && o.merged_vs_adapted < 1e-4);
    Ok(())
}
