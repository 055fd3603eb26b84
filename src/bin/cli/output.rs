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
