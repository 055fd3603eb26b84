//! `candle-peft train --task causal-lm`: fine-tunes an adapter on a Llama-architecture model.
//!
//! Training data is a text file (packed into sequences of `--seq` tokens) or a `.jsonl` file of
//! `{"prompt", "response"}` pairs (loss on the response only); with `--chat-template` each pair is
//! rendered by the model's chat template as a user turn and an assistant turn. `--merge` writes `OUT/merged/`, an
//! HF Llama folder (config.json, model.safetensors, tokenizer.json) that `eval`, `generate`,
//! candle-transformers and transformers load, also when the base came from a GGUF file.

use anyhow::Context;
use candle_peft::Trainer;
use candle_peft::chat::ChatTemplate;
use candle_peft::io::source;
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::causal_lm::{CausalLmTask, DEFAULT_TARGET_MODULES};
use serde_json::json;

use super::ranks::{self, Plan};
use crate::cli::args::{TrainArgs, adapter_config, check_args, check_method, train_config};
use crate::cli::calibration::add_causal_adapter;
use crate::cli::output::{TrainOutcome, lm_eval_json, print_train};

/// `train --task causal-lm`.
pub fn run(args: TrainArgs, plan: Option<&Plan>) -> anyhow::Result<()> {
    let method = check_method(&args.method)?;
    check_args(&args)?;
    let config = adapter_config(&args, method, &DEFAULT_TARGET_MODULES)?;
    let opts = TaskOptions {
        seq_len: args.seq,
        seed: args.seed,
        base_dtype: args.base_dtype,
        device: plan.map_or(args.device, |p| p.device(args.device)).open()?,
        ..TaskOptions::default()
    };
    // The template is looked up before the model loads: a model without one fails at once.
    let template = if args.chat_template {
        let src = source::resolve(&args.model)
            .with_context(|| format!("resolving --model {}", args.model))?;
        Some(ChatTemplate::for_source(&src).context("--chat-template")?)
    } else {
        None
    };
    let mut task = CausalLmTask::from_pretrained(&args.model, opts)
        .with_context(|| format!("loading --model {}", args.model))?;
    let read = |path: &std::path::Path, keep_partial: bool| match &template {
        Some(t) => task.read_chat_examples(path, t),
        None => task.read_examples(path, keep_partial),
    };
    let train = read(&args.data, false)
        .with_context(|| format!("reading --data {}", args.data.display()))?;
    let eval = match &args.eval_data {
        Some(p) => {
            Some(read(p, true).with_context(|| format!("reading --eval-data {}", p.display()))?)
        }
        None => None,
    };
    let init_started = std::time::Instant::now();
    add_causal_adapter(&mut task, config, method, &args, &train)?;
    let init_seconds = init_started.elapsed().as_secs_f64();
    let trainable = task.model().num_trainable_parameters();
    let total = task.model().num_total_parameters();
    let (steps, per_step) = super::steps(&args, train.len());
    if !args.quiet {
        eprintln!(
            "{}: {} training sequences of ≤ {} tokens; {} trainable of {} parameters ({:.3}%); \
             {steps} steps of {per_step}",
            args.model,
            train.len(),
            args.seq,
            trainable,
            total,
            100.0 * trainable as f64 / total as f64
        );
    }
    let trainer = Trainer::new(train_config(&args, steps))?;
    let report = match ranks::join(plan, task.device())? {
        Some(group) => trainer.run_data_parallel(&task, &train, eval.as_deref(), group.as_ref())?,
        None => trainer.run(&task, &train, eval.as_deref())?,
    };
    if !Plan::writes_output(plan) {
        return Ok(());
    }

    let adapter_dir = super::save_adapter(&args, |dir| task.save_adapter(dir))?;
    let final_eval = match &eval {
        Some(data) => Some(task.evaluate_lm(data)?),
        None => None,
    };
    let merged_dir = super::export_merged(&args, |dir| task.export_merged(dir))?;
    let eval = final_eval.map(|r| {
        let line = format!(
            "eval: perplexity {:.3} over {} tokens, loss {:.4}",
            r.perplexity, r.tokens, r.loss
        );
        (lm_eval_json(&r), line)
    });
    let outcome = TrainOutcome {
        report: &report,
        eval,
        fields: vec![("train_sequences", json!(train.len()))],
        trainable_parameters: trainable,
        init_seconds,
        adapter_dir: &adapter_dir,
        merged_dir: merged_dir.as_deref(),
    };
    print_train(args.json, outcome)
}
