//! Switching adapters off for a scope (PEFT's `with model.disable_adapter():`), and the check
//! that the active adapters can be trained at all.

use std::ops::Deref;

use crate::error::{NoGradientCause, PeftError, Result};
use crate::layer::SwitchState;

use super::PeftModel;

/// The model with every adapter switched off, until this guard is dropped (PEFT's
/// `with model.disable_adapter():`); made by [`PeftModel::disable_adapter`]. It derefs to the
/// model, whose forward then computes the pristine base.
///
/// Dropping the guard puts back exactly what it found: on/off, the active adapters, and adapters
/// that were merged, with the very weight tensors they were merged into (nothing is recomputed,
/// so the outputs afterwards are bit-identical to those before). Restoring therefore cannot fail,
/// and `Drop` loses no error. Only disabling can fail (unmerging computes each merged delta); then
/// [`disable_adapter`](PeftModel::disable_adapter) restores the state itself and returns the
/// error.
///
/// The guard gives shared access only: adapters are not added, removed, merged or switched while
/// it lives. Changing an adapter's vars through a layer handle meanwhile is not undone, and a
/// merged adapter's weight is put back as it was merged.
pub struct DisabledAdapters<'a, M> {
    model: &'a mut PeftModel<M>,
    saved: Option<Saved>,
}

/// What the guard puts back.
struct Saved {
    enabled: bool,
    active: Vec<String>,
    layers: Vec<SwitchState>,
}

impl<M> PeftModel<M> {
    fn save_switch_state(&self) -> Saved {
        Saved {
            enabled: self.enabled,
            active: self.active.clone(),
            layers: self.layers.iter().map(|l| l.switch_state()).collect(),
        }
    }

    fn restore_switch_state(&mut self, saved: Saved) {
        for (layer, state) in self.layers.iter().zip(saved.layers) {
            layer.restore_switch_state(state);
        }
        self.enabled = saved.enabled;
        self.active = saved.active;
    }

    /// Switches every adapter off until the returned guard is dropped (PEFT's
    /// `with model.disable_adapter():`); merged adapters are unmerged meanwhile. See
    /// [`DisabledAdapters`] for what is restored. On error (an unmerge failed) nothing changed.
    ///
    /// ```no_run
    /// # fn f(mut model: candle_peft::PeftModel<candle_peft::PeftLinear>, x: candle_core::Tensor)
    /// # -> candle_peft::Result<()> {
    /// use candle_core::Module;
    /// let adapted = model.forward(&x)?;
    /// let base = {
    ///     let base_model = model.disable_adapter()?;
    ///     base_model.forward(&x)?
    /// }; // adapters back on here, merged ones merged again
    /// # Ok(()) }
    /// ```
    pub fn disable_adapter(&mut self) -> Result<DisabledAdapters<'_, M>> {
        let saved = self.save_switch_state();
        if let Err(e) = self.disable() {
            self.restore_switch_state(saved);
            return Err(e);
        }
        Ok(DisabledAdapters {
            model: self,
            saved: Some(saved),
        })
    }

    /// Runs `f` on the model with every adapter switched off, then restores the previous state
    /// as [`disable_adapter`](Self::disable_adapter)'s guard does, also when `f` fails. `f`'s
    /// error type is anything a [`PeftError`] converts into (`PeftError` itself, `anyhow::Error`).
    pub fn with_disabled<R, E: From<PeftError>>(
        &mut self,
        f: impl FnOnce(&Self) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let guard = self.disable_adapter()?;
        f(&guard)
    }

    /// Checks that the active adapters' trainable vars can get a gradient: none of them may be
    /// merged into a layer's weight or switched off there. [`PeftError::NoGradient`] names the
    /// first adapter and layer that fails. The trainer runs this before the first step.
    pub fn check_trainable(&self) -> Result<()> {
        for layer in &self.layers {
            for adapter in &self.active {
                if !layer.has_adapter(adapter) {
                    continue;
                }
                let cause = if layer.merged_adapters().contains(adapter) {
                    NoGradientCause::Merged
                } else if !layer.is_enabled() {
                    NoGradientCause::Disabled
                } else {
                    continue;
                };
                return Err(PeftError::NoGradient {
                    adapter: adapter.clone(),
                    module: layer.name(),
                    cause,
                });
            }
        }
        Ok(())
    }
}

impl<M> DisabledAdapters<'_, M> {
    /// Restores the previous state now (what dropping the guard does).
    pub fn restore(self) {}
}

impl<M> Deref for DisabledAdapters<'_, M> {
    type Target = PeftModel<M>;

    fn deref(&self) -> &PeftModel<M> {
        self.model
    }
}

impl<M> Drop for DisabledAdapters<'_, M> {
    fn drop(&mut self) {
        if let Some(saved) = self.saved.take() {
            self.model.restore_switch_state(saved);
        }
    }
}
