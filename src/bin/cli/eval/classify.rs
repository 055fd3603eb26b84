//! `candle-peft eval --model <hub id|dir> [--adapter DIR] --data <tsv> [--task classify] [--json]`:
//! accuracy, mean cross-entropy and the number of examples of a classifier on labelled data.
//!
//! The model is a `BertForSequenceClassification` export (e.g. `train --merge`'s `DIR/merged`),
//! or a base model plus `--adapter` (whose saved classifier is the head). Label names come from
//! the adapter's `labels.json`, else the model's `config.json` (`id2label`), else the data.

use anyhow::{Context, bail};
use candle_peft::DEFAULT_ADAPTER;
use candle_peft::data::{LabeledDataset, read_tsv, read_tsv_with_labels};
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::classify::{self, ClassifyTask};
use serde_json::json;
use std::fmt::Write as _;

use crate::cli::args::EvalArgs;
use crate::cli::load::check_adapter_dir;
use crate::cli::output::print_stdout;

/// `eval --task classify`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.chat_template {
        bail!("--chat-template is for --task causal-lm (a classifier has no chat turns)");
    }
    for (flag, v) in [("--batch", args.batch), ("--seq", args.seq)] {
        if v == 0 {
            bail!("{flag} must be at least 1 (got 0)");
        }
    }
    check_adapter_dir(args.adapter.as_deref())?;
    let known = classify::known_labels(&args.model, args.adapter.as_deref())
        .with_context(|| format!("loading --model {}", args.model))?;
    let read = |labels: Option<&[String]>| -> anyhow::Result<LabeledDataset> {
        match labels {
            Some(l) => read_tsv_with_labels(&args.data, l),
            None => read_tsv(&args.data),
        }
        .with_context(|| format!("reading --data {}", args.data.display()))
    };
    let (data, labels) = match known {
        Some(labels) => (read(Some(&labels))?, labels),
        None => {
            let data = read(None)?;
            let mut labels = data.labels.clone();
            let rows = match &args.adapter {
                Some(dir) => classify::adapter_num_labels(dir)
                    .with_context(|| format!("reading the adapter {}", dir.display()))?,
                None => None,
            };
            match rows {
                // Integer labels the data does not all use: size the head from the adapter.
                Some(rows) => {
                    let ints = labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit()));
                    if ints && rows > labels.len() {
                        labels = (0..rows).map(|i| i.to_string()).collect();
                    }
                }
                None => eprintln!(
                    "note: neither {} nor the adapter has a classifier; evaluating a freshly \
                     initialised one (seed {})",
                    args.model, args.seed
                ),
            }
            (data, labels)
        }
    };

    let opts = TaskOptions {
        seq_len: args.seq,
        seed: args.seed,
        base_dtype: args.base_dtype,
        device: args.device.open()?,
        eval_batch: Some(args.batch),
    };
    let mut task = ClassifyTask::from_pretrained(&args.model, labels, opts)
        .with_context(|| format!("loading --model {}", args.model))?;
    if let Some(dir) = &args.adapter {
        task.load_adapter(dir, DEFAULT_ADAPTER)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
    }
    let r = task.evaluate_full(&data.examples)?;
    if !r.loss.is_finite() {
        candle_peft::train::check_eval_loss(r.loss, &task.model().layer_weights()?)?;
    }

    if let Some(path) = &args.predictions {
        let mut text = String::with_capacity(r.predictions.len() * 2);
        for p in &r.predictions {
            writeln!(text, "{}", task.labels()[*p])?;
        }
        std::fs::write(path, text)
            .with_context(|| format!("writing --predictions {}", path.display()))?;
    }

    let mut o = String::new();
    if args.json {
        let value = json!({ "accuracy": r.accuracy, "loss": r.loss, "examples": r.examples });
        writeln!(o, "{value}")?;
    } else {
        writeln!(
            o,
            "accuracy {:.4} ({}/{}), loss {:.4}",
            r.accuracy, r.correct, r.examples, r.loss
        )?;
    }
    print_stdout(&o)
}
