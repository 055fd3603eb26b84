//! Progress output on stderr (stdout stays free for results such as `--json`).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::config::TrainConfig;
use super::task::EvalReport;

/// Progress output: an indicatif bar on a terminal, plain lines otherwise, or nothing.
pub(super) enum Progress {
    Quiet,
    Bar {
        bar: ProgressBar,
        tokens: usize,
        time: Duration,
    },
    Lines {
        every: usize,
        loss_sum: f64,
        steps: usize,
        tokens: usize,
        time: Duration,
    },
}

impl Progress {
    pub(super) fn new(config: &TrainConfig, start: usize) -> Self {
        if config.quiet {
            return Progress::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(
                Some(config.steps as u64),
                ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                bar.set_style(style);
            }
            bar.set_position(start as u64);
            Progress::Bar {
                bar,
                tokens: 0,
                time: Duration::ZERO,
            }
        } else {
            Progress::Lines {
                every: config.log_every,
                loss_sum: 0.0,
                steps: 0,
                tokens: 0,
                time: Duration::ZERO,
            }
        }
    }

    pub(super) fn step(
        &mut self,
        step: usize,
        total: usize,
        loss: f64,
        lr: f64,
        tokens: usize,
        dt: Duration,
    ) {
        match self {
            Progress::Quiet => {}
            Progress::Bar {
                bar,
                tokens: tok,
                time,
            } => {
                *tok += tokens;
                *time += dt;
                bar.set_position(step as u64);
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.1e} tok/s {:.0}",
                    per_second(*tok, *time)
                ));
            }
            Progress::Lines {
                every,
                loss_sum,
                steps,
                tokens: tok,
                time,
            } => {
                *loss_sum += loss;
                *steps += 1;
                *tok += tokens;
                *time += dt;
                if step.is_multiple_of(*every) || step == total {
                    eprintln!(
                        "step {step}/{total} loss {:.4} lr {lr:.1e} tok/s {:.0}",
                        *loss_sum / *steps as f64,
                        per_second(*tok, *time)
                    );
                    *loss_sum = 0.0;
                    *steps = 0;
                    *tok = 0;
                    *time = Duration::ZERO;
                }
            }
        }
    }

    pub(super) fn message(&self, line: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Bar { bar, .. } => bar.println(line),
            Progress::Lines { .. } => eprintln!("{line}"),
        }
    }

    pub(super) fn finish(&self) {
        if let Progress::Bar { bar, .. } = self {
            bar.finish();
        }
    }
}

fn per_second(tokens: usize, time: Duration) -> f64 {
    let s = time.as_secs_f64();
    if s > 0.0 { tokens as f64 / s } else { 0.0 }
}

pub(super) fn eval_line(step: usize, total: usize, r: &EvalReport) -> String {
    let mut line = format!("eval step {step}/{total} loss {:.4}", r.loss);
    for (k, v) in &r.metrics {
        line.push_str(&format!(" {k} {v:.4}"));
    }
    line
}
