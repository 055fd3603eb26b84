//! Gradient accumulation over micro-batches.
//!
//! For `k` micro-batches with gradient stores `G₁ … G_k`, the accumulated gradient of each
//! trainable var θ is the mean `(1/k) Σ_j G_j[θ]`. When each micro-batch loss is a mean over
//! `b` examples, this equals the gradient of the mean loss over all `k·b` examples, so 2
//! micro-batches of 8 give the gradient of one batch of 16. Only the given vars' gradients are
//! kept (a backward pass also stores gradients of frozen tensors, which accumulation would
//! otherwise hold on to); a var that no micro-batch reached has no entry in the result.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{PeftError, Result};

/// Sums the gradients of `vars` across micro-batches, one `GradStore` at a time.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator for the named `vars` (e.g. [`crate::PeftModel::trainable_vars`]).
    pub fn new(vars: &[(String, Var)]) -> Self {
        Self {
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            sums: vec![None; vars.len()],
            count: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Micro-batches added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean gradient over the micro-batches added, as a `GradStore` keyed by the vars.
    pub fn finish(self) -> Result<GradStore> {
        if self.count == 0 {
            return Err(PeftError::config(
                "grad_accum",
                "no micro-batch was accumulated",
            ));
        }
        let scale = 1.0 / self.count as f64;
        let mut out = GradStore::default();
        for (var, sum) in self.vars.iter().zip(self.sums) {
            if let Some(s) = sum {
                let g = if self.count == 1 { s } else { (s * scale)? };
                out.insert(var.as_tensor(), g);
            }
        }
        Ok(out)
    }
}

/// The mean of the gradients of `vars` over `stores` (see [`GradAccumulator`]).
pub fn average_grads(stores: &[&GradStore], vars: &[(String, Var)]) -> Result<GradStore> {
    let mut acc = GradAccumulator::new(vars);
    for g in stores {
        acc.add(g)?;
    }
    acc.finish()
}
