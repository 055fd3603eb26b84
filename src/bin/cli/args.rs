//! The flags of `train` and `eval` and the checks and settings derived from them, shared by the
//! classification and causal-LM sides of both commands (and by the calibration step of `train`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::Device;
use candle_peft::io::atomic::check_writable_file;
use candle_peft::optim::LoraProMode;
use candle_peft::train::{OptimizerKind, OutputLock, prepare_output_dir};
use candle_peft::{AdapterConfig, BaseDType, Method, Schedule, TrainConfig, Warmup};
use clap::Args;
use serde_json::Value;

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

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base model: a hub id (org/name, looked up in the HF cache first) or a local folder.
    #[arg(long)]
    pub model: String,
    /// The type the base model's frozen linear weights are kept in: f32 (default), f16, bf16,
    /// q8_0 or q4_k (quantised at load, QLoRA-style), or gguf (a GGUF file's own types).
    /// Adapters, gradients and activations stay f32.
    #[arg(long = "base-dtype", default_value = "f32", value_parser = parse_base_dtype)]
    pub base_dtype: BaseDType,
    /// Where the model runs: cpu (default), cuda (the first GPU) or cuda:N. cuda needs a
    /// binary built with `--features cuda`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Data-parallel training over NCCL on this many GPUs, one process each (rank r on
    /// cuda:N+r for --device cuda:N): every step covers --batch × --grad-accum examples per GPU,
    /// the adapter gradients are summed across GPUs, and only the first process writes --out.
    /// 1 runs the same path on one GPU. Needs a binary built with `--features nccl`.
    #[arg(long = "world-size")]
    pub world_size: Option<usize>,
    /// The rank of a process that --world-size started (its launcher sets it).
    #[arg(long = "world-rank", hide = true)]
    pub world_rank: Option<usize>,
    /// What to train: classify or causal-lm.
    #[arg(long)]
    pub task: String,
    /// Training data: for classify a TSV of `label<TAB>text` lines (a header line is detected
    /// and skipped); for causal-lm a text file (packed into --seq-token sequences) or a .jsonl
    /// file of {"prompt", "response"} lines (loss on the response only).
    #[arg(long)]
    pub data: PathBuf,
    /// causal-lm: read --data (and --eval-data) as {"prompt", "response"} JSONL and render each
    /// pair with the model's chat template as a user turn and an assistant turn; the loss covers
    /// the assistant's part only. A model without a template is an error.
    #[arg(long = "chat-template")]
    pub chat_template: bool,
    /// Adapter method (`--help` lists every registered method with its `--opt` options).
    #[arg(long, long_help = crate::cli::method_args::methods_help())]
    pub method: String,
    /// Output folder: DIR/adapter/ and, with --merge, DIR/merged/.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write merged weights to DIR/merged/.
    #[arg(long)]
    pub merge: bool,
    /// Modules to adapt, comma-separated names or suffixes, or `all-linear` [default:
    /// query,value for classify; q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj for
    /// causal-lm].
    #[arg(long, value_delimiter = ',', conflicts_with = "config")]
    pub targets: Option<Vec<String>>,
    /// The method's rank (LoRA and LoLDU r [8], RandLoRA r [32], SVFit r [from energy],
    /// SALT r_lora [8], FLoRA r per mode).
    #[arg(long, conflicts_with = "config")]
    pub rank: Option<usize>,
    /// LoRA-family alpha (scaling alpha/r) [default: 16; RandLoRA 20·r]; FLoRA's scale.
    #[arg(long, conflicts_with = "config")]
    pub alpha: Option<f64>,
    /// Dropout on the adapter's input [default: 0].
    #[arg(long, conflicts_with = "config")]
    pub dropout: Option<f64>,
    /// A method option, `key=value` (repeatable), e.g. `--opt use_rslora=true`.
    #[arg(long, value_name = "KEY=VALUE", conflicts_with = "config")]
    pub opt: Vec<String>,
    /// A PEFT adapter_config.json (or a folder holding one) to use instead of --rank, --alpha,
    /// --targets and --dropout.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Optimiser steps [default: one pass over the data].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Micro-batches per optimiser step.
    #[arg(long = "grad-accum", default_value_t = 1)]
    pub grad_accum: usize,
    /// Maximum tokens per example (special tokens included); batches are padded only to their
    /// longest example.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Weight decay λ [default: 0.01; 0 with --method lora-pro, as the LoRA-Pro paper's runs].
    /// Trainables that start at a value of the base weight (SVFit's σ', LoLDU's z, SALT's scale,
    /// CorDA's A and B) are never decayed. LoRA-Pro decays A and B each, as its reference does
    /// (A ← A·(1 − lr·λ) − lr·Δ_A), so B·A, the weight's change, decays at about 2·lr·λ.
    #[arg(long = "weight-decay")]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule: constant, linear or cosine.
    #[arg(long, default_value = "linear", value_parser = parse_schedule)]
    pub schedule: Schedule,
    /// Warmup: a step count (100) or a fraction of the steps (0.1).
    #[arg(long, default_value = "0.1", value_parser = parse_warmup)]
    pub warmup: Warmup,
    /// Clip the global gradient norm to this (0 or `none`: no clipping).
    #[arg(long = "max-grad-norm", default_value = "1.0", value_parser = parse_max_grad_norm)]
    pub max_grad_norm: MaxGradNorm,
    /// LoRA-Pro's variant (--method lora-pro): full (the paper's; keeps two f32 moments of each
    /// adapted weight's full size) or efficient (AdamW on the adjusted gradients; LoRA's memory).
    #[arg(long = "lora-pro-mode", value_parser = parse_lora_pro_mode)]
    pub lora_pro_mode: Option<LoraProMode>,
    /// Seeds the data order, the adapter and classifier initialisation and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Validation data (a TSV like --data), evaluated after training and with --eval-every.
    #[arg(long = "eval-data")]
    pub eval_data: Option<PathBuf>,
    /// Evaluate on --eval-data every N steps.
    #[arg(long = "eval-every")]
    pub eval_every: Option<usize>,
    /// Write DIR/checkpoint-<step>/ every N steps (and after the last step).
    #[arg(long = "checkpoint-every")]
    pub checkpoint_every: Option<usize>,
    /// Resume from a checkpoint folder, or from the latest checkpoint in a folder (default:
    /// --out). The checkpoint must belong to this run: same task, model, method and adapter
    /// settings, data file, seed and batching.
    #[arg(long, num_args = 0..=1, value_name = "DIR")]
    pub resume: Option<Option<PathBuf>>,
    /// Start afresh in an --out folder that holds another run's checkpoints, removing them
    /// (without it such a folder is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// EVA / CorDA: calibration data, in --data's format [default: the training data].
    #[arg(long = "calib-data")]
    pub calib_data: Option<PathBuf>,
    /// EVA / CorDA: calibration batches of --batch examples (EVA cycles them until its
    /// components converge).
    #[arg(long = "calib-batches", default_value_t = 32)]
    pub calib_batches: usize,
    /// CorDA: ipm (the largest components train; default) or kpm (the smallest).
    #[arg(long = "corda-mode", value_name = "ipm|kpm")]
    pub corda_mode: Option<String>,
    /// Print one JSON line with the results.
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// `--device`: where the model runs. Kept as a name until the command runs, so parsing the flags
/// opens no GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// The CPU (the default).
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl DeviceArg {
    /// Opens the device (a CUDA context for `cuda`); fails on a binary built without CUDA.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) => Device::new_cuda(n).with_context(|| {
                format!(
                    "--device cuda:{n} (a GPU needs a binary built with `--features cuda`, \
                     and the CUDA driver)"
                )
            }),
        }
    }
}

fn parse_device(s: &str) -> Result<DeviceArg, String> {
    match s.to_ascii_lowercase().as_str() {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" | "gpu" => Ok(DeviceArg::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceArg::Cuda)
            .ok_or_else(|| format!("`{s}` is not cpu, cuda or cuda:N")),
    }
}

/// `--max-grad-norm`: `None` turns clipping off.
#[derive(Debug, Clone, Copy)]
pub struct MaxGradNorm(pub Option<f64>);

/// `--base-dtype`: one of [`BaseDType::NAMES`].
pub fn parse_base_dtype(s: &str) -> Result<BaseDType, String> {
    s.parse().map_err(|e: candle_peft::PeftError| e.to_string())
}

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    s.parse::<Schedule>().map_err(|e| e.to_string())
}

fn parse_lora_pro_mode(s: &str) -> Result<LoraProMode, String> {
    s.parse::<LoraProMode>().map_err(|e| e.to_string())
}

fn parse_warmup(s: &str) -> Result<Warmup, String> {
    s.parse::<Warmup>().map_err(|e| e.to_string())
}

fn parse_max_grad_norm(s: &str) -> Result<MaxGradNorm, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(MaxGradNorm(None));
    }
    match s.parse::<f64>() {
        Ok(0.0) => Ok(MaxGradNorm(None)),
        Ok(v) if v.is_finite() && v > 0.0 => Ok(MaxGradNorm(Some(v))),
        _ => Err(format!("`{s}` is not a positive number, 0 or `none`")),
    }
}

/// The settings checks that need no file: they fail before anything is loaded.
pub fn check_args(args: &TrainArgs) -> anyhow::Result<()> {
    if args.lora_pro_mode.is_some() && !Method::from_cli_name(&args.method)?.uses_lora_pro() {
        bail!("--lora-pro-mode needs --method lora-pro");
    }
    for (flag, v) in [
        ("--batch", args.batch),
        ("--grad-accum", args.grad_accum),
        ("--seq", args.seq),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1 (got 0)");
        }
    }
    for (flag, v) in [
        ("--eval-every", args.eval_every),
        ("--checkpoint-every", args.checkpoint_every),
    ] {
        if v == Some(0) {
            bail!("{flag} must be at least 1 (got 0)");
        }
    }
    if args.eval_every.is_some() && args.eval_data.is_none() {
        bail!("--eval-every needs --eval-data (a validation TSV)");
    }
    if !(args.lr.is_finite() && args.lr >= 0.0) {
        bail!("--lr must be a finite number ≥ 0 (got {})", args.lr);
    }
    if let Some(wd) = args.weight_decay
        && !(wd.is_finite() && wd >= 0.0)
    {
        bail!("--weight-decay must be a finite number ≥ 0 (got {wd})");
    }
    if let Some(r) = args.rank
        && r == 0
    {
        bail!("--rank must be at least 1 (got 0)");
    }
    if let Some(p) = args.dropout
        && !(0.0..1.0).contains(&p)
    {
        bail!("--dropout must be in [0, 1) (got {p})");
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!(
            "--out {} exists and is not a directory (the output must be a folder)",
            args.out.display()
        );
    }
    for sub in ["adapter", "merged"] {
        let p = args.out.join(sub);
        if p.exists() && !p.is_dir() {
            bail!("{} exists and is not a directory", p.display());
        }
    }
    Ok(())
}

/// The adapter config: `--config` or the flags (default targets `default_targets`).
pub fn adapter_config(
    args: &TrainArgs,
    method: Method,
    default_targets: &[&str],
) -> anyhow::Result<AdapterConfig> {
    let config = match &args.config {
        Some(path) => {
            let file = if path.is_dir() {
                path.join(candle_peft::io::peft_format::CONFIG_NAME)
            } else {
                path.clone()
            };
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading --config {}", file.display()))?;
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("--config {}: invalid JSON", file.display()))?;
            AdapterConfig::from_json(&value)
                .with_context(|| format!("--config {}", file.display()))?
        }
        None => {
            let targets = args
                .targets
                .clone()
                .unwrap_or_else(|| default_targets.iter().map(|t| t.to_string()).collect());
            let targets: Vec<String> = targets
                .into_iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            if targets.is_empty() {
                bail!("--targets is empty (give module names such as query,value)");
            }
            let opts: Vec<(String, String)> = parse_options(&args.opt)?.into_iter().collect();
            super::method_args::adapter_config(
                method,
                &targets,
                args.rank,
                args.alpha,
                args.dropout,
                &opts,
            )?
        }
    };
    let mut config = config;
    config.inner_mut().set_base_model(Some(args.model.clone()));
    config.validate()?;
    Ok(config)
}

/// The registered method named `name`, or an error listing every registered name.
pub fn check_method(name: &str) -> anyhow::Result<Method> {
    Ok(Method::from_cli_name(name)?)
}

/// `--opt key=value` pairs.
fn parse_options(opts: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for o in opts {
        let Some((k, v)) = o.split_once('=') else {
            bail!("--opt {o}: expected key=value");
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            bail!("--opt {o}: the key is empty");
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            bail!("--opt {k} is given twice");
        }
    }
    Ok(out)
}

/// Before any work: the flags' own checks, then --out checked for writability, locked for
/// this run and refused when it holds another run's checkpoints (unless --overwrite). Hold
/// the lock until the last write.
pub fn prepare_output(args: &TrainArgs) -> anyhow::Result<OutputLock> {
    check_method(&args.method)?;
    check_args(args)?;
    Ok(prepare_output_dir(
        &args.out,
        resume_from(args).as_deref(),
        args.overwrite,
    )?)
}

/// The checkpoint (or folder of checkpoints) `--resume` names: its value, or `--out`.
fn resume_from(args: &TrainArgs) -> Option<PathBuf> {
    args.resume
        .as_ref()
        .map(|r| r.clone().unwrap_or_else(|| args.out.clone()))
}

/// What identifies a run beyond the trainer's own settings: a resume must match it. The
/// adapter settings enter as a hash of the flags that make the config (or of the --config
/// file), the data as its canonical path and size.
fn run_identity(args: &TrainArgs) -> BTreeMap<String, String> {
    let mut adapter = format!(
        "method={}\ntargets={:?}\nrank={:?}\nalpha={:?}\ndropout={:?}\nopt={:?}\n\
         lora_pro_mode={:?}\ncorda_mode={:?}\n",
        args.method,
        args.targets,
        args.rank,
        args.alpha,
        args.dropout,
        args.opt,
        args.lora_pro_mode,
        args.corda_mode
    );
    if let Some(config) = &args.config {
        let file = if config.is_dir() {
            config.join(candle_peft::io::peft_format::CONFIG_NAME)
        } else {
            config.clone()
        };
        adapter.push_str(&String::from_utf8_lossy(
            &std::fs::read(&file).unwrap_or_default(),
        ));
    }
    let data = std::fs::canonicalize(&args.data).unwrap_or_else(|_| args.data.clone());
    let data_bytes = std::fs::metadata(&args.data).map(|m| m.len()).unwrap_or(0);
    let mut identity = BTreeMap::from([
        ("task".to_string(), args.task.clone()),
        ("model".to_string(), args.model.clone()),
        ("method".to_string(), args.method.clone()),
        ("adapter_config".to_string(), fnv1a_hex(adapter.as_bytes())),
        ("data".to_string(), data.display().to_string()),
        ("data_bytes".to_string(), data_bytes.to_string()),
        ("seq".to_string(), args.seq.to_string()),
    ]);
    // More ranks draw more micro-batches per step: a checkpoint only resumes on as many.
    if let Some(w) = args.world_size.filter(|&w| w > 1) {
        identity.insert("world_size".to_string(), w.to_string());
    }
    identity
}

/// FNV-1a 64 of `bytes`, in hex: a stable fingerprint (not a security hash).
fn fnv1a_hex(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// `--weight-decay` when not given (AdamW; LoRA-Pro's is 0).
const DEFAULT_WEIGHT_DECAY: f64 = 0.01;

/// The trainer settings the flags give, for `steps` optimiser steps.
pub fn train_config(args: &TrainArgs, steps: usize) -> TrainConfig {
    let resume_from = resume_from(args);
    let checkpoints = args.checkpoint_every.is_some() || resume_from.is_some();
    let lora_pro = Method::from_cli_name(&args.method).is_ok_and(|m| m.uses_lora_pro());
    TrainConfig {
        steps,
        batch_size: args.batch,
        grad_accum: args.grad_accum,
        lr: args.lr,
        weight_decay: args.weight_decay.unwrap_or(if lora_pro {
            0.0
        } else {
            DEFAULT_WEIGHT_DECAY
        }),
        schedule: args.schedule,
        warmup: args.warmup,
        max_grad_norm: args.max_grad_norm.0,
        optimizer: match Method::from_cli_name(&args.method) {
            Ok(m) if m.uses_lora_pro() => {
                OptimizerKind::LoraPro(args.lora_pro_mode.unwrap_or_default())
            }
            _ => OptimizerKind::AdamW,
        },
        seed: args.seed,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        out_dir: checkpoints.then(|| args.out.clone()),
        resume_from,
        quiet: args.quiet,
        run_identity: run_identity(args),
        ..TrainConfig::default()
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model: a hub id or a local folder (e.g. the DIR/merged folder `train --merge` wrote).
    #[arg(long)]
    pub model: String,
    /// The type the base model's frozen linear weights are kept in: f32 (default), f16, bf16,
    /// q8_0 or q4_k (quantised at load, QLoRA-style), or gguf (a GGUF file's own types).
    /// Adapters, gradients and activations stay f32.
    #[arg(long = "base-dtype", default_value = "f32", value_parser = parse_base_dtype)]
    pub base_dtype: BaseDType,
    /// Where the model runs: cpu (default), cuda (the first GPU) or cuda:N. cuda needs a
    /// binary built with `--features cuda`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
    /// An adapter folder (PEFT format) to apply to the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data: a TSV of `label<TAB>text` lines (classify), or a text or .jsonl file (causal-lm).
    #[arg(long)]
    pub data: PathBuf,
    /// causal-lm: read --data as {"prompt", "response"} JSONL rendered with the model's chat
    /// template (as `train --chat-template` does); perplexity over the assistant's part only.
    #[arg(long = "chat-template")]
    pub chat_template: bool,
    /// classify (accuracy) or causal-lm (perplexity).
    #[arg(long, default_value = "classify")]
    pub task: String,
    /// Print one JSON line: {"accuracy", "loss", "examples"} or, for causal-lm,
    /// {"perplexity", "loss", "tokens"}.
    #[arg(long)]
    pub json: bool,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Maximum tokens per example (special tokens included).
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Seeds the classifier of a model that has none (a bare base model without --adapter).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the predicted label of every example to FILE, one per line.
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
}

impl EvalArgs {
    /// Before any work: every file `eval` will write (--predictions) can be written.
    pub fn check_outputs(&self) -> anyhow::Result<()> {
        if let Some(p) = &self.predictions {
            check_writable_file(p).context("--predictions")?;
        }
        Ok(())
    }
}
