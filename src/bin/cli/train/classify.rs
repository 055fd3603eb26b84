//! `candle-peft train --model <hub id|dir> --task classify --data <tsv> --method lora --out DIR
//! [--merge] …`: fine-tunes an adapter and writes `DIR/adapter/` (PEFT format, plus
//! `labels.json`) and, with `--merge`, `DIR/merged/` (a `BertForSequenceClassification` folder
//! that `train`, `eval`, candle-transformers and Python transformers load).

use std::path::Path;

use anyhow::Context;
use candle_peft::data::{LabeledDataset, read_tsv, read_tsv_with_labels};
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::classify::{self, ClassifyTask};
use candle_peft::train::EvalReport;
use candle_peft::{TrainTask, Trainer};
use serde_json::{Value, json};

use super::ranks::{self, Plan};
use crate::cli::args::{TrainArgs, adapter_config, check_args, check_method, train_config};
use crate::cli::calibration::add_classify_adapter;
use crate::cli::output::{TrainOutcome, print_train};

fn eval_json(r: &EvalReport) -> Value {
    json!({
        "accuracy": r.metrics.get("accuracy").copied().unwrap_or(f64::NAN),
        "loss": r.loss,
        "examples": r.metrics.get("examples").map(|v| *v as usize).unwrap_or(0),
    })
}

fn read_data(path: &Path, labels: Option<&[String]>, what: &str) -> anyhow::Result<LabeledDataset> {
    let data = match labels {
        Some(l) => read_tsv_with_labels(path, l),
        None => read_tsv(path),
    };
    data.with_context(|| format!("reading {what} {}", path.display()))
}

/// `train --task classify`.
pub fn run(args: TrainArgs, plan: Option<&Plan>) -> anyhow::Result<()> {
    let method = check_method(&args.method)?;
    check_args(&args)?;
    if args.chat_template {
        anyhow::bail!("--chat-template is for --task causal-lm (a classifier has no chat turns)");
    }
    let config = adapter_config(&args, method, &classify::DEFAULT_TARGET_MODULES)?;

    // A classification export brings its labels; otherwise the training data defines them.
    let model_labels = classify::known_labels(&args.model, None)
        .with_context(|| format!("loading --model {}", args.model))?;
    let train = read_data(&args.data, model_labels.as_deref(), "--data")?;
    let labels = train.labels.clone();
    let eval = match &args.eval_data {
        Some(p) => Some(read_data(p, Some(&labels), "--eval-data")?),
        None => None,
    };

    let opts = TaskOptions {
        seq_len: args.seq,
        seed: args.seed,
        base_dtype: args.base_dtype,
        device: plan.map_or(args.device, |p| p.device(args.device)).open()?,
        ..TaskOptions::default()
    };
    let mut task = ClassifyTask::from_pretrained(&args.model, &labels, opts)
        .with_context(|| format!("loading --model {}", args.model))?;
    let init_started = std::time::Instant::now();
    add_classify_adapter(&mut task, config, method, &args, &train.examples)?;
    let init_seconds = init_started.elapsed().as_secs_f64();
    let trainable = task.model().num_trainable_parameters();
    let total = task.model().num_total_parameters();

    let (steps, per_step) = super::steps(&args, train.len());
    if !args.quiet {
        eprintln!(
            "{}: {} labels ({}), {} training examples; {} trainable of {} parameters ({:.3}%); \
             {steps} steps of {per_step}",
            args.model,
            labels.len(),
            labels.join(", "),
            train.len(),
            trainable,
            total,
            100.0 * trainable as f64 / total as f64
        );
    }
    let trainer = Trainer::new(train_config(&args, steps))?;
    let eval_examples = eval.as_ref().map(|d| d.examples.as_slice());
    let report = match ranks::join(plan, task.device())? {
        Some(group) => {
            trainer.run_data_parallel(&task, &train.examples, eval_examples, group.as_ref())?
        }
        None => trainer.run(&task, &train.examples, eval_examples)?,
    };
    if !Plan::writes_output(plan) {
        return Ok(());
    }

    let adapter_dir = super::save_adapter(&args, |dir| task.save_adapter(dir))?;
    let final_eval = match &eval {
        Some(data) => Some(match report.evals.last() {
            Some(r) if r.step == report.global_step && report.global_step > report.start_step => {
                r.report.clone()
            }
            _ => task.evaluate(&data.examples)?,
        }),
        None => None,
    };
    let merged_dir = super::export_merged(&args, |dir| task.export_merged(dir))?;
    let eval = final_eval.map(|r| {
        let v = eval_json(&r);
        let line = format!(
            "eval: accuracy {:.4} on {} examples, loss {:.4}",
            v["accuracy"].as_f64().unwrap_or(f64::NAN),
            v["examples"],
            r.loss
        );
        (v, line)
    });
    let outcome = TrainOutcome {
        report: &report,
        eval,
        fields: vec![
            ("labels", json!(labels)),
            ("train_examples", json!(train.len())),
        ],
        trainable_parameters: trainable,
        init_seconds,
        adapter_dir: &adapter_dir,
        merged_dir: merged_dir.as_deref(),
    };
    print_train(args.json, outcome)
}
