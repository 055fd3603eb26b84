//! Subcommands of the `candle-peft` binary. To add one: a module here with an `Args` struct
//! (clap derive) and a `run(args) -> anyhow::Result<()>`, a variant in [`Command`], and an arm
//! in [`run`]. This file only dispatches: the flags `train` and `eval` share live in `args`,
//! output helpers in `output`, loading a causal LM with its `--adapter` in `load`, benchmark
//! measurement in `measure`, and no subcommand module imports another's.

mod args;
pub mod bench;
mod bench_calib;
mod bench_llm;
mod bench_minilm;
mod bench_svd;
mod calibration;
pub mod convert;
pub mod eval;
pub mod generate;
pub mod inspect;
mod load;
mod measure;
pub mod merge;
mod method_args;
mod output;
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
    Train(Box<args::TrainArgs>),
    /// Evaluate a model (optionally with an adapter) on labelled data.
    Eval(args::EvalArgs),
    /// Generate text from a prompt with a causal LM (optionally with an adapter).
    Generate(generate::GenerateArgs),
    /// Merge an adapter into a base model's weights and write a model folder, or with
    /// `--to gguf` a GGUF file (no model code).
    Merge(merge::MergeArgs),
    /// Show an adapter directory: method, targets, ranks, scaling, parameters and tensors.
    Inspect(inspect::InspectArgs),
    /// Convert an adapter to a plain PEFT LoRA on the original base (CorDA → rank-2r LoRA).
    Convert(convert::ConvertArgs),
    /// Run a fixed benchmark workload (model, sizes and seeds fixed) and report ms/step and peak
    /// memory.
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let base_dtype = match &cli.command {
        Command::Train(a) => Some(a.base_dtype),
        Command::Eval(a) => Some(a.base_dtype),
        Command::Generate(a) => Some(a.base_dtype),
        Command::Bench(a) => Some(a.base_dtype),
        _ => None,
    };
    if let Some(note) = base_dtype.and_then(|d| d.cpu_fallback_note()) {
        eprintln!("note: {note}");
    }
    match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
