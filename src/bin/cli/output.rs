//! Printing a command's results.

/// Writes a command's output to stdout; a closed pipe (`candle-peft inspect … | head`) is not an
/// error.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `eval --task causal-lm`'s figures as JSON (also the `eval` field of `train --json`).
pub fn lm_eval_json(r: &candle_peft::tasks::causal_lm::LmEval) -> serde_json::Value {
    serde_json::json!({ "perplexity": r.perplexity, "loss": r.loss, "tokens": r.tokens })
}

/// The human-readable result of `train`: the steps run (or that none were), then `eval_line`
/// when there was an evaluation, then where the adapter and the merged model went.
pub fn train_summary(
    report: &candle_peft::TrainReport,
    final_loss: Option<f64>,
    eval_line: Option<String>,
    adapter_dir: &std::path::Path,
    merged_dir: Option<&std::path::Path>,
) -> String {
    let mut lines = vec![match final_loss {
        Some(l) => format!(
            "trained {} steps in {:.1}s, final loss {l:.4}",
            report.global_step - report.start_step,
            report.seconds
        ),
        None => "initialised without training (--steps 0)".to_string(),
    }];
    lines.extend(eval_line);
    lines.push(format!("adapter saved to {}", adapter_dir.display()));
    if let Some(d) = merged_dir {
        lines.push(format!("merged model written to {}", d.display()));
    }
    lines.join("\n") + "\n"
}
