//! `candle-peft bench <workload>`: runs one fixed benchmark workload (each in its own
//! `bench_*` module) and prints its headline figure, the process's peak resident memory and
//! candle's thread count.

use anyhow::{Result, bail};
use candle_peft::BaseDType;

use super::bench_minilm::minilm_lora_train;
use super::measure::peak_rss_mb;
use super::output::print_stdout;
use super::{bench_calib, bench_llm, bench_svd};

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The workload (`--help` lists them all).
    #[arg(long_help = workloads_help())]
    pub workload: String,
    /// The model to run it on (hub id or folder).
    #[arg(long)]
    pub model: Option<String>,
    /// Print one JSON line: {"workload", "ms_per_step", "peak_rss_mb", "base_dtype",
    /// "model_rss_mb", "losses", …}.
    #[arg(long)]
    pub json: bool,
    /// The type the frozen linear weights are kept in, for the training workloads: f32, f16,
    /// bf16, q8_0, q4_k (quantised at load) or gguf (a GGUF file's own types).
    #[arg(long = "base-dtype", default_value = "f32", value_parser = super::args::parse_base_dtype)]
    pub base_dtype: BaseDType,
}

/// Every workload `run` accepts, with what it measures: `--help` and the error on an unknown
/// name list them from here.
const WORKLOADS: &[(&str, &str)] = &[
    (
        "minilm-lora-train",
        "LoRA training steps on all-MiniLM-L6-v2 (classification), ms/step",
    ),
    (
        "smollm2-lora-train",
        "LoRA training steps on SmolLM2-135M (causal LM), ms/step",
    ),
    (
        "gemma3-lora-train",
        "LoRA training steps on Gemma 3 270M (causal LM), ms/step",
    ),
    (
        "smollm2-merge",
        "streaming merge of a LoRA adapter into SmolLM2-135M, seconds",
    ),
    (
        "svd-init-smollm2",
        "SVFit's SVD initialisation of SmolLM2-135M's projections, seconds",
    ),
    (
        "eva-corda-init-smollm2",
        "EVA's and CorDA's data-driven initialisations on SmolLM2-135M, each in its own process",
    ),
    (
        "eva-init-smollm2",
        "EVA's initialisation alone, in this process",
    ),
    (
        "corda-init-smollm2",
        "CorDA's initialisation alone, in this process",
    ),
];

/// The long help of the workload argument: one line per workload.
fn workloads_help() -> String {
    let mut help = String::from("The workload, one of:");
    for (name, what) in WORKLOADS {
        help.push_str(&format!("\n  {name}: {what}"));
    }
    help
}

pub fn run(args: BenchArgs) -> Result<()> {
    let result = match args.workload.as_str() {
        "minilm-lora-train" => {
            minilm_lora_train(args.model.as_deref().unwrap_or(MINILM), args.base_dtype)?
        }
        "smollm2-lora-train" => {
            bench_llm::smollm2_lora_train(args.model.as_deref(), args.base_dtype)?
        }
        "gemma3-lora-train" => {
            bench_llm::gemma3_lora_train(args.model.as_deref(), args.base_dtype)?
        }
        "smollm2-merge" => bench_llm::smollm2_merge(args.model.as_deref())?,
        "svd-init-smollm2" => bench_svd::svd_init_smollm2(args.model.as_deref())?,
        "eva-corda-init-smollm2" | "eva-init-smollm2" | "corda-init-smollm2" => {
            bench_calib::run(&args.workload, args.model.as_deref())?
        }
        other => bail!(
            "unknown workload `{other}` (available: {})",
            WORKLOADS
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let peak_rss_mb = peak_rss_mb()?;
    let threads = candle_core::utils::get_num_threads();
    if args.json {
        let mut line = serde_json::Map::new();
        line.insert("workload".into(), args.workload.clone().into());
        line.insert(result.metric.into(), result.value.into());
        line.insert("peak_rss_mb".into(), peak_rss_mb.into());
        line.insert("threads".into(), threads.into());
        line.insert("base_dtype".into(), args.base_dtype.name().into());
        // Workloads that load no model for training report no model memory and no losses.
        line.insert("model_rss_mb".into(), serde_json::Value::Null);
        line.insert("losses".into(), serde_json::Value::Array(Vec::new()));
        line.extend(result.details);
        print_stdout(&format!("{}\n", serde_json::Value::Object(line)))
    } else {
        print_stdout(&format!(
            "{}: {:.1} {} ({}), peak RSS {peak_rss_mb:.0} MB, {threads} threads\n",
            args.workload, result.value, result.unit, result.how,
        ))
    }
}
