//! `candle-peft eval --task causal-lm`: perplexity of a Llama-architecture model, optionally with
//! an adapter, on a text or `.jsonl` file.

use std::fmt::Write as _;

use anyhow::{Context, bail};
use candle_peft::tasks::TaskOptions;

use crate::cli::args::EvalArgs;
use crate::cli::load::causal_task;
use crate::cli::output::{lm_eval_json, print_stdout};

/// `eval --task causal-lm`: perplexity of the model (plus `--adapter`) on `--data`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    for (flag, v) in [("--batch", args.batch), ("--seq", args.seq)] {
        if v == 0 {
            bail!("{flag} must be at least 1 (got 0)");
        }
    }
    let opts = TaskOptions {
        seq_len: args.seq,
        seed: args.seed,
        base_dtype: args.base_dtype,
        device: args.device.open()?,
        eval_batch: Some(args.batch),
    };
    let task = causal_task(&args.model, args.adapter.as_deref(), opts)?;
    let data = if args.chat_template {
        let template = task.chat_template().context("--chat-template")?;
        task.read_chat_examples(&args.data, &template)
    } else {
        task.read_examples(&args.data, true)
    };
    let data = data.with_context(|| format!("reading --data {}", args.data.display()))?;
    let r = task.evaluate_lm(&data)?;
    if !r.loss.is_finite() {
        candle_peft::train::check_eval_loss(r.loss, &task.model().layer_weights()?)?;
    }
    let mut o = String::new();
    if args.json {
        writeln!(o, "{}", lm_eval_json(&r))?;
    } else {
        writeln!(
            o,
            "perplexity {:.3} over {} tokens, loss {:.4}",
            r.perplexity, r.tokens, r.loss
        )?;
    }
    print_stdout(&o)
}
