//! `candle-peft train`: fine-tunes an adapter and writes `OUT/adapter/` and, with `--merge`,
//! `OUT/merged/`. `--task` picks the side: classification (`classify`) or causal LM (`causal`).
//!
//! `--steps 0` initialises the adapter (and the classifier) and saves it without training.
//! Progress goes to stderr; stdout carries the results (one JSON line with `--json`).

mod causal;
mod classify;
mod ranks;

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::args::{Task, TrainArgs};

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let task = args.task.parse::<Task>()?;
    ranks::check(&args)?;
    // The ranks a data-parallel run starts leave --out to rank 0.
    let _out = match args.world_rank {
        Some(r) if r > 0 => None,
        _ => Some(super::args::prepare_output(&args)?),
    };
    let (plan, launched) = ranks::launch(&args)?;
    match task {
        Task::Classify => classify::run(args, plan.as_ref())?,
        Task::CausalLm => causal::run(args, plan.as_ref())?,
    }
    match launched {
        Some(l) => l.finish(),
        None => Ok(()),
    }
}

/// Optimiser steps of the run: `--steps`, else one pass over `examples` in steps of `--batch` ×
/// `--grad-accum`; with that step size.
fn steps(args: &TrainArgs, examples: usize) -> (usize, usize) {
    let per_step = args.batch * args.grad_accum;
    (
        args.steps.unwrap_or_else(|| examples.div_ceil(per_step)),
        per_step,
    )
}

/// Saves the trained adapter to `OUT/adapter` with `save`; its folder.
fn save_adapter(
    args: &TrainArgs,
    save: impl FnOnce(&Path) -> candle_peft::Result<()>,
) -> anyhow::Result<PathBuf> {
    let dir = args.out.join("adapter");
    save(&dir).with_context(|| format!("saving the adapter to {}", dir.display()))?;
    Ok(dir)
}

/// With `--merge`, writes the merged model to `OUT/merged` with `export`; its folder.
fn export_merged(
    args: &TrainArgs,
    export: impl FnOnce(&Path) -> candle_peft::Result<()>,
) -> anyhow::Result<Option<PathBuf>> {
    if !args.merge {
        return Ok(None);
    }
    let dir = args.out.join("merged");
    export(&dir).with_context(|| format!("writing the merged model to {}", dir.display()))?;
    Ok(Some(dir))
}
