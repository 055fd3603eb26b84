//! `candle-peft train --task causal-lm`: fine-tunes an adapter on a Llama-architecture model.
//!
//! Training data is a text file (packed into sequences of `--seq` tokens) or a `.jsonl` file of
//! `{"prompt", "response"}` pairs (loss on the response only). `--merge` writes `OUT/merged/`, an
//! HF Llama folder (config.json, model.safetensors, tokenizer.json) that `eval`, `generate`,
//! candle-transformers and transformers load, also when the base came from a GGUF file.

use std::fmt::Write as _;

use anyhow::Context;
use candle_peft::Trainer;
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::causal_lm::{CausalLmTask, DEFAULT_TARGET_MODULES, TASK_TYPE};
use serde_json::json;

use crate::cli::args::{TrainArgs, adapter_config, check_args, check_method, train_config};
use crate::cli::calibration::add_causal_adapter;
use crate::cli::output::{lm_eval_json, print_stdout, train_summary};

/// `train --task causal-lm`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let method = check_method(&args.method)?;
    check_args(&args)?;
    let mut config = adapter_config(&args, method, &DEFAULT_TARGET_MODULES)?;
    config
        .inner_mut()
        .set_task_type(Some(TASK_TYPE.to_string()));
    let opts = TaskOptions {
        seq_len: args.seq,
        seed: args.seed,
        base_dtype: args.base_dtype,
        ..TaskOptions::default()
    };
    let mut task = CausalLmTask::from_pretrained(&args.model, opts)
        .with_context(|| format!("loading --model {}", args.model))?;
    let train = task
        .read_examples(&args.data, false)
        .with_context(|| format!("reading --data {}", args.data.display()))?;
    let eval = match &args.eval_data {
        Some(p) => Some(
            task.read_examples(p, true)
                .with_context(|| format!("reading --eval-data {}", p.display()))?,
        ),
        None => None,
    };
    add_causal_adapter(&mut task, config, method, &args, &train)?;
    let trainable = task.model().num_trainable_parameters();
    let total = task.model().num_total_parameters();
    let per_step = args.batch * args.grad_accum;
    let steps = args.steps.unwrap_or_else(|| train.len().div_ceil(per_step));
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
    let report = trainer.run(&task, &train, eval.as_deref())?;

    let adapter_dir = args.out.join("adapter");
    task.save_adapter(&adapter_dir)
        .with_context(|| format!("saving the adapter to {}", adapter_dir.display()))?;
    let final_eval = match &eval {
        Some(data) => Some(task.evaluate_lm(data)?),
        None => None,
    };
    let merged_dir = if args.merge {
        let dir = args.out.join("merged");
        task.export_merged(&dir)
            .with_context(|| format!("writing the merged model to {}", dir.display()))?;
        Some(dir)
    } else {
        None
    };

    let final_loss = report.losses.last().copied();
    let mut o = String::new();
    if args.json {
        let value = json!({
            "steps": report.global_step,
            "final_loss": final_loss,
            "losses": report.losses,
            "eval": final_eval.as_ref().map(lm_eval_json),
            "train_sequences": train.len(),
            "trainable_parameters": trainable,
            "adapter": adapter_dir,
            "merged": merged_dir,
            "seconds": report.seconds,
        });
        writeln!(o, "{value}")?;
    } else {
        let eval = final_eval.as_ref().map(|r| {
            format!(
                "eval: perplexity {:.3} over {} tokens, loss {:.4}",
                r.perplexity, r.tokens, r.loss
            )
        });
        o.push_str(&train_summary(
            &report,
            final_loss,
            eval,
            &adapter_dir,
            merged_dir.as_deref(),
        ));
    }
    print_stdout(&o)
}
