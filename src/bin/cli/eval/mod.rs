//! `candle-peft eval --model <hub id|dir> [--adapter DIR] --data FILE [--task classify|causal-lm]
//! [--json]`: a model's figures on labelled data, accuracy for a classifier, perplexity for a
//! causal LM.

mod causal;
mod classify;

use super::args::{EvalArgs, Task};

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    args.check_outputs()?;
    match args.task.parse::<Task>()? {
        Task::Classify => classify::run(args),
        Task::CausalLm => causal::run(args),
    }
}
