//! `candle-peft train`: fine-tunes an adapter and writes `OUT/adapter/` and, with `--merge`,
//! `OUT/merged/`. `--task` picks the side: classification (`classify`) or causal LM (`causal`).
//!
//! `--steps 0` initialises the adapter (and the classifier) and saves it without training.
//! Progress goes to stderr; stdout carries the results (one JSON line with `--json`).

mod causal;
mod classify;

use super::args::{Task, TrainArgs};

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let task = args.task.parse::<Task>()?;
    let _out = super::args::prepare_output(&args)?;
    match task {
        Task::Classify => classify::run(args),
        Task::CausalLm => causal::run(args),
    }
}
