//! Two adapters on SmolLM2-135M-Instruct, PEFT's flow: train a LoRA, add a second adapter,
//! switch between them, disable them, merge and unmerge, each step checked on one prompt's logits.
//!
//! Run: `bash scripts/fetch-models.sh && cargo run --release --example causal_two_adapters`

use std::path::Path;

use anyhow::{Result, ensure};
use candle_core::Tensor;
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::tasks::{CausalLmTask, TaskOptions};
use candle_peft::{LoraConfig, TrainConfig, Trainer};

/// The largest |Δlogit| against the trained adapter of: the base model, the second adapter, the
/// merged and the unmerged model; and of the disabled model against the base.
#[derive(Debug)]
pub struct Outcome {
    pub base: f32,
    pub switched: f32,
    pub merged: f32,
    pub unmerged: f32,
    pub disabled_vs_base: f32,
}

/// Loads `model` (hub id, folder or GGUF), trains LoRA `shakespeare` for `steps` steps on the
/// text file `data`, then walks the adapter operations.
pub fn run(model: &str, data: &Path, steps: usize) -> Result<Outcome> {
    let opts = TaskOptions {
        seq_len: 64,
        ..TaskOptions::default()
    };
    let mut task = CausalLmTask::from_pretrained(model, opts)?;
    let prompt = [task.encode("ROMEO:\nBut soft, what light")?];
    let logits = |task: &CausalLmTask| task.logits(&prompt);
    let base = logits(&task)?;

    let lora = LoraConfig::new(&["q_proj", "v_proj"], 8, 16.0);
    task.add_adapter("shakespeare", lora)?;
    let train = task.read_examples(data, false)?;
    let config = TrainConfig {
        steps,
        batch_size: 2,
        lr: 2e-3,
        quiet: true,
        ..TrainConfig::default()
    };
    Trainer::new(config)?.run(&task, &train, None)?;
    let adapted = logits(&task)?;

    // A second adapter on the MLP, B drawn at random so that it changes the output.
    let mut other = LoraConfig::new(&["up_proj", "down_proj"], 4, 8.0);
    other.init_lora_weights = InitLoraWeights::Bool(false);
    task.add_adapter("other", other)?;
    task.model_mut().set_adapter("other")?;
    let switched = logits(&task)?;
    task.model_mut().set_adapter("shakespeare")?;

    task.model_mut().disable()?;
    let disabled = logits(&task)?;
    task.model_mut().enable()?;
    task.model_mut().merge()?;
    let merged = logits(&task)?;
    task.model_mut().unmerge()?;
    let diff =
        |a: &Tensor, b: &Tensor| -> Result<f32> { Ok((a - b)?.abs()?.max_all()?.to_scalar()?) };
    Ok(Outcome {
        base: diff(&base, &adapted)?,
        switched: diff(&switched, &adapted)?,
        merged: diff(&merged, &adapted)?,
        unmerged: diff(&logits(&task)?, &adapted)?,
        disabled_vs_base: diff(&disabled, &base)?,
    })
}

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let o = run(
        &model.to_string_lossy(),
        &root.join("data/shakespeare/train.txt"),
        30,
    )?;
    println!("{o:#?}");
    ensure!(o.merged < 1e-3 && o.unmerged < 1e-4 && o.disabled_vs_base < 1e-4);
    Ok(())
}
