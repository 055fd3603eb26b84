//! `candle-peft merge --base <dir|file> --adapter <dir> --out <dir> [--dtype f32|f16|bf16]
//! [--max-shard-size 5GB]`: streaming merge of an adapter into a base model's safetensors; with
//! `--to gguf`, `--base model.gguf --out merged.gguf`: a GGUF file, adapted tensors re-quantised
//! to their own types and everything else copied byte for byte.

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::DType;
use candle_peft::io::export::{
    DEFAULT_MAX_SHARD_BYTES, GgufMergeReport, MergeOptions, ggml_type_name,
    merge_adapter_into_base, merge_adapter_into_gguf, parse_dtype, parse_size,
};
use clap::{Args, ValueEnum};
use std::fmt::Write as _;

/// What `merge` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum MergeTarget {
    /// A Hugging Face model folder (safetensors, config, tokenizer).
    #[default]
    Hf,
    /// One GGUF file, from a GGUF base.
    Gguf,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: a folder (model.safetensors or a sharded index), a .safetensors file or an
    /// index.json; with --to gguf, a .gguf file.
    #[arg(long)]
    pub base: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder for the merged model; with --to gguf, the .gguf file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Output format: a Hugging Face folder, or a GGUF file whose adapted tensors keep their
    /// quantised types.
    #[arg(long, value_enum, default_value_t = MergeTarget::Hf)]
    pub to: MergeTarget,
    /// Output dtype of float tensors (default: keep each tensor's dtype). Not with --to gguf.
    #[arg(long, value_parser = parse_dtype_arg)]
    pub dtype: Option<DType>,
    /// Largest shard, in bytes or with a unit (5GB, 500MB, 2GiB; default 5GB). Not with
    /// --to gguf.
    #[arg(long = "max-shard-size", value_parser = parse_size_arg)]
    pub max_shard_size: Option<u64>,
    /// Print one JSON line (modules, tensors, bytes, files, seconds, this process's peak RSS
    /// in MB, null off Linux; with --to gguf each merged tensor's type and requantisation
    /// error) instead of the text report.
    #[arg(long)]
    pub json: bool,
}

fn parse_dtype_arg(s: &str) -> Result<DType, String> {
    parse_dtype(s).map_err(|e| e.to_string())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Whether `path` starts with GGUF's magic bytes.
fn is_gguf_file(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    match args.to {
        MergeTarget::Hf => run_hf(args),
        MergeTarget::Gguf => run_gguf(args),
    }
}

fn run_hf(args: MergeArgs) -> anyhow::Result<()> {
    if args.base.is_file() && is_gguf_file(&args.base) {
        bail!(
            "--base {} is a GGUF file: add --to gguf to write a merged GGUF",
            args.base.display()
        );
    }
    candle_peft::io::atomic::check_writable_dir(&args.out).context("--out")?;
    let started = std::time::Instant::now();
    let mut o = String::new();
    let opts = MergeOptions {
        dtype: args.dtype,
        max_shard_bytes: args.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_BYTES),
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

fn run_gguf(args: MergeArgs) -> anyhow::Result<()> {
    // A GGUF keeps each tensor's own type and is one file, so neither flag has a meaning there.
    if args.dtype.is_some() {
        bail!("--dtype does not apply with --to gguf: merged tensors keep their GGUF types");
    }
    if args.max_shard_size.is_some() {
        bail!("--max-shard-size does not apply with --to gguf: the output is one GGUF file");
    }
    if args.base.is_dir() || !is_gguf_file(&args.base) {
        bail!(
            "--to gguf needs a .gguf file as --base; {} is {}",
            args.base.display(),
            if args.base.is_dir() {
                "a folder (use --to hf for a Hugging Face folder)"
            } else if args.base.exists() {
                "not a GGUF file"
            } else {
                "missing"
            }
        );
    }
    candle_peft::io::atomic::check_writable_file(&args.out).context("--out")?;
    let started = std::time::Instant::now();
    let report =
        merge_adapter_into_gguf(&args.base, &args.adapter, &args.out).with_context(|| {
            format!(
                "merging {} into {}",
                args.adapter.display(),
                args.base.display()
            )
        })?;
    let text = if args.json {
        format!("{}\n", gguf_json(&report, started.elapsed().as_secs_f64()))
    } else {
        gguf_text(&report)?
    };
    super::output::print_stdout(&text)
}

fn gguf_json(report: &GgufMergeReport, seconds: f64) -> serde_json::Value {
    let merged: Vec<serde_json::Value> = report
        .merged
        .iter()
        .map(|m| {
            serde_json::json!({
                "module": m.module,
                "tensor": m.tensor,
                "type": ggml_type_name(m.ggml_type),
                "bytes": m.bytes,
                "max_abs_error": m.max_abs_error,
                "rms_error": m.rms_error,
                "rel_rms_error": m.rel_rms_error,
            })
        })
        .collect();
    serde_json::json!({
        "to": "gguf",
        "out_file": report.out_file.display().to_string(),
        "merged_modules": report.merged.len(),
        "tensors": report.num_tensors,
        "bytes": report.file_bytes,
        "merged": merged,
        "seconds": seconds,
        // null where /proc is missing (not Linux): the merge itself has succeeded.
        "peak_rss_mb": super::measure::peak_rss_mb().ok(),
    })
}

fn gguf_text(report: &GgufMergeReport) -> anyhow::Result<String> {
    let mut o = String::new();
    writeln!(
        o,
        "merged {} adapter modules into {} of {} GGUF tensors ({:.1} MB file)",
        report.merged.len(),
        report.merged.len(),
        report.num_tensors,
        report.file_bytes as f64 / 1e6
    )?;
    for m in &report.merged {
        writeln!(
            o,
            "  {} ({}): {}, requantisation error max {:.3e}, rms {:.3e} ({:.2}% of the weights' rms)",
            m.tensor,
            m.module,
            ggml_type_name(m.ggml_type),
            m.max_abs_error,
            m.rms_error,
            100.0 * m.rel_rms_error
        )?;
    }
    writeln!(o, "wrote {}", report.out_file.display())?;
    Ok(o)
}
