//! AdamW with decoupled weight decay and f32 state, following `torch.optim.AdamW`.
//!
//! For every parameter θ that has a gradient g, with its own step count t = 1, 2, …:
//!
//! ```text
//! θ ← θ · (1 − lr·λ)                      (decoupled weight decay)
//! m ← β₁·m + (1 − β₁)·g
//! v ← β₂·v + (1 − β₂)·g²
//! θ ← θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! which is `θ ← θ − lr·(m̂/(√v̂ + ε) + λ·θ)` with the bias-corrected `m̂`, `v̂`. Vars named
//! in the exempt set of [`AdamW::with_no_decay`] skip the first line (PyTorch's parameter group
//! with `weight_decay = 0`): the trainer exempts trainables that start at a value taken from
//! the base weight ([`crate::PeftModel::no_weight_decay_vars`]). The moments
//! `m` (`exp_avg`) and `v` (`exp_avg_sq`) are f32 whatever the parameter's dtype; the update is
//! computed in f32 and cast back. A parameter with no gradient in the store is skipped and its
//! step count does not advance (PyTorch skips parameters whose `grad` is `None`).
//!
//! Parameters are identified by the names of [`crate::PeftModel::trainable_vars`]. The state
//! file is a safetensors file with, per parameter, `<name>.exp_avg`, `<name>.exp_avg_sq` (f32,
//! the parameter's shape) and `<name>.step` (an i64 scalar), and metadata `optimizer`, `step`
//! (calls to [`AdamW::step`]) and the hyper-parameters. It is written atomically.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::state_file::{StateReader, StateWriter};
use crate::error::{PeftError, Result};

pub use super::state_file::{EXP_AVG, EXP_AVG_SQ, STEP};

/// AdamW hyper-parameters (PyTorch's defaults except `weight_decay`, which is HF PEFT
/// training's usual 0.01; PyTorch's AdamW default is also 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁, the decay rate of the first-moment (mean) estimate; default 0.9.
    pub beta1: f64,
    /// β₂, the decay rate of the second-moment (uncentred variance) estimate; default 0.999.
    pub beta2: f64,
    /// ε added to `√v̂` in the denominator for numerical stability; default 1e-8.
    pub eps: f64,
    /// λ, the decoupled weight-decay coefficient (applied as `θ · (1 − lr·λ)`); default 0.01.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// The hyper-parameters as state-file metadata (`beta1`, `beta2`, `eps`, `weight_decay`).
    pub(crate) fn metadata(&self) -> [(&'static str, String); 4] {
        [
            ("beta1", self.beta1.to_string()),
            ("beta2", self.beta2.to_string()),
            ("eps", self.eps.to_string()),
            ("weight_decay", self.weight_decay.to_string()),
        ]
    }

    /// Checks `0 ≤ β < 1`, `ε ≥ 0`, `λ ≥ 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(PeftError::config(
                    field,
                    format!("must be in [0, 1), got {b}"),
                ));
            }
        }
        for (field, x) in [("eps", self.eps), ("weight_decay", self.weight_decay)] {
            if !(x.is_finite() && x >= 0.0) {
                return Err(PeftError::config(
                    field,
                    format!("must be finite and ≥ 0, got {x}"),
                ));
            }
        }
        Ok(())
    }
}

/// What one [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepStats {
    /// Parameters that had a gradient and were updated.
    pub updated: usize,
    /// Parameters with no gradient in the store, left as they were.
    pub skipped: usize,
}

#[derive(Debug, Clone)]
struct ParamState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW over named vars, with f32 moments.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    state: Vec<ParamState>,
    /// Per var, in `vars` order: whether weight decay applies to it.
    decays: Vec<bool>,
    config: AdamWConfig,
    steps: u64,
}

impl AdamW {
    /// An optimiser over `vars` (names must be unique; dtypes must be floating point), with zero
    /// moments and step 0. Weight decay applies to every var.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        Self::with_no_decay(vars, config, &[] as &[String])
    }

    /// As [`AdamW::new`], but the vars named in `no_decay` get no weight decay. Names that are
    /// not among `vars` are ignored, so one model-wide list serves optimisers over part of the
    /// vars (LoRA-Pro's inner AdamW, a task that trains a subset).
    pub fn with_no_decay<S: AsRef<str>>(
        vars: Vec<(String, Var)>,
        config: AdamWConfig,
        no_decay: &[S],
    ) -> Result<Self> {
        config.validate()?;
        let mut seen = BTreeMap::new();
        let mut state = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            if seen.insert(name.as_str(), ()).is_some() {
                return Err(PeftError::config(
                    "trainable vars",
                    format!("the name `{name}` appears twice"),
                ));
            }
            if !var.dtype().is_float() {
                return Err(PeftError::config(
                    "trainable vars",
                    format!("`{name}` has dtype {:?}, not a float", var.dtype()),
                ));
            }
            let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            state.push(ParamState {
                exp_avg: zeros.clone(),
                exp_avg_sq: zeros,
                step: 0,
            });
        }
        let exempt: HashSet<&str> = no_decay.iter().map(|n| n.as_ref()).collect();
        let decays = vars
            .iter()
            .map(|(name, _)| !exempt.contains(name.as_str()))
            .collect();
        Ok(Self {
            vars,
            state,
            decays,
            config,
            steps: 0,
        })
    }

    /// The hyper-parameters this optimiser runs with.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The names of the vars that weight decay skips, in var order.
    pub fn no_decay_vars(&self) -> Vec<&str> {
        self.vars
            .iter()
            .zip(&self.decays)
            .filter(|(_, decays)| !**decays)
            .map(|((name, _), _)| name.as_str())
            .collect()
    }

    /// The vars this optimiser updates, in the order given to [`AdamW::new`].
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Number of calls to [`AdamW::step`] so far (restored by [`AdamW::load_state`]).
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// The state of parameter `name`: `(exp_avg, exp_avg_sq, step)`.
    pub fn state(&self, name: &str) -> Result<(&Tensor, &Tensor, u64)> {
        let i = self.index(name)?;
        let s = &self.state[i];
        Ok((&s.exp_avg, &s.exp_avg_sq, s.step))
    }

    /// Replaces the state of parameter `name` (moments are cast to f32 and moved to the var's
    /// device; their shape must be the var's).
    pub fn set_state(
        &mut self,
        name: &str,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        step: u64,
    ) -> Result<()> {
        let i = self.index(name)?;
        let var = &self.vars[i].1;
        let exp_avg = state_tensor(&format!("{name}.{EXP_AVG}"), exp_avg, var)?;
        let exp_avg_sq = state_tensor(&format!("{name}.{EXP_AVG_SQ}"), exp_avg_sq, var)?;
        self.state[i] = ParamState {
            exp_avg,
            exp_avg_sq,
            step,
        };
        Ok(())
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.vars
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| PeftError::MissingTensor {
                key: name.to_string(),
                location: "the optimiser's vars".to_string(),
            })
    }

    /// One AdamW update of every var that has a gradient in `grads`, with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(PeftError::config(
                "lr",
                format!("must be finite and ≥ 0, got {lr}"),
            ));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let mut stats = StepStats::default();
        for (((name, var), st), &decays) in self
            .vars
            .iter()
            .zip(self.state.iter_mut())
            .zip(&self.decays)
        {
            let Some(grad) = grads.get(var.as_tensor()) else {
                stats.skipped += 1;
                continue;
            };
            if grad.dims() != var.dims() {
                return Err(PeftError::ShapeMismatch {
                    key: format!("gradient of {name}"),
                    expected: var.dims().to_vec(),
                    got: grad.dims().to_vec(),
                });
            }
            // Detached: a gradient an op built from tracked tensors would otherwise tie the
            // moments, which live across steps, to this step's whole graph.
            let g = grad.detach().to_dtype(DType::F32)?;
            let t = st.step + 1;
            let exp_avg = (st.exp_avg.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
            let exp_avg_sq =
                (st.exp_avg_sq.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let t_i32 = i32::try_from(t).unwrap_or(i32::MAX);
            let bias_correction1 = 1.0 - beta1.powi(t_i32);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t_i32)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = (exp_avg_sq.sqrt()? / bias_correction2_sqrt)?.affine(1.0, eps)?;
            let theta = var.as_detached_tensor().to_dtype(DType::F32)?;
            let theta = if decays {
                theta.affine(1.0 - lr * weight_decay, 0.0)?
            } else {
                theta
            };
            let theta = (theta - (exp_avg.div(&denom)? * step_size)?)?;
            var.set(&theta.to_dtype(var.dtype())?)?;
            *st = ParamState {
                exp_avg,
                exp_avg_sq,
                step: t,
            };
            stats.updated += 1;
        }
        self.steps += 1;
        Ok(stats)
    }

    /// Writes the state to a safetensors file at `path`, atomically.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut file = StateWriter::default();
        self.write_moments(&mut file)?;
        let mut metadata = vec![
            ("optimizer", "AdamW".to_string()),
            ("step", self.steps.to_string()),
        ];
        metadata.extend(self.config.metadata());
        file.write(path, &metadata)
    }

    /// Restores the state written by [`AdamW::save_state`]. Every var of this optimiser must
    /// find its three tensors with the right shapes, and every tensor in the file must belong
    /// to one of the vars; otherwise nothing changes and the error names the tensor. The
    /// hyper-parameters stay those given to [`AdamW::new`].
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let mut file = StateReader::open(path)?;
        let moments = self.read_moments(&mut file)?;
        file.finish()?;
        let steps = match file.step_count()? {
            Some(s) => s,
            None => moments.0.iter().map(|s| s.step).max().unwrap_or(0),
        };
        self.apply_moments(moments);
        self.steps = steps;
        Ok(())
    }

    /// Adds every var's moments and step count to a state file.
    pub(crate) fn write_moments(&self, file: &mut StateWriter) -> Result<()> {
        for ((name, _), st) in self.vars.iter().zip(&self.state) {
            file.moments(name, &st.exp_avg, &st.exp_avg_sq, st.step, name)?;
        }
        Ok(())
    }

    /// Takes every var's moments and step count from a state file, checked and cast (f32, the
    /// var's device), without applying them.
    pub(crate) fn read_moments(&self, file: &mut StateReader<'_>) -> Result<LoadedMoments> {
        let mut state = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            let (m, v, step) = file.take_moments(name, var.dims())?;
            state.push(ParamState {
                exp_avg: state_tensor(&format!("{name}.{EXP_AVG}"), &m, var)?,
                exp_avg_sq: state_tensor(&format!("{name}.{EXP_AVG_SQ}"), &v, var)?,
                step,
            });
        }
        Ok(LoadedMoments(state))
    }

    /// Replaces every var's moments and step count by those read.
    pub(crate) fn apply_moments(&mut self, moments: LoadedMoments) {
        self.state = moments.0;
    }
}

/// Every var's moments and step count, read from a state file and checked, in var order.
pub(crate) struct LoadedMoments(Vec<ParamState>);

/// `t` as an f32 state tensor for `var`: shape checked (error naming `key`), cast, moved.
fn state_tensor(key: &str, t: &Tensor, var: &Var) -> Result<Tensor> {
    if t.dims() != var.dims() {
        return Err(PeftError::ShapeMismatch {
            key: key.to_string(),
            expected: var.dims().to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(t.to_dtype(DType::F32)?
        .to_device(var.device())?
        .contiguous()?)
}
