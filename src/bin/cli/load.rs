//! Loading what `eval` and `generate` run: the causal-LM task with an optional `--adapter`.

use std::path::Path;

use anyhow::{Context, bail};
use candle_peft::DEFAULT_ADAPTER;
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::causal_lm::CausalLmTask;

/// `--adapter` must be a folder (checked before any loading).
pub fn check_adapter_dir(adapter: Option<&Path>) -> anyhow::Result<()> {
    match adapter {
        Some(dir) if !dir.is_dir() => bail!("--adapter {} is not a folder", dir.display()),
        _ => Ok(()),
    }
}

/// `--model` as a causal-LM task with `opts`, plus `--adapter` (as the default adapter) when
/// given.
pub fn causal_task(
    model: &str,
    adapter: Option<&Path>,
    opts: TaskOptions,
) -> anyhow::Result<CausalLmTask> {
    check_adapter_dir(adapter)?;
    let mut task = CausalLmTask::from_pretrained(model, opts)
        .with_context(|| format!("loading --model {model}"))?;
    if let Some(dir) = adapter {
        task.load_adapter(dir, DEFAULT_ADAPTER)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
    }
    Ok(task)
}
