//! `candle-peft generate --model <hub id|dir|gguf> [--adapter DIR] --prompt TEXT`: text from a
//! causal LM, greedy or sampled.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::bail;
use candle_peft::BaseDType;
use candle_peft::generate::GenerationConfig;
use candle_peft::tasks::TaskOptions;
use clap::Args;
use serde_json::json;

use super::load::causal_task;
use super::output::print_stdout;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a hub id, a local HF folder or a .gguf file.
    #[arg(long)]
    pub model: String,
    /// An adapter folder (PEFT format) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The type the base model's frozen linear weights are kept in: f32 (default), f16, bf16,
    /// q8_0 or q4_k (quantised at load, QLoRA-style), or gguf (a GGUF file's own types).
    /// Adapters, gradients and activations stay f32.
    #[arg(long = "base-dtype", default_value = "f32", value_parser = super::args::parse_base_dtype)]
    pub base_dtype: BaseDType,
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
    /// Print one JSON line: {"prompt", "text", "model"}.
    #[arg(long)]
    pub json: bool,
}

/// `generate`: prints the prompt followed by the generated text.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature must be ≥ 0 (got {})", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1] (got {})", args.top_p);
    }
    // Generation is not cut to a sequence length: the shortest valid one keeps any model's
    // context long enough.
    let opts = TaskOptions {
        seq_len: 2,
        seed: args.seed,
        base_dtype: args.base_dtype,
        ..TaskOptions::default()
    };
    let task = causal_task(&args.model, args.adapter.as_deref(), opts)?;
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
    print_stdout(&o)
}
