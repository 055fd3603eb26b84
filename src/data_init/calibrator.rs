//! The observers that stream each targeted layer's input rows into one statistic per group of
//! layers fed the same tensor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Tensor, TensorId};

use super::batch::{CalibrationBatch, RowSelection};
use crate::error::{PeftError, Result};
use crate::layer::{InputObserver, LayerHandle};

/// An accumulator over a layer's input rows (EVA's incremental PCA, CorDA's covariance).
pub trait RowStatistic: Send {
    /// Takes one batch's counted input rows, `[N, in]` f32 with `N ≥ 1`, on the model's device.
    fn update(&mut self, rows: &Tensor) -> Result<()>;

    /// As [`update`](Self::update), told which rows came from which sequence: the rows are the
    /// batch's sequences one after the other, `lengths[i]` rows for the `i`-th sequence that
    /// has a counted token (`Σ lengths = N`; an input of one row per sequence, `[B, in]`, gives
    /// lengths of 1). The calibrator calls this one; the default ignores the split.
    fn update_sequences(&mut self, rows: &Tensor, lengths: &[usize]) -> Result<()> {
        let _ = lengths;
        self.update(rows)
    }
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
                let Some((rows, lengths)) = selection.rows(x, &self.names[i])? else {
                    return Ok(());
                };
                let n = rows.dim(0)?;
                let Some(stat) = self.stats[i].as_mut() else {
                    return Err(PeftError::layer(
                        &self.names[i],
                        "calibration: the layer was not reached by the first batch's forward",
                    ));
                };
                stat.update_sequences(&rows, lengths)?;
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
