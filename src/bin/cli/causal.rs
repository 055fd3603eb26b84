//! The causal-LM side of the CLI: `train --task causal-lm`, `eval --task causal-lm` and
//! `generate`.
//!
//! Training data is a text file (packed into sequences of `--seq` tokens) or a `.jsonl` file of
//! `{"prompt", "response"}` pairs (loss on the response only). `--merge` writes `OUT/merged/`, an
//! HF Llama folder (config.json, model.safetensors, tokenizer.json) that `eval`, `generate`,
//! candle-transformers and transformers load, also when the base came from a GGUF file.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use candle_peft::generate::GenerationConfig;
use candle_peft::io::source;
use candle_peft::models::llama::LlamaForCausalLM;
use candle_peft::tasks::causal_lm::{CausalLmTask, LmEval, TASK_TYPE};
use candle_peft::{DEFAULT_ADAPTER, Trainer};
use clap::Args;
use serde_json::json;

use super::eval::EvalArgs;
use super::train::{TrainArgs, adapter_config, check_args, check_method, train_config};

/// The seven projections of a Llama block: the default `--targets` for causal-LM.
pub const LLAMA_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn eval_json(r: &LmEval) -> serde_json::Value {
    json!({ "perplexity": r.perplexity, "loss": r.loss, "tokens": r.tokens })
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let method = check_method(&args.method)?;
    check_args(&args)?;
    let mut config = adapter_config(&args, method, LLAMA_TARGETS)?;
    config
        .inner_mut()
        .set_task_type(Some(TASK_TYPE.to_string()));
    let model_source = source::resolve(&args.model)
        .with_context(|| format!("resolving --model {}", args.model))?;
    let device = Device::Cpu;
    let mut task = CausalLmTask::from_source(&model_source, args.seq, args.seed, &device)
        .with_context(|| format!("loading {}", args.model))?;
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
    super::calibration::add_causal_adapter(&mut task, config, method, &args, &train)?;
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
    task.model()
        .save_adapter(DEFAULT_ADAPTER, &adapter_dir)
        .with_context(|| format!("saving the adapter to {}", adapter_dir.display()))?;
    let final_eval = match &eval {
        Some(data) => Some(task.evaluate_lm(data)?),
        None => None,
    };
    let merged_dir = if args.merge {
        let dir = args.out.join("merged");
        LlamaForCausalLM::export_merged(task.into_model(), &model_source, &dir, DType::F32)
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
            "eval": final_eval.as_ref().map(eval_json),
            "train_sequences": train.len(),
            "trainable_parameters": trainable,
            "adapter": adapter_dir,
            "merged": merged_dir,
            "seconds": report.seconds,
        });
        writeln!(o, "{value}")?;
    } else {
        match final_loss {
            Some(l) => writeln!(
                o,
                "trained {} steps in {:.1}s, final loss {l:.4}",
                report.global_step - report.start_step,
                report.seconds
            )?,
            None => writeln!(o, "initialised without training (--steps 0)")?,
        }
        if let Some(r) = &final_eval {
            writeln!(
                o,
                "eval: perplexity {:.3} over {} tokens, loss {:.4}",
                r.perplexity, r.tokens, r.loss
            )?;
        }
        writeln!(o, "adapter saved to {}", adapter_dir.display())?;
        if let Some(d) = &merged_dir {
            writeln!(o, "merged model written to {}", d.display())?;
        }
    }
    super::print_stdout(&o)
}

/// `eval --task causal-lm`: perplexity of the model (plus `--adapter`) on `--data`.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    for (flag, v) in [("--batch", args.batch), ("--seq", args.seq)] {
        if v == 0 {
            bail!("{flag} must be at least 1 (got 0)");
        }
    }
    let model_source = source::resolve(&args.model)
        .with_context(|| format!("resolving --model {}", args.model))?;
    let device = Device::Cpu;
    let mut task = CausalLmTask::from_source(&model_source, args.seq, args.seed, &device)
        .with_context(|| format!("loading {}", args.model))?
        .with_eval_batch(args.batch);
    if let Some(dir) = &args.adapter {
        if !dir.is_dir() {
            bail!("--adapter {} is not a folder", dir.display());
        }
        task.load_adapter(dir, DEFAULT_ADAPTER)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
    }
    let data = task
        .read_examples(&args.data, true)
        .with_context(|| format!("reading --data {}", args.data.display()))?;
    let r = task.evaluate_lm(&data)?;
    let mut o = String::new();
    if args.json {
        writeln!(o, "{}", eval_json(&r))?;
    } else {
        writeln!(
            o,
            "perplexity {:.3} over {} tokens, loss {:.4}",
            r.perplexity, r.tokens, r.loss
        )?;
    }
    super::print_stdout(&o)
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a hub id, a local HF folder or a .gguf file.
    #[arg(long)]
    pub model: String,
    /// An adapter folder (PEFT format) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt, used as given (no chat template).
    #[arg(long)]
    pub prompt: String,
    #[arg(long = "max-new-tokens", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long = "top-p", default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON line: {"prompt", "text", "tokens"}.
    #[arg(long)]
    pub json: bool,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature must be ≥ 0 (got {})", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1] (got {})", args.top_p);
    }
    let model_source = source::resolve(&args.model)
        .with_context(|| format!("resolving --model {}", args.model))?;
    let device = Device::Cpu;
    let mut task = CausalLmTask::from_source(&model_source, 2, args.seed, &device)
        .with_context(|| format!("loading {}", args.model))?;
    if let Some(dir) = &args.adapter {
        if !dir.is_dir() {
            bail!("--adapter {} is not a folder", dir.display());
        }
        task.load_adapter(dir, DEFAULT_ADAPTER)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
    }
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_tokens: task.eos_token_ids().to_vec(),
    };
    let text = task.generate_text(&args.prompt, &config)?;
    let mut o = String::new();
    if args.json {
        writeln!(
            o,
            "{}",
            json!({ "prompt": args.prompt, "text": text, "model": args.model })
        )?;
    } else {
        writeln!(o, "{}{}", args.prompt, text)?;
    }
    super::print_stdout(&o)
}
