//! `candle-peft bench <workload>`: runs one fixed benchmark workload (each in its own
//! `bench_*` module) and prints its headline figure, the process's peak resident memory and
//! candle's thread count.

use anyhow::{Result, bail};

use super::bench_minilm::minilm_lora_train;
use super::measure::peak_rss_mb;
use super::output::print_stdout;
use super::{bench_calib, bench_llm, bench_svd};

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The workload: minilm-lora-train.
    pub workload: String,
    /// The model to run it on (hub id or folder).
    #[arg(long)]
    pub model: Option<String>,
    /// Print one JSON line: {"workload", "ms_per_step", "peak_rss_mb", …}.
    #[arg(long)]
    pub json: bool,
}

/// The workloads, for the error message on an unknown name.
const WORKLOADS: &[&str] = &[
    "minilm-lora-train",
    "smollm2-lora-train",
    "smollm2-merge",
    "svd-init-smollm2",
    "eva-corda-init-smollm2",
];

pub fn run(args: BenchArgs) -> Result<()> {
    let result = match args.workload.as_str() {
        "minilm-lora-train" => minilm_lora_train(args.model.as_deref().unwrap_or(MINILM))?,
        "smollm2-lora-train" => bench_llm::smollm2_lora_train(args.model.as_deref())?,
        "smollm2-merge" => bench_llm::smollm2_merge(args.model.as_deref())?,
        "svd-init-smollm2" => bench_svd::svd_init_smollm2(args.model.as_deref())?,
        "eva-corda-init-smollm2" | "eva-init-smollm2" | "corda-init-smollm2" => {
            bench_calib::run(&args.workload, args.model.as_deref())?
        }
        other => bail!(
            "unknown workload `{other}` (available: {})",
            WORKLOADS.join(", ")
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
        line.extend(result.details);
        print_stdout(&format!("{}\n", serde_json::Value::Object(line)))
    } else {
        print_stdout(&format!(
            "{}: {:.1} {} ({}), peak RSS {peak_rss_mb:.0} MB, {threads} threads\n",
            args.workload, result.value, result.unit, result.how,
        ))
    }
}
