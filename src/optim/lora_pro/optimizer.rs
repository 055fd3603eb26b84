//! The LoRA-Pro optimiser: per-pair state, the full and efficient steps, and the state file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};

use super::config::{LoraPair, LoraProConfig, LoraProMode, OPTIMIZER_NAME};
use crate::adapters::lora_pro::LoraProFactors;
use crate::error::{PeftError, Result};
use crate::optim::adamw::{AdamW, StepStats};
use crate::optim::state_file::{StateReader, StateWriter};

/// One pair inside the optimiser.
#[derive(Debug)]
struct Slot {
    pair: LoraPair,
    a_name: String,
    b_name: String,
    /// `(r, in)` and `(out, r)`: the factors as matrices (conv kernels flattened).
    a_shape: (usize, usize),
    b_shape: (usize, usize),
    /// Full mode: the moments of g̃ `[out, in]` and the pair's step count.
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    step: u64,
    /// Whether weight decay applies to A and to B (full mode; efficient mode leaves decay to
    /// the inner AdamW).
    decay_a: bool,
    decay_b: bool,
}

impl Slot {
    /// The prefix of this pair's tensors in the state file.
    fn key(&self) -> String {
        format!("lora_pro.{}.{}", self.pair.module, self.pair.adapter)
    }

    /// The dtype the step computes in: f64 for f64 factors, f32 otherwise.
    fn work_dtype(&self) -> DType {
        if self.pair.a.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// A detached value or gradient of A (`which = 0`) or B (1) as a matrix in the work dtype.
    fn matrix(&self, t: &Tensor, which: usize) -> Result<Tensor> {
        let shape = if which == 0 {
            self.a_shape
        } else {
            self.b_shape
        };
        Ok(t.detach().to_dtype(self.work_dtype())?.reshape(shape)?)
    }

    fn factors(&self, damping: f64) -> Result<LoraProFactors> {
        let a = self.matrix(self.pair.a.as_tensor(), 0)?;
        let b = self.matrix(self.pair.b.as_tensor(), 1)?;
        LoraProFactors::new(&a, &b, self.pair.scaling, damping)
    }

    /// The raw gradients of A and B as matrices; `None` when neither has one. A missing one of
    /// the two is zero.
    fn grads(&self, grads: &GradStore) -> Result<Option<(Tensor, Tensor)>> {
        let (a, b) = (self.pair.a.as_tensor(), self.pair.b.as_tensor());
        let check = |name: &str, g: &Tensor, var: &Tensor| -> Result<()> {
            if g.dims() != var.dims() {
                return Err(PeftError::ShapeMismatch {
                    key: format!("gradient of {name}"),
                    expected: var.dims().to_vec(),
                    got: g.dims().to_vec(),
                });
            }
            Ok(())
        };
        let (ga, gb) = match (grads.get(a), grads.get(b)) {
            (None, None) => return Ok(None),
            (Some(ga), Some(gb)) => {
                check(&self.a_name, ga, a)?;
                check(&self.b_name, gb, b)?;
                (self.matrix(ga, 0)?, self.matrix(gb, 1)?)
            }
            (Some(ga), None) => {
                check(&self.a_name, ga, a)?;
                let ga = self.matrix(ga, 0)?;
                let gb = Tensor::zeros(self.b_shape, ga.dtype(), ga.device())?;
                (ga, gb)
            }
            (None, Some(gb)) => {
                check(&self.b_name, gb, b)?;
                let gb = self.matrix(gb, 1)?;
                let ga = Tensor::zeros(self.a_shape, gb.dtype(), gb.device())?;
                (ga, gb)
            }
        };
        Ok(Some((ga, gb)))
    }
}

/// The LoRA-Pro optimiser over named vars, some of which form LoRA pairs.
#[derive(Debug)]
pub struct LoraPro {
    config: LoraProConfig,
    slots: Vec<Slot>,
    /// Full mode: the vars outside every pair. Efficient mode: every var.
    adamw: AdamW,
    steps: u64,
}

impl LoraPro {
    /// An optimiser over `vars` (as [`AdamW::new`] takes them). Every pair's A and B must be
    /// among `vars` (matched by identity, not by name), and there must be at least one pair.
    pub fn new(
        vars: Vec<(String, Var)>,
        pairs: Vec<LoraPair>,
        config: LoraProConfig,
    ) -> Result<Self> {
        Self::with_no_decay(vars, pairs, config, &[] as &[String])
    }

    /// As [`LoraPro::new`], but the vars named in `no_decay` get no weight decay (see
    /// [`AdamW::with_no_decay`]; names not among `vars` are ignored).
    pub fn with_no_decay<S: AsRef<str>>(
        vars: Vec<(String, Var)>,
        pairs: Vec<LoraPair>,
        config: LoraProConfig,
        no_decay: &[S],
    ) -> Result<Self> {
        config.validate()?;
        let exempt: HashSet<&str> = no_decay.iter().map(|n| n.as_ref()).collect();
        if pairs.is_empty() {
            return Err(PeftError::config(
                "optimizer",
                "LoRA-Pro needs at least one LoRA adapter among the trainable vars, and the \
                 model has none",
            ));
        }
        let names: HashMap<TensorId, &str> = vars
            .iter()
            .map(|(n, v)| (v.as_tensor().id(), n.as_str()))
            .collect();
        let mut paired = HashSet::new();
        let mut slots = Vec::with_capacity(pairs.len());
        for pair in pairs {
            let name_of = |var: &Var, which: &str| -> Result<String> {
                names
                    .get(&var.as_tensor().id())
                    .map(|n| n.to_string())
                    .ok_or_else(|| {
                        PeftError::layer(
                            &pair.module,
                            format!(
                                "{which} of adapter `{}` is not among the trainable vars",
                                pair.adapter
                            ),
                        )
                    })
            };
            let a_name = name_of(&pair.a, "lora_A")?;
            let b_name = name_of(&pair.b, "lora_B")?;
            if !paired.insert(pair.a.as_tensor().id()) || !paired.insert(pair.b.as_tensor().id()) {
                return Err(PeftError::layer(
                    &pair.module,
                    format!("adapter `{}`'s factors appear in two pairs", pair.adapter),
                ));
            }
            let (a_shape, b_shape) = matrix_shapes(&pair)?;
            let (exp_avg, exp_avg_sq) = match config.mode {
                LoraProMode::Full => {
                    let dtype = if pair.a.dtype() == DType::F64 {
                        DType::F64
                    } else {
                        DType::F32
                    };
                    let zeros = Tensor::zeros((b_shape.0, a_shape.1), dtype, pair.a.device())?;
                    (Some(zeros.clone()), Some(zeros))
                }
                LoraProMode::Efficient => (None, None),
            };
            let decay_a = !exempt.contains(a_name.as_str());
            let decay_b = !exempt.contains(b_name.as_str());
            slots.push(Slot {
                pair,
                a_name,
                b_name,
                a_shape,
                b_shape,
                exp_avg,
                exp_avg_sq,
                step: 0,
                decay_a,
                decay_b,
            });
        }
        let adam_vars = match config.mode {
            LoraProMode::Full => vars
                .into_iter()
                .filter(|(_, v)| !paired.contains(&v.as_tensor().id()))
                .collect(),
            LoraProMode::Efficient => vars,
        };
        let adamw = AdamW::with_no_decay(adam_vars, config.adamw(), no_decay)?;
        Ok(Self {
            config,
            slots,
            adamw,
            steps: 0,
        })
    }

    /// The hyper-parameters this optimiser runs with.
    pub fn config(&self) -> &LoraProConfig {
        &self.config
    }

    /// The LoRA-Pro variant in use (full or efficient).
    pub fn mode(&self) -> LoraProMode {
        self.config.mode
    }

    /// The LoRA pairs this optimiser adjusts, in the order given.
    pub fn pairs(&self) -> Vec<&LoraPair> {
        self.slots.iter().map(|s| &s.pair).collect()
    }

    /// Number of calls to [`LoraPro::step`] so far (restored by [`LoraPro::load_state`]).
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Number of optimiser-state values held for the pairs in full mode (`2·out·in` per pair;
    /// 0 in efficient mode, whose state lives in the inner AdamW).
    pub fn full_state_len(&self) -> usize {
        self.slots
            .iter()
            .map(|s| match (&s.exp_avg, &s.exp_avg_sq) {
                (Some(m), Some(v)) => m.elem_count() + v.elem_count(),
                _ => 0,
            })
            .sum()
    }

    /// Full mode: the moments `(m, v)` and step count of the pair on `module` / `adapter`.
    pub fn pair_state(&self, module: &str, adapter: &str) -> Result<(Tensor, Tensor, u64)> {
        let slot = self
            .slots
            .iter()
            .find(|s| s.pair.module == module && s.pair.adapter == adapter)
            .ok_or_else(|| PeftError::UnknownAdapter {
                adapter: adapter.to_string(),
                module: module.to_string(),
            })?;
        match (&slot.exp_avg, &slot.exp_avg_sq) {
            (Some(m), Some(v)) => Ok((m.clone(), v.clone(), slot.step)),
            _ => Err(PeftError::Unsupported(
                "efficient-mode LoRA-Pro keeps no full-size moments".into(),
            )),
        }
    }

    /// One LoRA-Pro update with learning rate `lr`, from the raw (accumulated, clipped)
    /// gradients in `grads`. Vars without a gradient are skipped; so is a pair when neither
    /// factor has one.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(PeftError::config(
                "lr",
                format!("must be finite and ≥ 0, got {lr}"),
            ));
        }
        let stats = match self.config.mode {
            LoraProMode::Full => self.step_full(grads, lr)?,
            LoraProMode::Efficient => self.step_efficient(grads, lr)?,
        };
        self.steps += 1;
        Ok(stats)
    }

    fn step_full(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let LoraProConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            damping,
            ..
        } = self.config;
        let mut stats = StepStats::default();
        // Every pair's new factors are computed before any var changes.
        let mut updates = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            let Some((g_a, g_b)) = slot.grads(grads)? else {
                stats.skipped += 2;
                continue;
            };
            let (Some(m), Some(v)) = (&slot.exp_avg, &slot.exp_avg_sq) else {
                return Err(PeftError::Unsupported(
                    "full-mode LoRA-Pro state is missing".into(),
                ));
            };
            let factors = slot.factors(damping)?;
            let g_tilde = factors.equivalent_gradient(&g_a, &g_b)?;
            let m = ((m * beta1)? + (&g_tilde * (1.0 - beta1))?)?;
            let v = ((v * beta2)? + (g_tilde.sqr()? * (1.0 - beta2))?)?;
            let t = slot.step + 1;
            let t_i32 = i32::try_from(t).unwrap_or(i32::MAX);
            let bias_correction1 = 1.0 - beta1.powi(t_i32);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t_i32)).sqrt();
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let adam_direction = ((&m / bias_correction1)? / denom)?;
            let (lora_ga, lora_gb) = factors.lora_gradients(&adam_direction)?;
            let (delta_a, delta_b) = factors.adjust(&lora_ga, &lora_gb)?;
            let decay = |on: bool| if on { 1.0 - lr * weight_decay } else { 1.0 };
            let a = slot.matrix(slot.pair.a.as_tensor(), 0)?;
            let b = slot.matrix(slot.pair.b.as_tensor(), 1)?;
            let a_new = ((a * decay(slot.decay_a))? - (delta_a * lr)?)?;
            let b_new = ((b * decay(slot.decay_b))? - (delta_b * lr)?)?;
            updates.push((i, a_new, b_new, m, v, t));
        }
        for (i, a_new, b_new, m, v, t) in updates {
            let slot = &mut self.slots[i];
            for (var, value) in [(&slot.pair.a, a_new), (&slot.pair.b, b_new)] {
                var.set(&value.reshape(var.shape())?.to_dtype(var.dtype())?)?;
            }
            slot.exp_avg = Some(m);
            slot.exp_avg_sq = Some(v);
            slot.step = t;
            stats.updated += 2;
        }
        let rest = self.adamw.step(grads, lr)?;
        stats.updated += rest.updated;
        stats.skipped += rest.skipped;
        Ok(stats)
    }

    fn step_efficient(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let mut adjusted: HashMap<TensorId, Tensor> = HashMap::new();
        for slot in &self.slots {
            let Some((g_a, g_b)) = slot.grads(grads)? else {
                continue;
            };
            let factors = slot.factors(self.config.damping)?;
            let (ga_adj, gb_adj) = factors.adjust(&g_a, &g_b)?;
            for (var, g) in [(&slot.pair.a, ga_adj), (&slot.pair.b, gb_adj)] {
                adjusted.insert(var.as_tensor().id(), g.reshape(var.shape())?);
            }
        }
        let mut store = GradStore::default();
        for (_, var) in self.adamw.vars() {
            let t = var.as_tensor();
            if let Some(g) = adjusted.remove(&t.id()) {
                store.insert(t, g);
            } else if let Some(g) = grads.get(t) {
                store.insert(t, g.clone());
            }
        }
        self.adamw.step(&store, lr)
    }

    /// Writes the state to a safetensors file at `path`, atomically.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut file = StateWriter::default();
        self.adamw.write_moments(&mut file)?;
        for slot in &self.slots {
            if let (Some(m), Some(v)) = (&slot.exp_avg, &slot.exp_avg_sq) {
                file.moments(&slot.key(), m, v, slot.step, &slot.pair.module)?;
            }
        }
        let c = &self.config;
        let mut metadata = vec![
            ("optimizer", OPTIMIZER_NAME.to_string()),
            ("mode", c.mode.to_string()),
            ("step", self.steps.to_string()),
            ("damping", c.damping.to_string()),
        ];
        metadata.extend(c.adamw().metadata());
        file.write(path, &metadata)
    }

    /// Restores the state written by [`LoraPro::save_state`]. The file must come from LoRA-Pro
    /// in the same mode; every var and pair must find its tensors with the right shapes, and
    /// every tensor must belong to one. On error nothing changes. The hyper-parameters stay
    /// those given to [`LoraPro::new`].
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let mut file = StateReader::open(path)?;
        let optimizer = file.metadata("optimizer").unwrap_or("?");
        if optimizer != OPTIMIZER_NAME {
            return Err(PeftError::config(
                "optimizer",
                format!("{} holds {optimizer} state, not LoRA-Pro's", path.display()),
            ));
        }
        let mode = file.metadata("mode").unwrap_or("?");
        if mode != self.config.mode.to_string() {
            return Err(PeftError::config(
                "lora_pro_mode",
                format!(
                    "{} holds {mode}-mode LoRA-Pro state, this run uses {} mode",
                    path.display(),
                    self.config.mode
                ),
            ));
        }
        let adam_states = self.adamw.read_moments(&mut file)?;
        let mut pair_states = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(current) = &slot.exp_avg else {
                continue;
            };
            let (m, v, step) = file.take_moments(&slot.key(), current.dims())?;
            let (dtype, device) = (current.dtype(), current.device().clone());
            let m = m.to_dtype(dtype)?.to_device(&device)?;
            let v = v.to_dtype(dtype)?.to_device(&device)?;
            pair_states.push((i, m, v, step));
        }
        file.finish()?;
        let steps = file.step_count()?.unwrap_or(0);
        self.adamw.apply_moments(adam_states);
        for (i, m, v, step) in pair_states {
            let slot = &mut self.slots[i];
            slot.exp_avg = Some(m);
            slot.exp_avg_sq = Some(v);
            slot.step = step;
        }
        self.steps = steps;
        Ok(())
    }
}

/// `(r, in)` and `(out, r)` for a pair's factors (a conv's kernels flattened), after checking
/// that they fit together.
fn matrix_shapes(pair: &LoraPair) -> Result<((usize, usize), (usize, usize))> {
    let (a, b) = (pair.a.dims(), pair.b.dims());
    let r = a.first().copied().unwrap_or(0);
    let out = b.first().copied().unwrap_or(0);
    let a_cols = pair.a.elem_count().checked_div(r).unwrap_or(0);
    let b_cols = pair.b.elem_count().checked_div(out).unwrap_or(0);
    if r == 0 || out == 0 || a_cols == 0 || b_cols != r {
        return Err(PeftError::layer(
            &pair.module,
            format!(
                "LoRA-Pro: lora_A {a:?} and lora_B {b:?} do not form a rank-r pair \
                 (A: [r, in, …], B: [out, r, 1, 1])"
            ),
        ));
    }
    Ok(((r, a_cols), (out, r)))
}
