//! `candle-peft generate --model <hub id|dir|gguf> [--adapter DIR] --prompt TEXT [--chat]`:
//! text from a causal LM, greedy or sampled; `--chat` asks the prompt as a user turn through the
//! model's own chat template.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_peft::BaseDType;
use candle_peft::chat::ChatTemplate;
use candle_peft::generate::GenerationConfig;
use candle_peft::io::source;
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
    /// The prompt: used as given (after the tokenizer's BOS, when it adds one), or with --chat
    /// as a user turn.
    #[arg(long)]
    pub prompt: String,
    /// Render --prompt with the model's chat template (GGUF `tokenizer.chat_template`, or the
    /// folder's chat_template.jinja / tokenizer_config.json) as a user turn followed by the
    /// assistant turn's opening, tokenized without extra special tokens. A model without a
    /// template is an error.
    #[arg(long)]
    pub chat: bool,
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
    /// Print one JSON line: {"prompt", "text", "model", "prompt_ids", "ids"} (the token ids fed
    /// to the model and the generated ones; a stop token is not included).
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
    // The template is looked up before the model loads: a model without one fails at once.
    let template = if args.chat {
        let src = source::resolve(&args.model)
            .with_context(|| format!("resolving --model {}", args.model))?;
        Some(ChatTemplate::for_source(&src).context("--chat")?)
    } else {
        None
    };
    let task = causal_task(&args.model, args.adapter.as_deref(), opts)?;
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_tokens: task.eos_token_ids().to_vec(),
    };
    let (shown_prompt, prompt_ids) = if let Some(template) = &template {
        let rendered = template.render_prompt(&args.prompt)?;
        let ids = task.encode(&rendered)?;
        (rendered, ids)
    } else {
        (args.prompt.clone(), task.prompt_ids(&args.prompt)?)
    };
    let ids = task.generate_ids(&prompt_ids, &config)?;
    let text = task.decode(&ids)?;
    let mut o = String::new();
    if args.json {
        writeln!(
            o,
            "{}",
            json!({
                "prompt": args.prompt,
                "text": text,
                "model": args.model,
                "prompt_ids": prompt_ids,
                "ids": ids,
            })
        )?;
    } else {
        writeln!(o, "{shown_prompt}{text}")?;
    }
    print_stdout(&o)
}
