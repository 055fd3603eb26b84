//! What the benchmark workloads measure and report: the result type, the median of step times,
//! the process's peak resident memory. Also used by `merge --json`.

use anyhow::{Context, Result};

/// What a workload reports: its headline figure, and anything else worth printing as JSON.
pub struct BenchResult {
    /// The JSON key of the headline figure (`ms_per_step`, `seconds`).
    pub metric: &'static str,
    /// The headline figure, in `unit`.
    pub value: f64,
    /// The unit printed after the value (`ms/step`, `s`).
    pub unit: &'static str,
    /// How the value was taken, for the text line (`median of steps 3..12`).
    pub how: String,
    /// Extra JSON fields (per-step times, sizes).
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// The median of `times[skip..]`.
pub fn median_after(times: &[f64], skip: usize) -> f64 {
    let mut timed = times[skip.min(times.len())..].to_vec();
    if timed.is_empty() {
        return f64::NAN;
    }
    timed.sort_by(f64::total_cmp);
    let n = timed.len();
    if n.is_multiple_of(2) {
        (timed[n / 2 - 1] + timed[n / 2]) / 2.0
    } else {
        timed[n / 2]
    }
}

/// Peak resident set size of this process (`VmHWM`), in MB.
pub fn peak_rss_mb() -> Result<f64> {
    status_mb("VmHWM:")
}

/// Resident set size of this process now (`VmRSS`), in MB: taken right after a model is loaded,
/// it is what the model's weights hold.
pub fn rss_mb() -> Result<f64> {
    status_mb("VmRSS:")
}

/// A `kB` line of `/proc/self/status`, in MB.
fn status_mb(key: &str) -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/self/status"))?;
    Ok(kb / 1024.0)
}

/// The JSON fields every training workload adds: the resident memory once the model is loaded
/// and the loss of each step (so runs compare for correctness as well as speed).
pub fn train_details(
    model_rss_mb: f64,
    losses: &[f32],
    steps_ms: &[f64],
) -> serde_json::Map<String, serde_json::Value> {
    let mut details = serde_json::Map::new();
    details.insert("model_rss_mb".into(), model_rss_mb.into());
    details.insert("losses".into(), losses.to_vec().into());
    details.insert("steps_ms".into(), steps_ms.to_vec().into());
    details
}
