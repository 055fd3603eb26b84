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

/// What `train` reports, for [`print_train`].
pub struct TrainOutcome<'a> {
    pub report: &'a candle_peft::TrainReport,
    /// The final evaluation, as JSON (`--json`'s `eval`) and as a line of text.
    pub eval: Option<(serde_json::Value, String)>,
    /// The task's own `--json` fields, after `eval`: the labels, the training set's size.
    pub fields: Vec<(&'static str, serde_json::Value)>,
    pub trainable_parameters: usize,
    /// Wall time of adding the adapter (calibration and decompositions included).
    pub init_seconds: f64,
    pub adapter_dir: &'a std::path::Path,
    pub merged_dir: Option<&'a std::path::Path>,
}

/// Prints the result of `train`: with `json`, one line `{"steps", "final_loss", "losses",
/// "eval", <the task's fields>, "trainable_parameters", "adapter", "merged", "init_seconds",
/// "seconds"}`;
/// otherwise the steps run (or that none were), the evaluation line when there was one, and
/// where the adapter and the merged model went.
pub fn print_train(json: bool, o: TrainOutcome<'_>) -> anyhow::Result<()> {
    use serde_json::{Value, json};
    let report = o.report;
    let final_loss = report.losses.last().copied();
    let (eval_json, eval_line) = o.eval.unzip();
    if json {
        let mut value = serde_json::Map::new();
        value.insert("steps".into(), json!(report.global_step));
        value.insert("final_loss".into(), json!(final_loss));
        value.insert("losses".into(), json!(report.losses));
        value.insert("eval".into(), eval_json.unwrap_or(Value::Null));
        value.extend(o.fields.into_iter().map(|(k, v)| (k.to_string(), v)));
        value.insert("trainable_parameters".into(), json!(o.trainable_parameters));
        value.insert("adapter".into(), json!(o.adapter_dir));
        value.insert("merged".into(), json!(o.merged_dir));
        value.insert("init_seconds".into(), json!(o.init_seconds));
        value.insert("seconds".into(), json!(report.seconds));
        return print_stdout(&format!("{}\n", Value::Object(value)));
    }
    let mut lines = vec![match final_loss {
        Some(l) => format!(
            "trained {} steps in {:.1}s, final loss {l:.4}",
            report.global_step - report.start_step,
            report.seconds
        ),
        None => "initialised without training (--steps 0)".to_string(),
    }];
    lines.extend(eval_line);
    lines.push(format!("adapter saved to {}", o.adapter_dir.display()));
    if let Some(d) = o.merged_dir {
        lines.push(format!("merged model written to {}", d.display()));
    }
    print_stdout(&(lines.join("\n") + "\n"))
}
