//! Subcommands of the `candle-peft` binary. To add one: a module here with an `Args` struct
//! (clap derive) and a `run(args) -> anyhow::Result<()>`, a variant in [`Command`], and an arm
//! in [`run`].

pub mod inspect;
pub mod merge;

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
    /// Merge an adapter into a base model's weights and write a model folder (no model code).
    Merge(merge::MergeArgs),
    /// Show an adapter directory: method, targets, ranks, scaling, parameters and tensors.
    Inspect(inspect::InspectArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Merge(args) => merge::run(args),
        Command::Inspect(args) => inspect::run(args),
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
