//! `candle-peft convert <adapter dir> --to peft-lora --base <model> --out <dir>`: rewrites an
//! adapter as a plain PEFT LoRA that applies to the original base model. CorDA adapters become
//! rank-2r LoRAs (`[B, −B₀] [A; A₀]`, see `candle_peft::data_init::convert`); the base model's
//! weights are checked against every module's shape.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_peft::data_init::convert::convert_to_peft_lora;
use candle_peft::tasks::classify::LABELS_FILE;
use clap::Args;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The adapter directory to convert (adapter_config.json + adapter_model.safetensors).
    pub adapter: PathBuf,
    /// The target format: peft-lora.
    #[arg(long)]
    pub to: String,
    /// The base model the adapter was trained on (a folder or a .safetensors file).
    #[arg(long)]
    pub base: PathBuf,
    /// Output folder for the converted adapter.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    match args.to.to_ascii_lowercase().as_str() {
        "peft-lora" | "peft_lora" | "lora" => {}
        other => bail!("--to {other}: unknown target format (available: peft-lora)"),
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {} exists and is not a directory", args.out.display());
    }
    candle_peft::io::atomic::check_writable_dir(&args.out).context("--out")?;
    let report = convert_to_peft_lora(&args.adapter, &args.base, &args.out, &[LABELS_FILE])
        .with_context(|| format!("converting {} to a PEFT LoRA", args.adapter.display()))?;
    let mut o = String::new();
    writeln!(
        o,
        "converted {} CorDA modules to a rank-{} PEFT LoRA (lora_alpha {}){}",
        report.modules.len(),
        report.config.r,
        report.config.lora_alpha,
        if report.copied_tensors.is_empty() {
            String::new()
        } else {
            format!(" plus {} whole-module tensors", report.copied_tensors.len())
        }
    )?;
    writeln!(o, "adapter saved to {}", args.out.display())?;
    super::output::print_stdout(&o)
}
