//! `candle-peft merge --base <dir|file> --adapter <dir> --out <dir> [--dtype f32|f16|bf16]
//! [--max-shard-size 5GB]`: streaming merge of an adapter into a base model's safetensors.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use candle_peft::io::export::{
    DEFAULT_MAX_SHARD_BYTES, MergeOptions, merge_adapter_into_base, parse_dtype, parse_size,
};
use clap::Args;
use std::fmt::Write as _;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: a folder (model.safetensors or a sharded index), a .safetensors file or an
    /// index.json.
    #[arg(long)]
    pub base: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder for the merged model.
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype of float tensors (default: keep each tensor's dtype).
    #[arg(long, value_parser = parse_dtype_arg)]
    pub dtype: Option<DType>,
    /// Largest shard, in bytes or with a unit (5GB, 500MB, 2GiB).
    #[arg(long = "max-shard-size", value_parser = parse_size_arg, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_size: u64,
    /// Print one JSON line (modules, tensors, bytes, files, seconds, this process's peak RSS
    /// in MB, null off Linux) instead of the text report.
    #[arg(long)]
    pub json: bool,
}

fn parse_dtype_arg(s: &str) -> Result<DType, String> {
    parse_dtype(s).map_err(|e| e.to_string())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    candle_peft::io::atomic::check_writable_dir(&args.out).context("--out")?;
    let started = std::time::Instant::now();
    let mut o = String::new();
    let opts = MergeOptions {
        dtype: args.dtype,
        max_shard_bytes: args.max_shard_size,
    };
    let report =
        merge_adapter_into_base(&args.base, &args.adapter, &args.out, opts).with_context(|| {
            format!(
                "merging {} into {}",
                args.adapter.display(),
                args.base.display()
            )
        })?;
    if args.json {
        let files: Vec<String> = report
            .weight_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let line = serde_json::json!({
            "merged_modules": report.merged_modules.len(),
            "replaced_tensors": report.replaced_tensors.len(),
            "tensors": report.num_tensors,
            "bytes": report.total_bytes,
            "weight_files": files,
            "seconds": started.elapsed().as_secs_f64(),
            // Measured here rather than by a parent: a child's rusage also counts the memory it
            // shared with its parent before exec.
            // null where /proc is missing (not Linux): the merge itself has succeeded.
            "peak_rss_mb": super::measure::peak_rss_mb().ok(),
        });
        return super::output::print_stdout(&format!("{line}\n"));
    }
    writeln!(
        o,
        "merged {} adapter modules{} into {} tensors ({:.1} MB{})",
        report.merged_modules.len(),
        if report.replaced_tensors.is_empty() {
            String::new()
        } else {
            format!(
                " and replaced {} tensors (modules_to_save)",
                report.replaced_tensors.len()
            )
        },
        report.num_tensors,
        report.total_bytes as f64 / 1e6,
        match args.dtype {
            Some(d) => format!(", {}", d.as_str()),
            None => String::new(),
        }
    )?;
    for f in &report.weight_files {
        writeln!(o, "wrote {}", f.display())?;
    }
    if let Some(index) = &report.index_file {
        writeln!(o, "wrote {}", index.display())?;
    }
    if !report.copied_files.is_empty() {
        let names: Vec<String> = report
            .copied_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        writeln!(o, "copied {}", names.join(", "))?;
    }
    super::output::print_stdout(&o)
}
