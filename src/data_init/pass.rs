//! One calibration pass over the base model: the targeted layers, adapters and dropout switched
//! off, a progress bar.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::batch::CalibrationBatch;
use super::calibrator::{Calibrator, InputGroup, RowStatistic};
use crate::adapter::LayerGeometry;
use crate::config::{Candidate, Targeting};
use crate::error::{PeftError, Result};
use crate::layer::LayerHandle;
use crate::model::PeftModel;

/// How a calibration pass reports progress.
#[derive(Clone, Debug, Default)]
pub struct CalibrationOptions {
    /// No progress bar.
    pub quiet: bool,
}

/// A single pass over `batches`: each group's statistic sees every batch once (after the
/// grouping forward on the first batch). Fails naming the layers no usable token reached.
pub fn collect<S: RowStatistic + 'static>(
    layers: Vec<LayerHandle>,
    batches: &[CalibrationBatch],
    mut forward: impl FnMut(&CalibrationBatch) -> Result<()>,
    make: impl FnMut(&InputGroup, &[LayerHandle]) -> Result<S>,
    options: &CalibrationOptions,
    what: &str,
) -> Result<Vec<(InputGroup, S, usize)>> {
    let Some(first) = batches.first() else {
        return Err(PeftError::config("calibration data", "no batches"));
    };
    let calibrator = Calibrator::new(layers, first, &mut forward, make)?;
    let bar = progress_bar(Some(batches.len() as u64), options.quiet, what);
    for batch in batches {
        calibrator.run_batch(batch, &mut forward)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    calibrator.check_rows_seen(batches.len())?;
    Ok(calibrator.finish())
}

/// A progress bar on stderr (hidden when `quiet` or when stderr is not a terminal).
pub fn progress_bar(total: Option<u64>, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        "{prefix} {bar:30.cyan/blue} {pos}/{len} batches [{elapsed_precise}] {msg}"
    } else {
        "{prefix} {spinner} {pos} batches [{elapsed_precise}] {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_prefix(what.to_string());
    bar
}

/// The linear layers of `model` that `targeting` selects, and separately the targeted layers of
/// any other kind, chosen by [`Targeting::select`]; selecting nothing is its error.
pub fn target_layers<M>(
    model: &PeftModel<M>,
    targeting: &Targeting,
) -> Result<(Vec<LayerHandle>, Vec<LayerHandle>)> {
    let names = model.layer_names();
    let candidates: Vec<Candidate<'_>> = model
        .layers()
        .iter()
        .zip(&names)
        .map(|(l, name)| Candidate {
            name,
            linear: matches!(l.geometry(), LayerGeometry::Linear { .. }),
        })
        .collect();
    let mut linear = Vec::new();
    let mut other = Vec::new();
    for i in targeting.select(&candidates, None)?.targets {
        let layer = &model.layers()[i];
        match layer.geometry() {
            LayerGeometry::Linear { .. } => linear.push(layer.clone()),
            LayerGeometry::Conv2d { .. } => other.push(layer.clone()),
        }
    }
    Ok((linear, other))
}

/// Runs `f` on the base model: adapters switched off ([`PeftModel::with_disabled`]: merged
/// adapters are merged again afterwards) and dropout off; both are restored afterwards, also when
/// `f` fails.
pub fn with_base_model<M, R>(
    model: &mut PeftModel<M>,
    f: impl FnOnce(&PeftModel<M>) -> Result<R>,
) -> Result<R> {
    let was_training = model.is_training();
    model.eval();
    let result = model.with_disabled(f);
    if was_training {
        model.train();
    }
    result
}
