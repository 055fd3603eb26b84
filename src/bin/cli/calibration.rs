//! The adapter-init step of `train`: EVA and CorDA initialise from calibration batches (from
//! `--calib-data`, or by default the training data: the first `--calib-batches` batches of
//! `--batch` examples, `--seq` tokens at most), every other method from its seeded draw.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::Tensor;
use candle_peft::adapters::eva::EvaConfig;
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::data::{LabeledText, pad_batch, pad_id, read_tsv};
use candle_peft::data_init::corda::{self, CordaOptions};
use candle_peft::data_init::eva::{self, EvaOptions};
use candle_peft::data_init::{CalibrationBatch, CalibrationOptions, text_batches};
use candle_peft::tasks::causal_lm::{CausalLmTask, LmExample};
use candle_peft::tasks::classify::ClassifyTask;
use candle_peft::{AdapterConfig, DEFAULT_ADAPTER, Method, PeftModel};

use super::args::TrainArgs;

fn calibrated(method: Method) -> bool {
    method.needs_calibration()
}

/// The calibration flags make sense with EVA and CorDA only; `--corda-mode` with CorDA only.
fn check_flags(args: &TrainArgs, method: Method) -> anyhow::Result<()> {
    if args.corda_mode.is_some() && method != candle_peft::adapters::corda::METHOD {
        bail!("--corda-mode is a CorDA option (use it with --method corda)");
    }
    if !calibrated(method) && args.calib_data.is_some() {
        bail!("--calib-data is used by --method eva and corda only");
    }
    if args.calib_batches == 0 {
        bail!("--calib-batches must be at least 1 (got 0)");
    }
    Ok(())
}

/// Adds the adapter to `model`: EVA and CorDA after a calibration pass over `batches()` with
/// `forward`, other methods directly.
fn add_adapter<M>(
    model: &mut PeftModel<M>,
    config: AdapterConfig,
    method: Method,
    args: &TrainArgs,
    batches: impl FnOnce() -> anyhow::Result<Vec<CalibrationBatch>>,
    forward: impl FnMut(&M, &CalibrationBatch) -> candle_peft::Result<()>,
) -> anyhow::Result<()> {
    check_flags(args, method)?;
    let calibration = CalibrationOptions { quiet: args.quiet };
    match (method, config) {
        (m, AdapterConfig::Lora(mut c)) if m == candle_peft::adapters::eva::METHOD => {
            c.init_lora_weights = InitLoraWeights::Named("eva".into());
            if c.eva_config.is_none() {
                c.eva_config = Some(EvaConfig::default());
            }
            let batches = batches()?;
            let options = EvaOptions {
                calibration,
                ..EvaOptions::default()
            };
            let report =
                eva::add_eva_adapter(model, DEFAULT_ADAPTER, c, &batches, forward, &options)
                    .context("EVA initialisation")?;
            if !args.quiet {
                let ranks = report.state.ranks();
                let kept = ranks.values().filter(|&&r| r > 0).count();
                eprintln!(
                    "EVA: {} calibration batches; {kept} of {} layers adapted, ranks {}..={}",
                    report.state.iterations,
                    ranks.len(),
                    ranks.values().min().copied().unwrap_or(0),
                    ranks.values().max().copied().unwrap_or(0),
                );
            }
        }
        (m, other) if m == candle_peft::adapters::eva::METHOD => bail!(
            "--method eva initialises a LoRA adapter, but the config is {} (peft_type {})",
            other.method(),
            other.method().peft_type()
        ),
        (m, AdapterConfig::Corda(mut c)) if m == candle_peft::adapters::corda::METHOD => {
            if let Some(mode) = &args.corda_mode {
                c.corda_method = mode.parse().context("--corda-mode")?;
            }
            let batches = batches()?;
            let options = CordaOptions { calibration };
            let state =
                corda::add_corda_adapter(model, DEFAULT_ADAPTER, c, &batches, forward, &options)
                    .context("CorDA initialisation")?;
            if !args.quiet {
                eprintln!(
                    "CorDA: {} calibration batches, {} layers decomposed",
                    batches.len(),
                    state.factors.len()
                );
            }
        }
        (m, other) if m == candle_peft::adapters::corda::METHOD => bail!(
            "--method corda needs a CORDA config, but the config is {} (peft_type {})",
            other.method(),
            other.method().peft_type()
        ),
        (_, config) => model.add_adapter(DEFAULT_ADAPTER, config)?,
    }
    Ok(())
}

/// The texts of `--calib-data` (a TSV like `--data`; labels are ignored), or of `train`.
fn calibration_texts(args: &TrainArgs, train: &[LabeledText]) -> anyhow::Result<Vec<String>> {
    match &args.calib_data {
        Some(path) => Ok(read_tsv(path)
            .with_context(|| format!("reading --calib-data {}", path.display()))?
            .examples
            .into_iter()
            .map(|e| e.text)
            .collect()),
        None => Ok(train.iter().map(|e| e.text.clone()).collect()),
    }
}

/// `train --task classify`: the adapter on the classification model.
pub fn add_classify_adapter(
    task: &mut ClassifyTask,
    config: AdapterConfig,
    method: Method,
    args: &TrainArgs,
    train: &[LabeledText],
) -> anyhow::Result<()> {
    let tokenizer = task.tokenizer().clone();
    let device = task.device().clone();
    let seq = task.max_len();
    let batches = || -> anyhow::Result<Vec<CalibrationBatch>> {
        let texts = calibration_texts(args, train)?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        Ok(text_batches(
            &tokenizer,
            &refs,
            args.batch,
            args.calib_batches,
            seq,
            &device,
        )?)
    };
    add_adapter(task.model_mut(), config, method, args, batches, |m, b| {
        m.forward(&b.input_ids, &b.attention_mask).map(|_| ())
    })
}

/// Padded batches of `examples`; with `label_mask`, only positions from `loss_from` on count
/// (PEFT's EVA label mask: prompt tokens have label −100).
fn lm_batches(
    task: &CausalLmTask,
    examples: &[LmExample],
    batch: usize,
    max_batches: usize,
    label_mask: bool,
) -> anyhow::Result<Vec<CalibrationBatch>> {
    let device = task
        .model()
        .layers()
        .first()
        .map(|l| l.weight().device().clone());
    let device = device.unwrap_or(candle_core::Device::Cpu);
    let pad = pad_id(task.tokenizer());
    let mut out = Vec::new();
    for chunk in examples.chunks(batch.max(1)).take(max_batches) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|e| e.ids.clone()).collect();
        let b = pad_batch(&seqs, pad, &device)?;
        let mut calib = CalibrationBatch::new(b.input_ids, b.attention_mask);
        if label_mask {
            let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
            let mut mask = vec![0u32; chunk.len() * t];
            for (i, e) in chunk.iter().enumerate() {
                for pos in e.loss_from..e.ids.len() {
                    mask[i * t + pos] = 1;
                }
            }
            calib = calib.with_token_mask(Tensor::from_vec(mask, (chunk.len(), t), &device)?);
        }
        out.push(calib);
    }
    if out.is_empty() {
        bail!("the calibration data has no sequences");
    }
    Ok(out)
}

/// `train --task causal-lm`: the adapter on the Llama-family model.
pub fn add_causal_adapter(
    task: &mut CausalLmTask,
    config: AdapterConfig,
    method: Method,
    args: &TrainArgs,
    train: &[LmExample],
) -> anyhow::Result<()> {
    let label_mask = match &config {
        AdapterConfig::Lora(c) => c.eva_config.as_ref().is_none_or(|e| e.use_label_mask),
        _ => false,
    };
    let calib: Option<Vec<LmExample>> = match &args.calib_data {
        Some(path) if calibrated(method) => Some(read_lm(task, path)?),
        _ => None,
    };
    let examples = calib.as_deref().unwrap_or(train).to_vec();
    let built = if calibrated(method) {
        lm_batches(task, &examples, args.batch, args.calib_batches, label_mask)
    } else {
        Ok(Vec::new())
    };
    add_adapter(
        task.model_mut(),
        config,
        method,
        args,
        || built,
        |m, b| {
            m.forward_hidden(&b.input_ids, Some(&b.attention_mask))
                .map(|_| ())
        },
    )
}

fn read_lm(task: &CausalLmTask, path: &Path) -> anyhow::Result<Vec<LmExample>> {
    task.read_examples(path, true)
        .with_context(|| format!("reading --calib-data {}", path.display()))
}
