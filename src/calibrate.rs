//! Calibration: real batches through the base model, with every targeted layer streaming the
//! input rows of its usable tokens into an accumulator (EVA's incremental PCA, CorDA's
//! covariance).
//!
//! ```text
//! for each batch (input_ids [B, T], attention_mask [B, T], optional token mask [B, T]):
//!     usable = token_mask (default: attention_mask) != 0          flat positions b·T + t
//!     model forward; at the start of each targeted layer's forward, with input x:
//!         x [B, T, in] (or [B·T, in])  →  X = rows of x at the usable positions   [N, in] f32
//!         x [B, in] (one row per sequence, e.g. a pooler) → rows of sequences with a usable token
//!         statistic(leader of x).update(X)
//! ```
//!
//! **Shared inputs.** Layers fed the same tensor (q/k/v of one attention block, gate/up of one
//! MLP) form a group. The first batch is run once to find the groups: within one forward, two
//! layers whose inputs are the same tensor (same tensor id) share a group, led by the first one
//! called. Only the leader holds a statistic; the members reuse its result. Later forwards check
//! that a member still sees its leader's tensor.
//!
//! **Memory** is bounded by the statistics: a layer's rows are selected, handed to its statistic
//! and dropped within its forward; no activation outlives the layer call.
//!
//! The model is generic: the pass takes a closure that runs one forward on a batch
//! (`BertModel::forward(ids, None, Some(mask))`, a Llama's `forward(ids, Some(mask))`, …) and
//! reaches the layers through the observers of [`LayerHandle::set_input_observer`]. The caller
//! runs the pass on the base model: [`with_base_model`] switches adapters off and dropout off for
//! its duration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, TensorId};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokenizers::Tokenizer;

use crate::adapter::LayerGeometry;
use crate::config::Targeting;
use crate::data::encode_batch;
use crate::error::{PeftError, Result};
use crate::layer::{InputObserver, LayerHandle};
use crate::model::PeftModel;

/// One calibration batch.
#[derive(Clone, Debug)]
pub struct CalibrationBatch {
    /// `[B, T]` token ids (or `[B, T, …]` inputs of a model that takes features).
    pub input_ids: Tensor,
    /// `[B, T]`, 1 = token, 0 = padding (any dtype).
    pub attention_mask: Tensor,
    /// `[B, T]`: the tokens whose activations count, when narrower than the attention mask
    /// (e.g. PEFT's label mask: `attention_mask ∧ labels ≠ −100`). Default: the attention mask.
    pub token_mask: Option<Tensor>,
}

impl CalibrationBatch {
    pub fn new(input_ids: Tensor, attention_mask: Tensor) -> Self {
        Self {
            input_ids,
            attention_mask,
            token_mask: None,
        }
    }

    /// Restricts the counted tokens to `mask` (`[B, T]`, non-zero = counted).
    pub fn with_token_mask(mut self, mask: Tensor) -> Self {
        self.token_mask = Some(mask);
        self
    }

    /// Number of counted tokens.
    pub fn usable_tokens(&self) -> Result<usize> {
        Ok(self.selection()?.tokens)
    }

    fn selection(&self) -> Result<RowSelection> {
        let mask = self.token_mask.as_ref().unwrap_or(&self.attention_mask);
        let (b, t) = mask.dims2().map_err(|_| PeftError::ShapeMismatch {
            key: "calibration token mask".into(),
            expected: self.input_ids.dims().to_vec(),
            got: mask.dims().to_vec(),
        })?;
        if self.input_ids.dims().get(..2) != Some(&[b, t][..]) {
            return Err(PeftError::ShapeMismatch {
                key: "calibration token mask".into(),
                expected: self.input_ids.dims().to_vec(),
                got: mask.dims().to_vec(),
            });
        }
        let flags = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let tokens: Vec<u32> = (0..flags.len())
            .filter(|&i| flags[i] != 0.0)
            .map(|i| i as u32)
            .collect();
        let sequences: Vec<u32> = (0..b)
            .filter(|&s| flags[s * t..(s + 1) * t].iter().any(|&f| f != 0.0))
            .map(|s| s as u32)
            .collect();
        let device = self.input_ids.device();
        Ok(RowSelection {
            batch: b,
            seq: t,
            tokens: tokens.len(),
            sequences: sequences.len(),
            token_index: Tensor::from_vec(tokens.clone(), tokens.len(), device)?,
            sequence_index: Tensor::from_vec(sequences.clone(), sequences.len(), device)?,
        })
    }
}

/// Which rows of a layer input belong to counted tokens, for the batch being run.
struct RowSelection {
    batch: usize,
    seq: usize,
    tokens: usize,
    sequences: usize,
    token_index: Tensor,
    sequence_index: Tensor,
}

impl RowSelection {
    /// The counted rows of `x` as `[N, in]` f32; `None` when there are none.
    fn rows(&self, x: &Tensor, layer: &str) -> Result<Option<Tensor>> {
        let dims = x.dims();
        let (flat, index, n) = match *dims {
            [b, t, d] if b == self.batch && t == self.seq => {
                (x.reshape((b * t, d))?, &self.token_index, self.tokens)
            }
            [n, _] if n == self.batch * self.seq => (x.clone(), &self.token_index, self.tokens),
            [n, _] if n == self.batch => (x.clone(), &self.sequence_index, self.sequences),
            _ => {
                return Err(PeftError::layer(
                    layer,
                    format!(
                        "calibration: input of shape {dims:?} does not match the batch \
                         [B, T] = [{}, {}] (expected [B, T, in], [B·T, in] or [B, in])",
                        self.batch, self.seq
                    ),
                ));
            }
        };
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(
            flat.contiguous()?
                .index_select(index, 0)?
                .to_dtype(DType::F32)?,
        ))
    }
}

/// An accumulator over a layer's input rows (EVA's incremental PCA, CorDA's covariance).
pub trait RowStatistic: Send {
    /// Takes one batch's counted input rows, `[N, in]` f32 with `N ≥ 1`, on the model's device.
    fn update(&mut self, rows: &Tensor) -> Result<()>;
}

/// Layers that see the same input: indices into [`Calibrator::layers`], in layer order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputGroup {
    /// The member that holds the statistic (the first one called in a forward).
    pub leader: usize,
    /// Every member, the leader included.
    pub members: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Discover,
    Collect,
}

struct PassState<S> {
    names: Vec<String>,
    phase: Phase,
    leader_of: Vec<Option<usize>>,
    stats: Vec<Option<S>>,
    active: Vec<bool>,
    rows_seen: Vec<usize>,
    updates: Vec<usize>,
    selection: Option<RowSelection>,
    first_seen: HashMap<TensorId, usize>,
    error: Option<PeftError>,
}

impl<S: RowStatistic> PassState<S> {
    fn observe(&mut self, i: usize, x: &Tensor) -> Result<()> {
        let id = x.id();
        match self.phase {
            Phase::Discover => {
                let leader = match self.first_seen.get(&id) {
                    Some(&j) => self.leader_of[j].unwrap_or(j),
                    None => {
                        self.first_seen.insert(id, i);
                        i
                    }
                };
                if self.leader_of[i].is_none() {
                    self.leader_of[i] = Some(leader);
                }
                Ok(())
            }
            Phase::Collect => {
                let leader = self.leader_of[i].unwrap_or(i);
                if leader != i {
                    return match self.first_seen.get(&id) {
                        Some(&j) if self.leader_of[j] == Some(leader) => Ok(()),
                        _ => Err(PeftError::layer(
                            &self.names[i],
                            format!(
                                "calibration: its input no longer is the input of `{}` (they \
                                 shared one tensor in the first batch); the model's forward must \
                                 feed layers the same way for every batch",
                                self.names[leader]
                            ),
                        )),
                    };
                }
                self.first_seen.insert(id, i);
                if !self.active[i] {
                    return Ok(());
                }
                let Some(selection) = &self.selection else {
                    return Ok(());
                };
                let Some(rows) = selection.rows(x, &self.names[i])? else {
                    return Ok(());
                };
                let n = rows.dim(0)?;
                let Some(stat) = self.stats[i].as_mut() else {
                    return Err(PeftError::layer(
                        &self.names[i],
                        "calibration: the layer was not reached by the first batch's forward",
                    ));
                };
                stat.update(&rows)?;
                self.rows_seen[i] += n;
                self.updates[i] += 1;
                Ok(())
            }
        }
    }
}

fn lock<S>(state: &Mutex<PassState<S>>) -> MutexGuard<'_, PassState<S>> {
    // Observers assign whole fields after their fallible work; a poisoned lock holds no
    // half-written state worth refusing.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Observers on a set of layers, feeding one statistic per input group. The observers are
/// removed when the calibrator is dropped, also on error.
pub struct Calibrator<S: RowStatistic + 'static> {
    layers: Vec<LayerHandle>,
    groups: Vec<InputGroup>,
    state: Arc<Mutex<PassState<S>>>,
}

impl<S: RowStatistic + 'static> Calibrator<S> {
    /// Installs observers on `layers`, runs `first` once to find which layers share an input,
    /// and creates one statistic per group with `make(group, layers)`. Every layer must be
    /// reached by that forward.
    pub fn new(
        layers: Vec<LayerHandle>,
        first: &CalibrationBatch,
        forward: impl FnOnce(&CalibrationBatch) -> Result<()>,
        mut make: impl FnMut(&InputGroup, &[LayerHandle]) -> Result<S>,
    ) -> Result<Self> {
        if layers.is_empty() {
            return Err(PeftError::config("target_modules", "no layer to calibrate"));
        }
        let n = layers.len();
        let state = Arc::new(Mutex::new(PassState {
            names: layers.iter().map(LayerHandle::name).collect(),
            phase: Phase::Discover,
            leader_of: vec![None; n],
            stats: (0..n).map(|_| None).collect(),
            active: vec![true; n],
            rows_seen: vec![0; n],
            updates: vec![0; n],
            selection: None,
            first_seen: HashMap::new(),
            error: None,
        }));
        let mut calibrator = Self {
            layers,
            groups: Vec::new(),
            state,
        };
        for (i, layer) in calibrator.layers.iter().enumerate() {
            let state = Arc::clone(&calibrator.state);
            let observer: InputObserver = Arc::new(move |x: &Tensor| {
                let mut s = lock(&state);
                if s.error.is_some() {
                    return Err(aborted());
                }
                match s.observe(i, x) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        s.error = Some(e);
                        Err(aborted())
                    }
                }
            });
            layer.set_input_observer(Some(observer));
        }
        calibrator.run_forward(first, forward)?;
        let leader_of = lock(&calibrator.state).leader_of.clone();
        let unreached: Vec<String> = leader_of
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_none())
            .map(|(i, _)| calibrator.layers[i].name())
            .collect();
        if !unreached.is_empty() {
            return Err(PeftError::layer(
                unreached.join(", "),
                "calibration: the model's forward never called this layer",
            ));
        }
        let mut groups: Vec<InputGroup> = Vec::new();
        for (i, leader) in leader_of.iter().enumerate() {
            let leader = leader.unwrap_or(i);
            match groups.iter_mut().find(|g| g.leader == leader) {
                Some(g) => g.members.push(i),
                None => groups.push(InputGroup {
                    leader,
                    members: vec![i],
                }),
            }
        }
        let mut stats = Vec::with_capacity(groups.len());
        for g in &groups {
            stats.push((g.leader, make(g, &calibrator.layers)?));
        }
        {
            let mut s = lock(&calibrator.state);
            for (leader, stat) in stats {
                s.stats[leader] = Some(stat);
            }
            s.phase = Phase::Collect;
        }
        calibrator.groups = groups;
        Ok(calibrator)
    }

    /// Runs one batch through `forward`; the groups still active update their statistic.
    pub fn run_batch(
        &self,
        batch: &CalibrationBatch,
        forward: impl FnOnce(&CalibrationBatch) -> Result<()>,
    ) -> Result<()> {
        self.run_forward(batch, forward)
    }

    fn run_forward(
        &self,
        batch: &CalibrationBatch,
        forward: impl FnOnce(&CalibrationBatch) -> Result<()>,
    ) -> Result<()> {
        let selection = batch.selection()?;
        {
            let mut s = lock(&self.state);
            s.selection = Some(selection);
            s.first_seen.clear();
        }
        let result = forward(batch);
        let mut s = lock(&self.state);
        s.selection = None;
        s.first_seen.clear();
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        result
    }

    /// The calibrated layers, in the order given.
    pub fn layers(&self) -> &[LayerHandle] {
        &self.layers
    }

    /// The input groups, in the order of their leaders.
    pub fn groups(&self) -> &[InputGroup] {
        &self.groups
    }

    /// Whether the group led by `leader` keeps updating (EVA stops converged layers).
    pub fn set_active(&self, leader: usize, active: bool) {
        if let Some(a) = lock(&self.state).active.get_mut(leader) {
            *a = active;
        }
    }

    /// Runs `f` on the statistic of the group led by `leader`.
    pub fn with_stat<R>(&self, leader: usize, f: impl FnOnce(&S) -> R) -> Option<R> {
        lock(&self.state)
            .stats
            .get(leader)
            .and_then(Option::as_ref)
            .map(f)
    }

    /// Counted rows the group led by `leader` has taken so far.
    pub fn rows_seen(&self, leader: usize) -> usize {
        lock(&self.state)
            .rows_seen
            .get(leader)
            .copied()
            .unwrap_or(0)
    }

    /// Batches that updated the group led by `leader`.
    pub fn updates(&self, leader: usize) -> usize {
        lock(&self.state).updates.get(leader).copied().unwrap_or(0)
    }

    /// An error naming every group that has taken no row (no usable token reached it).
    pub fn check_rows_seen(&self, batches: usize) -> Result<()> {
        let s = lock(&self.state);
        let empty: Vec<String> = self
            .groups
            .iter()
            .filter(|g| s.rows_seen[g.leader] == 0)
            .map(|g| group_names(&s.names, g))
            .collect();
        if empty.is_empty() {
            return Ok(());
        }
        Err(PeftError::layer(
            empty.join("; "),
            format!(
                "calibration: no usable token reached this layer in {batches} batch(es): the \
                 calibration data has no non-padding tokens"
            ),
        ))
    }

    /// Removes the observers and hands back each group with its statistic and its row count.
    pub fn finish(self) -> Vec<(InputGroup, S, usize)> {
        for layer in &self.layers {
            layer.set_input_observer(None);
        }
        let mut s = lock(&self.state);
        let mut out = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            if let Some(stat) = s.stats[g.leader].take() {
                out.push((g.clone(), stat, s.rows_seen[g.leader]));
            }
        }
        out
    }
}

impl<S: RowStatistic + 'static> Drop for Calibrator<S> {
    fn drop(&mut self) {
        for layer in &self.layers {
            layer.set_input_observer(None);
        }
    }
}

/// The error a forward sees when an observer failed; the calibrator reports the real one.
fn aborted() -> PeftError {
    PeftError::Unsupported("calibration aborted".into())
}

/// `a, b, c` for the members of `g`.
fn group_names(names: &[String], g: &InputGroup) -> String {
    g.members
        .iter()
        .map(|&i| names[i].as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

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
/// any other kind. No linear target at all is an error listing the model's layers.
pub fn target_layers<M>(
    model: &PeftModel<M>,
    targeting: &Targeting,
) -> Result<(Vec<LayerHandle>, Vec<LayerHandle>)> {
    let mut linear = Vec::new();
    let mut other = Vec::new();
    for layer in model.layers() {
        if !targeting.is_target(&layer.name())? {
            continue;
        }
        match layer.geometry() {
            LayerGeometry::Linear { .. } => linear.push(layer.clone()),
            LayerGeometry::Conv2d { .. } => other.push(layer.clone()),
        }
    }
    if linear.is_empty() && other.is_empty() {
        return Err(PeftError::NoTargetMatch {
            targets: targeting
                .target_modules
                .as_ref()
                .map_or_else(|| "(none)".to_string(), |t| t.to_string()),
            found: model.layer_names().join(", "),
        });
    }
    Ok((linear, other))
}

/// Runs `f` on the base model: adapters switched off (when there are any) and dropout off; both
/// are restored afterwards, also when `f` fails.
pub fn with_base_model<M, R>(
    model: &mut PeftModel<M>,
    f: impl FnOnce(&PeftModel<M>) -> Result<R>,
) -> Result<R> {
    let was_training = model.is_training();
    let disable = !model.adapter_names().is_empty() && model.is_enabled();
    if disable {
        model.disable()?;
    }
    model.eval();
    let result = f(model);
    if was_training {
        model.train();
    }
    if disable {
        model.enable()?;
    }
    result
}

/// Tokenised calibration batches: `texts` in order, `batch_size` per batch, at most
/// `max_batches` batches, each cut to `max_len` tokens and padded to its longest sequence.
pub fn text_batches(
    tokenizer: &Tokenizer,
    texts: &[&str],
    batch_size: usize,
    max_batches: usize,
    max_len: usize,
    device: &Device,
) -> Result<Vec<CalibrationBatch>> {
    if batch_size == 0 || max_batches == 0 {
        return Err(PeftError::config(
            "calibration batches",
            format!(
                "batch size and batch count must be at least 1 (got {batch_size} and {max_batches})"
            ),
        ));
    }
    if texts.is_empty() {
        return Err(PeftError::config("calibration data", "no texts"));
    }
    texts
        .chunks(batch_size)
        .take(max_batches)
        .map(|chunk| {
            let b = encode_batch(tokenizer, chunk, max_len, device)?;
            Ok(CalibrationBatch::new(b.input_ids, b.attention_mask))
        })
        .collect()
}
