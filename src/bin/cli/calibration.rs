//! The adapter-init step of `train`: EVA and CorDA initialise from calibration batches (from
//! `--calib-data`, or by default the training data: the first `--calib-batches` batches of
//! `--batch` examples, `--seq` tokens at most) through the tasks' `add_eva_adapter` /
//! `add_corda_adapter`, every other method from its seeded draw.

use std::path::Path;

use anyhow::{Context, bail};
use candle_peft::adapters::{corda, eva};
use candle_peft::data::{LabeledText, read_tsv};
use candle_peft::data_init::CalibrationOptions;
use candle_peft::data_init::corda::CordaOptions;
use candle_peft::data_init::eva::EvaOptions;
use candle_peft::tasks::calibrated::{CalibrationReport, CordaInitOptions, EvaInitOptions};
use candle_peft::tasks::causal_lm::{CausalLmTask, LmExample};
use candle_peft::tasks::classify::ClassifyTask;
use candle_peft::{AdapterConfig, DEFAULT_ADAPTER, Method};

use super::args::TrainArgs;

/// The calibration flags make sense with EVA and CorDA only; `--corda-mode` with CorDA only.
fn check_flags(args: &TrainArgs, method: Method) -> anyhow::Result<()> {
    if args.corda_mode.is_some() && method != corda::METHOD {
        bail!("--corda-mode is a CorDA option (use it with --method corda)");
    }
    if !method.needs_calibration() && args.calib_data.is_some() {
        bail!("--calib-data is used by --method eva and corda only");
    }
    if args.calib_batches == 0 {
        bail!("--calib-batches must be at least 1 (got 0)");
    }
    Ok(())
}

/// How the adapter starts: from its seeded draw, or from EVA's or CorDA's calibration with the
/// settings of the flags.
enum Init {
    Plain(AdapterConfig),
    Eva(candle_peft::LoraConfig, EvaInitOptions),
    Corda(corda::CordaConfig, CordaInitOptions),
}

/// The init `method` asks for; EVA and CorDA need the config type they initialise.
fn init(method: Method, config: AdapterConfig, args: &TrainArgs) -> anyhow::Result<Init> {
    check_flags(args, method)?;
    let calibration = CalibrationOptions { quiet: args.quiet };
    Ok(match (method, config) {
        (m, AdapterConfig::Lora(c)) if m == eva::METHOD => {
            let options = EvaInitOptions {
                batch_size: args.batch,
                max_batches: args.calib_batches,
                eva_config: None,
                pass: EvaOptions {
                    calibration,
                    ..EvaOptions::default()
                },
            };
            Init::Eva(c, options)
        }
        (m, other) if m == eva::METHOD => bail!(
            "--method eva initialises a LoRA adapter, but the config is {} (peft_type {})",
            other.method(),
            other.method().peft_type()
        ),
        (m, AdapterConfig::Corda(c)) if m == corda::METHOD => {
            let corda_method = match &args.corda_mode {
                Some(mode) => Some(mode.parse().context("--corda-mode")?),
                None => None,
            };
            let options = CordaInitOptions {
                batch_size: args.batch,
                max_batches: args.calib_batches,
                corda_method,
                pass: CordaOptions { calibration },
            };
            Init::Corda(c, options)
        }
        (m, other) if m == corda::METHOD => bail!(
            "--method corda needs a CORDA config, but the config is {} (peft_type {})",
            other.method(),
            other.method().peft_type()
        ),
        (_, config) => Init::Plain(config),
    })
}

/// One line on stderr about the calibration (unless `--quiet`).
fn print_report(args: &TrainArgs, report: &CalibrationReport, eva: bool) {
    if args.quiet {
        return;
    }
    let ranks = &report.ranks;
    if eva {
        let kept = ranks.values().filter(|&&r| r > 0).count();
        eprintln!(
            "EVA: {} calibration batches; {kept} of {} layers adapted, ranks {}..={}",
            report.forward_passes,
            ranks.len(),
            ranks.values().min().copied().unwrap_or(0),
            ranks.values().max().copied().unwrap_or(0),
        );
    } else {
        eprintln!(
            "CorDA: {} calibration batches, {} layers decomposed",
            report.batches,
            ranks.len()
        );
    }
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
    let (report, eva) = match init(method, config, args)? {
        Init::Plain(config) => return Ok(task.add_adapter(DEFAULT_ADAPTER, config)?),
        Init::Eva(c, options) => {
            let texts = calibration_texts(args, train)?;
            let report = task
                .add_eva_adapter(DEFAULT_ADAPTER, c, &texts, &options)
                .context("EVA initialisation")?;
            (report, true)
        }
        Init::Corda(c, options) => {
            let texts = calibration_texts(args, train)?;
            let report = task
                .add_corda_adapter(DEFAULT_ADAPTER, c, &texts, &options)
                .context("CorDA initialisation")?;
            (report, false)
        }
    };
    print_report(args, &report, eva);
    Ok(())
}

/// `train --task causal-lm`: the adapter on the Llama-family model. Calibration uses
/// `--calib-data` (text or prompt/response JSONL, read as `--data` is) or the training examples.
pub fn add_causal_adapter(
    task: &mut CausalLmTask,
    config: AdapterConfig,
    method: Method,
    args: &TrainArgs,
    train: &[LmExample],
) -> anyhow::Result<()> {
    let init = init(method, config, args)?;
    let calib: Option<Vec<LmExample>> = match (&args.calib_data, &init) {
        (_, Init::Plain(_)) | (None, _) => None,
        (Some(path), _) => Some(read_lm(task, path, args.chat_template)?),
    };
    let examples = calib.as_deref().unwrap_or(train);
    let (report, eva) = match init {
        Init::Plain(config) => return Ok(task.add_adapter(DEFAULT_ADAPTER, config)?),
        Init::Eva(c, options) => {
            let report = task
                .add_eva_adapter_from_examples(DEFAULT_ADAPTER, c, examples, &options)
                .context("EVA initialisation")?;
            (report, true)
        }
        Init::Corda(c, options) => {
            let report = task
                .add_corda_adapter_from_examples(DEFAULT_ADAPTER, c, examples, &options)
                .context("CorDA initialisation")?;
            (report, false)
        }
    };
    print_report(args, &report, eva);
    Ok(())
}

/// Calibration examples, rendered with the model's chat template as the training data is under
/// `--chat-template`.
fn read_lm(task: &CausalLmTask, path: &Path, chat: bool) -> anyhow::Result<Vec<LmExample>> {
    let examples = if chat {
        let template = task.chat_template().context("--chat-template")?;
        task.read_chat_examples(path, &template)
    } else {
        task.read_examples(path, true)
    };
    examples.with_context(|| format!("reading --calib-data {}", path.display()))
}
