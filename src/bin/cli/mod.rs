//! Subcommands of the `candle-peft` binary. To add one: a module here with an `Args` struct
//! (clap derive) and a `run(args) -> anyhow::Result<()>`, a variant in [`Command`], and an arm
//! in [`run`].

pub mod bench;
mod bench_calib;
mod bench_llm;
mod bench_svd;
mod calibration;
pub mod causal;
pub mod convert;
pub mod eval;
pub mod inspect;
pub mod merge;
mod method_args;
pub mod train;

use clap::{Parser, Subcommand};

/// Parameter-efficient fine-tuning for candle, with Hugging Face PEFT's file format.
#[derive(Debug, Parser)]
#[command(name = "candle-peft", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune an adapter; write OUT/adapter/ and, with --merge, OUT/merged/.
    Train(Box<train::TrainArgs>),
    /// Evaluate a model (optionally with an adapter) on labelled data.
    Eval(eval::EvalArgs),
    /// Generate text from a prompt with a causal LM (optionally with an adapter).
    Generate(causal::GenerateArgs),
    /// Merge an adapter into a base model's weights and write a model folder (no model code).
    Merge(merge::MergeArgs),
    /// Show an adapter directory: method, targets, ranks, scaling, parameters and tensors.
    Inspect(inspect::InspectArgs),
    /// Convert an adapter to a plain PEFT LoRA on the original base (CorDA → rank-2r LoRA).
    Convert(convert::ConvertArgs),
    /// Run a fixed benchmark workload (DESIGN.md) and report ms/step and peak memory.
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => causal::generate(args),
        Command::Merge(args) => merge::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Writes a command's output to stdout; a closed pipe (`candle-peft inspect … | head`) is not an
/// error.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `--task`: what a model is trained or evaluated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Classify,
    CausalLm,
}

impl std::str::FromStr for Task {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "classify" | "classification" | "seq-cls" => Ok(Task::Classify),
            "causal-lm" | "causal_lm" | "clm" => Ok(Task::CausalLm),
            other => anyhow::bail!("unknown --task `{other}` (expected classify or causal-lm)"),
        }
    }
}
